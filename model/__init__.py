"""Eureka-Audio, implemented natively: ``from model import load_model``."""

from .audio import AudioInputError, load_audio
from .config import EurekaConfig
from .inference import EurekaAudio, GenerationSettings, RoutingTrace
from .loading import ModelLoadError, load_model, save_pretrained
from .prompts import ASR_SYSTEM_PROMPT, CAPTION_PROMPT, task_messages

__all__ = [
    "ASR_SYSTEM_PROMPT",
    "CAPTION_PROMPT",
    "AudioInputError",
    "EurekaAudio",
    "EurekaConfig",
    "GenerationSettings",
    "ModelLoadError",
    "RoutingTrace",
    "load_audio",
    "load_model",
    "save_pretrained",
    "task_messages",
]
