"""Weight formats for CPU decode: oneDNN-prepacked bf16, and int8 weight-only quantisation (docs/performance.md).

Prepacking (``pack_backbone``): a bf16 ``nn.Linear`` hands oneDNN a plain row-major weight, which its bf16 kernel
re-blocks on every call — at batch 1 that costs about as much as the matmul itself. Reordering each weight once
into oneDNN's blocked layout (what inductor's weight prepacking and IPEX do) removes that; values are unchanged.

Int8 weight-only quantisation of the backbone's linear layers (optional):

Decode on a CPU is bound by reading every weight once per token, so halving the bytes per weight (bf16 → int8
with one scale per output channel) is the one change that can beat the bf16 bandwidth bound. Activations stay in
the model's dtype; the matmul is ATen's ``_weight_int8pack_mm`` (the CPU kernel gpt-fast uses), which reads int8
weights directly instead of materialising a dequantised copy. The encoder and adapter are left alone: they run
once per clip, not once per token.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``weight ≈ q * scale[:, None]`` with q in [-127, 127]."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """``nn.Linear`` with int8 weights and per-channel scales; inputs and outputs keep the original dtype."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("scales", scales.to(dtype).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        q, scale = quantize_weight(linear.weight)
        return cls(q, scale, linear.bias, linear.weight.dtype)

    def dequantized(self) -> torch.Tensor:
        return self.weight.to(self.scales.dtype) * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        scales = self.scales if self.scales.dtype == x.dtype else self.scales.to(x.dtype)
        if flat.device.type == "cpu" or flat.device.type == "cuda":
            out = torch.ops.aten._weight_int8pack_mm(flat.contiguous(), self.weight, scales)
        else:  # no kernel on this device: correct, not fast
            out = flat @ (self.weight.to(x.dtype) * scales[:, None]).t()
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


class PackedLinear(nn.Module):
    """A bf16 ``nn.Linear`` whose weight is prepacked once into oneDNN's blocked layout (inference only).

    Same values and dtype as the original; the packed tensor is opaque (no ``state_dict`` round trip), so packing
    is applied to a loaded model, never saved.
    """

    def __init__(self, linear: nn.Linear, batch_hint: int = 1):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), batch_hint)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN-prepacked bf16"


def can_pack(backbone: nn.Module) -> bool:
    """Prepacking helps bf16 on CPU with oneDNN; fp32 already runs MKL's own prepacked-free GEMV at full speed."""
    weight = backbone.get_input_embeddings().weight
    return weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()


def pack_backbone(backbone: nn.Module) -> int:
    """Replace every bf16 ``nn.Linear`` of the backbone by :class:`PackedLinear` in place; returns how many.

    The LM head gets its own packed copy when tied to the input embedding (the lookup keeps the plain table).
    """
    count = 0
    for name, module in list(backbone.named_modules()):
        if isinstance(module, nn.Linear) and module.weight.dtype == torch.bfloat16:
            parent_name, _, child = name.rpartition(".")
            parent = backbone.get_submodule(parent_name) if parent_name else backbone
            setattr(parent, child, PackedLinear(module))
            count += 1
    return count


def quantize_backbone_int8(backbone: nn.Module, include_lm_head: bool = True) -> dict[str, Any]:
    """Replace every ``nn.Linear`` of a transformers causal LM (in place) by :class:`Int8Linear`.

    The input embedding stays in its dtype (a lookup reads one row per token); with tied embeddings the LM head
    gets its own int8 copy, since it is the single largest matrix read per token (vocab × hidden).
    Returns what changed: layer count and weight bytes before/after.
    """
    replaced, before, after = 0, 0, 0
    lm_head = backbone.get_output_embeddings() if hasattr(backbone, "get_output_embeddings") else None
    targets = [
        (name, module) for name, module in backbone.named_modules()
        if isinstance(module, nn.Linear) and (include_lm_head or module is not lm_head)
    ]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = backbone.get_submodule(parent_name) if parent_name else backbone
        quantized = Int8Linear.from_linear(module)
        before += module.weight.numel() * module.weight.element_size()
        after += quantized.weight.numel() + quantized.scales.numel() * quantized.scales.element_size()
        setattr(parent, child, quantized)
        replaced += 1
    return {"layers": replaced, "weight_bytes_before": before, "weight_bytes_after": after}


def quantize_int8(model: Any, include_lm_head: bool = True) -> dict[str, Any]:
    """Quantise an ``EurekaAudio``'s backbone in place; both engines then run the int8 weights.

    Compiled decode steps are dropped (they were traced over the float modules) and rebuilt on next use.
    """
    report = quantize_backbone_int8(model.model.backbone, include_lm_head=include_lm_head)
    model._decoders.clear()
    if model.batcher is not None:
        model.enable_batching(model.batcher.window_s * 1000, model.batcher.max_batch)
    return report


def backbone_weight_bytes(backbone: nn.Module) -> int:
    """Bytes of weights read per decoded token: every linear (float, or int8 + scales), norms and the LM head.

    The input embedding is excluded (a lookup reads one row per token) unless it is also the LM head (tied).
    """
    embedding = backbone.get_input_embeddings().weight
    lm_head = backbone.get_output_embeddings()
    tied = isinstance(lm_head, nn.Linear) and lm_head.weight is embedding
    total, seen = 0, set()
    packed = [m.packed for m in backbone.modules() if isinstance(m, PackedLinear)]
    for tensor in [*backbone.parameters(), *backbone.buffers(), *packed]:
        if id(tensor) in seen or tensor.dtype in (torch.int64, torch.bool):
            continue
        seen.add(id(tensor))
        if tensor is embedding and not tied:
            continue
        total += tensor.numel() * tensor.element_size()
    return total
