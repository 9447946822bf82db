"""Audio Q&A tab: a multi-turn chat about one or more clips, free or multiple-choice (A–D) questions.

The conversation lives in a per-session ``gr.State`` as plain data (turns of clips, question, answer); the chat
view and the model's messages are both derived from it. Sampling settings come in with every call as component
values, so nothing about one user's session can leak into another's.
"""

from __future__ import annotations

import copy
import html
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from model import GenerationSettings
from model.audio import SAMPLE_RATE
from model.inference import EurekaAudio
from model.prompts import option_replies, question_options

from .common import (
    DEFAULT_MAX_SECONDS,
    MAX_TEXT_CHARS,
    AppContext,
    RunStats,
    audio_path,
    count_tokens,
    gpu,
    last_item,
    load_clip,
    remember_clip,
    sampling_settings,
    show_examples,
    stream_text,
    user_text,
)

OPTION_LETTERS = ("A", "B", "C", "D")
MODES = ("Free question", "Multiple choice (A–D)")

# {"turns": [{"clips": [path, …], "question": str, "answer": str | None, "seconds": audio of the turn's clips,
#             "score_options": answer by the likeliest option instead of generating}]}
Session = dict[str, Any]

# A conversation is one prompt: every turn's text and every clip's audio tokens are fed again with each question.
# Each question is capped (MAX_TEXT_CHARS), and so is the whole: its text, and its clips' audio together.
MAX_CONVERSATION_CHARS = 4 * MAX_TEXT_CHARS
MAX_CONVERSATION_SECONDS = DEFAULT_MAX_SECONDS


def new_session() -> Session:
    return {"turns": []}


def format_question(question: str, mode: str = MODES[0], options: list[str] | None = None) -> str:
    """The question as the model was trained to see it: multiple choice is ``question\\nA. …\\nB. …`` (DataFlux)."""
    question = (question or "").strip()
    if mode != MODES[1]:
        return question
    filled = [(letter, (text or "").strip()) for letter, text in zip(OPTION_LETTERS, options or [], strict=False)]
    filled = [(letter, text) for letter, text in filled if text]
    if len(filled) < 2:
        raise gr.Error("A multiple-choice question needs at least options A and B.")
    return question + "".join(f"\n{letter}. {text}" for letter, text in filled)


def session_clips(session: Session) -> list[str]:
    return [clip for turn in session["turns"] for clip in turn["clips"]]


def add_turn(session: Session, clips: list[Any], question: str, score_options: bool = False) -> Session:
    """A new user turn. Clips not yet in the conversation are attached to it; the first turn must have one.
    ``score_options``: the turn is a multiple-choice question answered by ``answer_by_scoring``.

    Each new clip is loaded once here, so a corrupt or silent file is reported before the model starts; questions,
    the conversation's text and its audio are bounded (a clear "press Clear" beats a server out of memory).
    """
    question = user_text(question, "question").strip()
    if not question:
        raise gr.Error("Type a question first.")
    text_chars = len(question) + sum(len(t["question"]) + len(t["answer"] or "") for t in session["turns"])
    if text_chars > MAX_CONVERSATION_CHARS:
        raise gr.Error(f"The conversation is too long ({text_chars:,} characters with this question; the limit is "
                       f"{MAX_CONVERSATION_CHARS:,}). Press Clear to start a new one.")
    known = set(session_clips(session))
    new_clips, new_seconds = [], 0.0
    for clip in clips:
        path = audio_path(clip)
        if path and str(path) not in known and str(path) not in new_clips:
            new_seconds += len(load_clip(path)) / SAMPLE_RATE
            new_clips.append(str(path))
    seconds = new_seconds + sum(turn.get("seconds", 0.0) for turn in session["turns"])
    if seconds > MAX_CONVERSATION_SECONDS:
        raise gr.Error(f"The conversation's clips add up to {seconds:.0f} s of audio; the limit is "
                       f"{MAX_CONVERSATION_SECONDS:.0f} s. Press Clear to start a new one, or use shorter clips.")
    if not session["turns"] and not new_clips:
        raise gr.Error("No audio: add a clip (upload or record) before asking about it.")
    if session["turns"] and session["turns"][-1]["answer"] is None:
        raise gr.Error("The previous question has no answer yet: wait, press Regenerate, or Clear.")
    if score_options and len(question_options(question)) < 2:
        raise gr.Error("Answering by the likeliest option needs a multiple-choice question (options A and B at least).")
    updated = copy.deepcopy(session)
    updated["turns"].append({"clips": new_clips, "question": question, "answer": None, "seconds": new_seconds,
                             "score_options": score_options})
    return updated


def conversation_messages(session: Session, system_prompt: str | None = None) -> list[dict[str, Any]]:
    """Official chat messages: each user turn = its clips then the question; previous answers as assistant turns."""
    messages: list[dict[str, Any]] = []
    system_prompt = user_text(system_prompt, "system prompt")
    if system_prompt and system_prompt.strip():
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt.strip()}]})
    for turn in session["turns"]:
        content = [{"type": "audio_url", "audio_url": {"url": clip}} for clip in turn["clips"]]
        content.append({"type": "text", "text": turn["question"]})
        messages.append({"role": "user", "content": content})
        if turn["answer"] is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": turn["answer"]}]})
    return messages


def as_text(text: str) -> str:
    """Escape ``&``, ``<``, ``>``: the Chatbot (``render_markdown=False``) inserts messages as HTML, so escaping is
    what makes model output and user text appear literally — ``<img onerror=…>`` shows as those characters."""
    return html.escape(text, quote=False)


def chat_history(session: Session) -> list[dict[str, str]]:
    """The ``gr.Chatbot`` view (messages format): clip names and question, then the answer, all as plain text."""
    history = []
    for turn in session["turns"]:
        names = "".join(f"[clip] {Path(clip).name}\n" for clip in turn["clips"])
        history.append({"role": "user", "content": as_text(names + turn["question"])})
        if turn["answer"] is not None:
            history.append({"role": "assistant", "content": as_text(turn["answer"])})
    return history


def answer_stream(
    model: EurekaAudio, session: Session, settings: GenerationSettings, system_prompt: str | None = None
) -> Iterator[Session]:
    """Answer the last (unanswered) turn, yielding the session as the answer grows."""
    if not session["turns"] or session["turns"][-1]["answer"] is not None:
        raise gr.Error("Nothing to answer: ask a question first.")
    messages = conversation_messages(session, system_prompt)
    session = copy.deepcopy(session)
    turn = session["turns"][-1]
    turn["answer"] = ""
    for text in stream_text(model, messages, settings):
        turn["answer"] += text
        yield session
    yield session


def answer_with_stats(
    model: EurekaAudio, session: Session, settings: GenerationSettings, system_prompt: str | None = None
) -> Iterator[tuple[Session, str]]:
    """``answer_stream`` plus a status line: "answering…" while streaming, then turn number, time to first token
    and tokens/s — the tab's sign that a run has finished."""
    started, first_text_s = time.perf_counter(), None
    updated = session
    for updated in answer_stream(model, session, settings, system_prompt):
        if first_text_s is None and updated["turns"][-1]["answer"]:
            first_text_s = time.perf_counter() - started
        yield updated, "answering…"
    answer = updated["turns"][-1]["answer"] or ""
    stats = RunStats(first_text_s=first_text_s, elapsed_s=time.perf_counter() - started,
                     tokens=count_tokens(model, answer, settings.max_new_tokens))
    first = "—" if first_text_s is None else f"{first_text_s:.2f} s"
    yield updated, (f"turn {len(updated['turns'])} answered · time to first token {first} · {stats.tokens} tokens "
                    f"in {stats.elapsed_s:.2f} s ({stats.tokens_per_s:.1f} tokens/s)")


def answer_by_scoring(model: EurekaAudio, session: Session, system_prompt: str | None = None) -> tuple[Session, str]:
    """Answer the last turn, a multiple-choice question, with the option whose reply ("B. text") the model finds
    likeliest, plus a status line with every option's log-probability.

    Why: the answer is then always one of the options offered — a small model answering freely can pair a letter
    with text that was never offered ("B. About 220 Hz") — and on Eureka-mini's held-out questions it is right as
    often or more often than generating (the model card has the numbers). It arrives whole.
    """
    if not session["turns"] or session["turns"][-1]["answer"] is not None:
        raise gr.Error("Nothing to answer: ask a question first.")
    replies = option_replies(session["turns"][-1]["question"])
    if len(replies) < 2:
        raise gr.Error("Answering by the likeliest option needs a multiple-choice question (options A and B at least).")
    started = time.perf_counter()
    scores = dict(zip(replies, model.score_replies(conversation_messages(session, system_prompt),
                                                   list(replies.values())), strict=True))
    updated = copy.deepcopy(session)
    updated["turns"][-1]["answer"] = replies[max(scores, key=scores.__getitem__)]
    ranking = ", ".join(f"{letter} {score:.2f}" for letter, score in scores.items())
    return updated, (f"turn {len(updated['turns'])} answered by scoring {len(replies)} options in "
                     f"{time.perf_counter() - started:.2f} s · log-probabilities: {ranking}")


def drop_last_answer(session: Session) -> Session:
    """Regenerate: forget the last answer (the question and its clips stay)."""
    if not session["turns"]:
        raise gr.Error("Nothing to regenerate yet.")
    updated = copy.deepcopy(session)
    updated["turns"][-1]["answer"] = None
    return updated


def ask(model: EurekaAudio, audio: Any, question: str, settings: GenerationSettings) -> str:
    """One question about one clip, whole answer at once (the ``/qa`` API endpoint)."""
    session = add_turn(new_session(), [audio], question)
    return last_item(answer_stream(model, session, settings), session)["turns"][-1]["answer"] or ""


def sampling_controls() -> list[gr.components.Component]:
    """Per-session decoding controls (their values are sent with each call; defaults follow the library)."""
    return [
        gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature (0 = greedy)", elem_id="qa-temperature"),
        gr.Slider(0.05, 1.0, value=0.8, step=0.05, label="Top-p"),
        gr.Slider(0, 100, value=20, step=1, label="Top-k (0 = off)"),
        gr.Slider(1, 2048, value=256, step=1, label="Max new tokens", elem_id="qa-max-new-tokens"),
        gr.Slider(1.0, 2.0, value=1.05, step=0.01, label="Repetition penalty"),
    ]


def build_tab(ctx: AppContext, examples: list[list[Any]], example_labels: list[str]) -> dict[str, Any]:
    """The Q&A tab's components and events; callbacks adapt component values to the functions above."""
    session = gr.State(new_session())
    with gr.Row():
        with gr.Column(scale=2):
            chatbot = gr.Chatbot(
                label="Conversation", height=380, render_markdown=False, sanitize_html=True, allow_tags=False,
                elem_id="qa-chat", buttons=["copy"],
            )
            question = gr.Textbox(label="Question", lines=2, placeholder="Ask about the clip…", elem_id="qa-question")
            mode = gr.Radio(list(MODES), value=MODES[0], label="Question type", elem_id="qa-mode")
            with gr.Column(visible=False) as option_row:
                with gr.Row():
                    options = [gr.Textbox(label=f"Option {letter}", lines=1, min_width=80,
                                          elem_id=f"qa-option-{letter.lower()}") for letter in OPTION_LETTERS]
                score_options = gr.Checkbox(
                    value=True, elem_id="qa-score-options",
                    label="Answer with the option the model finds likeliest (always one of them; not streamed)")
            with gr.Row():
                send = gr.Button("Send", variant="primary", elem_id="qa-send")
                stop = gr.Button("Stop", variant="stop", elem_id="qa-stop")
                regenerate = gr.Button("Regenerate", elem_id="qa-regenerate")
                clear = gr.Button("Clear", elem_id="qa-clear")
            status = gr.Textbox(label="Run statistics", lines=1, interactive=False, elem_id="qa-stats")
        with gr.Column(scale=1):
            clip = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Clip", elem_id="qa-audio")
            more_clips = gr.File(file_count="multiple", file_types=["audio"], label="More clips (optional)",
                                 type="filepath")
            with gr.Accordion("Sampling (this session only)", open=False):
                controls = sampling_controls()
            system_prompt = gr.Textbox(label="System prompt (empty = none, as in the official Q&A recipe)", lines=2)
    show_examples(examples, [clip, question], example_labels, "Example clips and questions")

    def start_turn(state: Session, clip_value: Any, files: list[Any] | None, text: str, mode_value: str,
                   scored: bool, *option_values: str) -> tuple[Session, list[dict[str, str]], str]:
        full_question = format_question(text, mode_value, list(option_values))
        state = add_turn(state, [clip_value, *(files or [])], full_question, bool(scored) and mode_value == MODES[1])
        return state, chat_history(state), ""

    @gpu(ctx.gpu_seconds)
    def run_answer(state: Session, prompt: str, *control_values: float) -> Iterator[tuple[Session, list, str]]:
        if state["turns"] and state["turns"][-1].get("score_options"):
            updated, status_line = answer_by_scoring(ctx.model, state, prompt)
            yield updated, chat_history(updated), status_line
            return
        settings = sampling_settings(*control_values)
        for updated, status_line in answer_with_stats(ctx.model, state, settings, prompt):
            yield updated, chat_history(updated), status_line

    def regenerate_turn(state: Session) -> tuple[Session, list[dict[str, str]]]:
        state = drop_last_answer(state)
        return state, chat_history(state)

    def clear_chat() -> tuple[Session, list, str, str]:
        return new_session(), [], "", ""

    private = {"api_visibility": "private"}
    mode.change(lambda m: gr.Column(visible=m == MODES[1]), mode, option_row, queue=False, **private)
    clip.change(remember_clip, [clip, ctx.last_clip], ctx.last_clip, queue=False, **private)
    answer_inputs = [session, system_prompt, *controls]
    turn_inputs = [session, clip, more_clips, question, mode, score_options, *options]
    asked = send.click(start_turn, turn_inputs, [session, chatbot, question], **private)
    submitted = question.submit(start_turn, turn_inputs, [session, chatbot, question], **private)
    answers = [
        trigger.success(run_answer, answer_inputs, [session, chatbot, status], **ctx.model_event(**private))
        for trigger in (asked, submitted)
    ]
    redo = regenerate.click(regenerate_turn, session, [session, chatbot], **private)
    answers.append(redo.success(run_answer, answer_inputs, [session, chatbot, status], **ctx.model_event(**private)))
    stop.click(None, cancels=answers, **private)
    clear.click(clear_chat, None, [session, chatbot, question, status], cancels=answers, queue=False, **private)
    return {"chatbot": chatbot, "question": question, "clip": clip, "session": session, "controls": controls}
