"""Crash safety: ``kill -9`` in the middle of writes loses nothing that was acknowledged and corrupts nothing.

* Reviews: reviewer processes accept samples through ``dataflux_ui.review`` (the functions the Review tab calls),
  printing each id only after ``accept`` returned; they are SIGKILLed mid-stream four times, alone and in pairs
  racing for the same samples.
  After each kill the SQLite file passes ``PRAGMA integrity_check``, every acknowledged accept is in the database
  with its review row and audit entry (one transaction), no sample was accepted twice, and a restarted reviewer
  resumes with exactly the samples still pending until all are done.
* The app: ``python app.py`` is SIGKILLed while it decodes; the client gets an error (it does not hang), and the
  app restarted on the same port answers at once.

The pipeline CLI's own kill-and-resume is ``tests/test_dataflux_pipeline.py::test_kill_mid_run_then_resume``.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import soundfile as sf
from dataflux_helpers import make_sample
from hostile import ROOT, start_app, stop_app
from sqlalchemy import func, select

from dataflux_ui.models import AuditEntry, Review, Sample
from dataflux_ui.store import open_store

SAMPLES = 240

REVIEWER = """
import sys
from sqlalchemy import select
from dataflux_ui import review
from dataflux_ui.auth import Reviewers
from dataflux_ui.models import Sample
from dataflux_ui.store import open_store

store = open_store(sys.argv[1], migrate=False)
reviewers = Reviewers({"alice": "pw-a", "bob": "pw-b"})
with store.session() as session:
    pending = session.execute(select(Sample.id, Sample.version).where(Sample.status == "pending")
                              .order_by(Sample.id)).all()
if sys.argv[3] == "backward":
    pending.reverse()
print("ready", flush=True)
sys.stdin.readline()  # start together with the other writers
for sample_id, version in pending:
    try:
        review.accept(store, sample_id, sys.argv[2], version, comment="crash test", reviewers=reviewers)
    except review.ConflictError:
        print("conflict", sample_id, flush=True)
        continue
    print("accepted", sample_id, flush=True)  # only after the transaction committed
print("done", flush=True)
"""


def start_reviewer(script: Path, db: Path, name: str, order: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, str(script), str(db), name, order], cwd=ROOT, env=env,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready", process.stderr.read()
    return process


def go(processes: list[subprocess.Popen]) -> list[Acknowledged]:
    """Start reading the writers' acknowledgements, then let them all write at once."""
    readers = [Acknowledged(p) for p in processes]
    for process in processes:
        process.stdin.write("go\n")
        process.stdin.flush()
    return readers


class Acknowledged:
    """Reads a reviewer's stdout in a thread: the ids whose accept returned, and whether it finished."""

    def __init__(self, process: subprocess.Popen):
        self.ids: list[int] = []
        self.finished = False
        self.thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self.thread.start()

    def _read(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            words = line.split()
            if not line.endswith("\n"):  # the kill cut this line short: not an acknowledgement
                break
            if words[:1] == ["accepted"]:
                self.ids.append(int(words[1]))
            elif words[:1] == ["done"]:
                self.finished = True


def kill_after(processes: list[subprocess.Popen], readers: list[Acknowledged], accepted: int) -> None:
    """SIGKILL every writer once together they acknowledged ``accepted`` more samples (they are mid-stream)."""
    deadline = time.monotonic() + 120
    while sum(len(r.ids) for r in readers) < accepted and time.monotonic() < deadline:
        assert all(p.poll() is None for p in processes), "a reviewer ended before it could be killed"
        time.sleep(0.01)
    for process in processes:
        os.kill(process.pid, signal.SIGKILL)
    for process, reader in zip(processes, readers, strict=True):
        process.wait(30)
        reader.thread.join(10)
        close_pipes(process)
        assert process.returncode == -signal.SIGKILL


def close_pipes(process: subprocess.Popen) -> None:
    for pipe in (process.stdin, process.stdout, process.stderr):
        if pipe is not None:
            pipe.close()


def check_database(db: Path, acknowledged: set[int], killed: int) -> int:
    """Integrity, no lost acknowledged accept, and every accepted sample consistent; returns the accepted count.

    A writer killed between its commit and its print leaves one accept that is in the database but was never
    acknowledged: at most one per killed writer."""
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    store = open_store(db, migrate=False)
    try:
        with store.session() as session:
            status = dict(session.execute(select(Sample.id, Sample.status)).all())
            reviews = dict(session.execute(select(Review.sample_id, func.count()).group_by(Review.sample_id)).all())
            audited = dict(session.execute(select(AuditEntry.entity_id, func.count())
                                           .where(AuditEntry.action == "review_accept")
                                           .group_by(AuditEntry.entity_id)).all())
            versions = dict(session.execute(select(Sample.id, Sample.version)).all())
    finally:
        store.close()
    lost = sorted(i for i in acknowledged if status[i] != "accepted")
    assert not lost, f"acknowledged accepts lost after kill -9: {lost}"
    accepted = {i for i, s in status.items() if s == "accepted"}
    assert accepted <= set(reviews) and accepted <= set(audited), "an accept without its review row or audit entry"
    assert all(reviews[i] == 1 and audited[i] == 1 and versions[i] == 2 for i in accepted), "a sample accepted twice"
    assert set(reviews) == accepted, "a review row without its status change"
    assert len(accepted - acknowledged) <= killed, "more unacknowledged accepts than killed writers"
    return len(accepted)


def test_killed_reviewers_lose_no_acknowledged_accept_and_resume(tmp_path: Path) -> None:
    db = tmp_path / "reviews.sqlite"
    store = open_store(db)
    with store.transaction() as session:
        for _ in range(SAMPLES):
            make_sample(session, tag="crash")
    store.close()
    script = tmp_path / "reviewer.py"
    script.write_text(REVIEWER)
    acknowledged: set[int] = set()
    killed = 0

    # kill -9 rounds: one writer; two writers racing over the same samples (one wins each, the other gets a
    # conflict); two writers from opposite ends. Each round stops after 30 more acknowledged accepts.
    rounds = [[("alice", "forward")], [("alice", "forward"), ("bob", "forward")],
              [("bob", "backward"), ("alice", "forward")], [("alice", "backward")]]
    for writers in rounds:
        processes = [start_reviewer(script, db, name, order) for name, order in writers]
        readers = go(processes)
        kill_after(processes, readers, 30)
        killed += len(processes)
        for reader in readers:
            assert not set(reader.ids) & acknowledged, "a sample acknowledged twice"
            acknowledged.update(reader.ids)
        accepted = check_database(db, acknowledged, killed)
        assert len(acknowledged) <= accepted < SAMPLES

    # restart: the reviewer resumes with what is still pending and finishes
    process = start_reviewer(script, db, "alice", "forward")
    (reader,) = go([process])
    assert process.wait(180) == 0, process.stderr.read()
    reader.thread.join(10)
    close_pipes(process)
    assert reader.finished and not set(reader.ids) & acknowledged, "only pending samples were reviewed again"
    acknowledged.update(reader.ids)
    assert check_database(db, acknowledged, killed) == SAMPLES


def test_app_killed_mid_request_restarts_and_answers(tmp_path: Path) -> None:
    from gradio_client import Client, handle_file
    from gradio_client.utils import Status

    long_clip = tmp_path / "long.wav"  # 5 min: ten 30 s chunks of up to 512 tokens each
    rng = np.random.default_rng(3)
    sf.write(long_clip, (0.2 * rng.standard_normal(300 * 16000)).astype(np.float32), 16000, subtype="PCM_16")
    env = {"GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    app = start_app(env, tmp_path / "app.log")
    try:
        client = Client(app.url, verbose=False)
        job = client.submit(handle_file(str(long_clip)), "", api_name="/asr")
        deadline = time.monotonic() + 60
        while job.status().code != Status.PROCESSING and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # well inside the decoding
        assert not job.done(), "the request finished before the kill"
        os.kill(app.process.pid, signal.SIGKILL)
        app.process.wait(30)
        started = time.monotonic()
        try:
            job.result(timeout=60)
            raise AssertionError("a request to a killed server returned a result")
        except Exception as exc:  # any client-side error is the expected outcome
            assert not isinstance(exc, AssertionError), exc
        assert time.monotonic() - started < 60, "the client hung on a dead server"
        port = int(app.url.rsplit(":", 1)[1].strip("/"))
    finally:
        stop_app(app)
    restarted = start_app(env, tmp_path / "app.log", port=port)
    try:
        answer = Client(restarted.url, verbose=False).predict(
            handle_file(str(ROOT / "assets" / "examples" / "beeps_three.wav")), "Count the beeps.", 0.0, 0.8, 20, 4,
            1.05, api_name="/qa")
        assert isinstance(answer, str)
    finally:
        stop_app(restarted)
