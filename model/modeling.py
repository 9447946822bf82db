"""The Eureka-Audio network: Whisper encoder → 4-frame stacking → sparse MoE adapter → causal LM.

Read top to bottom: ``MoEAdapter`` (the only part the paper designs itself), ``EurekaAudioModel`` wiring the
three parts together. Audio placeholder embeddings are *replaced* by adapter outputs (reference doc section 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from whisper.model import AudioEncoder

from .config import EurekaConfig


@dataclass
class RouterOutput:
    """What the adapter's router decided for each audio token (rows follow the audio tokens in order)."""

    router_logits: torch.Tensor  # [tokens, routed experts]
    router_probs: torch.Tensor  # softmax over all routed experts, float32
    expert_ids: torch.Tensor  # [tokens, top_k], most probable first
    expert_weights: torch.Tensor  # [tokens, top_k], the gate values that scale each expert's output
    aux_loss: torch.Tensor  # load-balancing loss, scalar


class Expert(nn.Module):
    """A SiLU feed-forward expert; gated (SwiGLU) or plain, whichever the checkpoint holds."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, gated: bool, bias: bool):
        super().__init__()
        self.gated = gated
        if gated:
            self.gate_proj = nn.Linear(in_dim, hidden_dim, bias=bias)
            self.up_proj = nn.Linear(in_dim, hidden_dim, bias=bias)
            self.down_proj = nn.Linear(hidden_dim, out_dim, bias=bias)
        else:
            self.fc1 = nn.Linear(in_dim, hidden_dim, bias=bias)
            self.fc2 = nn.Linear(hidden_dim, out_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.fc2(F.silu(self.fc1(x)))


class MoEAdapter(nn.Module):
    """``y = RMSNorm(W_P · (Σ_{i∈topk} g_i E_i(x) + Σ_shared S_j(x)))`` with ``g = softmax(x·W_g)``.

    Audio is heterogeneous (speech, music, noise); routing each 80 ms token to a few experts lets them specialise
    without one dense projection absorbing conflicting gradients, which is the paper's argument for the design.
    """

    def __init__(self, config: EurekaConfig):
        super().__init__()
        self.top_k = config.top_k
        self.n_routed_experts = config.n_routed_experts
        self.norm_topk_prob = config.norm_topk_prob
        in_dim, out_dim = config.adapter_in_dim, config.expert_out_dim

        def make_expert() -> Expert:
            return Expert(in_dim, config.expert_dim, out_dim, config.expert_gated, config.expert_bias)

        self.router = nn.Linear(in_dim, config.n_routed_experts, bias=False)
        self.experts = nn.ModuleList(make_expert() for _ in range(config.n_routed_experts))
        self.shared_experts = nn.ModuleList(make_expert() for _ in range(config.n_shared_experts))
        self.proj = nn.Linear(out_dim, config.hidden_size, bias=config.proj_bias)
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.adapter_norm_eps)

    def route(self, x: torch.Tensor) -> RouterOutput:
        router_logits = self.router(x)
        router_probs = router_logits.float().softmax(dim=-1)
        expert_weights, expert_ids = router_probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            expert_weights = expert_weights / expert_weights.sum(dim=-1, keepdim=True)
        # L_aux = N · Σ_e P̄_e · f̄_e, f̄_e = share of tokens whose top-k includes e (reference doc section 1).
        chosen = F.one_hot(expert_ids, self.n_routed_experts).sum(dim=1).float()
        aux_loss = self.n_routed_experts * (router_probs.mean(0) * chosen.mean(0)).sum()
        return RouterOutput(router_logits, router_probs, expert_ids, expert_weights, aux_loss)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        """x: [tokens, in_dim] → ([tokens, hidden], routing). Each expert runs only on the tokens sent to it."""
        routing = self.route(x)
        mixed = torch.zeros(x.shape[0], self.proj.in_features, dtype=x.dtype, device=x.device)
        for expert_index, expert in enumerate(self.experts):
            token_index, slot = torch.where(routing.expert_ids == expert_index)
            if token_index.numel() == 0:
                continue
            gate = routing.expert_weights[token_index, slot].to(x.dtype).unsqueeze(-1)
            mixed.index_add_(0, token_index, gate * expert(x[token_index]))
        for shared in self.shared_experts:
            mixed = mixed + shared(x)
        return self.norm(self.proj(mixed)), routing


def build_backbone(backbone_config: dict) -> PreTrainedModel:
    """Any transformers causal LM from its config dict (Qwen3 by default)."""
    values = dict(backbone_config)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    return AutoModelForCausalLM.from_config(config)


class EurekaAudioModel(nn.Module):
    """The three parts, plus the glue that turns mel chunks into embeddings at audio placeholder positions."""

    def __init__(self, config: EurekaConfig):
        super().__init__()
        self.config = config
        self.audio_encoder = AudioEncoder(
            config.n_mels, config.n_audio_ctx, config.n_audio_state, config.n_audio_head, config.n_audio_layer
        )
        self.adapter = MoEAdapter(config)
        self.backbone = build_backbone(config.backbone)
        # Optional (EurekaConfig.ctc_head): per audio token, which text token is being spoken there, or blank.
        vocab_size = int(config.backbone["vocab_size"])
        self.ctc_head = nn.Linear(config.hidden_size, vocab_size, bias=False) if config.ctc_head else None

    def keep_encoder_norms_float32(self) -> EurekaAudioModel:
        """openai-whisper's LayerNorm computes in float32 and CPU kernels refuse bf16 weights with fp32 inputs."""
        for module in self.audio_encoder.modules():
            if isinstance(module, nn.LayerNorm):
                module.float()
        return self

    def encode_audio(self, mel_chunks: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """[chunks, n_mels, 3000] → [n_tokens, 4 × d]: each 30 s chunk encoded on its own, frames stacked by 4.

        Only the real tokens are kept; feeding the padded tail floods the prompt with silence.
        """
        frames = self.audio_encoder(mel_chunks.to(self.audio_encoder.conv1.weight.dtype))
        stacked = frames.reshape(-1, self.config.adapter_in_dim)
        if n_tokens > stacked.shape[0]:
            raise ValueError(f"{n_tokens} audio tokens requested but the chunks only hold {stacked.shape[0]}")
        return stacked[:n_tokens]

    def audio_embeddings(self, mel_chunks: torch.Tensor, n_tokens: int) -> tuple[torch.Tensor, RouterOutput]:
        """Mel chunks → adapter outputs in the backbone's embedding space, with the router's decisions."""
        return self.adapter(self.encode_audio(mel_chunks, n_tokens))

    def embed(self, input_ids: torch.Tensor, audio_embeds: torch.Tensor | None, audio_token_id: int) -> torch.Tensor:
        """Token embeddings with every audio placeholder replaced (not added to) by the adapter output, in order."""
        inputs_embeds = self.backbone.get_input_embeddings()(input_ids)
        audio_mask = input_ids == audio_token_id
        n_slots = int(audio_mask.sum())
        n_audio = 0 if audio_embeds is None else audio_embeds.shape[0]
        if n_slots != n_audio:
            raise ValueError(f"prompt has {n_slots} audio placeholders but {n_audio} audio embeddings were given")
        if n_audio:
            inputs_embeds = inputs_embeds.masked_scatter(audio_mask.unsqueeze(-1), audio_embeds.to(inputs_embeds.dtype))
        return inputs_embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        audio_token_id: int,
        mel_chunks: torch.Tensor | None = None,
        n_audio_tokens: int = 0,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ):
        """Full forward pass (training and parity checks). ``labels`` use −100 for positions without loss.

        Returns the backbone output with ``loss`` (next-token loss + λ·L_aux when training) and a ``routing``
        attribute holding the adapter's :class:`RouterOutput` (or None without audio).
        """
        audio_embeds, routing = (None, None)
        if mel_chunks is not None and n_audio_tokens:
            audio_embeds, routing = self.audio_embeddings(mel_chunks, n_audio_tokens)
        inputs_embeds = self.embed(input_ids, audio_embeds, audio_token_id)
        output = self.backbone(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels)
        if labels is not None and routing is not None and self.training:
            output.loss = output.loss + self.config.aux_loss_weight * routing.aux_loss
        output.routing = routing
        return output
