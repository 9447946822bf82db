"""The CTC head: re-ranking transcription beams by how well the audio spells them, and fitting the head.

Why: Eureka-mini's backbone, trained from scratch on a small grammar, sometimes lets its language prior win over
the audio when it transcribes — a content word swapped for another the grammar allows ("friday" → "sunday"), or a
second sentence replaced by a fluent training-like one. A CTC head over the adapter's outputs reads the words
straight from each 80 ms audio token, with no language model at all. So transcription can decode a few beam
hypotheses and keep the one with the best ``LM log-probability + CTC_WEIGHT × CTC log-likelihood``: the backbone
proposes fluent sentences, the audio picks among them (numbers in ``assets/eureka-mini/README.md``).

``python -m model.ctc --model DIR --data DIR`` fits a head on a checkpoint's frozen audio path (encoder + adapter)
and writes the checkpoint back with it; ``python -m model.train`` exports the head it trained alongside.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

# Re-ranking defaults for transcription. In session 10's probe, weights 0.3–3 gave the same held-out WER: the CTC
# log-likelihoods of competing beams differ by whole nats per wrong word, the backbone's by fractions.
RERANK_BEAMS = 6
CTC_WEIGHT = 1.0


def ctc_log_probs(head: nn.Linear, audio_embeds: torch.Tensor) -> torch.Tensor:
    """[tokens, hidden] adapter outputs → [tokens, vocabulary] float32 log-probabilities (blank included)."""
    return head(audio_embeds.to(head.weight.dtype)).float().log_softmax(-1)


def ctc_loss(head: nn.Linear, clips: list[torch.Tensor], targets: list[list[int]], blank_id: int) -> torch.Tensor:
    """Mean CTC loss of each clip's adapter outputs [tokens, hidden] spelling its target token ids (training)."""
    log_probs = nn.utils.rnn.pad_sequence([ctc_log_probs(head, clip) for clip in clips])
    flat_targets = torch.tensor([t for target in targets for t in target], dtype=torch.long)
    return nn.functional.ctc_loss(
        log_probs, flat_targets, torch.tensor([c.shape[0] for c in clips]),
        torch.tensor([len(t) for t in targets]), blank=blank_id, zero_infinity=True)


def ctc_log_likelihood(log_probs: torch.Tensor, hypotheses: list[list[int]], blank_id: int) -> torch.Tensor:
    """log p_CTC(hypothesis | audio) for each hypothesis, given one clip's [tokens, vocabulary] log-probabilities.

    A hypothesis the audio is too short to spell gets −inf (never chosen over one it can)."""
    n = len(hypotheses)
    flat = torch.tensor([t for h in hypotheses for t in h], dtype=torch.long)
    losses = nn.functional.ctc_loss(
        log_probs.unsqueeze(1).expand(-1, n, -1), flat, torch.full((n,), log_probs.shape[0]),
        torch.tensor([len(h) for h in hypotheses]), blank=blank_id, reduction="none", zero_infinity=False)
    return -losses


def greedy_ctc(log_probs: torch.Tensor, blank_id: int) -> list[int]:
    """Best path, repeats merged and blanks dropped: what the head alone reads (a probe, not the decoder)."""
    path = log_probs.argmax(-1).tolist()
    return [t for i, t in enumerate(path) if t != blank_id and (i == 0 or t != path[i - 1])]


# --- fitting a head on a trained checkpoint -----------------------------------------------------------------------
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
    parser = argparse.ArgumentParser(prog="python -m model.ctc", description=__doc__.splitlines()[0])
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
    clips, targets, _ = spelled_clips(model, args.data, "train")
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
