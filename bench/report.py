"""``bench.json`` → a markdown report: one table per measurement, every run shown beside the mean."""

from __future__ import annotations

from typing import Any


def _runs(summary: dict[str, Any] | None, digits: int = 2) -> str:
    if not summary:
        return "–"
    runs = " / ".join(f"{r:.{digits}f}" for r in summary["runs"])
    mean = f"**{summary['mean']:.{digits}f}**"
    return f"{mean} ({runs})" if len(summary["runs"]) > 1 else mean


def _num(value: Any, fmt: str = ".2f", suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "–"
    return f"{value:{fmt}}{suffix}"


def _decode_table(decode: dict[str, Any], title: str) -> list[str]:
    bw = ""
    if "bound_bandwidth_GBps" in decode:
        before, after = decode["bandwidth_before"], decode["bandwidth_after"]
        bw = (" Bandwidth beside these runs (read-only sum / copy read side, GB/s): "
              f"before {before['read_GBps']:.1f} / "
              f"{before['copy_read_GBps']:.1f}, after {after['read_GBps']:.1f} / {after['copy_read_GBps']:.1f}; the "
              f"bound uses the highest read figure of the session, {decode['bound_bandwidth_GBps']:.1f} GB/s.")
    lines = [f"**{title}** — batch 1, greedy, exactly {decode['new_tokens']} new tokens (EOS ignored), "
             f"prompt {decode['prompt_tokens']} tokens.{bw}", "",
             "| path | decode tokens/s (mean; runs) | × reference | weights read per token GB | "
             "% of bandwidth bound | prefill s | peak RSS MB | CPU busy before runs |",
             "|---|---|---|---|---|---|---|---|"]
    for engine, e in decode["engines"].items():
        bound = e.get("bandwidth_bound_tokens_per_s")
        lines.append(
            f"| {engine} | {_runs(e['tokens_per_s'])} | {_num(e.get('speedup_vs_reference'), '.2f', '×')} | "
            f"{e['weight_bytes_per_token'] / 1e9:.3f} | "
            f"{_num(e.get('percent_of_bound'), '.1f', ' %')}{f' of {bound:.2f}' if bound else ''} | "
            f"{_runs(e['prefill_s'], 3)} | {max(e['peak_rss_mb']):.0f} | {e.get('cpu_busy_before', '–')} |")
    warm = ", ".join(f"{k} {v['warmup_s']:.1f} s" for k, v in decode["engines"].items())
    switches = decode.get("layout_switch_s") or {}
    packing = (" Switching the weight layout took " + ", ".join(f"{k} {v:.1f} s" for k, v in switches.items()) + "."
               if switches else "")
    return lines + ["", f"First (warm-up) call: {warm}.{packing}", ""]


def _ttft_table(ttft: dict[str, Any], title: str) -> list[str]:
    lines = [f"**{title}** — cold (encoder cache emptied before every request).", "",
             "| clip | prompt tokens | front-end s | encoder s | engine | TTFT s (mean; runs) | prefill s "
             "| × reference |",
             "|---|---|---|---|---|---|---|---|"]
    for clip, row in ttft.items():
        for engine, e in row["engines"].items():
            lines.append(f"| {clip} | {row['prompt_tokens']} | {row['front_end_s']:.3f} | {row['encoder_s']:.2f} | "
                         f"{engine} | {_runs(e['ttft_s'], 3)} | {_runs(e['prefill_s'], 3)} | "
                         f"{_num(e.get('speedup_vs_reference'), '.2f', '×')} |")
    return lines + [""]


def _cache_table(cache: dict[str, Any]) -> list[str]:
    if "skipped" in cache:
        return [f"Encoder cache: {cache['skipped']}", ""]
    return [f"**Encoder-output cache** — {cache['clip_s']:g} s clip, engine `{cache['engine']}`.", "",
            "| | first (cold) s | second (cache hit) s | speed-up |", "|---|---|---|---|",
            f"| time to first token, a second question | {_runs(cache['first_question_ttft_s'], 3)} | "
            f"{_runs(cache['second_question_ttft_s'], 3)} | **{cache['second_question_speedup']:.2f}×** |",
            f"| routing view | {_runs(cache['routing_cold_s'], 3)} | {_runs(cache['routing_warm_s'], 3)} | "
            f"{cache['routing_speedup']:.2f}× |", ""]


def _concurrency_table(conc: dict[str, Any]) -> list[str]:
    lines = [f"**Concurrency** — N client threads, {conc['requests_per_client']} requests each back to back, "
             f"{conc['clip_s']:g} s clip per request (all different), exactly {conc['new_tokens']} new tokens"
             + (f"; {conc['rounds']} interleaved rounds, the median shown" if conc.get("rounds", 1) > 1 else "")
             + ".", "",
             "| config | clients | aggregate tokens/s | × 1 client | p50 latency s | p95 latency s | batches (rows "
             "per step) | every round tokens/s |", "|---|---|---|---|---|---|---|---|"]
    for config, levels in conc["configs"].items():
        for level, row in levels.items():
            batches = row.get("batch_sizes")
            rows = [r for r in row.get("mean_rows", []) if r != 1.0]
            described = f"{batches}" + (f" ({', '.join(f'{r:g}' for r in rows)})" if rows else "") if batches else "–"
            rounds = row.get("rounds_tokens_per_s")
            lines.append(f"| {config} | {level} | {row['aggregate_tokens_per_s']:.1f} | "
                         f"{row['scaling_vs_first_level']:.2f}× | {row['latency_p50_s']:.2f} | "
                         f"{row['latency_p95_s']:.2f} | {described} | "
                         f"{' / '.join(f'{x:.0f}' for x in rounds) if rounds else '–'} |")
    return lines + [""]


def _quality_table(quality: dict[str, Any]) -> list[str]:
    if "skipped" in quality:
        return [f"Quality: {quality['skipped']}", ""]
    lines = ["**Quality on Eureka-mini's held-out evaluation** (`model.evaluate`, no Whisper peer).", "",
             "| variant | clips | ASR WER | MC accuracy | caption fact recall | speech expert share of non-speech | "
             "eval s |", "|---|---|---|---|---|---|---|"]
    for variant, r in quality.items():
        lines.append(f"| {variant} | {r['clips']} | {r['asr_wer']:.1%} | {r['qa_accuracy']:.1%} | "
                     f"{r['caption_fact_recall']:.1%} | {r['speech_expert_share_of_nonspeech']:.1%} | "
                     f"{r['generation_seconds']:.0f} |")
    return lines + [""]


def _rerank_table(rerank: dict[str, Any]) -> list[str]:
    if "skipped" in rerank:
        return [f"ASR re-ranking: {rerank['skipped']}", ""]
    lines = [f"**ASR: greedy vs beams re-ranked by the CTC head** ({rerank['utterances']} held-out utterances, each "
             f"decoded both ways in turn; re-ranked / greedy time {rerank['time_ratio_vs_greedy']}×).", "",
             "| decoding | s per utterance (mean) | WER |", "|---|---|---|"]
    lines += [f"| {name} | {v['seconds']['mean']:.3f} | {v['wer']:.1%} |" for name, v in rerank["variants"].items()]
    return lines + [""]


def _drift(drift: dict[str, Any], title: str) -> list[str]:
    return [f"**{title}**: prefill logits max relative difference {drift['logits_max_rel_diff']}, greedy token "
            f"agreement {drift['greedy_token_agreement']}, tokens before the first difference "
            f"{drift['tokens_before_first_difference']}.", ""]


def _profile(profile: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = ["**Profile** — top operators by self CPU time over a short decode.", ""]
    for engine, ops in profile.items():
        lines += [f"`{engine}`:", "", "| op | calls | self ms | share |", "|---|---|---|---|"]
        lines += [f"| `{o['op']}` | {o['calls']} | {o['self_ms']:.1f} | {o['share']:.1%} |" for o in ops]
        lines.append("")
    return lines


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = ["# Benchmark report", "", f"Command: `{report['command']}`  ", f"Started: {report['started']}  ",
             f"Machine: {m.get('cpu', '?')}, {m.get('cpus')} CPUs ({', '.join(m.get('isa', []))}), "
             f"{m.get('memory_gb', '?')} GB, torch {m.get('torch')} ({m.get('torch_threads')} threads), "
             f"transformers {m.get('transformers', '?')}; load average {m.get('load_average')} at start, "
             f"{m.get('load_average_after', '?')} at the end.", ""]
    if bw := report.get("bandwidth"):
        lines += [f"Memory bandwidth ({bw['buffer_mb']} MB buffers, best of runs): copy {bw['copy_GBps']:.1f} GB/s "
                  f"(read + write; {bw['copy_read_GBps']:.1f} GB/s read side), read-only sum {bw['read_GBps']:.1f} "
                  "GB/s. The decode bound uses the larger read figure.", ""]
    for name, r in report["models"].items():
        lines += [f"## {name}", "", f"{r['note']}; {r['describe']['parameters'] / 1e6:.1f} M parameters "
                  f"(backbone {r['describe']['backbone_parameters'] / 1e6:.1f} M), dtype {r['describe']['dtype']}, "
                  f"built/loaded in {r['load_s']} s.", ""]
        if "decode" in r:
            lines += _decode_table(r["decode"], "Decode")
        if "int8" in r and r["int8"].get("decode"):
            q = r["int8"]["quantization"]
            lines += _decode_table(r["int8"]["decode"], f"Decode, int8 weight-only backbone ({q['layers']} linears, "
                                   f"{q['weight_bytes_before'] / 1e9:.3f} → {q['weight_bytes_after'] / 1e9:.3f} GB, "
                                   f"quantised in {q['quantize_s']} s)")
            if "drift_vs_float" in r["int8"]:
                lines += _drift(r["int8"]["drift_vs_float"], "int8 vs float")
        if "ttft" in r:
            lines += _ttft_table(r["ttft"], "Time to first token")
        other = r.get("other_window", "trimmed")
        if "trim" in r:
            lines += _ttft_table(r["trim"], f"Time to first token, {other}-window encoder (not the model's own)")
        if "other_window_drift" in r:
            lines += _drift(r["other_window_drift"], f"{other.capitalize()}-window encoder vs the model's own")
        if "cache" in r:
            lines += _cache_table(r["cache"])
        if "concurrency" in r:
            lines += _concurrency_table(r["concurrency"])
        if "quality" in r:
            lines += _quality_table(r["quality"])
        if "rerank" in r:
            lines += _rerank_table(r["rerank"])
        if "profile" in r:
            lines += _profile(r["profile"])
    return "\n".join(lines) + "\n"
