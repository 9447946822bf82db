"""Front-end parity with an independent numpy implementation of the official mel recipe."""

from __future__ import annotations

import base64
import importlib.util
import io
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
from conftest import noise, tone

from model.audio import (
    CHUNK_FRAMES,
    MEL_PAD_VALUE,
    audio_features,
    chunk_log_mel,
    load_audio,
)


def numpy_reference(samples: np.ndarray, rate: int, n_mels: int) -> tuple[np.ndarray, int]:
    """The official formula written from the reference doc, in float64 numpy: (chunks, n_tokens)."""
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    if rate != 16000:
        samples = soxr.resample(samples.astype(np.float32), rate, 16000, quality="HQ")
    samples = samples.astype(np.float64)
    n_tokens = max(1, math.ceil(len(samples) / 1280))
    padded = np.pad(samples, (0, n_tokens * 1280 - len(samples)))
    framed_input = np.pad(padded, 200, mode="reflect")
    n_frames = 1 + (len(framed_input) - 400) // 160
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)  # periodic Hann
    frames = np.stack([framed_input[i * 160 : i * 160 + 400] for i in range(n_frames)]) * window
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    whisper_dir = Path(next(iter(importlib.util.find_spec("whisper").submodule_search_locations)))
    filters = np.load(whisper_dir / "assets" / "mel_filters.npz")[f"mel_{n_mels}"].astype(np.float64)
    log_spec = np.log10(np.maximum(filters @ power.T, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    log_spec = ((log_spec + 4.0) / 4.0)[:, :-1]
    n_chunks = math.ceil(log_spec.shape[1] / 3000)
    chunks = np.full((n_chunks, n_mels, 3000), -1.5)
    for c in range(n_chunks):
        part = log_spec[:, c * 3000 : (c + 1) * 3000]
        chunks[c, :, : part.shape[1]] = part
    return chunks, n_tokens


def signal(kind: str, rate: int) -> np.ndarray:
    return {
        "sine": lambda: tone(2.0, 440.0, rate),
        "white_noise": lambda: noise(3.0, rate, seed=1),
        "silence": lambda: np.zeros(rate, dtype=np.float32),
        "clip_7_3s": lambda: tone(7.3, 300.0, rate) + noise(7.3, rate, seed=2, amplitude=0.02),
        "clip_61s": lambda: tone(61.0, 1000.0, rate, amplitude=0.1) + noise(61.0, rate, seed=3, amplitude=0.05),
    }[kind]()


RATES = [8000, 16000, 22050, 44100, 48000]


@pytest.mark.parametrize("kind", ["sine", "white_noise", "silence", "clip_7_3s", "clip_61s"])
@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("channels", [1, 2])
def test_mel_matches_numpy_reference(kind: str, rate: int, channels: int) -> None:
    mono = signal(kind, rate)
    samples = mono if channels == 1 else np.stack([mono, 0.5 * mono[::-1]], axis=1)
    expected_chunks, expected_tokens = numpy_reference(samples, rate, 128)
    features = audio_features((samples, rate), n_mels=128)
    chunks = chunk_log_mel(features.log_mel).numpy()
    assert features.n_tokens == expected_tokens
    assert chunks.shape == expected_chunks.shape
    np.testing.assert_allclose(chunks, expected_chunks, atol=1e-4, rtol=0)


def test_token_and_chunk_counts() -> None:
    features = audio_features((tone(61.0), 16000), n_mels=80)
    assert features.n_tokens == math.ceil(61.0 * 16000 / 1280) == 763
    chunks = chunk_log_mel(features.log_mel)
    assert chunks.shape == (3, 80, CHUNK_FRAMES)
    assert features.log_mel.shape[1] == 8 * 763
    # the padded tail of the last chunk is the silence value, not zero
    assert (chunks[2, :, 8 * 763 - 6000 :] == MEL_PAD_VALUE).all()


def test_every_input_form_gives_the_same_samples(tmp_path: Path) -> None:
    stereo = np.stack([tone(1.5, 500, 44100), noise(1.5, 44100)], axis=1)
    path = tmp_path / "clip.wav"
    sf.write(path, stereo, 44100, subtype="FLOAT")
    encoded = path.read_bytes()
    uri = "data:audio/wav;base64," + base64.b64encode(encoded).decode()
    from_path = load_audio(str(path))
    for other in (load_audio(path), load_audio(encoded), load_audio(uri), load_audio((stereo, 44100)),
                  load_audio((44100, stereo)), load_audio({"array": stereo, "sampling_rate": 44100})):
        np.testing.assert_allclose(other, from_path, atol=1e-6)
    assert from_path.dtype == np.float32 and from_path.ndim == 1
    assert abs(len(from_path) - 1.5 * 16000) <= 1


@pytest.mark.parametrize("fmt,subtype", [("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III"),
                                         ("WAV", "PCM_24"), ("WAV", "PCM_U8")])
def test_compressed_and_integer_formats(fmt: str, subtype: str) -> None:
    buffer = io.BytesIO()
    sf.write(buffer, tone(1.0, 440, 22050), 22050, format=fmt, subtype=subtype)
    samples = load_audio(buffer.getvalue())
    assert abs(len(samples) - 16000) < 1200  # MP3 adds encoder delay/padding
    assert 0.15 < np.sqrt(np.mean(samples**2)) < 0.3  # a 0.3-amplitude sine has RMS ≈ 0.21


def test_integer_arrays_are_scaled() -> None:
    as_int16 = (tone(1.0) * 32767).astype(np.int16)
    np.testing.assert_allclose(load_audio((as_int16, 16000)), tone(1.0), atol=1e-4)
    channels_first = np.stack([tone(1.0), tone(1.0)])  # (2, frames) is recognised as channels-first
    np.testing.assert_allclose(load_audio((channels_first, 16000)), tone(1.0), atol=1e-6)
