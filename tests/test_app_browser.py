"""End to end: the real app (``python app.py``, on tiny-random: see ``MODEL``) driven by Debian's Chromium
through Playwright.

Covers what only a browser shows: uploads and a microphone recording reaching the model, streamed text appearing,
the chat rendering markup as text, plotly figures rendering, error toasts, and screenshots of every tab (written
to ``docs/screenshots/`` for the README by ``make screenshots``, to a temporary folder otherwise). Two
``gradio_client`` sessions check that per-call settings stay separate.

Needs ``/usr/bin/chromium`` (Debian ``chromium``; no ``playwright install``). The app starts once per module.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.is_file():
    pytest.skip("Debian chromium is not installed at /usr/bin/chromium (apt-get install chromium)",
                allow_module_level=True)
playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
expect = playwright_api.expect

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "assets" / "examples"
# The README's screenshots are refreshed only on request (`make screenshots`), so a test run leaves the tree clean.
SCREENSHOTS = (ROOT / "docs" / "screenshots" if os.environ.get("UPDATE_SCREENSHOTS") == "1"
               else Path(tempfile.gettempdir()) / "eureka-studio-screenshots")
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
WAIT_MS = 60_000
# The app's model: tiny-random (fast, built in memory) for the test suite; ``make screenshots`` sets Eureka-mini, so
# the README's pictures show real answers — only the tests marked ``screenshot`` run then (the others check
# what tiny-random's random text does, e.g. that every chunk of a noise recording produces some).
MODEL = os.environ.get("EUREKA_BROWSER_MODEL", "tiny-random")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve(env_overrides: dict[str, str], log_path: Path, drop: tuple[str, ...] = ()) -> Iterator[str]:
    """Run ``python app.py`` on a free port until the block ends; stopped through its own process handle."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(ROOT),
           **env_overrides}
    for name in drop:
        env.pop(name, None)
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--host", "127.0.0.1"],
                                   cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"app.py exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"app.py did not answer within 120 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def app_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The app on ``MODEL`` (tiny-random unless ``$EUREKA_BROWSER_MODEL`` says otherwise), shared by the module's
    tests."""
    log_path = tmp_path_factory.mktemp("app") / "app.log"
    with serve({"EUREKA_MODEL": MODEL, "EUREKA_CONCURRENCY": "1"}, log_path) as url:
        yield url


@pytest.fixture(scope="module")
def fake_microphone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The speech example at 48 kHz, the rate Chromium's fake capture device runs at."""
    samples, rate = sf.read(EXAMPLES / "speech_fox.wav", dtype="float32")
    path = tmp_path_factory.mktemp("mic") / "microphone.wav"
    sf.write(path, soxr.resample(samples, rate, 48000), 48000, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def browser(fake_microphone: Path) -> Iterator[object]:
    with playwright_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=CHROMIUM_FLAGS + ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                                   f"--use-file-for-fake-audio-capture={fake_microphone}"],
        )
        yield chromium
        chromium.close()


@pytest.fixture()
def page(browser, app_url: str) -> Iterator[object]:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, permissions=["microphone"])
    tab = context.new_page()
    tab.goto(app_url)
    tab.wait_for_selector("#asr-audio", timeout=WAIT_MS)
    yield tab
    context.close()


def upload(page, component_id: str, path: Path) -> None:
    """Put a file into a gr.Audio and wait until the component holds it (its player gets a source)."""
    page.set_input_files(f"#{component_id} input[type=file]", str(path))
    page.wait_for_selector(f"#{component_id} audio[src]", state="attached", timeout=WAIT_MS)
    page.wait_for_timeout(300)  # let the upload's change event reach the server


def field(page, component_id: str):
    return page.locator(f"#{component_id} textarea, #{component_id} input[type=text]").first


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()
    page.wait_for_timeout(300)


def screenshot(page, name: str, full_page: bool = True) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=full_page)


@pytest.mark.screenshot
def test_asr_upload_streams_a_transcript(page) -> None:
    upload(page, "asr-audio", EXAMPLES / "speech_fox.wav")
    page.click("#asr-run")
    expect(field(page, "asr-stats")).to_have_value(re.compile(r"tokens/s"), timeout=WAIT_MS)
    assert field(page, "asr-transcript").input_value().strip(), "a transcript appears"
    assert field(page, "asr-chunks").input_value().startswith("[0:00.0–0:05.2]")
    assert "1 chunk" in field(page, "asr-stats").input_value()
    screenshot(page, "asr")


def test_asr_microphone_recording(page) -> None:
    page.click("#asr-audio button[aria-label='Record audio']")
    page.click("#asr-audio button.record-button")
    page.wait_for_timeout(2500)
    page.click("#asr-audio button.stop-button")
    page.wait_for_selector("#asr-audio audio[src]", state="attached", timeout=WAIT_MS)
    page.wait_for_timeout(300)
    page.click("#asr-run")
    stats = field(page, "asr-stats")
    expect(stats).to_have_value(re.compile(r"tokens/s"), timeout=WAIT_MS)
    recorded_s = float(re.search(r"audio ([\d.]+) s", stats.input_value()).group(1))
    assert 1.0 < recorded_s < 10.0, "the fake microphone's speech reached the model (silence would be refused)"
    assert field(page, "asr-transcript").input_value().strip()


def test_asr_stop_cancels_a_long_transcription(page, tmp_path: Path) -> None:
    """Five minutes of audio is ten chunks; Stop after the first text must freeze the output and free the model."""
    long_clip = tmp_path / "five_minutes.wav"
    sf.write(long_clip, np.tile(sf.read(EXAMPLES / "noisy_street.wav", dtype="float32")[0], 58)[: 300 * 16000],
             16000, subtype="PCM_16")
    upload(page, "asr-audio", long_clip)
    page.click("#asr-run")
    chunks = field(page, "asr-chunks")
    expect(chunks).to_have_value(re.compile(r"^\[0:00\.0–0:30\.0\] \S"), timeout=WAIT_MS)
    page.click("#asr-stop")
    page.wait_for_timeout(1500)
    frozen = chunks.input_value()
    page.wait_for_timeout(1500)
    assert chunks.input_value() == frozen, "output kept changing after Stop"
    assert "tokens/s" not in field(page, "asr-stats").input_value(), "the run finished instead of stopping"
    assert frozen.count("\n") == 9, "all ten chunk ranges are listed"
    # the model slot is free again: a short clip is transcribed straight away
    page.locator("#asr-audio button[aria-label='Clear']").first.click()
    upload(page, "asr-audio", EXAMPLES / "speech_fox.wav")
    page.click("#asr-run")
    expect(field(page, "asr-stats")).to_have_value(re.compile(r"audio 5\.2 s .*tokens/s"), timeout=WAIT_MS)


@pytest.mark.screenshot
def test_qa_answers_and_renders_markup_as_text(page) -> None:
    open_tab(page, "Audio Q&A")
    upload(page, "qa-audio", EXAMPLES / "beeps_three.wav")
    payload = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script> How many beeps?'
    page.fill("#qa-question textarea", payload)
    page.click("#qa-send")
    bot = page.locator("#qa-chat [data-testid='bot']")
    expect(field(page, "qa-stats")).to_have_value(re.compile(r"^turn 1 answered.*tokens/s"), timeout=WAIT_MS)
    expect(bot).to_have_count(1)
    user_text = page.locator("#qa-chat [data-testid='user']").first.inner_text()
    assert '<img src=x onerror="window.__xss=1">' in user_text and "<script>" in user_text, "markup shown as text"
    assert page.locator("#qa-chat img, #qa-chat script").count() == 0
    assert page.evaluate("window.__xss") is None
    # a follow-up turn about the same clip
    page.fill("#qa-question textarea", "Are they high or low?")
    page.click("#qa-send")
    expect(field(page, "qa-stats")).to_have_value(re.compile(r"^turn 2 answered.*tokens/s"), timeout=WAIT_MS)
    expect(bot).to_have_count(2)
    assert bot.nth(1).inner_text().strip(), "an answer appears"
    # a multiple-choice turn, answered (by default) with the option the model finds likeliest
    page.locator("#qa-mode label", has_text="Multiple choice").click()
    page.fill("#qa-question textarea", "How many beeps are there?")
    page.locator("#qa-option-a textarea, #qa-option-a input").fill("Two")
    page.locator("#qa-option-b textarea, #qa-option-b input").fill("Three")
    expect(page.locator("#qa-score-options input")).to_be_checked()
    page.click("#qa-send")
    expect(field(page, "qa-stats")).to_have_value(re.compile(r"^turn 3 answered by scoring 2 options"),
                                                  timeout=WAIT_MS)
    expect(bot).to_have_count(3)
    assert bot.nth(2).inner_text().strip() in ("A. Two", "B. Three")
    screenshot(page, "qa")


@pytest.mark.screenshot
def test_caption_windows_show_a_timeline(page, tmp_path: Path) -> None:
    scene = np.concatenate([sf.read(EXAMPLES / name, dtype="float32")[0] for name in
                            ("noisy_street.wav", "melody_scale.wav", "beeps_three.wav", "speech_fox.wav",
                             "speech_weather.wav")])
    sf.write(tmp_path / "medley.wav", scene, 16000, subtype="PCM_16")  # 22.2 s: three 10 s windows
    open_tab(page, "Dense captioning")
    upload(page, "cap-audio", tmp_path / "medley.wav")
    page.get_by_label("10 s windows (timeline)").check()
    page.click("#cap-run")
    expect(field(page, "cap-stats")).to_have_value(re.compile(r"tokens/s"), timeout=WAIT_MS)
    page.wait_for_selector("#cap-timeline .js-plotly-plot", timeout=WAIT_MS)
    labels = re.findall(r"^\[\d+:\d\d\.\d–\d+:\d\d\.\d\]", field(page, "cap-caption").input_value(), re.M)
    assert labels == ["[0:00.0–0:10.0]", "[0:10.0–0:20.0]", "[0:20.0–0:22.2]"]
    assert page.locator("#cap-timeline .js-plotly-plot .bars .point").count() == 3
    screenshot(page, "caption")


@pytest.mark.screenshot
def test_routing_tab_renders_plots_for_two_clips(page) -> None:
    upload(page, "asr-audio", EXAMPLES / "speech_fox.wav")  # "the last clip" for the routing tab
    open_tab(page, "MoE routing")
    page.wait_for_selector("#routing-audio-A audio[src]", state="attached", timeout=WAIT_MS)
    upload(page, "routing-audio-B", EXAMPLES / "melody_scale.wav")
    page.click("#routing-run")
    for selector in ("#routing-plot-A", "#routing-plot-B", "#routing-load-A"):
        page.wait_for_selector(f"{selector} .js-plotly-plot", timeout=WAIT_MS)
    assert page.locator("#routing-plot-A .js-plotly-plot .heatmaplayer, #routing-plot-A .js-plotly-plot image") \
        .count() > 0, "the heatmaps were drawn"
    expect(field(page, "routing-summary-A")).to_have_value(re.compile(r"tokens over 5\.2 s"), timeout=WAIT_MS)
    expect(page.locator("#routing-files-A")).to_contain_text(re.compile(r"routing_speech_fox\s*\.csv"), timeout=WAIT_MS)
    page.wait_for_timeout(1000)
    screenshot(page, "routing")


@pytest.mark.screenshot
def test_corrupt_upload_shows_an_error_and_the_app_keeps_serving(page, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_text("RIFF but not really audio " * 40)
    page.set_input_files("#asr-audio input[type=file]", str(corrupt))  # no player source: it is not audio
    page.wait_for_timeout(800)
    page.click("#asr-run")
    toast = page.locator(".toast-body").filter(has_text="Could not decode corrupt.wav")
    expect(toast.first).to_be_visible(timeout=WAIT_MS)
    expect(toast.first).to_have_css("opacity", "1")  # toasts fade in
    screenshot(page, "error", full_page=False)  # toasts are fixed to the viewport
    page.locator("#asr-audio button[aria-label='Clear']").first.click()
    upload(page, "asr-audio", EXAMPLES / "speech_weather.wav")
    page.click("#asr-run")
    expect(field(page, "asr-stats")).to_have_value(re.compile(r"audio 5\.0 s .* tokens/s"), timeout=WAIT_MS)


def test_two_client_sessions_keep_their_own_settings(app_url: str) -> None:
    from gradio_client import Client, handle_file

    clip = handle_file(str(EXAMPLES / "beeps_three.wav"))
    user_a, user_b = Client(app_url, verbose=False), Client(app_url, verbose=False)
    assert {"/asr", "/qa", "/caption", "/routing"} <= set(user_a.view_api(print_info=False,
                                                                       return_format="dict")["named_endpoints"])
    greedy = {"temperature": 0.0, "top_p": 0.8, "top_k": 20, "max_new_tokens": 12, "repetition_penalty": 1.05}
    hot = {"temperature": 1.5, "top_p": 0.95, "top_k": 50, "max_new_tokens": 2, "repetition_penalty": 1.0}
    jobs = [
        user_a.submit(clip, "How many beeps?", *greedy.values(), api_name="/qa"),
        user_b.submit(clip, "How many beeps?", *hot.values(), api_name="/qa"),
        user_a.submit(clip, "How many beeps?", *greedy.values(), api_name="/qa"),
    ]
    a_first, b_answer, a_second = (job.result(timeout=120) for job in jobs)
    assert a_first == a_second, "user B's sampling settings leaked into user A's greedy answer"
    assert len(b_answer.encode()) <= 2 * 4 < len(a_first.encode()), "each session used its own max_new_tokens"
    trace = user_b.predict(clip, api_name="/routing")
    assert trace["summary"]["tokens"] == len(trace["tokens"]) > 0
    assert isinstance(user_a.predict(clip, "", api_name="/asr"), str)


@pytest.mark.screenshot
def test_offline_start_serves_the_fallback_with_a_banner(browser, tmp_path: Path) -> None:
    """No --model, no $EUREKA_MODEL, Hub off, empty cache: the offline default is chosen at once and says so."""
    log_path = tmp_path / "offline.log"
    env = {"HF_HUB_CACHE": str(tmp_path / "empty-cache"), "HF_HOME": str(tmp_path / "hf-home")}
    with serve(env, log_path, drop=("EUREKA_MODEL",)) as url:
        decided = re.search(r"official checkpoint unavailable after ([\d.]+) s", log_path.read_text())
        assert decided and float(decided.group(1)) < 5.0
        context = browser.new_context(viewport={"width": 1280, "height": 700})
        try:
            page = context.new_page()
            page.goto(url)
            banner = page.locator("#offline-banner")
            expect(banner).to_contain_text("Offline mode", timeout=WAIT_MS)
            expect(banner).to_contain_text("HF_HUB_OFFLINE is set")
            page.wait_for_selector("#asr-audio", timeout=WAIT_MS)
            screenshot(page, "offline-banner", full_page=False)
        finally:
            context.close()
