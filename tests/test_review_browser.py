"""End to end: the Review tab of the real app (``python app.py``, tiny-random) with reviewers configured, driven by
Debian's Chromium through Playwright.

The database is filled by the real pipeline on 3 synthetic clips (tiny-random captioner, offline generator, rule
judge; the two answerers are scripted — always A / always B — because tiny-random never names an option, so
without them the judge would discard everything and there would be nothing to accept). Covers what only a browser
shows: the login, the keyboard shortcuts, the status and audit log updating, stored markup rendering as text, the
stale-version warning, and the screenshot ``review.png`` (see test_app_browser.SCREENSHOTS); plus an anonymous
HTTP client refused.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from dataflux_helpers import FixedAnswerer
from sqlalchemy import func, select
from test_app_browser import CHROMIUM, CHROMIUM_FLAGS, WAIT_MS, screenshot, serve

from dataflux_ui import review as df_review
from dataflux_ui.auth import Reviewers
from dataflux_ui.models import AuditEntry, Question, Sample
from dataflux_ui.pipeline import Components, PipelineConfig, run_pipeline
from dataflux_ui.store import open_store
from model.data import generate_dataset

playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
expect = playwright_api.expect

PAYLOAD = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'
REVIEWERS = {"alice": "pw1", "bob": "pw2"}


@pytest.fixture(scope="module")
def database(tiny, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The pipeline's output for 3 clips, with markup stored in one caption and in bob's flag comment."""
    root = tmp_path_factory.mktemp("review-data")
    generate_dataset(root / "clips", 3, 0, 0, seed=3, workers=1)
    db = root / "dataflux.sqlite"
    components = Components(PipelineConfig(categories_per_clip=1, caption_tokens=16, answer_tokens=8), model=tiny)
    components.answerers = (FixedAnswerer("A"), FixedAnswerer("B"))
    with open_store(db) as store:
        counts = run_pipeline(store, root / "clips", components=components, progress=False)
        assert counts["questions"] == 15 and counts["kept"] > 2, counts
        with store.session() as session:
            kept = list(session.scalars(select(Sample.id).where(Sample.judge_keep.is_(True)).order_by(Sample.id)))
            # markup goes on the second clip's caption and its first sample's comment (the first clip stays clean
            # for the screenshot)
            payload_id = session.scalar(select(func.min(Sample.id)).join(Question).where(Question.clip_id == 2))
        assert kept[0] == 1, "sample 1 must be judge-kept (seeded data)"
        with store.transaction() as session:
            session.get(Sample, payload_id).question.clip.caption.text = f"{PAYLOAD} caption"
        df_review.flag(store, payload_id, "bob", 1, f"{PAYLOAD} comment", reviewers=Reviewers(REVIEWERS))
    stale_id = next(i for i in kept if 1 < i < payload_id)  # a judge-kept sample of the first clip
    return {"path": db, "payload_id": payload_id, "stale_id": stale_id}


@pytest.fixture(scope="module")
def app_url(database: dict[str, object], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log_path = tmp_path_factory.mktemp("review-app") / "app.log"
    env = {"EUREKA_MODEL": "tiny-random", "DATAFLUX_DB": str(database["path"]),
           "DATAFLUX_REVIEWERS": ",".join(f"{name}:{pw}" for name, pw in REVIEWERS.items()),
           "DATAFLUX_UPLOADS": str(log_path.parent / "uploads")}
    with serve(env, log_path) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with playwright_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture()
def page(browser, app_url: str) -> Iterator[object]:
    """A fresh browser session signed in as alice, on the Review tab."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    tab = context.new_page()
    tab.goto(app_url)
    tab.locator("input[type=text]").fill("alice")
    tab.locator("input[type=password]").fill(REVIEWERS["alice"])
    tab.get_by_role("button", name="Login").click()
    tab.wait_for_selector("#asr-audio", timeout=WAIT_MS)
    tab.get_by_role("tab", name="Review (DataFlux)").click()
    expect(tab.locator("#review-note")).to_contain_text("Signed in as reviewer alice", timeout=WAIT_MS)
    yield tab
    context.close()


def header(page):
    return page.locator("#review-header textarea")


def row(page, table: str, index: int):
    """Row ``index`` (0-based) of a Dataframe; Gradio 6 renders data rows as virtual ``role=row`` elements."""
    return page.locator(f"#review-{table} .virtual-row[data-index='{index}']")


def audit_count(db: Path, **where: object) -> int:
    with open_store(db) as store, store.session() as session:
        query = select(func.count()).select_from(AuditEntry)
        for name, value in where.items():
            query = query.where(getattr(AuditEntry, name) == value)
        return int(session.scalar(query))


@pytest.mark.screenshot
def test_accept_with_the_keyboard_updates_status_and_audit(page, database) -> None:
    expect(header(page)).to_have_value(re.compile(r"^Sample 1 · status pending · version 1 · judge KEEP"),
                                       timeout=WAIT_MS)
    page.wait_for_selector("#review-spectrogram .js-plotly-plot", timeout=WAIT_MS)
    page.wait_for_selector("#review-audio audio[src], #review-audio [data-testid='waveform-controls']",
                           state="attached", timeout=WAIT_MS)
    # shortcuts are off while typing: an "a" typed into the comment stays text and accepts nothing
    page.locator("#review-comment textarea").click()
    page.keyboard.type("a")
    page.wait_for_timeout(800)
    expect(header(page)).to_have_value(re.compile("status pending"))
    page.locator("#review-comment textarea").fill("")
    page.locator("#review-note").click()  # focus leaves the text field
    page.keyboard.press("f")  # a flag needs a reason: with an empty comment, f only moves to the comment field
    assert page.evaluate("document.activeElement.closest('#review-comment') !== null")
    page.locator("#review-note").click()
    page.keyboard.press("a")
    expect(header(page)).to_have_value(re.compile(r"^Sample 1 · status accepted · version 2"), timeout=WAIT_MS)
    expect(page.locator("#review-message textarea")).to_have_value("Sample 1 accepted by alice (version 1 → 2).")
    first_row = row(page, "audit", 0)
    expect(first_row).to_contain_text("alice", timeout=WAIT_MS)
    expect(first_row).to_contain_text("review_accept")
    expect(row(page, "queue", 0)).to_contain_text("accepted")
    assert audit_count(database["path"], actor="alice", action="review_accept", entity_id=1) == 1
    page.get_by_text("Model A reasoning").click()
    expect(page.locator("#review-reasoning-a textarea")).to_have_value(re.compile(r"^<THINK>"), timeout=WAIT_MS)
    page.wait_for_timeout(500)
    screenshot(page, "review")
    # j / k walk the queue
    page.keyboard.press("j")
    expect(header(page)).to_have_value(re.compile(r"^Sample 2 · "), timeout=WAIT_MS)
    page.keyboard.press("k")
    expect(header(page)).to_have_value(re.compile(r"^Sample 1 · status accepted"), timeout=WAIT_MS)
    # on another tab the keys do nothing; coming back keeps the reviewer's place
    page.get_by_role("tab", name="Speech recognition").click()
    page.keyboard.press("r")
    page.wait_for_timeout(800)
    page.get_by_role("tab", name="Review (DataFlux)").click()
    page.wait_for_timeout(1500)
    expect(header(page)).to_have_value(re.compile(r"^Sample 1 · status accepted · version 2"), timeout=WAIT_MS)
    assert audit_count(database["path"], action="review_reject", entity_id=1) == 0


def test_stored_markup_renders_as_text(page, database) -> None:
    payload_id = database["payload_id"]
    page.locator("#review-search input, #review-search textarea").first.fill("onerror")
    page.keyboard.press("Enter")  # the text search finds the caption; its clip's first sample opens
    expect(page.locator("#review-page-info input, #review-page-info textarea").first).to_have_value(
        "page 1 of 1 · 5 samples", timeout=WAIT_MS)
    expect(header(page)).to_have_value(re.compile(rf"^Sample {payload_id} · status flagged"), timeout=WAIT_MS)
    expect(page.locator("#review-caption textarea")).to_have_value(f"{PAYLOAD} caption")
    audit_row = row(page, "audit", 0)
    expect(audit_row).to_contain_text(f"{PAYLOAD} comment", timeout=WAIT_MS)  # the characters, shown as text
    expect(audit_row).to_contain_text("bob")
    page.wait_for_timeout(500)
    areas = ", ".join(f"#review-{name} {tag}" for name in ("caption", "audit", "queue", "question", "header")
                      for tag in ("img", "script"))
    assert page.locator(areas).count() == 0, "stored markup created elements"
    assert page.evaluate("window.__xss") is None, "stored markup ran a script"


def test_a_stale_decision_is_refused_with_a_warning(page, database) -> None:
    stale_id = database["stale_id"]
    row(page, "queue", stale_id - 1).locator("[role=gridcell]").nth(1).click()
    expect(header(page)).to_have_value(re.compile(rf"^Sample {stale_id} · status pending · version 1"),
                                       timeout=WAIT_MS)
    with open_store(database["path"]) as store:  # bob decides first, in another session
        df_review.reject(store, stale_id, "bob", 1, "wrong key", reviewers=Reviewers(REVIEWERS))
    page.locator("#review-note").click()
    page.keyboard.press("a")
    toast = page.locator(".toast-body").filter(has_text=f"sample {stale_id} was changed by bob (reject)")
    expect(toast.first).to_be_visible(timeout=WAIT_MS)
    expect(header(page)).to_have_value(re.compile(rf"^Sample {stale_id} · status rejected · version 2"),
                                       timeout=WAIT_MS)
    expect(page.locator("#review-message textarea")).to_have_value(re.compile(r"^Not saved: .*nothing was saved"))
    assert audit_count(database["path"], actor="alice", entity_id=stale_id) == 0


def test_anonymous_clients_are_refused(app_url: str, database) -> None:
    from gradio_client import Client
    from gradio_client.exceptions import AuthenticationError

    before = audit_count(database["path"])
    with pytest.raises(AuthenticationError):
        Client(app_url, verbose=False)
    for fn_index in range(0, 60, 7):  # whatever the event, the queue refuses a caller without a login
        response = httpx.post(f"{app_url}gradio_api/queue/join", json={
            "data": [None, None, None, ""], "fn_index": fn_index, "session_hash": "anonymous", "event_data": None})
        assert response.status_code == 401 and "Not authenticated" in response.text
    signed_in = Client(app_url, auth=("bob", REVIEWERS["bob"]), verbose=False)
    named = set(signed_in.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert named == {"/asr", "/qa", "/caption", "/routing"}, "review writes are not part of the public API"
    assert audit_count(database["path"]) == before
