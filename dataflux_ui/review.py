"""Human review of judged samples, as plain functions (the Gradio tab only calls these).

Every write names the reviewer and the ``version`` of the sample they saw. The write is one conditional UPDATE
(``WHERE id = :id AND version = :seen``): if someone else changed the sample in between, nothing is written and a
``ConflictError`` says who changed it — a decision is never silently overwritten. Each action adds a ``Review`` row
and an audit entry in the same transaction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session, aliased

from .answers import parse_choice
from .auth import Reviewers
from .core import LETTERS
from .models import (
    CONSISTENCY,
    SAMPLE_STATUSES,
    WINNERS,
    Answer,
    Caption,
    Category,
    Clip,
    Question,
    Review,
    Sample,
    Verdict,
    utcnow,
)
from .store import Store, audit

HUMAN_KEEP = ("accepted", "edited")
HUMAN_DECIDED = ("accepted", "edited", "rejected")


class ConflictError(RuntimeError):
    """The sample changed since the reviewer loaded it; reload and decide again."""


class NotFoundError(LookupError):
    """No sample with that id."""


@dataclass
class SampleFilter:
    """Filters for ``list_samples``; ``None`` means "any"."""

    status: str | None = None
    category: str | None = None  # a category key, or a path prefix such as "Paralinguistics > Prosody"
    judge: str | None = None  # "keep" / "discard", or a winner: MODEL_A, MODEL_B, TIE, NONE
    consistency: str | None = None  # STRONG_MATCH, WEAK_MATCH, CONFLICT
    agreement: bool | None = None  # both answerers chose the same option
    text: str | None = None  # case-insensitive search in the question and the caption


@dataclass
class SampleSummary:
    id: int
    status: str
    version: int
    category: str
    question: str
    target: str | None
    final_action: str | None
    winner: str | None
    consistency: str | None
    answer_a: str | None
    answer_b: str | None
    clip_path: str

    @property
    def agreement(self) -> bool:
        return self.answer_a is not None and self.answer_a == self.answer_b


@dataclass
class Page:
    items: list[SampleSummary]
    total: int
    page: int
    page_size: int

    @property
    def pages(self) -> int:
        return max(1, math.ceil(self.total / self.page_size))


@dataclass
class SampleDetail:
    """Everything a reviewer needs to decide on one sample."""

    id: int
    status: str
    version: int
    target: str | None
    judge_keep: bool
    clip_path: str
    clip_sha256: str
    duration_s: float
    caption: str
    category: str
    question: str
    options: list[str]
    correct_option: str | None
    answers: list[dict[str, Any]]
    verdict: dict[str, Any] | None
    reviews: list[dict[str, Any]] = field(default_factory=list)


# --- reading ------------------------------------------------------------------------------------------------------
def _base_query():
    a, b = aliased(Answer), aliased(Answer)
    query = (select(Sample, Question, Verdict, a.chosen_option, b.chosen_option, Category.path, Clip.path)
             .join(Question, Sample.question_id == Question.id)
             .join(Category, Question.category_id == Category.id)
             .join(Clip, Question.clip_id == Clip.id)
             .outerjoin(Verdict, Verdict.question_id == Question.id)
             .outerjoin(a, and_(a.question_id == Question.id, a.slot == "A"))
             .outerjoin(b, and_(b.question_id == Question.id, b.slot == "B"))
             .outerjoin(Caption, Caption.clip_id == Clip.id))
    return query, a, b


def _apply(query, flt: SampleFilter, a, b):
    if flt.status:
        _check(flt.status, SAMPLE_STATUSES, "status")
        query = query.where(Sample.status == flt.status)
    if flt.category:
        query = query.where(or_(Category.key == flt.category, Category.path.startswith(flt.category,
                                                                                        autoescape=True)))
    if flt.judge:
        judge = flt.judge.strip()
        if judge.lower() in ("keep", "discard"):
            query = query.where(Sample.judge_keep.is_(judge.lower() == "keep"))
        else:
            query = query.where(Verdict.winner == _check(judge.upper(), WINNERS, "judge outcome"))
    if flt.consistency:
        query = query.where(Verdict.consistency_with_caption == _check(flt.consistency.upper(), CONSISTENCY,
                                                                       "consistency"))
    if flt.agreement is not None:
        agree = and_(a.chosen_option.is_not(None), a.chosen_option == b.chosen_option)
        query = query.where(agree if flt.agreement else ~agree)
    if flt.text:
        needle = flt.text.lower()
        query = query.where(or_(func.lower(Question.text).contains(needle, autoescape=True),
                                func.lower(func.coalesce(Caption.text, "")).contains(needle, autoescape=True)))
    return query


def _check(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")
    return value


def list_samples(store: Store, flt: SampleFilter | None = None, page: int = 1, page_size: int = 20) -> Page:
    """One page of samples matching the filter, oldest first."""
    if page < 1 or page_size < 1:
        raise ValueError("page and page_size start at 1")
    query, a, b = _base_query()
    query = _apply(query, flt or SampleFilter(), a, b)
    with store.session() as session:
        total = session.scalar(select(func.count()).select_from(query.with_only_columns(Sample.id).subquery()))
        rows = session.execute(query.order_by(Sample.id).offset((page - 1) * page_size).limit(page_size)).all()
    items = [SampleSummary(s.id, s.status, s.version, cat, q.text, s.target, v.final_action if v else None,
                           v.winner if v else None, v.consistency_with_caption if v else None, ca, cb, path)
             for s, q, v, ca, cb, cat, path in rows]
    return Page(items, int(total or 0), page, page_size)


def get_sample(store: Store, sample_id: int) -> SampleDetail:
    """One sample with its clip, caption, question, both answers, verdict and reviews."""
    with store.session() as session:
        sample = session.get(Sample, sample_id)
        if sample is None:
            raise NotFoundError(f"no sample {sample_id}")
        question, clip = sample.question, sample.question.clip
        verdict = question.verdict
        return SampleDetail(
            id=sample.id, status=sample.status, version=sample.version, target=sample.target,
            judge_keep=sample.judge_keep, clip_path=clip.path, clip_sha256=clip.sha256, duration_s=clip.duration_s,
            caption=clip.caption.text if clip.caption else "", category=question.category.path,
            question=question.text, options=question.options, correct_option=question.correct_option,
            answers=[{"slot": a.slot, "answerer": a.answerer, "reasoning": a.reasoning, "chosen_option":
                      a.chosen_option, "response": a.response, "raw_text": a.raw_text,
                      "formatted": f"<THINK>{a.reasoning}</THINK><RESPONSE>{a.response}</RESPONSE>"}
                     for a in question.answers],
            verdict=None if verdict is None else {
                "judge": verdict.judge, "consensus": verdict.consensus,
                "consistency_with_caption": verdict.consistency_with_caption, "winner": verdict.winner,
                "reasoning": verdict.reasoning, "final_action": verdict.final_action},
            reviews=[{"reviewer": r.reviewer, "action": r.action, "edited_answer": r.edited_answer,
                      "comment": r.comment, "version_seen": r.version_seen, "at": r.created_at.isoformat()}
                     for r in sample.reviews],
        )


# --- writing ------------------------------------------------------------------------------------------------------
def _conflict(session: Session, sample_id: int, seen: int) -> Exception:
    current = session.get(Sample, sample_id)
    if current is None:
        return NotFoundError(f"no sample {sample_id}")
    last = session.scalars(select(Review).where(Review.sample_id == sample_id).order_by(Review.id.desc())).first()
    who = f" by {last.reviewer} ({last.action})" if last else ""
    return ConflictError(f"sample {sample_id} was changed{who} after you loaded it: you saw version {seen}, it is "
                         f"now version {current.version} ({current.status}). Reload it and decide again; nothing "
                         "was saved.")


def _act(store: Store, sample_id: int, reviewer: str, version: int, action: str, status: str,
         reviewers: Reviewers | None, target: str | None = None, comment: str | None = None) -> int:
    reviewer = (reviewers or Reviewers.from_env()).require(reviewer)
    with store.transaction() as session:
        return _write(session, sample_id, reviewer, version, action, status, target, comment)


def _write(session: Session, sample_id: int, reviewer: str, version: int, action: str, status: str,
           target: str | None, comment: str | None) -> int:
    values: dict[str, Any] = {"status": status, "version": Sample.version + 1, "updated_at": utcnow()}
    if target is not None:
        values["target"] = target
    result = session.execute(update(Sample).where(Sample.id == sample_id, Sample.version == version)
                             .values(**values).execution_options(synchronize_session=False))
    if result.rowcount != 1:
        raise _conflict(session, sample_id, version)
    session.add(Review(sample_id=sample_id, reviewer=reviewer, action=action,
                       edited_answer=target if action == "edit" else None, comment=comment, version_seen=version))
    audit(session, reviewer, f"review_{action}", "sample", sample_id, from_version=version,
          to_version=version + 1, status=status, target=target, comment=comment)
    return version + 1


def accept(store: Store, sample_id: int, reviewer: str, version: int, comment: str | None = None,
           reviewers: Reviewers | None = None) -> int:
    """Accept the sample's target as training data; returns the new version."""
    detail = get_sample(store, sample_id)
    if detail.target is None:
        raise ValueError(f"sample {sample_id} has no answer to accept (the judge discarded it): use edit instead")
    return _act(store, sample_id, reviewer, version, "accept", "accepted", reviewers, comment=comment)


def reject(store: Store, sample_id: int, reviewer: str, version: int, comment: str | None = None,
           reviewers: Reviewers | None = None) -> int:
    """Reject the sample (never exported); returns the new version."""
    return _act(store, sample_id, reviewer, version, "reject", "rejected", reviewers, comment=comment)


def edit(store: Store, sample_id: int, reviewer: str, version: int, answer: str, comment: str | None = None,
         reviewers: Reviewers | None = None) -> int:
    """Replace the target with one of the question's options ("B", "B. text" or the option's text)."""
    detail = get_sample(store, sample_id)
    letter = parse_choice(answer, detail.options)
    if letter is None:
        raise ValueError(f"{answer!r} is not one of the options A-D of sample {sample_id}")
    target = f"{letter}. {detail.options[LETTERS.index(letter)]}"
    return _act(store, sample_id, reviewer, version, "edit", "edited", reviewers, target=target, comment=comment)


def flag(store: Store, sample_id: int, reviewer: str, version: int, comment: str,
         reviewers: Reviewers | None = None) -> int:
    """Flag the sample for a second look; a comment saying why is required."""
    if not comment or not comment.strip():
        raise ValueError("flagging needs a comment saying what is wrong")
    return _act(store, sample_id, reviewer, version, "flag", "flagged", reviewers, comment=comment.strip())


def bulk_accept_kept(store: Store, reviewer: str, flt: SampleFilter | None = None,
                     reviewers: Reviewers | None = None) -> dict[str, int]:
    """Accept every pending, judge-kept sample matching the filter, each at the version read here.

    Samples someone changes meanwhile are skipped (counted), not overwritten.
    """
    reviewers = reviewers or Reviewers.from_env()
    reviewer = reviewers.require(reviewer)
    flt = SampleFilter(**{**(flt or SampleFilter()).__dict__, "status": "pending", "judge": "keep"})
    query, a, b = _base_query()
    query = _apply(query.with_only_columns(Sample.id, Sample.version), flt, a, b)
    with store.session() as session:
        targets = session.execute(query.order_by(Sample.id)).all()
    accepted = skipped = 0
    for sample_id, version in targets:
        try:
            _act(store, sample_id, reviewer, version, "accept", "accepted", reviewers, comment="bulk accept")
            accepted += 1
        except ConflictError:
            skipped += 1
    return {"accepted": accepted, "skipped": skipped}


# --- statistics ---------------------------------------------------------------------------------------------------
def cohen_kappa(first: list[bool], second: list[bool]) -> float | None:
    """Cohen's kappa of two binary raters; None when undefined (no items, or both raters constant and equal)."""
    if len(first) != len(second):
        raise ValueError("both raters must rate the same items")
    n = len(first)
    if n == 0:
        return None
    observed = sum(x == y for x, y in zip(first, second, strict=True)) / n
    p1, p2 = sum(first) / n, sum(second) / n
    expected = p1 * p2 + (1 - p1) * (1 - p2)
    if expected >= 1.0:
        return None
    return (observed - expected) / (1 - expected)


def stats(store: Store) -> dict[str, Any]:
    """Retention by category, judge-vs-human agreement (Cohen's kappa), answerer accuracy on accepted samples."""
    with store.session() as session:
        rows = session.execute(select(Category.path, Sample.judge_keep, Sample.status, Sample.target, Sample.id)
                               .join(Question, Sample.question_id == Question.id)
                               .join(Category, Question.category_id == Category.id)).all()
        answers = session.execute(select(Answer.question_id, Answer.answerer, Answer.chosen_option, Sample.id)
                                  .join(Sample, Sample.question_id == Answer.question_id)
                                  .where(Sample.status.in_(HUMAN_KEEP))).all()
    return {"retention": _retention(rows), "judge_vs_human": _agreement(rows),
            "answerer_accuracy": _accuracy(answers, {r.id: r.target for r in rows})}


def _retention(rows: list[Any]) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for path, keep, status, _, _ in rows:
        entry = table.setdefault(path, {"samples": 0, "judge_kept": 0, "accepted": 0, "rejected": 0})
        entry["samples"] += 1
        entry["judge_kept"] += int(bool(keep))
        entry["accepted"] += int(status in HUMAN_KEEP)
        entry["rejected"] += int(status == "rejected")
    for entry in table.values():
        entry["retention"] = round(entry["judge_kept"] / entry["samples"], 4)
    return dict(sorted(table.items()))


def _agreement(rows: list[Any]) -> dict[str, Any]:
    decided = [(bool(keep), status in HUMAN_KEEP) for _, keep, status, _, _ in rows if status in HUMAN_DECIDED]
    kappa = cohen_kappa([j for j, _ in decided], [h for _, h in decided])
    agree = sum(j == h for j, h in decided)
    return {"reviewed": len(decided), "agreement": round(agree / len(decided), 4) if decided else None,
            "cohen_kappa": None if kappa is None else round(kappa, 4)}


def _accuracy(answers: list[Any], targets: dict[int, str | None]) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for _, answerer, chosen, sample_id in answers:
        target = targets.get(sample_id)
        if not target:
            continue
        entry = table.setdefault(answerer, {"n": 0, "correct": 0})
        entry["n"] += 1
        entry["correct"] += int(chosen == target[:1])
    for entry in table.values():
        entry["accuracy"] = round(entry["correct"] / entry["n"], 4)
    return table
