"""Synthetic data source: determinism, metadata truth, held-out splits, and the targets built from metadata."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from model.data.__main__ import main as cli_main
from model.data.synth import (
    EVENT_KINDS,
    HELDOUT_VOICES,
    SAMPLE_RATE,
    TRAIN_VOICES,
    VARIANT_GENDER,
    espeak_available,
    generate_clip,
    generate_dataset,
    grammar_size,
    make_beeps,
    read_manifest,
    rms_db,
    sample_sentence,
    sentence_split,
    vocabulary,
    write_wav,
)
from model.data.tasks import (
    ASR_SYSTEM_PROMPT,
    CAPTION_PROMPT,
    caption,
    caption_facts,
    make_questions,
    to_chat_records,
    transcript,
)

needs_espeak = pytest.mark.skipif(
    not espeak_available(), reason="espeak-ng is not on PATH (Debian: apt-get install espeak-ng); speech clips need it"
)

REQUIRED_FIELDS = {
    "speech": {"text", "voice", "accent", "gender", "rate_wpm", "pitch", "amplitude"},
    "tone": {"freq_hz", "pitch_class"},
    "beeps": {"count", "freq_hz"},
    "chirp": {"direction"},
    "noise": {"color"},
    "clicks": {"count"},
    "melody": {"notes"},
    "chord": {"name"},
    "silence": set(),
}
N_CLIPS = 60


@pytest.fixture(scope="module")
def train_clips() -> list[tuple[np.ndarray, dict]]:
    """A few dozen training clips, shared by the metadata and task tests."""
    if not espeak_available():
        pytest.skip("espeak-ng is not on PATH (Debian: apt-get install espeak-ng); speech clips need it")
    return [generate_clip(i, "train", seed=0) for i in range(N_CLIPS)]


def count_bursts(audio: np.ndarray, frame: int = 80) -> int:
    """Count separate bursts with a 5 ms RMS envelope and a half-of-peak threshold."""
    frames = audio[: len(audio) // frame * frame].reshape(-1, frame)
    envelope = np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1))
    above = envelope > 0.5 * envelope.max()
    return int(above[0]) + int(np.sum(above[1:] & ~above[:-1]))


# ---------------------------------------------------------------------------------------------------------------
# Grammar and splits (no audio needed)
# ---------------------------------------------------------------------------------------------------------------
def test_grammar_is_closed_and_held_out_sentences_are_new_combinations_of_seen_words():
    rng = np.random.default_rng(0)
    train = {sample_sentence(rng, "train") for _ in range(3000)}
    test = {sample_sentence(rng, "test") for _ in range(300)}
    assert 200 <= len(vocabulary()) <= 400
    assert grammar_size() > 100_000
    assert len(train) > 2000  # thousands of distinct sentences
    assert not train & test
    assert all(sentence_split(s) == "test" for s in test)
    assert all(4 <= len(s.split()) <= 10 for s in train | test)
    train_words = Counter(w for s in train for w in s.split())
    assert set(vocabulary()) == set(train_words)  # every word is seen in training
    assert {w for s in test for w in s.split()} <= set(train_words)


def test_voice_variants_are_split_and_gendered():
    assert not set(TRAIN_VOICES) & set(HELDOUT_VOICES)
    for voices in (TRAIN_VOICES, HELDOUT_VOICES):
        assert {VARIANT_GENDER[v] for v in voices} == {"male", "female"}


# ---------------------------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------------------------
@needs_espeak
def test_same_seed_gives_byte_identical_dataset_for_any_worker_count(tmp_path: Path):
    first = generate_dataset(tmp_path / "a", 8, 2, 2, seed=3, workers=1)
    second = generate_dataset(tmp_path / "b", 8, 2, 2, seed=3, workers=2)
    assert first.read_bytes() == second.read_bytes()
    for meta in read_manifest(first):
        assert (first.parent / meta["audio"]).read_bytes() == (second.parent / meta["audio"]).read_bytes()


@needs_espeak
def test_one_clip_regenerates_alone_and_seeds_differ():
    audio, meta = generate_clip(7, "train", seed=0)
    again, meta_again = generate_clip(7, "train", seed=0)
    assert audio.tobytes() == again.tobytes() and meta == meta_again
    others = [generate_clip(i, "train", seed=1) for i in range(5)]
    mine = [generate_clip(i, "train", seed=0) for i in range(5)]
    assert all(a.tobytes() != b.tobytes() for (a, _), (b, _) in zip(mine, others, strict=True))


@needs_espeak
def test_wav_holds_exactly_the_returned_audio(tmp_path: Path):
    audio, _ = generate_clip(0, "val", seed=0)
    write_wav(tmp_path / "x.wav", audio)
    read, rate = sf.read(tmp_path / "x.wav", dtype="float32")
    info = sf.info(tmp_path / "x.wav")
    assert rate == SAMPLE_RATE and info.subtype == "PCM_16" and info.channels == 1
    assert np.array_equal(read, audio)


# ---------------------------------------------------------------------------------------------------------------
# Metadata is the truth of the audio
# ---------------------------------------------------------------------------------------------------------------
def test_metadata_fields_and_json(train_clips):
    for audio, meta in train_clips:
        assert audio.dtype == np.float32 and audio.ndim == 1
        assert meta["sample_rate"] == SAMPLE_RATE and meta["num_samples"] == len(audio)
        assert meta["duration_s"] == pytest.approx(len(audio) / SAMPLE_RATE, abs=1e-4)
        assert 1.0 <= meta["duration_s"] <= 12.0
        assert json.loads(json.dumps(meta, allow_nan=False)) == meta
        starts = [e["start_s"] for e in meta["events"]]
        assert starts == sorted(starts)
        for event in meta["events"]:
            assert event["kind"] in EVENT_KINDS
            assert REQUIRED_FIELDS[event["kind"]] <= set(event)
            assert 0 <= event["start_s"] < event["end_s"] <= meta["duration_s"]
            assert isinstance(event["level_db"], float)


def test_speech_events_where_espeak_spoke(train_clips):
    scenes = Counter(meta["scene"] for _, meta in train_clips)
    assert scenes["speech"] and scenes["two_speakers"]  # the sample covers speech scenes
    for _, meta in train_clips:
        speech = [e for e in meta["events"] if e["kind"] == "speech"]
        expected = {"speech": 1, "speech_noise": 1, "speech_sound": 1, "two_speakers": 2}.get(meta["scene"], 0)
        assert len(speech) == expected
        for event in speech:
            assert event["voice"] == f"{event['accent']}+{event['variant']}"
            assert event["gender"] == VARIANT_GENDER[event["variant"]]


def test_silence_is_silent_and_events_are_audible_at_their_level(train_clips):
    checked_silence = 0
    for audio, meta in train_clips:
        has_bed = any(e.get("background") for e in meta["events"])
        for event in meta["events"]:
            segment = audio[round(event["start_s"] * SAMPLE_RATE) : round(event["end_s"] * SAMPLE_RATE)]
            if event["kind"] == "silence":
                assert np.sqrt(np.mean(segment.astype(np.float64) ** 2)) < 1e-4
                checked_silence += 1
            else:
                assert rms_db(segment) > -60
                if not has_bed:  # events do not overlap, so the mix segment is the event alone
                    assert rms_db(segment) == pytest.approx(event["level_db"], abs=0.1)
    assert checked_silence > 5


def test_beep_count_is_recoverable_from_the_audio(train_clips):
    beeps = [(audio, e) for audio, meta in train_clips for e in meta["events"] if e["kind"] == "beeps"]
    assert beeps, "the sample should contain beeps"
    for audio, event in beeps:
        segment = audio[round(event["start_s"] * SAMPLE_RATE) : round(event["end_s"] * SAMPLE_RATE)]
        assert count_bursts(segment) == event["count"]
    rng = np.random.default_rng(1)
    for count in range(1, 7):
        assert count_bursts(make_beeps(rng, count)[0]) == count


@needs_espeak
def test_held_out_splits_use_new_sentences_and_voices():
    train = [generate_clip(i, "train", seed=0)[1] for i in range(30)]
    test = [generate_clip(i, "test", seed=0)[1] for i in range(30)]
    train_speech = [e for m in train for e in m["events"] if e["kind"] == "speech"]
    test_speech = [e for m in test for e in m["events"] if e["kind"] == "speech"]
    assert train_speech and test_speech
    assert {e["variant"] for e in train_speech} <= set(TRAIN_VOICES)
    assert {e["variant"] for e in test_speech} <= set(HELDOUT_VOICES)
    assert all(sentence_split(e["text"]) == "train" for e in train_speech)
    assert all(sentence_split(e["text"]) == "test" for e in test_speech)
    assert not {e["text"] for e in train_speech} & {e["text"] for e in test_speech}


# ---------------------------------------------------------------------------------------------------------------
# Training targets
# ---------------------------------------------------------------------------------------------------------------
def parse_options(question: str) -> dict[str, str]:
    lines = question.split("\n")
    assert len(lines) == 5
    options = {}
    for letter, line in zip("ABCD", lines[1:], strict=True):
        assert line.startswith(f"{letter}. ")
        options[letter] = line[3:]
    return options


def test_questions_are_well_formed_and_the_answer_position_is_uniform(train_clips):
    letters = Counter()
    kinds = Counter()
    for round_ in range(6):
        for i, (_, meta) in enumerate(train_clips):
            for q in make_questions(meta, np.random.default_rng([round_, i]), n=5):
                options = parse_options(q["question"])
                assert len(set(options.values())) == 4
                assert options[q["answer_letter"]] == q["answer_text"]
                letters[q["answer_letter"]] += 1
                kinds[q["kind"]] += 1
    total = sum(letters.values())
    assert total > 1000
    assert all(0.2 < letters[letter] / total < 0.3 for letter in "ABCD"), letters
    assert {"gender", "rate", "beep_count", "order", "transcript", "speech_present", "speaker_count"} <= set(kinds)


def test_questions_answer_the_metadata(train_clips):
    for i, (_, meta) in enumerate(train_clips):
        for q in make_questions(meta, np.random.default_rng(i), n=20):
            if q["kind"] == "transcript":
                assert q["answer_text"].strip('"') in [e["text"] for e in meta["events"] if e["kind"] == "speech"]
            if q["kind"] == "beep_count":
                count = next(e["count"] for e in meta["events"] if e["kind"] == "beeps")
                assert q["answer_text"].lower() == ["zero", "one", "two", "three", "four", "five", "six"][count]


def test_caption_states_every_fact(train_clips):
    for _, meta in train_clips:
        text = caption(meta)
        facts = caption_facts(meta)
        assert facts and all(fact in text.lower() for fact in facts), (text, facts)
        for event in meta["events"]:
            if event["kind"] == "speech":
                assert f'"{event["text"]}"' in text
            if event["kind"] == "beeps":
                assert "beep" in text


def test_labelled_caption_facts_are_the_caption_facts(train_clips):
    from model.data.tasks import labelled_caption_facts

    for _, meta in train_clips:
        labelled = labelled_caption_facts(meta)
        facts = [fact for _, fact in labelled]
        assert facts == caption_facts(meta) and len(set(facts)) == len(facts)  # each fact once
        assert ("duration", f"{meta['duration_s']:.1f}-second") in labelled
        for event in meta["events"]:
            if event["kind"] == "speech":
                assert ("speaking rate", f"{event['rate_class']} rate") in labelled
                assert ("transcript", event["text"]) in labelled
            if event["kind"] == "tone":
                assert ("frequency", f"{event['freq_hz']} hz") in labelled


def test_chat_records_use_the_official_message_format(train_clips):
    for i, (_, meta) in enumerate(train_clips):
        records = to_chat_records(meta, f"audio/{meta['id']}.wav", np.random.default_rng(i))
        tasks = [r["task"] for r in records]
        assert tasks.count("caption") == 1 and tasks.count("qa") == 2
        assert ("asr" in tasks) == bool(transcript(meta))
        for record in records:
            user = record["messages"][-1]
            assert user["role"] == "user"
            assert user["content"][0] == {"type": "audio_url", "audio_url": {"url": f"audio/{meta['id']}.wav"}}
            if record["task"] == "asr":
                assert record["messages"][0]["content"][0]["text"] == ASR_SYSTEM_PROMPT
                assert len(user["content"]) == 1 and record["target"] == transcript(meta)
            elif record["task"] == "qa":
                assert len(record["messages"]) == 1 and re.fullmatch(r"[A-D]\. .+", record["target"])
            else:
                assert user["content"][1]["text"] == CAPTION_PROMPT


@needs_espeak
def test_cli_writes_manifest_wavs_and_records(tmp_path: Path):
    cli_main(["--out", str(tmp_path), "--train", "3", "--val", "1", "--test", "1", "--workers", "1", "--records"])
    metas = read_manifest(tmp_path / "manifest.jsonl")
    assert [m["split"] for m in metas] == ["train"] * 3 + ["val", "test"]
    for meta in metas:
        audio, rate = sf.read(tmp_path / meta["audio"], dtype="float32")
        assert rate == SAMPLE_RATE and len(audio) == meta["num_samples"]
    assert (tmp_path / "records_train.jsonl").read_text().count("\n") >= 3 * 3
