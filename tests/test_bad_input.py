"""Every kind of unusable input raises AudioInputError with a message that says what is wrong."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import tone

from model import AudioInputError, load_audio, task_messages

ROOT = Path(__file__).resolve().parent.parent


def wav_bytes(samples: np.ndarray, rate: int = 16000, subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


def test_bad_inputs_raise_typed_errors(tmp_path: Path) -> None:
    empty_file = tmp_path / "empty.wav"
    empty_file.write_bytes(b"")
    text_file = tmp_path / "notes.wav"
    text_file.write_text("this is not audio\n" * 20)
    zero_samples = tmp_path / "zero.wav"
    zero_samples.write_bytes(wav_bytes(np.zeros(0, dtype=np.float32)))
    truncated = wav_bytes(tone(1.0))[:30]
    nan_audio = tone(1.0).copy()
    nan_audio[100] = np.nan
    inf_audio = tone(1.0).copy()
    inf_audio[5] = np.inf
    cases = [
        (str(empty_file), "empty"),
        (str(tmp_path / "missing.wav"), "not found"),
        (str(text_file), "Could not decode"),
        (str(zero_samples), "empty"),
        (b"", "empty"),
        (truncated, "Could not decode"),
        ((nan_audio, 16000), "NaN"),
        ((inf_audio, 16000), "NaN or infinite"),
        ((np.zeros(0, np.float32), 16000), "empty"),
        ((tone(1.0), 0), "sample rate"),
        ((np.array(["a", "b"]), 16000), "numbers"),
        ((np.zeros((2, 2, 2), np.float32), 16000), "1-D or 2-D"),
        ("data:audio/wav;base64,@@@not-base64@@@", "base64"),
        ("data:audio/wav,plain", "data URI"),
        ("https://example.com/a.wav", "not fetched"),
        (12345, "Unsupported audio input"),
    ]
    for source, message in cases:
        with pytest.raises(AudioInputError, match=message):
            load_audio(source)


def test_duration_cap_is_checked_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "long.wav"
    sf.write(path, np.zeros(16000 * 5, dtype=np.int16), 16000)
    with pytest.raises(AudioInputError, match="limit is 3 s"):
        load_audio(path, max_seconds=3)
    with pytest.raises(AudioInputError, match="limit is 3 s"):
        load_audio((np.zeros(16000 * 5, np.float32), 16000), max_seconds=3)
    assert len(load_audio(path, max_seconds=6)) == 16000 * 5


def test_model_refuses_over_long_audio(tiny) -> None:
    tiny.config.max_audio_seconds = 2.0
    try:
        with pytest.raises(AudioInputError, match="limit is 2 s"):
            tiny.generate(task_messages("asr", (tone(3.0), 16000)), max_new_tokens=2)
    finally:
        tiny.config.max_audio_seconds = 600.0


def test_silence_and_single_sample_are_valid() -> None:
    assert len(load_audio((np.zeros(16000, np.float32), 16000))) == 16000
    assert len(load_audio((np.array([0.5], np.float32), 16000))) == 1


def test_cli_prints_error_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    result = subprocess.run(
        [sys.executable, "-m", "model", "--model", "tiny-random", "--audio", str(bad)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "Could not decode bad.wav" in result.stderr
    assert "Traceback" not in result.stderr
