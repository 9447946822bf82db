"""DataFlux store: constraints, pragmas, append-only audit log, migrations == models, optimistic concurrency.

Each store test runs on SQLite and on a real PostgreSQL server started by the fixture (skipped only when the server
binaries are not installed).
"""

from __future__ import annotations

import threading
import uuid

import pytest
from dataflux_helpers import PostgresServer, make_sample, postgres_bin
from sqlalchemy import delete, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError

from dataflux_ui import review
from dataflux_ui.auth import AuthError, Reviewers, parse_users
from dataflux_ui.models import (
    Answer,
    AuditEntry,
    Base,
    Clip,
    ClipStep,
    Question,
    Review,
    Sample,
    Verdict,
)
from dataflux_ui.store import AuditLogError, audit, open_store

REVIEWERS = Reviewers({"alice": "pw-a", "bob": "pw-b"})


@pytest.fixture(scope="session")
def pg_server():
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries are not installed (Debian: apt-get install postgresql)")
    server = PostgresServer(bin_dir)
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        url = str(tmp_path / "store.sqlite")
    else:
        url = request.getfixturevalue("pg_server").new_database()
    s = open_store(url)
    yield s
    s.close()


def test_sqlite_pragmas_wal_and_foreign_keys(tmp_path):
    with open_store(tmp_path / "p.sqlite") as s, s.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000


def test_schema_from_migrations(store):
    expected = set(Base.metadata.tables) | {"alembic_version"}
    assert set(store.tables()) == expected


def test_migrations_match_models(store):
    """Alembic's autogenerate diff between the migrated database and the ORM metadata is empty."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []


def test_reopen_is_a_noop(store):
    again = open_store(store.url)  # upgrade head on an up-to-date database changes nothing
    with again.engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0001"
    again.close()


def _commit(store, *objects):
    with store.transaction() as session:
        session.add_all(objects)


@pytest.mark.parametrize(("model", "field", "bad"), [
    (Verdict, "winner", "MODEL_C"), (Verdict, "consistency_with_caption", "MATCH"),
    (Verdict, "final_action", "KEEP"), (Sample, "status", "done"), (Question, "correct_option", "E"),
    (Answer, "chosen_option", "Z"), (Answer, "slot", "C"),
])
def test_enum_checks_reject_bad_values(store, model, field, bad):
    with store.transaction() as session:
        sample = make_sample(session, uuid.uuid4().hex[:6])
        session.flush()
        targets = {Verdict: sample.question.verdict, Sample: sample, Question: sample.question,
                   Answer: sample.question.answers[0]}
        row_id = targets[model].id
    with pytest.raises(IntegrityError):
        with store.transaction() as session:
            session.execute(update(model).where(model.id == row_id).values({field: bad}))


def test_review_action_check(store):
    with store.transaction() as session:
        sample = make_sample(session)
        session.flush()
        sample_id = sample.id
    _commit(store, Review(sample_id=sample_id, reviewer="alice", action="flag", version_seen=1))
    with pytest.raises(IntegrityError):
        _commit(store, Review(sample_id=sample_id, reviewer="alice", action="approve", version_seen=1))


def test_unique_content_hash(store):
    _commit(store, Clip(sha256="f" * 64, path="/a.wav", duration_s=1.0, source_meta={}))
    with pytest.raises(IntegrityError):
        _commit(store, Clip(sha256="f" * 64, path="/b.wav", duration_s=1.0, source_meta={}))


def test_foreign_keys_enforced(store):
    with pytest.raises(IntegrityError):
        _commit(store, ClipStep(clip_id=987654, step="caption"))


def test_step_marker_unique_and_checked(store):
    _commit(store, Clip(sha256="e" * 64, path="/a.wav", duration_s=1.0, source_meta={}))
    with store.session() as session:
        clip_id = session.scalar(select(Clip.id))
    _commit(store, ClipStep(clip_id=clip_id, step="caption"))
    with pytest.raises(IntegrityError):
        _commit(store, ClipStep(clip_id=clip_id, step="caption"))
    with pytest.raises(IntegrityError):
        _commit(store, ClipStep(clip_id=clip_id, step="bake"))


def test_crud_and_cascade(store):
    with store.transaction() as session:
        sample = make_sample(session, "crud")
    with store.session() as session:
        loaded = session.get(Sample, sample.id)
        assert loaded.question.clip.caption.text.startswith("a female voice")
        assert [a.slot for a in loaded.question.answers] == ["A", "B"]
        assert loaded.question.verdict.final_action == "KEEP_USING_WINNER"
    with store.transaction() as session:
        session.execute(delete(Clip).where(Clip.id == sample.question.clip_id))
    with store.session() as session:
        assert session.scalar(select(Sample).where(Sample.id == sample.id)) is None


def test_audit_log_is_append_only(store):
    with store.transaction() as session:
        entry = audit(session, "alice", "test", "sample", 1, note="first")
    with pytest.raises(AuditLogError):
        with store.transaction() as session:
            session.get(AuditEntry, entry.id).actor = "mallory"
    with pytest.raises(AuditLogError):
        with store.transaction() as session:
            session.delete(session.get(AuditEntry, entry.id))
    with pytest.raises(AuditLogError):
        with store.transaction() as session:
            session.execute(update(AuditEntry).values(actor="mallory"))
    with pytest.raises(AuditLogError):
        with store.transaction() as session:
            session.execute(delete(AuditEntry))
    for statement in ("UPDATE audit_log SET actor = 'mallory'", "DELETE FROM audit_log"):
        with pytest.raises(DBAPIError, match="append-only"):
            with store.engine.begin() as conn:  # raw SQL, no ORM: the database trigger refuses
                conn.execute(text(statement))
    with store.session() as session:
        assert [(e.actor, e.detail) for e in session.scalars(select(AuditEntry))] == [("alice", {"note": "first"})]


def test_review_actions_and_audit(store):
    with store.transaction() as session:
        first, second = make_sample(session, "r1"), make_sample(session, "r2", keep=False)
    version = review.accept(store, first.id, "alice", 1, reviewers=REVIEWERS)
    assert version == 2
    version = review.edit(store, first.id, "bob", version, "B", comment="male voice", reviewers=REVIEWERS)
    detail = review.get_sample(store, first.id)
    assert (detail.status, detail.version, detail.target) == ("edited", 3, "B. Male")
    assert [r["reviewer"] for r in detail.reviews] == ["alice", "bob"]
    assert detail.answers[1]["formatted"] == "<THINK>r</THINK><RESPONSE>B. x</RESPONSE>"
    assert detail.verdict["final_action"] == "KEEP_USING_WINNER" and detail.caption.startswith("a female voice")
    with pytest.raises(ValueError, match="no answer to accept"):
        review.accept(store, second.id, "alice", 1, reviewers=REVIEWERS)
    with pytest.raises(ValueError, match="comment"):
        review.flag(store, second.id, "alice", 1, "  ", reviewers=REVIEWERS)
    review.flag(store, second.id, "alice", 1, "noise, not speech", reviewers=REVIEWERS)
    with pytest.raises(ValueError, match="not one of the options"):
        review.edit(store, second.id, "alice", 2, "E. elephant", reviewers=REVIEWERS)
    review.reject(store, second.id, "alice", 2, reviewers=REVIEWERS)
    with pytest.raises(AuthError):
        review.reject(store, first.id, "mallory", 3, reviewers=REVIEWERS)
    with store.session() as session:
        actions = [(e.actor, e.action) for e in session.scalars(select(AuditEntry).order_by(AuditEntry.id))]
    assert actions == [("alice", "review_accept"), ("bob", "review_edit"), ("alice", "review_flag"),
                       ("alice", "review_reject")]


def test_concurrent_reviewers_second_gets_conflict(store):
    """Two reviewers load version 1 and write at the same moment: one wins, the other gets ConflictError."""
    with store.transaction() as session:
        sample = make_sample(session, "race")
    seen = review.get_sample(store, sample.id).version
    barrier = threading.Barrier(2)
    outcomes: dict[str, object] = {}

    def act(name, action):
        barrier.wait()
        try:
            outcomes[name] = action(store, sample.id, name, seen, reviewers=REVIEWERS)
        except Exception as exc:  # collected and checked below
            outcomes[name] = exc

    threads = [threading.Thread(target=act, args=("alice", review.accept)),
               threading.Thread(target=act, args=("bob", review.reject))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    winners = [n for n, o in outcomes.items() if o == 2]
    losers = [o for o in outcomes.values() if isinstance(o, review.ConflictError)]
    assert len(winners) == 1 and len(losers) == 1, outcomes
    message = str(losers[0])
    assert "you saw version 1" in message and "now version 2" in message and winners[0] in message
    detail = review.get_sample(store, sample.id)
    assert detail.version == 2 and len(detail.reviews) == 1 and detail.reviews[0]["reviewer"] == winners[0]
    with pytest.raises(review.ConflictError):  # a stale retry is refused too
        review.accept(store, sample.id, "alice", seen, reviewers=REVIEWERS)


def test_list_filters_bulk_accept_and_stats(store):
    with store.transaction() as session:
        make_sample(session, "s1", a="A", b="A")
        make_sample(session, "s2", a="A", b="B")
        make_sample(session, "s3", keep=False, a="C", b="D")
    assert review.list_samples(store).total == 3
    assert review.list_samples(store, review.SampleFilter(judge="discard")).total == 1
    assert review.list_samples(store, review.SampleFilter(agreement=True)).total == 1
    assert review.list_samples(store, review.SampleFilter(agreement=False)).total == 2
    assert review.list_samples(store, review.SampleFilter(text="VOICE S2")).total == 1
    assert review.list_samples(store, review.SampleFilter(category="cat-s3")).total == 1
    assert review.list_samples(store, review.SampleFilter(consistency="strong_match")).total == 3
    page = review.list_samples(store, page=2, page_size=2)
    assert (page.total, page.pages, len(page.items)) == (3, 2, 1)
    with pytest.raises(ValueError):
        review.list_samples(store, review.SampleFilter(status="done"))
    assert review.bulk_accept_kept(store, "alice", reviewers=REVIEWERS) == {"accepted": 2, "skipped": 0}
    third = review.list_samples(store, review.SampleFilter(judge="discard")).items[0]
    review.reject(store, third.id, "bob", third.version, reviewers=REVIEWERS)
    result = review.stats(store)
    assert result["judge_vs_human"] == {"reviewed": 3, "agreement": 1.0, "cohen_kappa": 1.0}
    assert result["answerer_accuracy"]["m:greedy"] == {"n": 2, "correct": 2, "accuracy": 1.0}
    assert result["answerer_accuracy"]["m:sampled"]["correct"] == 1
    assert sum(v["samples"] for v in result["retention"].values()) == 3


def test_cohen_kappa_known_values():
    assert review.cohen_kappa([True, False], [True, False]) == 1.0
    assert review.cohen_kappa([], []) is None
    assert review.cohen_kappa([True, True], [True, True]) is None
    # 20 items: 15 agree; p(yes) 0.5 for both raters -> pe 0.5, po 0.75, kappa 0.5
    judge = [True] * 10 + [False] * 10
    human = [True] * 7 + [False] * 3 + [False] * 8 + [True] * 2
    assert review.cohen_kappa(judge, human) == pytest.approx(0.5)


def test_reviewers_from_env_and_file(tmp_path):
    users = tmp_path / "reviewers.txt"
    users.write_text("# team\ncarol:secret\n")
    reviewers = Reviewers.from_env({"DATAFLUX_REVIEWERS": "alice:pw, bob:pw2", "DATAFLUX_REVIEWERS_FILE": str(users)})
    assert sorted(reviewers.users) == ["alice", "bob", "carol"]
    assert reviewers("carol", "secret") and not reviewers("carol", "nope") and not reviewers("dave", "")
    assert reviewers.require("bob") == "bob"
    with pytest.raises(AuthError, match="not a reviewer"):
        reviewers.require("dave")
    with pytest.raises(AuthError, match="no reviewers are configured"):
        Reviewers.from_env({}).require("alice")
    with pytest.raises(ValueError):
        parse_users("alice")
