"""Step 1b: the question generator — does the caption fit the category, and if so, five 4-option questions.

Output is exactly the published JSON, ``{"is_success": bool, "questions": ["Q\\nA. …\\nB. …\\nC. …\\nD. …", …]}``.
``LLMQuestionGenerator`` asks a text LLM with the published prompt structure (category path, human exemplars,
caption, rules) and validates its reply; ``OfflineQuestionGenerator`` writes the questions from facts (synthetic
metadata, or measured acoustic facts) and so also knows each correct option.
"""

from __future__ import annotations

import re
import zlib
from typing import Any

import numpy as np

from .acoustics import AcousticFacts
from .builders import build_question
from .core import N_QUESTIONS, ClipContext, GeneratedQuestions, format_question, parse_question
from .llm import ChatFn, ReplyError, extract_json
from .taxonomy import TaxonomyCategory

FORBIDDEN = re.compile(r"\b(caption|description|described|transcript provided|the text)\b", re.IGNORECASE)
# Five phrasings around one builder's question, so the five questions of a category are not five copies.
PHRASINGS = ("{stem}", "Listen to the clip. {stem}", "Based on the given audio, {lower}", "From what you hear, {lower}",
             "Listen carefully: {stem}")

GENERATOR_SYSTEM = "You write multiple-choice listening-comprehension questions for training an audio language model."
GENERATOR_RULES = """Rules:
1. First decide whether the audio, as the caption describes it, belongs to the category above and gives enough \
detail for it. If not, reply exactly {"is_success": false, "questions": []}.
2. Otherwise write exactly 5 multiple-choice questions about this category, each with 4 options A-D.
3. Ask about what is heard in the audio. Never mention the caption, a description or a text ("according to the \
caption" is forbidden).
4. Exactly one option is correct given the caption. Put it at a random position (A, B, C or D) and vary the position \
across questions.
5. The three other options are plausible for this category but clearly wrong given the caption.
6. Do not reveal or hint at the answer in the question.
7. Each question is one string: the question, then one line per option: "A. ...", "B. ...", "C. ...", "D. ...".
Reply with JSON only, in exactly this form:
{"is_success": true, "questions": ["<question>\\nA. <option>\\nB. <option>\\nC. <option>\\nD. <option>", ...]}"""


def generator_prompt(category: TaxonomyCategory, caption: str) -> list[dict[str, str]]:
    """The published prompt: category path, exemplars, caption, rules."""
    exemplars = "\n\n".join(f"Example {i}:\n{q}" for i, q in enumerate(category.exemplars, 1))
    user = (f"Category: {category.path}\n\n"
            f"Examples of questions in this category, written by people:\n{exemplars}\n\n"
            "Dense caption of the audio clip (treat it as the truth about what can be heard):\n"
            f"\"\"\"\n{caption}\n\"\"\"\n\n"
            f"{GENERATOR_RULES}")
    return [{"role": "system", "content": GENERATOR_SYSTEM}, {"role": "user", "content": user}]


def parse_generator_reply(text: Any) -> dict[str, Any]:
    """Validate an LLM reply into the exact published JSON; ``ReplyError`` (only) when it cannot be used.

    Questions that are malformed or mention the caption are dropped; more than five are cut to five; a successful
    reply with no usable question is an error.
    """
    data = extract_json(text)
    success = data.get("is_success")
    if not isinstance(success, bool):
        raise ReplyError("'is_success' must be true or false")
    questions = data.get("questions", [])
    if not isinstance(questions, list):
        raise ReplyError("'questions' must be a list of strings")
    if not success:
        return {"is_success": False, "questions": []}
    usable = []
    for question in questions:
        try:
            stem, options = parse_question(question)
        except ReplyError:
            continue
        if FORBIDDEN.search(stem) or any(FORBIDDEN.search(o) for o in options):
            continue
        usable.append(format_question(stem, options))
    if not usable:
        raise ReplyError("is_success is true but no question has a stem and four options A-D")
    return {"is_success": True, "questions": usable[:N_QUESTIONS]}


class LLMQuestionGenerator:
    """Any text LLM (``ChatFn``: an OpenAI-compatible endpoint or the in-process backbone), validated replies."""

    def __init__(self, chat: ChatFn, name: str | None = None, attempts: int = 2):
        self.chat = chat
        self.name = name or f"llm:{getattr(chat, 'name', 'callable')}"
        self.attempts = attempts

    def generate(self, category: TaxonomyCategory, clip: ClipContext) -> GeneratedQuestions:
        messages = generator_prompt(category, clip.caption)
        error: ReplyError | None = None
        for _ in range(self.attempts):
            try:
                reply = parse_generator_reply(self.chat(messages))
            except ReplyError as exc:
                error = exc
                continue
            return GeneratedQuestions(self.name, reply, [None] * len(reply["questions"]))
        raise ReplyError(f"question generator gave no usable reply for {category.key}: {error}")


class OfflineQuestionGenerator:
    """Questions from facts: the clip's synthetic metadata when it has some, else its measured acoustic facts.

    Seeded per (clip, category), so a re-run writes the same questions. The correct position is drawn uniformly by
    ``model.data.tasks.multiple_choice``.
    """

    name = "offline-facts"

    def __init__(self, n_questions: int = N_QUESTIONS):
        self.n_questions = n_questions

    def generate(self, category: TaxonomyCategory, clip: ClipContext) -> GeneratedQuestions:
        rng = np.random.default_rng([clip.seed, zlib.crc32(category.key.encode())])
        facts = AcousticFacts.from_dict(clip.facts) if clip.facts else None
        questions: list[str] = []
        keys: list[str | None] = []
        for i in range(self.n_questions):
            built = build_question(category.key, clip.meta, facts, rng)
            if built is None:
                break
            stem, options = parse_question(built["question"])
            questions.append(format_question(rephrase(stem, i), options))
            keys.append(built["answer_letter"])
        if not questions:
            return GeneratedQuestions(self.name, {"is_success": False, "questions": []}, [])
        return GeneratedQuestions(self.name, {"is_success": True, "questions": questions}, keys)


def rephrase(stem: str, index: int) -> str:
    """The ``index``-th phrasing of a question stem."""
    template = PHRASINGS[index % len(PHRASINGS)]
    return template.format(stem=stem, lower=stem[:1].lower() + stem[1:])
