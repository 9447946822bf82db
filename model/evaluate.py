"""Evaluate a checkpoint on the synthetic held-out split (``python -m model.evaluate --data DIR``).

ASR word error rate (beside Whisper tiny.en on the same clips), multiple-choice accuracy, caption fact recall, and
routing statistics: which experts speech and non-speech tokens go to, and the router's entropy. The scores carry 95 %
intervals from resampling the held-out clips, so a gap to a target can be read against the split's own noise.
Writes a JSON report and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .data.synth import read_manifest
from .data.tasks import labelled_caption_facts
from .inference import EurekaAudio
from .loading import load_model
from .prompts import option_replies, question_options

TARGETS = {"asr_wer": 0.10, "qa_accuracy": 0.90, "caption_fact_recall": 0.80, "speech_expert_share_of_nonspeech": 0.20}


def normalise(text: str) -> list[str]:
    """Lower-case words without punctuation, so WER counts words and nothing else."""
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def edit_distance(reference: list[str], hypothesis: list[str]) -> int:
    previous = list(range(len(hypothesis) + 1))
    for i, ref_word in enumerate(reference, 1):
        current = [i]
        for j, hyp_word in enumerate(hypothesis, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_word != hyp_word)))
        previous = current
    return previous[-1]


def word_error_rate(references: Iterable[str], hypotheses: Iterable[str]) -> float:
    """Corpus WER: total word edits over total reference words."""
    pairs = [(normalise(r), normalise(h)) for r, h in zip(references, hypotheses, strict=True)]
    return sum(edit_distance(r, h) for r, h in pairs) / max(1, sum(len(r) for r, _ in pairs))


def answer_letter(text: str) -> str | None:
    match = re.match(r"\s*\(?([A-D])[.)\s:]", text + " ")
    return match.group(1) if match else None


def answer_body(output: str) -> str:
    """An answer's text after its leading letter, lower-cased: "B. Low" → "low"."""
    return re.sub(r"^\s*\(?[A-D][.)\s:]\s*", "", output).strip().lower()


def chosen_option(question: str, output: str) -> str | None:
    """The option an answer picks: by its text when it quotes an option (as MMAU-style graders match choice strings),
    else by its leading letter."""
    body = answer_body(output)
    matches = [key for key, text in question_options(question).items() if body and text.lower() == body]
    return matches[0] if len(matches) == 1 else answer_letter(output)


def off_option(question: str, output: str) -> bool:
    """Whether an answer's text is none of the options offered ("C. About 1 800 Hz" where C is "About 210 Hz"): such
    an answer is graded by its letter alone, and shows the model saying what it heard rather than picking."""
    return answer_body(output) not in {text.lower() for text in question_options(question).values()}


def clip_bootstrap_interval(per_clip: list[tuple[float, float]], resamples: int = 2000, seed: int = 0,
                            level: float = 0.95) -> tuple[float, float]:
    """The ``level`` percentile interval of a ratio of sums (right / asked, edits / words, found / facts) over
    clips resampled with replacement; ``per_clip`` holds each clip's (numerator, denominator).

    Why by clip: a clip's questions and caption facts share its audio, so they are not independent draws; a
    binomial interval over 300 questions would claim more certainty than 100 clips give."""
    if not per_clip:
        return (0.0, 0.0)
    counts = np.asarray(per_clip, dtype=np.float64)
    picks = np.random.default_rng(seed).integers(0, len(counts), size=(resamples, len(counts)))
    sums = counts[picks].sum(axis=1)
    ratios = sums[:, 0] / np.maximum(sums[:, 1], 1e-12)
    tail = (1 - level) / 2 * 100
    return float(np.percentile(ratios, tail)), float(np.percentile(ratios, 100 - tail))


def per_clip_counts(clip_ids: list[str], numerators: list[float], denominators: list[float]) -> list[tuple]:
    """(numerator, denominator) summed per clip, in first-seen clip order."""
    totals: dict[str, list[float]] = {}
    for clip, num, den in zip(clip_ids, numerators, denominators, strict=True):
        row = totals.setdefault(clip, [0.0, 0.0])
        row[0] += num
        row[1] += den
    return [tuple(row) for row in totals.values()]


def question_text(record: dict[str, Any]) -> str:
    """The last text item of the record's last user turn."""
    items = record["messages"][-1]["content"]
    return next(i["text"] for i in reversed(items) if i.get("type") == "text")


def in_batches(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def absolute(record: dict[str, Any], data_dir: Path) -> list[dict[str, Any]]:
    """The record's messages with audio paths made absolute."""
    messages = json.loads(json.dumps(record["messages"]))
    for message in messages:
        for item in message["content"] if isinstance(message["content"], list) else []:
            if item.get("type") == "audio_url":
                item["audio_url"]["url"] = str(data_dir / item["audio_url"]["url"])
    return messages


def generate_all(model: EurekaAudio, records: list[dict], data_dir: Path, batch_size: int, max_new_tokens: int,
                 ctc_beams: int = 0) -> list[str]:
    outputs = []
    for batch in in_batches(records, batch_size):
        outputs += model.generate([absolute(r, data_dir) for r in batch], max_new_tokens=max_new_tokens,
                                  ctc_beams=ctc_beams)
    return outputs


def whisper_baseline(records: list[dict], data_dir: Path) -> list[str]:
    """Whisper tiny.en (the same weights as our encoder, with its own decoder) on the same clips."""
    import whisper

    from .audio import load_audio
    from .whisper_ct2 import load_whisper_tiny_en_full

    peer = load_whisper_tiny_en_full()
    options = whisper.DecodingOptions(language="en", fp16=False, without_timestamps=True)
    texts = []
    for record in records:
        samples = load_audio(absolute(record, data_dir)[-1]["content"][0]["audio_url"]["url"])
        mel = whisper.pad_or_trim(whisper.log_mel_spectrogram(samples), 3000)
        texts.append(whisper.decode(peer, mel, options).text)
    return texts


def routing_stats(model: EurekaAudio, metas: list[dict], data_dir: Path) -> dict[str, Any]:
    """Top-1 expert shares of speech vs non-speech tokens (by the metadata's speech spans) and router entropy."""
    speech_top1, other_top1, entropies = [], [], []
    for meta in metas:
        trace = model.routing(str(data_dir / meta["audio"]))
        spans = [(e["start_s"], e["end_s"]) for e in meta["events"] if e["kind"] == "speech"]
        middle = (trace.start_s + trace.end_s) / 2
        is_speech = np.array([any(s <= t < e for s, e in spans) for t in middle], dtype=bool)
        speech_top1 += trace.expert_ids[is_speech, 0].tolist()
        other_top1 += trace.expert_ids[~is_speech, 0].tolist()
        entropies += trace.entropy_bits().tolist()
    n = model.config.n_routed_experts
    speech_share = np.bincount(speech_top1, minlength=n) / max(1, len(speech_top1))
    other_share = np.bincount(other_top1, minlength=n) / max(1, len(other_top1))
    speech_expert = int(speech_share.argmax())
    return {
        "speech_tokens": len(speech_top1),
        "nonspeech_tokens": len(other_top1),
        "speech_top1_share": speech_share.round(4).tolist(),
        "nonspeech_top1_share": other_share.round(4).tolist(),
        "speech_expert": speech_expert,
        "speech_expert_share_of_nonspeech": float(other_share[speech_expert]),
        "router_entropy_bits_mean": float(np.mean(entropies)) if entropies else 0.0,
        "router_entropy_bits_max_possible": float(np.log2(n)),
    }


def evaluate(model: EurekaAudio, data_dir: Path, split: str = "test", limit: int | None = None,
             batch_size: int = 16, baseline: bool = True, ctc_beams: int | None = None,
             mc_scoring: bool = False) -> dict[str, Any]:
    """Every metric on the first ``limit`` clips of ``split`` (all clips when None).

    ASR decodes as the app does: ``ctc_beams`` re-ranked beams (None: the model's default, ``asr_ctc_beams``); with
    re-ranking on, greedy decoding's WER is reported beside it (``asr_wer_greedy``). ``mc_scoring``: each question
    is also answered by the option whose reply the model finds likeliest (``score_replies``), reported beside the
    generated answers' accuracy (``qa_accuracy_scored``)."""
    ctc_beams = model.asr_ctc_beams if ctc_beams is None else ctc_beams
    metas = [m for m in read_manifest(data_dir / "manifest.jsonl") if m["split"] == split][:limit]
    clip_ids = {m["id"] for m in metas}
    with open(data_dir / f"records_{split}.jsonl", encoding="utf-8") as handle:
        records = [r for r in map(json.loads, handle) if r["clip_id"] in clip_ids]
    by_task = {task: [r for r in records if r["task"] == task] for task in ("asr", "qa", "caption")}
    started = time.perf_counter()
    asr_out = generate_all(model, by_task["asr"], data_dir, batch_size, 96, ctc_beams)
    asr_greedy = generate_all(model, by_task["asr"], data_dir, batch_size, 96) if ctc_beams > 1 else asr_out
    qa_out = generate_all(model, by_task["qa"], data_dir, batch_size, 32)
    caption_out = generate_all(model, by_task["caption"], data_dir, batch_size, 256)
    metas_by_id = {m["id"]: m for m in metas}
    recall_by_kind: dict[str, list[bool]] = {}
    caption_counts: list[tuple[int, int]] = []  # (facts found, facts) per caption
    for record, text in zip(by_task["caption"], caption_out, strict=True):
        hits = [(kind, fact in text.lower()) for kind, fact in labelled_caption_facts(metas_by_id[record["clip_id"]])]
        for kind, hit in hits:
            recall_by_kind.setdefault(kind, []).append(hit)
        caption_counts.append((sum(hit for _, hit in hits), len(hits)))
    found, total = sum(n for n, _ in caption_counts), sum(n for _, n in caption_counts)
    qa_right = [chosen_option(question_text(r), o) == answer_letter(r["target"])
                for r, o in zip(by_task["qa"], qa_out, strict=True)]
    letter_right = [answer_letter(o) == answer_letter(r["target"]) for r, o in zip(by_task["qa"], qa_out, strict=True)]
    off_options = [off_option(question_text(r), o) for r, o in zip(by_task["qa"], qa_out, strict=True)]
    qa_by_kind: dict[str, list[bool]] = {}
    for record, right in zip(by_task["qa"], qa_right, strict=True):
        qa_by_kind.setdefault(record.get("question_kind", "?"), []).append(right)
    scored_by_kind: dict[str, list[bool]] = {}
    scored_right: list[bool] = []
    if mc_scoring:
        for record in by_task["qa"]:
            replies = option_replies(question_text(record))
            scores = model.score_replies(absolute(record, data_dir), list(replies.values()))
            best = list(replies)[int(np.argmax(scores))]
            scored_right.append(best == answer_letter(record["target"]))
            scored_by_kind.setdefault(record.get("question_kind", "?"), []).append(scored_right[-1])
    asr_clips = [r["clip_id"] for r in by_task["asr"]]
    qa_clips = [r["clip_id"] for r in by_task["qa"]]
    asr_pairs = [(normalise(r["target"]), normalise(o)) for r, o in zip(by_task["asr"], asr_out, strict=True)]
    asr_edits, asr_words = [edit_distance(ref, hyp) for ref, hyp in asr_pairs], [len(ref) for ref, _ in asr_pairs]
    intervals = {
        "asr_wer": clip_bootstrap_interval(per_clip_counts(asr_clips, asr_edits, asr_words)),
        "qa_accuracy": clip_bootstrap_interval(per_clip_counts(qa_clips, qa_right, [1] * len(qa_right))),
        **({"qa_accuracy_scored": clip_bootstrap_interval(per_clip_counts(qa_clips, scored_right,
                                                                          [1] * len(scored_right)))}
           if mc_scoring else {}),
        "caption_fact_recall": clip_bootstrap_interval(caption_counts),
    }
    report: dict[str, Any] = {
        "model": model.name,
        "split": split,
        "clips": len(metas),
        "asr_utterances": len(asr_out),
        "asr_wer": sum(asr_edits) / max(1, sum(asr_words)),  # word_error_rate's corpus WER, from the edits above
        "asr_ctc_beams": ctc_beams,
        "asr_wer_greedy": word_error_rate([r["target"] for r in by_task["asr"]], asr_greedy),
        "qa_questions": len(qa_out),
        "qa_accuracy": float(np.mean(qa_right)) if qa_right else 0.0,
        "qa_accuracy_by_kind": {k: round(float(np.mean(v)), 4) for k, v in sorted(qa_by_kind.items())},
        "qa_letter_accuracy": float(np.mean(letter_right)) if letter_right else 0.0,  # the leading letter alone
        "qa_off_option_share": float(np.mean(off_options)) if off_options else 0.0,
        **({"qa_accuracy_scored": float(np.mean(scored_right)) if scored_right else 0.0,
            "qa_accuracy_scored_by_kind": {k: round(float(np.mean(v)), 4) for k, v in sorted(scored_by_kind.items())}}
           if mc_scoring else {}),
        "caption_fact_recall": found / max(1, total),
        "caption_fact_recall_by_kind": {k: {"recall": round(float(np.mean(v)), 4), "facts": len(v)}
                                        for k, v in sorted(recall_by_kind.items())},
        "intervals_95": {key: [round(low, 4), round(high, 4)] for key, (low, high) in intervals.items()},
        "routing": routing_stats(model, metas, data_dir),
        "generation_seconds": round(time.perf_counter() - started, 1),
        "examples": [{"task": r["task"], "target": r["target"], "output": o}
                     for r, o in list(zip(by_task["asr"], asr_out, strict=True))[:3]
                     + list(zip(by_task["caption"], caption_out, strict=True))[:2]],
    }
    if baseline and by_task["asr"]:
        report["whisper_tiny_en_wer"] = word_error_rate([r["target"] for r in by_task["asr"]],
                                                        whisper_baseline(by_task["asr"], data_dir))
    return report


def export_subset(data_dir: Path, out_dir: Path, split: str = "test", n_clips: int = 12) -> Path:
    """Copy the first ``n_clips`` of a split (audio, manifest lines, records) into a small bundle for CI floors."""
    import shutil

    metas = [m for m in read_manifest(data_dir / "manifest.jsonl") if m["split"] == split][:n_clips]
    keep = {m["id"] for m in metas}
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "manifest.jsonl", "w", encoding="utf-8") as handle:
        for meta in metas:
            (out_dir / meta["audio"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(data_dir / meta["audio"], out_dir / meta["audio"])
            handle.write(json.dumps(meta) + "\n")
    with open(data_dir / f"records_{split}.jsonl", encoding="utf-8") as source, \
            open(out_dir / f"records_{split}.jsonl", "w", encoding="utf-8") as target:
        target.writelines(line for line in source if json.loads(line)["clip_id"] in keep)
    return out_dir


def markdown(report: dict[str, Any]) -> str:
    routing = report["routing"]
    beams = report.get("asr_ctc_beams", 0)
    intervals = report.get("intervals_95", {})

    def value(key: str) -> str:
        """The metric, with its 95 % interval over resampled clips when the report has one."""
        low_high = intervals.get(key)
        return f"{report[key]:.1%}" + (f" ({low_high[0]:.1%}–{low_high[1]:.1%})" if low_high else "")

    rows = [
        ("ASR WER", value("asr_wer"), "≤ 10 %", f"{report['asr_utterances']} utterances"
         + (f", {beams} beams re-ranked by the CTC head" if beams > 1 else ", greedy")),
        *([("ASR WER, greedy", f"{report['asr_wer_greedy']:.1%}", "–", "no re-ranking")] if beams > 1 else []),
        ("Whisper tiny.en WER (peer)", f"{report['whisper_tiny_en_wer']:.1%}" if "whisper_tiny_en_wer" in report
         else "–", "–", "same clips"),
        ("Multiple-choice accuracy", value("qa_accuracy"), "≥ 90 %", f"{report['qa_questions']} questions"),
        *([("Multiple-choice accuracy, options scored", value("qa_accuracy_scored"), "–",
            "the option the model finds likeliest")] if "qa_accuracy_scored" in report else []),
        ("Caption fact recall", value("caption_fact_recall"), "≥ 80 %", "facts from metadata"),
        ("Speech expert's share of non-speech top-1", f"{routing['speech_expert_share_of_nonspeech']:.1%}", "< 20 %",
         f"expert {routing['speech_expert']}"),
        ("Router entropy (mean)", f"{routing['router_entropy_bits_mean']:.2f} bits", "–",
         f"max {routing['router_entropy_bits_max_possible']:.0f} bits"),
    ]
    lines = [f"Held-out split `{report['split']}`, {report['clips']} clips, model `{report['model']}`."
             + (" In brackets: 95 % intervals from resampling the clips (2 000 draws)." if intervals else ""), "",
             "| metric | value | target | note |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    by_question = report.get("qa_accuracy_by_kind", {})
    by_scored = report.get("qa_accuracy_scored_by_kind", {})
    by_fact = report.get("caption_fact_recall_by_kind", {})
    if by_question:
        lines += ["", "Multiple-choice accuracy by question kind: " + ", ".join(
            f"{kind} {accuracy:.0%}" for kind, accuracy in by_question.items()) + "."]
    if "qa_letter_accuracy" in report:
        lines += ["", f"Multiple-choice answers: the leading letter alone is right in "
                  f"{report['qa_letter_accuracy']:.1%}; {report['qa_off_option_share']:.1%} quote no option offered "
                  "(graded by their letter)."]
    if by_scored:
        lines += ["", "Multiple-choice accuracy by question kind, options scored: " + ", ".join(
            f"{kind} {accuracy:.0%}" for kind, accuracy in by_scored.items()) + "."]
    if by_fact:
        lines += ["", "Caption fact recall by kind of fact (facts): " + ", ".join(
            f"{kind} {row['recall']:.0%} ({row['facts']})" for kind, row in by_fact.items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mini")
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, help="only the first N clips of the split")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--no-baseline", action="store_true", help="skip Whisper tiny.en")
    parser.add_argument("--ctc-beams", type=int, help="ASR: beams re-ranked by the CTC head (default: the model's "
                        "own, 0 without a head; 0 = greedy)")
    parser.add_argument("--mc-scoring", action="store_true", help="also answer each multiple-choice question with "
                        "the option the model finds likeliest, and report that accuracy beside the generated answers'")
    parser.add_argument("--out", type=Path, default=Path("runs/eval"), help="writes report.json and report.md here")
    parser.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda, …)")
    parser.add_argument("--export-subset", type=int, metavar="N",
                        help="instead of evaluating, copy the first N clips of the split to --out")
    args = parser.parse_args(argv)
    if args.export_subset:
        print(export_subset(args.data, args.out, args.split, args.export_subset))
        return 0
    report = evaluate(load_model(args.model, device=args.device), args.data, args.split, args.limit, args.batch_size,
                      not args.no_baseline, args.ctc_beams, args.mc_scoring)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    (args.out / "report.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
