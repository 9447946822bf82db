"""What every tab shares: choosing and loading the model, the header, sampling settings, audio checks, errors.

The tabs' callbacks stay thin: they turn component values into arguments for the plain functions in ``app/*.py``
and map :class:`~model.AudioInputError` (and other bad input) to ``gr.Error`` so a user sees a sentence, not a
traceback, and the server keeps serving.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import gradio as gr
import numpy as np
import torch

from model import AudioInputError, GenerationSettings, ModelLoadError, load_model
from model.audio import SAMPLE_RATE, load_audio
from model.inference import EurekaAudio
from model.loading import OFFICIAL_REPO, default_source, resolve_hub

log = logging.getLogger("eureka.app")

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

# Audio whose peak stays below this (−60 dBFS) holds nothing to transcribe or describe.
SILENCE_PEAK = 10 ** (-60 / 20)
DEFAULT_MAX_SECONDS = 600.0
# User text (question, system or caption prompt) longer than this is refused: a real question is a few hundred
# characters, and a 100 000-character one would make a prompt whose attention alone exhausts a CPU server's memory.
MAX_TEXT_CHARS = 4000
# Default upload cap in MB (``$EUREKA_MAX_UPLOAD_MB``): 10 min of 48 kHz stereo 24-bit WAV is 173 MB.
MAX_UPLOAD_MB = 200


# --- model choice -------------------------------------------------------------------------------------------------
@dataclass
class ModelChoice:
    """Which model the app serves and, when it is not the one the user would expect, a banner saying why."""

    source: str
    label: str
    banner: str | None = None


def choose_model_source(requested: str | None = None) -> ModelChoice:
    """``--model`` / ``$EUREKA_MODEL`` if given; else the official checkpoint when cached or downloadable; else the
    offline default, with a banner.

    Why this order: people who open the app expect the real model, but the project also runs where the Hub is
    unreachable (CI, air-gapped machines). ``resolve_hub`` answers at once with ``HF_HUB_OFFLINE=1`` and within a
    3 s connection probe otherwise, so the fallback is decided in well under 5 s.
    """
    requested = requested or os.environ.get("EUREKA_MODEL") or None
    if requested:
        return ModelChoice(source=requested, label=requested)
    started = time.monotonic()
    try:
        directory = resolve_hub(OFFICIAL_REPO)  # the cache, else a download with huggingface_hub's progress bar
        return ModelChoice(source=str(directory), label=OFFICIAL_REPO)
    except ModelLoadError as exc:
        reason = str(exc)
    except Exception as exc:  # a download that started and broke (proxy, disk full): still fall back
        reason = f"downloading {OFFICIAL_REPO} failed: {exc}"
    fallback = default_source()
    log.warning("official checkpoint unavailable after %.1f s: %s", time.monotonic() - started, reason)
    return ModelChoice(
        source=fallback,
        label=fallback,
        banner=(
            f"Offline mode: serving the offline model `{fallback}`"
            + (" (random weights: its answers are gibberish)" if fallback == "tiny-random" else "")
            + f" because the official checkpoint is unavailable: {reason}"
        ),
    )


def pick_device(device: str | None = None) -> str:
    """``auto`` → CUDA when present (ZeroGPU Spaces report CUDA at start-up), else CPU."""
    device = device or os.environ.get("EUREKA_DEVICE") or "auto"
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def pick_dtype(device: str, dtype: str | None = None) -> str:
    """``auto`` → bfloat16 on a GPU (how the checkpoint ships), float32 on CPU (bf16 matmuls are slow there)."""
    dtype = dtype or os.environ.get("EUREKA_DTYPE") or "auto"
    if dtype == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    return dtype


@dataclass
class LoadedModel:
    """The model the app serves plus how it was chosen; read-only after start-up, shared by all sessions."""

    model: EurekaAudio
    choice: ModelChoice
    info: dict[str, Any] = field(default_factory=dict)


def load_app_model(requested: str | None = None, device: str | None = None, dtype: str | None = None) -> LoadedModel:
    """Choose and load the model; if the official checkpoint fails to load, fall back to the offline default."""
    choice = choose_model_source(requested)
    device = pick_device(device)
    dtype = pick_dtype(device, dtype)
    try:
        model = load_model(choice.source, device=device, dtype=dtype)
    except (ModelLoadError, OSError, RuntimeError) as exc:
        if requested or os.environ.get("EUREKA_MODEL"):
            raise  # the user asked for this model explicitly: say so rather than serve another one
        fallback = default_source()
        log.warning("loading %s failed (%s); falling back to %s", choice.source, exc, fallback)
        choice = ModelChoice(
            source=fallback, label=fallback, banner=f"Loading {choice.label} failed ({exc}); serving `{fallback}`."
        )
        model = load_model(fallback, device=device, dtype=dtype)
    model.name = display_name(choice.label)
    return LoadedModel(model=model, choice=choice, info=model.describe())


def display_name(label: str) -> str:
    """What the header calls the model: a Hub id or preset as given, a directory by its own name (a Hub snapshot
    directory would otherwise show up as a commit hash)."""
    path = Path(label).expanduser()
    return (path.resolve().name or label) if path.is_dir() else label


def format_parameters(count: int) -> str:
    """12_345_678 → '12.3 M' — the header is read at a glance."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return str(count)


def header_markdown(loaded: LoadedModel) -> str:
    """One line with model, device, dtype and size; names are put in code spans so they never render as markup."""
    info = loaded.info
    name = str(info.get("name", loaded.choice.label)).replace("`", "'")
    return (
        "# Eureka-Audio Studio\n"
        f"**Model** `{name}` · **device** `{info.get('device')}` · **dtype** `{info.get('dtype')}` · "
        f"**parameters** {format_parameters(int(info.get('parameters', 0)))} · **adapter** {info.get('experts', '')}"
    )


# --- sampling settings ---------------------------------------------------------------------------------------------
def sampling_settings(
    temperature: float = 0.0,
    top_p: float = 0.8,
    top_k: int = 20,
    max_new_tokens: int = 512,
    repetition_penalty: float = 1.05,
    seed: int | None = None,
) -> GenerationSettings:
    """Component values (or API arguments) → ``GenerationSettings``, refusing values that would crash generate().

    Settings travel with each call (component values, never module globals), so one user's sliders cannot change
    another user's decoding.
    """
    try:
        temperature, top_p = float(temperature), float(top_p)
        top_k, max_new_tokens = int(top_k), int(max_new_tokens)
        repetition_penalty = float(repetition_penalty)
    except (TypeError, ValueError) as exc:
        raise gr.Error(f"Sampling settings must be numbers: {exc}") from None
    problems = []
    if not 0.0 <= temperature <= 5.0:
        problems.append("temperature must be between 0 (greedy) and 5")
    if not 0.0 < top_p <= 1.0:
        problems.append("top-p must be in (0, 1]")
    if top_k < 0:
        problems.append("top-k must be 0 (off) or more")
    if not 1 <= max_new_tokens <= 4096:
        problems.append("max new tokens must be between 1 and 4096")
    if not 0.5 <= repetition_penalty <= 3.0:
        problems.append("repetition penalty must be between 0.5 and 3")
    if problems:
        raise gr.Error("Invalid sampling settings: " + "; ".join(problems) + ".")
    return GenerationSettings(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        seed=None if seed in (None, "") else int(seed),
    )


# --- user input limits ---------------------------------------------------------------------------------------------
def user_text(text: Any, what: str, limit: int = MAX_TEXT_CHARS) -> str:
    """User-typed text, bounded and made encodable: over ``limit`` characters is a ``gr.Error`` saying so, and lone
    surrogates (valid in JSON, so any API client can send them) become U+FFFD instead of crashing the tokenizer."""
    text = "" if text is None else str(text)
    if len(text) > limit:
        raise gr.Error(f"The {what} is {len(text):,} characters long; the limit is {limit:,}. Shorten it.")
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def max_upload_size() -> str:
    """Gradio's ``launch(max_file_size=…)``: ``$EUREKA_MAX_UPLOAD_MB`` (default 200) megabytes. Gradio refuses a
    bigger upload while it streams in (HTTP 413 "File size exceeded maximum allowed size"), before it reaches disk
    or the model; the browser checks the same limit before sending."""
    return f"{max(1, env_int('EUREKA_MAX_UPLOAD_MB', MAX_UPLOAD_MB))}mb"


# --- audio ---------------------------------------------------------------------------------------------------------
def audio_path(value: Any) -> Any:
    """Gradio hands files over as a path, a FileData-like dict or an object with ``.path``/``.name``."""
    if isinstance(value, dict):
        return value.get("path") or value.get("name")
    for attribute in ("path", "name"):
        if hasattr(value, attribute) and isinstance(getattr(value, attribute), str):
            return getattr(value, attribute)
    return value


def load_clip(source: Any, max_seconds: float = DEFAULT_MAX_SECONDS, allow_silence: bool = True) -> np.ndarray:
    """Load one clip as 16 kHz mono samples, turning every kind of bad input into a ``gr.Error`` a user can act on.

    Silence is an error for ASR (nothing to transcribe; the model would hallucinate) and a warning elsewhere
    ("is anything audible?" is a fair question).
    """
    source = audio_path(source)
    if source is None or (isinstance(source, str) and not source.strip()):
        raise gr.Error("No audio: upload a file or record with the microphone first.")
    try:
        samples = load_audio(source, max_seconds=max_seconds)
    except AudioInputError as exc:
        message = str(exc)
        if isinstance(source, (str, os.PathLike)) and os.path.dirname(str(source)):
            message = message.replace(str(source), os.path.basename(str(source)))  # no server paths in messages
        raise gr.Error(message) from None
    if is_silent(samples):
        message = "The audio is silent (its peak stays below −60 dBFS)."
        if not allow_silence:
            raise gr.Error(message + " There is no speech to transcribe.")
        gr.Warning(message + " Answers about it may be meaningless.")
    return samples


def is_silent(samples: np.ndarray) -> bool:
    return samples.size == 0 or float(np.abs(samples).max()) < SILENCE_PEAK


def clip_source(samples: np.ndarray) -> tuple[np.ndarray, int]:
    """Already-loaded samples in a form the model's front-end accepts without decoding again."""
    return samples, SAMPLE_RATE


# --- generation helpers --------------------------------------------------------------------------------------------
def stream_text(model: EurekaAudio, messages: list[dict[str, Any]], settings: GenerationSettings) -> Iterator[str]:
    """``model.stream`` that is always closed — by exhaustion, an exception, Stop, or a client that went away.

    Gradio closes a cancelled event's generator; that closes this one, whose ``closing`` closes the model's stream,
    which stops the generation thread. Errors from the front-end become ``gr.Error``.
    """
    try:
        pieces = model.stream(messages, settings)
        with contextlib.closing(pieces):
            yield from pieces
    except AudioInputError as exc:
        raise gr.Error(str(exc)) from None


def count_tokens(model: EurekaAudio, text: str, cap: int | None = None) -> int:
    """Tokens in generated text, re-tokenised (streamed pieces are words, not tokens).

    Re-tokenising is exact for well-formed text; byte-level gibberish (random weights) decodes to replacement
    characters that re-encode longer, so the count is capped at the run's ``max_new_tokens``.
    """
    if not text:
        return 0
    count = len(model.tokenizer(text, add_special_tokens=False)["input_ids"])
    return min(count, cap) if cap else count


@dataclass
class RunStats:
    """Timing of one run, shown after it: audio length, chunks, time to first text, decode speed."""

    audio_s: float = 0.0
    chunks: int = 0
    first_text_s: float | None = None
    tokens: int = 0
    elapsed_s: float = 0.0
    stopped: bool = False

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def summary(self) -> str:
        first = "—" if self.first_text_s is None else f"{self.first_text_s:.2f} s"
        return (
            f"audio {self.audio_s:.1f} s · {self.chunks} chunk{'s' if self.chunks != 1 else ''} · "
            f"time to first token {first} · {self.tokens} tokens in {self.elapsed_s:.2f} s "
            f"({self.tokens_per_s:.1f} tokens/s)" + (" · stopped" if self.stopped else "")
        )


def format_time(seconds: float) -> str:
    """65.2 → '1:05.2' — chunk and window ranges in the units people read audio in."""
    minutes, rest = divmod(max(0.0, seconds), 60)
    return f"{int(minutes)}:{rest:04.1f}"


def one_line(text: str) -> str:
    """Text for a one-line-per-span listing: line breaks inside a span's text would break the listing apart."""
    return text.replace("\r", " ").replace("\n", " ").strip()


def plan_spans(duration_s: float, span_s: float, min_tail_s: float = 1.0) -> list[tuple[float, float]]:
    """Cut ``duration_s`` into ``span_s`` pieces; a tail shorter than ``min_tail_s`` joins the previous piece
    (a 0.1 s chunk would only make the model hallucinate)."""
    if duration_s <= 0:
        return []
    spans, start = [], 0.0
    while start < duration_s - 1e-9:
        spans.append((start, min(start + span_s, duration_s)))
        start += span_s
    if len(spans) > 1 and spans[-1][1] - spans[-1][0] < min_tail_s:
        tail = spans.pop()
        spans[-1] = (spans[-1][0], tail[1])
    return spans


# --- serving -------------------------------------------------------------------------------------------------------
def gpu(duration: int) -> Callable[[F], F]:
    """``@spaces.GPU(duration=…)`` on ZeroGPU Spaces (the ``spaces`` package is importable), a no-op elsewhere."""
    try:
        import spaces  # type: ignore[import-not-found]
    except ImportError:
        return lambda function: function
    return spaces.GPU(duration=duration)


def env_int(name: str, default: int) -> int:
    """An integer setting from the environment, falling back (with a log line) on junk."""
    value = os.environ.get(name)
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        log.warning("ignoring %s=%r (not an integer)", name, value)
        return default


@dataclass
class AppContext:
    """What every tab's builder needs: the shared model, the shared concurrency group, the session's last clip."""

    loaded: LoadedModel
    concurrency_limit: int = 1
    gpu_seconds: int = 120
    last_clip: Any = None  # a gr.State, set while the Blocks are built

    @property
    def model(self) -> EurekaAudio:
        return self.loaded.model

    def model_event(self, **extra: Any) -> dict[str, Any]:
        """Event options for anything that runs the model: one queue slot pool shared by every tab and the API."""
        return {"concurrency_id": "model", "concurrency_limit": self.concurrency_limit, **extra}


def remember_clip(clip: Any, previous: Any) -> Any:
    """The routing tab's "last clip": whatever clip the user loaded last in any tab (kept when an input is cleared)."""
    clip = audio_path(clip)
    return clip if clip else previous


def last_item(iterator: Iterable[T], default: T) -> T:
    """Drain a streaming generator and keep its final value — how the one-shot API endpoints reuse the streams."""
    tail = deque(iterator, maxlen=1)
    return tail[0] if tail else default


def show_examples(rows: list[list[Any]], inputs: list[Any], labels: list[str], label: str) -> None:
    """``gr.Examples`` for a tab, or nothing when the example clips are missing (a bare checkout still serves)."""
    if rows:
        gr.Examples(rows, inputs=inputs, example_labels=labels, label=label, examples_per_page=10)


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def pin_malloc_mmap_threshold(threshold_bytes: int = 128 * 1024) -> bool:
    """Keep glibc's mmap threshold fixed so a long-running server's memory stays flat. Returns True when set.

    Why: glibc raises the threshold each time a large mmapped block is freed, after which large tensors (KV caches,
    activations of varying batch sizes) come from the heap and fragment it. Measured with 8 jobs at once sharing
    batched decodes (600 requests, Eureka-mini): resident memory grew 25 % after warm-up and kept growing; with the
    threshold pinned, 1.4 % at the same throughput (docs/reliability.md). A ``MALLOC_MMAP_THRESHOLD_`` set by the
    user wins; elsewhere than glibc this does nothing.
    """
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is not None:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold_bytes))
    except (OSError, AttributeError):
        return False
