"""Our generation path: a hand-written decode loop over the backbone's forward, plus the audio-side shortcuts.

Why not ``generate()``: on this project's CPUs decode is bound by reading the weights once per token, and
``generate()`` adds work on top of that for every token — a growing ``DynamicCache`` (``torch.cat`` of every
layer's keys and values), per-step input preparation, mask building and stopping-criteria bookkeeping. The loop
here keeps what matters and drops the rest:

* a preallocated transformers ``StaticCache`` (no reallocation or concatenation while decoding), reused across
  calls from a small pool;
* the attention mask kept as one boolean ``[batch, 1, 1, cache_len]`` tensor updated in place, passed straight to
  the attention layers (the model's mask builder is skipped);
* transformers' own ``LogitsProcessor`` classes, in the order ``generate()`` applies them, so greedy and sampled
  tokens are the ones the reference path produces (same processors, same ``torch.multinomial`` draw);
* for small Qwen3 backbones, :class:`FusedQwen3Step`: the same decode step in about half the tensor operations
  (a 10 MB model spends most of a step in per-operation overhead, not in reading weights);
* on a CUDA device, :class:`CudaGraphStep`: the step replayed as one captured CUDA graph (a GPU reads the weights
  faster than Python can launch the step's kernels), and for greedy decodes :class:`GreedyStepGraph`: the step, the
  repetition penalty, the argmax and the loop's bookkeeping as one graph, so a token is one launch;
* optionally a ``torch.compile``-d decode step, graphed the same way on a GPU (measured in ``docs/performance.md``).

The audio side: :class:`EncoderCache` keeps encoder outputs per clip content (multi-turn QA and the routing view ask
several things about one clip), and :func:`encode_trimmed` runs the Whisper encoder only over the real frames of a
partial 30 s window (opt-in: the official model always sees the padded window, so quality may change).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import ThreadpoolController
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    PreTrainedModel,
    RepetitionPenaltyLogitsProcessor,
    StaticCache,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.streamers import BaseStreamer

CACHE_BUCKET = 256  # static caches are sized in multiples of this, so a few shapes serve every request


# --- decoding ---------------------------------------------------------------------------------------------------
def logits_processors(config: GenerationConfig, attention_mask: torch.Tensor) -> LogitsProcessorList:
    """The processors ``generate()`` builds for our settings, in its order (repetition penalty, then the warpers).

    The repetition penalty ignores each row's left padding exactly as ``generate()`` does (``prompt_ignore_length``
    from the attention mask), and also sees the prompt tokens, as in the official code.
    """
    processors = LogitsProcessorList()
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        padding = (attention_mask != 0).int().argmax(dim=1)
        penalty = RepetitionPenaltyLogitsProcessor(float(config.repetition_penalty), prompt_ignore_length=padding)
        processors.append(penalty)
    if config.do_sample:
        if config.temperature is not None and config.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k is not None and config.top_k != 0:
            processors.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
        if config.top_p is not None and config.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
    return processors


@functools.lru_cache(maxsize=1)
def _threadpools() -> ThreadpoolController:
    return ThreadpoolController()  # scans the loaded libraries once (~1 ms); limits are then cheap (~10 µs)


def one_openmp_thread() -> contextlib.AbstractContextManager:
    """Limit the calling thread's OpenMP pool (torch's intra-op threads) to one thread for a while; other threads
    keep theirs (OpenMP's thread count is per calling thread, unlike ``torch.set_num_threads``'s default for new
    threads). The continuous batcher decodes this way: a small model's decode step (the fused step: Eureka-mini) is
    per-operation overhead, which a second thread does not shorten — on the 2-core host, 128 steps at batch 8 took
    0.56 s on one thread and 0.66 s on two (best of 4); at batch 1, 362 vs 365 tokens/s (median of 8) — and the
    other core is then free for the next requests' preparation."""
    return _threadpools().limit(limits=1, user_api="openmp")


def supports_fast_decode(backbone: PreTrainedModel) -> bool:
    """The loop passes one full-attention mask to every layer; sliding-window or linear-attention layers need more."""
    layer_types = getattr(backbone.config, "layer_types", None)
    return bool(layer_types) and set(layer_types) == {"full_attention"}


# Decoder-only families whose layers take (hidden, attention_mask, position_embeddings, position_ids, cache,
# use_cache) and whose base model is embed_tokens → rotary_emb → layers → norm; for them a decode step can call the
# layers directly (see FastDecoder._layers_step). Others go through the model's own forward.
LAYER_WALK_MODEL_TYPES = {"qwen3", "qwen2", "llama", "mistral"}


# A fused step keeps concatenated copies of the q/k/v and gate/up weights; above this many bytes of linear weights a
# model's decode is bound by reading them (the official model: 3.4 GB), so the copy would cost memory for nothing.
FUSED_STEP_MAX_BYTES = 256 * 2**20
ROPE_TABLE_POSITIONS = 8192  # the fused step's cos/sin table; later positions ask the rotary module
# Inductor settings for a compiled decode step on a GPU: coordinate-descent tuning of its own kernels' block sizes
# (the norms, RoPE, SiLU and cache writes between the GEMVs) took the full model's batch-1 decode on an H200 from 504
# to 587 tokens/s, for ~30 s more compile (docs/performance.md, section c).
GPU_COMPILE_OPTIONS = {"coordinate_descent_tuning": True}


def _fused_linears(backbone: PreTrainedModel) -> list[torch.nn.Module]:
    return [m for layer in backbone.model.layers for m in (
        layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
        layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)]


def supports_fused_step(backbone: PreTrainedModel, any_size: bool = False) -> bool:
    """A Qwen3 with default RoPE, SiLU MLPs and plain bias-free ``nn.Linear`` weights (no kernel or int8 layout),
    small enough that a second, concatenated copy of its weights is cheap (unless ``any_size``)."""
    config = backbone.config
    rope = getattr(config, "rope_parameters", None) or {}
    if (config.model_type != "qwen3" or not supports_fast_decode(backbone) or config.hidden_act != "silu"
            or rope.get("rope_type", "default") != "default"):
        return False
    linears = _fused_linears(backbone)
    return all(type(m) is torch.nn.Linear and m.bias is None for m in linears) and (
        any_size or sum(m.weight.nbytes for m in linears) <= FUSED_STEP_MAX_BYTES)


def cuda_graphs_allowed() -> bool:
    """``$EUREKA_CUDA_GRAPHS`` is not 0 (the app sets 0 on ZeroGPU, which lends a GPU per call)."""
    return os.environ.get("EUREKA_CUDA_GRAPHS", "1") != "0"


def _fits_second_copy(backbone: PreTrainedModel) -> bool:
    """Whether the device has room for the fused step's concatenated weights, with as much again to spare."""
    free_bytes, _ = torch.cuda.mem_get_info(backbone.device)
    return free_bytes > 2 * sum(m.weight.nbytes for m in _fused_linears(backbone))


class FusedQwen3Step:
    """One Qwen3 decode step (one new token per row) in about half the tensor operations of the model's modules.

    Why: Eureka-mini's backbone is 10 MB; a decode step through its modules is ~100 small PyTorch calls per layer,
    each a few microseconds, so the step costs several times the weight reads. Here q/k/v and gate/up are one matmul
    each (concatenated weights, built once), q and k are normalised and rotated together, RoPE's cos/sin come from
    a table, and the new key/value go straight into the ``StaticCache`` slot. The arithmetic is the model's: the
    same RMSNorm in float32, the same rotation, SDPA with grouped heads; greedy tokens equal the module path's
    (tests/test_fast_decode.py). The weights are snapshotted: rebuild the decoder after changing them.

    ``graph_safe`` keeps every step on the device — no host read of the position or the cache slot — so the step
    can be captured as a CUDA graph or compiled whole; positions must then stay inside the table (``max_positions``).
    """

    def __init__(self, backbone: PreTrainedModel, graph_safe: bool = False):
        self.graph_safe = graph_safe
        config, inner = backbone.config, backbone.model
        self.lm_head, self.embed_tokens, self.rotary_emb = backbone.lm_head, inner.embed_tokens, inner.rotary_emb
        self.final_norm = inner.norm.weight
        self.eps = config.rms_norm_eps
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.intermediate = config.intermediate_size
        self.layers = []
        with torch.no_grad():
            for layer in inner.layers:
                attn, mlp = layer.self_attn, layer.mlp
                qk_norm = [attn.q_norm.weight.expand(self.n_heads, -1), attn.k_norm.weight.expand(self.n_kv_heads, -1)]
                self.layers.append((
                    layer.input_layernorm.weight,
                    torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
                    torch.cat(qk_norm),
                    attn.o_proj.weight,
                    layer.post_attention_layernorm.weight,
                    torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                    mlp.down_proj.weight,
                ))
            # The rotary module's own cos/sin for the first positions (at most ROPE_TABLE_POSITIONS: a long-context
            # config would otherwise cost hundreds of MB); sin's first half negated so that
            # rotate_half(x) * sin == x.roll(half) * signed_sin, exactly.
            dtype = self.final_norm.dtype
            n_positions = min(config.max_position_embeddings, ROPE_TABLE_POSITIONS)
            positions = torch.arange(n_positions, device=self.final_norm.device)[None]
            cos, sin = self.rotary_emb(torch.zeros(1, 1, dtype=dtype, device=positions.device), positions)
            self.cos, self.signed_sin = cos[0], sin[0].clone()
            self.signed_sin[:, : self.head_dim // 2] *= -1
        if graph_safe:
            # Plain tensors reached through an object are graph inputs to torch.compile; without this its CUDA
            # graphs would copy every one of them into a static buffer before each replay (~1 ms a step measured
            # on the full model, an H200).
            for tensor in [self.cos, self.signed_sin, *(t for layer in self.layers for t in layer)]:
                torch._dynamo.mark_static_address(tensor)

    @property
    def max_positions(self) -> int:
        return self.cos.shape[0]

    def norm(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Qwen3RMSNorm's arithmetic: float32 statistics, cast back, then the weight."""
        as_float = hidden.float()
        normed = as_float * torch.rsqrt(as_float.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * normed.to(hidden.dtype)

    def __call__(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor, cache: StaticCache
    ) -> torch.Tensor:
        slot = None if self.graph_safe else int(cache.layers[0].cumulative_length)

        def store(index: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            kv = cache.layers[index]
            if not kv.is_initialized:  # a cache no prefill has written to yet
                kv.lazy_initialization(key[:, :, None], value[:, :, None])
            if self.graph_safe:  # the slot is the layer's device-side counter
                kv.keys.index_copy_(2, kv.cumulative_length.view(1), key[:, :, None])
                kv.values.index_copy_(2, kv.cumulative_length.view(1), value[:, :, None])
                kv.cumulative_length.add_(1)
            else:
                kv.keys[:, :, slot] = key
                kv.values[:, :, slot] = value
                kv.cumulative_length += 1
            return kv.keys, kv.values

        return self._step(input_ids, position_ids, mask, store)

    def step_rows(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor,
        kv: Sequence[tuple[torch.Tensor, torch.Tensor]], slot: int,
    ) -> torch.Tensor:
        """The same step over plain key/value buffers (``[rows, kv_heads, length, head_dim]`` per layer, e.g. the
        first rows of a larger buffer): writes slot ``slot`` and attends over slots ``[0, slot]`` (``mask`` covers
        exactly those). The continuous batcher (``batcher.Batcher``) decodes through this."""

        def store(index: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            keys, values = kv[index]
            keys[:, :, slot] = key
            values[:, :, slot] = value
            return keys[:, :, : slot + 1], values[:, :, : slot + 1]

        return self._step(input_ids, position_ids, mask, store)

    def _step(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor,
        store: Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        batch, n_qk, head_dim = input_ids.shape[0], self.n_heads + self.n_kv_heads, self.head_dim
        hidden = self.embed_tokens(input_ids)
        if self.graph_safe or int(position_ids.max()) < self.cos.shape[0]:
            cos, sin = self.cos[position_ids], self.signed_sin[position_ids]  # [batch, 1, head_dim]
        else:  # past the table: the module's own (unsigned) sin, applied with rotate_half's sign below
            cos, sin = self.rotary_emb(hidden, position_ids)
            sin = torch.cat([-sin[..., : head_dim // 2], sin[..., head_dim // 2 :]], -1)
        for index, (in_norm, qkv, qk_norm, out_proj, post_norm, gate_up, down) in enumerate(self.layers):
            qk, value = F.linear(self.norm(hidden, in_norm), qkv).split(
                [n_qk * head_dim, self.n_kv_heads * head_dim], -1)
            qk = self.norm(qk.view(batch, n_qk, head_dim), qk_norm)
            qk = qk * cos + qk.roll(head_dim // 2, -1) * sin
            query, key = qk.split([self.n_heads, self.n_kv_heads], 1)
            keys, values = store(index, key, value.view(batch, self.n_kv_heads, head_dim))
            attended = F.scaled_dot_product_attention(query[:, :, None], keys, values, attn_mask=mask,
                                                      scale=head_dim**-0.5, enable_gqa=True)
            hidden = hidden + F.linear(attended.view(batch, 1, -1), out_proj)
            gate, up = F.linear(self.norm(hidden, post_norm), gate_up).split([self.intermediate] * 2, -1)
            hidden = hidden + F.linear(F.silu(gate) * up, down)
        return self.lm_head(self.norm(hidden[:, -1], self.final_norm))


class CudaGraphStep:
    """Replays a captured CUDA graph of a decode step instead of launching its kernels one by one from Python.

    Why: at batch 1 a GPU reads the full model's 3.4 GB of bf16 weights in about a millisecond, while launching the
    step's ~1 000 kernels through the modules takes several; a graph replays them in one launch. One graph per
    KV cache and shape, kept on the cache object (its lifetime is the cache's, and the graph writes into that
    cache's tensors, whose addresses never change). The step's first call on a cache runs eagerly (the warm-up
    a capture needs) and returns that result; the capture itself executes nothing. The cache's position counter
    is a device tensor the graph advances, so a replay writes the right slot. The returned logits are the graph's
    output buffer: valid until the next replay, which the decode loop never reaches before using them.
    """

    def __init__(self, step_fn: Callable[..., torch.Tensor]):
        self.step_fn = step_fn

    def __call__(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor, cache: StaticCache
    ) -> torch.Tensor:
        if input_ids.device.type != "cuda":
            return self.step_fn(input_ids, position_ids, mask, cache)
        graphs = cache.__dict__.setdefault("_eureka_cuda_graphs", {})
        key = (tuple(input_ids.shape), tuple(mask.shape))
        captured = graphs.get(key)
        if captured is None:
            stream = torch.cuda.Stream(device=input_ids.device)
            stream.wait_stream(torch.cuda.current_stream(input_ids.device))
            with torch.cuda.stream(stream):
                logits = self.step_fn(input_ids, position_ids, mask, cache)  # the warm-up is this step's real work
            torch.cuda.current_stream(input_ids.device).wait_stream(stream)
            inputs = (input_ids.clone(), position_ids.clone(), mask.clone())
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                output = self.step_fn(*inputs, cache)
            graphs[key] = (graph, inputs, output)
            return logits
        graph, (static_ids, static_positions, static_mask), output = captured
        static_ids.copy_(input_ids)
        static_positions.copy_(position_ids)
        static_mask.copy_(mask)
        graph.replay()
        return output


class GreedyStepGraph:
    """A greedy decode step whole — the model step, its argmax, and the mask/position/slot bookkeeping — as one CUDA
    graph per KV cache, so a token costs a single graph launch and no other GPU work.

    Why: with only the model step graphed (:class:`CudaGraphStep`) every token still launched about ten small
    kernels from Python — the logits cast, argmax, pad substitution, token write, mask update, position increment
    and the graph's input copies — ≈0.1 ms a token on an H200, where the whole step is ≈1.8 ms. Here the state the
    next step needs stays in this object's device buffers (``ids``: the token to feed, then the step's pick); the
    host only copies each pick out. Stopping rules (EOS, per-row limits, cancellation) are applied on the host from
    those copies (:meth:`FastDecoder.decode`), a step late as in the overlapped loop. Greedy decodes take this path,
    with the repetition penalty (the official default, 1.05) applied in the graph: a ``[batch, vocab]`` mask of the
    tokens seen so far replaces ``RepetitionPenaltyLogitsProcessor``'s gather/scatter over the growing ids, with its
    float32 arithmetic, so the picks are the processor's. On a CPU the same operations run eagerly (what the tests
    check against the stepwise loop).
    """

    MAX_PER_CACHE = 4  # graphs (one per repetition penalty) kept on a cache; each holds a private memory pool

    def __init__(self, step_fn: Callable[..., torch.Tensor], cache: StaticCache, batch: int, length: int,
                 vocab: int, penalty: float | None, device: torch.device):
        self.step_fn, self.cache, self.penalty = step_fn, cache, penalty
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.kv_valid = torch.zeros(batch, length, dtype=torch.bool, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None

    @classmethod
    def for_cache(cls, step_fn: Callable[..., torch.Tensor], cache: StaticCache, batch: int, length: int,
                  vocab: int, penalty: float | None, device: torch.device) -> GreedyStepGraph:
        """The cache's graph for this step function and penalty (built on first use; it writes into that cache's
        tensors). A pool's caches serve one decoder, so the step function is always the same one."""
        graphs: OrderedDict = cache.__dict__.setdefault("_eureka_greedy_graphs", OrderedDict())
        if penalty not in graphs:  # the penalty is a constant of the captured kernels
            if len(graphs) >= cls.MAX_PER_CACHE:  # requests may carry any penalty: keep the recent few
                graphs.popitem(last=False)
            graphs[penalty] = cls(step_fn, cache, batch, length, vocab, penalty, device)
        graphs.move_to_end(penalty)
        return graphs[penalty]

    def start(self, prompt_ids: torch.Tensor, prompt_counted: torch.Tensor, first_ids: torch.Tensor,
              positions: torch.Tensor, kv_valid: torch.Tensor) -> None:
        """Load a decode's state after its prefill: the prompt ids ``[batch, prompt]`` and which of them the
        repetition penalty counts (not the left padding), the first picked ids ``[batch, 1]``, their positions and
        the prompt's valid cache slots; the first fed token goes to the slot after the prompt."""
        self.ids.copy_(first_ids)
        self.positions.copy_(positions)
        self.kv_valid.copy_(kv_valid)
        self.slot.fill_(prompt_ids.shape[1])
        self.seen.zero_()
        if self.penalty is not None:
            vocab = self.seen.shape[1]  # ids past the logits (never generated) go to a dropped extra column
            seen = torch.zeros(self.seen.shape[0], vocab + 1, dtype=torch.bool, device=self.seen.device)
            seen.scatter_(1, prompt_ids.clamp(max=vocab).masked_fill(~prompt_counted, vocab), True)
            self.seen.copy_(seen[:, :vocab]).scatter_(1, first_ids, True)

    def _advance(self) -> None:
        self.kv_valid.index_fill_(1, self.slot, True)
        scores = self.step_fn(self.ids, self.positions, self.kv_valid[:, None, None, :], self.cache).float()
        if self.penalty is not None:
            penalised = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
            scores = torch.where(self.seen, penalised, scores)
        self.ids.copy_(scores.argmax(-1, keepdim=True))
        if self.penalty is not None:
            self.seen.scatter_(1, self.ids, True)
        self.positions.add_(1)
        self.slot.add_(1)

    def advance(self) -> torch.Tensor:
        """Feed ``ids`` to the model and replace them with its greedy pick (returned: the buffer itself)."""
        if self.ids.device.type != "cuda":
            self._advance()
        elif self.graph is None:
            device = self.ids.device
            stream = torch.cuda.Stream(device=device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                self._advance()  # the warm-up a capture needs is this token's real work (and the step's compile)
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._advance()  # recorded, not run
            self.graph = graph
        else:
            self.graph.replay()
        return self.ids


class _CachePool:
    """A few idle ``StaticCache`` objects keyed by (batch, length); a decode takes one exclusively.

    Allocating a cache costs a memset of its whole size (≈90 MB for the full model at 768 positions); reusing
    one also keeps shapes stable for a compiled step.
    """

    def __init__(self, max_idle: int = 4):
        self.max_idle = max_idle
        self._idle: list[tuple[tuple[int, int], StaticCache]] = []
        self._lock = threading.Lock()

    def take(self, config, batch: int, length: int) -> StaticCache:
        key = (batch, length)
        with self._lock:
            for i, (k, cache) in enumerate(self._idle):
                if k == key:
                    del self._idle[i]
                    cache.reset()
                    return cache
        return StaticCache(config=config, max_cache_len=length)

    def give(self, batch: int, length: int, cache: StaticCache) -> None:
        with self._lock:
            self._idle.append(((batch, length), cache))
            del self._idle[: max(0, len(self._idle) - self.max_idle)]

    def clear(self) -> None:
        with self._lock:
            self._idle.clear()


StepHook = Callable[[int, torch.Tensor], "torch.Tensor | None"]


class FastDecoder:
    """Greedy/sampled decoding over a transformers causal LM with a static KV cache and no ``generate()``.

    ``decode`` takes the same inputs as ``generate(input_ids=…, inputs_embeds=…, attention_mask=…)`` (left-padded)
    and returns the same ``[batch, prompt + new]`` id tensor, so callers decode text the same way.
    """

    def __init__(
        self,
        backbone: PreTrainedModel,
        compile_step: bool = False,
        compile_mode: str | None = None,
        cuda_graphs: bool | None = None,
        fused: bool | None = None,
        overlap: bool | None = None,
        greedy_graphs: bool | None = None,
        compile_options: dict[str, Any] | None = None,
    ):
        """``cuda_graphs`` replays the step as a CUDA graph (:class:`CudaGraphStep`); ``None`` means "when the
        backbone is on a CUDA device, the step is not compiled with ``compile_mode="reduce-overhead"`` (torch.compile's
        own graphs, which cannot nest in ours) and ``$EUREKA_CUDA_GRAPHS`` is not 0" (the app sets it to 0 on ZeroGPU,
        which lends a GPU per call). A compiled step is compiled first, then graphed. ``fused`` picks
        :class:`FusedQwen3Step` over the module walk; ``None`` means "for small Qwen3 backbones, and on a GPU for any
        Qwen3 whose second copy fits"; ``True`` takes any size (its concatenated weights are a second copy of the
        backbone's linears), in a graph-safe form when the step is graphed or compiled. ``overlap`` queues each step
        before the host reads the previous token (``None``: on a CUDA device, where the GPU would otherwise idle
        while Python streams the token; on a CPU the extra step after a stop is pure cost). ``greedy_graphs`` runs
        greedy decodes (repetition penalty included) through :class:`GreedyStepGraph`, the step, penalty, argmax and
        bookkeeping as one CUDA graph; ``None`` means "when the step is graphed and fused"; it needs the fused step
        (on a CPU it runs the same loop eagerly). ``compile_options`` are inductor settings for ``torch.compile``
        instead of a ``compile_mode`` (:data:`GPU_COMPILE_OPTIONS`: the app's compiled engine on a GPU)."""
        if not supports_fast_decode(backbone):
            raise ValueError("FastDecoder needs a backbone whose layers are all full attention")
        self.backbone = backbone
        self.compile_step = compile_step
        self.pool = _CachePool()
        walkable = backbone.config.model_type in LAYER_WALK_MODEL_TYPES and hasattr(backbone, "model")
        self._module_step_fn = self._layers_step if walkable else self._forward
        self._step_fn = self._module_step_fn
        own_graphs_ok = compile_mode != "reduce-overhead"  # torch.compile's graphs cannot nest inside ours
        if cuda_graphs is None:
            cuda_graphs = backbone.device.type == "cuda" and own_graphs_ok and cuda_graphs_allowed()
        elif cuda_graphs and not own_graphs_ok:
            raise ValueError('compile_mode="reduce-overhead" brings its own CUDA graphs; leave cuda_graphs off')
        self.cuda_graphs = cuda_graphs
        self.overlap = backbone.device.type == "cuda" if overlap is None else overlap
        if fused is None:
            if cuda_graphs or compile_step:  # on a GPU, when the concatenated copy fits: 1.5x with graphs (H200)
                fused = backbone.device.type == "cuda" and supports_fused_step(backbone, any_size=True) and \
                    _fits_second_copy(backbone)
            else:
                fused = supports_fused_step(backbone)
        elif fused and not supports_fused_step(backbone, any_size=True):
            raise ValueError("the fused step needs a Qwen3 backbone with plain bias-free linears")
        self.max_step_positions: int | None = None  # past this, decode walks the modules (graph-safe table limit)
        graph_safe = bool(fused and (cuda_graphs or compile_step or greedy_graphs))
        if fused:
            self._step_fn = FusedQwen3Step(backbone, graph_safe=graph_safe)
            if graph_safe:
                self.max_step_positions = self._step_fn.max_positions
        if compile_step:
            # dynamic=False: one graph per (batch, cache length) bucket; the decode step's shapes never change.
            self._step_fn = torch.compile(self._step_fn, dynamic=False, mode=compile_mode, options=compile_options)
        if greedy_graphs is None:
            greedy_graphs = graph_safe and cuda_graphs
        elif greedy_graphs and not (graph_safe and own_graphs_ok):
            raise ValueError("greedy graphs need the fused step (a Qwen3 backbone) and no reduce-overhead compile")
        # the step a GreedyStepGraph captures: the fused graph-safe step, compiled when asked, not yet graphed
        self._greedy_step = self._step_fn if greedy_graphs else None
        if cuda_graphs:
            self._step_fn = CudaGraphStep(self._step_fn)

    @contextlib.contextmanager
    def module_step(self) -> Iterator[None]:
        """Decode through the backbone's modules instead of the fused step for a while (the benchmark measures the
        fused step against it in one run); not for use while other threads decode."""
        step_fn = self._step_fn
        self._step_fn = self._module_step_fn
        try:
            yield
        finally:
            self._step_fn = step_fn

    def _forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor, cache: StaticCache
    ) -> torch.Tensor:
        out = self.backbone(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask={"full_attention": mask},
            cache=cache,
            use_cache=True,
        )
        return out.logits[:, -1]

    def _layers_step(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor, cache: StaticCache
    ) -> torch.Tensor:
        """One decode step through the backbone's own modules, minus the model-level wrappers.

        Same modules, same order, same numbers as ``_forward`` (tested bit-for-bit); it skips what a one-token step
        does not need — output-capturing decorators, mask building, two ``ModelOutput`` objects — which is a large
        share of a step for a small model (≈40 % fewer Python calls on tiny-random).
        """
        inner = self.backbone.model
        hidden = inner.embed_tokens(input_ids)
        position_embeddings = inner.rotary_emb(hidden, position_ids)
        for layer in inner.layers:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings,
                           position_ids=position_ids, cache=cache, use_cache=True)
        return self.backbone.lm_head(inner.norm(hidden)[:, -1])

    def _prefill(self, inputs_embeds: torch.Tensor, positions: torch.Tensor, kv_valid: torch.Tensor,
                 cache: StaticCache) -> torch.Tensor:
        """Run a left-padded prompt into ``cache``: causal, padding excluded (a padding query attends to itself
        only, so no row is fully masked). Returns the logits for each row's first new token."""
        prompt_len, length = inputs_embeds.shape[1], kv_valid.shape[1]
        device = inputs_embeds.device
        causal = torch.ones(prompt_len, length, dtype=torch.bool, device=device).tril()
        prefill_mask = (causal[None] & kv_valid[:, None, :]) | torch.eye(
            prompt_len, length, dtype=torch.bool, device=device
        )[None]
        return self.backbone(
            inputs_embeds=inputs_embeds,
            position_ids=positions,
            attention_mask={"full_attention": prefill_mask[:, None]},
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]

    @property
    def joinable(self) -> bool:
        """Whether the step can decode rows that join a running batch (``FusedQwen3Step.step_rows``): the eager
        fused step. Graphed and compiled steps replay fixed shapes and a fixed cache, so they decode fixed batches."""
        return isinstance(self._step_fn, FusedQwen3Step) and not self._step_fn.graph_safe

    @torch.inference_mode()
    def prefill_one(
        self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, max_new_tokens: int
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """One unpadded prompt through the backbone, exactly as :meth:`decode` prefills it alone: its keys and
        values (``[kv_heads, prompt, head_dim]`` per layer) and the logits for its first new token."""
        prompt_len = input_ids.shape[0]
        length = -(-(prompt_len + max_new_tokens) // CACHE_BUCKET) * CACHE_BUCKET
        kv_valid = torch.zeros(1, length, dtype=torch.bool, device=inputs_embeds.device)
        kv_valid[:, :prompt_len] = True
        positions = torch.arange(prompt_len, device=inputs_embeds.device)[None]
        cache = self.pool.take(self.backbone.config, 1, length)
        try:
            logits = self._prefill(inputs_embeds[None], positions, kv_valid, cache)[0]
            kv = [(layer.keys[0, :, :prompt_len].clone(), layer.values[0, :, :prompt_len].clone())
                  for layer in cache.layers]
        finally:
            self.pool.give(1, length, cache)
        return kv, logits

    @property
    def step_rows(self) -> Callable[..., torch.Tensor]:
        """The fused step over plain key/value buffers (only when :attr:`joinable`)."""
        if not self.joinable:
            raise RuntimeError("this decoder's step cannot take joining rows")
        return self._step_fn.step_rows

    @torch.inference_mode()
    def decode(
        self,
        input_ids: torch.Tensor,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        config: GenerationConfig,
        max_new_tokens: Sequence[int] | None = None,
        streamer: BaseStreamer | None = None,
        on_step: StepHook | None = None,
        ignore_eos: bool = False,
    ) -> torch.Tensor:
        """Decode up to ``config.max_new_tokens`` (or per-row ``max_new_tokens``) tokens after a left-padded prompt.

        ``on_step(step, next_tokens)`` is called after every token with the batch's new ids (a CPU tensor); it may
        return a boolean ``[batch]`` tensor of rows to stop now (cancelled requests). Finished rows are filled with
        the pad id, as ``generate()`` does. ``ignore_eos`` keeps decoding past EOS (benchmarks want a fixed length).
        """
        device = inputs_embeds.device
        batch, prompt_len = input_ids.shape
        limits = torch.tensor(
            list(max_new_tokens) if max_new_tokens is not None else [config.max_new_tokens] * batch, device=device
        )
        total_new = int(limits.max())
        eos = config.eos_token_id
        eos_ids = torch.tensor([] if eos is None or ignore_eos else ([eos] if isinstance(eos, int) else list(eos)),
                               device=device, dtype=torch.long)
        pad = config.pad_token_id if config.pad_token_id is not None else (int(eos_ids[0]) if len(eos_ids) else 0)
        length = -(-(prompt_len + total_new) // CACHE_BUCKET) * CACHE_BUCKET
        processors = logits_processors(config, attention_mask)
        step_fn = self._step_fn
        if self.max_step_positions is not None and prompt_len + total_new > self.max_step_positions:
            step_fn = self._module_step_fn

        tokens = torch.full((batch, prompt_len + total_new), pad, dtype=torch.long, device=device)
        tokens[:, :prompt_len] = input_ids
        # kv_valid[b, j]: cache slot j holds a real token of row b. Slots past the current length stay False.
        kv_valid = torch.zeros(batch, length, dtype=torch.bool, device=device)
        kv_valid[:, :prompt_len] = attention_mask.bool()
        positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)

        if streamer is not None:  # the prompt first, as generate() does (skip_prompt streamers drop it)
            streamer.put(input_ids.cpu())
        # greedy (the only processor then is the repetition penalty, which the graph applies itself)
        greedy_graph = (self._greedy_step is not None and step_fn is not self._module_step_fn and not config.do_sample
                        and all(isinstance(p, RepetitionPenaltyLogitsProcessor) for p in processors) and total_new > 0)
        cache = self.pool.take(self.backbone.config, batch, length)
        try:
            logits = self._prefill(inputs_embeds, positions, kv_valid, cache)
            if greedy_graph:
                penalty = processors[0] if processors else None
                graph = GreedyStepGraph.for_cache(self._greedy_step, cache, batch, length, logits.shape[-1],
                                                  penalty.penalty if penalty else None, device)
                first_ids = processors(input_ids, logits.float()).argmax(-1, keepdim=True)
                counted = torch.ones_like(input_ids, dtype=torch.bool)
                if penalty is not None:  # the processor's own per-row count of left padding
                    counted = torch.arange(prompt_len, device=device)[None] >= penalty.prompt_ignore_length[:, None]
                graph.start(input_ids, counted, first_ids, positions[:, -1:] + 1, kv_valid)
                new_tokens = self._greedy_graph_loop(graph, total_new, limits.cpu(), eos_ids.cpu(), pad,
                                                     streamer, on_step)
                steps = new_tokens.shape[1]
                tokens[:, prompt_len: prompt_len + steps] = new_tokens.to(device)
                return tokens[:, : prompt_len + steps]
            unfinished = torch.ones(batch, dtype=torch.bool, device=device)
            next_pos = positions[:, -1:] + 1
            mask = kv_valid[:, None, None, :]
            steps = 0
            copied = torch.cuda.Event() if self.overlap and device.type == "cuda" else None

            def queue_next_step(step: int, next_tokens: torch.Tensor) -> None:
                nonlocal logits, next_pos
                kv_valid[:, prompt_len + step] = True
                logits = step_fn(next_tokens[:, None], next_pos, mask, cache)
                next_pos = next_pos + 1

            for step in range(total_new):
                scores = processors(tokens[:, : prompt_len + step], logits.float())
                if config.do_sample:
                    next_tokens = torch.multinomial(F.softmax(scores, dim=-1), num_samples=1).squeeze(1)
                else:
                    next_tokens = scores.argmax(dim=-1)
                next_tokens = torch.where(unfinished, next_tokens, pad)
                tokens[:, prompt_len + step] = next_tokens
                steps = step + 1
                if len(eos_ids):
                    unfinished &= ~torch.isin(next_tokens, eos_ids)
                unfinished &= limits > steps
                if self.overlap:
                    # Queue the next step before the host waits for this token: the GPU computes it while Python
                    # streams the token. A stop is then seen one step late; that step's result is dropped.
                    host_tokens = next_tokens.to("cpu", non_blocking=True)
                    host_unfinished = unfinished.to("cpu", non_blocking=True)  # a snapshot: the hook edits the original
                    if copied is not None:
                        copied.record()
                    if steps < total_new:
                        queue_next_step(step, next_tokens)
                    if copied is not None:
                        copied.synchronize()
                    running = bool(host_unfinished.any())
                else:
                    host_tokens = next_tokens.cpu() if streamer is not None or on_step is not None else None
                if streamer is not None:
                    streamer.put(host_tokens)
                if on_step is not None and (stop := on_step(step, host_tokens)) is not None:
                    unfinished &= ~stop.to(device)
                    if self.overlap:  # decided on the host copies: no wait for the queued step
                        running = bool((host_unfinished & ~stop.cpu().bool()).any())
                if not self.overlap:
                    running = bool(unfinished.any())
                if not running:
                    break
                if not self.overlap:
                    queue_next_step(step, next_tokens)
        finally:
            self.pool.give(batch, length, cache)
            if streamer is not None:
                streamer.end()
        return tokens[:, : prompt_len + steps]

    @staticmethod
    def _greedy_graph_loop(graph: GreedyStepGraph, total_new: int, limits: torch.Tensor, eos_ids: torch.Tensor,
                           pad: int, streamer: BaseStreamer | None, on_step: StepHook | None) -> torch.Tensor:
        """The host side of a :class:`GreedyStepGraph` decode: step *n + 1* is launched before token *n* is read
        (two pinned buffers, one event each), and the stopping rules of :meth:`decode` are applied to the copies.
        Returns the new tokens ``[batch, steps]`` on the CPU, finished rows padded."""
        on_gpu = graph.ids.device.type == "cuda"
        batch = graph.ids.shape[0]
        host = torch.empty(2, batch, dtype=torch.long, pin_memory=on_gpu)
        copied = [torch.cuda.Event(), torch.cuda.Event()] if on_gpu else None

        def copy_out(step: int) -> None:
            host[step % 2].copy_(graph.ids[:, 0], non_blocking=on_gpu)
            if copied is not None:
                copied[step % 2].record()

        copy_out(0)  # the prefill's pick, loaded by start()
        unfinished = torch.ones(batch, dtype=torch.bool)
        picked: list[torch.Tensor] = []
        for step in range(total_new):
            if step + 1 < total_new:
                graph.advance()
                copy_out(step + 1)
            if copied is not None:
                copied[step % 2].synchronize()
            next_tokens = torch.where(unfinished, host[step % 2], pad)
            picked.append(next_tokens)
            if len(eos_ids):
                unfinished &= ~torch.isin(next_tokens, eos_ids)
            unfinished &= limits > step + 1
            if streamer is not None:
                streamer.put(next_tokens)
            if on_step is not None and (stop := on_step(step, next_tokens)) is not None:
                unfinished &= ~stop.cpu().bool()
            if not unfinished.any():
                break
        return torch.stack(picked, 1)


# --- the audio side ---------------------------------------------------------------------------------------------
def clip_key(waveforms: Sequence[np.ndarray], n_mels: int, variant: str = "") -> str:
    """Content hash of a conversation's clips (in order) and the front-end/encoder settings that shape the output."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{n_mels}|{variant}|{len(waveforms)}".encode())
    for samples in waveforms:
        array = np.ascontiguousarray(samples, dtype=np.float32)
        digest.update(len(array).to_bytes(8, "little"))
        digest.update(array.tobytes())
    return digest.hexdigest()


class EncoderCache:
    """LRU map: clip content hash → encoder output (stacked frames); a second question about a clip skips the encoder.

    The encoder dominates time to first token for long clips (≈2× the prefill for the full model on a 30 s clip);
    the adapter is re-run on a hit (it is cheap), so routing traces are recomputed, not stored.
    """

    def __init__(self, max_items: int = 32, max_bytes: int = 512 * 2**20):
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: str, value: torch.Tensor) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.max_items or (
                len(self._items) > 1 and sum(v.nbytes for v in self._items.values()) > self.max_bytes
            ):
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def stats(self) -> dict[str, Any]:
        return {"items": len(self._items), "hits": self.hits, "misses": self.misses}


def _encoder_forward(encoder: torch.nn.Module, mel: torch.Tensor, blocks: int | None = None) -> torch.Tensor:
    """openai-whisper's ``AudioEncoder.forward`` without its full-window assertion: positions ``[0, frames)`` only.

    ``blocks``: stop after that many residual blocks and return the hidden state (no ``ln_post``): training caches it
    to fine-tune the remaining blocks (:func:`encoder_tail`).
    """
    x = F.gelu(encoder.conv1(mel))
    x = F.gelu(encoder.conv2(x))
    x = x.permute(0, 2, 1)
    x = (x + encoder.positional_embedding[: x.shape[1]]).to(x.dtype)
    for block in encoder.blocks[:blocks]:
        x = block(x)
    return x if blocks is not None else encoder.ln_post(x)


def encoder_tail(encoder: torch.nn.Module, hidden: torch.Tensor, blocks: int, chunk_frames: int = 1500) -> torch.Tensor:
    """[frames, d] hidden state after ``blocks`` blocks (from ``encode_trimmed(..., blocks=blocks)``) → the encoder's
    output: the remaining blocks and ``ln_post``, each 30 s chunk attending only to itself, as in one full pass."""
    outputs = []
    for chunk in hidden.split(chunk_frames):
        x = chunk[None]
        for block in encoder.blocks[blocks:]:
            x = block(x)
        outputs.append(encoder.ln_post(x)[0])
    return torch.cat(outputs)


def encode_trimmed(encoder: torch.nn.Module, log_mel: torch.Tensor, chunk_frames: int = 3000,
                   blocks: int | None = None) -> torch.Tensor:
    """[n_mels, frames] → [frames // 2, d]: full 30 s chunks as usual, the partial last one without its padding.

    The official model runs every chunk over the padded 30 s window (attention over silence included); this skips
    the padded frames — up to 3× less encoder work for a 10 s clip — at the cost of a distribution shift, so it is
    opt-in and its quality change is measured on Eureka-mini's evaluation (docs/performance.md). ``blocks``: return
    the hidden state after that many blocks instead (see :func:`_encoder_forward`).
    """
    dtype = encoder.conv1.weight.dtype
    n_full, rest = divmod(log_mel.shape[-1], chunk_frames)
    parts = []
    if n_full:
        full = log_mel[:, : n_full * chunk_frames].reshape(log_mel.shape[0], n_full, chunk_frames).permute(1, 0, 2)
        frames = _encoder_forward(encoder, full.contiguous().to(dtype), blocks)
        parts.append(frames.reshape(-1, frames.shape[-1]))
    if rest:
        tail = log_mel[None, :, n_full * chunk_frames :].to(dtype)
        parts.append(_encoder_forward(encoder, tail, blocks)[0])
    return torch.cat(parts)
