"""Shared fixtures. Tests never reach the network: the Hub is off and Gradio analytics disabled."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

SR = 16000


@pytest.fixture(scope="session")
def tiny():
    """The tiny-random model, shared by every test that only reads it."""
    from model import load_model

    return load_model("tiny-random")


def tone(seconds: float, freq: float = 440.0, sr: int = SR, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def noise(seconds: float, sr: int = SR, seed: int = 0, amplitude: float = 0.1) -> np.ndarray:
    return (amplitude * np.random.default_rng(seed).standard_normal(int(round(seconds * sr)))).astype(np.float32)
