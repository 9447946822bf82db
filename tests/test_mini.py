"""Eureka-mini, the bundled checkpoint: it loads, transcribes a held-out clip, and meets floors on a fixed subset.

The floors are looser than the targets in the model card (the subset is small, so CI stays fast); the full
held-out evaluation is `python -m model.evaluate --model mini --data <dataset>`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model import load_model, task_messages
from model.evaluate import evaluate
from model.loading import MINI_DIR

HELDOUT = MINI_DIR / "heldout"
# Floors for the bundled 12-clip held-out subset (see assets/eureka-mini/README.md for the full-split numbers).
FLOORS = json.loads((HELDOUT / "floors.json").read_text()) if (HELDOUT / "floors.json").is_file() else {}


@pytest.fixture(scope="module")
def mini():
    return load_model("mini")


def test_mini_is_bundled_small_and_described(mini) -> None:
    size_mb = (MINI_DIR / "model.safetensors").stat().st_size / 1e6
    assert size_mb <= 25
    facts = mini.describe()
    assert facts["name"] == "eureka-mini"
    assert "8 routed (top-2) + 1 shared" in facts["experts"]
    assert (MINI_DIR / "README.md").is_file()


def test_mini_transcribes_a_bundled_heldout_example_exactly(mini) -> None:
    """The first ASR record of the bundled held-out subset (a sentence and a voice never heard in training)."""
    record = next(r for r in map(json.loads, open(HELDOUT / "records_test.jsonl")) if r["task"] == "asr")
    audio = record["messages"][-1]["content"][0]["audio_url"]["url"]
    assert mini.generate(task_messages("asr", str(HELDOUT / audio)), max_new_tokens=64) == record["target"]


def test_mini_meets_floors_on_the_fixed_heldout_subset(mini) -> None:
    report = evaluate(mini, Path(HELDOUT), split="test", baseline=False)
    assert report["asr_wer"] <= FLOORS["asr_wer_max"]
    assert report["asr_ctc_beams"] > 1 and report["asr_wer"] <= report["asr_wer_greedy"]  # no worse than greedy here
    assert report["qa_accuracy"] >= FLOORS["qa_accuracy_min"]
    assert report["caption_fact_recall"] >= FLOORS["caption_fact_recall_min"]
    assert report["routing"]["speech_expert_share_of_nonspeech"] < FLOORS["speech_expert_share_of_nonspeech_max"]
    # recall by kind of fact re-adds to the overall recall (each fact counted once, under its first kind)
    by_kind = report["caption_fact_recall_by_kind"].values()
    total = sum(row["facts"] for row in by_kind)
    assert sum(row["recall"] * row["facts"] for row in by_kind) / total == pytest.approx(
        report["caption_fact_recall"], abs=1e-3)
