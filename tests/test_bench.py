"""Benchmarks are not tests, but each one runs once here on tiny-random so none of them can rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import main
from bench.measure import TokenTimes, percentile
from bench.report import _quality_table

ROOT = Path(__file__).resolve().parent.parent


def test_every_benchmark_runs_once_on_tiny_random(tmp_path: Path) -> None:
    parts = "bandwidth,decode,ttft,cache,concurrency,trim,int8,profile"
    assert main(["--models", "tiny-random", "--quick", "--parts", parts, "--out", str(tmp_path),
                 "--data", str(tmp_path / "no-data")]) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    tiny = report["models"]["tiny-random"]
    assert report["bandwidth"]["copy_GBps"] > 0 and report["machine"]["cpus"] >= 1
    decode = tiny["decode"]["engines"]
    assert set(decode) == {"reference", "fast", "fast, module step"} and decode["fast"]["tokens_per_s"]["mean"] > 0
    assert decode["fast, module step"]["tokens_per_s"]["mean"] > 0  # tiny-random is a Qwen3: the fused step is on
    assert decode["fast"]["speedup_vs_reference"] > 0 and decode["fast"]["percent_of_bound"] > 0
    assert set(tiny["ttft"]) == {"2s", "4s"} and tiny["trim"]["4s"]["engines"]["fast"]["ttft_s"]["mean"] > 0
    assert tiny["cache"]["second_question_speedup"] > 0
    concurrency = tiny["concurrency"]["configs"]
    assert set(concurrency) == {"reference", "fast", "fast+batching", "fast+fixed-batches", "fast+batching+trim"}
    assert concurrency["fast+batching"]["2"]["tokens"] == 2 * 8 and concurrency["fast+batching"]["2"]["batch_sizes"]
    assert concurrency["fast+fixed-batches"]["2"]["mean_rows"] == []  # fixed batches do not go through the rows
    assert tiny["int8"]["decode"]["engines"]["fast"]["tokens_per_s"]["mean"] > 0
    assert tiny["int8"]["drift_vs_float"]["logits_max_rel_diff"][0] < 0.1
    assert tiny["profile"]["fast"][0]["self_ms"] >= 0
    text = (tmp_path / "bench.md").read_text()
    for heading in ("Decode", "Time to first token", "Encoder-output cache", "Concurrency", "int8", "Profile"):
        assert heading in text


def test_quality_table_and_helpers() -> None:
    row = {"clips": 3, "asr_wer": 0.1, "qa_accuracy": 0.9, "caption_fact_recall": 0.8,
           "speech_expert_share_of_nonspeech": 0.05, "generation_seconds": 12.0}
    table = "\n".join(_quality_table({"float": row, "int8": row}))
    assert "| int8 | 3 | 10.0% | 90.0% | 80.0% | 5.0% | 12 |" in table
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0 and percentile([1.0, 2.0], 95) == pytest.approx(1.95)
    times = TokenTimes()
    for _ in range(3):
        times.put(None)
    assert len(times.times) == 2 and times.decode_tokens_per_s() > 0


def test_gpu_bench_runs_on_cpu_with_a_tiny_config(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_bench.py"), "--device", "cpu", "--preset",
                    "tiny-random", "--new-tokens", "8", "--prompt-tokens", "16", "--repeats", "1",
                    "--engines", "reference,fast,greedy-compiled-cdt", "--out", str(out)], check=True, cwd=ROOT,
                   capture_output=True,
                   env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    result = json.loads(out.read_text())
    assert result["paper_tokens_per_s"] == 269.7
    assert all(result["engines"][e]["tokens_per_s"] > 0 for e in ("reference", "fast", "greedy-compiled-cdt"))


def test_concurrency_rounds_report_the_median_of_interleaved_runs(tmp_path: Path) -> None:
    assert main(["--models", "tiny-random", "--quick", "--parts", "concurrency", "--configs", "fast+batching",
                 "--rounds", "3", "--out", str(tmp_path), "--data", str(tmp_path / "no-data")]) == 0
    conc = json.loads((tmp_path / "bench.json").read_text())["models"]["tiny-random"]["concurrency"]
    assert list(conc["configs"]) == ["fast+batching"] and conc["rounds"] == 3
    for row in conc["configs"]["fast+batching"].values():
        rounds = row["rounds_tokens_per_s"]
        assert len(rounds) == 3 and row["aggregate_tokens_per_s"] == sorted(rounds)[1]
    assert "3 interleaved rounds, the median shown" in (tmp_path / "bench.md").read_text()


@pytest.mark.parametrize("bad", [["--rounds", "0"], ["--configs", "fast,turbo"]])
def test_bad_concurrency_options_are_refused_with_a_message(bad: list[str], capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--models", "tiny-random", "--quick", "--parts", "concurrency", *bad])
    assert ("--rounds must be at least 1" if bad[0] == "--rounds" else "unknown turbo") in capsys.readouterr().err


def test_rerank_benchmark_times_both_decodings_on_heldout_speech(tmp_path: Path) -> None:
    """Eureka-mini on the bundled held-out subset: both decodings timed on the same utterances, WER beside time."""
    from model.loading import MINI_DIR

    assert main(["--models", "mini", "--quick", "--parts", "rerank", "--out", str(tmp_path),
                 "--data", str(MINI_DIR / "heldout")]) == 0  # --quick: the first 2 utterances
    rerank = json.loads((tmp_path / "bench.json").read_text())["models"]["mini"]["rerank"]
    assert rerank["utterances"] == 2 and set(rerank["variants"]) == {"greedy", "6 beams re-ranked"}
    assert all(len(v["seconds"]["runs"]) == 2 and 0 <= v["wer"] <= 1 for v in rerank["variants"].values())
    assert rerank["time_ratio_vs_greedy"] > 0
    assert "greedy vs beams re-ranked by the CTC head" in (tmp_path / "bench.md").read_text()
    assert main(["--models", "tiny-random", "--quick", "--parts", "rerank", "--out", str(tmp_path / "tiny"),
                 "--data", str(MINI_DIR / "heldout")]) == 0
    tiny = json.loads((tmp_path / "tiny" / "bench.json").read_text())["models"]["tiny-random"]
    assert tiny["rerank"] == {"skipped": "the model has no CTC head"}
