"""One dataclass holding every dimension of the Eureka-Audio architecture, plus named presets.

The encoder fields follow openai-whisper's ``ModelDimensions`` (``n_audio_*``); the adapter fields describe the
sparse MoE adapter; ``backbone`` is any transformers causal-LM config as a plain dict (Qwen3 by default), so a
checkpoint's ``config.json`` can round-trip it without code changes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Qwen3-1.7B(-Base) text config, the official backbone (reference doc section 1).
QWEN3_1P7B: dict[str, Any] = {
    "model_type": "qwen3",
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    "tie_word_embeddings": True,
    "hidden_act": "silu",
}


@dataclass
class EurekaConfig:
    """Whole-model dimensions: Whisper encoder → frame stacking → sparse MoE adapter → causal LM."""

    # Whisper audio encoder (openai-whisper AudioEncoder). n_audio_ctx is fixed by Whisper's 30 s window.
    n_mels: int = 128
    n_audio_ctx: int = 1500
    n_audio_state: int = 1280
    n_audio_head: int = 20
    n_audio_layer: int = 32
    # Consecutive encoder frames concatenated into one audio token (50 Hz → 12.5 Hz, 80 ms per token).
    stack_factor: int = 4
    # "full": every chunk padded to the 30 s window, as Whisper and the official model run it. "trimmed": the partial
    # last chunk is encoded without its padding — a different input distribution, so it is only the default for a
    # model trained that way (Eureka-mini: 12× cheaper encoding made its 8 000-clip training set affordable).
    encoder_window: str = "full"
    # Sparse MoE adapter. The official sizes are not published: loading derives them from tensor shapes,
    # so these defaults only matter for randomly built models (benchmarks).
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    top_k: int = 2
    expert_dim: int = 1024
    expert_out_dim: int = 2048
    expert_gated: bool = False
    expert_bias: bool = False
    proj_bias: bool = False
    norm_topk_prob: bool = True
    aux_loss_weight: float = 0.01
    adapter_norm_eps: float = 1e-6
    # Causal LM backbone: a transformers config dict (model_type selects the class).
    backbone: dict[str, Any] = field(default_factory=lambda: dict(QWEN3_1P7B))
    # Inputs longer than this are refused before decoding (seconds).
    max_audio_seconds: float = 600.0
    # A CTC head over the adapter's outputs (hidden → vocabulary, blank = ``<|endoftext|>``): Eureka-mini's auxiliary
    # training head, kept to re-rank transcription beams by how well the audio spells them (``model.ctc``).
    ctc_head: bool = False

    def __post_init__(self) -> None:
        if self.encoder_window not in ("full", "trimmed"):
            raise ValueError(f"encoder_window must be 'full' or 'trimmed', not {self.encoder_window!r}")

    @property
    def adapter_in_dim(self) -> int:
        """Width of one stacked audio token fed to the adapter."""
        return self.n_audio_state * self.stack_factor

    @property
    def hidden_size(self) -> int:
        """The backbone's embedding width, which the adapter must produce."""
        return int(self.backbone["hidden_size"])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EurekaConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def save(self, path: str | Path) -> None:
        payload = {"model_type": "eureka_audio_studio", **self.to_dict()}
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> EurekaConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


def official_config() -> EurekaConfig:
    """Whisper-large-v3 encoder (128 mels) + Qwen3-1.7B; adapter sizes are placeholders until a checkpoint says."""
    return EurekaConfig()


def tiny_random_config(vocab_size: int = 320) -> EurekaConfig:
    """A few-MB model of the same shape family, for tests: every code path, none of the cost."""
    return EurekaConfig(
        n_mels=80,
        n_audio_state=64,
        n_audio_head=2,
        n_audio_layer=2,
        n_routed_experts=4,
        n_shared_experts=1,
        top_k=2,
        expert_dim=64,
        expert_out_dim=64,
        backbone={
            "model_type": "qwen3",
            "vocab_size": vocab_size,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "tie_word_embeddings": True,
            # A wider init than usual gives peaked logits, so greedy decoding has no near-ties between runs.
            "initializer_range": 0.2,
        },
    )


PRESETS = {"official": official_config, "tiny-random": tiny_random_config}
