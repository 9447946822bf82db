"""Training targets from clip metadata: ASR transcripts, multiple-choice questions and dense captions.

Everything here reads only the metadata written by :mod:`model.data.synth`, which is exact, so every target is
correct by construction. Questions follow the DataFlux format (one string, four options A-D, the correct position
drawn uniformly, plausible distractors, questions about what is heard); captions are deterministic templates that
state every fact a question could ask about, so a caption-only judge can answer them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from model.data.synth import (
    ACCENTS,
    CHORD_QUALITIES,
    CHORD_ROOTS,
    TONE_PITCH_CLASSES,
    WORDS,
    sample_sentence,
    word_category,
)

try:  # the lead's prompts module is the single source of truth when present
    from model.prompts import ASR_SYSTEM_PROMPT, CAPTION_PROMPT
except ImportError:  # pragma: no cover - only while model/prompts.py does not exist
    ASR_SYSTEM_PROMPT = "You are an advanced ASR (Automatic Speech Recognition) AI assistant."
    CAPTION_PROMPT = "Please provide a comprehensive description of the input audio, covering all details."

LETTERS = ("A", "B", "C", "D")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve")
KIND_LABELS = {
    "speech": "Someone speaking",
    "tone": "A steady tone",
    "beeps": "A series of beeps",
    "chirp": "A pitch sweep (chirp)",
    "noise": "A burst of noise",
    "clicks": "A few sharp clicks",
    "melody": "A short melody",
    "chord": "A chord",
}
RATE_OPTIONS = {"slow": "Slowly", "normal": "At a normal pace", "fast": "Quickly"}
PITCH_OPTIONS = {"low": "Low", "medium": "Medium", "high": "High"}
NOISE_OPTIONS = {"white": "White noise (a bright hiss)", "pink": "Pink noise (a softer hiss)",
                 "brown": "Brown noise (a deep rumble)"}
PRESENCE_OPTIONS = {"speech": "Yes, someone speaks", "sounds": "No, only non-speech sounds",
                    "noise": "No, only noise", "silent": "No, the clip is silent"}


# ---------------------------------------------------------------------------------------------------------------
# Event helpers
# ---------------------------------------------------------------------------------------------------------------
def transcript(meta: dict[str, Any]) -> str:
    """ASR target: the speech events' texts in time order, joined by a space ("" when nobody speaks)."""
    return " ".join(e["text"] for e in speech_events(meta))


def speech_events(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Speech events in time order."""
    return [e for e in meta["events"] if e["kind"] == "speech"]


def foreground_events(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Sounding events laid out in turn (no silence, no background bed), in time order."""
    return [e for e in meta["events"] if e["kind"] != "silence" and not e.get("background")]


def background_noise(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The background noise bed, if the clip has one."""
    return next((e for e in meta["events"] if e.get("background")), None)


def number_word(n: int) -> str:
    """English word for small counts (digits beyond twelve)."""
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def ordinal(i: int, total: int) -> str:
    """"the speaker" for one speaker, "the first/second speaker" for several."""
    if total == 1:
        return "the speaker"
    return f"the {('first', 'second', 'third', 'fourth')[i]} speaker"


# ---------------------------------------------------------------------------------------------------------------
# Multiple-choice questions
# ---------------------------------------------------------------------------------------------------------------
def format_question(question: str, options: list[str]) -> str:
    """DataFlux layout: the question, then one "X. option" line per option."""
    return "\n".join([question] + [f"{letter}. {option}" for letter, option in zip(LETTERS, options, strict=True)])


def multiple_choice(kind: str, question: str, correct: str, distractors: list[str],
                    rng: np.random.Generator) -> dict[str, str]:
    """Place the correct option at a uniformly drawn position among three distinct distractors."""
    wrong = [d for d in dict.fromkeys(distractors) if d != correct]
    if len(wrong) < 3:
        raise ValueError(f"{kind}: need three distinct distractors, got {wrong}")
    wrong = [wrong[int(i)] for i in rng.permutation(len(wrong))[:3]]
    position = int(rng.integers(4))
    options = wrong[:position] + [correct] + wrong[position:]
    return {"question": format_question(question, options), "answer_letter": LETTERS[position],
            "answer_text": correct, "kind": kind}


def _pick_speech(meta: dict[str, Any], rng: np.random.Generator, gendered: bool = False):
    speeches = speech_events(meta)
    usable = [i for i, e in enumerate(speeches) if not gendered or e["gender"] in ("male", "female")]
    if not usable:
        return None, ""
    i = usable[int(rng.integers(len(usable)))]
    return speeches[i], ordinal(i, len(speeches))


def q_gender(meta, rng):
    speech, who = _pick_speech(meta, rng, gendered=True)
    if speech is None:
        return None
    return multiple_choice("gender", f"What is the gender of {who}?", speech["gender"].capitalize(),
                           ["Male", "Female", "A young child", "A robot voice"], rng)


def q_rate(meta, rng):
    speech, who = _pick_speech(meta, rng)
    if speech is None:
        return None
    return multiple_choice("rate", f"How fast does {who} talk?", RATE_OPTIONS[speech["rate_class"]],
                           [*RATE_OPTIONS.values(), "Speeding up and slowing down"], rng)


def q_voice_pitch(meta, rng):
    speech, who = _pick_speech(meta, rng)
    if speech is None:
        return None
    question = f"How high is the pitch of {who}'s voice?"
    if speech["gender"] in ("male", "female"):
        question = f"For a {speech['gender']} voice, how high is the pitch of {who}'s voice?"
    return multiple_choice("voice_pitch", question, PITCH_OPTIONS[speech["pitch_class"]],
                           [*PITCH_OPTIONS.values(), "It keeps changing"], rng)


def q_accent(meta, rng):
    speech, who = _pick_speech(meta, rng)
    if speech is None:
        return None
    names = list(ACCENTS.values())
    return multiple_choice("accent", f"Which English accent does {who} have?", speech["accent_name"], names, rng)


def q_transcript(meta, rng):
    speech, who = _pick_speech(meta, rng)
    if speech is None:
        return None
    text = speech["text"]
    distractors = sentence_distractors(text, rng, 3)
    return multiple_choice("transcript", f"What does {who} say?", _quote(text), [_quote(d) for d in distractors],
                           rng)


def q_speech_present(meta, rng):
    return multiple_choice("speech_present", "Is there any speech in the clip?",
                           PRESENCE_OPTIONS[presence(meta)], list(PRESENCE_OPTIONS.values()), rng)


def q_speaker_count(meta, rng):
    count = len({e["voice"] for e in speech_events(meta)})
    options = ["No one speaks", "One person", "Two people", "Three people"]
    return multiple_choice("speaker_count", "How many different people speak in the clip?", options[count],
                           options, rng)


def q_tone_pitch(meta, rng):
    tones = [e for e in foreground_events(meta) if e["kind"] in ("tone", "beeps")]
    if not tones:
        return None
    event = tones[int(rng.integers(len(tones)))]
    noun = "the tone" if event["kind"] == "tone" else "the beeps"
    return multiple_choice("tone_pitch", f"How high is the pitch of {noun}?", PITCH_OPTIONS[event["pitch_class"]],
                           [*PITCH_OPTIONS.values(), "It sweeps up and down"], rng)


def q_tone_freq(meta, rng):
    tones = [e for e in foreground_events(meta) if e["kind"] == "tone"]
    if not tones:
        return None
    freq = tones[0]["freq_hz"]
    return multiple_choice("tone_freq", "What is the approximate frequency of the tone?", f"About {freq} Hz",
                           [f"About {f} Hz" for f in frequency_distractors(freq, rng)], rng)


def frequency_distractors(freq: int, rng: np.random.Generator, count: int = 3) -> list[int]:
    """Frequencies drawn like real tones (any pitch class, 10 Hz steps) but at least a factor 1.4 from the answer
    and from each other, so the right option is neither ambiguous nor given away by looking different."""
    picked: list[int] = []
    while len(picked) < count:
        low, high = list(TONE_PITCH_CLASSES.values())[int(rng.integers(len(TONE_PITCH_CLASSES)))]
        candidate = int(round(rng.uniform(low, high) / 10) * 10)
        if all(max(candidate, f) / min(candidate, f) >= 1.4 for f in [freq, *picked]):
            picked.append(candidate)
    return picked


def q_beep_count(meta, rng):
    beeps = [e for e in foreground_events(meta) if e["kind"] == "beeps"]
    return _count_question("beep_count", "How many beeps are heard?", beeps[0]["count"], rng) if beeps else None


def q_click_count(meta, rng):
    clicks = [e for e in foreground_events(meta) if e["kind"] == "clicks"]
    return _count_question("click_count", "How many clicks are heard?", clicks[0]["count"], rng) if clicks else None


def q_melody_notes(meta, rng):
    melody = [e for e in foreground_events(meta) if e["kind"] == "melody"]
    if not melody:
        return None
    return _count_question("melody_notes", "How many notes does the melody have?", len(melody[0]["notes"]), rng)


def _count_question(kind: str, question: str, count: int, rng: np.random.Generator) -> dict[str, str]:
    nearby = [n for n in range(max(1, count - 3), count + 4) if n != count]
    return multiple_choice(kind, question, number_word(count).capitalize(),
                           [number_word(n).capitalize() for n in nearby], rng)


def q_noise_color(meta, rng):
    bed = background_noise(meta)
    bursts = [e for e in foreground_events(meta) if e["kind"] == "noise"]
    event = bed or (bursts[0] if bursts else None)
    if event is None:
        return None
    question = "What kind of noise is heard behind the speech?" if bed else "What kind of noise is heard?"
    return multiple_choice("noise_color", question, NOISE_OPTIONS[event["color"]],
                           [*NOISE_OPTIONS.values(), "Rain falling on a roof"], rng)


def q_chirp_direction(meta, rng):
    chirps = [e for e in foreground_events(meta) if e["kind"] == "chirp"]
    if not chirps:
        return None
    options = {"rising": "It rises", "falling": "It falls"}
    return multiple_choice("chirp_direction", "Which way does the pitch of the sweep move?",
                           options[chirps[0]["direction"]],
                           [*options.values(), "It stays the same", "It rises and then falls"], rng)


def q_chord(meta, rng):
    chords = [e for e in foreground_events(meta) if e["kind"] == "chord"]
    if not chords:
        return None
    if rng.random() < 0.5:
        return multiple_choice("chord_quality", "Is the chord major or minor?",
                               chords[0]["quality"].capitalize(), ["Major", "Minor", "Diminished", "Augmented"], rng)
    names = [f"{root} {quality}" for root in CHORD_ROOTS for quality in CHORD_QUALITIES]
    return multiple_choice("chord_name", "Which chord is played?", chords[0]["name"], names, rng)


def q_order(meta, rng):
    events = foreground_events(meta)
    labels = [KIND_LABELS[e["kind"]] for e in events]
    if len(set(labels)) < 2:
        return None
    first = rng.random() < 0.5
    correct = labels[0] if first else labels[-1]
    if labels.count(correct) > 1:
        return None
    others = [label for label in labels if label != correct]
    absent = [label for label in KIND_LABELS.values() if label not in labels]
    absent = [absent[int(i)] for i in rng.permutation(len(absent))]
    question = "Which of these is heard first?" if first else "Which of these is heard last?"
    return multiple_choice("order", question, correct, (others + absent)[:3], rng)


def q_duration(meta, rng):
    seconds = max(1, round(meta["duration_s"]))
    options = [f"About {s} seconds" if s != 1 else "About 1 second" for s in range(1, 16)]
    correct = options[seconds - 1]
    far = [o for s, o in enumerate(options, 1) if abs(s - seconds) >= 2]
    return multiple_choice("duration", "About how long is the clip?", correct, far, rng)


def sound_kind_questions(meta: dict[str, Any], rng: np.random.Generator) -> list[dict[str, str]]:
    """One "what is heard from X s to Y s?" question per foreground sound (not speech): a training aid.

    Why: a caption names each sound's kind, but that word is one of ~60 answer tokens, and Eureka-mini learnt to
    name sounds poorly — in 35 % of *training* captions — although its adapter's outputs carry the kind (a linear
    probe reads it for 98 % of training and 89 % of held-out events). A question per event gives the kind a whole
    answer's weight, in the caption's own time-span wording. Not among ``QUESTION_BUILDERS``: the dataset's records
    and its held-out questions stay as generated; ``python -m model.train --sound-questions 1`` adds these.
    """
    questions = []
    for event in foreground_events(meta):
        if event["kind"] == "speech":
            continue
        span = f"from {event['start_s']:.1f} s to {event['end_s']:.1f} s"
        distractors = [label for kind, label in KIND_LABELS.items() if kind != event["kind"]]
        questions.append(multiple_choice("sound_kind", f"What is heard {span}?", KIND_LABELS[event["kind"]],
                                         distractors, rng))
    return questions


def sound_kind_records(meta: dict[str, Any], audio_path: str, rng: np.random.Generator) -> list[dict[str, Any]]:
    """:func:`sound_kind_questions` as chat records, in ``to_chat_records``' format."""
    return [qa_record(meta, audio_path, question) for question in sound_kind_questions(meta, rng)]


def sound_description_records(meta: dict[str, Any], audio_path: str) -> list[dict[str, Any]]:
    """One "Describe the sound from X s to Y s." record per foreground sound (not speech), answered with the phrase
    the clip's caption uses for it (:func:`describe_event`): a training aid.

    Why: the caption's sound phrase — kind, count, pitch, colour, chord, frequency — is ~10 of its ~60 answer tokens,
    and Eureka-mini named the kind of a sound in 12 % of held-out captions and missed most of those facts on
    *training* clips too (underfitting, not over-fitting). As its own answer each phrase carries a whole answer's
    weight (``--loss-average example``). Open, not multiple-choice: a chosen option teaches the letter, this teaches
    the words the caption needs. ``python -m model.train --sound-descriptions 1`` adds these.
    """
    records = []
    for event in foreground_events(meta):
        if event["kind"] == "speech":
            continue
        phrase = describe_event(event)
        question = f"Describe the sound from {event['start_s']:.1f} s to {event['end_s']:.1f} s."
        records.append({"task": "describe", "messages": [user_message(audio_path, question)],
                        "target": f"{phrase[0].upper()}{phrase[1:]}.", "clip_id": meta["id"]})
    return records


QUESTION_BUILDERS: dict[str, Callable[[dict, np.random.Generator], dict | None]] = {
    "gender": q_gender, "rate": q_rate, "voice_pitch": q_voice_pitch, "accent": q_accent,
    "transcript": q_transcript, "speech_present": q_speech_present, "speaker_count": q_speaker_count,
    "tone_pitch": q_tone_pitch, "tone_freq": q_tone_freq, "beep_count": q_beep_count, "click_count": q_click_count,
    "melody_notes": q_melody_notes, "noise_color": q_noise_color, "chirp_direction": q_chirp_direction,
    "chord": q_chord, "order": q_order, "duration": q_duration,
}


def make_questions(meta: dict[str, Any], rng: np.random.Generator, n: int = 5) -> list[dict[str, str]]:
    """Up to ``n`` questions of different kinds that apply to the clip, in a random order.

    Each is ``{question, answer_letter, answer_text, kind}``; the answer target is ``f"{letter}. {text}"``.
    """
    questions = []
    names = list(QUESTION_BUILDERS)
    for i in rng.permutation(len(names)):
        if len(questions) >= n:
            break
        question = QUESTION_BUILDERS[names[int(i)]](meta, rng)
        if question is not None:
            questions.append(question)
    return questions


def answer_target(question: dict[str, str]) -> str:
    """The assistant's answer: "B. option text"."""
    return f"{question['answer_letter']}. {question['answer_text']}"


def presence(meta: dict[str, Any]) -> str:
    """What the clip holds: "speech", "sounds", "noise" (noise only) or "silent"."""
    kinds = {e["kind"] for e in meta["events"] if e["kind"] != "silence"}
    if "speech" in kinds:
        return "speech"
    if not kinds:
        return "silent"
    return "noise" if kinds == {"noise"} else "sounds"


def sentence_distractors(text: str, rng: np.random.Generator, count: int) -> list[str]:
    """Near-miss sentences: the same template with one or two content words swapped within their category."""
    words = text.split()
    slots = [i for i, w in enumerate(words) if word_category(w)]
    found: list[str] = []
    for _ in range(50):
        if len(found) == count:
            break
        changed = list(words)
        for i in rng.permutation(slots)[: int(rng.integers(1, 3))]:
            pool = [w for w in WORDS[word_category(words[i])] if w not in words]
            if pool:
                changed[i] = pool[int(rng.integers(len(pool)))]
        candidate = " ".join(changed)
        if candidate != text and candidate not in found:
            found.append(candidate)
    while len(found) < count:  # only for sentences with no swappable word
        candidate = sample_sentence(rng, "train")
        if candidate != text and candidate not in found:
            found.append(candidate)
    return found


def _quote(text: str) -> str:
    return f'"{text}"'


# ---------------------------------------------------------------------------------------------------------------
# Dense captions
# ---------------------------------------------------------------------------------------------------------------
def describe_event(event: dict[str, Any]) -> str:
    """A noun phrase (or clause, for speech) stating every fact of one event."""
    kind = event["kind"]
    if kind == "speech":
        gender = f"{event['gender']} speaker" if event["gender"] in ("male", "female") else "speaker"
        article = "an" if event["accent_name"][0] in "AEIOU" else "a"
        return (f"a {gender} with {article} {event['accent_name']} accent says, at a {event['rate_class']} rate "
                f"and in a {event['pitch_class']}-pitched voice: \"{event['text']}\"")
    if kind == "tone":
        return f"a steady {event['pitch_class']}-pitched tone at {event['freq_hz']} Hz"
    if kind == "beeps":
        noun = "beep" if event["count"] == 1 else "beeps"
        return f"{number_word(event['count'])} {event['pitch_class']}-pitched {noun} at {event['freq_hz']} Hz"
    if kind == "chirp":
        return f"a {event['direction']} chirp sweeping from {event['start_hz']} Hz to {event['end_hz']} Hz"
    if kind == "noise":
        return f"a burst of {event['color']} noise"
    if kind == "clicks":
        return f"{number_word(event['count'])} sharp clicks"
    if kind == "melody":
        return f"a short melody of {number_word(len(event['notes']))} notes ({', '.join(event['notes'])})"
    if kind == "chord":
        article = "an" if event["name"][0] in "AEF" else "a"  # "an E major", "an F minor"
        return f"{article} {event['name']} chord ({', '.join(event['notes'])})"
    if kind == "silence":
        return "silence"
    raise ValueError(f"unknown event kind {kind!r}")


def caption(meta: dict[str, Any]) -> str:
    """Deterministic dense caption: duration, each event in order with its time range, background, summary."""
    duration = f"A {meta['duration_s']:.1f}-second clip"
    events = [e for e in meta["events"] if not e.get("background")
              and (e["kind"] != "silence" or e["end_s"] - e["start_s"] >= 1.0)]
    if not foreground_events(meta) and background_noise(meta) is None:
        return f"{duration} of complete silence. There is no speech and no other sound."
    sentences = [f"{duration}."]
    for i, event in enumerate(events):
        span = f"from {event['start_s']:.1f} s to {event['end_s']:.1f} s"
        phrase = "there is a pause of silence" if event["kind"] == "silence" else describe_event(event)
        sentences.append(f"{'Then, ' + span if i else span[0].upper() + span[1:]}, {phrase}.")
    bed = background_noise(meta)
    if bed is not None:
        sentences.append(f"{bed['color'].capitalize()} noise runs through the whole clip.")
    speakers = len({e["voice"] for e in speech_events(meta)})
    if speakers == 0:
        sentences.append("There is no speech.")
    elif speakers > 1:
        sentences.append(f"{number_word(speakers).capitalize()} speakers take turns.")
    return " ".join(sentences)


def caption_facts(meta: dict[str, Any]) -> list[str]:
    """Lower-case facts an evaluator can look for in a generated caption (match against ``caption.lower()``)."""
    return [fact for _, fact in labelled_caption_facts(meta)]


def labelled_caption_facts(meta: dict[str, Any]) -> list[tuple[str, str]]:
    """``(kind, fact)`` pairs behind :func:`caption_facts`, each fact once (under its first kind): the evaluation
    reports recall per kind of fact."""
    facts = [("duration", f"{meta['duration_s']:.1f}-second")]
    for event in foreground_events(meta):
        facts.extend(labelled_event_facts(event))
    bed = background_noise(meta)
    if bed is not None:
        facts.append(("noise colour", f"{bed['color']} noise"))
    speakers = len({e["voice"] for e in speech_events(meta)})
    if speakers == 0:
        facts.append(("no speech", "no speech"))
    if speakers > 1:
        facts.append(("speaker count", f"{number_word(speakers)} speakers"))
    if not foreground_events(meta) and bed is None:
        facts.append(("silence", "silence"))
    first_kind: dict[str, str] = {}
    for kind, fact in facts:
        first_kind.setdefault(fact, kind)
    return [(kind, fact) for fact, kind in first_kind.items()]


def labelled_event_facts(event: dict[str, Any]) -> list[tuple[str, str]]:
    """``(kind, fact)`` pairs for one sounding event."""
    kind = event["kind"]
    if kind == "speech":
        gender = [("gender", event["gender"])] if event["gender"] in ("male", "female") else []
        return gender + [("accent", event["accent_name"].lower()), ("speaking rate", f"{event['rate_class']} rate"),
                         ("pitch class", f"{event['pitch_class']}-pitched"), ("transcript", event["text"])]
    if kind == "tone":
        return [("sound kind", "tone"), ("pitch class", f"{event['pitch_class']}-pitched"),
                ("frequency", f"{event['freq_hz']} hz")]
    if kind == "beeps":
        return [("sound kind", "beep" if event["count"] == 1 else "beeps"), ("count", number_word(event["count"])),
                ("pitch class", f"{event['pitch_class']}-pitched"), ("frequency", f"{event['freq_hz']} hz")]
    if kind == "chirp":
        return [("sound kind", "chirp"), ("chirp direction", event["direction"])]
    if kind == "noise":
        return [("noise colour", f"{event['color']} noise")]
    if kind == "clicks":
        return [("sound kind", "clicks"), ("count", number_word(event["count"]))]
    if kind == "melody":
        return [("sound kind", "melody"), ("count", f"{number_word(len(event['notes']))} notes")]
    if kind == "chord":
        return [("sound kind", "chord"), ("chord name", event["name"].lower())]
    return []


# ---------------------------------------------------------------------------------------------------------------
# Chat records
# ---------------------------------------------------------------------------------------------------------------
def user_message(audio_path: str, text: str | None = None) -> dict[str, Any]:
    """The official user turn: the audio, then (for QA and captions) the text."""
    content: list[dict[str, Any]] = [{"type": "audio_url", "audio_url": {"url": audio_path}}]
    if text is not None:
        content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


def asr_messages(audio_path: str) -> list[dict[str, Any]]:
    """ASR conversation: the official system prompt, then the audio alone."""
    return [{"role": "system", "content": [{"type": "text", "text": ASR_SYSTEM_PROMPT}]}, user_message(audio_path)]


def qa_record(meta: dict[str, Any], audio_path: str, question: dict[str, str]) -> dict[str, Any]:
    """One multiple-choice question about the clip as a chat record."""
    return {"task": "qa", "messages": [user_message(audio_path, question["question"])],
            "target": answer_target(question), "clip_id": meta["id"], "question_kind": question["kind"]}


def to_chat_records(meta: dict[str, Any], audio_path: str, rng: np.random.Generator,
                    n_questions: int = 2) -> list[dict[str, Any]]:
    """All training records of one clip: ASR (when someone speaks), ``n_questions`` QA items and a caption.

    Each record is ``{"task", "messages", "target", "clip_id"}`` (QA adds ``"question_kind"``); ``messages`` stops
    before the assistant turn, whose text is ``target``.
    """
    records = []
    text = transcript(meta)
    if text:
        records.append({"task": "asr", "messages": asr_messages(audio_path), "target": text,
                        "clip_id": meta["id"]})
    records += [qa_record(meta, audio_path, question) for question in make_questions(meta, rng, n_questions)]
    records.append({"task": "caption", "messages": [user_message(audio_path, CAPTION_PROMPT)],
                    "target": caption(meta), "clip_id": meta["id"]})
    return records
