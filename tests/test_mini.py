"""Eureka-mini, the bundled checkpoint: it loads, transcribes a held-out clip, and meets floors on a fixed subset.

The floors are looser than the targets in the model card (the subset is small, so CI stays fast); the full
held-out evaluation is `python -m model.evaluate --model mini --data <dataset>`.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from model import load_model, task_messages
from model.evaluate import chosen_option, clip_bootstrap_interval, evaluate, markdown, off_option, per_clip_counts
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


def recipe_flags(command: str) -> dict[str, str]:
    """A ``python -m model.train`` command's flags, without where it reads and writes."""
    words = shlex.split(command[command.index("-m model.train") + len("-m model.train"):])
    flags = dict(zip(words[::2], words[1::2], strict=True))
    return {k: v for k, v in flags.items() if k not in ("--data", "--out", "--export")}


def test_make_mini_trains_with_the_recipe_the_model_card_gives() -> None:
    """``make mini`` and the model card's recipe are written twice; this keeps them one recipe."""
    card = (MINI_DIR / "README.md").read_text()
    bundled = card[card.index("## The bundled checkpoint"):card.index("## The session-15 checkpoint")]
    card_command = re.search(r"python -m model\.train .*?(?=\n```)", bundled.replace("\\\n", " "), re.S).group(0)
    make = subprocess.run(["make", "-n", "mini"], cwd=MINI_DIR.parents[1], capture_output=True, text=True, check=True)
    make_command = next(line for line in make.stdout.splitlines() if "-m model.train" in line).rstrip(" &\\")
    assert recipe_flags(make_command) == recipe_flags(card_command)
    assert recipe_flags(card_command)["--sft-steps"] == "6700"


def test_mini_transcribes_a_bundled_heldout_example_exactly(mini) -> None:
    """The first ASR record of the bundled held-out subset (a sentence and a voice never heard in training)."""
    record = next(r for r in map(json.loads, open(HELDOUT / "records_test.jsonl")) if r["task"] == "asr")
    audio = record["messages"][-1]["content"][0]["audio_url"]["url"]
    assert mini.generate(task_messages("asr", str(HELDOUT / audio)), max_new_tokens=64) == record["target"]


def test_mini_meets_floors_on_the_fixed_heldout_subset(mini) -> None:
    report = evaluate(mini, Path(HELDOUT), split="test", baseline=False, mc_scoring=True)
    assert report["asr_wer"] <= FLOORS["asr_wer_max"]
    assert report["asr_ctc_beams"] > 1 and report["asr_wer"] <= report["asr_wer_greedy"]  # no worse than greedy here
    assert report["qa_accuracy"] >= FLOORS["qa_accuracy_min"]
    assert report["qa_accuracy_scored"] >= FLOORS["qa_accuracy_min"]  # answering by the likeliest option
    assert set(report["qa_accuracy_scored_by_kind"]) == set(report["qa_accuracy_by_kind"])
    assert report["caption_fact_recall"] >= FLOORS["caption_fact_recall_min"]
    assert report["routing"]["speech_expert_share_of_nonspeech"] < FLOORS["speech_expert_share_of_nonspeech_max"]
    for key in ("asr_wer", "qa_accuracy", "qa_accuracy_scored", "caption_fact_recall"):  # each within its interval
        low, high = report["intervals_95"][key]
        assert low <= report[key] <= high, key
    assert f"({report['intervals_95']['qa_accuracy'][0]:.1%}–" in markdown(report)
    assert 0 <= report["qa_letter_accuracy"] <= 1 and 0 <= report["qa_off_option_share"] <= 1
    assert f"letter alone is right in {report['qa_letter_accuracy']:.1%}" in markdown(report)
    # recall by kind of fact re-adds to the overall recall (each fact counted once, under its first kind)
    by_kind = report["caption_fact_recall_by_kind"].values()
    total = sum(row["facts"] for row in by_kind)
    assert sum(row["recall"] * row["facts"] for row in by_kind) / total == pytest.approx(
        report["caption_fact_recall"], abs=1e-3)


def test_scoring_replies_sums_the_log_probabilities_generation_gives_them(mini) -> None:
    """score_replies (teacher forcing, replies right-padded in one batch) against transformers' own greedy decoding
    of the same prompt: the reply it generates scores the sum of its tokens' log-softmaxed raw logits."""
    import torch

    from model.evaluate import absolute, question_text
    from model.prompts import option_replies

    record = next(r for r in map(json.loads, open(HELDOUT / "records_test.jsonl")) if r["task"] == "qa")
    messages = absolute(record, HELDOUT)
    prepared = mini.prepare([messages])
    with torch.inference_mode():
        output = mini.model.backbone.generate(
            **prepared.generate_kwargs(), max_new_tokens=48, do_sample=False, eos_token_id=mini.special_ids.im_end,
            pad_token_id=mini.special_ids.pad, output_logits=True, return_dict_in_generate=True)
    new_ids = output.sequences[0, prepared.input_ids.shape[1]:].tolist()
    assert new_ids[-1] == mini.special_ids.im_end  # a whole reply, end of turn included
    expected = sum(float(torch.log_softmax(logits[0].float(), -1)[token])
                   for logits, token in zip(output.logits, new_ids, strict=True))
    reply = mini.tokenizer.decode(new_ids[:-1], skip_special_tokens=True)
    others = list(option_replies(question_text(record)).values())
    scores = mini.score_replies(messages, [*others, reply])  # padded beside longer and shorter replies
    assert scores[-1] == pytest.approx(expected, abs=1e-3)
    assert mini.score_replies(messages, others[:1]) == pytest.approx(scores[:1], abs=1e-4)  # alone = in a batch
    with pytest.raises(ValueError, match="score 1 to 16 replies"):
        mini.score_replies(messages, [])
    with pytest.raises(ValueError, match="the model's context is 2048 tokens"):
        mini.score_replies(messages, ["A. " + "very " * 3000])


def test_qa_tab_answers_a_multiple_choice_turn_with_the_likeliest_option(mini) -> None:
    import gradio as gr

    from app import qa
    from model.evaluate import question_text
    from model.prompts import option_replies

    record = next(r for r in map(json.loads, open(HELDOUT / "records_test.jsonl")) if r["task"] == "qa")
    clip = str(HELDOUT / record["messages"][-1]["content"][0]["audio_url"]["url"])
    question = question_text(record)
    session = qa.add_turn(qa.new_session(), [clip], question, score_options=True)
    answered, status = qa.answer_by_scoring(mini, session, system_prompt="")
    replies = list(option_replies(question).values())
    scores = mini.score_replies(qa.conversation_messages(session), replies)
    assert answered["turns"][-1]["answer"] == replies[scores.index(max(scores))]  # how often it is right: the floors
    assert session["turns"][-1]["answer"] is None  # the caller's session is not changed
    assert "scoring 4 options" in status and f"A {scores[0]:.2f}" in status
    with pytest.raises(gr.Error, match="Nothing to answer"):
        qa.answer_by_scoring(mini, answered)
    with pytest.raises(gr.Error, match="needs a multiple-choice question"):
        qa.add_turn(qa.new_session(), [clip], "Who is speaking?", score_options=True)


def test_grading_reads_an_answers_text_first_and_flags_text_no_option_has() -> None:
    """An answer is graded by the option its text quotes, else by its letter; text quoting no option is flagged."""
    question = "How high is the voice?\nA. Low\nB. Medium\nC. High\nD. It keeps changing"
    assert chosen_option(question, "A. Low") == "A" and not off_option(question, "A. Low")
    assert chosen_option(question, "A. Medium") == "B" and not off_option(question, "A. medium ")  # text wins
    assert chosen_option(question, "C. Very high") == "C" and off_option(question, "C. Very high")  # letter alone
    assert chosen_option(question, "No idea") is None and off_option(question, "No idea")


def test_clip_bootstrap_interval_resamples_clips_not_items() -> None:
    """Ratios of sums over clips drawn with replacement: seeded, narrower with more clips, and a clip's items move
    together (one clip with all 10 of its questions wrong is one draw, not ten)."""
    assert per_clip_counts(["a", "b", "a"], [1, 0, 1], [1, 1, 1]) == [(2.0, 2.0), (0.0, 1.0)]
    assert clip_bootstrap_interval([(3.0, 3.0)] * 20) == (1.0, 1.0)  # every clip right: no doubt
    small = [(1.0, 1.0)] * 9 + [(0.0, 1.0)]
    low, high = clip_bootstrap_interval(small)
    assert low < 0.9 < high and clip_bootstrap_interval(small) == (low, high)
    wide = high - low
    low, high = clip_bootstrap_interval(small * 10)  # same accuracy, 100 clips
    assert low < 0.9 < high and high - low < wide / 2
    clustered = [(10.0, 10.0)] * 9 + [(0.0, 10.0)]  # 100 questions, but 10 clips
    spread = [(1.0, 1.0)] * 90 + [(0.0, 1.0)] * 10  # 100 questions on 100 clips
    (low_c, high_c), (low_s, high_s) = clip_bootstrap_interval(clustered), clip_bootstrap_interval(spread)
    assert high_c - low_c > 2 * (high_s - low_s)
    assert clip_bootstrap_interval([]) == (0.0, 0.0)
