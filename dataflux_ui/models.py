"""The DataFlux store's tables, as SQLAlchemy 2.0 typed ORM classes.

One row per unit of work, so that a run can stop anywhere and resume: a clip (unique by content hash), its caption,
one generation attempt per (clip, taxonomy category), the questions of that attempt, two answers per question, one
judge verdict per question and one reviewable sample per question. ``ClipStep`` rows are the per-step completion
markers; each is written in the same transaction as the step's results, so a marker exists if and only if the
results do. The published enums (judge JSON, sample status, review actions) are CHECK constraints, so no writer —
ours or a hand-written SQL statement — can store a value outside them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

CONSISTENCY = ("STRONG_MATCH", "WEAK_MATCH", "CONFLICT")
WINNERS = ("MODEL_A", "MODEL_B", "TIE", "NONE")
FINAL_ACTIONS = ("KEEP_USING_WINNER", "DISCARD")
SAMPLE_STATUSES = ("pending", "accepted", "rejected", "edited", "flagged")
REVIEW_ACTIONS = ("accept", "reject", "edit", "flag")
OPTION_LETTERS = ("A", "B", "C", "D")
ANSWER_SLOTS = ("A", "B")  # Model A and Model B of the published pipeline
STEPS = ("caption", "questions", "answers", "judge")
RUN_STATES = ("running", "finished", "failed")

# Stable constraint names, so Alembic autogenerate and every dialect agree on them.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Timezone-aware now, so times compare the same on SQLite and PostgreSQL."""
    return datetime.now(UTC)


def one_of(column: str, values: tuple[str, ...]) -> str:
    """SQL text of ``column IN (...)`` for a CHECK constraint."""
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: DateTime(timezone=True)}


class Run(Base):
    """One invocation of ``dataflux_ui run``: its settings and how it ended."""

    __tablename__ = "runs"
    __table_args__ = (CheckConstraint(one_of("state", RUN_STATES), name="state"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    state: Mapped[str] = mapped_column(String(16), default="running")
    engine: Mapped[str] = mapped_column(String(16))
    audio_dir: Mapped[str] = mapped_column(Text)
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    counts: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Clip(Base):
    """An audio file, identified by the SHA-256 of its bytes (the same file under two names is one clip)."""

    __tablename__ = "clips"

    id: Mapped[int] = mapped_column(primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    path: Mapped[str] = mapped_column(Text)
    duration_s: Mapped[float] = mapped_column(Float)
    source_meta: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    caption: Mapped[Caption | None] = relationship(back_populates="clip")
    steps: Mapped[list[ClipStep]] = relationship(back_populates="clip")


class ClipStep(Base):
    """Completion marker: step ``step`` of the pipeline is done for this clip (written with the step's results)."""

    __tablename__ = "clip_steps"
    __table_args__ = (UniqueConstraint("clip_id", "step"), CheckConstraint(one_of("step", STEPS), name="step"))

    id: Mapped[int] = mapped_column(primary_key=True)
    clip_id: Mapped[int] = mapped_column(ForeignKey("clips.id", ondelete="CASCADE"))
    step: Mapped[str] = mapped_column(String(16))
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"))
    finished_at: Mapped[datetime] = mapped_column(default=utcnow)

    clip: Mapped[Clip] = relationship(back_populates="steps")


class Caption(Base):
    """The dense caption of a clip: the captioner's text, the measured acoustic facts, and both combined."""

    __tablename__ = "captions"

    id: Mapped[int] = mapped_column(primary_key=True)
    clip_id: Mapped[int] = mapped_column(ForeignKey("clips.id", ondelete="CASCADE"), unique=True)
    captioner: Mapped[str] = mapped_column(String(200))
    model_text: Mapped[str] = mapped_column(Text)
    facts: Mapped[dict[str, Any]] = mapped_column(default=dict)
    text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    clip: Mapped[Clip] = relationship(back_populates="caption")


class Category(Base):
    """A taxonomy leaf: the L0 > L1 > L2 > L3 path, its key and its hand-written exemplar questions."""

    __tablename__ = "categories"

    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True)
    l0: Mapped[str] = mapped_column(String(100))
    l1: Mapped[str] = mapped_column(String(100))
    l2: Mapped[str] = mapped_column(String(100))
    l3: Mapped[str] = mapped_column(String(100))
    path: Mapped[str] = mapped_column(String(420), unique=True)
    exemplars: Mapped[list[Any]] = mapped_column(default=list)


class Generation(Base):
    """One question-generation attempt for a (clip, category): ``is_success`` and the raw reply, kept for audit."""

    __tablename__ = "generations"
    __table_args__ = (UniqueConstraint("clip_id", "category_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    clip_id: Mapped[int] = mapped_column(ForeignKey("clips.id", ondelete="CASCADE"))
    category_id: Mapped[int] = mapped_column(ForeignKey("categories.id"))
    generator: Mapped[str] = mapped_column(String(200))
    is_success: Mapped[bool] = mapped_column(Boolean)
    reply: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    questions: Mapped[list[Question]] = relationship(back_populates="generation", order_by="Question.position")
    clip: Mapped[Clip] = relationship()
    category: Mapped[Category] = relationship()


class Question(Base):
    """A multiple-choice question (four options) and the generator's correct option when it knows it."""

    __tablename__ = "questions"
    __table_args__ = (
        UniqueConstraint("generation_id", "position"),
        CheckConstraint(f"correct_option IS NULL OR {one_of('correct_option', OPTION_LETTERS)}",
                        name="correct_option"),
        CheckConstraint("position >= 0 AND position < 5", name="position"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    generation_id: Mapped[int] = mapped_column(ForeignKey("generations.id", ondelete="CASCADE"))
    clip_id: Mapped[int] = mapped_column(ForeignKey("clips.id", ondelete="CASCADE"))
    category_id: Mapped[int] = mapped_column(ForeignKey("categories.id"))
    position: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    stem: Mapped[str] = mapped_column(Text)
    option_a: Mapped[str] = mapped_column(Text)
    option_b: Mapped[str] = mapped_column(Text)
    option_c: Mapped[str] = mapped_column(Text)
    option_d: Mapped[str] = mapped_column(Text)
    correct_option: Mapped[str | None] = mapped_column(String(1))

    generation: Mapped[Generation] = relationship(back_populates="questions")
    clip: Mapped[Clip] = relationship()
    category: Mapped[Category] = relationship()
    answers: Mapped[list[Answer]] = relationship(back_populates="question", order_by="Answer.slot")
    verdict: Mapped[Verdict | None] = relationship(back_populates="question")
    sample: Mapped[Sample | None] = relationship(back_populates="question")

    @property
    def options(self) -> list[str]:
        return [self.option_a, self.option_b, self.option_c, self.option_d]


class Answer(Base):
    """One answerer's reply to a question: reasoning trace, chosen option (None when unparseable), raw text."""

    __tablename__ = "answers"
    __table_args__ = (
        UniqueConstraint("question_id", "slot"),
        CheckConstraint(one_of("slot", ANSWER_SLOTS), name="slot"),
        CheckConstraint(f"chosen_option IS NULL OR {one_of('chosen_option', OPTION_LETTERS)}", name="chosen_option"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    question_id: Mapped[int] = mapped_column(ForeignKey("questions.id", ondelete="CASCADE"))
    slot: Mapped[str] = mapped_column(String(1))
    answerer: Mapped[str] = mapped_column(String(200))
    reasoning: Mapped[str] = mapped_column(Text)
    chosen_option: Mapped[str | None] = mapped_column(String(1))
    response: Mapped[str] = mapped_column(Text)
    raw_text: Mapped[str] = mapped_column(Text)

    question: Mapped[Question] = relationship(back_populates="answers")


class Verdict(Base):
    """The judge's reply, field for field the published JSON."""

    __tablename__ = "verdicts"
    __table_args__ = (
        CheckConstraint(one_of("consistency_with_caption", CONSISTENCY), name="consistency"),
        CheckConstraint(one_of("winner", WINNERS), name="winner"),
        CheckConstraint(one_of("final_action", FINAL_ACTIONS), name="final_action"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    question_id: Mapped[int] = mapped_column(ForeignKey("questions.id", ondelete="CASCADE"), unique=True)
    judge: Mapped[str] = mapped_column(String(200))
    consensus: Mapped[bool] = mapped_column(Boolean)
    consistency_with_caption: Mapped[str] = mapped_column(String(16))
    winner: Mapped[str] = mapped_column(String(8))
    reasoning: Mapped[str] = mapped_column(Text)
    final_action: Mapped[str] = mapped_column(String(20))

    question: Mapped[Question] = relationship(back_populates="verdict")


class Sample(Base):
    """A reviewable training sample: one judged question, its target answer, its status and version.

    ``version`` grows by one on every review action; a reviewer's write names the version they saw, and a stale
    version is refused (optimistic concurrency) instead of silently overwriting someone else's decision.
    """

    __tablename__ = "samples"
    __table_args__ = (
        CheckConstraint(one_of("status", SAMPLE_STATUSES), name="status"),
        CheckConstraint("version >= 1", name="version"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    question_id: Mapped[int] = mapped_column(ForeignKey("questions.id", ondelete="CASCADE"), unique=True)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    version: Mapped[int] = mapped_column(Integer, default=1)
    judge_keep: Mapped[bool] = mapped_column(Boolean)
    target: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    question: Mapped[Question] = relationship(back_populates="sample")
    reviews: Mapped[list[Review]] = relationship(back_populates="sample", order_by="Review.id")


class Review(Base):
    """One human decision on a sample."""

    __tablename__ = "reviews"
    __table_args__ = (CheckConstraint(one_of("action", REVIEW_ACTIONS), name="action"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id", ondelete="CASCADE"))
    reviewer: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(8))
    edited_answer: Mapped[str | None] = mapped_column(Text)
    comment: Mapped[str | None] = mapped_column(Text)
    version_seen: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    sample: Mapped[Sample] = relationship(back_populates="reviews")


class AuditEntry(Base):
    """Append-only log of every write a person makes (and of runs): who, what, on which row, when.

    UPDATE and DELETE are refused three times over: an ORM guard (``store.install_audit_guard``) and a database
    trigger on SQLite and PostgreSQL, so even raw SQL cannot rewrite history.
    """

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(40))
    entity: Mapped[str] = mapped_column(String(40))
    entity_id: Mapped[int | None] = mapped_column(Integer)
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
