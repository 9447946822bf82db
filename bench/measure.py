"""Measuring instruments: token timestamps, peak RSS, memory bandwidth, random-weight models, test clips.

Each is small and independent so a benchmark reads as "set up, run, read the instrument".
"""

from __future__ import annotations

import math
import os
import re
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.generation.streamers import BaseStreamer

from model.config import PRESETS, EurekaConfig
from model.inference import EurekaAudio
from model.loading import MINI_DIR, build_model, load_model
from model.tokenizer import byte_level_tokenizer

SR = 16000


# --- time ---------------------------------------------------------------------------------------------------------
class TokenTimes(BaseStreamer):
    """A streamer that only records when each new token arrives (the first ``put`` is the prompt)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.prompt_at: float | None = None
        self.times: list[float] = []
        self.ended_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        now = time.perf_counter()
        if self.prompt_at is None:
            self.prompt_at = now
        else:
            self.times.append(now)

    def end(self) -> None:
        self.ended_at = time.perf_counter()

    @property
    def first_token_s(self) -> float:
        return self.times[0] - self.start

    def decode_tokens_per_s(self) -> float:
        """Tokens after the first one over the time they took: decode alone, prefill excluded."""
        if len(self.times) < 2:
            return float("nan")
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) without numpy's edge-case surprises for tiny samples."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary(values: list[float]) -> dict[str, float]:
    return {"runs": [round(v, 4) for v in values], "mean": round(statistics.fmean(values), 4)}


# --- a quiet machine ----------------------------------------------------------------------------------------------
QUIET = {"max_wait_s": 0.0, "threshold": 0.08}  # set by the CLI (--quiet-wait); 0 disables waiting


def _cpu_times() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return idle, sum(fields)


def cpu_busy(interval: float = 0.5) -> float:
    """Fraction of all CPUs busy over ``interval`` seconds (other processes included)."""
    idle0, total0 = _cpu_times()
    time.sleep(interval)
    idle1, total1 = _cpu_times()
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def wait_for_quiet() -> float:
    """Wait (up to ``QUIET['max_wait_s']``) until no other process uses the CPUs; returns the last busy fraction.

    On a 2-core machine one busy neighbour makes every parallel kernel wait a scheduler time slice for its second
    thread (elementwise ops measured at 1-5 ms instead of 20 µs), so timings taken then are meaningless.
    """
    if QUIET["max_wait_s"] <= 0:
        return float("nan")
    deadline = time.monotonic() + QUIET["max_wait_s"]
    busy = cpu_busy()
    while busy > QUIET["threshold"] and time.monotonic() < deadline:
        busy = cpu_busy(1.0)
    return round(busy, 3)


# --- memory -------------------------------------------------------------------------------------------------------
def _status_kb(field_name: str) -> int:
    match = re.search(rf"{field_name}:\s+(\d+)", Path("/proc/self/status").read_text())
    return int(match.group(1)) if match else 0


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


@contextmanager
def peak_rss() -> Any:
    """Peak resident set size (MB) of this process during the block; Linux resets VmHWM via clear_refs=5."""
    result: dict[str, float] = {}
    try:
        Path("/proc/self/clear_refs").write_text("5")
        resettable = True
    except OSError:
        resettable = False
    result["before_mb"] = rss_mb()
    yield result
    result["peak_mb"] = _status_kb("VmHWM") / 1024
    result["resettable"] = resettable


def memory_bandwidth(size_mb: int = 1024, repeats: int = 5) -> dict[str, float]:
    """STREAM-style: ``copy_`` of a large buffer (read + write bytes) and a read-only ``sum`` (read bytes), GB/s.

    The best of ``repeats`` is reported, as STREAM does. Buffers are far larger than the last-level cache.
    """
    n = size_mb * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    copy_s, read_s = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        copy_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        float(src.sum())
        read_s.append(time.perf_counter() - t)
    nbytes = n * 4
    return {
        "buffer_mb": size_mb,
        "copy_GBps": round(2 * nbytes / min(copy_s) / 1e9, 2),  # read + write
        "copy_read_GBps": round(nbytes / min(copy_s) / 1e9, 2),  # the read side of the copy alone
        "read_GBps": round(nbytes / min(read_s) / 1e9, 2),  # read-only reduction
        "threads": torch.get_num_threads(),
    }


# --- models -------------------------------------------------------------------------------------------------------
def fill_random_(module: torch.nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Cheap deterministic weights in place: uniform with the given std, norms 1, biases 0.

    Skipped initialisation leaves whatever the allocator returned (NaNs, denormals), which would distort timings.
    """
    generators: dict[torch.device, torch.Generator] = {}  # a generator must live on its tensor's device (CUDA)
    bound = std * math.sqrt(3.0)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif param.dim() == 1:  # RMSNorm / LayerNorm weights
                param.fill_(1.0)
            else:
                if param.device not in generators:
                    generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
                param.uniform_(-bound, bound, generator=generators[param.device])


def official_random(dtype: torch.dtype = torch.bfloat16) -> EurekaAudio:
    """The full architecture (Whisper-large-v3 encoder + adapter + Qwen3-1.7B) with random weights, built in ``dtype``.

    Built without random initialisation (≈35 s saved) and filled cheaply; the byte-level tokenizer stands in for
    the Qwen tokenizer (not available offline), which only changes how text maps to ids, not the compute.
    """
    return random_model(PRESETS["official"](), dtype, name="official-random")


def random_model(config: EurekaConfig, dtype: torch.dtype, name: str) -> EurekaAudio:
    model = build_model(config, dtype, init=False)
    fill_random_(model)
    return EurekaAudio(model, byte_level_tokenizer(), name=name)


def load_bench_model(name: str, dtype: torch.dtype = torch.float32) -> tuple[EurekaAudio, str]:
    """``official`` (random bf16), ``mini`` (falls back to tiny-random when not bundled yet), ``tiny-random``.

    Returns the model and a note saying what was actually loaded.
    """
    if name == "official":
        return official_random(dtype), "official architecture, random weights, built in " + str(dtype)[6:]
    if name == "mini":
        if (MINI_DIR / "config.json").is_file():
            return load_model("mini", dtype=dtype), "Eureka-mini (trained checkpoint)"
        return load_model("tiny-random", dtype=dtype), "Eureka-mini not bundled yet: tiny-random stands in"
    if Path(name).is_dir():
        return load_model(name, dtype=dtype), f"Eureka-mini (trained checkpoint at {name})"
    return load_model(name, dtype=dtype), name


# --- clips --------------------------------------------------------------------------------------------------------
def test_clip(seconds: float, data_dir: Path | None = None, offset: int = 0) -> np.ndarray:
    """``seconds`` of audio: held-out synthetic clips (speech and sounds) concatenated when available, else tones.

    ``offset`` picks a different starting clip, so concurrent requests do not share encoder-cache entries.
    """
    n = int(round(seconds * SR))
    if data_dir is not None and (data_dir / "manifest.jsonl").is_file():
        import json

        import soundfile as sf

        metas = [json.loads(line) for line in (data_dir / "manifest.jsonl").read_text().splitlines() if line]
        metas = [m for m in metas if m["split"] == "test"] or metas
        pieces, total, i = [], 0, offset
        while total < n:
            samples, rate = sf.read(data_dir / metas[i % len(metas)]["audio"], dtype="float32")
            if rate != SR:
                raise ValueError(f"expected {SR} Hz test clips, got {rate}")
            pieces.append(samples if samples.ndim == 1 else samples.mean(axis=1))
            total += len(pieces[-1])
            i += 1
        return np.concatenate(pieces)[:n].astype(np.float32)
    rng = np.random.default_rng(offset)
    t = np.arange(n) / SR
    freq = 220.0 * (1 + offset % 7)
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.02 * rng.standard_normal(n)).astype(np.float32)


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "torch": torch.__version__}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu"] = re.search(r"model name\s+:\s+(.+)", cpuinfo).group(1)
        flags = re.search(r"flags\s+:\s+(.+)", cpuinfo).group(1).split()
        info["isa"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16") if f in flags]
    except (OSError, AttributeError):
        pass
    try:
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return info


@dataclass
class Timer:
    """Wall time of a block, in seconds."""

    seconds: float = 0.0
    _start: float = field(default=0.0, repr=False)

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self._start
