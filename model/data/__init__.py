"""Deterministic synthetic audio data for Eureka-mini: clips with exact metadata, and training targets from it."""

from model.data.synth import (
    SAMPLE_RATE,
    espeak_available,
    generate_clip,
    generate_dataset,
    read_manifest,
    write_wav,
)
from model.data.tasks import caption, caption_facts, make_questions, to_chat_records, transcript

__all__ = [
    "SAMPLE_RATE",
    "caption",
    "caption_facts",
    "make_questions",
    "to_chat_records",
    "espeak_available",
    "generate_clip",
    "generate_dataset",
    "read_manifest",
    "transcript",
    "write_wav",
]
