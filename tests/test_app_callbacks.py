"""The app's plain functions, called directly (no server, no browser) on the tiny-random model.

tiny-random answers gibberish, so these tests check the flows — chunking, turns, windows, figures, errors,
settings isolation — never the content of an answer.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import gradio as gr
import huggingface_hub.constants
import numpy as np
import pytest
import soundfile as sf
from conftest import SR, noise, tone

from app import asr, caption, qa, routing
from app.common import (
    AppContext,
    LoadedModel,
    ModelChoice,
    choose_model_source,
    display_name,
    format_time,
    gpu,
    header_markdown,
    load_clip,
    plan_spans,
    sampling_settings,
    stream_text,
)
from app.examples import load_manifest, tab_examples
from model import GenerationSettings

GREEDY_SHORT = GenerationSettings(max_new_tokens=4)


def write_wav(path: Path, samples: np.ndarray, rate: int = SR) -> str:
    sf.write(path, samples, rate, subtype="PCM_16")
    return str(path)


@pytest.fixture()
def speechlike(tmp_path: Path) -> str:
    """A short non-silent clip (a tone over noise) as a WAV file."""
    return write_wav(tmp_path / "clip.wav", tone(2.0) + noise(2.0))


# --- shared helpers ----------------------------------------------------------------------------------------------
def test_plan_spans_cuts_and_merges_short_tails() -> None:
    assert plan_spans(65.0, 30.0) == [(0.0, 30.0), (30.0, 60.0), (60.0, 65.0)]
    assert plan_spans(60.4, 30.0) == [(0.0, 30.0), (30.0, 60.4)]  # a 0.4 s tail joins the previous chunk
    assert plan_spans(12.0, 30.0) == [(0.0, 12.0)]
    assert plan_spans(0.0, 30.0) == []
    assert format_time(65.0) == "1:05.0"


def test_bad_inputs_raise_gr_error_with_a_clear_message(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_text("this is not audio " * 40)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    too_long = write_wav(tmp_path / "long.wav", np.zeros(1000 * 601, np.float32) + 0.1, rate=1000)
    silent = write_wav(tmp_path / "silent.wav", np.zeros(SR, np.float32))
    cases = [
        (None, "No audio"),
        ("", "No audio"),
        (str(corrupt), "Could not decode corrupt.wav"),
        (str(empty), "empty"),
        (too_long, "limit is 600 s"),
        (str(tmp_path / "missing.wav"), "not found"),
    ]
    for source, message in cases:
        with pytest.raises(gr.Error, match=message):
            load_clip(source)
    with pytest.raises(gr.Error, match="Could not decode") as caught:
        load_clip(str(corrupt))
    assert str(tmp_path) not in str(caught.value), "server paths must not leak into user messages"
    with pytest.raises(gr.Error, match="silent"):
        load_clip(silent, allow_silence=False)
    with pytest.warns(UserWarning, match="silent"):
        assert load_clip(silent).shape == (SR,)


def test_every_tab_reports_bad_audio_as_gr_error(tiny, tmp_path: Path) -> None:
    corrupt = tmp_path / "notes.wav"
    corrupt.write_text("not audio\n" * 50)
    silent = write_wav(tmp_path / "silent.wav", np.zeros(SR, np.float32))
    with pytest.raises(gr.Error, match="Could not decode"):
        next(asr.transcribe_stream(tiny, str(corrupt), settings=GREEDY_SHORT))
    with pytest.raises(gr.Error, match="no speech to transcribe"):
        asr.transcribe(tiny, silent)
    with pytest.raises(gr.Error, match="Could not decode"):
        qa.add_turn(qa.new_session(), [str(corrupt)], "What is it?")
    with pytest.raises(gr.Error, match="Could not decode"):
        caption.caption(tiny, str(corrupt))
    with pytest.raises(gr.Error, match="Could not decode"):
        routing.routing_json(tiny, str(corrupt))
    # after all that the model still answers
    assert isinstance(caption.caption(tiny, str(write_wav(tmp_path / "ok.wav", tone(1.0))), max_new_tokens=3), str)


def test_sampling_settings_validate_and_are_fresh_objects() -> None:
    first = sampling_settings(0.7, 0.8, 20, 64, 1.05)
    second = sampling_settings(0.0, 0.5, 5, 8, 1.2)
    assert first is not second
    assert (first.temperature, first.max_new_tokens) == (0.7, 64)
    assert (second.temperature, second.top_k, second.max_new_tokens) == (0.0, 5, 8)
    with pytest.raises(gr.Error, match="temperature"):
        sampling_settings(-1, 0.8, 20, 64, 1.05)
    with pytest.raises(gr.Error, match="max new tokens"):
        sampling_settings(0.7, 0.8, 20, 0, 1.05)
    with pytest.raises(gr.Error, match="numbers"):
        sampling_settings("hot", 0.8, 20, 64, 1.05)


class RecordingModel:
    """Stands in for EurekaAudio.stream: yields pieces forever and records whether it was closed."""

    def __init__(self) -> None:
        self.closed = False
        self.pieces = 0

    def stream(self, messages, settings):
        try:
            while True:
                self.pieces += 1
                yield "word "
        finally:
            self.closed = True


def test_closing_a_stream_stops_generation() -> None:
    """What Stop (and a client leaving) does: Gradio closes the callback's generator, which must close the model's."""
    fake = RecordingModel()
    pieces = stream_text(fake, [], GREEDY_SHORT)
    assert next(pieces) == "word "
    pieces.close()
    assert fake.closed


def test_stopping_asr_midway_closes_the_model_stream(monkeypatch: pytest.MonkeyPatch, speechlike: str) -> None:
    fake = RecordingModel()
    monkeypatch.setattr(fake, "tokenizer", None, raising=False)
    updates = asr.transcribe_stream(fake, speechlike, settings=GREEDY_SHORT)
    for _ in range(3):
        next(updates)
    updates.close()
    assert fake.closed and fake.pieces == 3


def test_gpu_decorator_is_a_no_op_without_spaces() -> None:
    def function() -> int:
        return 1

    assert gpu(60)(function) is function


# --- ASR -----------------------------------------------------------------------------------------------------------
def test_asr_splits_65_s_into_three_chunks_with_time_ranges(tiny, tmp_path: Path) -> None:
    clip = write_wav(tmp_path / "long.wav", tone(65.0, freq=300.0) + noise(65.0))
    chunks = asr.plan_chunks(65.0)
    assert [(c.start_s, c.end_s) for c in chunks] == [(0.0, 30.0), (30.0, 60.0), (60.0, 65.0)]
    updates = list(asr.transcribe_stream(tiny, clip, settings=GenerationSettings(max_new_tokens=3)))
    final = updates[-1]
    assert len(final.chunks) == 3
    labels = re.findall(r"^\[[^\]]*\]", final.chunk_lines, re.M)  # gibberish may hold \x1c etc.: no splitlines()
    assert labels == ["[0:00.0–0:30.0]", "[0:30.0–1:00.0]", "[1:00.0–1:05.0]"]
    assert "3 chunks" in final.stats and "tokens/s" in final.stats and "time to first token" in final.stats
    assert "transcribing" in updates[0].stats  # progress before the end
    assert final.transcript == " ".join(c.text.strip() for c in final.chunks if c.text.strip())


def test_asr_system_prompt_and_language_hint(tiny, speechlike: str) -> None:
    prompt = asr.language_prompt("Portuguese")
    assert "Portuguese" in prompt and prompt.startswith("You are an advanced ASR")
    assert asr.language_prompt("") == asr.asr_system_prompt()
    text = asr.transcribe(tiny, speechlike, system_prompt=prompt, max_new_tokens=5)
    assert isinstance(text, str)


# --- Q&A -----------------------------------------------------------------------------------------------------------
def test_format_question_multiple_choice() -> None:
    question = qa.format_question("How many beeps?", qa.MODES[1], ["One", "Two", "Three", ""])
    assert question == "How many beeps?\nA. One\nB. Two\nC. Three"
    assert qa.format_question("  Free text  ", qa.MODES[0], ["x", "y"]) == "Free text"
    with pytest.raises(gr.Error, match="at least options A and B"):
        qa.format_question("Q?", qa.MODES[1], ["only one", "", "", ""])


def test_qa_multi_turn_history(tiny, speechlike: str, tmp_path: Path) -> None:
    second_clip = write_wav(tmp_path / "second.wav", tone(1.5, freq=880.0))
    settings = GenerationSettings(max_new_tokens=6)
    session = qa.new_session()
    with pytest.raises(gr.Error, match="No audio"):
        qa.add_turn(session, [None], "What is this?")
    with pytest.raises(gr.Error, match="Type a question"):
        qa.add_turn(session, [speechlike], "   ")

    session = qa.add_turn(session, [speechlike], "What do you hear?")
    with pytest.raises(gr.Error, match="no answer yet"):
        qa.add_turn(session, [speechlike], "Again?")
    session = list(qa.answer_stream(tiny, session, settings))[-1]
    first_answer = session["turns"][0]["answer"]
    assert isinstance(first_answer, str)

    # the same clip is not attached twice; a new clip joins the turn it was added in
    session = qa.add_turn(session, [speechlike, second_clip], "And in the second clip?")
    session = list(qa.answer_stream(tiny, session, settings, system_prompt="Answer briefly."))[-1]
    assert [turn["clips"] for turn in session["turns"]] == [[speechlike], [second_clip]]

    messages = qa.conversation_messages(session, "Answer briefly.")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[1]["content"][0]["type"] == "audio_url"
    assert messages[1]["content"][-1]["text"] == "What do you hear?"
    assert messages[2]["content"][0]["text"] == first_answer  # the model sees its previous answer
    assert messages[3]["content"][0]["audio_url"]["url"] == second_clip

    history = qa.chat_history(session)
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert history[0]["content"].startswith("[clip] clip.wav\n")

    # Regenerate: the last answer is dropped and produced again (greedy: identical)
    redo = qa.drop_last_answer(session)
    assert redo["turns"][-1]["answer"] is None and session["turns"][-1]["answer"] is not None
    again = list(qa.answer_stream(tiny, redo, settings, system_prompt="Answer briefly."))[-1]
    assert again["turns"][-1]["answer"] == session["turns"][-1]["answer"]


def test_chat_history_shows_markup_as_text() -> None:
    payload = '<img src=x onerror="alert(1)"><script>alert(2)</script>'
    session = {"turns": [{"clips": [], "question": payload, "answer": payload}]}
    for message in qa.chat_history(session):
        assert "<img" not in message["content"] and "<script>" not in message["content"]
        assert "&lt;img src=x onerror=\"alert(1)\"&gt;" in message["content"]


def test_qa_settings_are_isolated_between_sessions(tiny, speechlike: str) -> None:
    """Two users with different settings, interleaved: each gets what its own settings give."""
    user_a = sampling_settings(temperature=0.0, max_new_tokens=12)
    user_b = sampling_settings(temperature=1.5, top_p=0.9, top_k=50, max_new_tokens=2)
    a_first = qa.ask(tiny, speechlike, "What is it?", user_a)
    b_answer = qa.ask(tiny, speechlike, "What is it?", user_b)
    a_second = qa.ask(tiny, speechlike, "What is it?", user_a)
    assert a_first == a_second, "user B's sampling must not change user A's greedy answer"
    assert count_tokens_of(tiny, b_answer) <= 2 < count_tokens_of(tiny, a_first)
    assert (user_a.temperature, user_a.max_new_tokens) == (0.0, 12)  # untouched by B's call


def count_tokens_of(model, text: str) -> int:
    return len(model.tokenizer(text, add_special_tokens=False)["input_ids"])


def test_answer_stream_does_not_mutate_the_callers_session(tiny, speechlike: str) -> None:
    session = qa.add_turn(qa.new_session(), [speechlike], "Q?")
    snapshot = json.dumps(session)
    list(qa.answer_stream(tiny, session, GREEDY_SHORT))
    assert json.dumps(session) == snapshot


# --- caption -------------------------------------------------------------------------------------------------------
def test_caption_windows_and_timeline(tiny, tmp_path: Path) -> None:
    clip = write_wav(tmp_path / "scene.wav", tone(25.0, freq=500.0) + noise(25.0))
    assert [(w.start_s, w.end_s) for w in caption.plan_windows(25.0)] == [(0.0, 10.0), (10.0, 20.0), (20.0, 25.0)]
    windows, stats = list(caption.caption_windows_stream(tiny, clip, settings=GenerationSettings(max_new_tokens=3)))[-1]
    assert len(windows) == 3 and all(w.done for w in windows) and stats.chunks == 3
    labels = re.findall(r"^\[[^\]]*\]", caption.window_lines(windows), re.M)
    assert labels == ["[0:00.0–0:10.0]", "[0:10.0–0:20.0]", "[0:20.0–0:25.0]"]
    windows[0].text = "<b>loud</b> & noisy"
    figure = caption.timeline_figure(windows)
    bar = figure.data[0]
    assert list(bar.base) == [0.0, 10.0, 20.0] and list(bar.x) == [10.0, 10.0, 5.0]
    assert "&lt;b&gt;loud&lt;/b&gt; &amp; noisy" in bar.hovertext[0]


def test_whole_clip_caption_streams(tiny, speechlike: str) -> None:
    updates = list(caption.caption_stream(tiny, speechlike, settings=GenerationSettings(max_new_tokens=5)))
    text, stats = updates[-1]
    assert isinstance(text, str) and stats.elapsed_s > 0 and "tokens/s" in stats.summary()
    assert caption.caption(tiny, speechlike, max_new_tokens=5) == text  # greedy: same as the stream


# --- routing -------------------------------------------------------------------------------------------------------
def test_routing_figures_summary_and_downloads(tiny, speechlike: str, tmp_path: Path) -> None:
    trace, features = routing.trace_for(tiny, speechlike)
    figure = routing.routing_figure(trace, features, "A: clip")
    kinds = [t.type for t in figure.data]
    assert kinds == ["heatmap", "heatmap", "scatter", "scatter"]
    assert np.asarray(figure.data[1].z).shape == (trace.n_experts, len(trace.start_s))
    assert figure.layout.xaxis4.range == (0, features.duration_s)  # time axis shared with the spectrogram

    load = routing.load_figure(trace)
    assert [t.type for t in load.data] == ["bar", "bar"]
    assert np.isclose(sum(load.data[0].y), 1.0)
    assert any(abs(shape.y0 - 1 / trace.n_experts) < 1e-9 for shape in load.layout.shapes)  # the uniform line

    summary = routing.routing_summary(trace)
    assert summary["tokens"] == len(trace.start_s) and summary["routed_experts"] == trace.n_experts
    assert 0 <= summary["mean_entropy_bits"] <= summary["max_entropy_bits"]
    assert "routed experts" in routing.summary_text(summary)

    csv_path, json_path = routing.write_trace_files(trace, "clip/../x", tmp_path)
    assert csv_path.parent == tmp_path and csv_path.read_text().startswith("audio_index,start_s,end_s")
    assert len(json.loads(json_path.read_text())["tokens"]) == len(trace.start_s)

    figure_a, load_a, text, files = routing.analyse(tiny, speechlike, "A")
    assert "A: clip" in figure_a.layout.title.text and len(files) == 2 and all(Path(f).is_file() for f in files)

    api = routing.routing_json(tiny, speechlike)
    assert api["summary"]["tokens"] == len(api["tokens"]) and json.dumps(api)


def test_long_clips_are_pooled_for_the_browser() -> None:
    pooled, factor = routing.pool_columns(np.ones((4, 7500)))
    assert pooled.shape[1] <= routing.MAX_COLUMNS and factor == 7
    same, factor = routing.pool_columns(np.ones((4, 100)))
    assert same.shape == (4, 100) and factor == 1


# --- model choice, header, examples, the Blocks -----------------------------------------------------------------------
def test_offline_start_falls_back_with_a_banner_within_5_s(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EUREKA_MODEL", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", "/nonexistent-eureka-cache")
    started = time.monotonic()
    choice = choose_model_source(None)
    assert time.monotonic() - started < 5
    assert choice.banner and "Offline mode" in choice.banner and choice.source in ("mini", "tiny-random")


def test_explicit_model_choice_has_no_banner(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EUREKA_MODEL", "tiny-random")
    assert choose_model_source(None) == ModelChoice("tiny-random", "tiny-random", None)
    assert choose_model_source("/some/dir").source == "/some/dir"


def test_display_name(tmp_path: Path) -> None:
    assert display_name("cslys1999/Eureka-Audio-Instruct") == "cslys1999/Eureka-Audio-Instruct"
    assert display_name("tiny-random") == "tiny-random"
    (tmp_path / "my-checkpoint").mkdir()
    assert display_name(str(tmp_path / "my-checkpoint") + "/") == "my-checkpoint"


def test_header_shows_model_device_dtype_parameters(tiny) -> None:
    loaded = LoadedModel(tiny, ModelChoice("tiny-random", "tiny-random"), tiny.describe())
    header = header_markdown(loaded)
    for needle in ("`tiny-random`", "`cpu`", "`float32`", "parameters", "routed"):
        assert needle in header


def test_examples_have_prompts_and_are_small_16k_mono() -> None:
    entries = load_manifest()
    assert len(entries) >= 4
    for entry in entries:
        info = sf.info(entry["path"])
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert Path(entry["path"]).stat().st_size < 300_000
        assert entry["qa_question"] and entry["caption_prompt"] and entry["asr_system_prompt"]
    for task in ("asr", "qa", "caption", "routing"):
        rows, labels = tab_examples(task)
        assert rows and len(rows) == len(labels)


def test_blocks_share_one_model_concurrency_group(tiny) -> None:
    from app.ui import build_demo

    loaded = LoadedModel(tiny, ModelChoice("tiny-random", "tiny-random", "Offline mode: test banner"), tiny.describe())
    demo = build_demo(loaded, concurrency_limit=2, max_queue_size=7)
    functions = list(demo.fns.values())
    named = {f.api_name: f for f in functions if f.api_name in ("asr", "qa", "caption", "routing")}
    assert set(named) == {"asr", "qa", "caption", "routing"}
    model_bound = [f for f in functions if f.concurrency_id == "model"]
    assert len(model_bound) >= 8  # 4 API endpoints + ASR, Q&A (send, submit, regenerate), caption, routing
    assert all(f.concurrency_limit == 2 for f in model_bound)
    assert demo._queue.max_size == 7
    markdown = [b.value for b in demo.blocks.values() if isinstance(b, gr.Markdown)]
    assert any("Offline mode: test banner" in text for text in markdown)
    chatbots = [b for b in demo.blocks.values() if isinstance(b, gr.Chatbot)]
    assert chatbots and all(not c.render_markdown and c.sanitize_html for c in chatbots)
    assert AppContext(loaded).model_event() == {"concurrency_id": "model", "concurrency_limit": 1}
    # two jobs at once share batched decode steps; one job at a time needs no batcher
    try:
        assert tiny.batcher is not None and tiny.batcher.max_batch == 2
    finally:
        tiny.disable_batching()
    build_demo(loaded, concurrency_limit=1)
    assert tiny.batcher is None


def test_malloc_mmap_threshold_is_pinned_unless_the_user_chose_one(monkeypatch) -> None:
    """Long-running servers keep flat memory (docs/reliability.md); a user's MALLOC_MMAP_THRESHOLD_ wins."""
    import platform

    from app.common import pin_malloc_mmap_threshold

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    if platform.libc_ver()[0] == "glibc":
        assert pin_malloc_mmap_threshold() is True
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert pin_malloc_mmap_threshold() is False
