"""Hostile inputs (``tests/hostile.py``) through the Python API, the CLI and the real app: each gets its documented
outcome — success for legitimately valid audio, otherwise a clear message — nothing crashes, and the server answers
the next normal request. Also the app's limits (upload size, audio length, text length, a full queue), the zip
importer against zip bombs, and safe rendering of markup in every model tab (a browser test).

The real app (``python app.py``, tiny-random) starts once for the module with a small queue (2) and a small upload
cap (32 MB) so both limits can be hit cheaply. ``docs/reliability.md`` has the table of cases and outcomes.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from gradio_client.utils import QueueError
from hostile import ROOT, SR, AppProcess, Case, build_corpus, free_port, lying_zip, serve_app, text_cases, tone

from model import AudioInputError, load_audio, task_messages
from model.__main__ import main as cli_main

UPLOAD_CAP_MB = 32
GOOD_CLIP = ROOT / "assets" / "examples" / "beeps_three.wav"
QA_FAST = (0.0, 0.8, 20, 4, 1.05)  # temperature (greedy), top_p, top_k, max_new_tokens, repetition_penalty
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    return {case.name: case for case in build_corpus(tmp_path_factory.mktemp("hostile"), UPLOAD_CAP_MB)}


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppProcess]:
    folder = tmp_path_factory.mktemp("app")
    env = {"EUREKA_MAX_QUEUE": "2", "EUREKA_CONCURRENCY": "1", "EUREKA_MAX_UPLOAD_MB": str(UPLOAD_CAP_MB),
           "GRADIO_TEMP_DIR": str(folder / "gradio")}
    with serve_app(env, folder / "app.log") as running:
        yield running


@pytest.fixture(scope="module")
def client(app: AppProcess) -> Client:
    return Client(app.url, verbose=False)


def outcome(call: Callable[[], Any]) -> tuple[str, str]:
    """("ok", repr of the result) or ("error", the message) — the only two ways a hostile input may end."""
    try:
        return "ok", repr(call())[:200]
    except (AudioInputError, AppError) as exc:
        return "error", str(exc)


def check(case_name: str, surface: str, got: tuple[str, str], error: str | None, failures: list[str]) -> None:
    """Record a failure unless ``got`` is the expected outcome; app messages must not show server paths."""
    status, text = got
    if error is None and status != "ok":
        failures.append(f"{case_name} via {surface}: expected success, got error {text!r}")
    elif error is not None and (status != "error" or not re.search(error, text)):
        failures.append(f"{case_name} via {surface}: expected an error matching {error!r}, got {status} {text!r}")
    elif status == "error" and ("Traceback" in text or (surface.startswith("/") and "/tmp/" in text)):
        failures.append(f"{case_name} via {surface}: the message leaks internals: {text!r}")


def server_still_answers(client: Client) -> None:
    trace = client.predict(handle_file(str(GOOD_CLIP)), api_name="/routing")
    assert trace["summary"]["tokens"] > 0


# --- the corpus ----------------------------------------------------------------------------------------------------
def test_corpus_is_complete_deterministic_and_small(tmp_path: Path) -> None:
    first, second = build_corpus(tmp_path / "a", UPLOAD_CAP_MB), build_corpus(tmp_path / "b", UPLOAD_CAP_MB)
    assert len(first) + len(text_cases()) >= 25
    for a, b in zip(first, second, strict=True):
        assert a.path.read_bytes() == b.path.read_bytes(), f"{a.name} is not deterministic"
    on_disk = sum(case.path.stat().st_blocks * 512 for case in first)
    on_paper = sum(case.path.stat().st_size for case in first)
    assert on_disk < 16 * 1024**2 < on_paper, "the big inputs are sparse files"
    assert first[[c.name for c in first].index("one_hour.wav")].path.stat().st_size == 3600 * 8000 + 44


# --- Python API ----------------------------------------------------------------------------------------------------
def test_every_audio_case_through_the_python_api(corpus: dict[str, Case], tiny) -> None:
    failures: list[str] = []
    for case in corpus.values():
        messages = task_messages("asr", str(case.path))
        check(case.name, "generate", outcome(lambda m=messages: tiny.generate(m, max_new_tokens=4)), case.error,
              failures)
        check(case.name, "routing", outcome(lambda c=case: tiny.routing(str(c.path))), case.error, failures)
        check(case.name, "load_audio(bytes)", outcome(lambda c=case: load_audio(c.path.read_bytes())), case.error,
              failures)
    assert not failures, "\n".join(failures)


def test_duration_cap_refuses_from_the_header_before_decoding(corpus: dict[str, Case], monkeypatch) -> None:
    import soundfile

    def no_decoding(*_args, **_kwargs):
        raise AssertionError("samples were decoded")

    monkeypatch.setattr(soundfile.SoundFile, "blocks", no_decoding)
    monkeypatch.setattr(soundfile.SoundFile, "read", no_decoding)
    for name in ("one_hour.wav", "over_upload_cap.wav"):
        started = time.perf_counter()
        with pytest.raises(AudioInputError, match=r"s long; the limit is 600 s"):
            load_audio(corpus[name].path)
        assert time.perf_counter() - started < 1.0


def special_counts(model: Any, token_ids: list[int], question: str, system: str | None = None) -> dict[int, int]:
    """How often each of ``token_ids`` occurs in the prompt of a Q&A about a 1 s tone."""
    prompt, _ = model.tokenize(task_messages("qa", (tone(1.0), SR), question, system_prompt=system))
    return {i: prompt.input_ids.count(i) for i in token_ids}


def test_special_tokens_typed_by_a_user_stay_plain_text(tiny) -> None:
    """A question (and system prompt) full of <|im_end|>, <|audio_pad|>… has exactly the template's turn and audio
    tokens: typed text can neither close a turn nor open an audio slot."""
    specials = next(t.text for t in text_cases() if t.name == "special_tokens")
    ids = tiny.special_ids
    turn_and_audio = [ids.im_start, ids.im_end, ids.audio_start, ids.audio_end, ids.audio_pad]
    plain = special_counts(tiny, turn_and_audio, "What do you hear?")
    assert special_counts(tiny, turn_and_audio, specials) == plain
    assert special_counts(tiny, turn_and_audio, specials, system=specials) == special_counts(
        tiny, turn_and_audio, "What do you hear?", system="Be brief.")
    prompt, _ = tiny.tokenize(task_messages("qa", (tone(1.0), SR), specials))
    assert "<|im_end|>" in tiny.tokenizer.decode(prompt.input_ids, skip_special_tokens=True), "kept as text"
    assert isinstance(tiny.generate(task_messages("qa", (tone(1.0), SR), specials), max_new_tokens=4), str)


def test_think_tags_typed_by_a_user_stay_plain_text(tiny) -> None:
    ids = tiny.special_ids
    think = [ids.think_start, ids.think_end]
    if special_counts(tiny, think, "<think>x</think> What?") != special_counts(tiny, think, "What?"):
        pytest.xfail("<think>/</think> are added but not *special* tokens, so split_special_tokens=True does not "
                     "split them: typed by a user they become the template's think tokens (the official Qwen3 "
                     "tokenizer has the same property); a fix is proposed in docs/reliability.md")


def test_control_characters_and_markup_through_the_python_api(tiny) -> None:
    for case in text_cases():
        if case.name in ("control_chars", "markup", "special_tokens"):
            assert isinstance(tiny.generate(task_messages("qa", (tone(1.0), SR), case.text), max_new_tokens=4), str)


def test_python_api_refuses_a_prompt_longer_than_the_context(tiny) -> None:
    long_text = next(t.text for t in text_cases() if t.name == "long_question")
    try:
        prompt, _ = tiny.tokenize(task_messages("qa", (tone(1.0), SR), long_text))
    except ValueError as exc:
        assert "context" in str(exc)
        return
    context = tiny.config.backbone["max_position_embeddings"]
    assert len(prompt.input_ids) > context
    pytest.xfail(f"EurekaAudio.tokenize builds a {len(prompt.input_ids)}-token prompt for a {context}-token model "
                 "(generating from it exhausts memory); the guard is proposed in docs/reliability.md")


def test_python_api_accepts_lone_surrogates(tiny) -> None:
    text = next(t.text for t in text_cases() if t.name == "lone_surrogate")
    try:
        tiny.tokenize(task_messages("qa", (tone(1.0), SR), text))
    except TypeError as exc:
        pytest.xfail(f"model.tokenizer.encode_plain_text passes lone surrogates to the tokenizer ({exc}); "
                     "the fix is proposed in docs/reliability.md (the CLI and the app clean text first)")


# --- CLI -----------------------------------------------------------------------------------------------------------
def test_every_audio_case_through_the_cli(corpus: dict[str, Case], tiny, capsys, monkeypatch) -> None:
    """``python -m model``'s ``main`` in process (the real CLI, minus 3 s of interpreter start and the model load
    per case: the session's tiny-random model is handed over)."""
    monkeypatch.setattr("model.__main__.load_model", lambda *args, **kwargs: tiny)
    failures: list[str] = []
    for case in corpus.values():
        code = cli_main(["--model", "tiny-random", "--audio", str(case.path), "--max-new-tokens", "4"])
        out, err = capsys.readouterr()
        if case.valid and code != 0:
            failures.append(f"{case.name}: exit {code}, stderr {err!r}")
        elif not case.valid and (code != 2 or not re.search(case.error, err) or not err.startswith("error: ")):
            failures.append(f"{case.name}: exit {code}, stderr {err!r} (expected 2 and {case.error!r})")
    assert not failures, "\n".join(failures)


def test_every_text_case_through_the_cli(tiny, capsys, monkeypatch) -> None:
    monkeypatch.setattr("model.__main__.load_model", lambda *args, **kwargs: tiny)
    for case in text_cases():
        code = cli_main(["--model", "tiny-random", "--audio", str(GOOD_CLIP), "--task", "qa", "--question",
                         case.text, "--max-new-tokens", "4"])
        _, err = capsys.readouterr()
        if case.cli_error:
            assert code == 2 and re.search(case.cli_error, err), (case.name, code, err[-500:])
        else:
            assert code == 0, (case.name, err[-500:])


def test_cli_subprocess_end_to_end(corpus: dict[str, Case]) -> None:
    """The real command line (3+ s each, so two runs): a text file, and a question that is not UTF-8 (it reaches
    ``sys.argv`` as lone surrogates)."""
    runs = [
        ([str(corpus["text_named.wav"].path)], 2, "Could not decode text_named.wav"),
        ([str(GOOD_CLIP), "--task", "qa", "--question", b"What is \xff\xfe this?"], 0, ""),
    ]
    for audio_args, expected_code, message in runs:
        command = [sys.executable, "-m", "model", "--model", "tiny-random", "--max-new-tokens", "4", "--audio",
                   *audio_args]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, timeout=180)
        stderr = result.stderr.decode(errors="replace")
        assert result.returncode == expected_code, stderr[-2000:]
        assert message in stderr and "Traceback" not in stderr


def test_qa_conversation_limits(tmp_path: Path, monkeypatch) -> None:
    """A Q&A conversation is one growing prompt: its text and its clips' audio are capped with a clear message."""
    import gradio as gr
    import soundfile as sf

    from app import qa

    clips = [tmp_path / f"clip{i}.wav" for i in range(3)]
    for i, clip in enumerate(clips):
        sf.write(clip, tone(2.0, freq=300.0 + 100 * i), SR, subtype="PCM_16")
    monkeypatch.setattr(qa, "MAX_CONVERSATION_SECONDS", 5.0)
    session = qa.add_turn(qa.new_session(), [str(clips[0]), str(clips[1])], "First?")
    session["turns"][-1]["answer"] = "x"
    with pytest.raises(gr.Error, match="clips add up to 6 s of audio; the limit is 5 s"):
        qa.add_turn(session, [str(clips[2])], "Second?")
    long_turns = {"turns": [{"clips": [str(clips[0])], "question": "q" * 3999, "answer": "a" * 3999,
                             "seconds": 2.0}] * 2}
    with pytest.raises(gr.Error, match="conversation is too long .* Press Clear"):
        qa.add_turn(long_turns, [], "One more?")
    with pytest.raises(gr.Error, match="The question is 4,001 characters long; the limit is 4,000"):
        qa.add_turn(qa.new_session(), [str(clips[0])], "q" * 4001)


# --- the app (gradio_client against python app.py) -----------------------------------------------------------------
def test_every_audio_case_through_the_app(corpus: dict[str, Case], client: Client) -> None:
    failures: list[str] = []
    for case in corpus.values():
        if case.upload_refused:
            continue  # test_upload_over_the_cap_is_refused
        clip = handle_file(str(case.path))
        check(case.name, "/qa", outcome(lambda c=clip: client.predict(c, "What is it?", *QA_FAST, api_name="/qa")),
              case.error, failures)
        check(case.name, "/routing", outcome(lambda c=clip: client.predict(c, api_name="/routing")), case.error,
              failures)
        # ASR decodes up to 512 tokens per chunk: every refusal, and two valid clips
        if not case.valid or case.asr_error or case.name in ("one_sample.wav", "six_channels.wav"):
            check(case.name, "/asr", outcome(lambda c=clip: client.predict(c, "", api_name="/asr")),
                  case.error or case.asr_error, failures)
        if case.name in ("rate_96k.wav", "zip_bomb.zip"):
            check(case.name, "/caption", outcome(lambda c=clip: client.predict(c, api_name="/caption")), case.error,
                  failures)
        if not case.valid or case.asr_error:
            server_still_answers(client)
    assert not failures, "\n".join(failures)


def raw_call(url: str, api_name: str, data: list[Any]) -> tuple[str, str]:
    """Call a named endpoint over Gradio's plain HTTP API with ``json.dumps`` (ASCII escapes), the way any client
    can — unlike httpx in gradio_client, which cannot even encode a lone surrogate. Returns (event, data)."""
    body = json.dumps({"data": data}).encode()
    request = urllib.request.Request(f"{url}gradio_api/call/{api_name}", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        event_id = json.loads(response.read())["event_id"]
    with urllib.request.urlopen(f"{url}gradio_api/call/{api_name}/{event_id}", timeout=120) as response:
        stream = response.read().decode()
    events = re.findall(r"^event: (\w+)\ndata: (.*)$", stream, re.M)
    return events[-1] if events else ("none", stream)


def test_every_text_case_through_the_app(app: AppProcess, client: Client) -> None:
    clip = handle_file(str(GOOD_CLIP))
    status, uploaded = raw_upload(app.url, GOOD_CLIP)
    server_clip = {"path": json.loads(uploaded)[0], "meta": {"_type": "gradio.FileData"}}
    for case in text_cases():
        if case.text.encode("utf-8", "surrogatepass").decode("utf-8", "replace") != case.text:
            event, data = raw_call(app.url, "qa", [server_clip, case.text, *QA_FAST])
            assert event == "complete" and isinstance(json.loads(data)[0], str), (case.name, event, data)
            continue
        status, text = outcome(lambda c=case: client.predict(clip, c.text, *QA_FAST, api_name="/qa"))
        if case.app_error:
            assert status == "error" and re.search(case.app_error, text), (case.name, status, text)
        else:
            assert status == "ok", (case.name, text)
    long_text = next(t.text for t in text_cases() if t.name == "long_question")
    status, text = outcome(lambda: client.predict(clip, long_text, api_name="/asr"))
    assert status == "error" and "system prompt is 100,000 characters" in text
    server_still_answers(client)


def test_upload_over_the_cap_is_refused(corpus: dict[str, Case], app: AppProcess, client: Client) -> None:
    from app.ui import launch_options

    if "max_file_size" not in launch_options():
        pytest.xfail("app.ui.launch_options() passes no max_file_size: uploads are unlimited; the one-line change "
                     "(\"max_file_size\": max_upload_size()) is proposed in docs/reliability.md")
    big = corpus["over_upload_cap.wav"].path
    with pytest.raises(ValueError, match="exceeds the maximum file size"):
        client.predict(handle_file(str(big)), "", api_name="/asr")  # gradio_client checks before sending
    status, body = raw_upload(app.url, big)  # a client that does not check: the server stops reading
    assert (status == 413 and "File size exceeded maximum allowed size" in body) or status == 0, (status, body)
    assert raw_upload(app.url, corpus["one_hour.wav"].path)[0] == 200, "28.8 MB is under the 32 MB cap"
    server_still_answers(client)


def raw_upload(url: str, path: Path) -> tuple[int, str]:
    """POST a file to Gradio's upload route as multipart, the way any HTTP client could. A server that stops
    reading at its cap may answer 413 or reset the connection while the body is still being sent: status 0."""
    boundary = uuid.uuid4().hex
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{path.name}"\r\n'
            "Content-Type: audio/wav\r\n\r\n").encode()
    body = head + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url + "gradio_api/upload", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (urllib.error.URLError, ConnectionError) as exc:
        return 0, f"connection closed by the server: {exc}"


def test_a_full_queue_says_so_and_the_app_recovers(client: Client) -> None:
    """Queue size 2, one worker: while a long answer (≈1000 tokens) holds the worker, six more questions arrive —
    two wait their turn and are answered, the rest are told the queue is full; then the app answers as usual."""
    from gradio_client.utils import Status

    clip = handle_file(str(GOOD_CLIP))
    slow = client.submit(clip, "What do you hear?", 0.0, 0.8, 20, 1024, 1.05, api_name="/qa")
    deadline = time.monotonic() + 60
    while slow.status().code != Status.PROCESSING and time.monotonic() < deadline:
        time.sleep(0.02)
    jobs = [client.submit(clip, "Describe it.", *QA_FAST, api_name="/qa") for _ in range(6)]
    answered, refused = 0, []
    for job in jobs:
        try:
            job.result(timeout=300)
            answered += 1
        except QueueError as exc:
            refused.append(str(exc))
    assert isinstance(slow.result(timeout=300), str)
    assert answered >= 1 and refused, (answered, refused)
    assert all("Queue is full" in message for message in refused)
    assert answered + len(refused) == len(jobs)
    server_still_answers(client)


# --- DataFlux importer ---------------------------------------------------------------------------------------------
def test_importer_refuses_a_zip_bomb_by_its_declared_size(corpus: dict[str, Case], tmp_path: Path, capsys) -> None:
    from dataflux_ui.__main__ import main as dataflux_main
    from dataflux_ui.importer import ImportRefused, import_path

    bomb = corpus["zip_bomb.zip"].path
    started = time.perf_counter()
    with pytest.raises(ImportRefused, match=r"2621440000 bytes of audio \(at most 2147483648\)"):
        import_path(bomb, tmp_path / "dest")
    assert time.perf_counter() - started < 2.0, "refused from the directory, before inflating anything"
    assert not (tmp_path / "dest").exists() or not any((tmp_path / "dest").rglob("*"))
    assert dataflux_main(["import", str(bomb), "--dest", str(tmp_path / "cli")]) == 2
    assert "import refused" in capsys.readouterr().err


def test_importer_refuses_a_zip_with_a_lying_header(tmp_path: Path) -> None:
    import zipfile

    from dataflux_ui.importer import ImportRefused, import_path

    archive = lying_zip(tmp_path / "lying.zip")
    try:
        import_path(archive, tmp_path / "dest")
    except ImportRefused:
        assert not any((tmp_path / "dest").rglob("*.wav")), "nothing half-imported"
        return
    except zipfile.BadZipFile as exc:
        pytest.xfail(f"dataflux_ui.importer lets zipfile.BadZipFile escape ({exc}) and leaves a partial file; "
                     "the fix is proposed in docs/reliability.md")
    pytest.fail("a zip entry inflating past its declared size was imported")


# --- safe rendering (browser) --------------------------------------------------------------------------------------
PAYLOAD = ('<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
           '<svg onload="window.__pwned=3"></svg><iframe src="javascript:window.__pwned=4"></iframe>'
           "**bold** [click](javascript:window.__pwned=5) $x$ ")


@contextlib.contextmanager
def payload_app(tmp_path: Path) -> Iterator[str]:
    """The app's own Blocks in process, with the model's text output replaced by the payload (routing stays real),
    and the upload cap the proposed ``launch_options`` change sets."""
    from app.common import load_app_model, max_upload_size
    from app.ui import build_demo, launch_options

    loaded = load_app_model("tiny-random")

    def fake_stream(messages: Any, settings: Any = None, engine: Any = None, **overrides: Any) -> Iterator[str]:
        yield from (PAYLOAD[i : i + 20] for i in range(0, len(PAYLOAD), 20))

    loaded.model.stream = fake_stream
    demo = build_demo(loaded)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                **{**launch_options(), "max_file_size": max_upload_size()})
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.mark.skipif(not CHROMIUM.is_file(), reason="Debian chromium is not installed at /usr/bin/chromium")
def test_markup_in_model_output_renders_as_text_in_every_tab(tmp_path: Path, corpus: dict[str, Case],
                                                             monkeypatch) -> None:
    playwright_api = pytest.importorskip("playwright.sync_api")
    monkeypatch.setenv("EUREKA_MAX_UPLOAD_MB", str(UPLOAD_CAP_MB))
    named = tmp_path / '<img src=x onerror="window.__pwned=6">.wav'  # the file name is shown in chat and plots
    shutil.copy(GOOD_CLIP, named)
    medley = tmp_path / "medley.wav"
    import soundfile as sf

    sf.write(medley, tone(12.0, freq=330.0), SR, subtype="PCM_16")  # two 10 s caption windows
    with payload_app(tmp_path) as url, playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        expect = playwright_api.expect
        page.goto(url)
        page.wait_for_selector("#asr-audio", timeout=60_000)

        def upload(component: str, path: Path) -> None:
            page.set_input_files(f"#{component} input[type=file]", str(path))
            page.wait_for_selector(f"#{component} audio[src]", state="attached", timeout=60_000)
            page.wait_for_timeout(300)

        def value(component: str) -> str:
            return page.locator(f"#{component} textarea, #{component} input[type=text]").first.input_value()

        def assert_inert() -> None:
            assert page.evaluate("typeof window.__pwned") == "undefined", "injected script ran"
            injected = page.locator("img[src='x'], svg[onload], iframe[src^='javascript'], a[href^='javascript']")
            assert injected.count() == 0, "injected elements reached the DOM"

        # ASR: transcript, chunk list and stats are text boxes
        upload("asr-audio", named)
        page.click("#asr-run")
        expect(page.locator("#asr-stats textarea, #asr-stats input").first).to_have_value(re.compile("tokens/s"),
                                                                                          timeout=60_000)
        assert '<img src=x onerror="window.__pwned=1">' in value("asr-transcript")
        assert_inert()
        # Q&A: the Chatbot shows the question, the clip's file name and the answer as text
        page.get_by_role("tab", name="Audio Q&A").click()
        upload("qa-audio", named)
        page.fill("#qa-question textarea", PAYLOAD + "How many beeps?")
        page.click("#qa-send")
        expect(page.locator("#qa-stats textarea, #qa-stats input").first).to_have_value(
            re.compile("^turn 1 answered"), timeout=60_000)
        bot = page.locator("#qa-chat [data-testid='bot']").first.inner_text()
        user = page.locator("#qa-chat [data-testid='user']").first.inner_text()
        assert "<script>window.__pwned=2</script>" in bot and "<script>window.__pwned=2</script>" in user
        assert "[clip]" in user
        print("chat user turn as shown:", user[:160])
        assert_inert()
        # Caption: whole-clip text, then the windowed timeline (plotly labels)
        page.get_by_role("tab", name="Dense captioning").click()
        upload("cap-audio", medley)
        page.get_by_label("10 s windows (timeline)").check()
        page.click("#cap-run")
        page.wait_for_selector("#cap-timeline .js-plotly-plot", timeout=60_000)
        expect(page.locator("#cap-stats textarea, #cap-stats input").first).to_have_value(re.compile("tokens/s"),
                                                                                          timeout=60_000)
        assert "<svg onload=" in value("cap-caption")
        assert_inert()
        # Routing: the clip's name in the figure titles, summary and download names (clip A is filled with the last
        # clip when the tab opens, so the payload-named clip goes to B)
        page.get_by_role("tab", name="MoE routing").click()
        page.wait_for_selector("#routing-audio-A audio[src]", state="attached", timeout=60_000)
        upload("routing-audio-B", named)
        page.click("#routing-run")
        page.wait_for_selector("#routing-plot-B .js-plotly-plot", timeout=60_000)
        page.wait_for_timeout(500)
        assert_inert()
        # an upload over the cap is refused in the browser with a message, before it is sent
        page.get_by_role("tab", name="Speech recognition").click()
        page.locator("#asr-audio button[aria-label='Clear']").first.click()
        page.set_input_files("#asr-audio input[type=file]", str(corpus["over_upload_cap.wav"].path))
        toast = page.locator(".toast-body").filter(has_text=re.compile("size|exceed", re.I))
        expect(toast.first).to_be_visible(timeout=30_000)
        print("upload refused in the browser:", toast.first.inner_text())
        # control: the same payload inserted as HTML does run, so the checks above can see an injection
        page.evaluate("html => document.body.insertAdjacentHTML('beforeend', html)", PAYLOAD)
        page.wait_for_function("typeof window.__pwned !== 'undefined'", timeout=10_000)
        browser.close()
