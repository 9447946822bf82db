"""Load test of the real app: N concurrent ``gradio_client`` users × M requests each, every user with its own clip.

Checks what a crowded Space must get right — zero failures; every user receives the answer for *their* clip (each
answer equals a direct in-process call of the same function on the same clip, greedy, and distinct clips give
distinct answers, so a mixed-up response would show) — and measures latency (p50/p95/max) and the server's resident
memory over all requests (growth after warm-up must stay under 10 %).

  PYTHONPATH=. .venv/bin/python scripts/load_test.py                      # 20 users × 5, then a 2nd round: 200
  PYTHONPATH=. .venv/bin/python scripts/load_test.py --users 4 --requests 2 --rounds 1 --api qa

The app is started here (``python app.py``, ``--model``, default tiny-random) unless ``--url`` points at a running
one (then ``--pid`` lets the memory be read). Writes JSON (``--out``) and a markdown table (``--markdown``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # tests/hostile.py starts and stops the app

from hostile import AppProcess, rss_bytes, start_app, stop_app  # noqa: E402

SR = 16000
QUESTION = "What do you hear in this clip?"


def make_clips(folder: Path, count: int) -> list[Path]:
    """``count`` distinct, deterministic clips: held-out synthetic speech, each a different sentence and voice.

    Distinct sentences are what make "every user gets the answer for their own clip" checkable on /asr. Without
    espeak-ng (installed by scripts/setup.sh) the clips are distinct modulated tones instead.
    """
    from model.data.synth import espeak_available, generate_clip, write_wav
    from model.data.tasks import transcript

    folder.mkdir(parents=True, exist_ok=True)
    if count < 1:
        return []
    if not espeak_available():
        return [_tone_clip(folder / f"user{index:02d}.wav", index) for index in range(count)]
    clips, sentences = [], set()
    for index in range(10 * count):
        audio, meta = generate_clip(index, "test", seed=0)
        sentence = transcript(meta)
        if not sentence or sentence in sentences:
            continue
        sentences.add(sentence)
        path = folder / f"user{len(clips):02d}.wav"
        write_wav(path, audio)
        clips.append(path)
        if len(clips) == count:
            return clips
    raise RuntimeError(f"only {len(clips)} distinct speech clips in the first {10 * count} test clips")


def _tone_clip(path: Path, index: int) -> Path:
    """2–4 s of a modulated tone with noise; pitch, modulation and length differ with ``index``."""
    rng = np.random.default_rng(1000 + index)
    seconds = 2.0 + 0.1 * (index % 20)
    t = np.arange(int(seconds * SR)) / SR
    pitch = 180.0 + 57.0 * index
    signal = 0.3 * np.sin(2 * np.pi * pitch * t) * (1 + 0.5 * np.sin(2 * np.pi * (1 + index % 5) * t))
    signal += 0.05 * rng.standard_normal(len(t))
    sf.write(path, signal.astype(np.float32), SR, subtype="PCM_16")
    return path


def reference_answers(model_source: str, clips: list[Path], api: str, max_new_tokens: int) -> list[str]:
    """What each clip's request must return: the endpoint's own function, called in process on the same model."""
    from app import asr, qa
    from app.common import sampling_settings
    from model import load_model

    model = load_model(model_source)
    if api == "asr":
        return [asr.transcribe(model, str(clip)) for clip in clips]
    settings = sampling_settings(0.0, 0.8, 20, max_new_tokens, 1.05)
    return [qa.ask(model, str(clip), QUESTION, settings) for clip in clips]


@dataclass
class Request:
    user: int
    index: int
    round: int
    latency_s: float
    ok: bool
    matches: bool
    error: str = ""


@dataclass
class LoadReport:
    users: int
    requests_per_user: int
    rounds: int
    api: str
    model: str
    max_new_tokens: int
    total_requests: int = 0
    failures: int = 0
    mismatches: int = 0
    distinct_references: int = 0
    latency_p50_s: float = 0.0
    latency_p95_s: float = 0.0
    latency_max_s: float = 0.0
    throughput_rps: float = 0.0
    wall_s: float = 0.0
    rss_start_mb: float | None = None
    rss_after_warmup_mb: float | None = None
    rss_end_mb: float | None = None
    rss_max_mb: float | None = None
    rss_growth_after_warmup: float | None = None
    errors: list[str] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        growth_ok = self.rss_growth_after_warmup is None or self.rss_growth_after_warmup < 0.10
        return self.failures == 0 and self.mismatches == 0 and self.distinct_references == self.users and growth_ok


class MemoryWatch:
    """Samples the server's RSS every ``interval_s`` in a thread, and on demand at milestones."""

    def __init__(self, pid: int | None, interval_s: float = 0.5):
        self.pid, self.interval_s = pid, interval_s
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def read(self) -> int | None:
        if self.pid is None:
            return None
        try:
            value = rss_bytes(self.pid)
        except (OSError, RuntimeError):
            return None
        self.samples.append(value)
        return value

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.read()

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


def run_load(url: str, clips: list[Path], references: list[str], requests_per_user: int, rounds: int, api: str,
             max_new_tokens: int, watch: MemoryWatch, warmup_requests: int) -> tuple[list[Request], dict]:
    """Each user (its own Client, its own thread) sends its requests one after another; all users at once."""
    from gradio_client import Client, handle_file

    users = len(clips)
    clients = [Client(url, verbose=False) for _ in range(users)]
    done: list[Request] = []
    lock = threading.Lock()
    milestones: dict[str, int | None] = {"start": watch.read()}

    def one_user(user: int, round_index: int) -> None:
        clip = handle_file(str(clips[user]))
        for index in range(requests_per_user):
            started = time.perf_counter()
            try:
                if api == "asr":
                    answer = clients[user].predict(clip, "", api_name="/asr")
                else:
                    answer = clients[user].predict(clip, QUESTION, 0.0, 0.8, 20, max_new_tokens, 1.05,
                                                   api_name="/qa")
                request = Request(user, index, round_index, time.perf_counter() - started, True,
                                  answer == references[user])
            except Exception as exc:  # a load test counts every failure, whatever its type
                request = Request(user, index, round_index, time.perf_counter() - started, False, False,
                                  f"{type(exc).__name__}: {exc}"[:300])
            with lock:
                done.append(request)
                if len(done) == warmup_requests:
                    milestones["after_warmup"] = watch.read()

    for round_index in range(rounds):
        with ThreadPoolExecutor(max_workers=users) as pool:
            list(pool.map(lambda user, r=round_index: one_user(user, r), range(users)))
    milestones["end"] = watch.read()
    for client in clients:
        client.close()
    return done, milestones


def summarise(report: LoadReport, done: list[Request], milestones: dict, watch: MemoryWatch, wall_s: float,
              references: list[str]) -> LoadReport:
    latencies = [r.latency_s for r in done if r.ok]
    mb = lambda value: None if value is None else round(value / 1024**2, 1)  # noqa: E731
    report.total_requests = len(done)
    report.failures = sum(not r.ok for r in done)
    report.mismatches = sum(r.ok and not r.matches for r in done)
    report.distinct_references = len(set(references))
    report.latency_p50_s = round(percentile(latencies, 50), 3)
    report.latency_p95_s = round(percentile(latencies, 95), 3)
    report.latency_max_s = round(max(latencies, default=0.0), 3)
    report.wall_s = round(wall_s, 1)
    report.throughput_rps = round(len(done) / wall_s, 3) if wall_s else 0.0
    report.rss_start_mb = mb(milestones.get("start"))
    report.rss_after_warmup_mb = mb(milestones.get("after_warmup"))
    report.rss_end_mb = mb(milestones.get("end"))
    report.rss_max_mb = mb(max(watch.samples, default=None) if watch.samples else None)
    if milestones.get("after_warmup") and milestones.get("end"):
        report.rss_growth_after_warmup = round(milestones["end"] / milestones["after_warmup"] - 1, 4)
    report.errors = sorted({r.error for r in done if r.error})[:10]
    return report


def markdown(report: LoadReport) -> str:
    rows = [
        ("users × requests × rounds", f"{report.users} × {report.requests_per_user} × {report.rounds} "
                                      f"= {report.total_requests} requests to /{report.api}"),
        ("model", f"{report.model} (max_new_tokens {report.max_new_tokens if report.api == 'qa' else 512}, "
                  "greedy)"),
        ("failures", str(report.failures)),
        ("answers ≠ in-process reference", str(report.mismatches)),
        ("distinct answers for distinct clips", f"{report.distinct_references} of {report.users}"),
        ("latency p50 / p95 / max", f"{report.latency_p50_s:.2f} s / {report.latency_p95_s:.2f} s / "
                                    f"{report.latency_max_s:.2f} s"),
        ("throughput", f"{report.throughput_rps:.2f} requests/s over {report.wall_s:.0f} s"),
        ("server RSS start / after warm-up / end / max", f"{report.rss_start_mb} / {report.rss_after_warmup_mb} / "
                                                         f"{report.rss_end_mb} / {report.rss_max_mb} MB"),
        ("RSS growth after warm-up", "n/a" if report.rss_growth_after_warmup is None
         else f"{100 * report.rss_growth_after_warmup:+.1f} % (limit +10 %)"),
        ("verdict", "PASS" if report.passed else "FAIL"),
    ]
    lines = ["| measure | value |", "|---|---|"] + [f"| {name} | {value} |" for name, value in rows]
    machine = report.machine
    lines.append(f"\n{machine.get('cpus')} CPUs, {machine.get('platform')}, server concurrency "
                 f"{machine.get('concurrency')}, queue {machine.get('max_queue')}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--requests", type=int, default=5, help="requests per user per round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds (the default 2 × 20 × 5 = 200 requests)")
    parser.add_argument("--api", choices=("asr", "qa"), default="asr")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="for --api qa")
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--url", help="a running app (default: start python app.py here)")
    parser.add_argument("--pid", type=int, help="the running app's process id (for its memory)")
    parser.add_argument("--concurrency", type=int, default=1, help="the started app's EUREKA_CONCURRENCY")
    parser.add_argument("--warmup", type=int, default=None, help="requests before the memory baseline "
                        "(default: one per user)")
    parser.add_argument("--out", default="runs/load_test.json")
    parser.add_argument("--markdown", default="runs/load_test.md")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="eureka-load-"))
    clips = make_clips(work / "clips", args.users)
    print(f"computing {len(clips)} reference answers in process…", flush=True)
    references = reference_answers(args.model, clips, args.api, args.max_new_tokens)
    app: AppProcess | None = None
    max_queue = max(32, 2 * args.users)
    if args.url:
        url, pid = args.url, args.pid
    else:
        env = {"EUREKA_MODEL": args.model, "EUREKA_CONCURRENCY": str(args.concurrency),
               "EUREKA_MAX_QUEUE": str(max_queue), "GRADIO_TEMP_DIR": str(work / "gradio")}
        app = start_app(env, work / "app.log")
        url, pid = app.url, app.process.pid
    report = LoadReport(users=args.users, requests_per_user=args.requests, rounds=args.rounds, api=args.api,
                        model=args.model, max_new_tokens=args.max_new_tokens,
                        machine={"cpus": os.cpu_count(), "platform": platform.platform(),
                                 "concurrency": args.concurrency, "max_queue": max_queue})
    try:
        print(f"{args.users} users × {args.requests} requests × {args.rounds} rounds against {url}", flush=True)
        with MemoryWatch(pid) as watch:
            started = time.perf_counter()
            done, milestones = run_load(url, clips, references, args.requests, args.rounds, args.api,
                                        args.max_new_tokens, watch, args.warmup or args.users)
            wall_s = time.perf_counter() - started
        summarise(report, done, milestones, watch, wall_s, references)
    finally:
        if app is not None:
            stop_app(app)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({**asdict(report), "passed": report.passed,
                                          "latencies_s": sorted(round(r.latency_s, 3) for r in done)}, indent=1))
    table = markdown(report)
    Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
    Path(args.markdown).write_text(table + "\n")
    print(table)
    print(f"\nJSON: {args.out}  markdown: {args.markdown}")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
