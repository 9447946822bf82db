"""Prompt text and token layout, exactly as the official processor produces them (reference doc section 3).

``<|im_start|>system\\n{system}<|im_end|>\\n``  (only with a system prompt)
``<|im_start|>user\\n<|audio_start|>{audio pads}<|audio_end|>{text}<|im_end|>\\n``
``<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n``  (the empty think block: without it the model stops at once)

User and system text is tokenized with special-token parsing *off*, so text such as ``<|im_end|>`` typed by a user
stays plain text and can never close a turn or open an audio slot.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

ASR_SYSTEM_PROMPT = "You are an advanced ASR (Automatic Speech Recognition) AI assistant."
CAPTION_PROMPT = "Please provide a comprehensive description of the input audio, covering all details."
DEFAULT_QA_QUESTION = (
    "Based on the given audio, identify the source of the crowing.\nA. Rooster\nB. Dog\nC. Cat\nD. Cow"
)
TASKS = ("asr", "qa", "caption")
MULTIPLE_CHOICE_OPTION = re.compile(r"^([A-D])\. (.*)$", flags=re.MULTILINE)

SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>")
THINK_TOKENS = ("<think>", "</think>")
TEXT_TOKEN_TYPE, AUDIO_TOKEN_TYPE = 0, 3


def asr_system_prompt(language: str | None = None) -> str:
    """The official ASR system prompt, optionally pinning the language (a replication found this halves drift)."""
    if not language:
        return ASR_SYSTEM_PROMPT
    return f"{ASR_SYSTEM_PROMPT} Transcribe the speech in {language}, and answer only with the transcript."


def task_messages(
    task: str, audio: Any, question: str | None = None, system_prompt: str | None = None
) -> list[dict[str, Any]]:
    """The conversation the authors use for each task; ``audio`` is anything the front-end accepts."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    user: list[dict[str, Any]] = [{"type": "audio_url", "audio_url": {"url": audio}}]
    if task == "qa":
        user.append({"type": "text", "text": question or DEFAULT_QA_QUESTION})
    elif task == "caption":
        user.append({"type": "text", "text": question or CAPTION_PROMPT})
    system = system_prompt if system_prompt is not None else (ASR_SYSTEM_PROMPT if task == "asr" else None)
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    messages.append({"role": "user", "content": user})
    return messages


@dataclass
class SpecialTokenIds:
    """Special-token ids read from the tokenizer, never hard-coded (they differ between tokenizers)."""

    im_start: int
    im_end: int
    audio_start: int
    audio_end: int
    audio_pad: int
    think_start: int
    think_end: int
    pad: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> SpecialTokenIds:
        vocab = tokenizer.get_vocab()
        missing = [t for t in SPECIAL_TOKENS + THINK_TOKENS if t not in vocab]
        if missing:
            raise ValueError(f"tokenizer lacks the Eureka special tokens {missing}")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else vocab["<|im_end|>"]
        return cls(
            vocab["<|im_start|>"], vocab["<|im_end|>"], vocab["<|audio_start|>"], vocab["<|audio_end|>"],
            vocab["<|audio_pad|>"], vocab["<think>"], vocab["</think>"], pad,
        )


@dataclass
class Prompt:
    """Token ids of one conversation plus the audio sources in the order their slots appear."""

    input_ids: list[int] = field(default_factory=list)
    token_type_ids: list[int] = field(default_factory=list)
    audio_sources: list[Any] = field(default_factory=list)


def _content_items(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message.get("content", "")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise ValueError(f"message content must be a string or a list of items, got {type(content).__name__}")
    return content


def audio_items(messages: list[dict[str, Any]]) -> list[Any]:
    """Every audio source in the conversation, in prompt order."""
    sources = []
    for message in messages:
        for item in _content_items(message):
            if item.get("type") in ("audio_url", "audio"):
                sources.append(_audio_source(item))
    return sources


def _audio_source(item: dict[str, Any]) -> Any:
    if item.get("type") == "audio":
        return item.get("audio")
    value = item.get("audio_url")
    return value.get("url") if isinstance(value, dict) else value


def build_prompt(
    messages: list[dict[str, Any]],
    encode_text: Callable[[str], list[int]],
    ids: SpecialTokenIds,
    audio_token_counts: list[int],
    add_generation_prompt: bool = True,
) -> Prompt:
    """Token ids for a conversation. ``audio_token_counts[i]`` is the number of pads for the i-th audio item."""
    prompt = Prompt()
    pending_text: list[str] = []

    def flush_text() -> None:
        if pending_text:
            text_ids = encode_text("".join(pending_text))
            prompt.input_ids.extend(text_ids)
            prompt.token_type_ids.extend([TEXT_TOKEN_TYPE] * len(text_ids))
            pending_text.clear()

    def special(*token_ids: int, token_type: int = TEXT_TOKEN_TYPE) -> None:
        flush_text()
        prompt.input_ids.extend(token_ids)
        prompt.token_type_ids.extend([token_type] * len(token_ids))

    for message in messages:
        role = message.get("role")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"unknown message role {role!r}")
        special(ids.im_start)
        pending_text.append(f"{role}\n")
        for item in _content_items(message):
            kind = item.get("type")
            if kind == "text":
                pending_text.append(str(item.get("text", "")))
            elif kind in ("audio_url", "audio"):
                if role != "user":
                    raise ValueError("audio may only appear in user messages")
                index = len(prompt.audio_sources)
                if index >= len(audio_token_counts):
                    raise ValueError("more audio items than audio token counts")
                prompt.audio_sources.append(_audio_source(item))
                special(ids.audio_start)
                special(*[ids.audio_pad] * audio_token_counts[index], token_type=AUDIO_TOKEN_TYPE)
                special(ids.audio_end)
            else:
                raise ValueError(f"unknown content item type {kind!r}")
        special(ids.im_end)
        pending_text.append("\n")
    if add_generation_prompt:
        special(ids.im_start)
        pending_text.append("assistant\n")
        special(ids.think_start)
        pending_text.append("\n\n")
        special(ids.think_end)
        pending_text.append("\n\n")
    flush_text()
    return prompt


def question_options(question: str) -> dict[str, str]:
    """{"A": option text, …} from a multiple-choice question laid out as the model was trained on ("Q\nA. …\nB. …",
    as DataFlux and the synthetic data write them)."""
    return {m.group(1): m.group(2).strip() for m in MULTIPLE_CHOICE_OPTION.finditer(question)}


def option_replies(question: str) -> dict[str, str]:
    """{"A": "A. option text", …}: each option of a multiple-choice question as the reply the model was trained to
    give when choosing it — the candidates ``EurekaAudio.score_replies`` ranks."""
    return {letter: f"{letter}. {text}" for letter, text in question_options(question).items()}
