"""Write one of our models in the official Eureka-Audio checkpoint layout (reference doc section 4), for tests.

The layout is written from scratch here, not with ``model.loading``'s tables, so loading it checks those tables:
encoder tensors in Hugging Face ``WhisperEncoder`` names under ``audio_encoder.speech_encoder.``, the adapter
under ``audio_moe_adaptor.`` in names of our choosing that are *not* ours (``gate``, ``experts.N.w1/w2[/w3]``,
``shared_experts.N.*``, ``W_P``, ``norm``), ``backbone.*``, the pre-training-only tensors, sharded safetensors
with an index, ``config.json`` with ``auto_map`` for the remote code in ``tests/fixtures/remote_code``,
tokenizer files and ``generation_config.json``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.config import EurekaConfig, tiny_random_config
from model.inference import EurekaAudio
from model.loading import build_model
from model.prompts import SpecialTokenIds
from model.tokenizer import byte_level_tokenizer

REMOTE_CODE_DIR = Path(__file__).resolve().parent / "fixtures" / "remote_code"
REMOTE_CODE_FILES = ("configuration_eureka_audio.py", "modeling_eureka_audio.py")
ENCODER, ADAPTER, BACKBONE = "audio_encoder.speech_encoder.", "audio_moe_adaptor.", "backbone."

# openai-whisper AudioEncoder name → Hugging Face WhisperEncoder name.
_ENCODER_NAMES = [
    (r"^positional_embedding$", "embed_positions.weight"),
    (r"^blocks\.(\d+)\.attn\.query\.", r"layers.\1.self_attn.q_proj."),
    (r"^blocks\.(\d+)\.attn\.key\.", r"layers.\1.self_attn.k_proj."),
    (r"^blocks\.(\d+)\.attn\.value\.", r"layers.\1.self_attn.v_proj."),
    (r"^blocks\.(\d+)\.attn\.out\.", r"layers.\1.self_attn.out_proj."),
    (r"^blocks\.(\d+)\.attn_ln\.", r"layers.\1.self_attn_layer_norm."),
    (r"^blocks\.(\d+)\.mlp\.0\.", r"layers.\1.fc1."),
    (r"^blocks\.(\d+)\.mlp\.2\.", r"layers.\1.fc2."),
    (r"^blocks\.(\d+)\.mlp_ln\.", r"layers.\1.final_layer_norm."),
    (r"^ln_post\.", "layer_norm."),
    (r"^(conv[12])\.", r"\1."),
]
# Our expert linears → official-looking names (Mixtral: w1 gate, w3 up, w2 down; plain: w1 in, w2 out).
_EXPERT_NAMES = {"fc1": "w1", "fc2": "w2", "gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def small_model(gated: bool = False, top_k: int = 2, norm_topk_prob: bool = True, seed: int = 0) -> EurekaAudio:
    """A small random model with the official shape family: 64-wide encoder heads, 5 routed + 1 shared experts,
    W_P not square (so a transposed tensor cannot load), tiny Qwen3 backbone, byte-level tokenizer."""
    tokenizer = byte_level_tokenizer()
    config = EurekaConfig(
        n_mels=80,
        n_audio_state=128,
        n_audio_head=2,
        n_audio_layer=2,
        n_routed_experts=5,
        n_shared_experts=1,
        top_k=top_k,
        norm_topk_prob=norm_topk_prob,
        expert_dim=96,
        expert_out_dim=48,
        expert_gated=gated,
        adapter_norm_eps=1e-5,
        backbone=tiny_random_config(len(tokenizer)).backbone,
    )
    torch.manual_seed(seed)
    return EurekaAudio(build_model(config), tokenizer, name="small")


def _encoder_name(name: str) -> str:
    for pattern, replacement in _ENCODER_NAMES:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name)
    raise KeyError(f"no Hugging Face name for encoder parameter {name}")


def _adapter_name(name: str) -> str:
    if name == "router.weight":
        return "gate.weight"
    if m := re.fullmatch(r"(experts|shared_experts)\.(\d+)\.(\w+)\.(weight|bias)", name):
        return f"{m.group(1)}.{m.group(2)}.{_EXPERT_NAMES[m.group(3)]}.{m.group(4)}"
    if m := re.fullmatch(r"proj\.(weight|bias)", name):
        return f"W_P.{m.group(1)}"
    if name == "norm.weight":
        return "norm.weight"
    raise KeyError(f"no official name for adapter parameter {name}")


def official_state(model: EurekaAudio) -> dict[str, torch.Tensor]:
    """Every inference tensor of ``model`` under its official checkpoint name (lm_head written out, untied)."""
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.model.state_dict().items():
        part, _, rest = name.partition(".")
        if part == "audio_encoder":
            key = ENCODER + _encoder_name(rest)
        elif part == "adapter":
            key = ADAPTER + _adapter_name(rest)
        elif part == "backbone":
            key = BACKBONE + rest
        else:
            raise KeyError(f"unknown parameter {name}")
        state[key] = tensor.detach().clone().contiguous()  # clone: tied tensors must not share storage
    return state


def pretraining_only_tensors(hidden: int, vocab: int, seed: int = 1234, codebook: int = 32) -> dict[str, torch.Tensor]:
    """Small random stand-ins for the tensors only pre-training uses (audio-code embedding/head, adaptors, lm_head)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return 0.02 * torch.randn(*shape, generator=generator)

    tensors = {"audio_embed.weight": rand(codebook, hidden), "audio_head.weight": rand(codebook, hidden)}
    # Sequential(Linear, LayerNorm, act, Linear, LayerNorm) and Sequential(Linear, LayerNorm, act, Linear).
    for index, (rows, cols) in {0: (2 * hidden, hidden), 3: (hidden, 2 * hidden)}.items():
        tensors[f"audio_ffn_adaptor.{index}.weight"] = rand(rows, cols)
        tensors[f"audio_ffn_adaptor.{index}.bias"] = rand(rows)
    for index, width in {1: 2 * hidden, 4: hidden}.items():
        tensors[f"audio_ffn_adaptor.{index}.weight"] = 1 + rand(width)
        tensors[f"audio_ffn_adaptor.{index}.bias"] = rand(width)
    for index, (rows, cols) in {0: (hidden, hidden), 3: (codebook, hidden)}.items():
        tensors[f"audio_out_projection.{index}.weight"] = rand(rows, cols)
        tensors[f"audio_out_projection.{index}.bias"] = rand(rows)
    tensors["audio_out_projection.1.weight"] = 1 + rand(hidden)
    tensors["audio_out_projection.1.bias"] = rand(hidden)
    tensors["lm_head.weight"] = rand(vocab, hidden)
    return tensors


def write_shards(state: dict[str, torch.Tensor], directory: Path, shards: int) -> None:
    """``model-0000i-of-0000n.safetensors`` of about equal size in key order, plus ``model.safetensors.index.json``."""
    keys = sorted(state)
    total = sum(state[k].numel() * state[k].element_size() for k in keys)
    budget = total / shards
    groups: list[list[str]] = [[] for _ in range(shards)]
    filled = 0
    for key in keys:
        index = min(shards - 1, int(filled // budget))
        groups[index].append(key)
        filled += state[key].numel() * state[key].element_size()
    groups = [group for group in groups if group]
    weight_map = {}
    for number, group in enumerate(groups, start=1):
        filename = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: state[k] for k in group}, directory / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, filename))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def add_tensor(directory: str | os.PathLike, key: str, tensor: torch.Tensor) -> None:
    """Add one tensor to the checkpoint's last shard and its index (to test how loading treats stray keys)."""
    directory = Path(directory)
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    with safe_open(str(directory / shard), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    tensors[key] = tensor.contiguous()
    save_file(tensors, directory / shard, metadata={"format": "pt"})
    index["weight_map"][key] = shard
    index_path.write_text(json.dumps(index, indent=2) + "\n")


def official_config_json(model: EurekaAudio, adapter_style: str, dtype: torch.dtype) -> dict[str, Any]:
    """``config.json`` as the remote code reads it: whisper encoder, adaptor and Qwen3 text sub-configs."""
    config = model.config
    ids = SpecialTokenIds.from_tokenizer(model.tokenizer)
    encoder = model.model.audio_encoder
    text_config = {k: v for k, v in config.backbone.items() if k != "initializer_range"}
    text_config.update(bos_token_id=None, eos_token_id=ids.im_end, pad_token_id=ids.pad)
    return {
        "architectures": ["EurekaAudioForCausalLM"],
        "model_type": "eureka_audio",
        "auto_map": {
            "AutoConfig": "configuration_eureka_audio.EurekaAudioConfig",
            "AutoModelForCausalLM": "modeling_eureka_audio.EurekaAudioForCausalLM",
        },
        "audio_config": {
            "model_type": "whisper",
            "num_mel_bins": config.n_mels,
            "d_model": config.n_audio_state,
            "encoder_layers": config.n_audio_layer,
            "encoder_attention_heads": config.n_audio_head,
            "encoder_ffn_dim": encoder.blocks[0].mlp[0].out_features,
            "max_source_positions": config.n_audio_ctx,
            "activation_function": "gelu",
            "decoder_layers": 1,
            "decoder_attention_heads": config.n_audio_head,
            "decoder_ffn_dim": 4 * config.n_audio_state,
            "vocab_size": 51866,
        },
        "adaptor_config": {
            "style": adapter_style,
            "input_dim": config.adapter_in_dim,
            "num_experts": config.n_routed_experts,
            "num_experts_per_tok": config.top_k,
            "num_shared_experts": config.n_shared_experts,
            "intermediate_size": config.expert_dim,
            "output_dim": config.expert_out_dim,
            "hidden_size": config.hidden_size,
            "norm_topk_prob": config.norm_topk_prob,
            "bias": config.expert_bias,
            "proj_bias": config.proj_bias,
            "rms_norm_eps": config.adapter_norm_eps,
            "stack_factor": config.stack_factor,
        },
        "text_config": text_config,
        "audio_token_id": ids.audio_pad,
        "audio_start_token_id": ids.audio_start,
        "audio_end_token_id": ids.audio_end,
        "dtype": str(dtype).removeprefix("torch."),
        "transformers_version": "4.57.1",
    }


def write_official_checkpoint(
    model: EurekaAudio,
    directory: str | os.PathLike,
    adapter_style: str | None = None,
    shards: int = 2,
    remote_code: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write ``model`` as the official checkpoint would hold it; returns the directory.

    ``adapter_style`` ("plain" or "gated", default: whichever the model has) must match ``model.config.expert_gated``.
    """
    style = adapter_style or ("gated" if model.config.expert_gated else "plain")
    if style not in ("plain", "gated"):
        raise ValueError(f"adapter_style must be 'plain' or 'gated', got {style!r}")
    if (style == "gated") != model.config.expert_gated:
        raise ValueError(f"a {'gated' if model.config.expert_gated else 'plain'} model cannot be written {style}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = official_state(model)
    state.update(pretraining_only_tensors(model.config.hidden_size, int(model.config.backbone["vocab_size"])))
    state = {k: v.to(dtype) for k, v in state.items()}
    write_shards(state, directory, shards)
    config = official_config_json(model, style, dtype)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    ids = SpecialTokenIds.from_tokenizer(model.tokenizer)
    generation = {
        "eos_token_id": [ids.im_end, ids.pad],
        "pad_token_id": ids.pad,
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 20,
        "repetition_penalty": 1.05,
    }
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    model.tokenizer.save_pretrained(directory)
    if remote_code:
        for name in REMOTE_CODE_FILES:
            shutil.copyfile(REMOTE_CODE_DIR / name, directory / name)
    return directory
