"""The three DataFlux steps as small interfaces, and the plain data that flows between them.

Step 1 ``Captioner`` + ``QuestionGenerator``, step 2 ``Answerer`` (two of them: Model A and Model B), step 3
``Judge``. Each has an LLM/model-backed implementation and an offline one, so the pipeline, its tests and the
quality measurement run without any server, and a real endpoint can be swapped in without touching the pipeline.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Protocol

from .llm import ReplyError
from .taxonomy import TaxonomyCategory

LETTERS = ("A", "B", "C", "D")
N_QUESTIONS = 5
OPTION_LINE = re.compile(r"^\s*\(?([A-Da-d])\s*[.):]\s*(.*\S)\s*$")


@dataclass
class ClipContext:
    """Everything the steps may know about one clip."""

    path: str
    seed: int
    facts: dict[str, Any] = field(default_factory=dict)  # measured (acoustics.AcousticFacts.to_dict)
    meta: dict[str, Any] = field(default_factory=dict)  # synthetic ground truth, {} for other audio
    caption: str = ""  # the enriched caption, once step 1 has run
    model_caption: str = ""  # the captioner's own words (without the measured facts)


@dataclass
class CaptionResult:
    captioner: str
    model_text: str
    text: str  # model_text + the measured facts: what the generator and the judge read


@dataclass
class GeneratedQuestions:
    """The generator's published JSON reply plus, when the generator knows them, the correct letters."""

    generator: str
    reply: dict[str, Any]  # exactly {"is_success": bool, "questions": [str, ...]}
    keys: list[str | None] = field(default_factory=list)


@dataclass
class AnswerResult:
    answerer: str
    reasoning: str
    chosen_option: str | None
    response: str  # "X. option text" (or "" when no option could be read)
    raw_text: str

    @property
    def formatted(self) -> str:
        """The published layout: ``<THINK>…</THINK><RESPONSE>X. option</RESPONSE>``."""
        return f"<THINK>{self.reasoning}</THINK><RESPONSE>{self.response}</RESPONSE>"


@dataclass
class JudgeInput:
    category_path: str
    caption: str
    question: str
    options: list[str]
    answer_a: AnswerResult
    answer_b: AnswerResult
    key: str | None = None  # the generator's correct option, when known


class Captioner(Protocol):
    name: str

    def caption(self, clip: ClipContext) -> CaptionResult: ...


class QuestionGenerator(Protocol):
    name: str

    def generate(self, category: TaxonomyCategory, clip: ClipContext) -> GeneratedQuestions: ...


class Answerer(Protocol):
    name: str

    def answer(self, clip: ClipContext, questions: list[str]) -> list[AnswerResult]: ...


class Judge(Protocol):
    name: str

    def judge(self, item: JudgeInput) -> dict[str, Any]: ...


# --- the question layout shared by every step ---------------------------------------------------------------------
def format_question(stem: str, options: list[str]) -> str:
    """``stem`` then one ``X. option`` line per option (the DataFlux layout)."""
    return "\n".join([stem] + [f"{letter}. {option}" for letter, option in zip(LETTERS, options, strict=True)])


def parse_question(text: Any) -> tuple[str, list[str]]:
    """Split a question string into its stem and its four options A-D; ``ReplyError`` when it is not one."""
    if not isinstance(text, str):
        raise ReplyError(f"a question must be a string, got {type(text).__name__}")
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if len(lines) < 5:
        raise ReplyError("a question needs a stem and four option lines A-D")
    matches = [OPTION_LINE.match(line) for line in lines[-4:]]
    if not all(matches):
        raise ReplyError("the last four lines must be options 'A. …' to 'D. …'")
    letters = [m.group(1).upper() for m in matches]
    if letters != list(LETTERS):
        raise ReplyError(f"options must be A, B, C, D in order, got {', '.join(letters)}")
    options = [m.group(2).strip() for m in matches]
    if len({o.lower() for o in options}) < 4:
        raise ReplyError("the four options must differ")
    stem = " ".join(line.strip() for line in lines[:-4])
    return stem, options


def option_text(question: str, letter: str) -> str:
    """``"X. option"`` for a letter of a question."""
    _, options = parse_question(question)
    return f"{letter}. {options[LETTERS.index(letter)]}"
