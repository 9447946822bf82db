"""Loading the official checkpoint layout: names, derived sizes, stray keys, sharding, and offline Hub ids."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import torch
from conftest import noise, tone
from official_checkpoint import add_tensor, small_model, write_official_checkpoint
from safetensors import safe_open

from model import task_messages
from model.audio import FRAMES_PER_TOKEN, chunk_log_mel
from model.inference import EurekaAudio
from model.loading import OFFICIAL_REPO, ModelLoadError, load_model, official_layout

STYLES = {
    # style: (gated, top_k, norm_topk_prob)
    "plain": (False, 2, True),
    "gated": (True, 3, False),
}


def clip(seconds: float = 2.0):
    return (tone(seconds, 330.0) + noise(seconds, amplitude=0.03), 16000)


@pytest.fixture(scope="module", params=sorted(STYLES))
def written(request, tmp_path_factory) -> tuple[EurekaAudio, Path]:
    gated, top_k, norm_topk_prob = STYLES[request.param]
    model = small_model(gated=gated, top_k=top_k, norm_topk_prob=norm_topk_prob)
    directory = write_official_checkpoint(model, tmp_path_factory.mktemp(f"official-{request.param}"), request.param)
    return model, directory


def checkpoint_keys(directory: Path) -> dict[str, str]:
    return json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]


def prompt_logits(model: EurekaAudio, messages) -> torch.Tensor:
    prompt, clips = model.tokenize(messages)
    log_mel = torch.cat([c.log_mel for c in clips], dim=-1)
    with torch.no_grad():
        return model.model(
            torch.tensor([prompt.input_ids]),
            model.special_ids.audio_pad,
            chunk_log_mel(log_mel),
            log_mel.shape[-1] // FRAMES_PER_TOKEN,
        ).logits


def test_writer_uses_the_official_layout(written) -> None:
    model, directory = written
    weight_map = checkpoint_keys(directory)
    shards = sorted(set(weight_map.values()))
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    on_disk = set()
    for shard in shards:
        with safe_open(str(directory / shard), framework="pt") as handle:
            on_disk |= set(handle.keys())
    assert on_disk == set(weight_map)
    for key in ("audio_embed.weight", "audio_head.weight", "audio_ffn_adaptor.4.bias", "audio_out_projection.3.weight",
                "lm_head.weight", "backbone.lm_head.weight", "backbone.model.embed_tokens.weight",
                "audio_encoder.speech_encoder.embed_positions.weight",
                "audio_encoder.speech_encoder.layers.1.self_attn.q_proj.bias",
                "audio_encoder.speech_encoder.layer_norm.weight",
                "audio_moe_adaptor.gate.weight", "audio_moe_adaptor.W_P.weight", "audio_moe_adaptor.norm.weight",
                "audio_moe_adaptor.experts.4.w2.weight", "audio_moe_adaptor.shared_experts.0.w1.weight"):
        assert key in weight_map, key
    assert "audio_encoder.speech_encoder.layers.0.self_attn.k_proj.bias" not in weight_map
    adapter = {k for k in weight_map if k.startswith("audio_moe_adaptor.")}
    assert not any(part in k for k in adapter for part in ("router", "fc1", "gate_proj", ".proj."))
    assert ("audio_moe_adaptor.experts.0.w3.weight" in adapter) == model.config.expert_gated
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "eureka_audio"
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    assert (directory / "modeling_eureka_audio.py").is_file() and (directory / "tokenizer.json").is_file()


def test_loading_reproduces_logits_and_greedy_output(written) -> None:
    model, directory = written
    loaded = load_model(directory)
    messages = task_messages("qa", clip(), question="What is playing?")
    torch.testing.assert_close(prompt_logits(loaded, messages), prompt_logits(model, messages), atol=1e-5, rtol=0)
    assert loaded.generate(messages, max_new_tokens=8) == model.generate(messages, max_new_tokens=8)


def test_derived_config_matches(written) -> None:
    model, directory = written
    derived, mapping = official_layout(directory)
    expected = model.config
    for field in ("n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer", "stack_factor",
                  "n_routed_experts", "n_shared_experts", "expert_dim", "expert_out_dim", "expert_gated",
                  "expert_bias", "proj_bias", "top_k", "norm_topk_prob", "adapter_norm_eps"):
        assert getattr(derived, field) == getattr(expected, field), field
    assert (derived.n_routed_experts, derived.n_shared_experts) == (5, 1)
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_parameters"):
        assert derived.backbone[field] == expected.backbone[field], field
    assert not any(k.startswith(("audio_embed", "audio_head", "audio_ffn", "audio_out", "lm_head")) for k in mapping)


def test_routing_settings_come_from_config_json(tmp_path, caplog) -> None:
    """top_k and renormalisation are not in the shapes: read them from config.json, else warn and assume."""
    directory = write_official_checkpoint(small_model(top_k=3, norm_topk_prob=False), tmp_path)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    derived, _ = official_layout(directory)
    assert (derived.top_k, derived.norm_topk_prob) == (3, False)

    for key in ("num_experts_per_tok", "norm_topk_prob"):
        del config["adaptor_config"][key]
    config_path.write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="model.loading"):
        derived, _ = official_layout(directory)
    assert (derived.top_k, derived.norm_topk_prob) == (2, True)
    assert "top-k" in caplog.text

    config["adaptor_config"]["num_experts_per_tok"] = 9
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="top-k 9"):
        official_layout(directory)


def test_unknown_adapter_key_is_refused_by_name(tmp_path) -> None:
    directory = write_official_checkpoint(small_model(), tmp_path)
    add_tensor(directory, "audio_moe_adaptor.temperature_scale.weight", torch.ones(5))
    with pytest.raises(ModelLoadError, match=r"temperature_scale\.weight"):
        load_model(directory)


def test_unknown_root_key_is_refused_by_name(tmp_path) -> None:
    directory = write_official_checkpoint(small_model(), tmp_path)
    add_tensor(directory, "vision_tower.proj.weight", torch.ones(2, 2))
    with pytest.raises(ModelLoadError, match=r"vision_tower\.proj\.weight"):
        load_model(directory)


def test_writer_refuses_a_style_the_model_does_not_have(tmp_path) -> None:
    with pytest.raises(ValueError, match="gated"):
        write_official_checkpoint(small_model(gated=False), tmp_path, adapter_style="gated")


@pytest.mark.parametrize("source", ["official", "someone/unknown-model"])
def test_hub_ids_fail_fast_offline(source, monkeypatch) -> None:
    from huggingface_hub import snapshot_download

    repo = OFFICIAL_REPO if source == "official" else source
    try:
        snapshot_download(repo, local_files_only=True)
        pytest.skip(f"{repo} is in the local Hub cache")
    except Exception:
        pass
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as error:
        load_model(source)
    assert time.monotonic() - start < 5
    message = str(error.value)
    assert repo in message and "HF_HUB_OFFLINE" in message and "local" in message
