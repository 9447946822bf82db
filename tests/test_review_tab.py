"""The Review tab's plain functions and callbacks, without a browser: queue filters and paging, versioned actions
(a stale version is refused, never overwritten), bulk accept, statistics, text-only rendering, starting a run from
an uploaded zip, refusing a zip-slip upload, and the server-side reviewer check in every write callback — called
directly and through the HTTP queue API of a running app with no login.
"""

from __future__ import annotations

import json
import socket
import uuid
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr
import httpx
import pytest
from dataflux_helpers import make_sample
from sqlalchemy import func, select

from app import review
from app.common import LoadedModel, ModelChoice
from dataflux_ui import review as df_review
from dataflux_ui.auth import Reviewers
from dataflux_ui.models import AuditEntry, Caption, Sample
from dataflux_ui.pipeline import PipelineConfig
from model.data import generate_dataset

REVIEWERS = Reviewers({"alice": "pw1", "bob": "pw2"})
PAYLOAD = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'


def as_user(name: str | None) -> Any:
    """What Gradio passes as ``gr.Request`` as far as the callbacks care: the logged-in name."""
    return SimpleNamespace(username=name)


@pytest.fixture()
def config(tmp_path: Path):
    """A review config over a fresh SQLite store with 30 samples: 3 categories × (keep A, keep B, discard,
    keep A agreed, discard agreed) × 2."""
    cfg = review.ReviewConfig(db_url=str(tmp_path / "review.sqlite"), reviewers=REVIEWERS,
                              uploads_dir=tmp_path / "uploads", max_upload_bytes=5 * 1024**2, max_upload_files=10)
    store = cfg.store()
    shapes = [("A", "A", "B", True), ("B", "A", "B", True), ("C", "A", "B", False), ("A", "A", "A", True),
              ("C", "B", "B", False)]
    with store.transaction() as session:
        for tag in ("x", "y", "z"):
            for _ in range(2):
                for key, a, b, keep in shapes:
                    make_sample(session, tag, key=key, a=a, b=b, keep=keep)
    yield cfg
    cfg.close()


def loaded_version(cfg: review.ReviewConfig, sample_id: int) -> dict[str, int]:
    """What the tab keeps in its gr.State after showing a sample."""
    panel = review.sample_panel(cfg.store(), sample_id)
    return {"id": panel.id, "version": panel.version}


# --- queue ----------------------------------------------------------------------------------------------------------
def test_filters_map_dropdowns_and_paging_clamps(config) -> None:
    store = config.store()
    assert review.make_filter() == df_review.SampleFilter()
    flt = review.make_filter("pending", "any", "keep", "STRONG_MATCH", "disagree", "  female  ")
    assert (flt.status, flt.category, flt.judge, flt.agreement, flt.text) == ("pending", None, "keep", False, "female")
    table, state, info = review.load_queue(store, review.make_filter(), 1, page_size=12)
    assert list(table.columns) == review.QUEUE_HEADERS and len(table) == 12
    assert info == "page 1 of 3 · 30 samples" and state["ids"] == list(range(1, 13))
    _, state, info = review.load_queue(store, review.make_filter(), 99, page_size=12)  # past the end: last page
    assert info == "page 3 of 3 · 30 samples" and state["ids"] == list(range(25, 31))
    kept_disagreeing = review.load_queue(store, review.make_filter(judge="keep", agreement="disagree"))[1]["ids"]
    assert len(kept_disagreeing) == 12  # keep A and keep B, where A and B chose differently, 2 × 3 categories
    paths = review.category_choices(store)
    assert paths[0] == "any" and len(paths) == 4
    only_y = review.load_queue(store, review.make_filter(category=paths[2], judge="MODEL_A"))
    assert only_y[2] == "page 1 of 1 · 6 samples" and set(only_y[0]["judge"]) == {"KEEP A"}
    assert set(only_y[0]["category"]) == {"Gender y"}
    assert review.load_queue(store, review.make_filter(category=paths[2], judge="discard"))[2].endswith("4 samples")
    assert review.load_queue(store, review.make_filter(text="female voice z"))[2].endswith("10 samples")
    with pytest.raises(gr.Error, match="Bad filter"):
        review.load_queue(store, review.make_filter(status="approved"))


def test_next_and_previous_walk_across_pages(config) -> None:
    store = config.store()
    _, state, _ = review.load_queue(store, review.make_filter(status="pending"), 1, page_size=4)
    assert review.neighbour(store, state, 2, 1, page_size=4)[0] == 3
    target, table, new_state, info = review.neighbour(store, state, 4, 1, page_size=4)
    assert (target, new_state["page"], info) == (5, 2, "page 2 of 8 · 30 samples") and len(table) == 4
    target, _, back_state, _ = review.neighbour(store, new_state, 5, -1, page_size=4)
    assert (target, back_state["page"]) == (4, 1)
    assert review.neighbour(store, state, 1, -1, page_size=4)[0] is None  # the first sample has no previous one
    assert review.neighbour(store, state, None, 1, page_size=4)[0] == 1  # nothing open yet: j opens the first


# --- actions --------------------------------------------------------------------------------------------------------
def test_actions_are_versioned_and_audited_with_the_reviewer(config) -> None:
    alice_saw, bob_saw = loaded_version(config, 1), loaded_version(config, 1)
    assert review.perform(config, "alice", alice_saw, "accept") == "Sample 1 accepted by alice (version 1 → 2)."
    with pytest.raises(df_review.ConflictError, match=r"changed by alice \(accept\).*version 1.*version 2"):
        review.perform(config, "bob", bob_saw, "reject")  # bob still holds version 1: refused, not overwritten
    assert review.sample_panel(config.store(), 1).status == "accepted"
    message = review.perform(config, "bob", loaded_version(config, 1), "edit", answer="B. Male", comment="it's male")
    assert message.endswith("(version 2 → 3).")
    panel = review.sample_panel(config.store(), 1)
    assert (panel.status, panel.target, panel.version) == ("edited", "B. Male", 3)
    with pytest.raises(gr.Error, match="needs a comment"):
        review.perform(config, "alice", loaded_version(config, 2), "flag", comment="  ")
    review.perform(config, "alice", loaded_version(config, 2), "flag", comment="two voices?")
    with pytest.raises(gr.Error, match="Pick the right answer"):
        review.perform(config, "alice", loaded_version(config, 3), "edit", answer="")
    with pytest.raises(gr.Error, match="no answer to accept"):
        review.perform(config, "alice", loaded_version(config, 3), "accept")  # the judge discarded sample 3
    with pytest.raises(gr.Error, match="No sample is loaded"):
        review.perform(config, "alice", None, "reject")
    audit_rows = review.sample_audit(config.store(), 1)
    assert list(audit_rows["who"]) == ["bob", "alice"] and list(audit_rows["action"]) == ["review_edit",
                                                                                          "review_accept"]
    assert audit_rows["comment / answer"][0] == "B. Male · it's male" and audit_rows["versions"][0] == "2 → 3"


@pytest.mark.parametrize("name", [None, "", "mallory"])
def test_writes_need_a_configured_reviewer(config, name: str | None) -> None:
    with pytest.raises(gr.Error, match="signed-in reviewer"):
        review.perform(config, name, loaded_version(config, 1), "accept")
    with pytest.raises(gr.Error, match="signed-in reviewer"):
        review.bulk_accept(config, name, review.make_filter())
    read_only = review.ReviewConfig(db_url=config.db_url, reviewers=Reviewers())
    with pytest.raises(gr.Error, match="Read-only: no reviewers are configured"):
        review.perform(read_only, "alice", loaded_version(config, 1), "accept")
    assert "Read-only" in review.access_note(read_only, None) and review.auth_options(read_only) == {}
    assert review.auth_options(config)["auth"]("alice", "pw1") and not review.auth_options(config)["auth"]("alice",
                                                                                                        "pw2")
    assert review.sample_panel(config.store(), 1).status == "pending"


def test_bulk_accept_takes_only_pending_judge_kept_samples_in_the_filter(config) -> None:
    store = config.store()
    first_category = review.category_choices(store)[1]
    review.perform(config, "bob", loaded_version(config, 1), "reject")  # decided: bulk accept leaves it alone
    message = review.bulk_accept(config, "alice", review.make_filter(category=first_category))
    # the category has 6 judge-kept samples, one of them already rejected
    assert message == "Bulk accept by alice: 5 pending judge-KEEP samples accepted."
    statuses = review.load_queue(store, review.make_filter(category=first_category))[0]["status"]
    assert sorted(statuses) == ["accepted"] * 5 + ["pending"] * 4 + ["rejected"]
    with store.session() as session:
        actors = session.execute(select(AuditEntry.actor, func.count()).where(AuditEntry.action == "review_accept")
                                 .group_by(AuditEntry.actor)).all()
    assert actors == [("alice", 5)]


def test_stats_tables_show_retention_kappa_and_answerer_accuracy(config) -> None:
    retention, summary, accuracy = review.stats_tables(config.store())
    assert "not defined" in summary and accuracy.empty
    assert list(retention["retention"]) == ["60.0 %"] * 3 and list(retention["samples"]) == [10] * 3
    for sample_id in (1, 2, 4):  # judge kept, human keeps
        review.perform(config, "alice", loaded_version(config, sample_id), "accept")
    review.perform(config, "alice", loaded_version(config, 3), "reject")  # judge discarded, human discards
    review.perform(config, "alice", loaded_version(config, 6), "reject")  # judge kept, human discards
    retention, summary, accuracy = review.stats_tables(config.store())
    assert "5 reviewed samples" in summary and "agreement 100.0 %" not in summary
    assert "Cohen's kappa 0.545" in summary  # observed 4/5, expected 0.56: (0.8 - 0.56) / 0.44
    by_name = {row["answerer"]: row for _, row in accuracy.iterrows()}
    # accepted targets are all "A. Female": Model A chose A on 1, 2, 4; Model B chose B, B, A
    assert by_name["m:greedy"]["accuracy"] == "100.0 %" and by_name["m:sampled"]["accuracy"] == "33.3 %"
    assert list(retention.loc[0, ["accepted", "rejected"]]) == [3, 2]


def test_database_text_stays_text(config) -> None:
    store = config.store()
    with store.transaction() as session:
        session.get(Sample, 1).question.clip.caption.text = PAYLOAD
    review.perform(config, "alice", loaded_version(config, 1), "flag", comment=PAYLOAD)
    panel = review.sample_panel(store, 1)
    assert panel.caption == PAYLOAD  # verbatim, for a Textbox (which shows text, never markup)
    assert review.sample_audit(store, 1)["comment / answer"][0] == PAYLOAD
    odd = review.ReviewConfig(db_url=config.db_url, reviewers=Reviewers({"al`<b>": "pw"}))
    assert review.access_note(odd, "al`<b>") == ("Signed in as reviewer **`al'<b>`**: every decision is logged under "
                                                 "this name.")  # a code span: Markdown shows it literally


def test_missing_clip_file_is_a_note_not_a_failure(config) -> None:
    sound, figure, note = review.clip_audio("/nowhere/gone.wav")
    assert sound is None and figure is None and "audio unavailable" in note and "/nowhere" not in note


# --- the registered callbacks ---------------------------------------------------------------------------------------
def build(tiny, cfg: review.ReviewConfig) -> gr.Blocks:
    from app.ui import build_demo

    loaded = LoadedModel(tiny, ModelChoice("tiny-random", "tiny-random"), tiny.describe())
    return build_demo(loaded, review_config=cfg)


def callback(demo: gr.Blocks, name: str):
    found = [f for f in demo.fns.values() if getattr(f.fn, "__name__", "") == name]
    assert len(found) == 1, name
    return found[0]


def test_every_write_callback_checks_the_user_server_side(tiny, config) -> None:
    demo = build(tiny, config)
    writes = {name: callback(demo, name) for name in ("review_accept", "review_reject", "review_edit", "review_flag",
                                                      "bulk_action", "start")}
    assert all(f.api_visibility == "private" for f in writes.values())
    queue_state = review.load_queue(config.store(), review.make_filter())[1]
    for who in (None, "mallory"):
        for action in ("accept", "reject", "edit", "flag"):
            with pytest.raises(gr.Error, match="signed-in reviewer"):
                writes[f"review_{action}"].fn(loaded_version(config, 1), queue_state, "B", "why", as_user(who))
        with pytest.raises(gr.Error, match="signed-in reviewer"):
            writes["bulk_action"].fn(queue_state, None, as_user(who))
        with pytest.raises(gr.Error, match="signed-in reviewer"):
            writes["start"].fn([], "reference", 1, 16, as_user(who))
    assert review.sample_panel(config.store(), 1).version == 1
    # a reviewer's click goes through, and a stale one comes back as a warning with the sample reloaded
    seen = loaded_version(config, 1)
    outputs = writes["review_accept"].fn(seen, queue_state, None, "", as_user("alice"))
    assert outputs[0] == "Sample 1 accepted by alice (version 1 → 2)." and outputs[5] == {"id": 1, "version": 2}
    with pytest.warns(UserWarning, match="changed by alice"):  # gr.Warning outside a request falls back to warnings
        stale = writes["review_reject"].fn(seen, queue_state, None, "", as_user("bob"))
    assert stale[0].startswith("Not saved: sample 1 was changed by alice (accept)") and stale[5]["version"] == 2
    assert review.sample_panel(config.store(), 1).status == "accepted"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def raw_call(base: str, demo: gr.Blocks, fn: Any, data: list[Any], session_hash: str) -> dict[str, Any]:
    """One event through Gradio's HTTP queue API, as any script could send it (no client-side API filtering)."""
    fn_index = next(index for index, value in demo.fns.items() if value is fn)
    with httpx.Client(base_url=base, timeout=60) as http:
        joined = http.post("gradio_api/queue/join", json={"data": data, "fn_index": fn_index, "event_data": None,
                                                         "session_hash": session_hash, "trigger_id": None})
        assert joined.status_code == 200, joined.text
        with http.stream("GET", "gradio_api/queue/data", params={"session_hash": session_hash}) as stream:
            for line in stream.iter_lines():
                if line.startswith("data:"):
                    message = json.loads(line[5:])
                    if message.get("msg") == "process_completed":
                        return message
    raise AssertionError("the queue never completed the event")


def test_anonymous_http_writes_are_refused_even_without_a_login_page(tiny, config) -> None:
    """Reviewers configured but the app launched without Gradio auth (a misconfigured deployment): an anonymous
    script that loads a sample into its session and then posts the accept event gets a refusal, and nothing is
    written. The check in the callback, not the login page or the hidden API, is what protects the data."""
    demo = build(tiny, config)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        base, session = f"http://127.0.0.1:{port}/", uuid.uuid4().hex
        opened = raw_call(base, demo, callback(demo, "open_tab"), ["any"] * 5 + ["", None, None], session)
        assert opened["success"], opened  # reading is open to everyone
        refused = raw_call(base, demo, callback(demo, "review_accept"), [None, None, None, ""], session)
        assert not refused["success"] and "signed-in reviewer" in json.dumps(refused)
        refused = raw_call(base, demo, callback(demo, "bulk_action"), [None, None], session)
        assert not refused["success"] and "signed-in reviewer" in json.dumps(refused)
    finally:
        demo.close()
    with config.store().session() as db:
        assert db.scalar(select(func.count()).select_from(AuditEntry)) == 0
        assert set(db.scalars(select(Sample.status))) == {"pending"}


# --- runs from uploads ----------------------------------------------------------------------------------------------
def test_start_a_run_from_an_uploaded_zip(tiny, config, tmp_path: Path) -> None:
    generate_dataset(tmp_path / "synth", 2, 0, 0, seed=21, workers=1)
    archive = tmp_path / "clips.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for wav in sorted((tmp_path / "synth" / "audio" / "train").glob("*.wav")):
            zf.write(wav, f"batch/{wav.name}")
        zf.writestr("notes.txt", "not audio: skipped")
    calls: list[tuple[Any, str]] = []
    settings = PipelineConfig(model="tiny-random", categories_per_clip=1, caption_tokens=16, answer_tokens=8)
    counts = review.run_upload(config, "alice", tiny, [str(archive)], settings,
                               lambda value, desc="", **_: calls.append((value, desc)))
    assert counts["clips"] == counts["complete_clips"] == 2 and counts["failed_clips"] == 0
    assert counts["questions"] == counts["kept"] + counts["discarded"] >= 10
    assert [desc[:11] for _, desc in calls] == ["importing t", "clip 1 of 2", "clip 2 of 2"]
    assert [value for value, _ in calls] == [0.0, (0, 2), (1, 2)]
    assert sorted(p.name for p in Path(counts["audio_dir"]).rglob("*")) == ["batch", "clips", "train-000000.wav",
                                                                              "train-000001.wav"]
    assert review.run_summary(counts).startswith(f"Run {counts['run_id']} finished")
    table, _, info = review.load_queue(config.store(), review.make_filter(), 1, page_size=100)
    assert info.endswith(f"{30 + counts['questions']} samples")
    with config.store().session() as db:
        requested = db.scalars(select(AuditEntry).where(AuditEntry.action == "run_requested")).one()
        assert (requested.actor, requested.entity_id, requested.detail["files"]) == ("alice", counts["run_id"], 2)
        assert db.scalar(select(func.count()).select_from(Caption)) == 30 + 2


def test_uploads_with_traversal_or_over_the_limits_are_refused(config, tmp_path: Path) -> None:
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("good.wav", b"RIFF....")
        zf.writestr("../escaped.wav", b"RIFF....")
    settings = PipelineConfig(categories_per_clip=1)
    with pytest.raises(gr.Error, match=r"Import refused, nothing was imported: refused '\.\./escaped\.wav': path "
                                       r"traversal"):
        review.run_upload(config, "alice", None, [str(evil)], settings)
    assert not (tmp_path / "escaped.wav").exists() and not (config.uploads_dir.exists()
                                                           and any(config.uploads_dir.iterdir()))
    text_file = tmp_path / "readme.txt"
    text_file.write_text("hello")
    with pytest.raises(gr.Error, match=r"Not audio or \.zip: readme\.txt"):
        review.import_upload([str(text_file)], tmp_path / "dest1", 1024, 10)
    big = tmp_path / "big.wav"
    big.write_bytes(b"\0" * 4096)
    with pytest.raises(gr.Error, match=r"The upload is 0\.0 MB; the limit is 0\.0 MB per run"):
        review.import_upload([str(big)], tmp_path / "dest2", 1024, 10)
    with pytest.raises(gr.Error, match="2 audio files; the limit is 1 per run"):
        review.import_upload([str(big), str(big)], tmp_path / "dest3", 10**6, 1)
    with pytest.raises(gr.Error, match="Upload audio files"):
        review.import_upload([], tmp_path / "dest4", 10**6, 1)
    with pytest.raises(gr.Error, match="signed-in reviewer"):
        review.run_upload(config, None, None, [str(big)], settings)
    assert not any((tmp_path / f"dest{i}").exists() for i in range(1, 5))


def test_an_unreachable_database_is_a_clear_error_not_a_crash(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = review.ReviewConfig(db_url=str(blocker / "sub" / "db.sqlite"))
    with pytest.raises(gr.Error, match="Could not open the DataFlux database"):
        cfg.store()


def test_config_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DATAFLUX_DB", str(tmp_path / "env.sqlite"))
    monkeypatch.setenv("DATAFLUX_REVIEWERS", "carol:pw")
    monkeypatch.setenv("DATAFLUX_UPLOAD_MAX_MB", "3")
    cfg = review.ReviewConfig.from_env()
    assert cfg.db_url == str(tmp_path / "env.sqlite") and cfg.reviewers.users == {"carol": "pw"}
    assert cfg.max_upload_bytes == 3 * 1024**2 and not cfg.read_only
    assert review.ReviewConfig.from_env("other.sqlite").db_url == "other.sqlite"
    monkeypatch.delenv("DATAFLUX_REVIEWERS")
    monkeypatch.delenv("DATAFLUX_DB")
    cfg = review.ReviewConfig.from_env()
    assert cfg.read_only and cfg.db_url == review.DEFAULT_DB and cfg._store is None  # opened on first use only
