"""Fact-driven multiple-choice questions, one builder per taxonomy leaf, for the offline question generator.

Two sources of facts, never mixed for the same question:

* **Synthetic metadata** (clips from ``model.data.synth``): exact, so the builders are ``model.data.tasks``'s own
  (same wording, distractors and answer layout as the training data), plus ``pause`` and ``loudness`` here.
* **Measured acoustic facts** (any audio, ``dataflux_ui.acoustics``): duration and loudness are exact measurements;
  speech presence, voice pitch, pauses and segment counts rest on heuristics, and a builder returns ``None``
  whenever a fact sits near a class boundary, so no question is asked about something the numbers cannot settle.

A builder returns ``{question, answer_letter, answer_text, kind}`` (``tasks.multiple_choice``'s layout) or ``None``
when the clip has nothing to ask about in that category.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from model.data import tasks

from .acoustics import AcousticFacts

Builder = Callable[[Any, np.random.Generator], dict[str, str] | None]

LONG_PAUSE_S = 1.0
SHORT_GAP_S = 0.7
PAUSE_OPTIONS = {
    "yes": "Yes, there is a pause of a second or more",
    "no": "No, the sound never stops for that long",
    "silent": "The whole clip is silent",
    "end": "Only the very end is silent",
}
PAUSE_QUESTION = "Is there a pause of silence lasting a second or more between the sounds?"
# (label, low dBFS, high dBFS): gaps between the ranges are left out on purpose (no question near a boundary).
LOUDNESS_CLASSES = (
    ("Silent", -200.0, -70.0),
    ("Very quiet, barely audible", -60.0, -42.0),
    ("Moderately loud", -36.0, -17.0),
    ("Loud", -13.0, 1.0),
)
VOICE_PITCH_HZ = (("Low", 0.0, 135.0), ("Medium", 155.0, 200.0), ("High", 225.0, 1000.0))


def classify(value: float, classes: tuple[tuple[str, float, float], ...]) -> str | None:
    """The class whose range holds ``value``, or None in a gap between ranges."""
    return next((label for label, low, high in classes if low <= value < high), None)


# --- metadata builders beyond model.data.tasks --------------------------------------------------------------------
def meta_pause(meta: dict[str, Any], rng: np.random.Generator) -> dict[str, str] | None:
    if tasks.presence(meta) == "silent":
        answer = "silent"
    elif tasks.background_noise(meta) is not None:
        return None  # the noise bed fills every gap
    else:
        gaps = [e["end_s"] - e["start_s"] for e in meta["events"] if e["kind"] == "silence"]
        if any(g >= LONG_PAUSE_S for g in gaps):
            answer = "yes"
        elif all(g <= SHORT_GAP_S for g in gaps):
            answer = "no"
        else:
            return None
    return tasks.multiple_choice("pause", PAUSE_QUESTION, PAUSE_OPTIONS[answer], list(PAUSE_OPTIONS.values()), rng)


def loudness_question(rms_dbfs: float, rng: np.random.Generator) -> dict[str, str] | None:
    label = classify(rms_dbfs, LOUDNESS_CLASSES)
    if label is None:
        return None
    options = [c[0] for c in LOUDNESS_CLASSES]
    return tasks.multiple_choice("loudness", "How loud is the clip overall?", label, options, rng)


def meta_loudness(meta: dict[str, Any], rng: np.random.Generator, facts: AcousticFacts | None = None):
    """Overall loudness is a measurement even for synthetic clips (the metadata stores per-event levels only)."""
    return loudness_question(facts.rms_dbfs, rng) if facts is not None else None


META_BUILDERS: dict[str, Builder] = {
    "gender": tasks.q_gender, "accent": tasks.q_accent, "speaker_count": tasks.q_speaker_count,
    "rate": tasks.q_rate, "voice_pitch": tasks.q_voice_pitch, "transcript": tasks.q_transcript,
    "speech_present": tasks.q_speech_present, "beep_count": tasks.q_beep_count, "tone_pitch": tasks.q_tone_pitch,
    "tone_freq": tasks.q_tone_freq, "chirp_direction": tasks.q_chirp_direction, "noise_color": tasks.q_noise_color,
    "click_count": tasks.q_click_count, "melody_notes": tasks.q_melody_notes, "chord": tasks.q_chord,
    "order": tasks.q_order, "duration": tasks.q_duration, "pause": meta_pause,
}


# --- measured-fact builders ---------------------------------------------------------------------------------------
def facts_duration(facts: AcousticFacts, rng: np.random.Generator) -> dict[str, str] | None:
    seconds = facts.duration_s
    if seconds < 0.75 or abs(seconds - round(seconds)) > 0.35 or round(seconds) > 15:
        return None  # too close to halfway between two whole seconds
    return tasks.q_duration({"duration_s": seconds}, rng)


def facts_loudness(facts: AcousticFacts, rng: np.random.Generator) -> dict[str, str] | None:
    return loudness_question(facts.rms_dbfs, rng)


def facts_speech_present(facts: AcousticFacts, rng: np.random.Generator) -> dict[str, str] | None:
    if not facts.segments:
        answer = "silent"
    elif facts.speech_segments:
        answer = "speech"
    elif facts.voiced_ratio >= 0.5:
        answer = "sounds"  # tonal, not speech-like
    else:
        return None  # unvoiced sound: noise or clicks, the heuristic cannot tell which
    return tasks.multiple_choice("speech_present", "Is there any speech in the clip?",
                                 tasks.PRESENCE_OPTIONS[answer], list(tasks.PRESENCE_OPTIONS.values()), rng)


def facts_voice_pitch(facts: AcousticFacts, rng: np.random.Generator) -> dict[str, str] | None:
    speech = facts.speech_segments
    pitches = [s.median_f0_hz for s in speech if s.median_f0_hz is not None]
    if not pitches:
        return None
    label = classify(float(np.median(pitches)), VOICE_PITCH_HZ)
    if label is None:
        return None
    return tasks.multiple_choice("voice_pitch", "How high is the pitch of the speaker's voice?", label,
                                 ["Low", "Medium", "High", "It keeps changing"], rng)


def facts_pause(facts: AcousticFacts, rng: np.random.Generator) -> dict[str, str] | None:
    if not facts.segments:
        answer = "silent"
    else:
        gaps = [b.start_s - a.end_s for a, b in zip(facts.segments, facts.segments[1:], strict=False)]
        if any(g >= LONG_PAUSE_S + 0.1 for g in gaps):
            answer = "yes"
        elif all(g <= SHORT_GAP_S for g in gaps) and facts.duration_s - facts.segments[-1].end_s < SHORT_GAP_S:
            answer = "no"
        else:
            return None
    return tasks.multiple_choice("pause", PAUSE_QUESTION, PAUSE_OPTIONS[answer], list(PAUSE_OPTIONS.values()), rng)


def facts_segment_count(facts: AcousticFacts, rng: np.random.Generator) -> dict[str, str] | None:
    count = len(facts.segments)
    if count == 0 or count > 8:
        return None
    question = "How many separate bursts of sound, with silence between them, are heard?"
    nearby = [n for n in range(max(1, count - 3), count + 4) if n != count]
    return tasks.multiple_choice("segment_count", question, tasks.number_word(count).capitalize(),
                                 [tasks.number_word(n).capitalize() for n in nearby], rng)


FACT_BUILDERS: dict[str, Builder] = {
    "duration": facts_duration, "loudness": facts_loudness, "speech_present": facts_speech_present,
    "voice_pitch": facts_voice_pitch, "pause": facts_pause, "segment_count": facts_segment_count,
}


def build_question(key: str, meta: dict[str, Any] | None, facts: AcousticFacts | None,
                   rng: np.random.Generator) -> dict[str, str] | None:
    """One question of category ``key``: from metadata when the clip has it, else from the measured facts."""
    if meta and meta.get("events") is not None:
        if key == "loudness":
            return meta_loudness(meta, rng, facts)
        builder = META_BUILDERS.get(key)
        return builder(meta, rng) if builder else None
    builder = FACT_BUILDERS.get(key)
    return builder(facts, rng) if builder and facts is not None else None
