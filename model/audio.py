"""Audio front-end: any input → mono float32 16 kHz → the official Eureka-Audio log-mel chunks.

The mel recipe follows the official code exactly (reference doc section 2). It differs from
``whisper.log_mel_spectrogram`` in one detail that matters: the ``max − 8`` clamp is taken over *all* frames
before the last frame is dropped, and the audio is first padded to a multiple of 1280 samples (one audio token).
"""

from __future__ import annotations

import base64
import binascii
import importlib.util
import io
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
SAMPLES_PER_TOKEN = 1280  # 80 ms: 4 encoder frames of 20 ms, 8 mel frames of 10 ms
FRAMES_PER_TOKEN = SAMPLES_PER_TOKEN // HOP_LENGTH
CHUNK_FRAMES = 3000  # Whisper's 30 s window
MEL_PAD_VALUE = -1.5  # what digital silence maps to after (x + 4) / 4 with the max − 8 clamp
DEFAULT_MAX_SECONDS = 600.0
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1000, 768000
# Float samples beyond ±1000 (60 dB over full scale) are not audio scaled to ±1: usually integer PCM stored as
# floats. Far beyond it (≈1e16) the mel power overflows float32 and sampling crashes on NaN probabilities.
MAX_ABS_SAMPLE = 1000.0
READ_BLOCK_SAMPLES = 1 << 20  # decode in blocks of about this many samples (all channels), mixing down as we go

AudioSource = str | os.PathLike | bytes | np.ndarray | tuple | dict


class AudioInputError(ValueError):
    """Raised for any audio the model cannot use; the message says what is wrong in words a user understands."""


@dataclass
class AudioFeatures:
    """One clip after the front-end: its samples, its log-mel frames and how many audio tokens it becomes."""

    waveform: np.ndarray  # mono float32 at 16 kHz, unpadded
    log_mel: torch.Tensor  # [n_mels, 8 * n_tokens]
    n_tokens: int

    @property
    def duration_s(self) -> float:
        return len(self.waveform) / SAMPLE_RATE


def _decode_data_uri(uri: str) -> bytes:
    header, _, payload = uri.partition(",")
    if not payload or ";base64" not in header:
        raise AudioInputError("Audio data URI must look like 'data:audio/wav;base64,<data>'.")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise AudioInputError(f"Audio data URI is not valid base64: {exc}") from None


def _check_duration(n_frames: int, sample_rate: int, max_seconds: float) -> None:
    if n_frames <= 0:
        raise AudioInputError("The audio is empty (0 samples).")
    duration = n_frames / sample_rate
    if duration > max_seconds:
        raise AudioInputError(
            f"The audio is {duration:.1f} s long; the limit is {max_seconds:.0f} s. Trim it or raise the cap."
        )


def _check_rate(rate: int) -> None:
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise AudioInputError(f"Unsupported sample rate {rate} Hz (expected {MIN_SAMPLE_RATE}–{MAX_SAMPLE_RATE}).")


def _read_encoded(data: io.BytesIO | str, name: str, max_seconds: float) -> tuple[np.ndarray, int]:
    """Decode a file or byte stream with libsndfile, mixed down to mono block by block.

    Rate and duration are checked from the header before any sample is read, and decoding stops as soon as more
    samples than the header promised arrive, so a hostile header (1 h, 1024 channels, 1 GHz) costs no memory:
    only one block of all channels and the mono result are ever held.
    """
    try:
        with sf.SoundFile(data) as handle:
            rate, channels = int(handle.samplerate), max(1, int(handle.channels))
            _check_rate(rate)
            _check_duration(handle.frames, rate, max_seconds)
            limit, block_frames = int(max_seconds * rate), max(1, READ_BLOCK_SAMPLES // channels)
            pieces, total = [], 0
            while True:
                # read() returns only the frames actually decoded; SoundFile.blocks() would pad a short read with
                # uninitialised memory when the header over-states the length (found by tests/test_fuzz.py)
                block = handle.read(block_frames, dtype="float32", always_2d=True)
                if not len(block):
                    break
                with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf stay NaN/inf and are refused later
                    pieces.append(block[:, 0].copy() if channels == 1 else block.mean(axis=1, dtype=np.float32))
                total += len(block)
                if total > limit:
                    _check_duration(total, rate, max_seconds)
                if len(block) < block_frames:
                    break
    except AudioInputError:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, EOFError, OverflowError, MemoryError) as exc:
        reason = getattr(exc, "error_string", None) or str(exc)  # libsndfile's words, without "Error opening <path>"
        raise AudioInputError(
            f"Could not decode {name} as audio (supported: WAV, FLAC, OGG/Vorbis/Opus, MP3): {reason}"
        ) from None
    samples = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
    return samples, rate


def _array_and_rate(source: tuple | dict) -> tuple[np.ndarray, int]:
    """Accept (array, rate), Gradio's (rate, array) and {"array": …, "sampling_rate": …}."""
    if isinstance(source, dict):
        array = source.get("array")
        rate = source.get("sampling_rate", source.get("sample_rate"))
    else:
        if len(source) != 2:
            raise AudioInputError("Audio arrays must come as (samples, sample_rate).")
        first, second = source
        array, rate = (second, first) if isinstance(first, (int, np.integer)) else (first, second)
    if array is None or rate is None:
        raise AudioInputError("Audio arrays need both the samples and the sample rate.")
    try:
        rate = int(rate)
    except (TypeError, ValueError, OverflowError):
        raise AudioInputError(f"The sample rate must be a whole number of Hz, got {str(rate)[:40]!r}.") from None
    return _as_array(array), rate


def _as_array(array: object) -> np.ndarray:
    """``np.asarray`` that reports ragged or exotic input as an AudioInputError instead of numpy's ValueError."""
    try:
        return np.asarray(array)
    except (TypeError, ValueError, OverflowError) as exc:
        raise AudioInputError(f"Audio samples must be a rectangular array of numbers: {exc}") from None


def _to_float(array: np.ndarray) -> np.ndarray:
    """Integer PCM → [-1, 1] floats; floats pass through as float32."""
    if array.dtype.kind == "i":
        return (array.astype(np.float64) / float(2 ** (8 * array.dtype.itemsize - 1))).astype(np.float32)
    if array.dtype.kind == "u":
        half = float(2 ** (8 * array.dtype.itemsize - 1))
        return ((array.astype(np.float64) - half) / half).astype(np.float32)
    if array.dtype.kind == "f":
        with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, refused by the caller
            return array.astype(np.float32, copy=False)
    raise AudioInputError(f"Audio samples must be numbers, got dtype {array.dtype}.")


def _to_mono(array: np.ndarray) -> np.ndarray:
    """Average channels. 2-D input is (frames, channels) unless the first axis is clearly the channel axis."""
    if array.ndim == 1:
        return array
    if array.ndim != 2:
        raise AudioInputError(f"Audio must be 1-D or 2-D (frames × channels), got shape {array.shape}.")
    if array.size == 0:  # (0, channels) or (channels, 0): empty, not a mean of nothing (NaN)
        return np.zeros(0, dtype=np.float32)
    if array.shape[0] <= 8 < array.shape[1]:
        array = array.T
    return array.mean(axis=1, dtype=np.float32)


def _resample(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    if sample_rate == SAMPLE_RATE:
        return samples
    return soxr.resample(samples, sample_rate, SAMPLE_RATE, quality="HQ").astype(np.float32, copy=False)


def load_audio(source: AudioSource, max_seconds: float = DEFAULT_MAX_SECONDS) -> np.ndarray:
    """Load any supported input as mono float32 samples at 16 kHz.

    ``source`` may be a path, a ``data:audio/...;base64,`` URI, encoded bytes, ``(array, rate)``
    (or Gradio's ``(rate, array)``), or ``{"array", "sampling_rate"}``. A bare numpy array is taken to be 16 kHz.
    Every failure is an :class:`AudioInputError`.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise AudioInputError("The audio file is empty (0 bytes).")
        samples, rate = _read_encoded(io.BytesIO(bytes(source)), "the uploaded bytes", max_seconds)
    elif isinstance(source, str) and source.startswith("data:"):
        return load_audio(_decode_data_uri(source), max_seconds)
    elif isinstance(source, str) and source.startswith(("http://", "https://")):
        raise AudioInputError("Audio URLs are not fetched (no network access); download the file and pass its path.")
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            size = path.stat().st_size if path.is_file() else None
        except (OSError, ValueError):  # a name too long for the OS, a NUL byte, no permission
            size = None
        if size is None:
            raise AudioInputError(f"Audio file not found: {str(path)[:200]}")
        if size == 0:
            raise AudioInputError(f"The audio file is empty (0 bytes): {path.name}")
        samples, rate = _read_encoded(str(path), path.name, max_seconds)
    elif isinstance(source, np.ndarray):
        samples, rate = source, SAMPLE_RATE
    elif isinstance(source, (tuple, list, dict)):
        samples, rate = _array_and_rate(source)
    else:
        raise AudioInputError(f"Unsupported audio input of type {type(source).__name__}.")

    _check_rate(rate)
    samples = _to_mono(_to_float(np.asarray(samples)))
    _check_duration(len(samples), rate, max_seconds)
    if not np.isfinite(samples).all():
        raise AudioInputError("The audio contains NaN or infinite samples.")
    peak = float(np.abs(samples).max())
    if peak > MAX_ABS_SAMPLE:
        raise AudioInputError(
            f"The samples reach {peak:.3g}, far outside the ±1 range of audio: scale float audio to ±1 "
            "(integer PCM is scaled automatically)."
        )
    resampled = _resample(samples, rate)
    if resampled.size == 0:  # a sample or two above 16 kHz resamples to nothing: keep one, never return empty
        resampled = samples[:1]
    return np.ascontiguousarray(resampled, dtype=np.float32)


@lru_cache(maxsize=4)
def mel_filters(n_mels: int) -> torch.Tensor:
    """Whisper's mel filterbank, read from the file openai-whisper ships (same file as the official checkpoint)."""
    spec = importlib.util.find_spec("whisper")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("openai-whisper is required for its mel filterbank (pip install --no-deps openai-whisper)")
    path = Path(next(iter(spec.submodule_search_locations))) / "assets" / "mel_filters.npz"
    with np.load(path) as filters:
        return torch.from_numpy(filters[f"mel_{n_mels}"])


def pad_to_token_multiple(samples: np.ndarray) -> np.ndarray:
    """Right-pad with zeros to a whole number of 80 ms audio tokens."""
    n_tokens = max(1, math.ceil(len(samples) / SAMPLES_PER_TOKEN))
    return np.pad(samples, (0, n_tokens * SAMPLES_PER_TOKEN - len(samples)))


def log_mel_spectrogram(samples: np.ndarray, n_mels: int) -> torch.Tensor:
    """Official log-mel of one clip: [n_mels, 8 × audio tokens]. Pads to 1280 samples itself."""
    audio = torch.from_numpy(pad_to_token_multiple(samples).astype(np.float32))
    window = torch.hann_window(N_FFT)
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=window, center=True, pad_mode="reflect", return_complex=True)
    power = stft.abs() ** 2
    mel = mel_filters(n_mels) @ power
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    log_spec = (log_spec + 4.0) / 4.0
    return log_spec[:, :-1]


def chunk_log_mel(log_mel: torch.Tensor) -> torch.Tensor:
    """Cut [n_mels, frames] into [chunks, n_mels, 3000]; the last chunk is padded with −1.5 (silence)."""
    n_chunks = max(1, math.ceil(log_mel.shape[-1] / CHUNK_FRAMES))
    padded = torch.nn.functional.pad(log_mel, (0, n_chunks * CHUNK_FRAMES - log_mel.shape[-1]), value=MEL_PAD_VALUE)
    return padded.reshape(log_mel.shape[0], n_chunks, CHUNK_FRAMES).permute(1, 0, 2).contiguous()


def audio_features(source: AudioSource, n_mels: int, max_seconds: float = DEFAULT_MAX_SECONDS) -> AudioFeatures:
    """Load a clip and compute its log-mel and audio-token count."""
    samples = load_audio(source, max_seconds)
    log_mel = log_mel_spectrogram(samples, n_mels)
    return AudioFeatures(waveform=samples, log_mel=log_mel, n_tokens=log_mel.shape[-1] // FRAMES_PER_TOKEN)
