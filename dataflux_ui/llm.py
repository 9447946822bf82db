"""Talking to a text LLM: an OpenAI-compatible chat endpoint over HTTP, or any in-process callable.

Both the LLM question generator and the LLM judge need only "messages in, text out", so that is the whole interface
(``ChatFn``). Replies are then parsed by ``extract_json``, which finds the first JSON object in a reply however it is
wrapped (code fences, prose around it) and raises ``ReplyError`` — never anything else — when there is none.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

ChatFn = Callable[[list[dict[str, Any]]], str]
MAX_REPLY_CHARS = 100_000
MAX_OBJECT_STARTS = 200


class ReplyError(ValueError):
    """An LLM reply that is not the JSON we asked for; the message says what is wrong."""


class EndpointError(RuntimeError):
    """The chat endpoint could not be reached or answered with an error."""


class OpenAIChat:
    """Any OpenAI-compatible ``/chat/completions`` endpoint (vLLM, llama.cpp server, Ollama, a hosted API).

    ``base_url`` is the API root (e.g. ``http://127.0.0.1:8000/v1``); an API key is optional.
    """

    def __init__(self, base_url: str, model: str = "default", api_key: str | None = None, timeout: float = 120.0,
                 temperature: float = 0.0, max_tokens: int = 1024, retries: int = 2):
        import httpx

        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.retries = retries
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=timeout, headers=headers)

    @property
    def name(self) -> str:
        return f"{self.model}@{self.url}"

    def __call__(self, messages: list[dict[str, Any]]) -> str:
        import httpx

        body = {"model": self.model, "messages": messages, "temperature": self.temperature,
                "max_tokens": self.max_tokens}
        last: Exception | None = None
        for _ in range(self.retries + 1):
            try:
                response = self.client.post(self.url, json=body)
                response.raise_for_status()
                return _message_text(response.json())
            except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
                last = exc
        raise EndpointError(f"chat endpoint {self.url} failed: {last}") from last

    def close(self) -> None:
        self.client.close()


def _message_text(payload: dict[str, Any]) -> str:
    content = payload["choices"][0]["message"]["content"]
    if isinstance(content, list):  # some servers return content parts
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    if not isinstance(content, str):
        raise ValueError("reply has no text content")
    return content


def backbone_chat(model: Any, max_new_tokens: int = 768) -> ChatFn:
    """Use the loaded Eureka model's language backbone as the text LLM (text-only messages, greedy)."""

    def chat(messages: list[dict[str, Any]]) -> str:
        converted = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]}
                     if isinstance(m["content"], str) else m for m in messages]
        return model.generate(converted, temperature=0, max_new_tokens=max_new_tokens)

    return chat


FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_json(text: Any) -> dict[str, Any]:
    """The first JSON object in an LLM reply (the whole reply, a fenced block, or an object inside prose)."""
    if not isinstance(text, str):
        raise ReplyError(f"expected the reply as text, got {type(text).__name__}")
    if len(text) > MAX_REPLY_CHARS:
        raise ReplyError(f"reply is too long ({len(text)} characters)")
    for candidate in [text.strip(), *FENCE.findall(text)]:
        found = _loads_object(candidate.strip())
        if found is not None:
            return found
    decoder = json.JSONDecoder()
    for count, match in enumerate(re.finditer(r"\{", text)):
        if count >= MAX_OBJECT_STARTS:
            break
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except (ValueError, RecursionError):
            continue
        if isinstance(value, dict):
            return value
    raise ReplyError("no JSON object found in the reply")


def _loads_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None
