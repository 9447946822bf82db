"""Batch-1 bf16 decode tokens/s of the official architecture on one GPU, beside the paper's 269.7 tokens/s.

For a lent H100/H200 machine (no GPU here)::

    python scripts/gpu_bench.py --device cuda --out gpu_bench.json --profile greedy-compiled-cdt
    python scripts/gpu_bench.py --device cpu --preset tiny-random --new-tokens 16   # smoke test anywhere

It needs torch with CUDA, transformers >= 5.24 and what ``model`` imports (soundfile, soxr, openai-whisper's
``whisper`` package). On a machine without them, carry wheels (``pip download --no-deps --only-binary=:all:
--python-version 3.12 ... transformers==5.24.0 soundfile soxr cffi pycparser more-itertools``) plus a copy of the
``whisper`` package, install them with ``pip install --no-index --no-deps --target /tmp/site`` and put that and the
copy on ``PYTHONPATH``. Results measured this way are in ``docs/performance.md`` section (c) and ``docs/gpu/``.

The model is the full architecture with random weights, built directly on the device in bf16 (no random
initialisation cost, then a cheap deterministic fill). Decode speed does not depend on the weights' values, and
only the backbone runs per token. Engines, all batch 1 and greedy with EOS ignored:

* ``reference``   — transformers ``generate()`` with the default dynamic cache (how the official code runs);
* ``fast``        — our static-cache loop (``model.fast_decode.FastDecoder``), its step launched eagerly;
* ``fast-cudagraph`` — the same loop with its step replayed as a captured CUDA graph (``CudaGraphStep``);
* ``fused-cudagraph`` — the step as ``FusedQwen3Step`` (half the kernels: q/k/v and gate/up as one matmul each, RoPE
  from a table) in its graph-safe form, replayed as a CUDA graph;
* ``fused-compiled`` — the fused step compiled with ``mode="reduce-overhead"`` (inductor fuses the norms, RoPE and
  activation into a few kernels, then CUDA graphs);
* ``greedy-graph`` — the fused graph-safe step, its argmax, repetition penalty and bookkeeping captured as one CUDA
  graph per cache (``GreedyStepGraph``): a token is one graph launch;
* ``greedy-compiled[-autotune][-cdt]`` — the same with the fused step compiled (inductor's kernels, no
  torch.compile graphs: ours hold the whole step); with inductor's ``max_autotune`` (Triton GEMM templates timed
  against cuBLAS) and/or ``coordinate_descent_tuning`` (its own kernels' block sizes tuned). ``greedy-compiled-cdt``
  is the app's ``"compiled"`` engine on a GPU;
* ``app``         — the app's own path, ``EurekaAudio.generate_ids(engine="fast")`` (CUDA graphs by default on a GPU);
* ``app-compiled`` — the app's ``"compiled"`` engine;
* ``fast-graphs`` — the loop with its step compiled with ``mode="reduce-overhead"`` (inductor kernels + CUDA graphs);
* ``hf-static``   — transformers ``generate(cache_implementation="static")`` (transformers compiles the decode
  step itself on CUDA).

Each engine's greedy tokens are compared with those of ``reference`` and ``fast`` when they ran earlier in the same
run (``agree_with_*``: how many leading tokens are equal). On random bf16 weights the logits are nearly flat, so
kernels that round differently flip near-ties early: this is a sanity signal, not the correctness check — that is
``tests/test_fast_decode.py`` (graph replay equals the eager step exactly; the app's GPU decoder equals the reference
path in float32), run on the GPU machine too. Results are written after every engine, so a run cut short still
reports what it measured.

The paper's figure (reference doc section 7) is an average over 200 samples of up to 2000 new tokens on H100s,
batch size and engine not stated; ``--new-tokens 2000`` gets closer to that setting. The memory-bandwidth bound
(measured read bandwidth / bf16 weight bytes per token) is printed beside the measurements.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402

PAPER_TOKENS_PER_S = 269.7
ENGINES = ("reference", "fast-cudagraph", "fused-cudagraph", "fused-compiled", "greedy-graph", "greedy-compiled",
           "greedy-compiled-cdt", "app", "app-compiled", "fast", "fast-graphs", "hf-static")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_bandwidth_GBps(device: torch.device, size_mb: int = 1024, repeats: int = 10) -> float:
    """Copy bandwidth (read + write bytes) of a large on-device buffer, best of ``repeats``."""
    n = size_mb * 2**20 // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n * 4 / best / 1e9


def device_read_bandwidth_GBps(device: torch.device, size_mb: int = 1024, repeats: int = 10) -> float:
    """Read-only bandwidth (a sum over a large buffer, best of ``repeats``): what a decode step's weight reads see."""
    src = torch.ones(size_mb * 2**20 // 4, device=device)
    src.sum()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        src.sum()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return src.numel() * 4 / best / 1e9


def build(preset: str, device: torch.device):
    """EurekaAudio with random bf16 weights, allocated on ``device`` directly."""
    from bench.measure import fill_random_
    from model.config import PRESETS
    from model.inference import EurekaAudio
    from model.loading import build_model
    from model.tokenizer import byte_level_tokenizer

    tokenizer = byte_level_tokenizer()
    config = PRESETS[preset]() if preset == "official" else PRESETS[preset](vocab_size=len(tokenizer))
    with torch.device(device):
        network = build_model(config, torch.bfloat16, init=False)
    fill_random_(network)
    return EurekaAudio(network, tokenizer, name=f"{preset}-random")


def prompt(model, n_tokens: int, seed: int = 0):
    """A text prompt of ``n_tokens`` random ids (decode cost depends on the context length, not on its content)."""
    from model.inference import PreparedInputs

    generator = torch.Generator().manual_seed(seed)
    vocab = model.model.backbone.config.vocab_size
    ids = torch.randint(0, vocab, (1, n_tokens), generator=generator).to(model.device)
    with torch.inference_mode():
        embeds = model.model.backbone.get_input_embeddings()(ids)
    return PreparedInputs(ids, embeds, torch.ones_like(ids), [None])


DECODERS: dict[str, object] = {}


def run_engine(model, prepared, engine: str, new_tokens: int, device: torch.device) -> dict:
    from bench.measure import TokenTimes
    from model.inference import GenerationSettings

    settings = GenerationSettings(max_new_tokens=new_tokens, temperature=0.0)
    config = settings.to_generation_config(model.special_ids)
    config.eos_token_id = None  # exactly new_tokens tokens
    times = TokenTimes()
    sync(device)
    with torch.inference_mode():
        if engine in ("reference", "hf-static"):
            extra = {"cache_implementation": "static"} if engine == "hf-static" else {}
            ids = model.model.backbone.generate(**prepared.generate_kwargs(), generation_config=config,
                                                streamer=times, **extra)
        elif engine in ("app", "app-compiled"):
            ids = model.generate_ids(prepared, settings, engine="compiled" if engine == "app-compiled" else "fast",
                                     streamer=times, ignore_eos=True)
        else:
            if engine not in DECODERS:
                DECODERS[engine] = decoder_for(engine, model.model.backbone)
            ids = DECODERS[engine].decode(prepared.input_ids, prepared.inputs_embeds, prepared.attention_mask,
                                          config, streamer=times, ignore_eos=True)
    sync(device)
    new_ids = ids[0, -new_tokens:].tolist()
    return {"tokens_per_s": times.decode_tokens_per_s(), "ttft_s": times.first_token_s, "tokens": len(times.times),
            "ids": new_ids}


def decoder_for(engine: str, backbone):
    """The ``FastDecoder`` an engine name stands for (see the module docstring)."""
    from model.fast_decode import FastDecoder

    if engine.startswith("greedy-"):
        parts = set(engine.split("-")[1:])
        options = {"max_autotune": "autotune" in parts, "coordinate_descent_tuning": "cdt" in parts}
        return FastDecoder(backbone, compile_step="compiled" in parts, fused=True, cuda_graphs=True,
                           greedy_graphs=True, compile_options={k: v for k, v in options.items() if v} or None)
    compiled = engine in ("fast-graphs", "fused-compiled")
    return FastDecoder(backbone, compile_step=compiled, compile_mode="reduce-overhead" if compiled else None,
                       cuda_graphs=engine.endswith("cudagraph"), fused=engine.startswith("fused"),
                       greedy_graphs=False)


def leading_agreement(ids: list[int], other: list[int]) -> int:
    """How many leading tokens two greedy decodes share."""
    for i, (a, b) in enumerate(zip(ids, other, strict=False)):
        if a != b:
            return i
    return min(len(ids), len(other))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="official", choices=["official", "tiny-random"])
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--profile", default="", help="engines to profile after timing (comma-separated): the "
                        "top GPU kernels of a --new-tokens decode go to <out>.<engine>.profile.txt")
    args = parser.parse_args(argv)

    from model.quantize import backbone_weight_bytes

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no GPU is visible; use --device cpu for a smoke test")
    torch.manual_seed(0)
    started = time.perf_counter()
    model = build(args.preset, device)
    built_s = time.perf_counter() - started
    prepared = prompt(model, args.prompt_tokens)
    weight_bytes = backbone_weight_bytes(model.model.backbone)
    bandwidth = device_bandwidth_GBps(device, 1024 if device.type == "cuda" else 256)
    read_bandwidth = device_read_bandwidth_GBps(device, 1024 if device.type == "cuda" else 256)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "preset": args.preset,
        "dtype": "bfloat16", "batch": 1, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "build_s": round(built_s, 1), "weight_bytes_per_token": weight_bytes,
        "copy_bandwidth_GBps": round(bandwidth, 1), "read_bandwidth_GBps": round(read_bandwidth, 1),
        # decode reads every weight once per token
        "bandwidth_bound_tokens_per_s": round(read_bandwidth * 1e9 / weight_bytes, 1),
        "paper_tokens_per_s": PAPER_TOKENS_PER_S, "engines": {},
    }
    print(json.dumps(result), flush=True)
    token_ids: dict[str, list[int]] = {}
    for engine in args.engines.split(","):
        started = time.perf_counter()
        try:
            # warm-up: compiles and captures for the measured shapes (same cache length as the timed runs)
            warm = run_engine(model, prepared, engine, 16 if engine == "reference" else args.new_tokens, device)
            runs = [run_engine(model, prepared, engine, args.new_tokens, device) for _ in range(args.repeats)]
        except Exception as exc:  # one engine failing (e.g. no compiler) must not lose the others' numbers
            result["engines"][engine] = {"error": f"{type(exc).__name__}: {exc}"[:800]}
            print(f"{engine}: failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            write(result, args.out)
            continue
        rates = [r["tokens_per_s"] for r in runs]
        token_ids[engine] = runs[-1]["ids"]
        mean = sum(rates) / len(rates)
        entry = {
            "tokens_per_s_runs": [round(r, 2) for r in rates], "tokens_per_s": round(mean, 2),
            "ttft_s": round(runs[-1]["ttft_s"], 4), "warmup_s": round(warm["ttft_s"], 2),
            "engine_wall_s": round(time.perf_counter() - started, 1),
            "vs_paper": round(mean / PAPER_TOKENS_PER_S, 3),
            "of_bandwidth_bound": round(mean / result["bandwidth_bound_tokens_per_s"], 3),
        }
        for other in ("reference", "fast"):
            if other in token_ids and other != engine:
                entry[f"agree_with_{other}"] = leading_agreement(token_ids[engine], token_ids[other])
        if "reference" in result["engines"] and "tokens_per_s" in result["engines"]["reference"]:
            entry["vs_reference"] = round(mean / result["engines"]["reference"]["tokens_per_s"], 2)
        result["engines"][engine] = entry
        print(f"{engine:15s} {mean:9.1f} tokens/s  (paper {PAPER_TOKENS_PER_S}) {json.dumps(entry)}", flush=True)
        write(result, args.out)
    for engine in filter(None, args.profile.split(",")):
        profile_engine(model, prepared, engine, args.new_tokens, device, args.out)
    print(json.dumps(result, indent=2))
    return 0


def profile_engine(model, prepared, engine: str, new_tokens: int, device: torch.device, out: Path | None) -> None:
    """Kernel-level profile of a timed-length decode (same cache length, so no new compile or capture): where a
    token's time goes on the GPU, and how many kernels — divide the totals by ``new_tokens``."""
    from torch.profiler import ProfilerActivity, profile

    run_engine(model, prepared, engine, new_tokens, device)  # warm, if the engine was not timed first
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run_engine(model, prepared, engine, new_tokens, device)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=30)
    print(f"--- profile: {engine} ({new_tokens} tokens) ---\n{table}", flush=True)
    if out:
        out.with_name(f"{out.stem}.{engine}.profile.txt").write_text(table + "\n")


def write(result: dict, out: Path | None) -> None:
    if out:
        out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
