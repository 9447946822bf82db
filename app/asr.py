"""Speech recognition tab: any audio up to 10 minutes, transcribed 30 s at a time with a streaming transcript.

Why chunk in the app when the model accepts 10 minutes at once: the official ASR recipe is trained on utterances
within Whisper's 30 s window, a long prompt slows every decoding step, and per-chunk results let the user see
(and stop) progress and know which part of the audio each piece of text came from.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr

from model import GenerationSettings, task_messages
from model.audio import SAMPLE_RATE
from model.inference import EurekaAudio
from model.prompts import asr_system_prompt

from .common import (
    DEFAULT_MAX_SECONDS,
    AppContext,
    RunStats,
    clip_source,
    count_tokens,
    format_time,
    gpu,
    last_item,
    load_clip,
    one_line,
    plan_spans,
    remember_clip,
    show_examples,
    stream_text,
    user_text,
)

CHUNK_SECONDS = 30.0
LANGUAGES = ["", "English", "Chinese", "German", "French", "Spanish", "Portuguese", "Italian", "Japanese", "Korean"]


@dataclass
class Chunk:
    """One 30 s piece of the input and what the model made of it so far."""

    index: int
    start_s: float
    end_s: float
    text: str = ""

    @property
    def label(self) -> str:
        return f"[{format_time(self.start_s)}–{format_time(self.end_s)}]"


@dataclass
class AsrUpdate:
    """What the tab shows after each streamed piece: the transcript, per-chunk lines with time ranges, stats."""

    transcript: str
    chunk_lines: str
    stats: str
    chunks: list[Chunk]


def plan_chunks(duration_s: float, chunk_s: float = CHUNK_SECONDS) -> list[Chunk]:
    """Time ranges of the chunks a clip is cut into (65 s → 0–30, 30–60, 60–65)."""
    return [Chunk(i, start, end) for i, (start, end) in enumerate(plan_spans(duration_s, chunk_s))]


def render(chunks: list[Chunk], stats: RunStats, done: bool) -> AsrUpdate:
    transcript = " ".join(c.text.strip() for c in chunks if c.text.strip())
    lines = "\n".join(f"{c.label} {one_line(c.text)}" for c in chunks)
    status = stats.summary() if done else f"transcribing… {stats.chunks} chunk(s), {stats.audio_s:.1f} s of audio"
    return AsrUpdate(transcript, lines, status, chunks)


def transcribe_stream(
    model: EurekaAudio,
    audio: Any,
    system_prompt: str | None = None,
    settings: GenerationSettings | None = None,
    chunk_s: float = CHUNK_SECONDS,
    max_seconds: float = DEFAULT_MAX_SECONDS,
) -> Iterator[AsrUpdate]:
    """Yield the growing transcript chunk by chunk; closing the iterator (Stop) stops the running generation.

    ``system_prompt`` None → the official ASR prompt; edit it to pin a language (see ``asr_system_prompt``).
    ``settings`` None → greedy, with the model's CTC re-ranking (``asr_ctc_beams``) when it has a CTC head.
    """
    system_prompt = user_text(system_prompt, "system prompt")
    samples = load_clip(audio, max_seconds=max_seconds, allow_silence=False)
    settings = settings or GenerationSettings(ctc_beams=model.asr_ctc_beams)
    system_prompt = system_prompt if system_prompt and system_prompt.strip() else asr_system_prompt()
    chunks = plan_chunks(len(samples) / SAMPLE_RATE, chunk_s)
    stats = RunStats(audio_s=len(samples) / SAMPLE_RATE, chunks=len(chunks))
    started = time.perf_counter()
    for chunk in chunks:
        piece = samples[int(chunk.start_s * SAMPLE_RATE) : int(round(chunk.end_s * SAMPLE_RATE))]
        messages = task_messages("asr", clip_source(piece), system_prompt=system_prompt)
        for text in stream_text(model, messages, settings):
            if stats.first_text_s is None:
                stats.first_text_s = time.perf_counter() - started
            chunk.text += text
            yield render(chunks, stats, done=False)
        stats.tokens += count_tokens(model, chunk.text, settings.max_new_tokens)
    stats.elapsed_s = time.perf_counter() - started
    yield render(chunks, stats, done=True)


def transcribe(model: EurekaAudio, audio: Any, system_prompt: str | None = None, max_new_tokens: int = 512,
               ctc_beams: int | None = None) -> str:
    """Whole transcript in one call (the ``/asr`` API endpoint): the last update of ``transcribe_stream``.

    ``ctc_beams`` None → the model's default re-ranking (``asr_ctc_beams``); 0 → greedy."""
    beams = model.asr_ctc_beams if ctc_beams is None else ctc_beams
    settings = GenerationSettings(max_new_tokens=max_new_tokens, ctc_beams=beams)
    updates = transcribe_stream(model, audio, system_prompt, settings)
    return last_item(updates, None).transcript


def language_prompt(language: str | None) -> str:
    """The system prompt the language dropdown writes into the (still editable) system-prompt box."""
    return asr_system_prompt(language or None)


def build_tab(ctx: AppContext, examples: list[list[Any]], example_labels: list[str]) -> dict[str, Any]:
    """The ASR tab's components and events; the callback only adapts component values to ``transcribe_stream``."""
    with gr.Row():
        with gr.Column(scale=1):
            audio = gr.Audio(
                sources=["upload", "microphone"], type="filepath", label="Audio (any rate or channels, up to 10 min)",
                elem_id="asr-audio",
            )
            with gr.Row():
                language = gr.Dropdown(LANGUAGES, value="", label="Language hint", allow_custom_value=True,
                                       elem_id="asr-language")
                max_new_tokens = gr.Slider(16, 1024, value=512, step=16, label="Max new tokens per chunk")
            system_prompt = gr.Textbox(value=asr_system_prompt(), label="System prompt (editable)", lines=2,
                                       elem_id="asr-system-prompt")
            has_head = ctx.model.asr_ctc_beams > 0
            ctc_beams = gr.Slider(
                0, 8, value=ctx.model.asr_ctc_beams, step=1, label="CTC re-ranking beams (0 = greedy)",
                info="Decode this many beams and keep the one the audio spells best (the model's CTC head)."
                if has_head else "This model has no CTC head: greedy decoding.",
                interactive=has_head, elem_id="asr-ctc-beams")
            with gr.Row():
                run = gr.Button("Transcribe", variant="primary", elem_id="asr-run")
                stop = gr.Button("Stop", variant="stop", elem_id="asr-stop")
        with gr.Column(scale=1):
            transcript = gr.Textbox(label="Transcript", lines=6, buttons=["copy"], elem_id="asr-transcript",
                                    interactive=False)
            chunk_lines = gr.Textbox(label="Chunks (30 s each, with time ranges)", lines=6, elem_id="asr-chunks",
                                     interactive=False)
            stats = gr.Textbox(label="Run statistics", lines=1, elem_id="asr-stats", interactive=False)
    show_examples(examples, [audio, system_prompt], example_labels, "Example clips")

    @gpu(ctx.gpu_seconds)
    def run_asr(audio_value: Any, prompt: str, tokens: float, beams: float) -> Iterator[tuple[str, str, str]]:
        settings = GenerationSettings(max_new_tokens=int(tokens), ctc_beams=int(beams))
        for update in transcribe_stream(ctx.model, audio_value, prompt, settings):
            yield update.transcript, update.chunk_lines, update.stats

    language.change(language_prompt, language, system_prompt, queue=False, api_visibility="private")
    audio.change(remember_clip, [audio, ctx.last_clip], ctx.last_clip, queue=False, api_visibility="private")
    event = run.click(run_asr, [audio, system_prompt, max_new_tokens, ctc_beams], [transcript, chunk_lines, stats],
                      api_visibility="undocumented", **ctx.model_event())
    stop.click(None, cancels=[event], api_visibility="private")
    return {"audio": audio, "transcript": transcript, "chunks": chunk_lines, "stats": stats}
