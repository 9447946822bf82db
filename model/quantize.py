"""Weight layouts and kernels for CPU decode, and int8 weight-only quantisation (measured in docs/performance.md).

Decode on a CPU reads every weight once per token, so a batch-1 token costs (weight bytes) / (memory bandwidth)
at best, and the matrix-vector kernel decides how close we get. ``torch.nn.functional.linear`` in bf16 hands
oneDNN a plain row-major weight that its kernel re-blocks on every call; measured on this project's 2-core EPYC it
streams weights at ≈ 20 GB/s of a ≈ 28–46 GB/s machine. Three layouts, switchable in place
(:func:`set_weight_layout`), all with the same values:

* ``plain``  — ``nn.Linear`` (what the official code runs);
* ``onednn`` — weights prepacked once into oneDNN's blocked layout (:class:`PackedLinear`, what inductor's weight
  prepacking and IPEX do): no per-call re-blocking, but a second copy of a tied LM head;
* ``kernel`` — :class:`KernelLinear`: a small AVX512-BF16 matrix-vector kernel (C, compiled on first use with
  the system C compiler, run on torch's own OpenMP threads) that streams each weight row once for up to 4 token
  rows, fp32 accumulation, bf16 rounding like torch; it shares the original weight tensors (no copy). Prefill
  (more than 8 rows) still goes to oneDNN. Falls back to ``onednn`` where the CPU or compiler is missing.

Int8 weight-only quantisation (:func:`quantize_int8`, optional) halves the bytes per weight (one scale per output
channel); activations stay in the model's dtype and the matmul is ATen's ``_weight_int8pack_mm`` (the CPU kernel
gpt-fast uses). The encoder and adapter are left alone: they run once per clip, not once per token.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


# --- the bf16 matrix-vector kernel ---------------------------------------------------------------------------------
KERNEL_MAX_ROWS = 8  # up to this many token rows use the kernel (two passes over the weights above 4)
_KERNEL_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

static inline uint16_t f32_to_bf16(float f) {
    uint32_t bits; memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffff) > 0x7f800000) return (uint16_t)((bits >> 16) | 0x40); /* NaN stays NaN */
    bits += 0x7fff + ((bits >> 16) & 1);  /* round to nearest even, as torch does */
    return (uint16_t)(bits >> 16);
}

/* y[m, n] = sum_k W[n, k] x[m, k] (+ bias[n]). W bf16 row-major [N, K], x bf16 [M, K], y bf16 [M, N].
   A block of 4 weight rows is read once for up to 4 rows of x; fp32 accumulation (AVX512-BF16 dot products). */
void gemv_bf16(const uint16_t *W, const uint16_t *x, const uint16_t *bias, uint16_t *y,
               int64_t M, int64_t N, int64_t K, int nthreads) {
    const int64_t kfull = K & ~(int64_t)31;
    const __mmask32 tail = (__mmask32)((1ull << (K - kfull)) - 1);
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int64_t mb = M - m0 < 4 ? M - m0 : 4;
        #pragma omp parallel for schedule(static) num_threads(nthreads)
        for (int64_t n0 = 0; n0 < N; n0 += 4) {
            const int64_t nb = N - n0 < 4 ? N - n0 : 4;
            __m512 acc[4][4];
            for (int i = 0; i < 4; i++) for (int j = 0; j < 4; j++) acc[i][j] = _mm512_setzero_ps();
            const uint16_t *w[4];
            for (int r = 0; r < 4; r++) w[r] = W + (n0 + (r < nb ? r : 0)) * K;
            for (int64_t k = 0; k < kfull; k += 32) {
                __m512bh wv[4];
                for (int r = 0; r < 4; r++) wv[r] = (__m512bh)_mm512_loadu_si512((const void *)(w[r] + k));
                for (int i = 0; i < mb; i++) {
                    __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(x + (m0 + i) * K + k));
                    for (int r = 0; r < 4; r++) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], wv[r], xv);
                }
            }
            if (K != kfull) {
                __m512bh wv[4];
                for (int r = 0; r < 4; r++) wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(tail, w[r] + kfull);
                for (int i = 0; i < mb; i++) {
                    __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(tail, x + (m0 + i) * K + kfull);
                    for (int r = 0; r < 4; r++) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], wv[r], xv);
                }
            }
            for (int i = 0; i < mb; i++)
                for (int r = 0; r < nb; r++) {
                    float v = _mm512_reduce_add_ps(acc[i][r]);
                    if (bias) { uint32_t b = (uint32_t)bias[n0 + r] << 16; float bf; memcpy(&bf, &b, 4); v += bf; }
                    y[(m0 + i) * N + n0 + r] = f32_to_bf16(v);
                }
        }
    }
}
"""
_KERNEL_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp", "-shared", "-fPIC"]


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


@lru_cache(maxsize=1)
def kernel_library() -> ctypes.CDLL | None:
    """The compiled kernel, or None (no AVX512-BF16, no C compiler, or ``EUREKA_CPU_KERNEL=0``).

    Built once per source version into ``$EUREKA_KERNEL_CACHE`` (default ``~/.cache/eureka-audio-studio``); linking
    ``-fopenmp`` binds to the ``libgomp.so.1`` torch already loaded, so the kernel shares torch's threads.
    """
    if os.environ.get("EUREKA_CPU_KERNEL", "1") == "0" or not {"avx512f", "avx512_bf16"} <= _cpu_flags():
        return None
    compiler = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if compiler is None:
        return None
    digest = hashlib.sha1((_KERNEL_SOURCE + " ".join(_KERNEL_FLAGS)).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("EUREKA_KERNEL_CACHE", Path.home() / ".cache" / "eureka-audio-studio"))
    library = cache / f"gemv-bf16-{digest}.so"
    try:
        if not library.is_file():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                source = Path(tmp) / "gemv.c"
                source.write_text(_KERNEL_SOURCE)
                built = Path(tmp) / library.name
                subprocess.run([compiler, *_KERNEL_FLAGS, "-o", str(built), str(source)], check=True,
                               capture_output=True, timeout=120)
                os.replace(built, library)  # atomic: concurrent builders never see a half-written file
        lib = ctypes.CDLL(str(library))
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("CPU decode kernel unavailable (%s); using oneDNN prepacked weights", exc)
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    lib.gemv_bf16.argtypes = [pointer, pointer, pointer, pointer, size, size, size, ctypes.c_int]
    lib.gemv_bf16.restype = None
    return lib


def gemv_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for a few bf16 rows on the CPU through the kernel (``x`` [rows, K], ``weight`` [N, K])."""
    lib = kernel_library()
    if lib is None:
        raise RuntimeError("the CPU decode kernel is not available on this machine")
    x = x.contiguous()
    rows, k = x.shape
    out = torch.empty(rows, weight.shape[0], dtype=torch.bfloat16, device=x.device)
    lib.gemv_bf16(weight.data_ptr(), x.data_ptr(), None if bias is None else bias.data_ptr(), out.data_ptr(),
                  rows, weight.shape[0], k, torch.get_num_threads())
    return out


class KernelLinear(nn.Module):
    """``nn.Linear`` (same weight and bias tensors, no copy) whose few-row bf16 calls use the CPU decode kernel."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows <= KERNEL_MAX_ROWS and x.dtype == torch.bfloat16 and self.weight.dtype == torch.bfloat16 \
                and x.device.type == "cpu" and self.weight.is_contiguous():
            out = gemv_bf16(x.reshape(rows, self.in_features), self.weight, self.bias)
            return out.reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)

    def to_linear(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16 CPU decode kernel"


# --- int8 ---------------------------------------------------------------------------------------------------------
def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``weight ≈ q * scale[:, None]`` with q in [-127, 127]."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


PREFILL_ROWS = 16  # above this many rows an int8 linear dequantises and runs a dense matmul


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
        if flat.shape[0] <= PREFILL_ROWS and x.dtype != torch.float32 and flat.device.type in ("cpu", "cuda"):
            out = torch.ops.aten._weight_int8pack_mm(flat.contiguous(), self.weight, scales)
        else:
            # Prefill (many rows): the int8 kernel is a GEMV kernel and gets slower than a dense matmul over a
            # dequantised copy (measured: 4.0 s vs 1.6 s prefill of 188 tokens on the full model). Its fp32 path
            # is not vectorised (0.5 GB/s measured), so fp32 models (Eureka-mini's quality check) dequantise too.
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

    def to_linear(self) -> nn.Linear:
        """The plain ``nn.Linear`` back (exact: packing only reorders)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.packed.to_dense(), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias, requires_grad=False)
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN-prepacked bf16"


def can_pack(backbone: nn.Module) -> bool:
    """A faster layout exists for bf16 weights on a CPU; fp32 already runs MKL's GEMV at full speed."""
    weight = backbone.get_input_embeddings().weight
    return weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()


LAYOUTS = ("plain", "onednn", "kernel")


def weight_layout(backbone: nn.Module) -> str:
    """The backbone's current layout: ``kernel``, ``onednn``, ``int8`` or ``plain``."""
    for module in backbone.modules():
        for cls, name in ((KernelLinear, "kernel"), (PackedLinear, "onednn"), (Int8Linear, "int8")):
            if isinstance(module, cls):
                return name
    return "plain"


def set_weight_layout(backbone: nn.Module, layout: str = "auto") -> str:
    """Switch every bf16 linear of the backbone to ``layout`` in place (``auto``: ``kernel`` if it builds, else
    ``onednn``); values never change. Returns the layout now in place. Int8 backbones are left alone."""
    current = weight_layout(backbone)
    if current == "int8":
        return current
    if layout == "auto":
        layout = "kernel" if kernel_library() is not None else "onednn"
    if layout not in LAYOUTS:
        raise ValueError(f"unknown weight layout {layout!r}; expected one of {', '.join(LAYOUTS)} or auto")
    if layout == "kernel" and kernel_library() is None:
        layout = "onednn"
    if layout == current:
        return current
    for name, module in list(backbone.named_modules()):
        if isinstance(module, (KernelLinear, PackedLinear)):
            replacement: nn.Module = module.to_linear()
        elif isinstance(module, nn.Linear):
            replacement = module
        else:
            continue
        if layout == "onednn" and replacement.weight.dtype == torch.bfloat16:
            replacement = PackedLinear(replacement)
        elif layout == "kernel" and replacement.weight.dtype == torch.bfloat16:
            replacement = KernelLinear(replacement)
        if replacement is not module:
            parent_name, _, child = name.rpartition(".")
            setattr(backbone.get_submodule(parent_name) if parent_name else backbone, child, replacement)
    if getattr(backbone.config, "tie_word_embeddings", False) and layout != "onednn":
        head = backbone.get_output_embeddings()
        if head.weight is not backbone.get_input_embeddings().weight:  # a to_dense() copy after oneDNN: re-tie
            head.weight = backbone.get_input_embeddings().weight
    return layout


def pack_backbone(backbone: nn.Module) -> int:
    """Prepack every bf16 linear for oneDNN (the ``onednn`` layout); returns how many were packed."""
    set_weight_layout(backbone, "onednn")
    return sum(isinstance(m, PackedLinear) for m in backbone.modules())


def unpack_backbone(backbone: nn.Module) -> int:
    """Back to plain ``nn.Linear`` (exact); returns how many modules changed."""
    changed = sum(isinstance(m, (PackedLinear, KernelLinear)) for m in backbone.modules())
    set_weight_layout(backbone, "plain")
    return changed


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
        if isinstance(module, (nn.Linear, PackedLinear, KernelLinear)) and (include_lm_head or module is not lm_head)
    ]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = backbone.get_submodule(parent_name) if parent_name else backbone
        if isinstance(module, (PackedLinear, KernelLinear)):
            module = module.to_linear()
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
    model._layout_set = True  # int8 modules keep their own kernel
    model._decoders.clear()
    if model.batcher is not None:
        batcher = model.batcher
        model.enable_batching(batcher.window_s * 1000, batcher.max_batch, batcher.max_wait_s * 1000, batcher.continuous)
    return report


def backbone_weight_bytes(backbone: nn.Module) -> int:
    """Bytes of weights read per decoded token: every linear (float, or int8 + scales), norms and the LM head.

    The input embedding is excluded (a lookup reads one row per token) unless it is also the LM head (tied).
    """
    embedding = backbone.get_input_embeddings().weight
    lm_head = backbone.get_output_embeddings()
    tied = getattr(lm_head, "weight", None) is embedding
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
