"""Batch-1 bf16 decode tokens/s of the official architecture on one GPU, beside the paper's 269.7 tokens/s.

For a lent H100/H200 machine (no GPU here)::

    python scripts/gpu_bench.py --device cuda --out gpu_bench.json
    python scripts/gpu_bench.py --device cpu --preset tiny-random --new-tokens 16   # smoke test anywhere

The model is the full architecture with random weights, built directly on the device in bf16 (no random
initialisation cost, then a cheap deterministic fill). Decode speed does not depend on the weights' values, and
only the backbone runs per token. Engines, all batch 1 and greedy with EOS ignored:

* ``reference``   — transformers ``generate()`` with the default dynamic cache (how the official code runs);
* ``hf-static``   — transformers ``generate(cache_implementation="static")`` (transformers compiles the decode
  step itself on CUDA);
* ``fast``        — our static-cache loop (``model.fast_decode.FastDecoder``), eager;
* ``fast-graphs`` — the same loop with its decode step compiled with ``mode="reduce-overhead"`` (CUDA graphs).

The paper's figure (reference doc section 7) is an average over 200 samples of up to 2000 new tokens on H100s,
batch size and engine not stated; ``--new-tokens 2000`` gets closer to that setting. The memory-bandwidth bound
(measured copy bandwidth / bf16 weight bytes per token) is printed beside the measurements.
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

PAPER_TOKENS_PER_S = 269.7
ENGINES = ("reference", "hf-static", "fast", "fast-graphs")


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


def run_engine(model, prepared, engine: str, new_tokens: int, device: torch.device) -> dict[str, float]:
    from bench.measure import TokenTimes
    from model.fast_decode import FastDecoder
    from model.inference import GenerationSettings

    settings = GenerationSettings(max_new_tokens=new_tokens, temperature=0.0)
    config = settings.to_generation_config(model.special_ids)
    config.eos_token_id = None  # exactly new_tokens tokens
    times = TokenTimes()
    sync(device)
    with torch.inference_mode():
        if engine in ("reference", "hf-static"):
            extra = {"cache_implementation": "static"} if engine == "hf-static" else {}
            model.model.backbone.generate(**prepared.generate_kwargs(), generation_config=config, streamer=times,
                                          **extra)
        else:
            if engine not in model._decoders:
                graphs = engine == "fast-graphs"
                model._decoders[engine] = FastDecoder(model.model.backbone, compile_step=graphs,
                                                      compile_mode="reduce-overhead" if graphs else None)
            model._decoders[engine].decode(prepared.input_ids, prepared.inputs_embeds, prepared.attention_mask,
                                           config, streamer=times, ignore_eos=True)
    sync(device)
    return {"tokens_per_s": times.decode_tokens_per_s(), "ttft_s": times.first_token_s, "tokens": len(times.times)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="official", choices=["official", "tiny-random"])
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
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
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "preset": args.preset, "dtype": "bfloat16", "batch": 1,
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "build_s": round(built_s, 1),
        "weight_bytes_per_token": weight_bytes, "copy_bandwidth_GBps": round(bandwidth, 1),
        # copy moves 2 bytes per byte read; decode reads weights once per token
        "bandwidth_bound_tokens_per_s": round(bandwidth / 2 * 1e9 / weight_bytes, 1),
        "paper_tokens_per_s": PAPER_TOKENS_PER_S, "engines": {},
    }
    for engine in args.engines.split(","):
        try:
            warm = run_engine(model, prepared, engine, min(16, args.new_tokens), device)  # compiles, warms caches
            runs = [run_engine(model, prepared, engine, args.new_tokens, device) for _ in range(args.repeats)]
        except Exception as exc:  # one engine failing (e.g. no compiler) must not lose the others' numbers
            result["engines"][engine] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            print(f"{engine}: failed: {exc}", file=sys.stderr)
            continue
        rates = [r["tokens_per_s"] for r in runs]
        result["engines"][engine] = {
            "tokens_per_s_runs": [round(r, 2) for r in rates], "tokens_per_s": round(sum(rates) / len(rates), 2),
            "ttft_s": round(runs[-1]["ttft_s"], 4), "warmup_s": round(warm["ttft_s"], 2),
            "vs_paper": round(sum(rates) / len(rates) / PAPER_TOKENS_PER_S, 3),
        }
        print(f"{engine:12s} {result['engines'][engine]['tokens_per_s']:9.1f} tokens/s  "
              f"(paper {PAPER_TOKENS_PER_S}; runs {result['engines'][engine]['tokens_per_s_runs']})", flush=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
