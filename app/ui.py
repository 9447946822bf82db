"""The Blocks: header, offline banner, one tab per task, and the named API endpoints for ``gradio_client``.

All model-bound events (every tab and every API endpoint) share one concurrency group, ``"model"``, so the model
never runs more than ``concurrency_limit`` jobs at once however many users there are; the queue has a maximum size
so an overloaded Space says "queue full" instead of piling up work.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from model import GenerationSettings

from . import asr, caption, qa, review, routing
from .common import AppContext, LoadedModel, env_int, gpu, header_markdown, max_upload_size, sampling_settings
from .examples import EXAMPLES_DIR, tab_examples

CSS = """
#offline-banner { background: #fff4e5; border: 1px solid #f0b35b; border-radius: 8px; padding: 4px 12px; }
#offline-banner p { color: #7a4b00; }
#qa-chat .message-content, #qa-chat .prose { white-space: pre-wrap; }
"""


def launch_options() -> dict[str, Any]:
    """Theme, CSS, the Review tab's keyboard shortcuts and the example folder: in Gradio 6 these are ``launch()``
    arguments, not ``Blocks()`` ones."""
    return {"theme": gr.themes.Soft(), "css": CSS, "head": review.SHORTCUTS_HEAD, "allowed_paths": [str(EXAMPLES_DIR)],
            "max_file_size": max_upload_size()}


def build_api(ctx: AppContext) -> None:
    """API-only endpoints with plain signatures (hidden components, hidden triggers).

    ``/asr(audio_file, system_prompt) -> transcript``, ``/qa(audio_file, question, temperature, top_p, top_k,
    max_new_tokens, repetition_penalty) -> answer``, ``/caption(audio_file) -> caption``,
    ``/routing(audio_file) -> trace JSON``. Each call carries its own settings: two clients never share them.
    """
    defaults = GenerationSettings()
    with gr.Column(visible=False):
        audio_file = gr.Audio(type="filepath", label="audio_file")
        system_prompt = gr.Textbox(value="", label="system_prompt")
        question = gr.Textbox(value="", label="question")
        temperature = gr.Number(value=0.7, label="temperature")
        top_p = gr.Number(value=defaults.top_p, label="top_p")
        top_k = gr.Number(value=defaults.top_k, label="top_k", precision=0)
        max_new_tokens = gr.Number(value=256, label="max_new_tokens", precision=0)
        repetition_penalty = gr.Number(value=defaults.repetition_penalty, label="repetition_penalty")
        transcript = gr.Textbox(label="transcript")
        answer = gr.Textbox(label="answer")
        caption_text = gr.Textbox(label="caption")
        trace = gr.JSON(label="trace")
        triggers = [gr.Button(visible=False) for _ in range(4)]

    @gpu(ctx.gpu_seconds)
    def api_asr(audio_value: Any, prompt: str) -> str:
        """Transcript of the whole clip (30 s chunks joined); an empty system prompt means the official one."""
        return asr.transcribe(ctx.model, audio_value, prompt or None)

    @gpu(ctx.gpu_seconds)
    def api_qa(audio_value: Any, question_text: str, temp: float, p: float, k: float, tokens: float,
               penalty: float) -> str:
        """Answer one question (free or multiple choice written as 'question\\nA. …\\nB. …') about one clip."""
        return qa.ask(ctx.model, audio_value, question_text, sampling_settings(temp, p, k, tokens, penalty))

    @gpu(ctx.gpu_seconds)
    def api_caption(audio_value: Any) -> str:
        """Dense caption of the whole clip with the authors' caption prompt."""
        return caption.caption(ctx.model, audio_value)

    @gpu(ctx.gpu_seconds)
    def api_routing(audio_value: Any) -> dict[str, Any]:
        """Router decisions per 80 ms token (expert ids, weights, probabilities, times) plus a summary."""
        return routing.routing_json(ctx.model, audio_value)

    endpoints = [
        ("asr", api_asr, [audio_file, system_prompt], transcript),
        ("qa", api_qa, [audio_file, question, temperature, top_p, top_k, max_new_tokens, repetition_penalty], answer),
        ("caption", api_caption, [audio_file], caption_text),
        ("routing", api_routing, [audio_file], trace),
    ]
    for trigger, (name, function, inputs, output) in zip(triggers, endpoints, strict=True):
        trigger.click(function, inputs, output, api_name=name, api_description=function.__doc__,
                      **ctx.model_event())


def build_demo(
    loaded: LoadedModel, concurrency_limit: int | None = None, max_queue_size: int | None = None,
    review_config: review.ReviewConfig | None = None,
) -> gr.Blocks:
    """The whole app. ``concurrency_limit``/``max_queue_size`` default to ``$EUREKA_CONCURRENCY`` (1) and
    ``$EUREKA_MAX_QUEUE`` (32); ``review_config`` (the DataFlux database and reviewers) to
    ``ReviewConfig.from_env()``. The database opens when the Review tab is first shown, not here."""
    review_config = review_config or review.ReviewConfig.from_env()
    concurrency_limit = concurrency_limit or max(1, env_int("EUREKA_CONCURRENCY", 1))
    max_queue_size = max_queue_size or max(1, env_int("EUREKA_MAX_QUEUE", 32))
    ctx = AppContext(loaded=loaded, concurrency_limit=concurrency_limit,
                     gpu_seconds=max(10, env_int("EUREKA_GPU_SECONDS", 120)))
    if concurrency_limit > 1 and loaded.model.engine == "fast" and loaded.model.batcher is None:
        # Jobs running at once share decode steps instead of competing for the same cores (docs/performance.md).
        loaded.model.enable_batching(max_batch=concurrency_limit)
    with gr.Blocks(title="Eureka-Audio Studio") as demo:
        ctx.last_clip = gr.State(None)
        gr.Markdown(header_markdown(loaded), elem_id="header")
        if loaded.choice.banner:
            gr.Markdown("⚠️ " + loaded.choice.banner, elem_id="offline-banner")
        with gr.Tabs():
            with gr.Tab("Speech recognition", id="asr", elem_id="tab-asr"):
                asr.build_tab(ctx, *tab_examples("asr"))
            with gr.Tab("Audio Q&A", id="qa", elem_id="tab-qa"):
                qa.build_tab(ctx, *tab_examples("qa"))
            with gr.Tab("Dense captioning", id="caption", elem_id="tab-caption"):
                caption.build_tab(ctx, *tab_examples("caption"))
            with gr.Tab("MoE routing", id="routing", elem_id="tab-routing") as routing_tab:
                routing_parts = routing.build_tab(ctx, *tab_examples("routing"))
            with gr.Tab("Review (DataFlux)", id="review", elem_id="tab-review") as review_tab:
                review_parts = review.build_tab(ctx, review_config)
        # Opening the routing tab with clip A empty fills it with the clip used last, so "why did it say that?"
        # is one click away.
        routing_tab.select(lambda current, last: current or last, [routing_parts["audio_a"], ctx.last_clip],
                           routing_parts["audio_a"], queue=False, api_visibility="private")
        # The review queue is read when the tab is shown (fresh each time: other reviewers keep working).
        review_tab.select(*review_parts["on_open"], api_visibility="private")
        build_api(ctx)
    demo.queue(max_size=max_queue_size, default_concurrency_limit=concurrency_limit)
    return demo
