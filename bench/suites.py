"""The benchmarks: decode speed, time to first token, encoder cache, concurrency, int8 and trimmed-encoder quality.

Every suite takes a loaded :class:`EurekaAudio` and returns plain JSON-able dicts. Engines are compared in the same
process, interleaved run by run (reference, ours, reference, ours …) so a drifting machine load hits both alike.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch

from model.fast_decode import supports_fused_step
from model.inference import EurekaAudio, GenerationSettings
from model.prompts import task_messages
from model.quantize import backbone_weight_bytes, can_pack, set_weight_layout

from .measure import Timer, TokenTimes, memory_bandwidth, peak_rss, percentile, summary, test_clip, wait_for_quiet

QUESTIONS = (
    "What is happening in this recording?",
    "Is anyone speaking?\nA. yes\nB. no\nC. only music\nD. only noise",
    "How many different sounds can you hear?",
)


def _qa(audio: Any, question: str = QUESTIONS[0]) -> list[dict[str, Any]]:
    return task_messages("qa", (audio, 16000), question=question)


def _greedy(new_tokens: int) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=new_tokens, temperature=0.0)


def _ratio(ours: float, reference: float) -> float:
    return round(ours / reference, 3) if reference and reference == reference else float("nan")


# --- weight layout ------------------------------------------------------------------------------------------------
def use_layout(model: EurekaAudio, layout: str) -> None:
    """Put the backbone's linears in ``layout`` (``plain`` = the official path's nn.Linear) and keep them there."""
    if can_pack(model.model.backbone):
        set_weight_layout(model.model.backbone, layout)
        model._layout_set = True


def reference_layout(model: EurekaAudio, engine: str) -> None:
    """The reference engine runs on plain nn.Linear weights, ours on the default decode layout (bf16 CPU only)."""
    use_layout(model, "plain" if engine in ("reference", "compiled") else model.weight_layout)


# --- decode -------------------------------------------------------------------------------------------------------
MODULE_STEP = "fast, module step"  # our loop with the step through the backbone's modules: measures the fused step


def _step(model: EurekaAudio, name: str) -> contextlib.AbstractContextManager:
    return model.decoder().module_step() if name == MODULE_STEP else contextlib.nullcontext()


def decode(
    model: EurekaAudio,
    engines: list[str],
    new_tokens: int = 128,
    repeats: int = 2,
    clip_s: float = 10.0,
    data_dir: Path | None = None,
    bandwidth_GBps: float | None = None,
    label: str = "",
    compare_layouts: bool = True,
) -> dict[str, Any]:
    """Batch-1 greedy decode tokens/s with exactly ``new_tokens`` new tokens (EOS ignored), per engine.

    For a bf16 CPU model whose weights are not packed yet, every change is measured separately: first on plain
    ``nn.Linear`` weights (``reference`` = the official path, ``fast, nn.Linear`` = our loop alone), then after
    prepacking (``reference, prepacked`` = generate() on packed weights, ``fast`` = ours, all changes).
    For a model the fused decode step applies to (Eureka-mini), ``fast, module step`` is our loop without it.
    Runs are interleaved engine by engine within each phase.
    """
    prepared = model.prepare([_qa(test_clip(clip_s, data_dir))])
    # (label, engine, weight layout); each phase switches the layout once, runs interleave within a phase.
    phases: list[list[tuple[str, str, str]]]
    if compare_layouts and can_pack(model.model.backbone):
        phases = [[("reference", "reference", "plain"), ("fast, nn.Linear", "fast", "plain")],
                  [("fast, oneDNN prepacked", "fast", "onednn")],
                  [("reference, decode kernel", "reference", "kernel"), ("fast", "fast", "kernel")]]
    else:
        phases = [[(e, e, "") for e in engines]]
        if "fast" in engines and supports_fused_step(model.model.backbone):
            phases[0].insert(engines.index("fast") + 1, (MODULE_STEP, "fast", ""))
    results: dict[str, Any] = {"prompt_tokens": int(prepared.input_ids.shape[1]), "new_tokens": new_tokens,
                               "label": label, "engines": {}, "layout_switch_s": {}}
    if bandwidth_GBps:  # the host's memory bandwidth drifts (28–46 GB/s seen): measure it beside the runs too
        wait_for_quiet()
        results["bandwidth_before"] = memory_bandwidth(512, 3)
    for phase in phases:
        if phase[0][2]:
            with Timer() as switching:
                use_layout(model, phase[0][2])
            results["layout_switch_s"][phase[0][2]] = round(switching.seconds, 2)
        weight_bytes = backbone_weight_bytes(model.model.backbone)
        for name, engine, _ in phase:  # warm-up (and, for "compiled", the compilation for this cache size itself)
            with Timer() as warm, _step(model, name):
                model.generate_ids(prepared, _greedy(new_tokens if engine == "compiled" else 8), engine,
                                   ignore_eos=True)
            results["engines"][name] = {"engine": engine, "warmup_s": round(warm.seconds, 2), "tokens_per_s": [],
                                        "prefill_s": [], "peak_rss_mb": [], "weight_bytes_per_token": weight_bytes}
        for _ in range(repeats):
            for name, engine, _ in phase:
                busy = wait_for_quiet()
                times = TokenTimes()
                with peak_rss() as memory, _step(model, name):
                    ids = model.generate_ids(prepared, _greedy(new_tokens), engine, streamer=times, ignore_eos=True)
                produced = ids.shape[1] - prepared.input_ids.shape[1]
                if produced != new_tokens:
                    raise RuntimeError(f"{name} produced {produced} tokens instead of {new_tokens}")
                entry = results["engines"][name]
                entry["tokens_per_s"].append(times.decode_tokens_per_s())
                entry["prefill_s"].append(times.first_token_s)
                entry["peak_rss_mb"].append(round(memory["peak_mb"], 1))
                entry.setdefault("load_average", []).append(round(os.getloadavg()[0], 2))
                entry.setdefault("cpu_busy_before", []).append(busy)
    results["weight_bytes_per_token"] = backbone_weight_bytes(model.model.backbone)
    if bandwidth_GBps:
        wait_for_quiet()
        results["bandwidth_after"] = memory_bandwidth(512, 3)
        read = lambda b: max(b["read_GBps"], b["copy_read_GBps"])  # noqa: E731
        bandwidth_GBps = max(bandwidth_GBps, read(results["bandwidth_before"]), read(results["bandwidth_after"]))
        results["bound_bandwidth_GBps"] = bandwidth_GBps
    reference = results["engines"].get("reference")
    for entry in results["engines"].values():
        entry["tokens_per_s"] = summary(entry["tokens_per_s"])
        entry["prefill_s"] = summary(entry["prefill_s"])
        if reference is not None:
            entry["speedup_vs_reference"] = _ratio(entry["tokens_per_s"]["mean"], reference["tokens_per_s"]["mean"])
        if bandwidth_GBps:
            bound = bandwidth_GBps * 1e9 / entry["weight_bytes_per_token"]
            entry["bandwidth_bound_tokens_per_s"] = round(bound, 2)
            entry["percent_of_bound"] = round(100 * entry["tokens_per_s"]["mean"] / bound, 1)
    return results


# --- time to first token ------------------------------------------------------------------------------------------
def _first_token(model: EurekaAudio, messages: list, engine: str) -> dict[str, float]:
    """messages → first new token: front-end + encoder + adapter + prefill, as one request sees it."""
    wait_for_quiet()
    times = TokenTimes()
    prepared = model.prepare([messages])
    prepared_at = time.perf_counter()
    model.generate_ids(prepared, _greedy(1), engine, streamer=times)
    return {"ttft_s": times.first_token_s, "prepare_s": prepared_at - times.start,
            "prefill_s": times.times[0] - prepared_at}


def ttft(
    model: EurekaAudio,
    engines: list[str],
    clip_seconds: tuple[float, ...] = (10.0, 30.0),
    repeats: int = 2,
    data_dir: Path | None = None,
) -> dict[str, Any]:
    """Cold time to first token (encoder cache emptied before every request) for each clip length and engine."""
    results: dict[str, Any] = {}
    cache = model.encoder_cache
    for seconds in clip_seconds:
        audio = test_clip(seconds, data_dir)
        messages = _qa(audio)
        wait_for_quiet()
        with Timer() as front:
            clips = [model.features((audio, 16000))]
        if cache is not None:
            cache.clear()
        wait_for_quiet()
        with Timer() as encoder:
            model._encoder_output(clips)
        row: dict[str, Any] = {"front_end_s": round(front.seconds, 4), "encoder_s": round(encoder.seconds, 3),
                               "prompt_tokens": len(model.tokenize(messages)[0].input_ids), "engines": {}}
        runs: dict[str, list[dict[str, float]]] = {e: [] for e in engines}
        # Grouped by engine, not interleaved: switching the weight layout between runs takes seconds.
        for engine in engines:
            reference_layout(model, engine)
            model.generate_ids(model.prepare([messages]), _greedy(1), engine)  # warm-up allocations
            for _ in range(repeats):
                if cache is not None:
                    cache.clear()
                runs[engine].append(_first_token(model, messages, engine))
        for engine, measured in runs.items():
            row["engines"][engine] = {k: summary([m[k] for m in measured]) for k in measured[0]}
        if "reference" in runs:
            for engine in engines:
                row["engines"][engine]["speedup_vs_reference"] = _ratio(
                    row["engines"]["reference"]["ttft_s"]["mean"], row["engines"][engine]["ttft_s"]["mean"])
        results[f"{seconds:g}s"] = row
    if cache is not None:
        cache.clear()
    return results


def encoder_cache(
    model: EurekaAudio, engine: str = "fast", clip_s: float = 30.0, repeats: int = 2, data_dir: Path | None = None
) -> dict[str, Any]:
    """A first and a second question about the same clip: the second skips the encoder (cache hit)."""
    if model.encoder_cache is None:
        return {"skipped": "encoder cache disabled"}
    audio = test_clip(clip_s, data_dir)
    reference_layout(model, engine)
    model.generate_ids(model.prepare([_qa(test_clip(2.0, data_dir))]), _greedy(1), engine)  # warm-up
    first, second, routing_cold, routing_warm = [], [], [], []
    for _ in range(repeats):
        model.encoder_cache.clear()
        first.append(_first_token(model, _qa(audio, QUESTIONS[0]), engine)["ttft_s"])
        second.append(_first_token(model, _qa(audio, QUESTIONS[1]), engine)["ttft_s"])
        model.encoder_cache.clear()
        wait_for_quiet()
        with Timer() as cold:
            model.routing((audio, 16000))
        wait_for_quiet()
        with Timer() as warm:
            model.routing((audio, 16000))
        routing_cold.append(cold.seconds)
        routing_warm.append(warm.seconds)
    model.encoder_cache.clear()
    result = {"clip_s": clip_s, "engine": engine, "first_question_ttft_s": summary(first),
              "second_question_ttft_s": summary(second), "routing_cold_s": summary(routing_cold),
              "routing_warm_s": summary(routing_warm)}
    result["second_question_speedup"] = _ratio(result["first_question_ttft_s"]["mean"],
                                               result["second_question_ttft_s"]["mean"])
    result["routing_speedup"] = _ratio(result["routing_cold_s"]["mean"], result["routing_warm_s"]["mean"])
    return result


# --- concurrency --------------------------------------------------------------------------------------------------
def concurrency(
    model: EurekaAudio,
    levels: tuple[int, ...] = (1, 4, 8),
    configs: tuple[str, ...] = ("reference", "fast", "fast+batching"),
    new_tokens: int = 128,
    requests_per_client: int = 2,
    clip_s: float = 5.0,
    data_dir: Path | None = None,
    use_stream: bool = False,
    rounds: int = 1,
) -> dict[str, Any]:
    """N clients (threads) each sending requests back to back through the app's path: prepare → decode → text.

    ``rounds`` > 1 repeats every config and level that many times, interleaved (round 1: every config at 1, 4, 8
    clients; round 2: the same …), and reports each level's median round (all rounds' throughputs listed): on a
    host whose speed drifts by tens of percent between minutes, a ratio of two single runs can be off by as much.

    Configs: ``reference``, ``fast`` (no batching), ``fast+batching`` (the app's batcher: continuous where the
    decoder supports it), ``fast+fixed-batches`` (the batcher with continuous batching off: a batch decodes to the
    end before the next starts), and ``fast+batching+trim`` (opt-in trimmed encoder as well: for short clips the
    full-window encoder, not decode, dominates a request).

    Every request decodes exactly ``new_tokens`` tokens (EOS ignored) so configurations do the same work; each
    request has its own clip, so the encoder cache never helps. ``use_stream`` goes through ``stream`` instead
    (the app's streaming path; EOS then ends requests early, so tokens are counted as they arrive).
    """
    clips = [test_clip(clip_s, data_dir, offset=i) for i in range(max(levels) * requests_per_client)]
    results: dict[str, Any] = {"new_tokens": new_tokens, "requests_per_client": requests_per_client,
                               "clip_s": clip_s, "rounds": rounds, "configs": {}}
    previous_batcher, own_trim = model.batcher, model.trim_encoder
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {c: {str(level): [] for level in levels} for c in configs}
    try:
        for round_index in range(rounds):  # round-major: a drifting machine hits every config alike
            for config in configs:
                engine = config.split("+")[0]
                reference_layout(model, engine)
                if "+batching" in config or "+fixed-batches" in config:
                    model.enable_batching(window_ms=5.0, max_batch=max(levels), continuous="+batching" in config)
                else:
                    model.disable_batching()
                model.trim_encoder = own_trim or "+trim" in config
                if round_index == 0:
                    model.generate_ids(model.prepare([_qa(clips[0])]), _greedy(4), engine)  # warm-up
                for level in levels:
                    if model.encoder_cache is not None:
                        model.encoder_cache.clear()
                    wait_for_quiet()
                    row = _clients(model, engine, level, requests_per_client, clips, new_tokens, use_stream)
                    if model.batcher is not None:
                        row["batch_sizes"] = list(model.batcher.batch_sizes)
                        row["mean_rows"] = list(model.batcher.mean_rows)
                        model.batcher.batch_sizes.clear()
                        model.batcher.mean_rows.clear()
                    runs[config][str(level)].append(row)
        for config in configs:
            per_level: dict[str, Any] = {}
            for level, rows in runs[config].items():
                by_speed = sorted(rows, key=lambda r: r["aggregate_tokens_per_s"])
                per_level[level] = dict(by_speed[(len(by_speed) - 1) // 2])
                if rounds > 1:
                    per_level[level]["rounds_tokens_per_s"] = [r["aggregate_tokens_per_s"] for r in rows]
            base = per_level[str(levels[0])]["aggregate_tokens_per_s"]
            for row in per_level.values():
                row["scaling_vs_first_level"] = _ratio(row["aggregate_tokens_per_s"], base)
            results["configs"][config] = per_level
    finally:
        model.batcher = previous_batcher
        model.trim_encoder = own_trim
    return results


def _clients(model: EurekaAudio, engine: str, level: int, per_client: int, clips: list, new_tokens: int,
             use_stream: bool) -> dict[str, Any]:
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    barrier = threading.Barrier(level + 1)
    errors: list[BaseException] = []

    def client(index: int) -> None:
        try:
            barrier.wait()
            for r in range(per_client):
                audio = clips[index * per_client + r]
                started = time.perf_counter()
                if use_stream:
                    pieces = list(model.stream(_qa(audio), max_new_tokens=new_tokens, engine=engine))
                    count = len(model.tokenizer("".join(pieces), add_special_tokens=False)["input_ids"])
                else:
                    prepared = model.prepare([_qa(audio)])
                    ids = model.generate_ids(prepared, _greedy(new_tokens), engine, ignore_eos=True)
                    model._decode(ids[0, prepared.input_ids.shape[1]:])
                    count = ids.shape[1] - prepared.input_ids.shape[1]
                elapsed = time.perf_counter() - started
                with lock:
                    latencies.append(elapsed)
                    tokens[0] += min(count, new_tokens)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(level)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if errors:
        raise errors[0]
    return {"clients": level, "requests": len(latencies), "tokens": tokens[0], "wall_s": round(wall, 3),
            "aggregate_tokens_per_s": round(tokens[0] / wall, 2),
            "latency_p50_s": round(percentile(latencies, 50), 3), "latency_p95_s": round(percentile(latencies, 95), 3)}


# --- quality ------------------------------------------------------------------------------------------------------
def logits_agreement(reference_model: EurekaAudio, other: EurekaAudio, n_prompts: int = 4, new_tokens: int = 32,
                     data_dir: Path | None = None) -> dict[str, Any]:
    """How far a changed model (int8, trimmed encoder) drifts from the original: prefill logits and greedy tokens."""
    rel, agree, first_diff = [], [], []
    for i in range(n_prompts):
        messages = _qa(test_clip(4.0 + i, data_dir, offset=i), QUESTIONS[i % len(QUESTIONS)])
        a, b = reference_model.prepare([messages]), other.prepare([messages])
        with torch.inference_mode():
            la = reference_model.model.backbone(inputs_embeds=a.inputs_embeds).logits.float()
            lb = other.model.backbone(inputs_embeds=b.inputs_embeds).logits.float()
        rel.append(float((la - lb).abs().max() / la.abs().max()))
        ta = reference_model.generate_ids(a, _greedy(new_tokens))[0, a.input_ids.shape[1]:].tolist()
        tb = other.generate_ids(b, _greedy(new_tokens))[0, b.input_ids.shape[1]:].tolist()
        n = min(len(ta), len(tb))
        agree.append(sum(x == y for x, y in zip(ta[:n], tb[:n], strict=True)) / max(1, n))
        first_diff.append(next((j for j in range(n) if ta[j] != tb[j]), n))
    return {"logits_max_rel_diff": [round(r, 5) for r in rel], "greedy_token_agreement": [round(x, 3) for x in agree],
            "tokens_before_first_difference": first_diff}


def evaluation(model: EurekaAudio, data_dir: Path, limit: int) -> dict[str, Any]:
    """Eureka-mini's own evaluation (model.evaluate) on the first ``limit`` held-out clips, without the peer."""
    from model.evaluate import evaluate

    report = evaluate(model, data_dir, "test", limit, baseline=False)
    keep = ("clips", "asr_wer", "qa_accuracy", "caption_fact_recall", "generation_seconds")
    out = {k: report[k] for k in keep}
    out["speech_expert_share_of_nonspeech"] = report["routing"]["speech_expert_share_of_nonspeech"]
    return out


def asr_rerank(model: EurekaAudio, data_dir: Path, limit: int, beams: int) -> dict[str, Any]:
    """Held-out transcription decoded greedily (the default engine) and with ``beams`` beams re-ranked by the CTC
    head, each utterance timed both ways in turn (which goes first alternates) as a whole request — front-end and
    encoder included, the encoder-output cache off so neither gets the other's: seconds per utterance, the ratio of
    their means, and each decoding's WER on the same utterances."""
    from model.evaluate import absolute, word_error_rate

    if model.model.ctc_head is None:
        return {"skipped": "the model has no CTC head"}
    with open(data_dir / "records_test.jsonl", encoding="utf-8") as handle:
        records = [r for r in map(json.loads, handle) if r["task"] == "asr"][:limit]
    if not records:
        return {"skipped": f"no transcription records in {data_dir / 'records_test.jsonl'}"}
    variants = {"greedy": 0, f"{beams} beams re-ranked": beams}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    texts: dict[str, list[str]] = {name: [] for name in variants}
    cache, model.encoder_cache = model.encoder_cache, None
    try:
        for name in variants:  # warm-up: the fast engine builds its decoder on first use
            model.generate(absolute(records[0], data_dir), max_new_tokens=8, ctc_beams=variants[name])
        for index, record in enumerate(records):
            messages = absolute(record, data_dir)
            order = list(variants) if index % 2 == 0 else list(reversed(variants))
            for name in order:
                wait_for_quiet()
                with Timer() as timer:
                    texts[name].append(model.generate(messages, max_new_tokens=96, ctc_beams=variants[name]))
                seconds[name].append(timer.seconds)
    finally:
        model.encoder_cache = cache
    references = [r["target"] for r in records]
    out: dict[str, Any] = {"utterances": len(records), "variants": {
        name: {"seconds": summary(seconds[name]), "wer": round(word_error_rate(references, texts[name]), 4)}
        for name in variants}}
    greedy, reranked = (out["variants"][name]["seconds"]["mean"] for name in variants)
    out["time_ratio_vs_greedy"] = _ratio(reranked, greedy)
    return out


def profile_decode(model: EurekaAudio, engine: str, steps: int = 16, clip_s: float = 10.0,
                   data_dir: Path | None = None, top: int = 15) -> list[dict[str, Any]]:
    """Where a decode's time goes: the top operators by self CPU time over ``steps`` tokens."""
    reference_layout(model, engine)
    prepared = model.prepare([_qa(test_clip(clip_s, data_dir))])
    model.generate_ids(prepared, _greedy(4), engine, ignore_eos=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model.generate_ids(prepared, _greedy(steps), engine, ignore_eos=True)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [{"op": e.key, "calls": e.count, "self_ms": round(e.self_cpu_time_total / 1000, 2),
             "share": round(e.self_cpu_time_total / total, 4)} for e in events[:top]]
