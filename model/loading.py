"""``load_model``: presets, our own ``save_pretrained`` layout, and the official checkpoint's layout.

Official layout (reference doc section 4): ``audio_encoder.speech_encoder.*`` in Hugging Face ``WhisperEncoder``
names (mapped onto openai-whisper's ``AudioEncoder``), ``audio_moe_adaptor.*`` whose sizes are read from tensor
shapes, ``backbone.*`` (a ``Qwen3ForCausalLM``), and pre-training-only tensors that inference ignores.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.initialization import no_init_weights

from .config import PRESETS, EurekaConfig
from .inference import EurekaAudio
from .modeling import EurekaAudioModel
from .tokenizer import byte_level_tokenizer

log = logging.getLogger(__name__)

OFFICIAL_REPO = "cslys1999/Eureka-Audio-Instruct"
MINI_DIR = Path(__file__).resolve().parent.parent / "assets" / "eureka-mini"
ENCODER_PREFIX, ADAPTER_PREFIX, BACKBONE_PREFIX = "audio_encoder.speech_encoder.", "audio_moe_adaptor.", "backbone."
PRETRAINING_ONLY = ("audio_embed.", "audio_head.", "audio_ffn_adaptor.", "audio_out_projection.", "lm_head.")
# Buffers the model computes itself (openai-whisper's fixed sinusoidal table): not stored by ``save_pretrained``
# (1.2 MB of Eureka-mini's 25 MB budget), and rebuilt, not read, when a checkpoint lacks them.
COMPUTED_BUFFERS = ("audio_encoder.positional_embedding",)


class ModelLoadError(RuntimeError):
    """A model source that cannot be loaded, with a message that says why and what to do."""


# --- building ---------------------------------------------------------------------------------------------------
def build_model(config: EurekaConfig, dtype: torch.dtype = torch.float32, init: bool = True) -> EurekaAudioModel:
    """The network in ``dtype``. ``init=False`` skips random initialisation (≈35 s for the full model) when
    weights are loaded right after."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        if init:
            return EurekaAudioModel(config)
        with no_init_weights():
            return EurekaAudioModel(config)
    finally:
        torch.set_default_dtype(previous)


def tiny_random(dtype: torch.dtype = torch.float32, seed: int = 0) -> EurekaAudio:
    """A few-MB random model with a byte-level tokenizer: exercises every code path, deterministic for a seed."""
    tokenizer = byte_level_tokenizer()
    config = PRESETS["tiny-random"](vocab_size=len(tokenizer))
    torch.manual_seed(seed)
    return EurekaAudio(build_model(config, dtype), tokenizer, name="tiny-random")


# --- our own layout ---------------------------------------------------------------------------------------------
def save_pretrained(model: EurekaAudio, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """config.json + model.safetensors + tokenizer files; ``load_model(directory)`` reads them back.

    ``dtype`` stores floating-point weights in another precision (float16 halves a bundled checkpoint).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save(directory / "config.json")
    state = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
        for k, v in model.model.state_dict().items()
    }
    # Tied embeddings share storage; safetensors stores each tensor once, the tie is rebuilt on load.
    if model.model.backbone.config.tie_word_embeddings:
        state.pop("backbone.lm_head.weight", None)
    for name in COMPUTED_BUFFERS:
        state.pop(name, None)
    save_file(state, directory / "model.safetensors", metadata={"format": "pt", "name": model.name})
    model.tokenizer.save_pretrained(directory)


def _load_state(model: EurekaAudioModel, state: dict[str, torch.Tensor], source: str) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if model.backbone.config.tie_word_embeddings:
        model.backbone.tie_weights()
        missing = [k for k in missing if k != "backbone.lm_head.weight"]
    missing = [k for k in missing if k not in COMPUTED_BUFFERS]  # built by the model's constructor
    if missing or unexpected:
        raise ModelLoadError(
            f"{source}: weights do not fit the model (missing {missing[:8]}, unexpected {unexpected[:8]})"
        )


def _load_native(directory: Path, dtype: torch.dtype, device: str) -> EurekaAudio:
    config = EurekaConfig.load(directory / "config.json")
    model = build_model(config, dtype, init=False)
    state = _read_safetensors([directory / "model.safetensors"], dtype)
    _load_state(model, state, str(directory))
    # Our tokenizers are plain fast tokenizers; AutoTokenizer would try to read config.json as a transformers config.
    tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
    return EurekaAudio(model.to(device), tokenizer, name=directory.name)


def _read_safetensors(files: list[Path], dtype: torch.dtype, keys: set[str] | None = None) -> dict[str, torch.Tensor]:
    state = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if keys is None or key in keys:
                    tensor = handle.get_tensor(key)
                    state[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return state


# --- the official layout ----------------------------------------------------------------------------------------
def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / shard for shard in shards]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    raise ModelLoadError(f"{directory} has no model.safetensors or model.safetensors.index.json")


def _shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


_ENCODER_RENAMES = [
    (r"^embed_positions\.weight$", "positional_embedding"),
    (r"^layers\.(\d+)\.self_attn\.q_proj\.", r"blocks.\1.attn.query."),
    (r"^layers\.(\d+)\.self_attn\.k_proj\.", r"blocks.\1.attn.key."),
    (r"^layers\.(\d+)\.self_attn\.v_proj\.", r"blocks.\1.attn.value."),
    (r"^layers\.(\d+)\.self_attn\.out_proj\.", r"blocks.\1.attn.out."),
    (r"^layers\.(\d+)\.self_attn_layer_norm\.", r"blocks.\1.attn_ln."),
    (r"^layers\.(\d+)\.fc1\.", r"blocks.\1.mlp.0."),
    (r"^layers\.(\d+)\.fc2\.", r"blocks.\1.mlp.2."),
    (r"^layers\.(\d+)\.final_layer_norm\.", r"blocks.\1.mlp_ln."),
    (r"^layer_norm\.", "ln_post."),
    (r"^(conv[12])\.", r"\1."),
]


def hf_whisper_to_openai(name: str) -> str | None:
    """Hugging Face ``WhisperEncoder`` parameter name → openai-whisper ``AudioEncoder`` name (None if unknown)."""
    for pattern, replacement in _ENCODER_RENAMES:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name)
    return None


# Adapter names are not published; accept the usual spellings of each part and refuse anything else.
_ROUTER = r"(?:router|gate|gating|gate_network|w_g|wg|W_g)"
_EXPERT_LINEARS = {
    "gate_proj": "gate_proj", "w1": "gate_proj", "up_proj": "up_proj", "w3": "up_proj", "down_proj": "down_proj",
    "fc1": "fc1", "linear1": "fc1", "0": "fc1", "fc2": "fc2", "linear2": "fc2", "2": "fc2", "w2": "down_proj",
}
_PROJ = r"(?:proj|out_proj|output_proj|projection|w_p|W_P|wp|linear_out)"
_NORM = r"(?:norm|rms_norm|layer_norm|ln|out_norm)"


def _adapter_rename(name: str) -> str | None:
    """Official adapter name → our ``MoEAdapter`` name, before gated/plain is decided."""
    if m := re.fullmatch(_ROUTER + r"\.weight", name):
        return "router.weight"
    if m := re.fullmatch(r"(shared_experts?|experts)\.(?:(\d+)\.)?(?:net\.|ffn\.|mlp\.)?(\w+)\.(weight|bias)", name):
        group = "shared_experts" if m.group(1).startswith("shared") else "experts"
        index = m.group(2) or "0"
        if group == "experts" and m.group(2) is None:
            return None
        linear = _EXPERT_LINEARS.get(m.group(3))
        return f"{group}.{index}.{linear}.{m.group(4)}" if linear else None
    if m := re.fullmatch(_PROJ + r"\.(weight|bias)", name):
        return f"proj.{m.group(1)}"
    if re.fullmatch(_NORM + r"\.weight", name):
        return "norm.weight"
    return None


def _adapter_layout(names: dict[str, tuple[int, ...]]) -> tuple[dict[str, str], dict[str, Any]]:
    """Map the official adapter tensors and derive the adapter's sizes from their shapes."""
    renamed, unknown = {}, []
    for name in names:
        target = _adapter_rename(name)
        (unknown.append(name) if target is None else renamed.__setitem__(name, target))
    # Mixtral-style w1/w2 with no w3 is a plain two-layer expert, not SwiGLU.
    targets = set(renamed.values())
    if not any(".up_proj." in t for t in targets):
        fix = {"gate_proj": "fc1", "down_proj": "fc2"}
        renamed = {
            k: re.sub(r"\.(gate_proj|down_proj)\.", lambda m: f".{fix[m.group(1)]}.", v) for k, v in renamed.items()
        }
    if unknown:
        raise ModelLoadError(f"unexpected adapter keys in {ADAPTER_PREFIX}*: {sorted(unknown)}")
    shape = {target: names[source] for source, target in renamed.items()}
    if "router.weight" not in shape or "proj.weight" not in shape or "norm.weight" not in shape:
        raise ModelLoadError(f"adapter lacks a router, W_P or norm; found {sorted(names)}")
    n_experts, in_dim = shape["router.weight"]
    gated = any(".gate_proj." in t for t in shape)
    first, last = ("gate_proj", "down_proj") if gated else ("fc1", "fc2")
    expert_ids = {int(t.split(".")[1]) for t in shape if t.startswith("experts.")}
    shared_ids = {int(t.split(".")[1]) for t in shape if t.startswith("shared_experts.")}
    if expert_ids != set(range(n_experts)):
        raise ModelLoadError(f"router has {n_experts} outputs but experts {sorted(expert_ids)} were found")
    expert_dim = shape[f"experts.0.{first}.weight"][0]
    expert_out = shape[f"experts.0.{last}.weight"][0]
    sizes = {
        "n_routed_experts": n_experts,
        "n_shared_experts": len(shared_ids),
        "expert_dim": expert_dim,
        "expert_out_dim": expert_out,
        "expert_gated": gated,
        "expert_bias": f"experts.0.{first}.bias" in shape,
        "proj_bias": "proj.bias" in shape,
        "_in_dim": in_dim,
    }
    if shape["proj.weight"][1] != expert_out:
        raise ModelLoadError(f"W_P expects {shape['proj.weight'][1]} inputs but experts give {expert_out}")
    return renamed, sizes


_TEXT_CONFIG_KEYS = ("text_config", "llm_config", "language_config", "backbone_config")
# Routing settings cannot be read from shapes: config.json's adapter section (a key naming adapt/moe/expert) or,
# for the unambiguous spellings, its root.
_TOP_K_KEYS = ("num_experts_per_tok", "moe_top_k", "top_k", "topk", "num_selected_experts", "n_activated_experts")
_NORM_TOPK_KEYS = ("norm_topk_prob", "normalize_topk_prob", "renormalize")
_ADAPTER_EPS_KEYS = ("rms_norm_eps", "norm_eps", "eps")


def _adapter_settings(checkpoint_config: dict[str, Any], n_experts: int) -> dict[str, Any]:
    """top_k, norm_topk_prob and the adapter's RMSNorm eps from config.json where it states them."""
    sections = [
        v for k, v in checkpoint_config.items() if isinstance(v, dict) and re.search(r"adapt|moe|expert", k, re.I)
    ]

    def pick(keys: tuple[str, ...], root_keys: tuple[str, ...] = ()) -> Any:
        for section in [*sections, {k: checkpoint_config[k] for k in root_keys if k in checkpoint_config}]:
            for key in keys:
                if section.get(key) is not None:
                    return section[key]
        return None

    settings: dict[str, Any] = {}
    top_k = pick(_TOP_K_KEYS, root_keys=("num_experts_per_tok", "moe_top_k"))
    if top_k is None:
        log.warning("config.json does not state the adapter's top-k; assuming %d", EurekaConfig.top_k)
    elif not isinstance(top_k, int) or not 1 <= top_k <= n_experts:
        raise ModelLoadError(f"config.json gives adapter top-k {top_k!r}, but the router has {n_experts} experts")
    else:
        settings["top_k"] = top_k
    if (norm_topk := pick(_NORM_TOPK_KEYS, root_keys=("norm_topk_prob",))) is not None:
        settings["norm_topk_prob"] = bool(norm_topk)
    if (eps := pick(_ADAPTER_EPS_KEYS)) is not None:
        settings["adapter_norm_eps"] = float(eps)
    return settings


def _backbone_config(shapes: dict[str, tuple[int, ...]], checkpoint_config: dict[str, Any]) -> dict[str, Any]:
    """A Qwen3 config from the backbone's tensor shapes; rope θ and limits from config.json where present."""
    # Search the text sub-config first, so adapter or encoder settings of the same name are never picked up.
    scope = next((checkpoint_config[k] for k in _TEXT_CONFIG_KEYS if isinstance(checkpoint_config.get(k), dict)),
                 checkpoint_config)

    def find(key: str, default: Any) -> Any:
        stack = [scope]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                if key in node and not isinstance(node[key], dict):
                    return node[key]
                stack.extend(node.values())
        return default

    vocab, hidden = shapes["model.embed_tokens.weight"]
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"model\.layers\.(\d+)\.", k)))
    head_dim = shapes["model.layers.0.self_attn.q_norm.weight"][0]
    rope = (scope.get("rope_parameters") or checkpoint_config.get("rope_parameters")
            or {"rope_type": "default", "rope_theta": find("rope_theta", 1e6)})
    return {
        "model_type": "qwen3",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": shapes["model.layers.0.mlp.gate_proj.weight"][0],
        "num_hidden_layers": layers,
        "num_attention_heads": shapes["model.layers.0.self_attn.q_proj.weight"][0] // head_dim,
        "num_key_value_heads": shapes["model.layers.0.self_attn.k_proj.weight"][0] // head_dim,
        "head_dim": head_dim,
        "max_position_embeddings": find("max_position_embeddings", 40960),
        "rms_norm_eps": find("rms_norm_eps", 1e-6),
        "rope_parameters": rope,
        "tie_word_embeddings": "lm_head.weight" not in shapes,
    }


def official_layout(directory: Path) -> tuple[EurekaConfig, dict[str, str]]:
    """Config derived from the checkpoint's shapes, and a map checkpoint key → our parameter name."""
    shapes = _shapes(_weight_files(directory))
    groups: dict[str, dict[str, tuple[int, ...]]] = {"enc": {}, "adapter": {}, "backbone": {}}
    ignored, unexpected = [], []
    for key, shape in shapes.items():
        if key.startswith(ENCODER_PREFIX):
            groups["enc"][key[len(ENCODER_PREFIX):]] = shape
        elif key.startswith(ADAPTER_PREFIX):
            groups["adapter"][key[len(ADAPTER_PREFIX):]] = shape
        elif key.startswith(BACKBONE_PREFIX):
            groups["backbone"][key[len(BACKBONE_PREFIX):]] = shape
        elif key.startswith(PRETRAINING_ONLY):
            ignored.append(key)
        else:
            unexpected.append(key)
    if unexpected:
        raise ModelLoadError(f"{directory}: unexpected keys outside the known layout: {sorted(unexpected)[:20]}")
    if ignored:
        log.info("ignoring %d pre-training-only tensors (%s…)", len(ignored), ", ".join(sorted(ignored)[:3]))

    mapping: dict[str, str] = {}
    enc = groups["enc"]
    for name in enc:
        target = hf_whisper_to_openai(name)
        if target is None:
            raise ModelLoadError(f"unexpected encoder key {ENCODER_PREFIX}{name}")
        mapping[ENCODER_PREFIX + name] = "audio_encoder." + target
    renamed, sizes = _adapter_layout(groups["adapter"])
    mapping.update({ADAPTER_PREFIX + k: "adapter." + v for k, v in renamed.items()})
    mapping.update({BACKBONE_PREFIX + k: "backbone." + k for k in groups["backbone"]})

    config_path = directory / "config.json"
    checkpoint_config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    n_state = enc["conv1.weight"][0]
    in_dim = sizes.pop("_in_dim")
    stack_factor, remainder = divmod(in_dim, n_state)
    if remainder:
        raise ModelLoadError(f"adapter input {in_dim} is not a multiple of the encoder width {n_state}")
    config = EurekaConfig(
        n_mels=enc["conv1.weight"][1],
        n_audio_ctx=enc["embed_positions.weight"][0],
        n_audio_state=n_state,
        n_audio_head=n_state // 64,  # every Whisper size uses 64-wide heads
        n_audio_layer=1 + max(int(m.group(1)) for k in enc if (m := re.match(r"layers\.(\d+)\.", k))),
        stack_factor=stack_factor,
        backbone=_backbone_config(groups["backbone"], checkpoint_config),
        **sizes,
        **_adapter_settings(checkpoint_config, sizes["n_routed_experts"]),
    )
    return config, mapping


def _load_official(directory: Path, dtype: torch.dtype, device: str) -> EurekaAudio:
    config, mapping = official_layout(directory)
    model = build_model(config, dtype, init=False)
    raw = _read_safetensors(_weight_files(directory), dtype, keys=set(mapping))
    state = {mapping[k]: v for k, v in raw.items()}
    _load_state(model, state, str(directory))
    # config.json's auto_map names remote code; without trust_remote_code=False, AutoTokenizer asks on stdin.
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    return EurekaAudio(model.to(device), tokenizer, name=directory.name)


def default_source() -> str:
    """``$EUREKA_MODEL`` if set, else the bundled Eureka-mini, else (before it is bundled) ``tiny-random``."""
    if os.environ.get("EUREKA_MODEL"):
        return os.environ["EUREKA_MODEL"]
    return "mini" if (MINI_DIR / "config.json").is_file() else "tiny-random"


# --- sources ----------------------------------------------------------------------------------------------------
def _hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = re.sub(r"^https?://", "", endpoint).split("/")[0]
    host, _, port = host.partition(":")
    try:
        with socket.create_connection((host, int(port or 443)), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_hub(repo_id: str) -> Path:
    """A Hub repository's local snapshot: the cache if it has one, else a download — or a quick, clear failure."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if offline or not _hub_reachable():
        reason = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub cannot be reached"
        raise ModelLoadError(
            f"{repo_id} is not in the local cache and {reason}. Use a local directory or --model mini."
        )
    return Path(snapshot_download(repo_id))


def load_model(
    source: str | os.PathLike = "mini",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
) -> EurekaAudio:
    """Load Eureka-Audio from a preset (``tiny-random``, ``mini``, ``official``), a local directory or a Hub id.

    Directories in our own layout (``save_pretrained``) and in the official checkpoint's layout both work.
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."))
    device = str(device)
    source = str(source)
    if source == "tiny-random":
        model = tiny_random(dtype)
        model.model.to(device)
        return model
    if source == "mini":
        if not (MINI_DIR / "config.json").is_file():
            raise ModelLoadError(f"the bundled Eureka-mini checkpoint is missing from {MINI_DIR}")
        return _load_native(MINI_DIR, dtype, device)
    directory = Path(source).expanduser()
    if not directory.is_dir():
        if source == "official":
            source = OFFICIAL_REPO
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", source):
            raise ModelLoadError(f"{source!r} is neither a preset, a directory nor a Hub id (owner/name)")
        directory = resolve_hub(source)
    config_path = directory / "config.json"
    if config_path.is_file() and json.loads(config_path.read_text()).get("model_type") == "eureka_audio_studio":
        return _load_native(directory, dtype, device)
    return _load_official(directory, dtype, device)
