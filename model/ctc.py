"""The CTC head: re-ranking transcription beams by how well the audio spells them.

Why: Eureka-mini's backbone, trained from scratch on a small grammar, sometimes lets its language prior win over
the audio when it transcribes — a content word swapped for another the grammar allows ("friday" → "sunday"), or a
second sentence replaced by a fluent training-like one. A CTC head over the adapter's outputs reads the words
straight from each 80 ms audio token, with no language model at all. So transcription can decode a few beam
hypotheses and keep the one with the best ``LM log-probability + CTC_WEIGHT × CTC log-likelihood``: the backbone
proposes fluent sentences, the audio picks among them (numbers in ``assets/eureka-mini/README.md``).

``python -m model.ctc_fit --model DIR --data DIR`` fits a head on a checkpoint's frozen audio path (encoder +
adapter) and writes the checkpoint back with it; ``python -m model.train`` exports the head it trained alongside.
"""

from __future__ import annotations

import torch
from torch import nn

# Re-ranking defaults for transcription. In session 10's probe, weights 0.3–3 gave the same held-out WER: the CTC
# log-likelihoods of competing beams differ by whole nats per wrong word, the backbone's by fractions.
RERANK_BEAMS = 6
CTC_WEIGHT = 1.0
MAX_RERANK_BEAMS = 16  # each beam is a whole hypothesis decoded in parallel: memory and time grow with it


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
