"""Measured acoustic facts of a clip: duration, loudness, pitch, and speech / non-speech segments.

A small captioner can miss or invent things; these numbers cannot. They enrich every caption (so the question
generator and the judge see facts, not only the model's words) and, for audio with no metadata, they are the facts
the offline question generator asks about.

* Loudness is the RMS level in dBFS over the whole clip (and the peak).
* Segments are ``librosa.effects.split`` energy segments (``top_db`` below the clip's peak).
* Pitch is ``librosa.pyin``'s median f0 over voiced frames.
* Speech vs non-speech is a heuristic per segment: speech is partly voiced (between 25 % and 92 % of its frames)
  with a moving pitch (f0 spread of at least 0.7 semitones) in the range of human voices (70–400 Hz median).
  A steady tone is voiced throughout with a flat pitch; noise and clicks are almost never voiced. It is a heuristic,
  so questions built on it are marked as coming from measured facts (see docs/dataflux.md).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SAMPLE_RATE = 16000
PITCH_RATE = 8000
PITCH_FLOOR_HZ, PITCH_CEILING_HZ = 60.0, 1000.0
FRAME = 1024
HOP = 256
TOP_DB = 35.0
SILENCE_DBFS = -120.0
MIN_SEGMENT_S = 0.05


@dataclass
class Segment:
    start_s: float
    end_s: float
    voiced_ratio: float
    median_f0_hz: float | None
    label: str  # "speech" or "non-speech"


@dataclass
class AcousticFacts:
    """What was measured on one clip (JSON-serialisable through ``to_dict``)."""

    duration_s: float
    rms_dbfs: float
    peak_dbfs: float
    voiced_ratio: float
    median_f0_hz: float | None
    segments: list[Segment] = field(default_factory=list)

    @property
    def speech_segments(self) -> list[Segment]:
        return [s for s in self.segments if s.label == "speech"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AcousticFacts:
        segments = [Segment(**s) for s in data.get("segments", [])]
        return cls(**{**data, "segments": segments})


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    """Content hash of a file, read in blocks (the clip's identity in the store)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def load_mono(path: str | os.PathLike) -> np.ndarray:
    """Decode any soundfile-readable file to mono float32 at 16 kHz (no torch import: this runs in workers)."""
    import soundfile as sf
    import soxr

    audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    if rate != SAMPLE_RATE:
        audio = soxr.resample(audio, rate, SAMPLE_RATE).astype(np.float32)
    return np.ascontiguousarray(audio, dtype=np.float32)


def dbfs(value: float) -> float:
    return round(max(SILENCE_DBFS, 20 * math.log10(value)), 2) if value > 0 else SILENCE_DBFS


def measure(source: str | os.PathLike | np.ndarray) -> AcousticFacts:
    """All facts of one clip (a path or 16 kHz mono samples)."""
    audio = load_mono(source) if isinstance(source, str | os.PathLike | Path) else np.asarray(source, np.float32)
    duration = len(audio) / SAMPLE_RATE
    rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) if len(audio) else 0.0
    peak = float(np.max(np.abs(audio))) if len(audio) else 0.0
    if peak <= 1e-4 or len(audio) < FRAME:
        return AcousticFacts(round(duration, 3), dbfs(rms), dbfs(peak), 0.0, None, [])
    f0, voiced = pitch_track(audio)
    segments = [describe_segment(start, end, f0, voiced) for start, end in energy_segments(audio)]
    sounding = np.zeros(len(voiced), dtype=bool)
    for seg in segments:
        sounding[_frame(seg.start_s): _frame(seg.end_s)] = True
    voiced_in_sound = voiced & sounding
    ratio = float(voiced_in_sound.sum() / max(1, sounding.sum()))
    median = float(np.nanmedian(f0[voiced_in_sound])) if voiced_in_sound.any() else None
    return AcousticFacts(round(duration, 3), dbfs(rms), dbfs(peak), round(ratio, 3),
                         _round(median), segments)


def pitch_track(audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """pYIN f0 (NaN where unvoiced) and the voiced flag per frame (hop 16 ms, as the energy segments).

    Run at 8 kHz: voices and our tones sit far below 4 kHz, and it halves pYIN's cost.
    """
    import librosa
    import soxr

    low = soxr.resample(audio, SAMPLE_RATE, PITCH_RATE).astype(np.float32)
    scale = SAMPLE_RATE // PITCH_RATE
    f0, voiced, _ = librosa.pyin(low, fmin=PITCH_FLOOR_HZ, fmax=PITCH_CEILING_HZ, sr=PITCH_RATE,
                                 frame_length=FRAME // scale, hop_length=HOP // scale, center=True)
    return f0, voiced.astype(bool)


def energy_segments(audio: np.ndarray) -> list[tuple[float, float]]:
    """Non-silent stretches (start, end) in seconds, shorter than 50 ms dropped."""
    import librosa

    spans = librosa.effects.split(audio, top_db=TOP_DB, frame_length=FRAME, hop_length=HOP)
    seconds = [(round(s / SAMPLE_RATE, 3), round(e / SAMPLE_RATE, 3)) for s, e in spans]
    return [(s, e) for s, e in seconds if e - s >= MIN_SEGMENT_S]


def describe_segment(start: float, end: float, f0: np.ndarray, voiced: np.ndarray) -> Segment:
    """Voiced ratio, median f0 and the speech heuristic for one energy segment."""
    frames = slice(_frame(start), max(_frame(start) + 1, _frame(end)))
    seg_voiced = voiced[frames]
    seg_f0 = f0[frames][seg_voiced]
    ratio = float(seg_voiced.mean()) if len(seg_voiced) else 0.0
    median = float(np.median(seg_f0)) if len(seg_f0) else None
    spread = float(np.std(12 * np.log2(seg_f0 / np.median(seg_f0)))) if len(seg_f0) > 3 else 0.0
    speech = 0.25 <= ratio <= 0.92 and spread >= 0.7 and median is not None and 70 <= median <= 400
    return Segment(start, end, round(ratio, 3), _round(median), "speech" if speech else "non-speech")


def _frame(seconds: float) -> int:
    return int(round(seconds * SAMPLE_RATE / HOP))


def _round(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, 1)


def describe(facts: AcousticFacts | dict[str, Any]) -> str:
    """One paragraph of measured facts, appended to the captioner's text."""
    if isinstance(facts, dict):
        facts = AcousticFacts.from_dict(facts)
    parts = [f"duration {facts.duration_s:.2f} s",
             f"loudness {facts.rms_dbfs:.1f} dBFS RMS (peak {facts.peak_dbfs:.1f} dBFS)"]
    if not facts.segments:
        parts.append("no sound above the silence threshold (the clip is silent)")
    else:
        spans = ", ".join(f"{s.start_s:.2f}-{s.end_s:.2f} s {s.label}" for s in facts.segments)
        noun = "segment" if len(facts.segments) == 1 else "segments"
        parts.append(f"{len(facts.segments)} sound {noun} ({spans})")
        parts.append(f"voiced {100 * facts.voiced_ratio:.0f} % of the sounding time")
        if facts.median_f0_hz is not None and facts.median_f0_hz >= PITCH_CEILING_HZ - 10:
            parts.append(f"median pitch at or above {PITCH_CEILING_HZ:.0f} Hz (the tracker's ceiling)")
        elif facts.median_f0_hz is not None:
            parts.append(f"median pitch {facts.median_f0_hz:.0f} Hz")
    return "Measured acoustic facts: " + "; ".join(parts) + "."
