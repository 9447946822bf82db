"""Dense captioning tab: the authors' caption prompt over the whole clip, or one caption per 10 s window.

The windowed mode exists because one caption for a long clip blurs what happens when; captioning fixed windows and
laying them on a timeline shows how the scene changes.
"""

from __future__ import annotations

import html
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr
import plotly.graph_objects as go

from model import CAPTION_PROMPT, GenerationSettings, task_messages
from model.audio import SAMPLE_RATE
from model.inference import EurekaAudio

from .common import (
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

WINDOW_SECONDS = 10.0
MODES = ("Whole clip", "10 s windows (timeline)")


@dataclass
class WindowCaption:
    """The caption of one window of the clip."""

    start_s: float
    end_s: float
    text: str = ""
    done: bool = False

    @property
    def label(self) -> str:
        return f"[{format_time(self.start_s)}–{format_time(self.end_s)}]"


def plan_windows(duration_s: float, window_s: float = WINDOW_SECONDS) -> list[WindowCaption]:
    """Windows of ``window_s`` (a 25 s clip → 0–10, 10–20, 20–25; tails under 1 s join the previous window)."""
    return [WindowCaption(start, end) for start, end in plan_spans(duration_s, window_s)]


def caption_stream(
    model: EurekaAudio, audio: Any, prompt: str | None = None, settings: GenerationSettings | None = None
) -> Iterator[tuple[str, RunStats]]:
    """Yield the growing caption of the whole clip, with run statistics (complete on the last yield)."""
    prompt = user_text(prompt, "caption prompt")
    samples = load_clip(audio)
    settings = settings or GenerationSettings()
    stats = RunStats(audio_s=len(samples) / SAMPLE_RATE, chunks=1)
    messages = task_messages("caption", clip_source(samples), question=(prompt or "").strip() or CAPTION_PROMPT)
    text, started = "", time.perf_counter()
    for piece in stream_text(model, messages, settings):
        if stats.first_text_s is None:
            stats.first_text_s = time.perf_counter() - started
        text += piece
        yield text, stats
    stats.elapsed_s = time.perf_counter() - started
    stats.tokens = count_tokens(model, text, settings.max_new_tokens)
    yield text, stats


def caption_windows_stream(
    model: EurekaAudio,
    audio: Any,
    prompt: str | None = None,
    settings: GenerationSettings | None = None,
    window_s: float = WINDOW_SECONDS,
) -> Iterator[tuple[list[WindowCaption], RunStats]]:
    """Caption each window in turn, yielding all windows (later ones still empty) after every streamed piece."""
    prompt = user_text(prompt, "caption prompt")
    samples = load_clip(audio)
    settings = settings or GenerationSettings()
    windows = plan_windows(len(samples) / SAMPLE_RATE, window_s)
    stats = RunStats(audio_s=len(samples) / SAMPLE_RATE, chunks=len(windows))
    question = (prompt or "").strip() or CAPTION_PROMPT
    started = time.perf_counter()
    for window in windows:
        piece = samples[int(window.start_s * SAMPLE_RATE) : int(round(window.end_s * SAMPLE_RATE))]
        messages = task_messages("caption", clip_source(piece), question=question)
        for text in stream_text(model, messages, settings):
            if stats.first_text_s is None:
                stats.first_text_s = time.perf_counter() - started
            window.text += text
            yield windows, stats
        window.done = True
        stats.tokens += count_tokens(model, window.text, settings.max_new_tokens)
    stats.elapsed_s = time.perf_counter() - started
    yield windows, stats


def window_lines(windows: list[WindowCaption]) -> str:
    return "\n".join(f"{w.label} {one_line(w.text)}" for w in windows)


def clip_text(text: str, limit: int) -> str:
    """First ``limit`` characters, "…" when cut (textwrap.shorten drops a long first word entirely)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def timeline_figure(windows: list[WindowCaption]) -> go.Figure:
    """One bar per window along the time axis; hovering shows its caption.

    Captions are HTML-escaped: plotly interprets a subset of HTML in labels, and model output must stay text.
    """
    hover = [
        f"{w.label}<br>" + "<br>".join(textwrap.wrap(html.escape(w.text.strip() or "…"), 60)) for w in windows
    ]
    short = [html.escape(clip_text(w.text.strip() or "…", 40)) for w in windows]
    figure = go.Figure(
        go.Bar(
            x=[w.end_s - w.start_s for w in windows],
            base=[w.start_s for w in windows],
            y=["captions"] * len(windows),
            orientation="h",
            text=short,
            textposition="inside",
            insidetextanchor="start",
            hovertext=hover,
            hoverinfo="text",
            marker={"color": [f"hsl({(i * 47) % 360},55%,70%)" for i in range(len(windows))],
                    "line": {"color": "white", "width": 2}},
        )
    )
    figure.update_layout(
        height=180, margin={"l": 10, "r": 10, "t": 30, "b": 40}, showlegend=False,
        title={"text": "Caption timeline (hover a window for its caption)", "font": {"size": 13}},
        xaxis={"title": "time (s)", "range": [0, windows[-1].end_s if windows else 1]},
        yaxis={"visible": False},
    )
    return figure


def caption(model: EurekaAudio, audio: Any, max_new_tokens: int = 512) -> str:
    """The whole-clip caption in one call (the ``/caption`` API endpoint)."""
    stream = caption_stream(model, audio, settings=GenerationSettings(max_new_tokens=max_new_tokens))
    return last_item(stream, ("", RunStats()))[0]


def build_tab(ctx: AppContext, examples: list[list[Any]], example_labels: list[str]) -> dict[str, Any]:
    """The caption tab's components and events."""
    with gr.Row():
        with gr.Column(scale=1):
            audio = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Audio", elem_id="cap-audio")
            prompt = gr.Textbox(value=CAPTION_PROMPT, label="Caption prompt (the authors' default)", lines=2)
            mode = gr.Radio(list(MODES), value=MODES[0], label="Mode", elem_id="cap-mode")
            max_new_tokens = gr.Slider(16, 1024, value=512, step=16, label="Max new tokens (per window)")
            with gr.Row():
                run = gr.Button("Caption", variant="primary", elem_id="cap-run")
                stop = gr.Button("Stop", variant="stop", elem_id="cap-stop")
        with gr.Column(scale=1):
            caption_box = gr.Textbox(label="Caption", lines=8, interactive=False, elem_id="cap-caption",
                                     buttons=["copy"])
            timeline = gr.Plot(label="Timeline", elem_id="cap-timeline")
            stats = gr.Textbox(label="Run statistics", lines=1, interactive=False, elem_id="cap-stats")
    show_examples(examples, [audio, prompt], example_labels, "Example clips")

    @gpu(ctx.gpu_seconds)
    def run_caption(audio_value: Any, prompt_value: str, mode_value: str, tokens: float) -> Iterator[tuple]:
        settings = GenerationSettings(max_new_tokens=int(tokens))
        if mode_value == MODES[0]:
            for text, run_stats in caption_stream(ctx.model, audio_value, prompt_value, settings):
                yield text, None, run_stats.summary() if run_stats.elapsed_s else "captioning…"
            return
        drawn = -1  # redraw the timeline only when a window completes: a figure per streamed word is wasteful
        for windows, run_stats in caption_windows_stream(ctx.model, audio_value, prompt_value, settings):
            completed = sum(w.done for w in windows)
            figure = timeline_figure(windows) if completed != drawn else gr.skip()
            drawn = completed
            done = bool(run_stats.elapsed_s)
            yield window_lines(windows), figure, run_stats.summary() if done else "captioning…"

    audio.change(remember_clip, [audio, ctx.last_clip], ctx.last_clip, queue=False, api_visibility="private")
    event = run.click(run_caption, [audio, prompt, mode, max_new_tokens], [caption_box, timeline, stats],
                      api_visibility="undocumented", **ctx.model_event())
    stop.click(None, cancels=[event], api_visibility="private")
    return {"audio": audio, "caption": caption_box, "timeline": timeline}
