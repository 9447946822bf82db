"""MoE routing tab: which adapter experts the router picks for each 80 ms audio token, and how evenly.

The adapter's router is the one part of Eureka-Audio that is new (encoder and LM are off-the-shelf), and the paper
argues its experts specialise by sound type. These figures let a user check that on their own clips: speech vs.
music vs. noise, side by side, aligned with the spectrogram.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from model.audio import HOP_LENGTH, SAMPLE_RATE, AudioFeatures
from model.inference import EurekaAudio, RoutingTrace

from .common import AppContext, audio_path, clip_source, gpu, load_clip, show_examples

MAX_COLUMNS = 1200  # heatmap columns sent to the browser; a 10 min clip has 7500 tokens and 60000 mel frames

HOW_TO_READ = """\
**How to read this.** Each 80 ms of audio becomes one *audio token*; the adapter's router gives every token a
probability for each routed expert and sends it to the top-k of them (shared experts see every token and are not
shown). **Router probability** (2nd row) is that distribution over time, under the spectrogram of the same clip:
bands that switch with the sound (speech → music → silence) mean the experts specialise. **Top-1 expert** is the
expert with the largest weight. **Entropy** is how undecided the router is: 0 bits = certain, the dashed line
log₂(experts) = uniform. **Expert load** compares how often each expert was picked with the uniform share 1/experts
that the training's load-balancing loss pushes towards; bars far above the line are hot experts.
Load a clip in any tab (or here), optionally a second one to compare, and press *Show routing*.
"""


def pool_columns(values: np.ndarray, max_columns: int = MAX_COLUMNS) -> tuple[np.ndarray, int]:
    """Average groups of columns of a [rows, columns] array so at most ``max_columns`` remain; returns the factor."""
    factor = max(1, math.ceil(values.shape[1] / max_columns))
    if factor == 1:
        return values, 1
    width = math.ceil(values.shape[1] / factor) * factor
    padded = np.pad(values, ((0, 0), (0, width - values.shape[1])), mode="edge")
    return padded.reshape(values.shape[0], -1, factor).mean(axis=2), factor


def top1_experts(trace: RoutingTrace) -> np.ndarray:
    """The expert with the largest routing weight for each token."""
    best = np.argmax(trace.expert_weights, axis=1)
    return trace.expert_ids[np.arange(len(best)), best]


def routing_figure(trace: RoutingTrace, features: AudioFeatures, title: str = "") -> go.Figure:
    """Spectrogram, router probabilities, top-1 expert and entropy, stacked on one shared time axis."""
    n_experts = trace.n_experts
    figure = make_subplots(
        rows=4, cols=1, shared_xaxes=True, vertical_spacing=0.05, row_heights=[0.3, 0.3, 0.2, 0.2],
        subplot_titles=("log-mel spectrogram", "router probability per expert", "top-1 expert",
                        "router entropy (bits)"),
    )
    mel = features.log_mel.float().cpu().numpy()
    mel, factor = pool_columns(mel)
    mel_times = (np.arange(mel.shape[1]) + 0.5) * factor * HOP_LENGTH / SAMPLE_RATE
    figure.add_trace(go.Heatmap(z=mel, x=mel_times, colorscale="Viridis", showscale=False,
                                hovertemplate="t=%{x:.2f}s mel bin %{y}<extra></extra>"), row=1, col=1)
    centres = (trace.start_s + trace.end_s) / 2
    probs, factor = pool_columns(trace.router_probs.T)
    prob_times = pool_columns(centres[None, :])[0][0]
    figure.add_trace(
        go.Heatmap(z=probs, x=prob_times, y=list(range(n_experts)), colorscale="Blues", zmin=0, zmax=1,
                   colorbar={"title": {"text": "p"}, "len": 0.3, "y": 0.62},
                   hovertemplate="t=%{x:.2f}s expert %{y}: p=%{z:.3f}<extra></extra>"),
        row=2, col=1,
    )
    top1 = top1_experts(trace)
    figure.add_trace(
        go.Scatter(x=centres, y=top1, mode="markers", marker={"size": 5, "color": top1, "colorscale": "Turbo",
                                                              "cmin": 0, "cmax": max(1, n_experts - 1)},
                   hovertemplate="t=%{x:.2f}s expert %{y}<extra></extra>", name="top-1"),
        row=3, col=1,
    )
    figure.add_trace(go.Scatter(x=centres, y=trace.entropy_bits(), mode="lines", line={"width": 1.5},
                                name="entropy", hovertemplate="t=%{x:.2f}s %{y:.2f} bits<extra></extra>"),
                     row=4, col=1)
    figure.add_hline(y=math.log2(n_experts), line_dash="dash", line_color="grey", row=4, col=1,
                     annotation_text="uniform", annotation_position="top left")
    figure.update_yaxes(title_text="expert", dtick=1, row=2, col=1)
    figure.update_yaxes(title_text="expert", dtick=1, range=[-0.5, n_experts - 0.5], row=3, col=1)
    figure.update_yaxes(range=[0, math.log2(n_experts) * 1.1], row=4, col=1)
    figure.update_xaxes(title_text="time (s)", range=[0, features.duration_s], row=4, col=1)
    figure.update_layout(height=640, showlegend=False, margin={"l": 50, "r": 20, "t": 60, "b": 40},
                         title={"text": title, "font": {"size": 14}})
    return figure


def load_figure(trace: RoutingTrace, title: str = "") -> go.Figure:
    """Share of top-k slots and mean router probability per expert, against the uniform 1/experts line."""
    experts = [str(e) for e in range(trace.n_experts)]
    figure = go.Figure([
        go.Bar(x=experts, y=trace.expert_load(), name="share of top-k picks"),
        go.Bar(x=experts, y=trace.router_probs.mean(axis=0), name="mean router probability"),
    ])
    figure.add_hline(y=1 / trace.n_experts, line_dash="dash", line_color="grey", annotation_text="uniform")
    figure.update_layout(height=280, barmode="group", margin={"l": 50, "r": 20, "t": 40, "b": 40},
                         title={"text": title, "font": {"size": 14}} if title else None,
                         xaxis_title="expert", yaxis_title="share",
                         legend={"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 0})
    return figure


def routing_summary(trace: RoutingTrace) -> dict[str, Any]:
    """Headline numbers: how many tokens, how certain the router is, how uneven the load."""
    load = trace.expert_load()
    entropy = trace.entropy_bits()
    return {
        "tokens": int(len(trace.start_s)),
        "duration_s": round(float(sum(trace.durations_s)), 3),
        "routed_experts": int(trace.n_experts),
        "top_k": int(trace.expert_ids.shape[1]),
        "mean_entropy_bits": round(float(entropy.mean()), 4) if len(entropy) else 0.0,
        "max_entropy_bits": round(math.log2(trace.n_experts), 4),
        "expert_load": [round(float(x), 4) for x in load],
        "busiest_expert": int(np.argmax(load)),
        "load_imbalance": round(float(load.max() * trace.n_experts), 3),  # 1.0 = perfectly even
    }


def summary_text(summary: dict[str, Any]) -> str:
    return (
        f"{summary['tokens']} tokens over {summary['duration_s']:.1f} s · {summary['routed_experts']} routed experts,"
        f" top-{summary['top_k']} · mean entropy {summary['mean_entropy_bits']:.2f} of "
        f"{summary['max_entropy_bits']:.2f} bits · busiest expert {summary['busiest_expert']} "
        f"({summary['load_imbalance']:.2f}× its uniform share)"
    )


def trace_for(model: EurekaAudio, audio: Any) -> tuple[RoutingTrace, AudioFeatures]:
    """Routing of one clip (encoder + adapter only, no decoding) and its features for the spectrogram."""
    samples = load_clip(audio, max_seconds=model.config.max_audio_seconds)
    features = model.features(clip_source(samples))
    return model.routing(clip_source(features.waveform)), features


def write_trace_files(trace: RoutingTrace, stem: str, directory: str | Path | None = None) -> tuple[Path, Path]:
    """The trace as CSV (one row per token) and JSON, in a fresh temporary folder Gradio can serve."""
    folder = Path(directory or tempfile.mkdtemp(prefix="eureka-routing-"))
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)[:60] or "clip"
    csv_path, json_path = folder / f"routing_{safe}.csv", folder / f"routing_{safe}.json"
    csv_path.write_text(trace.to_csv())
    json_path.write_text(trace.to_json())
    return csv_path, json_path


def routing_json(model: EurekaAudio, audio: Any) -> dict[str, Any]:
    """The ``/routing`` API endpoint: summary plus the full per-token trace."""
    trace, _ = trace_for(model, audio)
    return {"summary": routing_summary(trace), **trace.to_dict()}


def analyse(model: EurekaAudio, audio: Any, label: str) -> tuple[go.Figure, go.Figure, str, list[str]]:
    """Everything one column of the tab shows for a clip: figures, summary line, download files."""
    trace, features = trace_for(model, audio)
    name = Path(str(audio_path(audio))).stem if isinstance(audio_path(audio), str) else label
    title = f"{label}: {name}"
    csv_path, json_path = write_trace_files(trace, name)
    return (routing_figure(trace, features, title), load_figure(trace),
            summary_text(routing_summary(trace)), [str(csv_path), str(json_path)])


def build_tab(ctx: AppContext, examples: list[list[Any]], example_labels: list[str]) -> dict[str, Any]:
    """Two columns (clip A, optional clip B), each with its figures, summary and downloads."""
    gr.Markdown(HOW_TO_READ)
    columns = []
    with gr.Row():
        for label in ("A", "B"):
            with gr.Column():
                audio = gr.Audio(sources=["upload", "microphone"], type="filepath", elem_id=f"routing-audio-{label}",
                                 label=f"Clip {label}" + (" (optional, to compare)" if label == "B" else ""))
                use_last = gr.Button("Use the last clip I loaded", size="sm", elem_id=f"routing-last-{label}")
                columns.append((label, audio, use_last))
    with gr.Row():
        run = gr.Button("Show routing", variant="primary", elem_id="routing-run")
    outputs = []
    with gr.Row():
        for label in ("A", "B"):
            with gr.Column():
                figure = gr.Plot(label=f"Routing over time ({label})", elem_id=f"routing-plot-{label}")
                load = gr.Plot(label=f"Expert load ({label})", elem_id=f"routing-load-{label}")
                summary = gr.Textbox(label=f"Summary ({label})", interactive=False, elem_id=f"routing-summary-{label}")
                files = gr.File(label=f"Download trace ({label}): CSV, JSON", file_count="multiple",
                                interactive=False, elem_id=f"routing-files-{label}")
                outputs += [figure, load, summary, files]
    show_examples(examples, [columns[0][1]], example_labels, "Example clips (clip A)")

    @gpu(ctx.gpu_seconds)
    def run_routing(clip_a: Any, clip_b: Any) -> list[Any]:
        if not audio_path(clip_a) and not audio_path(clip_b):
            raise gr.Error("No audio: load a clip (here or in another tab) first.")
        results: list[Any] = []
        for label, clip in (("A", clip_a), ("B", clip_b)):
            results += list(analyse(ctx.model, clip, label)) if audio_path(clip) else [None, None, "", None]
        return results

    for _label, audio, use_last in columns:
        use_last.click(lambda last: last, ctx.last_clip, audio, queue=False, api_visibility="private")
    run.click(run_routing, [columns[0][1], columns[1][1]], outputs, api_visibility="undocumented",
              **ctx.model_event())
    return {"audio_a": columns[0][1], "audio_b": columns[1][1], "run": run, "outputs": outputs}
