"""Step 2: two audio models ("Model A", "Model B") answer as ``<THINK>…</THINK><RESPONSE>X. …</RESPONSE>``.

``ModelAnswerer`` runs the loaded Eureka model on the official QA prompt (audio, then the question) under its own
decoding settings, so one checkpoint greedy and the same checkpoint sampled (or two checkpoints) make the two
answerers. Our small models answer with an option and no reasoning, so the THINK part is *built*, not generated: it
states the measured acoustic facts the answer can be checked against and how the model's raw reply was read
(see docs/dataflux.md). ``EndpointAnswerer`` asks an OpenAI-compatible audio chat endpoint, which writes its own
trace. ``parse_choice`` reads the chosen option out of any reply and never raises.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

from .acoustics import AcousticFacts
from .core import LETTERS, AnswerResult, ClipContext, parse_question
from .llm import ChatFn, ReplyError

RESPONSE_TAG = re.compile(r"<RESPONSE>(.*?)(?:</RESPONSE>|$)", re.DOTALL | re.IGNORECASE)
THINK_TAG = re.compile(r"<THINK>(.*?)</THINK>", re.DOTALL | re.IGNORECASE)
LEADING_LETTER = re.compile(r"^\s*(answer\s*(?:is)?\s*[:：]?\s*|the\s+(?:correct\s+)?answer\s+is\s*[:：]?\s*)?"
                            r"([(\[])?([A-Da-d])([)\]])?(.*)$", re.IGNORECASE | re.DOTALL)
ANSWER_IS = re.compile(r"\banswer\s*(?:is|:)\s*[(\[]?([A-D])\b")


def _normal(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9#]+", " ", text.lower()).split())


def parse_choice(text: Any, options: list[str]) -> str | None:
    """The option letter a reply chose (a leading letter, "answer is X", or exactly one option's text), else None.

    "A young child" is read by its text, not as option A: a bare leading capital counts as a letter only when
    punctuation, the end of the reply or that option's own text follows it.
    """
    if not isinstance(text, str) or not text.strip():
        return None
    tagged = RESPONSE_TAG.search(text)
    body = tagged.group(1) if tagged else text
    letter = _leading_letter(body, options)
    if letter:
        return letter
    match = ANSWER_IS.search(body)
    if match:
        return match.group(1)
    return _by_option_text(body, options)


def _leading_letter(body: str, options: list[str]) -> str | None:
    match = LEADING_LETTER.match(body)
    if not match:
        return None
    prefix, opening, letter, closing, rest = match.groups()
    marked = bool(prefix or opening or closing)
    if not (letter.isupper() or marked):
        return None
    letter = letter.upper()
    if not rest.strip() or rest[:1] in ".):,;" or marked and rest[:1].isspace():
        return letter
    option = _normal(options[LETTERS.index(letter)]) if len(options) == 4 else ""
    return letter if rest[:1].isspace() and option and _normal(rest).startswith(option) else None


def _by_option_text(body: str, options: list[str]) -> str | None:
    said = f" {_normal(body)} "
    found = [i for i, option in enumerate(options) if _normal(option) and f" {_normal(option)} " in said]
    if len(found) == 1:
        return LETTERS[found[0]]
    if found:  # one option's words inside another's ("Major" in "C major"): the longest wins if it holds the rest
        longest = max(found, key=lambda i: len(_normal(options[i])))
        if all(_normal(options[i]) in _normal(options[longest]) for i in found):
            return LETTERS[longest]
    return None


def facts_summary(facts: dict[str, Any]) -> str:
    """A one-sentence digest of the measured facts, for reasoning traces."""
    if not facts:
        return "No acoustic measurements are available."
    measured = AcousticFacts.from_dict(facts)
    parts = [f"The clip lasts {measured.duration_s:.1f} s at {measured.rms_dbfs:.0f} dBFS"]
    if measured.segments:
        speech = len(measured.speech_segments)
        parts.append(f"{len(measured.segments)} sound segment(s), {speech} speech-like")
        if measured.median_f0_hz is not None:
            parts.append(f"median pitch {measured.median_f0_hz:.0f} Hz")
    else:
        parts.append("no sound above the silence threshold")
    return ", ".join(parts) + "."


def build_reasoning(question: str, raw: str, letter: str | None, facts: dict[str, Any]) -> str:
    """The THINK trace for a model that answers without one: measured facts, then how its reply was read."""
    stem, options = parse_question(question)
    reply = " ".join(raw.split())[:200]
    reading = (f"the reply \"{reply}\" selects option {letter} ({options[LETTERS.index(letter)]})" if letter
               else f"the reply \"{reply}\" names none of the four options")
    return f"{facts_summary(facts)} Question: {stem} Listening to the audio, {reading}."


def response_text(question: str, letter: str | None) -> str:
    if letter is None:
        return ""
    _, options = parse_question(question)
    return f"{letter}. {options[LETTERS.index(letter)]}"


def qa_messages(audio_path: str, question: str) -> list[dict[str, Any]]:
    """The authors' audio-QA conversation: no system prompt, the audio then the question."""
    return [{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": audio_path}},
                                         {"type": "text", "text": question}]}]


class ModelAnswerer:
    """The in-process Eureka model under fixed decoding settings (e.g. greedy for A, sampled for B)."""

    def __init__(self, model: Any, label: str, settings: dict[str, Any] | None = None, max_new_tokens: int = 32,
                 batch_size: int = 8):
        self.model = model
        self.settings = dict(settings or {"temperature": 0})
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.name = f"{getattr(model, 'name', 'model')}:{label}"

    def _settings_for(self, clip: ClipContext) -> dict[str, Any]:
        settings = {**self.settings, "max_new_tokens": self.max_new_tokens}
        if settings.get("temperature", 0) > 0:  # sampled: reproducible per clip
            settings["seed"] = int(settings.get("seed", 0)) + clip.seed
        return settings

    def answer(self, clip: ClipContext, questions: list[str]) -> list[AnswerResult]:
        settings = self._settings_for(clip)
        raws: list[str] = []
        for start in range(0, len(questions), self.batch_size):
            batch = [qa_messages(clip.path, q) for q in questions[start:start + self.batch_size]]
            raws.extend(self.model.generate(batch, **settings))
        return [self._result(q, raw, clip) for q, raw in zip(questions, raws, strict=True)]

    def _result(self, question: str, raw: str, clip: ClipContext) -> AnswerResult:
        _, options = parse_question(question)
        letter = parse_choice(raw, options)
        return AnswerResult(self.name, build_reasoning(question, raw, letter, clip.facts), letter,
                            response_text(question, letter), raw)


ENDPOINT_INSTRUCTION = ("Listen to the audio and answer the multiple-choice question. Think briefly first. Reply "
                        "exactly as <THINK>your reasoning</THINK><RESPONSE>X. option text</RESPONSE>.")


class EndpointAnswerer:
    """An OpenAI-compatible chat endpoint that accepts audio (``input_audio`` content parts, base64 WAV)."""

    def __init__(self, chat: ChatFn, name: str | None = None):
        self.chat = chat
        self.name = name or f"endpoint:{getattr(chat, 'name', 'callable')}"

    def answer(self, clip: ClipContext, questions: list[str]) -> list[AnswerResult]:
        audio = base64.b64encode(Path(clip.path).read_bytes()).decode("ascii")
        fmt = Path(clip.path).suffix.lstrip(".").lower() or "wav"
        results = []
        for question in questions:
            content = [{"type": "input_audio", "input_audio": {"data": audio, "format": fmt}},
                       {"type": "text", "text": f"{ENDPOINT_INSTRUCTION}\n\n{question}"}]
            raw = self.chat([{"role": "user", "content": content}])
            results.append(self._result(question, raw, clip))
        return results

    def _result(self, question: str, raw: str, clip: ClipContext) -> AnswerResult:
        _, options = parse_question(question)
        letter = parse_choice(raw, options)
        think = THINK_TAG.search(raw)
        reasoning = think.group(1).strip() if think else build_reasoning(question, raw, letter, clip.facts)
        return AnswerResult(self.name, reasoning, letter, response_text(question, letter), raw)


def check_question(question: str) -> None:
    """Raise ReplyError if a stored question is not in the 4-option layout (answerers need the options)."""
    parse_question(question)


__all__ = ["EndpointAnswerer", "ModelAnswerer", "ReplyError", "build_reasoning", "check_question", "parse_choice"]
