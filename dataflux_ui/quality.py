"""Measured quality of the DataFlux filter on synthetic clips whose answers are known exactly.

``python -m dataflux_ui quality --clips N`` generates N held-out (test-split) synthetic clips, runs the whole
pipeline on them (the real captioner and answerers, the offline generator whose key is the metadata truth), then
scores several judges on the *same* answers:

* ``rule`` — the pipeline's default: the generator's key decides (an upper bound: it knows the truth);
* ``rule-caption-only/model-caption`` — no key, only the option the captioner's caption names (as an LLM judge sees
  it); with a weak captioner this keeps little;
* ``rule-caption-only/reference-caption`` — the same judge reading the exact template caption (an ideal captioner).

Until a trained checkpoint answers well, real answers are nearly all wrong and every judge just discards them.
``--simulate A,B`` replaces the two answerers by *simulated* ones that are right with probability A and B (wrong
options drawn uniformly): this measures the filter itself under known answer accuracy, and is labelled as such.

Per judge: retention (kept / all), keep-precision (kept samples whose target is right per metadata), discard recall
on wrong answers (samples where both answers are wrong that were discarded), and recall of good samples.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from sqlalchemy import select

from .captioner import enrich
from .core import JudgeInput
from .judge import RuleJudge, target_answer
from .models import Question, Sample
from .pipeline import Components, PipelineConfig, answer_result, run_pipeline
from .store import Store, open_store


class SimulatedAnswerer:
    """An answerer that is right with a fixed probability: it reads the generator's key from the store.

    Only for measuring the judge under controlled answer accuracy; never a source of training data.
    """

    def __init__(self, store: Store, accuracy: float, seed: int):
        self.store, self.accuracy, self.seed = store, accuracy, seed
        self.name = f"simulated-{accuracy:.2f}"

    def answer(self, clip: Any, questions: list[str]) -> list[Any]:
        import zlib

        import numpy as np

        from .answers import response_text
        from .core import LETTERS, AnswerResult
        from .models import Clip

        results = []
        with self.store.session() as session:
            for text in questions:
                key = session.scalar(select(Question.correct_option).join(Clip, Question.clip_id == Clip.id)
                                     .where(Clip.path == clip.path, Question.text == text))
                rng = np.random.default_rng([self.seed, clip.seed, zlib.crc32(text.encode())])
                wrong = [letter for letter in LETTERS if letter != key]
                letter = key if rng.random() < self.accuracy else wrong[int(rng.integers(len(wrong)))]
                results.append(AnswerResult(self.name, f"simulated (p={self.accuracy})", letter,
                                            response_text(text, letter), letter))
        return results


def judge_variants() -> dict[str, tuple[Any, str]]:
    """name → (judge, which caption it reads)."""
    return {"rule": (RuleJudge(use_key=True), "model"),
            "rule-caption-only/model-caption": (RuleJudge(use_key=False), "model"),
            "rule-caption-only/reference-caption": (RuleJudge(use_key=False), "reference")}


def collect(store: Store) -> list[dict[str, Any]]:
    """Per sample: truth, both answers, and each judge variant's target."""
    from model.data import tasks

    items = []
    with store.session() as session:
        for sample in session.scalars(select(Sample).order_by(Sample.id)):
            question: Question = sample.question
            answers = {a.slot: answer_result(a) for a in question.answers}
            caption = question.clip.caption
            reference = enrich(tasks.caption(question.clip.source_meta), caption.facts)
            truth = question.correct_option
            row = {"category": question.category.key, "truth": truth,
                   "a": answers["A"].chosen_option, "b": answers["B"].chosen_option, "targets": {}}
            for name, (judge, source) in judge_variants().items():
                text = caption.text if source == "model" else reference
                item = JudgeInput(question.category.path, text, question.text, question.options, answers["A"],
                                  answers["B"], question.correct_option)
                target = target_answer(judge.judge(item), answers["A"], answers["B"])
                row["targets"][name] = target[:1] if target else None
            items.append(row)
    return items


def score(items: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """Retention, keep-precision, discard recall on wrong answers, recall of good samples for one judge."""
    kept = [i for i in items if i["targets"][name]]
    right = [i for i in kept if i["targets"][name] == i["truth"]]
    both_wrong = [i for i in items if i["a"] != i["truth"] and i["b"] != i["truth"]]
    discarded_wrong = [i for i in both_wrong if not i["targets"][name]]
    good = [i for i in items if i["truth"] in (i["a"], i["b"])]
    good_kept = [i for i in good if i["targets"][name] == i["truth"]]
    return {"samples": len(items), "kept": len(kept), "retention": _ratio(len(kept), len(items)),
            "keep_precision": _ratio(len(right), len(kept)),
            "discard_recall_wrong": _ratio(len(discarded_wrong), len(both_wrong)),
            "recall_good": _ratio(len(good_kept), len(good))}


def outcomes(items: list[dict[str, Any]]) -> dict[str, Any]:
    """How often each answerer was right, and the published outcome classes."""
    n = len(items)
    a_ok = [i["a"] == i["truth"] for i in items]
    b_ok = [i["b"] == i["truth"] for i in items]
    pairs = list(zip(a_ok, b_ok, strict=True))
    return {"accuracy_a": _ratio(sum(a_ok), n), "accuracy_b": _ratio(sum(b_ok), n),
            "only_a_right": pairs.count((True, False)), "only_b_right": pairs.count((False, True)),
            "both_right": pairs.count((True, True)), "both_wrong": pairs.count((False, False))}


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def measure_quality(clips: int, model: str = "", seed: int = 0, categories_per_clip: int = 2,
                    simulate: tuple[float, float] | None = None, caption_tokens: int = 200,
                    progress: bool = True) -> dict[str, Any]:
    """Generate held-out clips, run the pipeline, score the judges; returns the report (the CLI writes it as JSON)."""
    from model.data import generate_dataset

    with tempfile.TemporaryDirectory(prefix="dataflux-quality-") as tmp:
        root = Path(tmp)
        generate_dataset(root / "data", 0, 0, clips, seed=seed, workers=1)
        store = open_store(root / "quality.sqlite")
        config = PipelineConfig(model=model, categories_per_clip=categories_per_clip, seed=seed,
                                caption_tokens=caption_tokens)
        components = Components(config)
        if simulate:
            components.answerers = (SimulatedAnswerer(store, simulate[0], seed),
                                    SimulatedAnswerer(store, simulate[1], seed + 1))
        counts = run_pipeline(store, root / "data", config, components=components, progress=progress)
        items = collect(store)
        store.close()
    return {"clips": clips, "seed": seed, "model": getattr(components.model, "name", model),
            "answerers_kind": f"simulated {simulate[0]}/{simulate[1]}" if simulate else "model (greedy / sampled)",
            "questions": len(items), "categories": dict(Counter(i["category"] for i in items).most_common()),
            "run": counts, "answerers": outcomes(items),
            "judges": {name: score(items, name) for name in judge_variants()}}


def table(report: dict[str, Any]) -> str:
    """The report as a Markdown table."""
    fmt = lambda v: "n/a" if v is None else (f"{100 * v:.1f} %" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| judge | samples | kept | retention | keep-precision | discard recall (both wrong) | recall (good) |",
             "|---|---|---|---|---|---|---|"]
    for name, s in report["judges"].items():
        lines.append(f"| {name} | {s['samples']} | {s['kept']} | {fmt(s['retention'])} | {fmt(s['keep_precision'])} "
                     f"| {fmt(s['discard_recall_wrong'])} | {fmt(s['recall_good'])} |")
    a = report["answerers"]
    lines.append("")
    lines.append(f"Answerers ({report['answerers_kind']}): A {fmt(a['accuracy_a'])}, B {fmt(a['accuracy_b'])}; "
                 f"outcomes: only A "
                 f"{a['only_a_right']}, only B {a['only_b_right']}, both right {a['both_right']}, both wrong "
                 f"{a['both_wrong']}.")
    return "\n".join(lines)


def write_report(report: dict[str, Any], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2), encoding="utf-8")
