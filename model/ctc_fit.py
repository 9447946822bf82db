"""``python -m model.ctc_fit --model DIR --data DIR``: fit a CTC head on a trained checkpoint that lacks one.

The checkpoint's own encoder and adapter stay frozen: their outputs for every training clip are computed once, then
a linear head learns to spell each clip's transcript from them with the CTC loss alone (``model.ctc``). This is how
the session-5 Eureka-mini got the head its lost work directory held (5.5 min on 2 cores); ``python -m model.train``
exports the head its CTC term trains, so its checkpoints need no fitting.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .ctc import ctc_log_probs, ctc_loss, greedy_ctc


def spelled_clips(model, data_dir: Path, split: str) -> tuple[list[torch.Tensor], list[list[int]], list[str]]:
    """Every clip of ``split``: its adapter outputs (the checkpoint's own encoder and adapter, frozen), its
    transcript's token ids (empty without speech: all blanks) and the transcript."""
    from .data.synth import read_manifest
    from .data.tasks import transcript
    from .tokenizer import encode_plain_text

    metas = [m for m in read_manifest(data_dir / "manifest.jsonl") if m["split"] == split]
    clips, targets, texts = [], [], []
    for meta in tqdm(metas, desc=f"adapter outputs ({split})", unit="clip"):
        # A copy outside inference mode: the head's training saves its inputs for the backward pass.
        clips.append(model.embed_audio([data_dir / meta["audio"]]).to(torch.float32, copy=True))
        texts.append(transcript(meta))
        targets.append(encode_plain_text(model.tokenizer, texts[-1]))
    return clips, targets, texts


def fit_head(clips: list[torch.Tensor], targets: list[list[int]], vocab_size: int, blank_id: int,
             steps: int = 1500, batch_size: int = 32, lr: float = 3e-3, seed: int = 0) -> nn.Linear:
    """A linear CTC head on fixed adapter outputs: AdamW with a cosine schedule over random batches (seeded)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    head = nn.Linear(clips[0].shape[1], vocab_size, bias=False)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=lr * 0.1)
    progress = tqdm(range(steps), desc="CTC head", unit="step")
    for _ in progress:
        batch = rng.sample(range(len(clips)), min(batch_size, len(clips)))
        loss = ctc_loss(head, [clips[i] for i in batch], [targets[i] for i in batch], blank_id)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        progress.set_postfix(loss=f"{float(loss.detach()):.3f}")
    return head.eval().requires_grad_(False)


def probe_wer(head: nn.Linear, clips: list[torch.Tensor], texts: list[str], tokenizer, blank_id: int) -> float:
    """Greedy CTC word error rate of the head alone over the clips with speech."""
    from .evaluate import word_error_rate

    with torch.no_grad():
        pairs = [(text, tokenizer.decode(greedy_ctc(ctc_log_probs(head, clip), blank_id)))
                 for clip, text in zip(clips, texts, strict=True) if text]
    return word_error_rate([reference for reference, _ in pairs], [hypothesis for _, hypothesis in pairs])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.ctc_fit", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="checkpoint directory (our save_pretrained layout)")
    parser.add_argument("--data", required=True, type=Path, help="dataset dir from `python -m model.data`")
    parser.add_argument("--out", type=Path, help="write the checkpoint with its head here (default: --model)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from .loading import load_model

    started = time.perf_counter()
    model = load_model(args.model)
    model.encoder_cache = None  # thousands of clips, each seen once
    blank_id, vocab_size = model.special_ids.pad, int(model.config.backbone["vocab_size"])
    if not (args.data / "manifest.jsonl").is_file():
        raise SystemExit(f"{args.data} has no manifest.jsonl: give a dataset from `python -m model.data`")
    clips, targets, _ = spelled_clips(model, args.data, "train")
    if not clips:
        raise SystemExit(f"{args.data} has no training clips to fit a head on")
    head = fit_head(clips, targets, vocab_size, blank_id, args.steps, args.batch_size, args.lr, args.seed)
    val_clips, _, val_texts = spelled_clips(model, args.data, "val")
    wer = probe_wer(head, val_clips, val_texts, model.tokenizer, blank_id)
    print(f"greedy CTC WER of the head alone on validation: {wer:.1%}")
    model.config.ctc_head = True
    model.model.ctc_head = head
    out = args.out or args.model
    model.save_pretrained(out, dtype=torch.float16)
    print(f"wrote {out} in {(time.perf_counter() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
