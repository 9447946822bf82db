"""DataFlux pipeline end to end on synthetic clips: steps, idempotent re-run, crash safety, export, PostgreSQL.

The model here is tiny-random (or whatever is passed in): the tests check structure and bookkeeping, never what the
model says, so they pass with the trained mini checkpoint too.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dataflux_helpers import FixedAnswerer, PostgresServer, postgres_bin
from sqlalchemy import func, select

from dataflux_ui import review
from dataflux_ui.auth import Reviewers
from dataflux_ui.core import LETTERS, parse_question
from dataflux_ui.export import export
from dataflux_ui.judge import CONSISTENCY, FINAL_ACTIONS, WINNERS
from dataflux_ui.models import (
    Answer,
    Caption,
    Clip,
    ClipStep,
    Generation,
    Question,
    Run,
    Sample,
    Verdict,
)
from dataflux_ui.pipeline import Components, PipelineConfig, run_pipeline
from dataflux_ui.store import open_store
from model.data import generate_dataset

ROOT = Path(__file__).resolve().parent.parent
DATA_TABLES = (Clip, Caption, Generation, Question, Answer, Verdict, Sample, ClipStep)
FAST = {"categories_per_clip": 1, "caption_tokens": 16, "answer_tokens": 8}
REVIEWERS = Reviewers({"alice": "pw"})


def counts(store) -> dict[str, int]:
    with store.session() as session:
        return {t.__tablename__: session.scalar(select(func.count()).select_from(t)) for t in DATA_TABLES}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth5")
    generate_dataset(root, 5, 0, 0, seed=11, workers=1)
    return root


@pytest.fixture(scope="module")
def model_run(synth, tiny, tmp_path_factory):
    """The full pipeline (Eureka captioner + two decoding settings + offline generator + rule judge) on 5 clips."""
    store = open_store(tmp_path_factory.mktemp("db") / "e2e.sqlite")
    components = Components(PipelineConfig(**FAST), model=tiny)
    result = run_pipeline(store, synth, components=components, progress=False)
    yield store, result, components
    store.close()


def test_end_to_end_on_five_clips(model_run):
    store, result, _ = model_run
    assert result["clips"] == 5 and result["complete_clips"] == 5 and result["failed_clips"] == 0
    assert result["kept"] + result["discarded"] == result["questions"] >= 5
    with store.session() as session:
        clips = list(session.scalars(select(Clip)))
        assert all(c.error is None and c.source_meta.get("events") is not None for c in clips)
        assert all({s.step for s in c.steps} == {"caption", "questions", "answers", "judge"} for c in clips)
        for clip in clips:
            assert "Measured acoustic facts: duration" in clip.caption.text
            assert clip.caption.facts["duration_s"] == pytest.approx(clip.duration_s, abs=0.01)
        for generation in session.scalars(select(Generation).where(Generation.is_success.is_(True))):
            assert set(generation.reply) == {"is_success", "questions"}
            assert len(generation.reply["questions"]) == 5 == len(generation.questions)
        for question in session.scalars(select(Question)):
            stem, options = parse_question(question.text)
            assert question.correct_option in LETTERS and "caption" not in stem.lower()
            assert [a.slot for a in question.answers] == ["A", "B"]
            for answer in question.answers:
                assert answer.reasoning and (answer.chosen_option is None or answer.response[0] == answer.chosen_option)
            verdict = question.verdict
            assert verdict.winner in WINNERS and verdict.consistency_with_caption in CONSISTENCY
            assert verdict.final_action in FINAL_ACTIONS
            assert question.sample.judge_keep == (verdict.final_action == "KEEP_USING_WINNER")
            if question.sample.judge_keep:  # the rule judge keeps only right answers (the key is metadata truth)
                assert question.sample.target[0] == question.correct_option


def test_rerun_adds_no_rows(model_run, synth):
    store, _, components = model_run
    before = counts(store)
    result = run_pipeline(store, synth, components=components, progress=False)
    assert counts(store) == before
    assert result["complete_clips"] == 5
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(Run)) == 2  # a re-run is logged, nothing else


def test_review_then_export_round_trip(model_run, tmp_path, tiny):
    """Edited samples export as records that model/train.py reads and turns into training examples."""
    import torch

    from model.prompts import SpecialTokenIds
    from model.train import make_example, read_records, record_audio

    store, _, _ = model_run
    page = review.list_samples(store, review.SampleFilter(status="pending"), page_size=3)
    for item in page.items:
        detail = review.get_sample(store, item.id)
        review.edit(store, item.id, "alice", detail.version, detail.correct_option, reviewers=REVIEWERS)
    out = tmp_path / "records_train.jsonl"
    assert export(store, "accepted", "jsonl", out) == 3
    records = read_records(tmp_path, "train")
    ids = SpecialTokenIds.from_tokenizer(tiny.tokenizer)
    for item in records:
        assert item["task"] == "qa" and item["target"][0] in LETTERS and item["status"] == "edited"
        (audio,) = record_audio(item)
        assert Path(audio).is_absolute() and Path(audio).is_file()
        cache = {audio: torch.zeros(tiny.features(audio).n_tokens, 4)}
        example = make_example(item, tiny.tokenizer, ids, cache)
        assert example.audio == [audio] and any(label != -100 for label in example.labels)
    assert export(store, "accepted", "hf", tmp_path / "hf") == 3
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "hf" / "data" / "train-00000-of-00001.parquet")
    assert table.num_rows == 3 and table.column("target").to_pylist() == [r["target"] for r in records]
    info = json.loads((tmp_path / "hf" / "dataset_info.json").read_text())
    assert info["splits"]["train"]["num_examples"] == 3


def test_scripted_answerers_give_every_outcome(synth, tmp_path, tiny):
    """Model A always says A, Model B always says B: only-A, only-B and both-wrong all occur; keeps are right."""
    store = open_store(tmp_path / "scripted.sqlite")
    components = Components(PipelineConfig(captioner="reference", categories_per_clip=3), model=tiny)
    components.answerers = (FixedAnswerer("A"), FixedAnswerer("B"))
    run_pipeline(store, synth, components=components, progress=False)
    with store.session() as session:
        rows = session.execute(select(Question.correct_option, Verdict.winner, Verdict.final_action, Sample.target)
                               .join(Verdict, Verdict.question_id == Question.id)
                               .join(Sample, Sample.question_id == Question.id)).all()
    outcomes = {(key, winner, action) for key, winner, action, _ in rows}
    assert ("A", "MODEL_A", "KEEP_USING_WINNER") in outcomes and ("B", "MODEL_B", "KEEP_USING_WINNER") in outcomes
    assert any(w == "NONE" and a == "DISCARD" for k, w, a in outcomes if k in "CD")
    assert all(target is None or target[0] == key for key, _, _, target in rows)
    assert export(store, "kept", "jsonl", tmp_path / "kept.jsonl") == sum(1 for *_, t in rows if t)
    store.close()


def _steps_consistent(db: Path) -> None:
    """Every completion marker has its rows, no step has rows without its marker, and nothing is duplicated."""
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        marker = "SELECT clip_id FROM clip_steps WHERE step = '{}'"
        having = {
            "caption": "SELECT clip_id FROM captions",
            "questions": "SELECT DISTINCT clip_id FROM generations",
            "answers": "SELECT DISTINCT q.clip_id FROM answers a JOIN questions q ON q.id = a.question_id",
            "judge": "SELECT DISTINCT q.clip_id FROM verdicts v JOIN questions q ON q.id = v.question_id",
        }
        for step, query in having.items():
            with_marker = {r[0] for r in conn.execute(marker.format(step))}
            with_rows = {r[0] for r in conn.execute(query)}
            assert with_rows == with_marker, step
        assert conn.execute("SELECT COUNT(*) FROM (SELECT question_id FROM answers GROUP BY question_id "
                            "HAVING COUNT(*) != 2)").fetchone()[0] == 0
        assert conn.execute("SELECT COUNT(*) FROM (SELECT sha256 FROM clips GROUP BY sha256 "
                            "HAVING COUNT(*) > 1)").fetchone()[0] == 0


def test_kill_mid_run_then_resume(tmp_path, tiny):
    data = tmp_path / "data"
    generate_dataset(data, 6, 0, 0, seed=5, workers=1)
    db = tmp_path / "crash.sqlite"
    command = [sys.executable, "-m", "dataflux_ui", "run", "--audio-dir", str(data), "--db", str(db),
               "--model", "tiny-random", "--captioner", "reference", "--categories-per-clip", "1",
               "--answer-tokens", "8", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    markers = 0
    try:
        while time.time() < deadline and process.poll() is None:
            time.sleep(0.2)
            if db.exists():
                with sqlite3.connect(db, timeout=30) as conn:
                    try:
                        markers = conn.execute("SELECT COUNT(*) FROM clip_steps").fetchone()[0]
                    except sqlite3.OperationalError:  # schema not created yet
                        continue
                if markers >= 4:  # the first clip is through, the next one is in flight
                    break
        assert process.poll() is None, f"run ended before it could be killed: {process.stderr.read()[-2000:]}"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)
    assert process.returncode == -signal.SIGKILL and 4 <= markers < 24
    _steps_consistent(db)
    store = open_store(db)
    components = Components(PipelineConfig(captioner="reference", categories_per_clip=1), model=tiny)
    components.answerers = (FixedAnswerer("A"), FixedAnswerer("B"))  # the resume only has to be correct, not smart
    result = run_pipeline(store, data, components=components, progress=False)
    assert result["complete_clips"] == 6 and result["failed_clips"] == 0
    before = counts(store)
    run_pipeline(store, data, components=components, progress=False)
    assert counts(store) == before
    store.close()
    _steps_consistent(db)


@pytest.fixture(scope="module")
def pg_server():
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries are not installed (Debian: apt-get install postgresql)")
    server = PostgresServer(bin_dir)
    server.start()
    yield server
    server.stop()


def test_pipeline_on_postgresql(pg_server, synth, tmp_path, tiny):
    store = open_store(pg_server.new_database())
    assert store.dialect == "postgresql"
    components = Components(PipelineConfig(captioner="reference", categories_per_clip=2), model=tiny)
    components.answerers = (FixedAnswerer("A"), FixedAnswerer("C"))
    result = run_pipeline(store, synth, limit=3, components=components, progress=False)
    assert result["complete_clips"] == 3 and result["questions"] > 0
    before = counts(store)
    run_pipeline(store, synth, limit=3, components=components, progress=False)
    assert counts(store) == before
    kept = review.list_samples(store, review.SampleFilter(judge="keep")).items
    assert kept, "A-or-C answerers should win some questions"
    assert review.bulk_accept_kept(store, "alice", reviewers=REVIEWERS)["accepted"] == len(kept)
    assert export(store, "accepted", "jsonl", tmp_path / "pg.jsonl") == len(kept)
    store.close()


def test_ingest_dedupes_by_content_and_follows_moved_files(tmp_path):
    import shutil

    from dataflux_ui.pipeline import ingest

    generate_dataset(tmp_path / "a", 2, 0, 0, seed=8, workers=1)
    first = tmp_path / "a" / "audio" / "train" / "train-000000.wav"
    shutil.copy(first, tmp_path / "a" / "copy.wav")  # same bytes, second name: one clip
    store = open_store(tmp_path / "ingest.sqlite")
    ids = ingest(store, tmp_path / "a")
    assert len(ids) == 2 and counts(store)["clips"] == 2
    with store.session() as session:
        assert all(c.source_meta.get("id", "").startswith("train-") for c in session.scalars(select(Clip)))
    shutil.move(tmp_path / "a", tmp_path / "b")
    assert ingest(store, tmp_path / "b") == ids and counts(store)["clips"] == 2
    with store.session() as session:
        assert all(str(tmp_path / "b") in c.path for c in session.scalars(select(Clip)))
    store.close()
