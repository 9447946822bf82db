"""Step 3: the judge — compare both answers with the caption (ground truth) and keep or discard the sample.

Both judges return exactly the published JSON: ``{"consensus", "consistency_with_caption", "winner", "reasoning",
"final_action"}``. Keep when ``final_action == "KEEP_USING_WINNER"``; the winner's answer becomes the target.
Outcomes: only A right, only B right, both right → keep; both wrong → discard.

``LLMJudge`` sends the published prompt (category path, caption, question, both traces and answers, domain rules)
to a text LLM and validates the reply. ``RuleJudge`` decides offline: the reference answer is the generator's key
when it has one, else the single option the caption names; with neither, agreement between the two models decides.
"""

from __future__ import annotations

import re
from typing import Any

from .core import LETTERS, AnswerResult, JudgeInput
from .llm import ChatFn, ReplyError, extract_json
from .models import CONSISTENCY, FINAL_ACTIONS, WINNERS

VERDICT_FIELDS = ("consensus", "consistency_with_caption", "winner", "reasoning", "final_action")
KEEP, DISCARD = FINAL_ACTIONS

JUDGE_SYSTEM = "You verify training data for an audio language model. You are careful, literal and brief."
JUDGE_RULES = """Domain rules:
1. The caption is the ground truth about the audio. An answer is right only if the caption supports it.
2. Measured acoustic facts in the caption (duration, loudness in dBFS, pitch in Hz, sound segments) outrank the \
captioner's own words when they disagree.
3. Counts (beeps, clicks, notes, speakers) must match exactly. Pitch words: low, medium and high are distinct; a \
frequency must be within about 15 % of the stated one. Quoted speech must match word for word.
4. A reply that names no option, or several options, is wrong.
5. consensus is true when both models chose the same option.
6. consistency_with_caption: STRONG_MATCH when the caption states the winning answer, WEAK_MATCH when it only \
suggests it, CONFLICT when the caption contradicts the answers.
7. winner: MODEL_A or MODEL_B when only that model is right, TIE when both are right, NONE when neither is.
8. final_action: KEEP_USING_WINNER when at least one model is right, otherwise DISCARD.
Reply with JSON only, exactly:
{"consensus": true, "consistency_with_caption": "STRONG_MATCH", "winner": "TIE", "reasoning": "...", \
"final_action": "KEEP_USING_WINNER"}"""


def judge_prompt(item: JudgeInput) -> list[dict[str, str]]:
    """The published judge prompt."""
    user = (f"Category: {item.category_path}\n\n"
            f"Caption of the audio clip (ground truth):\n\"\"\"\n{item.caption}\n\"\"\"\n\n"
            f"Question:\n{item.question}\n\n"
            f"Model A:\n{item.answer_a.formatted}\n\n"
            f"Model B:\n{item.answer_b.formatted}\n\n"
            f"{JUDGE_RULES}")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def _enum(data: dict[str, Any], name: str, allowed: tuple[str, ...]) -> str:
    value = data.get(name)
    if not isinstance(value, str) or value.strip().upper() not in allowed:
        raise ReplyError(f"'{name}' must be one of {', '.join(allowed)}, got {value!r}"[:300])
    return value.strip().upper()


def _bool(data: dict[str, Any], name: str) -> bool:
    value = data.get(name)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ReplyError(f"'{name}' must be true or false, got {value!r}"[:300])


def parse_verdict(text: Any) -> dict[str, Any]:
    """Validate a judge reply into exactly the published JSON; ``ReplyError`` (only) when it cannot be used."""
    data = extract_json(text)
    missing = [f for f in VERDICT_FIELDS if f not in data]
    if missing:
        raise ReplyError(f"judge reply lacks {', '.join(missing)}")
    reasoning = data["reasoning"]
    if not isinstance(reasoning, str):
        raise ReplyError("'reasoning' must be a string")
    verdict = {
        "consensus": _bool(data, "consensus"),
        "consistency_with_caption": _enum(data, "consistency_with_caption", CONSISTENCY),
        "winner": _enum(data, "winner", WINNERS),
        "reasoning": reasoning.strip(),
        "final_action": _enum(data, "final_action", FINAL_ACTIONS),
    }
    if verdict["final_action"] == KEEP and verdict["winner"] == "NONE":
        raise ReplyError("KEEP_USING_WINNER needs a winner (MODEL_A, MODEL_B or TIE), got NONE")
    return verdict


class LLMJudge:
    """Any text LLM as the judge, replies validated by ``parse_verdict`` (retried once on a bad reply)."""

    def __init__(self, chat: ChatFn, name: str | None = None, attempts: int = 2):
        self.chat = chat
        self.name = name or f"llm:{getattr(chat, 'name', 'callable')}"
        self.attempts = attempts

    def judge(self, item: JudgeInput) -> dict[str, Any]:
        messages = judge_prompt(item)
        error: ReplyError | None = None
        for _ in range(self.attempts):
            try:
                return parse_verdict(self.chat(messages))
            except ReplyError as exc:
                error = exc
        raise ReplyError(f"judge gave no usable verdict: {error}")


def _normal(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9#]+", " ", text.lower()).split())


def caption_reference(caption: str, options: list[str]) -> str | None:
    """The one option whose text the caption contains (whole words), or None when zero or several do."""
    said = f" {_normal(caption)} "
    found = [LETTERS[i] for i, o in enumerate(options) if _normal(o) and f" {_normal(o)} " in said]
    return found[0] if len(found) == 1 else None


class RuleJudge:
    """Offline judge. ``use_key=False`` ignores the generator's key (caption-only, like an LLM judge)."""

    def __init__(self, use_key: bool = True):
        self.use_key = use_key
        self.name = "rule" if use_key else "rule-caption-only"

    def reference(self, item: JudgeInput) -> tuple[str | None, str]:
        if self.use_key and item.key in LETTERS:
            return item.key, "the generator's key (written from the clip's facts)"
        found = caption_reference(item.caption, item.options)
        return (found, "the only option the caption names") if found else (None, "")

    def judge(self, item: JudgeInput) -> dict[str, Any]:
        a, b = item.answer_a.chosen_option, item.answer_b.chosen_option
        consensus = a is not None and a == b
        reference, source = self.reference(item)
        if reference is None:
            return self._by_agreement(consensus, item)
        a_ok, b_ok = a == reference, b == reference
        winner = {(True, True): "TIE", (True, False): "MODEL_A", (False, True): "MODEL_B"}.get((a_ok, b_ok), "NONE")
        keep = winner != "NONE"
        reasoning = (f"Reference answer {reference} ({item.options[LETTERS.index(reference)]}) is {source}. "
                     f"Model A chose {_said(item.answer_a)} ({'right' if a_ok else 'wrong'}); "
                     f"Model B chose {_said(item.answer_b)} ({'right' if b_ok else 'wrong'}).")
        return verdict(consensus, "STRONG_MATCH" if keep else "CONFLICT", winner, reasoning, keep)

    def _by_agreement(self, consensus: bool, item: JudgeInput) -> dict[str, Any]:
        if consensus:
            reasoning = (f"The caption names no single option; both models chose {_said(item.answer_a)}, "
                         "so the agreed answer is kept as a weak match.")
            return verdict(True, "WEAK_MATCH", "TIE", reasoning, True)
        reasoning = (f"The caption names no single option and the models disagree (A: {_said(item.answer_a)}, "
                     f"B: {_said(item.answer_b)}), so nothing can be verified.")
        return verdict(False, "WEAK_MATCH", "NONE", reasoning, False)


def _said(answer: AnswerResult) -> str:
    return answer.chosen_option or "no option"


def verdict(consensus: bool, consistency: str, winner: str, reasoning: str, keep: bool) -> dict[str, Any]:
    """A verdict dict in the published field order."""
    return {"consensus": consensus, "consistency_with_caption": consistency, "winner": winner,
            "reasoning": reasoning, "final_action": KEEP if keep else DISCARD}


def target_answer(result: dict[str, Any], answer_a: AnswerResult, answer_b: AnswerResult) -> str | None:
    """The training target a verdict selects (the winner's answer), or None when it discards or has none."""
    if result["final_action"] != KEEP:
        return None
    if result["winner"] == "MODEL_B":
        chosen = answer_b
    elif result["winner"] == "MODEL_A":
        chosen = answer_a
    else:  # TIE: both right, so both chose the same option; take whichever was readable
        chosen = answer_a if answer_a.chosen_option else answer_b
    return chosen.response or None
