"""Deterministic synthetic audio with exact metadata, the training data of Eureka-mini.

Every clip is a small timeline of events (espeak-ng speech and numpy-made sounds) whose metadata is the ground truth
for ASR, multiple-choice QA, dense captions and the data-curation pipeline. Three choices shape the module:

* **Learnable from scratch in minutes.** Sentences come from a template grammar over a closed vocabulary of a few
  hundred words, so a tiny model sees every word many times; held-out sentences are unseen combinations of seen words.
  Labels that become questions (speaking rate, pitch, tone height) are drawn from separated buckets, so no clip sits on
  a class boundary.
* **Held-out generalisation.** A sentence's split is fixed by a hash of its text and the voice variants are split
  into train and held-out sets, so no validation/test sentence or voice variant is ever heard in training.
* **Deterministic and parallel.** Clip ``index`` of ``split`` uses its own ``numpy.random.Generator`` seeded from
  ``(seed, split, index)``, so a clip can be regenerated alone, in any process, byte for byte.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import zlib
from collections.abc import Callable, Iterable
from functools import cache
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16000
ESPEAK_RATE = 22050
SPLITS = ("train", "val", "test")
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
EVENT_KINDS = ("speech", "tone", "beeps", "chirp", "noise", "clicks", "melody", "chord", "silence")
SILENCE_DB = -120.0  # level_db of digital silence (the true value, -inf, is not valid JSON)
PEAK_LIMIT = 0.95
MAX_SPEECH_CLIP_S = 8.0
MAX_SCENE_S = 12.0
MIN_CLIP_S = 1.0

# ---------------------------------------------------------------------------------------------------------------
# Sentence grammar: slot categories are disjoint sets of single words, so a word identifies its slot (QA distractors
# swap a word for another of the same category).
# ---------------------------------------------------------------------------------------------------------------
WORDS: dict[str, tuple[str, ...]] = {
    "name": ("anna", "peter", "maria", "james", "sarah", "david", "linda", "thomas", "emma", "daniel",
             "laura", "robert", "julia", "michael", "nina", "oscar"),
    "city": ("london", "paris", "berlin", "tokyo", "madrid", "boston", "chicago", "dublin", "sydney",
             "toronto", "rome", "vienna"),
    "color": ("red", "blue", "green", "yellow", "black", "white", "orange", "purple", "pink", "grey"),
    "number": ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"),
    "animals": ("cats", "dogs", "birds", "horses", "rabbits", "sheep", "cows", "ducks", "foxes", "mice",
                "bears", "frogs", "goats", "lions"),
    "animal": ("cat", "dog", "bird", "horse", "rabbit", "cow", "duck", "fox", "mouse", "bear", "frog", "goat"),
    "object": ("box", "cup", "book", "chair", "lamp", "key", "bottle", "letter", "ticket", "basket", "phone",
               "bag", "hat", "coat", "clock", "pen", "plate", "bowl", "candle", "map"),
    "food": ("bread", "cheese", "apples", "rice", "soup", "coffee", "tea", "milk", "cake", "eggs", "honey",
             "pasta"),
    "place": ("kitchen", "garden", "station", "market", "library", "office", "school", "park", "hotel",
              "bridge", "river", "beach", "museum", "hospital", "airport", "bakery"),
    "room": ("bedroom", "hallway", "bathroom", "garage", "attic", "cellar", "basement", "classroom"),
    "adj": ("old", "new", "small", "big", "quiet", "busy", "dusty", "heavy", "warm", "cold", "bright",
            "dark", "empty", "tall", "strange", "lovely", "broken", "famous", "tiny", "shiny"),
    "weather": ("sunny", "rainy", "windy", "cloudy", "foggy", "snowy", "stormy", "freezing"),
    "past": ("found", "lost", "painted", "bought", "sold", "cleaned", "moved", "carried", "opened", "closed",
             "dropped", "fixed", "washed", "borrowed"),
    "verb": ("bring", "take", "open", "close", "clean", "move", "check", "carry", "find", "paint", "wash",
             "fix", "hold", "hide"),
    "relative": ("brother", "sister", "mother", "father", "uncle", "aunt", "cousin", "friend"),
    "device": ("light", "radio", "heater", "fan", "oven", "computer", "television", "kettle"),
    "prep": ("near", "behind", "under", "beside", "inside"),
    "switch": ("on", "off"),
}
# Multi-word time expressions form one slot; their words are function words, never swapped for distractors.
TIMES = ("today", "tomorrow", "tonight", "yesterday", "this morning", "this evening", "last night", "next week",
         "on monday", "on friday", "on sunday", "at noon")
WORDS["time"] = TIMES

# Templates: literal words and {slot} fields; "{name2}" is a second name, different from "{name}" (likewise for any
# category). 4 to 10 words each.
TEMPLATES: tuple[str, ...] = (
    "{name} {past} the {color} {object}",
    "{name} {past} the {adj} {object} {time}",
    "please {verb} the {color} {object} to the {place}",
    "we saw {number} {animals} near the {place}",
    "we saw {number} {adj} {animals} near the {place} {time}",
    "the weather in {city} is {weather} {time}",
    "my {relative} has {number} {color} {animals}",
    "turn {switch} the {device} in the {room}",
    "{name} and {name2} went to the {place} {time}",
    "i think the {place} is very {adj}",
    "can you {verb} my {object} {prep} the {room}",
    "{name} bought some {food} at the {place}",
    "the {animal} is {prep} the {color} {object}",
    "{name} will visit {city} {time}",
    "is it {weather} in {city} {time}",
    "my {relative} {past} the {object} in {city}",
    "the train to {city} leaves at {number}",
    "{name} has a {adj} {animal} called {name2}",
    "please {verb} the {food} {prep} the {object}",
    "the {device} in the {room} is {adj}",
    "{verb} the {adj} {object} {time}",
    "we need a {color} {object} for the {food}",
    "{name} {past} the {animal} near the {place}",
    "it was {weather} and {weather2} in {city}",
    "the {animals} in the {room} are {adj}",
)
SPLIT_BUCKETS = {"train": range(0, 80), "val": range(80, 90), "test": range(90, 100)}

# ---------------------------------------------------------------------------------------------------------------
# Voices: the 8 English accents of espeak-ng (non-MBROLA) and the voice variants used, with their gender.
# ---------------------------------------------------------------------------------------------------------------
ACCENTS: dict[str, str] = {
    "en-gb": "British",
    "en-us": "American",
    "en-gb-scotland": "Scottish",
    "en-gb-x-rp": "Received Pronunciation",
    "en-gb-x-gbclan": "Lancashire",
    "en-gb-x-gbcwmd": "West Midlands",
    "en-029": "Caribbean",
    "en-us-nyc": "New York",
}
# Gender of every espeak-ng 1.51 variant, from its "gender" line, else by ear and measured F0: "other" marks
# whispered, robotic, child-like or ambiguous voices. Only VOICE_POOL is used for generation.
VARIANT_GENDER: dict[str, str] = {
    **{f"m{i}": "male" for i in range(1, 9)},
    **{f"f{i}": "female" for i in range(1, 6)},
    **dict.fromkeys(("Alicia", "Andrea", "Annie", "anika", "aunty", "belinda", "grandma", "linda", "shelby",
                     "steph", "steph2", "steph3", "whisperf"), "female"),
    **dict.fromkeys(("Andy", "AnxiousAndy", "Demonic", "Denis", "Diogo", "Henrique", "Hugo", "Lee", "Marco",
                     "Storm", "UniRobot", "antonio", "croak", "michel", "miguel", "sandro", "travis", "victor",
                     "whisper", "adam", "benjamin", "caleb", "david", "edward", "edward2", "john", "max",
                     "norbert", "pedro", "paul", "robert", "gustave", "pablo", "Gene", "Gene2", "Mario",
                     "Michael", "Mike", "boris", "ed", "grandpa", "quincy", "klatt"), "male"),
    **dict.fromkeys(("Alex", "Jacky", "Mr serious", "Nguyen", "RicishayMax", "RicishayMax2", "RicishayMax3",
                     "Tweaky", "announcer", "anikaRobot", "fast", "iven", "iven2", "iven3", "iven4", "kaukovalta",
                     "klatt2", "klatt3", "klatt4", "klatt5", "klatt6", "marcelo", "rob", "robosoft",
                     "robosoft2", "robosoft3", "robosoft4", "robosoft5", "robosoft6", "robosoft7", "robosoft8",
                     "zac"), "other"),
}
TRAIN_VOICES = ("m1", "m2", "m4", "m5", "m6", "m8", "adam", "benjamin", "john", "max", "norbert", "sandro",
                "travis", "victor", "Denis", "antonio",
                "f1", "f2", "f3", "f5", "Alicia", "Andrea", "Annie", "anika", "belinda", "grandma", "shelby",
                "steph")
HELDOUT_VOICES = ("m3", "m7", "caleb", "michel", "edward", "f4", "linda", "steph2", "steph3")
VOICE_POOL = TRAIN_VOICES + HELDOUT_VOICES

# Bucketed prosody: separated ranges, so every clip has an unambiguous class.
RATE_CLASSES = {"slow": (80, 120), "normal": (150, 190), "fast": (230, 300)}  # espeak -s, words per minute
VOICE_PITCH_CLASSES = {"low": (0, 25), "medium": (40, 60), "high": (75, 99)}  # espeak -p, 0..99
TONE_PITCH_CLASSES = {"low": (120, 300), "medium": (450, 1000), "high": (1500, 3500)}  # Hz
AMPLITUDE_RANGE = (60, 140)  # espeak -a, 100 is the default

NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
MELODY_NOTES = ("C4", "D4", "E4", "F4", "G4", "A4", "B4", "C5", "D5", "E5", "F5", "G5", "A5", "B5", "C6")
CHORD_ROOTS = ("C", "D", "E", "F", "G", "A")
CHORD_QUALITIES = {"major": (0, 4, 7), "minor": (0, 3, 7)}
NOISE_COLORS = ("white", "pink", "brown")
SOUND_KINDS = ("tone", "beeps", "chirp", "noise", "clicks", "melody", "chord")

# Scene kinds and their weights: speech dominates because ASR is the main task.
SCENES: dict[str, float] = {
    "speech": 0.36,
    "speech_noise": 0.14,
    "speech_sound": 0.14,
    "two_speakers": 0.10,
    "sound": 0.13,
    "sounds": 0.10,
    "silence": 0.03,
}


# ---------------------------------------------------------------------------------------------------------------
# Sentences
# ---------------------------------------------------------------------------------------------------------------
def sentence_split(text: str) -> str:
    """The split a sentence belongs to, fixed by a stable hash so held-out sentences never reach training."""
    bucket = zlib.crc32(text.encode("utf-8")) % 100
    return next(split for split, buckets in SPLIT_BUCKETS.items() if bucket in buckets)


def fill_template(template: str, rng: np.random.Generator) -> str:
    """One sentence from a template, every slot drawn uniformly so each word appears often in training."""
    values: dict[str, str] = {}
    for slot in _template_slots(template):
        category = slot.removesuffix("2")
        choices = [w for w in WORDS[category] if slot == category or w != values[category]]
        values[slot] = choices[int(rng.integers(len(choices)))]
    return template.format(**values)


def sample_sentence(rng: np.random.Generator, split: str, max_words: int = 10) -> str:
    """A grammar sentence of ``split`` (rejection on the hash bucket; about 10 draws for val/test)."""
    while True:
        template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
        text = fill_template(template, rng)
        if len(text.split()) <= max_words and sentence_split(text) == split:
            return text


@cache
def _template_slots(template: str) -> tuple[str, ...]:
    return tuple(part.split("}")[0] for part in template.split("{")[1:])


def vocabulary() -> list[str]:
    """Every word the grammar can produce, sorted."""
    words = {w for t in TEMPLATES for w in t.split() if not w.startswith("{")}
    for values in WORDS.values():
        for value in values:
            words.update(value.split())
    return sorted(words)


def word_category(word: str) -> str | None:
    """The slot category a content word belongs to (None for function words and time expressions)."""
    return _WORD_TO_CATEGORY.get(word)


def _fixed_words() -> set[str]:
    """Words of template literals and time expressions: never swapped, even when also a slot value ("on")."""
    words = {w for t in TEMPLATES for w in t.split() if not w.startswith("{")}
    return words | {w for phrase in TIMES for w in phrase.split()}


_WORD_TO_CATEGORY = {w: c for c, values in WORDS.items() if c != "time" for w in values if w not in _fixed_words()}


def grammar_size() -> int:
    """Number of distinct sentences the grammar can produce (before the split hash)."""
    total = 0
    for template in TEMPLATES:
        count = 1
        for slot in _template_slots(template):
            category = slot.removesuffix("2")
            count *= len(WORDS[category]) - (slot != category)
        total += count
    return total


# ---------------------------------------------------------------------------------------------------------------
# Speech via espeak-ng
# ---------------------------------------------------------------------------------------------------------------
def espeak_available() -> bool:
    """Whether the espeak-ng binary is on PATH (speech clips need it)."""
    return shutil.which("espeak-ng") is not None


def espeak(text: str, voice: str, rate: int, pitch: int, amplitude: int) -> np.ndarray:
    """Speak ``text`` with espeak-ng and return 16 kHz mono float32, trimmed to the voiced span.

    Trimming makes the event's start/end the true speech boundaries, and leaves exact digital silence around it.
    """
    if not espeak_available():
        raise RuntimeError("espeak-ng is not on PATH; install it (Debian: apt-get install espeak-ng)")
    cmd = ["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "-a", str(amplitude), "--stdout", text]
    wav = subprocess.run(cmd, capture_output=True, check=True).stdout
    audio, rate_in = sf.read(io.BytesIO(wav), dtype="float32")
    if audio.ndim > 1:
        audio = audio.mean(axis=1)
    audio = trim_silence(soxr.resample(audio, rate_in, SAMPLE_RATE).astype(np.float32))
    if len(audio) == 0:
        raise RuntimeError(f"espeak-ng produced no audible speech for {text!r} with voice {voice}")
    return audio


def trim_silence(audio: np.ndarray, threshold: float = 1e-3) -> np.ndarray:
    """Cut leading and trailing samples quieter than ``threshold`` (about -60 dBFS)."""
    loud = np.flatnonzero(np.abs(audio) > threshold)
    if loud.size == 0:
        return audio[:0]
    return audio[loud[0] : loud[-1] + 1]


def pick_speaker(rng: np.random.Generator, split: str, exclude: str | None = None) -> dict[str, Any]:
    """Voice, accent and bucketed prosody for one speaker; held-out splits only use held-out variants."""
    pool = [v for v in (TRAIN_VOICES if split == "train" else HELDOUT_VOICES) if v != exclude]
    variant = pool[int(rng.integers(len(pool)))]
    accent = list(ACCENTS)[int(rng.integers(len(ACCENTS)))]
    rate_class = _choice(rng, list(RATE_CLASSES))
    pitch_class = _choice(rng, list(VOICE_PITCH_CLASSES))
    return {
        "voice": f"{accent}+{variant}",
        "variant": variant,
        "accent": accent,
        "accent_name": ACCENTS[accent],
        "gender": VARIANT_GENDER[variant],
        "rate_wpm": _uniform_int(rng, RATE_CLASSES[rate_class]),
        "rate_class": rate_class,
        "pitch": _uniform_int(rng, VOICE_PITCH_CLASSES[pitch_class]),
        "pitch_class": pitch_class,
        "amplitude": _uniform_int(rng, AMPLITUDE_RANGE),
    }


def make_speech(rng: np.random.Generator, split: str, max_s: float, exclude_variant: str | None = None):
    """A speech event no longer than ``max_s``: redraw the sentence (and finally speed up) until it fits."""
    speaker = pick_speaker(rng, split, exclude_variant)
    for attempt in range(8):
        text = sample_sentence(rng, split, max_words=10 if attempt < 4 else 6)
        if attempt == 7:
            speaker["rate_class"] = "fast"
            speaker["rate_wpm"] = RATE_CLASSES["fast"][1]
        audio = espeak(text, speaker["voice"], speaker["rate_wpm"], speaker["pitch"], speaker["amplitude"])
        if len(audio) / SAMPLE_RATE <= max_s or attempt == 7:
            break
    return audio, {"kind": "speech", "text": text, **speaker}


# ---------------------------------------------------------------------------------------------------------------
# Sounds (numpy). Each maker returns unit-level audio and the kind-specific metadata fields.
# ---------------------------------------------------------------------------------------------------------------
def sine(freq_hz: float, n: int, phase: float = 0.0) -> np.ndarray:
    """A sine of ``n`` samples."""
    t = np.arange(n, dtype=np.float64) / SAMPLE_RATE
    return np.sin(2 * np.pi * freq_hz * t + phase)


def fade(audio: np.ndarray, fade_s: float = 0.01) -> np.ndarray:
    """Raised-cosine fade in and out, so onsets do not click."""
    n = min(int(fade_s * SAMPLE_RATE), len(audio) // 2)
    if n == 0:
        return audio
    ramp = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, n))
    out = audio.copy()
    out[:n] *= ramp
    out[-n:] *= ramp[::-1]
    return out


def pitch_class_of(freq_hz: float) -> str:
    """Low / medium / high for a frequency in Hz (the tone buckets, extended to cover the gaps)."""
    if freq_hz < 400:
        return "low"
    return "medium" if freq_hz < 1250 else "high"


def make_tone(rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """A steady sine tone of a bucketed pitch."""
    pitch_class = _choice(rng, list(TONE_PITCH_CLASSES))
    freq = _round_to(_uniform(rng, TONE_PITCH_CLASSES[pitch_class]), 10)
    n = _samples(_uniform(rng, (0.4, 2.0)))
    return fade(sine(freq, n)), {"kind": "tone", "freq_hz": freq, "pitch_class": pitch_class}


def make_beeps(rng: np.random.Generator, count: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """1-6 identical beeps separated by clear gaps, so the count is audible (and detectable)."""
    count = int(rng.integers(1, 7)) if count is None else count
    pitch_class = _choice(rng, list(TONE_PITCH_CLASSES))
    freq = _round_to(_uniform(rng, TONE_PITCH_CLASSES[pitch_class]), 10)
    beep_n = _samples(_uniform(rng, (0.08, 0.2)))
    gap_n = _samples(_uniform(rng, (0.12, 0.3)))
    beep = fade(sine(freq, beep_n), 0.005)
    audio = np.zeros(count * beep_n + (count - 1) * gap_n)
    for i in range(count):
        start = i * (beep_n + gap_n)
        audio[start : start + beep_n] = beep
    meta = {"kind": "beeps", "count": count, "freq_hz": freq, "pitch_class": pitch_class,
            "beep_s": _seconds(beep_n), "gap_s": _seconds(gap_n)}
    return audio, meta


def make_chirp(rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """A logarithmic sweep up or down over at least two octaves."""
    direction = _choice(rng, ["rising", "falling"])
    low = _round_to(_uniform(rng, (150, 500)), 10)
    high = _round_to(low * _uniform(rng, (4.0, 8.0)), 10)
    start_hz, end_hz = (low, high) if direction == "rising" else (high, low)
    n = _samples(_uniform(rng, (0.5, 1.5)))
    t = np.arange(n) / SAMPLE_RATE
    duration = n / SAMPLE_RATE
    k = math.log(end_hz / start_hz) / duration
    phase = 2 * np.pi * start_hz * (np.exp(k * t) - 1) / k
    meta = {"kind": "chirp", "direction": direction, "start_hz": start_hz, "end_hz": end_hz}
    return fade(np.sin(phase)), meta


def colored_noise(rng: np.random.Generator, n: int, color: str) -> np.ndarray:
    """White, pink (1/f power) or brown (1/f^2 power) noise by spectral shaping, unit RMS."""
    white = rng.standard_normal(n)
    if color == "white":
        noise = white
    else:
        spectrum = np.fft.rfft(white)
        freqs = np.maximum(np.fft.rfftfreq(n, 1 / SAMPLE_RATE), 20.0)  # no rumble below 20 Hz
        exponent = {"pink": 0.5, "brown": 1.0}[color]
        noise = np.fft.irfft(spectrum / freqs**exponent, n)
    return noise / (np.sqrt(np.mean(noise**2)) + 1e-12)


def make_noise(rng: np.random.Generator, n: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """A burst of coloured noise (or a background bed when ``n`` is given)."""
    color = _choice(rng, list(NOISE_COLORS))
    n = _samples(_uniform(rng, (0.8, 3.0))) if n is None else n
    return fade(colored_noise(rng, n, color), 0.02), {"kind": "noise", "color": color}


def make_clicks(rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """2-8 sharp clicks (decaying noise bursts of 3 ms) at a steady rate."""
    count = int(rng.integers(2, 9))
    interval_n = _samples(_uniform(rng, (0.15, 0.4)))
    click_n = _samples(0.003)
    click = rng.standard_normal(click_n) * np.exp(-np.arange(click_n) / (click_n / 4))
    audio = np.zeros((count - 1) * interval_n + click_n)
    for i in range(count):
        audio[i * interval_n : i * interval_n + click_n] = click
    return audio, {"kind": "clicks", "count": count, "rate_hz": round(SAMPLE_RATE / interval_n, 2)}


def note_freq(note: str) -> float:
    """Equal-tempered frequency of a note name such as "A4" or "C#5"."""
    name, octave = note[:-1], int(note[-1])
    midi = 12 * (octave + 1) + NOTE_NAMES.index(name)
    return 440.0 * 2 ** ((midi - 69) / 12)


def harmonic_note(freq: float, n: int) -> np.ndarray:
    """A plucked-like note: three harmonics and an exponential decay."""
    tone = sine(freq, n) + 0.5 * sine(2 * freq, n) + 0.25 * sine(3 * freq, n)
    decay = np.exp(-np.arange(n) / (0.6 * n))
    return fade(tone * decay, 0.005)


def make_melody(rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """3-6 notes of the C major scale, each 0.2-0.4 s."""
    count = int(rng.integers(3, 7))
    notes = [MELODY_NOTES[int(i)] for i in rng.integers(len(MELODY_NOTES), size=count)]
    note_n = _samples(_uniform(rng, (0.2, 0.4)))
    audio = np.concatenate([harmonic_note(note_freq(note), note_n) for note in notes])
    return audio, {"kind": "melody", "notes": notes, "note_s": _seconds(note_n)}


def make_chord(rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """A major or minor triad in root position, octave 4."""
    root = _choice(rng, list(CHORD_ROOTS))
    quality = _choice(rng, list(CHORD_QUALITIES))
    base = NOTE_NAMES.index(root)
    notes = [f"{NOTE_NAMES[(base + step) % 12]}{4 + (base + step) // 12}" for step in CHORD_QUALITIES[quality]]
    n = _samples(_uniform(rng, (0.8, 2.0)))
    audio = sum(harmonic_note(note_freq(note), n) for note in notes)
    return audio, {"kind": "chord", "name": f"{root} {quality}", "quality": quality, "notes": notes}


SOUND_MAKERS: dict[str, Callable[[np.random.Generator], tuple[np.ndarray, dict[str, Any]]]] = {
    "tone": make_tone, "beeps": make_beeps, "chirp": make_chirp, "noise": make_noise,
    "clicks": make_clicks, "melody": make_melody, "chord": make_chord,
}


def make_sound(rng: np.random.Generator, kind: str) -> tuple[np.ndarray, dict[str, Any]]:
    """A foreground sound of ``kind`` at a random level between -32 and -14 dBFS RMS."""
    audio, meta = SOUND_MAKERS[kind](rng)
    return set_level(audio, _uniform(rng, (-32.0, -14.0))), meta


# ---------------------------------------------------------------------------------------------------------------
# Scenes: a list of foreground parts laid out in turn, plus an optional background noise bed.
# ---------------------------------------------------------------------------------------------------------------
def scene_parts(rng: np.random.Generator, scene: str, split: str) -> list[tuple[np.ndarray, dict[str, Any]]]:
    """The foreground events of a scene, in time order, before layout."""
    if scene in ("speech", "speech_noise"):
        return [make_speech(rng, split, MAX_SPEECH_CLIP_S - 0.6)]
    if scene == "speech_sound":
        sound = make_sound(rng, _choice(rng, list(SOUND_KINDS)))
        speech = make_speech(rng, split, MAX_SCENE_S - 2.5 - len(sound[0]) / SAMPLE_RATE)
        return [sound, speech] if rng.random() < 0.5 else [speech, sound]
    if scene == "two_speakers":
        first = make_speech(rng, split, 5.2)
        second = make_speech(rng, split, 5.2, exclude_variant=first[1]["variant"])
        return [first, second]
    if scene == "sound":
        return [make_sound(rng, _choice(rng, list(SOUND_KINDS)))]
    if scene == "sounds":
        count = int(rng.integers(2, 4))
        kinds = [SOUND_KINDS[int(i)] for i in rng.permutation(len(SOUND_KINDS))[:count]]
        return [make_sound(rng, kind) for kind in kinds]
    if scene == "silence":
        return []
    raise ValueError(f"unknown scene {scene!r}")


def layout(rng: np.random.Generator, parts: list, scene: str) -> tuple[list[int], int]:
    """Start samples for the parts and the clip length: short pads at the ends, a gap or a long pause between.

    A long pause (1-2 s, recorded as a silence event) is only taken when the clip stays within MAX_SCENE_S.
    """
    if not parts:
        return [], _samples(_uniform(rng, (1.0, 3.0)))
    lead, tail = _samples(_uniform(rng, (0.1, 0.25))), _samples(_uniform(rng, (0.1, 0.25)))
    spare = _samples(MAX_SCENE_S) - lead - tail - sum(len(a) for a, _ in parts) - _samples(0.6) * (len(parts) - 1)
    cursor, starts = lead, []
    for i, (audio, _) in enumerate(parts):
        if i:
            gap = _samples(_uniform(rng, (0.3, 0.6)))
            if rng.random() < 0.2 and scene != "two_speakers":
                pause = _samples(_uniform(rng, (1.0, 2.0)))
                if pause - _samples(0.6) <= spare:
                    gap, spare = pause, spare - (pause - _samples(0.6))
            cursor += gap
        starts.append(cursor)
        cursor += len(audio)
    return starts, max(cursor + tail, _samples(MIN_CLIP_S))


def render_scene(rng: np.random.Generator, scene: str, split: str) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Mix a scene into one signal and describe every event with exact sample-accurate times and levels."""
    parts = scene_parts(rng, scene, split)
    starts, total = layout(rng, parts, scene)
    mix = np.zeros(total)
    events: list[tuple[int, int, np.ndarray, dict[str, Any]]] = []
    for start, (audio, meta) in zip(starts, parts, strict=True):
        mix[start : start + len(audio)] += audio
        events.append((start, start + len(audio), audio, meta))
    if scene == "speech_noise":
        speech_db = rms_db(parts[0][0])
        noise, meta = make_noise(rng, total)
        snr_db = round(_uniform(rng, (8.0, 25.0)), 1)
        noise = set_level(noise, speech_db - snr_db)
        mix += noise
        events.append((0, total, noise, {**meta, "background": True, "snr_db": snr_db}))
    else:
        events.extend(silence_events(starts, parts, total))
    gain = min(1.0, PEAK_LIMIT / (np.max(np.abs(mix)) + 1e-12))
    return mix * gain, [event_record(s, e, a * gain, m) for s, e, a, m in sorted(events, key=_event_order)]


def silence_events(starts: list[int], parts: list, total: int) -> list[tuple[int, int, np.ndarray, dict]]:
    """Gaps between foreground events (or the whole clip when there are none) become explicit silence events."""
    if not parts:
        return [(0, total, np.zeros(total), {"kind": "silence"})]
    gaps = []
    for (start, (audio, _)), next_start in zip(zip(starts, parts, strict=True), starts[1:], strict=False):
        end = start + len(audio)
        gaps.append((end, next_start, np.zeros(next_start - end), {"kind": "silence"}))
    return gaps


def event_record(start: int, end: int, audio: np.ndarray, meta: dict[str, Any]) -> dict[str, Any]:
    """Metadata of one event: kind first, then times and level, then the kind-specific fields."""
    record = {"kind": meta["kind"], "start_s": _seconds(start), "end_s": _seconds(end),
              "level_db": round(rms_db(audio), 2)}
    record.update({k: v for k, v in meta.items() if k != "kind"})
    return record


def _event_order(event: tuple) -> tuple[int, int]:
    start, end, _, meta = event
    return (start, 1 if meta.get("background") else 0)


# ---------------------------------------------------------------------------------------------------------------
# Clips and datasets
# ---------------------------------------------------------------------------------------------------------------
def clip_rng(index: int, split: str, seed: int) -> np.random.Generator:
    """The clip's own generator: independent of every other clip, so generation parallelises."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, SPLIT_CODES[split], index])))


def clip_id(index: int, split: str) -> str:
    """A stable, sortable clip id."""
    return f"{split}-{index:06d}"


def generate_clip(index: int, split: str, seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """Clip ``index`` of ``split``: float32 16 kHz mono audio (on the 16-bit grid the WAV stores) and its metadata."""
    if split not in SPLIT_CODES:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    rng = clip_rng(index, split, seed)
    scene = _weighted_choice(rng, SCENES)
    audio, events = render_scene(rng, scene, split)
    audio = quantize(audio)
    meta = {
        "id": clip_id(index, split),
        "split": split,
        "seed": seed,
        "index": index,
        "scene": scene,
        "sample_rate": SAMPLE_RATE,
        "num_samples": len(audio),
        "duration_s": _seconds(len(audio)),
        "events": events,
    }
    return audio, meta


def quantize(audio: np.ndarray) -> np.ndarray:
    """Round to the 16-bit PCM grid, so the in-memory clip equals what ``soundfile`` reads back from the WAV."""
    return (to_pcm16(audio).astype(np.float32) / 32768.0).astype(np.float32)


def to_pcm16(audio: np.ndarray) -> np.ndarray:
    """Float in [-1, 1) to int16, by rounding (deterministic, no dither)."""
    return np.clip(np.round(np.asarray(audio, dtype=np.float64) * 32768.0), -32768, 32767).astype(np.int16)


def write_wav(path: str | os.PathLike, audio: np.ndarray) -> None:
    """Write 16-bit PCM mono at 16 kHz."""
    sf.write(str(path), to_pcm16(audio), SAMPLE_RATE, subtype="PCM_16", format="WAV")


def _generate_and_write(job: tuple[int, str, int, str]) -> dict[str, Any]:
    index, split, seed, out_dir = job
    audio, meta = generate_clip(index, split, seed)
    relative = f"audio/{split}/{meta['id']}.wav"
    write_wav(Path(out_dir) / relative, audio)
    return {**meta, "audio": relative}


def generate_dataset(out_dir: str | os.PathLike, n_train: int, n_val: int, n_test: int, seed: int = 0,
                     workers: int = 2) -> Path:
    """Write every clip as a WAV under ``out_dir/audio/<split>/`` and return ``out_dir/manifest.jsonl``.

    The manifest has one metadata dict per line (train, then val, then test, by index) with ``audio`` the WAV path
    relative to ``out_dir``; it is identical for any number of workers.
    """
    out = Path(out_dir)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    for split in SPLITS:
        (out / "audio" / split).mkdir(parents=True, exist_ok=True)
    jobs = [(i, split, seed, str(out)) for split in SPLITS for i in range(counts[split])]
    manifest = out / "manifest.jsonl"
    with open(manifest, "w", encoding="utf-8") as handle:
        for meta in _run_jobs(jobs, workers):
            handle.write(json.dumps(meta, ensure_ascii=False) + "\n")
    return manifest


def _run_jobs(jobs: list, workers: int) -> Iterable[dict[str, Any]]:
    if workers <= 1 or len(jobs) < 2:
        yield from map(_generate_and_write, jobs)
        return
    # fork starts in milliseconds (spawn re-imports everything, seconds on 2 busy cores); the workers use only numpy,
    # soxr and espeak-ng subprocesses, nothing that a parent's torch threads could leave locked.
    method = "fork" if "fork" in get_all_start_methods() else "spawn"
    with get_context(method).Pool(workers) as pool:
        yield from pool.imap(_generate_and_write, jobs, chunksize=8)


def read_manifest(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All metadata records of a manifest."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


# ---------------------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------------------
def rms_db(audio: np.ndarray) -> float:
    """RMS level in dBFS, floored at SILENCE_DB."""
    if len(audio) == 0:
        return SILENCE_DB
    rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))
    return max(SILENCE_DB, 20 * math.log10(rms)) if rms > 0 else SILENCE_DB


def set_level(audio: np.ndarray, level_db: float) -> np.ndarray:
    """Scale to an RMS level in dBFS."""
    rms = np.sqrt(np.mean(np.square(audio, dtype=np.float64)))
    return audio * (10 ** (level_db / 20) / rms) if rms > 0 else audio


def _samples(seconds: float) -> int:
    return int(round(seconds * SAMPLE_RATE))


def _seconds(samples: int) -> float:
    """Exact: n / 16000 has at most 7 decimals, so ``round(t * 16000)`` recovers the sample index."""
    return round(samples / SAMPLE_RATE, 7)


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _uniform_int(rng: np.random.Generator, bounds: tuple[int, int]) -> int:
    return int(rng.integers(bounds[0], bounds[1] + 1))


def _round_to(value: float, step: int) -> int:
    return int(round(value / step) * step)


def _choice(rng: np.random.Generator, options: list) -> Any:
    return options[int(rng.integers(len(options)))]


def _weighted_choice(rng: np.random.Generator, weights: dict[str, float]) -> str:
    names = list(weights)
    probs = np.array([weights[n] for n in names])
    return names[int(rng.choice(len(names), p=probs / probs.sum()))]
