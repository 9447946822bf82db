"""Generate the example clips in ``assets/examples/`` and their task prompts (``examples.json``).

Why generated rather than downloaded: the project has no network access to datasets, and synthetic clips have a
known answer (how many beeps, is the melody rising) so a trained model's replies can be judged by eye. Speech comes
from espeak-ng; everything else is synthesised with numpy from a fixed seed, so rerunning gives the same files.

Run: ``python -m app.make_examples`` (needs the Debian package espeak-ng for the speech clips).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from model.prompts import CAPTION_PROMPT, asr_system_prompt

SAMPLE_RATE = 16000
EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "examples"
MANIFEST = "examples.json"


def speak(text: str, voice: str = "en-us", rate_wpm: int = 160, pitch: int = 50) -> np.ndarray:
    """espeak-ng speech as float32 at 16 kHz (espeak writes 22.05 kHz; soxr resamples)."""
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "speech.wav"
        subprocess.run(
            ["espeak-ng", "-v", voice, "-s", str(rate_wpm), "-p", str(pitch), "-w", str(path), text],
            check=True,
            capture_output=True,
        )
        samples, rate = sf.read(path, dtype="float32", always_2d=True)
    mono = samples.mean(axis=1)
    return soxr.resample(mono, rate, SAMPLE_RATE).astype(np.float32)


def seconds(n: float) -> np.ndarray:
    """Sample times for ``n`` seconds."""
    return np.arange(int(round(n * SAMPLE_RATE))) / SAMPLE_RATE


def envelope(length: int, attack_s: float = 0.01, release_s: float = 0.05) -> np.ndarray:
    """Linear attack/release so synthetic notes do not click."""
    env = np.ones(length, dtype=np.float32)
    attack, release = int(attack_s * SAMPLE_RATE), int(release_s * SAMPLE_RATE)
    if attack:
        env[:attack] = np.linspace(0, 1, attack)
    if release:
        env[-release:] = np.linspace(1, 0, release)
    return env


def tone(freq: float, duration_s: float, harmonics: tuple[float, ...] = (1.0,)) -> np.ndarray:
    t = seconds(duration_s)
    wave = sum(a * np.sin(2 * np.pi * freq * (i + 1) * t) for i, a in enumerate(harmonics))
    return (wave / sum(harmonics) * envelope(len(t))).astype(np.float32)


def beeps(count: int = 3, freq: float = 1000.0, beep_s: float = 0.25, gap_s: float = 0.6) -> np.ndarray:
    """``count`` sine beeps separated by silence: the answer to "how many beeps" is known."""
    silence = np.zeros(int(gap_s * SAMPLE_RATE), dtype=np.float32)
    parts = [silence]
    for _ in range(count):
        parts += [0.5 * tone(freq, beep_s), silence]
    return np.concatenate(parts)


def melody() -> np.ndarray:
    """A rising C-major scale on a plucked-string-like tone (decaying harmonics)."""
    notes = [261.63, 293.66, 329.63, 349.23, 392.00, 440.00, 493.88, 523.25]
    parts = []
    for freq in notes:
        note = tone(freq, 0.45, harmonics=(1.0, 0.5, 0.25, 0.12))
        note *= np.exp(-3.0 * seconds(0.45)).astype(np.float32)
        parts.append(0.6 * note)
    return np.concatenate(parts)


def noisy_street(rng: np.random.Generator) -> np.ndarray:
    """Speech over traffic-like brown noise with two car-horn blasts: a scene for captioning and Q&A."""
    speech = speak("Excuse me, which way is the train station?", voice="en-gb+f3", rate_wpm=150)
    total = len(speech) + 2 * SAMPLE_RATE
    brown = np.cumsum(rng.standard_normal(total)).astype(np.float32)
    brown -= np.convolve(brown, np.ones(801) / 801, mode="same")  # remove the drift, keep the rumble
    brown *= 0.12 / (np.abs(brown).max() + 1e-9)
    scene = brown.copy()
    start = SAMPLE_RATE // 2
    scene[start : start + len(speech)] += 0.8 * speech
    horn = 0.35 * (tone(400, 0.5, harmonics=(1, 0.8, 0.6, 0.4)) + tone(500, 0.5, harmonics=(1, 0.8, 0.6, 0.4)))
    for at_s in (0.1, total / SAMPLE_RATE - 0.8):
        i = int(at_s * SAMPLE_RATE)
        scene[i : i + len(horn)] += horn[: len(scene) - i]
    return scene


def normalise(samples: np.ndarray, peak: float = 0.9) -> np.ndarray:
    return (samples * (peak / (np.abs(samples).max() + 1e-9))).astype(np.float32)


def examples() -> list[dict]:
    """Each example: file name, what it is, and the prompt each tab should use with it."""
    rng = np.random.default_rng(0)
    return [
        {
            "file": "speech_fox.wav",
            "title": "Speech (US English)",
            "audio": speak("The quick brown fox jumps over the lazy dog. Then it runs into the forest.", "en-us"),
            "language": "English",
            "qa_question": "What animal jumps over the dog?\nA. A cat\nB. A fox\nC. A horse\nD. A rabbit",
        },
        {
            "file": "speech_weather.wav",
            "title": "Speech (British English, female voice)",
            "audio": speak("Tomorrow will be cloudy in the morning, with sunshine and light winds later.",
                           "en-gb+f3", rate_wpm=150, pitch=60),
            "language": "English",
            "qa_question": "Is the speaker male or female, and what is the speech about?",
        },
        {
            "file": "noisy_street.wav",
            "title": "Noisy street scene (speech, traffic, car horns)",
            "audio": noisy_street(rng),
            "language": "English",
            "qa_question": "What can be heard in the background?\nA. Birdsong\nB. Rain\nC. Traffic and car horns\n"
            "D. Applause",
        },
        {
            "file": "melody_scale.wav",
            "title": "Melody (rising C-major scale)",
            "audio": melody(),
            "language": None,
            "qa_question": "Does the melody go up or down in pitch?\nA. Up\nB. Down\nC. It stays the same\n"
            "D. Up then down",
        },
        {
            "file": "beeps_three.wav",
            "title": "Three beeps (1 kHz)",
            "audio": beeps(3),
            "language": None,
            "qa_question": "How many beeps are there?\nA. One\nB. Two\nC. Three\nD. Four",
        },
    ]


def write_examples(directory: Path = EXAMPLES_DIR) -> list[Path]:
    """Write every clip as 16 kHz mono 16-bit WAV plus the manifest; returns the written paths."""
    directory.mkdir(parents=True, exist_ok=True)
    manifest, written = [], []
    for clip in examples():
        path = directory / clip["file"]
        sf.write(path, normalise(clip["audio"]), SAMPLE_RATE, subtype="PCM_16")
        written.append(path)
        entry = {k: v for k, v in clip.items() if k != "audio"}
        entry["asr_system_prompt"] = asr_system_prompt(clip["language"])
        entry["caption_prompt"] = CAPTION_PROMPT
        entry["duration_s"] = round(len(clip["audio"]) / SAMPLE_RATE, 2)
        manifest.append(entry)
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    written.append(directory / MANIFEST)
    return written


if __name__ == "__main__":
    for written_path in write_examples():
        print(f"{written_path.relative_to(EXAMPLES_DIR.parent.parent)}  {written_path.stat().st_size / 1024:.0f} KiB")
