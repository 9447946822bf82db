"""Scale-out: the same steps as Ray Data stages, each writing its results through the store.

``ray.data.from_items(clip ids)`` → caption+questions (an actor pool: the model loads once per actor) → answers
(another actor pool) → judge (plain tasks). Every stage opens the store by URL in its worker and commits each clip's
step results exactly as the local engine does (same functions, same transactions, same markers), so the two engines
are interchangeable and a Ray run can be resumed by a local run and vice versa. A clip whose step fails is recorded
on its row and passed on marked failed; later stages skip it.

On one machine SQLite serialises the writers (WAL + busy timeout); on a cluster use a PostgreSQL URL that every node
can reach, and audio paths every node can read.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .pipeline import (
    Components,
    PipelineConfig,
    record_error,
    step_answers,
    step_caption,
    step_judge,
    step_questions,
    sync_categories,
)
from .store import Store

# Fractions of a CPU per actor, so that both model stages fit on a 2-CPU local instance together.
ACTOR_CPUS = 0.5


class _Stage:
    """Common part of every stage: its own store connection and components, built once per worker."""

    def __init__(self, store_url: str, config: dict[str, Any], run_id: int | None):
        self.store = Store(store_url, migrate=False)
        self.components = Components(PipelineConfig(**config))
        self.run_id = run_id

    def each(self, batch: dict[str, np.ndarray], work: Any) -> dict[str, np.ndarray]:
        failed = batch["failed"].copy()
        for i, clip_id in enumerate(batch["clip_id"]):
            if failed[i]:
                continue
            try:
                work(int(clip_id))
            except Exception as exc:  # recorded on the clip; the other clips go on
                record_error(self.store, int(clip_id), exc)
                failed[i] = True
        return {"clip_id": batch["clip_id"], "failed": failed}


class CaptionQuestionStage(_Stage):
    """Step 1: measure + caption, then questions (loads the model when the captioner needs it)."""

    def __init__(self, store_url: str, config: dict[str, Any], run_id: int | None):
        super().__init__(store_url, config, run_id)
        self.category_ids = sync_categories(self.store, self.components.taxonomy)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        def work(clip_id: int) -> None:
            step_caption(self.store, clip_id, self.components, self.run_id)
            step_questions(self.store, clip_id, self.components, self.category_ids, self.run_id)

        return self.each(batch, lambda cid: _unless_done(self.store, cid, ("caption", "questions"), work))


class AnswerStage(_Stage):
    """Step 2: Model A and Model B answer."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        work = lambda cid: step_answers(self.store, cid, self.components, self.run_id)  # noqa: E731
        return self.each(batch, lambda cid: _unless_done(self.store, cid, ("answers",), work))


def judge_batch(batch: dict[str, np.ndarray], store_url: str, config: dict[str, Any],
                run_id: int | None) -> dict[str, np.ndarray]:
    """Step 3 as a plain task (the offline judge needs no model; an LLM judge needs only its endpoint)."""
    stage = _Stage(store_url, config, run_id)
    work = lambda cid: step_judge(stage.store, cid, stage.components, run_id)  # noqa: E731
    result = stage.each(batch, lambda cid: _unless_done(stage.store, cid, ("judge",), work))
    stage.store.close()
    return result


def _unless_done(store: Store, clip_id: int, steps: tuple[str, ...], work: Any) -> None:
    from .pipeline import done_steps

    if not set(steps) <= done_steps(store, clip_id):
        work(clip_id)


def init_ray(num_cpus: int | None = None) -> None:
    """Join a cluster given by RAY_ADDRESS, else start a small local instance (no dashboard)."""
    import ray

    if ray.is_initialized():
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in [root, os.environ.get("PYTHONPATH", "")] if p)
    runtime_env = {"env_vars": {"PYTHONPATH": path, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=runtime_env, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus or min(2, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
                 runtime_env=runtime_env)


def run_ray(store: Store, clip_ids: list[int], config: PipelineConfig, run_id: int | None,
            progress: bool = True, num_cpus: int | None = None) -> int:
    """Run the missing steps of ``clip_ids`` as Ray Data stages; returns how many clips failed."""
    import ray
    from tqdm import tqdm

    init_ray(num_cpus)
    ray.data.DataContext.get_current().enable_progress_bars = False
    args = (store.url, config.to_dict(), run_id)
    items = [{"clip_id": int(c), "failed": False} for c in clip_ids]
    if not items:
        return 0
    dataset = (ray.data.from_items(items)
               .map_batches(CaptionQuestionStage, fn_constructor_args=args, batch_size=1, concurrency=1,
                            num_cpus=ACTOR_CPUS)
               .map_batches(AnswerStage, fn_constructor_args=args, batch_size=1, concurrency=1, num_cpus=ACTOR_CPUS)
               .map_batches(judge_batch, fn_kwargs=dict(zip(("store_url", "config", "run_id"), args, strict=True)),
                            batch_size=8, num_cpus=0.25))
    failed = 0
    with tqdm(total=len(items), desc="dataflux[ray]", unit="clip", disable=not progress) as bar:
        for row in dataset.iter_rows():
            failed += int(bool(row["failed"]))
            bar.update(1)
    return failed
