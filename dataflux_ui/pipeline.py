"""The DataFlux pipeline over the store: ingest clips, then caption → questions → answers → judge, per clip.

Resumable and idempotent by construction:

* a clip is identified by its content hash (unique), so re-ingesting a folder adds nothing;
* every step of every clip writes its results *and* its completion marker (``ClipStep``) in one transaction, so after
  any crash (even ``kill -9``) a step is either fully there or not at all, and a re-run redoes only missing steps;
* unique constraints (one caption per clip, one generation per clip and category, one answer per question and slot,
  one verdict and one sample per question) turn a racing duplicate into an IntegrityError that is treated as "done".

Slow work (model inference) happens outside transactions; only the writes are inside. Both engines (local loop and
Ray Data) call the same step functions.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .acoustics import measure, sha256_file
from .core import ClipContext, JudgeInput
from .judge import target_answer
from .models import (
    Answer,
    Caption,
    Category,
    Clip,
    ClipStep,
    Generation,
    Question,
    Run,
    Sample,
    Verdict,
    utcnow,
)
from .store import Store, audit
from .taxonomy import TaxonomyCategory, candidates, load_taxonomy

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".opus")
SAMPLED_B = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "seed": 1}  # the library's sampling defaults


@dataclass
class PipelineConfig:
    """Every choice that shapes the output; saved on the run row."""

    model: str = ""  # model.load_model source; "" = model.loading.default_source()
    model_b: str = ""  # a second checkpoint for Model B; "" = the same model, sampled
    captioner: str = "model"  # "model" (Eureka + measured facts) or "reference" (template caption / facts only)
    generator: str = "offline"  # "offline" (facts) or "llm"
    judge: str = "rule"  # "rule" or "llm"
    llm_url: str = ""  # OpenAI-compatible API root for generator/judge "llm"; "" = the in-process backbone
    llm_model: str = "default"
    categories_per_clip: int = 2
    max_attempts: int = 8
    caption_tokens: int = 200
    answer_tokens: int = 32
    answer_b: dict[str, Any] = field(default_factory=lambda: dict(SAMPLED_B))
    seed: int = 0
    taxonomy: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Components:
    """The step implementations a config asks for, built lazily (a judge-only worker never loads the model)."""

    def __init__(self, config: PipelineConfig, model: Any | None = None):
        self.config = config
        if model is not None:
            self.model = model

    @cached_property
    def model(self) -> Any:
        from model import load_model
        from model.loading import default_source

        return load_model(self.config.model or default_source())

    @cached_property
    def model_b(self) -> Any:
        if not self.config.model_b:
            return self.model
        from model import load_model

        return load_model(self.config.model_b)

    @cached_property
    def taxonomy(self) -> list[TaxonomyCategory]:
        return load_taxonomy(self.config.taxonomy or None)

    @cached_property
    def chat(self) -> Any:
        from .llm import OpenAIChat, backbone_chat

        if self.config.llm_url:
            return OpenAIChat(self.config.llm_url, self.config.llm_model)
        return backbone_chat(self.model)

    @cached_property
    def captioner(self) -> Any:
        from .captioner import EurekaCaptioner, ReferenceCaptioner

        if self.config.captioner == "reference":
            return ReferenceCaptioner()
        return EurekaCaptioner(self.model, self.config.caption_tokens)

    @cached_property
    def generator(self) -> Any:
        from .questions import LLMQuestionGenerator, OfflineQuestionGenerator

        return LLMQuestionGenerator(self.chat) if self.config.generator == "llm" else OfflineQuestionGenerator()

    @cached_property
    def answerers(self) -> tuple[Any, Any]:
        from .answers import ModelAnswerer

        a = ModelAnswerer(self.model, "greedy", {"temperature": 0}, self.config.answer_tokens)
        label = "sampled" if not self.config.model_b else "greedy"
        settings = self.config.answer_b if not self.config.model_b else {"temperature": 0}
        b = ModelAnswerer(self.model_b, label, settings, self.config.answer_tokens)
        return a, b

    @cached_property
    def judge(self) -> Any:
        from .judge import LLMJudge, RuleJudge

        return LLMJudge(self.chat) if self.config.judge == "llm" else RuleJudge()


# --- ingest -------------------------------------------------------------------------------------------------------
def audio_files(audio_dir: str | os.PathLike) -> list[Path]:
    """Audio files under a folder, sorted (hidden files skipped)."""
    root = Path(audio_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"audio folder {root} does not exist")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def manifest_metadata(audio_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Synthetic ground truth by absolute audio path, from a ``manifest.jsonl`` in the folder or up to 3 levels up."""
    folder = Path(audio_dir).resolve()
    for candidate in [folder, *list(folder.parents)[:3]]:
        manifest = candidate / "manifest.jsonl"
        if manifest.is_file():
            with open(manifest, encoding="utf-8") as handle:
                metas = [json.loads(line) for line in handle if line.strip()]
            return {str((candidate / m["audio"]).resolve()): m for m in metas if "audio" in m}
    return {}


log = logging.getLogger(__name__)
MAX_CLIP_SECONDS = 600.0


def _usable_clip(path: Path) -> bool:
    """Undecodable or over-long files are skipped with a warning: one bad file must not stop a whole run."""
    try:
        duration = clip_duration(path)
    except Exception as exc:  # libsndfile raises several types for unreadable files
        log.warning("skipping %s: not decodable audio (%s)", path.name, exc)
        return False
    if not 0 < duration <= MAX_CLIP_SECONDS:
        log.warning("skipping %s: %.1f s long (allowed: up to %.0f s)", path.name, duration, MAX_CLIP_SECONDS)
        return False
    return True


def clip_duration(path: Path) -> float:
    import soundfile as sf

    return round(float(sf.info(str(path)).duration), 3)


def ingest(store: Store, audio_dir: str | os.PathLike, run_id: int | None = None,
           limit: int | None = None) -> list[int]:
    """Register the folder's clips (new ones only) and return the ids of the first ``limit`` clips, in order."""
    files = [path for path in audio_files(audio_dir) if _usable_clip(path)]
    files = files[:limit] if limit else files
    metas = manifest_metadata(audio_dir)
    ids = []
    for path in files:
        digest = sha256_file(path)
        ids.append(_known_clip(store, digest, path.resolve()) or _add_clip(store, path.resolve(), digest, metas,
                                                                           run_id))
    return list(dict.fromkeys(ids))  # the same bytes under two names are one clip


def _clip_id(store: Store, digest: str) -> int | None:
    with store.session() as session:
        return session.scalar(select(Clip.id).where(Clip.sha256 == digest))


def _known_clip(store: Store, digest: str, path: Path) -> int | None:
    """The id of a clip with these bytes; its path follows the file when the old path is gone (a moved folder)."""
    with store.transaction() as session:
        clip = session.scalar(select(Clip).where(Clip.sha256 == digest))
        if clip is None:
            return None
        if clip.path != str(path) and not Path(clip.path).exists():
            clip.path = str(path)
        return clip.id


def _add_clip(store: Store, path: Path, digest: str, metas: dict[str, dict], run_id: int | None) -> int:
    try:
        with store.transaction() as session:
            clip = Clip(sha256=digest, path=str(path), duration_s=clip_duration(path),
                        source_meta=metas.get(str(path), {}), run_id=run_id)
            session.add(clip)
            session.flush()
            return clip.id
    except IntegrityError:  # another worker registered the same bytes first
        found = _clip_id(store, digest)
        if found is None:
            raise
        return found


def sync_categories(store: Store, taxonomy: list[TaxonomyCategory]) -> dict[str, int]:
    """Upsert the taxonomy leaves (by key) and return key → category id."""
    with store.transaction() as session:
        existing = {c.key: c for c in session.scalars(select(Category))}
        for leaf in taxonomy:
            row = existing.get(leaf.key) or Category(key=leaf.key)
            row.l0, row.l1, row.l2, row.l3 = leaf.levels
            row.path, row.exemplars = leaf.path, list(leaf.exemplars)
            session.add(row)
    with store.session() as session:
        return {key: cid for key, cid in session.execute(select(Category.key, Category.id))}


# --- steps --------------------------------------------------------------------------------------------------------
def done_steps(store: Store, clip_id: int) -> set[str]:
    with store.session() as session:
        return set(session.scalars(select(ClipStep.step).where(ClipStep.clip_id == clip_id)))


def clip_seed(sha256: str, seed: int) -> int:
    """A per-clip seed from its content hash, so results do not depend on processing order."""
    return (int(sha256[:8], 16) ^ (seed * 2654435761)) % (2**31)


def clip_context(session: Session, clip_id: int, seed: int) -> ClipContext:
    clip = session.get(Clip, clip_id)
    caption = clip.caption
    return ClipContext(path=clip.path, seed=clip_seed(clip.sha256, seed), meta=clip.source_meta or {},
                       facts=caption.facts if caption else {}, caption=caption.text if caption else "",
                       model_caption=caption.model_text if caption else "")


def _commit_step(store: Store, clip_id: int, step: str, run_id: int | None, rows: list[Any]) -> bool:
    """Write a step's rows and its marker in one transaction; False when another writer already finished it."""
    try:
        with store.transaction() as session:
            if session.scalar(select(ClipStep.id).where(ClipStep.clip_id == clip_id, ClipStep.step == step)):
                return False
            session.add_all(rows)
            session.add(ClipStep(clip_id=clip_id, step=step, run_id=run_id))
        return True
    except IntegrityError:
        if step in done_steps(store, clip_id):
            return False
        raise


def step_caption(store: Store, clip_id: int, components: Components, run_id: int | None = None) -> bool:
    """Measure the clip, caption it, store both."""
    with store.session() as session:
        clip = clip_context(session, clip_id, components.config.seed)
    clip.facts = measure(clip.path).to_dict()
    result = components.captioner.caption(clip)
    row = Caption(clip_id=clip_id, captioner=result.captioner, model_text=result.model_text, facts=clip.facts,
                  text=result.text)
    return _commit_step(store, clip_id, "caption", run_id, [row])


def step_questions(store: Store, clip_id: int, components: Components, category_ids: dict[str, int],
                   run_id: int | None = None) -> bool:
    """Try taxonomy leaves (caption keywords first) until ``categories_per_clip`` of them yield questions."""
    config = components.config
    with store.session() as session:
        clip = clip_context(session, clip_id, config.seed)
    rows: list[Any] = []
    successes = 0
    for category in category_order(components.taxonomy, clip, config.max_attempts):
        if successes >= config.categories_per_clip:
            break
        generated = components.generator.generate(category, clip)
        generation = Generation(clip_id=clip_id, category_id=category_ids[category.key],
                                generator=generated.generator, is_success=generated.reply["is_success"],
                                reply=generated.reply)
        rows.append(generation)
        questions = generated.reply["questions"]
        keys = generated.keys or [None] * len(questions)
        for position, (text, key) in enumerate(zip(questions, keys, strict=True)):
            rows.append(question_row(generation, clip_id, category_ids[category.key], position, text, key))
        successes += int(generated.reply["is_success"])
    return _commit_step(store, clip_id, "questions", run_id, rows)


def category_order(taxonomy: list[TaxonomyCategory], clip: ClipContext, limit: int) -> list[TaxonomyCategory]:
    """Leaves the captioner's words mention first (seeded shuffle among them), then the others; at most ``limit``.

    Only the captioner's own text counts: the measured-facts paragraph names loudness, pitch and segments for every
    clip, and would otherwise put the same few leaves first every time.
    """
    rng = np.random.default_rng([clip.seed, 7])
    mentioned = candidates(taxonomy, clip.model_caption, len(taxonomy), rng)
    mentioned = [mentioned[int(i)] for i in rng.permutation(len(mentioned))]
    others = [taxonomy[int(i)] for i in rng.permutation(len(taxonomy)) if taxonomy[int(i)] not in mentioned]
    return (mentioned + others)[:limit]


def question_row(generation: Generation, clip_id: int, category_id: int, position: int, text: str,
                 key: str | None) -> Question:
    from .core import parse_question

    stem, options = parse_question(text)
    return Question(generation=generation, clip_id=clip_id, category_id=category_id, position=position, text=text,
                    stem=stem, option_a=options[0], option_b=options[1], option_c=options[2], option_d=options[3],
                    correct_option=key)


def clip_questions(session: Session, clip_id: int) -> list[Question]:
    return list(session.scalars(select(Question).where(Question.clip_id == clip_id)
                                .order_by(Question.generation_id, Question.position)))


def step_answers(store: Store, clip_id: int, components: Components, run_id: int | None = None) -> bool:
    """Model A and Model B answer every question of the clip."""
    with store.session() as session:
        clip = clip_context(session, clip_id, components.config.seed)
        questions = [(q.id, q.text) for q in clip_questions(session, clip_id)]
    rows: list[Any] = []
    if questions:
        for slot, answerer in zip("AB", components.answerers, strict=True):
            for (question_id, _), result in zip(questions, answerer.answer(clip, [t for _, t in questions]),
                                                strict=True):
                rows.append(Answer(question_id=question_id, slot=slot, answerer=result.answerer,
                                   reasoning=result.reasoning, chosen_option=result.chosen_option,
                                   response=result.response, raw_text=result.raw_text))
    return _commit_step(store, clip_id, "answers", run_id, rows)


def answer_result(answer: Answer) -> Any:
    from .core import AnswerResult

    return AnswerResult(answer.answerer, answer.reasoning, answer.chosen_option, answer.response, answer.raw_text)


def step_judge(store: Store, clip_id: int, components: Components, run_id: int | None = None) -> bool:
    """Judge every answered question; each becomes a sample (pending review) with the winner's answer as target."""
    rows: list[Any] = []
    with store.session() as session:
        caption = session.get(Clip, clip_id).caption
        for question in clip_questions(session, clip_id):
            answers = {a.slot: answer_result(a) for a in question.answers}
            if set(answers) != {"A", "B"}:
                continue
            item = JudgeInput(question.category.path, caption.text if caption else "", question.text,
                              question.options, answers["A"], answers["B"], question.correct_option)
            result = components.judge.judge(item)
            target = target_answer(result, answers["A"], answers["B"])
            rows.append(Verdict(question_id=question.id, judge=components.judge.name, **result))
            rows.append(Sample(question_id=question.id, status="pending", version=1,
                               judge_keep=target is not None, target=target))
    return _commit_step(store, clip_id, "judge", run_id, rows)


def process_clip(store: Store, clip_id: int, components: Components, category_ids: dict[str, int],
                 run_id: int | None = None) -> list[str]:
    """Run every missing step of one clip; returns the steps it ran."""
    ran = []
    done = done_steps(store, clip_id)
    steps = (("caption", lambda: step_caption(store, clip_id, components, run_id)),
             ("questions", lambda: step_questions(store, clip_id, components, category_ids, run_id)),
             ("answers", lambda: step_answers(store, clip_id, components, run_id)),
             ("judge", lambda: step_judge(store, clip_id, components, run_id)))
    for name, run in steps:
        if name not in done and run():
            ran.append(name)
    return ran


def record_error(store: Store, clip_id: int, error: BaseException) -> None:
    with store.transaction() as session:
        session.get(Clip, clip_id).error = f"{type(error).__name__}: {error}"[:2000]


def clear_error(store: Store, clip_id: int) -> None:
    with store.transaction() as session:
        clip = session.get(Clip, clip_id)
        if clip.error:
            clip.error = None


# --- runs ---------------------------------------------------------------------------------------------------------
def start_run(store: Store, audio_dir: str, engine: str, config: PipelineConfig) -> int:
    with store.transaction() as session:
        run = Run(engine=engine, audio_dir=str(audio_dir), config=config.to_dict(), state="running")
        session.add(run)
        session.flush()
        audit(session, "pipeline", "run_started", "run", run.id, audio_dir=str(audio_dir), engine=engine)
        return run.id


def finish_run(store: Store, run_id: int, clip_ids: list[int], failed: int) -> dict[str, Any]:
    counts = table_counts(store, clip_ids)
    counts["failed_clips"] = failed
    with store.transaction() as session:
        run = session.get(Run, run_id)
        run.state, run.finished_at, run.counts = ("failed" if failed else "finished"), utcnow(), counts
        audit(session, "pipeline", "run_finished", "run", run_id, **counts)
    return counts


def table_counts(store: Store, clip_ids: list[int]) -> dict[str, int]:
    """How much the given clips produced so far."""
    with store.session() as session:
        def count(statement: Any) -> int:
            return int(session.scalar(statement) or 0)

        in_clips = Question.clip_id.in_(clip_ids)
        return {
            "clips": len(clip_ids),
            "complete_clips": count(select(func.count()).select_from(ClipStep).where(
                ClipStep.step == "judge", ClipStep.clip_id.in_(clip_ids))),
            "questions": count(select(func.count()).select_from(Question).where(in_clips)),
            "kept": count(select(func.count()).select_from(Sample).join(Question).where(
                in_clips, Sample.judge_keep.is_(True))),
            "discarded": count(select(func.count()).select_from(Sample).join(Question).where(
                in_clips, Sample.judge_keep.is_(False))),
        }


def run_local(store: Store, clip_ids: list[int], components: Components, run_id: int | None,
              progress: bool = True) -> int:
    """The local engine: clip by clip, every missing step; a failing clip is recorded and skipped."""
    from tqdm import tqdm

    category_ids = sync_categories(store, components.taxonomy)
    failed = 0
    bar = tqdm(clip_ids, desc="dataflux", unit="clip", disable=not progress)
    for clip_id in bar:
        try:
            ran = process_clip(store, clip_id, components, category_ids, run_id)
            if ran:
                clear_error(store, clip_id)
            bar.set_postfix_str(f"clip {clip_id}: {'+'.join(ran) or 'done before'}")
        except Exception as exc:  # one bad clip must not stop the run; the error is kept on the clip row
            failed += 1
            record_error(store, clip_id, exc)
    return failed


def run_pipeline(store: Store, audio_dir: str | os.PathLike, config: PipelineConfig | None = None,
                 limit: int | None = None, engine: str = "local", components: Components | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Ingest ``audio_dir`` and bring every clip through all steps; returns the counts of this run's clips."""
    config = config or (components.config if components else PipelineConfig())
    components = components or Components(config)
    started = time.perf_counter()
    run_id = start_run(store, str(audio_dir), engine, config)
    clip_ids = ingest(store, audio_dir, run_id, limit)
    if engine == "ray":
        from .ray_engine import run_ray

        failed = run_ray(store, clip_ids, config, run_id, progress=progress)
    elif engine == "local":
        failed = run_local(store, clip_ids, components, run_id, progress)
    else:
        raise ValueError(f"unknown engine {engine!r}; expected local or ray")
    counts = finish_run(store, run_id, clip_ids, failed)
    counts["seconds"] = round(time.perf_counter() - started, 1)
    counts["run_id"] = run_id
    return counts
