"""``python -m bench``: run the benchmarks, write ``bench.json`` and ``bench.md`` (see docs/performance.md).

Examples::

    python -m bench --models official,mini --out runs/bench          # everything, as in docs/performance.md
    python -m bench --models mini --parts decode,concurrency          # a subset
    python -m bench --models tiny-random --quick                      # seconds; what tests/test_bench.py runs
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from model.ctc import RERANK_BEAMS
from model.quantize import backbone_weight_bytes, quantize_int8

from . import suites
from .measure import QUIET, Timer, load_bench_model, machine, memory_bandwidth, wait_for_quiet
from .report import markdown

CONCURRENCY_CONFIGS = ("reference", "fast", "fast+batching", "fast+fixed-batches", "fast+batching+trim")
PARTS = ("bandwidth", "decode", "compiled", "ttft", "cache", "concurrency", "trim", "int8", "quality", "rerank",
         "profile")
DEFAULT_PARTS = {
    "official": ("bandwidth", "decode", "ttft", "cache", "trim", "int8", "profile"),
    "mini": ("bandwidth", "decode", "compiled", "ttft", "cache", "concurrency", "trim", "int8", "quality", "rerank"),
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="official,mini", help="comma-separated: official, mini, tiny-random")
    parser.add_argument("--parts", help=f"comma-separated subset of {', '.join(PARTS)} (default: per model)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--data", type=Path, default=Path("runs/synth"), help="held-out clips (mini's eval data)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--levels", default="1,4,8", help="concurrent clients")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1,
                        help="concurrency: repeat the levels this many times, interleaved; report each one's median")
    parser.add_argument("--configs", help=f"concurrency: comma-separated subset of {', '.join(CONCURRENCY_CONFIGS)} "
                        "(default: all that apply to the model)")
    parser.add_argument("--quality-limit", type=int, default=40, help="held-out clips for the quality checks")
    parser.add_argument("--clips", default="10,30", help="clip seconds for time to first token")
    parser.add_argument("--quiet-wait", type=float, default=120.0,
                        help="before each timed run, wait up to this many seconds for other processes to go idle")
    parser.add_argument("--quick", action="store_true", help="tiny sizes everywhere (smoke test)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.configs and (unknown := set(args.configs.split(",")) - set(CONCURRENCY_CONFIGS)):
        parser.error(f"--configs: unknown {', '.join(sorted(unknown))} (known: {', '.join(CONCURRENCY_CONFIGS)})")
    if args.quick:
        args.repeats, args.new_tokens, args.levels, args.requests_per_client = 1, 8, "1,2", 1
        args.quality_limit, args.clips, args.quiet_wait = 2, "2,4", 0.0
    return args


def run_model(name: str, args: argparse.Namespace, bandwidth: dict[str, Any] | None) -> dict[str, Any]:
    default = DEFAULT_PARTS["mini"] if Path(name).is_dir() else DEFAULT_PARTS.get(name, PARTS)
    parts = args.parts.split(",") if args.parts else default
    dtype = torch.bfloat16 if name == "official" else torch.float32
    with Timer() as load:
        model, note = load_bench_model(name, dtype)
    data = args.data if args.data.is_dir() else None
    out: dict[str, Any] = {"note": note, "load_s": round(load.seconds, 1), "describe": model.describe(),
                           "weight_bytes_per_token": backbone_weight_bytes(model.model.backbone)}
    bw = None
    if bandwidth:
        bw = max(bandwidth["read_GBps"], bandwidth["copy_read_GBps"])
    clip_seconds = tuple(float(s) for s in args.clips.split(","))
    engines = ["reference", "fast"] + (["compiled"] if "compiled" in parts else [])

    def step(part: str, fn, *a, **kw) -> None:
        if part in parts:
            print(f"[bench] {name}: {part} …", file=sys.stderr, flush=True)
            load_before = os.getloadavg()[0]
            with Timer() as t:
                out[part] = fn(*a, **kw)
            out.setdefault("part_seconds", {})[part] = round(t.seconds, 1)
            out.setdefault("part_load_average", {})[part] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
            print(f"[bench] {name}: {part} done in {t.seconds:.0f} s", file=sys.stderr, flush=True)

    step("decode", suites.decode, model, engines, args.new_tokens, args.repeats, 10.0 if not args.quick else 2.0,
         data, bw, "bf16" if dtype == torch.bfloat16 else "fp32")
    step("ttft", suites.ttft, model, ["reference", "fast"], clip_seconds, args.repeats, data)
    step("cache", suites.encoder_cache, model, "fast", clip_seconds[-1], args.repeats, data)
    # The model's own encoder window (full for the official model; trimmed for Eureka-mini, which was trained that
    # way) is the baseline; "trim" measures the other one.
    own_trim = model.trim_encoder
    out["other_window"] = "full" if own_trim else "trimmed"
    if "trim" in parts:
        def other_window() -> dict[str, Any]:
            model.trim_encoder = not own_trim
            try:
                return suites.ttft(model, ["fast"], clip_seconds, args.repeats, data)
            finally:
                model.trim_encoder = own_trim
        step("trim", other_window)
    levels = tuple(int(x) for x in args.levels.split(","))
    configs = ("reference", "fast", "fast+batching") + (("fast+fixed-batches",) if model.decoder().joinable else ()) \
        + (() if own_trim else ("fast+batching+trim",))
    if args.configs:  # those that apply to this model
        configs = tuple(c for c in configs if c in args.configs.split(","))
    step("concurrency", suites.concurrency, model, levels, configs, args.new_tokens, args.requests_per_client,
         5.0 if not args.quick else 1.0, data, rounds=args.rounds)
    step("profile", lambda: {e: suites.profile_decode(model, e, 8, 10.0 if not args.quick else 2.0, data)
                             for e in ("reference", "fast")})
    if "rerank" in parts:
        if data is None:
            out["rerank"] = {"skipped": "needs held-out speech with transcripts (--data)"}
        else:
            step("rerank", suites.asr_rerank, model, data, args.quality_limit, RERANK_BEAMS)
    trained = "quality" in parts and data is not None and note.startswith("Eureka-mini (trained")
    if trained:
        def quality() -> dict[str, Any]:
            result = {"float": suites.evaluation(model, data, args.quality_limit)}
            model.trim_encoder = not own_trim
            try:
                result[f"{out['other_window']}_window_encoder"] = suites.evaluation(model, data, args.quality_limit)
            finally:
                model.trim_encoder = own_trim
            return result
        step("quality", quality)
    elif "quality" in parts:
        out["quality"] = {"skipped": "needs the trained Eureka-mini and its held-out data (--data)"}
    if "int8" in parts:
        reference_copy = load_bench_model(name, dtype)[0] if name != "official" else None
        with Timer() as quantizing:
            info = quantize_int8(model)
        gc.collect()
        info["quantize_s"] = round(quantizing.seconds, 1)
        out["int8"] = {"quantization": info}
        print(f"[bench] {name}: int8 decode …", file=sys.stderr, flush=True)
        out["int8"]["decode"] = suites.decode(model, ["reference", "fast"], args.new_tokens, args.repeats,
                                              10.0 if not args.quick else 2.0, data, bw, "int8",
                                              compare_layouts=False)
        if reference_copy is not None:
            out["int8"]["drift_vs_float"] = suites.logits_agreement(reference_copy, model, data_dir=data,
                                                                    n_prompts=4 if not args.quick else 1,
                                                                    new_tokens=32 if not args.quick else 8)
        if trained:
            print(f"[bench] {name}: int8 quality …", file=sys.stderr, flush=True)
            out["quality"]["int8"] = suites.evaluation(model, data, args.quality_limit)
    if "trim" in parts and name != "official" and not args.quick:
        fresh = load_bench_model(name, dtype)[0]
        other_model = load_bench_model(name, dtype)[0]
        other_model.trim_encoder = not own_trim
        out["other_window_drift"] = suites.logits_agreement(fresh, other_model, data_dir=data)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    QUIET["max_wait_s"] = args.quiet_wait
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "command": "python -m bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(),
        "models": {},
    }
    models = [m for m in args.models.split(",") if m]
    wants_bandwidth = any("bandwidth" in (args.parts.split(",") if args.parts else DEFAULT_PARTS.get(m, PARTS))
                          for m in models)
    if wants_bandwidth:
        wait_for_quiet()
        report["bandwidth"] = memory_bandwidth(64 if args.quick else 1024, 2 if args.quick else 5)
    for name in models:
        report["models"][name] = run_model(name, args, report.get("bandwidth"))
        (args.out / "bench.json").write_text(json.dumps(report, indent=2))  # partial results survive a crash
    report["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    (args.out / "bench.json").write_text(json.dumps(report, indent=2))
    (args.out / "bench.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
