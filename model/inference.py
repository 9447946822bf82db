"""``EurekaAudio``: the object ``load_model`` returns — chat messages in, text (and routing traces) out.

Two generation engines give the same greedy tokens: ``"reference"`` is transformers' own ``generate()`` on the
backbone, fed ``inputs_embeds`` (how the official code runs); ``"fast"`` (the default) is ``fast_decode.FastDecoder``,
a static-cache decode loop without ``generate()``'s per-step overhead (``"compiled"`` adds ``torch.compile``).
Streaming is transformers' ``TextIteratorStreamer`` for both. What this file adds is the audio: front-end, encoder
(with a per-clip output cache), adapter, and the routing trace. ``enable_batching`` lets concurrent callers share
batched decodes (``batcher.Batcher``).
"""

from __future__ import annotations

import csv
import io
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from .audio import FRAMES_PER_TOKEN, SAMPLE_RATE, SAMPLES_PER_TOKEN, AudioFeatures, audio_features, chunk_log_mel
from .batcher import Batcher, BatchRequest
from .config import EurekaConfig
from .ctc import CTC_WEIGHT, MAX_RERANK_BEAMS, RERANK_BEAMS, ctc_log_likelihood, ctc_log_probs
from .fast_decode import (
    GPU_COMPILE_OPTIONS,
    EncoderCache,
    FastDecoder,
    clip_key,
    encode_trimmed,
    supports_fast_decode,
)
from .modeling import EurekaAudioModel, RouterOutput
from .prompts import Prompt, SpecialTokenIds, audio_items, build_prompt
from .quantize import can_pack, set_weight_layout, weight_layout
from .tokenizer import encode_plain_text

TOKEN_SECONDS = SAMPLES_PER_TOKEN / SAMPLE_RATE
ENGINES = ("fast", "compiled", "reference")
MAX_SCORED_REPLIES = 16  # candidate replies scored in one batch (a multiple-choice question has 4)


@dataclass
class GenerationSettings:
    """Decoding settings. ``temperature == 0`` means greedy (the reference CLI's default)."""

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 0.8
    top_k: int = 20
    repetition_penalty: float = 1.05
    seed: int | None = None
    # Transcription only: decode this many beams and keep the one the model's CTC head finds the audio spells best
    # (``model.ctc``; needs a checkpoint with a CTC head and greedy decoding). 0 or 1: off.
    ctc_beams: int = 0

    def to_generation_config(self, ids: SpecialTokenIds) -> GenerationConfig:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if not 0 <= self.ctc_beams <= MAX_RERANK_BEAMS:
            raise ValueError(f"ctc_beams must be between 0 (no re-ranking) and {MAX_RERANK_BEAMS}")
        if self.ctc_beams > 1 and self.temperature > 0:
            raise ValueError("ctc_beams re-ranks beam-search hypotheses; it needs temperature 0 (greedy)")
        sampling = self.temperature > 0
        extra = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k} if sampling else {}
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=sampling,
            repetition_penalty=self.repetition_penalty,
            eos_token_id=ids.im_end,
            pad_token_id=ids.pad,
            **extra,
        )


@dataclass
class RoutingTrace:
    """Per audio token: which experts the router chose, with what weights, and when in the clip it sits."""

    expert_ids: np.ndarray  # [tokens, top_k] int
    expert_weights: np.ndarray  # [tokens, top_k] float
    router_probs: np.ndarray  # [tokens, routed experts] float
    audio_index: np.ndarray  # [tokens] which audio of the conversation
    start_s: np.ndarray  # [tokens] start of the token's 80 ms span within its clip
    end_s: np.ndarray  # [tokens] end of that span (the last one stops at the clip's end)
    durations_s: list[float] = field(default_factory=list)

    @property
    def n_experts(self) -> int:
        return self.router_probs.shape[1]

    def entropy_bits(self) -> np.ndarray:
        """Router entropy per token in bits: 0 = certain, log2(E) = uniform."""
        probs = np.clip(self.router_probs, 1e-12, 1.0)
        return -(probs * np.log2(probs)).sum(axis=1)

    def expert_load(self) -> np.ndarray:
        """Share of top-k slots each expert received (sums to 1)."""
        counts = np.bincount(self.expert_ids.ravel(), minlength=self.n_experts)
        return counts / max(1, counts.sum())

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_experts": self.n_experts,
            "top_k": int(self.expert_ids.shape[1]),
            "durations_s": self.durations_s,
            "tokens": [
                {
                    "audio_index": int(self.audio_index[i]),
                    "start_s": round(float(self.start_s[i]), 4),
                    "end_s": round(float(self.end_s[i]), 4),
                    "expert_ids": self.expert_ids[i].tolist(),
                    "expert_weights": [round(float(w), 6) for w in self.expert_weights[i]],
                    "router_probs": [round(float(p), 6) for p in self.router_probs[i]],
                }
                for i in range(len(self.start_s))
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def to_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        k, n = self.expert_ids.shape[1], self.n_experts
        writer.writerow(
            ["audio_index", "start_s", "end_s"]
            + [f"expert_{j}" for j in range(k)]
            + [f"weight_{j}" for j in range(k)]
            + [f"prob_expert_{e}" for e in range(n)]
        )
        for i in range(len(self.start_s)):
            writer.writerow(
                [int(self.audio_index[i]), f"{self.start_s[i]:.3f}", f"{self.end_s[i]:.3f}"]
                + self.expert_ids[i].tolist()
                + [f"{w:.6f}" for w in self.expert_weights[i]]
                + [f"{p:.6f}" for p in self.router_probs[i]]
            )
        return buffer.getvalue()


def routing_trace(routing: RouterOutput, clips: list[AudioFeatures]) -> RoutingTrace:
    """Attach each routed token to its clip and 80 ms time span."""
    audio_index = np.concatenate([np.full(c.n_tokens, i) for i, c in enumerate(clips)]).astype(np.int64)
    local = np.concatenate([np.arange(c.n_tokens) for c in clips]).astype(np.float64)
    durations = np.array([c.duration_s for c in clips])
    return RoutingTrace(
        expert_ids=routing.expert_ids.cpu().numpy(),
        expert_weights=routing.expert_weights.float().cpu().numpy(),
        router_probs=routing.router_probs.float().cpu().numpy(),
        audio_index=audio_index,
        start_s=local * TOKEN_SECONDS,
        end_s=np.minimum((local + 1) * TOKEN_SECONDS, durations[audio_index]),
        durations_s=durations.tolist(),
    )


class _CancelOnEvent(StoppingCriteria):
    """Stops generation when a streaming consumer goes away (Stop button, closed browser tab)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


@dataclass
class PreparedInputs:
    """A batch ready for the backbone: left-padded embeddings, mask, and the routing of its audio."""

    input_ids: torch.Tensor
    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    traces: list[RoutingTrace | None]
    audio_embeds: list[torch.Tensor | None] = field(default_factory=list)  # per row, what the CTC head reads

    def generate_kwargs(self) -> dict[str, torch.Tensor]:
        # input_ids ride along so the repetition penalty also sees the prompt, as in the official code.
        return {"input_ids": self.input_ids, "inputs_embeds": self.inputs_embeds, "attention_mask": self.attention_mask}


def stack_rows(rows: list[torch.Tensor], row_ids: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Left-pad per-conversation embeddings and ids into one batch: (input_ids, inputs_embeds, attention_mask)."""
    width = max(row.shape[0] for row in rows)
    device, dtype, hidden = rows[0].device, rows[0].dtype, rows[0].shape[-1]
    inputs_embeds = torch.zeros(len(rows), width, hidden, dtype=dtype, device=device)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    for i, (row, ids) in enumerate(zip(rows, row_ids, strict=True)):
        inputs_embeds[i, width - row.shape[0] :] = row
        attention_mask[i, width - row.shape[0] :] = 1
        input_ids[i, width - row.shape[0] :] = ids
    return input_ids, inputs_embeds, attention_mask


class EurekaAudio:
    """In-process Eureka-Audio: ``generate`` / ``stream`` over official chat messages, plus routing traces."""

    def __init__(self, model: EurekaAudioModel, tokenizer, name: str = "eureka-audio"):
        self.model = model.keep_encoder_norms_float32().eval()
        self.tokenizer = tokenizer
        self.name = name
        self.special_ids = SpecialTokenIds.from_tokenizer(tokenizer)
        self.last_routing: RoutingTrace | list[RoutingTrace | None] | None = None
        # Default engine; "reference" stays callable per call (generate(..., engine="reference")) for comparisons.
        self.engine = "fast" if supports_fast_decode(self.model.backbone) else "reference"
        self.encoder_cache: EncoderCache | None = EncoderCache()
        # Encode only the real frames of a partial 30 s window: opt-in, or the model's own way (see EurekaConfig).
        self.trim_encoder = self.config.encoder_window == "trimmed"
        self.batcher: Batcher | None = None
        self._decoders: dict[bool, FastDecoder] = {}
        # CPU bf16 backbones: on first use the fast engine switches the linears to a decode layout
        # ("auto" = the AVX512-BF16 kernel, else oneDNN prepacking; "plain" keeps nn.Linear). See quantize.py.
        self.weight_layout = "auto"
        self._layout_set = False
        self._lock = threading.Lock()

    # --- facts about the loaded model -------------------------------------------------------------------------
    @property
    def config(self) -> EurekaConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.backbone.parameters()).dtype

    @property
    def asr_ctc_beams(self) -> int:
        """Beams transcription re-ranks by default: ``RERANK_BEAMS`` with a CTC head, else 0 (greedy)."""
        return RERANK_BEAMS if self.model.ctc_head is not None else 0

    def describe(self) -> dict[str, Any]:
        """Name, device, dtype and parameter counts, for headers and logs."""
        count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
        return {
            "name": self.name,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "parameters": count(self.model),
            "encoder_parameters": count(self.model.audio_encoder),
            "adapter_parameters": count(self.model.adapter),
            "backbone_parameters": count(self.model.backbone),
            "experts": f"{self.config.n_routed_experts} routed (top-{self.config.top_k}) + "
            f"{self.config.n_shared_experts} shared",
        }

    def save_pretrained(self, directory, dtype: torch.dtype | None = None) -> None:
        from .loading import save_pretrained

        save_pretrained(self, directory, dtype)

    # --- inputs -----------------------------------------------------------------------------------------------
    def features(self, source: Any) -> AudioFeatures:
        """Front-end for one clip (raises AudioInputError on bad input)."""
        return audio_features(source, self.config.n_mels, self.config.max_audio_seconds)

    def tokenize(self, messages: list[dict[str, Any]]) -> tuple[Prompt, list[AudioFeatures]]:
        """Load every audio in the conversation and lay out the prompt tokens."""
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of chat messages")
        clips = [self.features(source) for source in audio_items(messages)]
        prompt = build_prompt(
            messages,
            lambda text: encode_plain_text(self.tokenizer, text),
            self.special_ids,
            [clip.n_tokens for clip in clips],
        )
        context = int(self.config.backbone.get("max_position_embeddings") or 0)
        if context and len(prompt.input_ids) >= context:
            raise ValueError(f"the prompt is {len(prompt.input_ids)} tokens; the model's context is {context} "
                             "tokens. Shorten the text or the audio.")
        return prompt, clips

    @torch.inference_mode()
    def _encoder_output(self, clips: list[AudioFeatures]) -> torch.Tensor:
        """Stacked encoder frames for a conversation's clips, from the per-content cache when it holds them."""
        key = None
        if self.encoder_cache is not None:
            variant = f"trim={self.trim_encoder}"
            key = clip_key([clip.waveform for clip in clips], self.config.n_mels, variant)
            if (cached := self.encoder_cache.get(key)) is not None:
                return cached
        # As in the official code, a conversation's clips are concatenated in mel time, then cut into 30 s chunks.
        log_mel = torch.cat([clip.log_mel for clip in clips], dim=-1)
        n_tokens = log_mel.shape[-1] // FRAMES_PER_TOKEN
        if self.trim_encoder:
            frames = encode_trimmed(self.model.audio_encoder, log_mel.to(self.device))
            stacked = frames.reshape(-1, self.config.adapter_in_dim)[:n_tokens]
        else:
            stacked = self.model.encode_audio(chunk_log_mel(log_mel).to(self.device), n_tokens)
        if key is not None:
            self.encoder_cache.put(key, stacked)
        return stacked

    @torch.inference_mode()
    def _audio_embeddings(self, clips: list[AudioFeatures]) -> tuple[torch.Tensor, RouterOutput]:
        return self.model.adapter(self._encoder_output(clips))

    def prepare(self, conversations: list[list[dict[str, Any]]]) -> PreparedInputs:
        """Embed a batch of conversations, left-padded so every row ends where generation begins.

        With batching on, a single conversation is announced to the batcher while it is prepared."""
        batcher = self.batcher
        if batcher is None or len(conversations) != 1:
            return self._prepare(conversations)
        with batcher.preparing():
            return self._prepare(conversations)

    @torch.inference_mode()
    def _prepare(self, conversations: list[list[dict[str, Any]]]) -> PreparedInputs:
        rows, row_ids, traces, row_audio = [], [], [], []
        for messages in conversations:
            prompt, clips = self.tokenize(messages)
            input_ids = torch.tensor([prompt.input_ids], device=self.device)
            audio_embeds, trace = None, None
            if clips:
                audio_embeds, routing = self._audio_embeddings(clips)
                trace = routing_trace(routing, clips)
            rows.append(self.model.embed(input_ids, audio_embeds, self.special_ids.audio_pad)[0])
            row_ids.append(input_ids[0])
            traces.append(trace)
            row_audio.append(audio_embeds)
        return PreparedInputs(*stack_rows(rows, row_ids, self.special_ids.pad), traces, row_audio)

    # --- generation -------------------------------------------------------------------------------------------
    def _settings(self, settings: GenerationSettings | None, overrides: dict[str, Any]) -> GenerationSettings:
        base = settings or GenerationSettings()
        unknown = set(overrides) - set(GenerationSettings.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown generation settings: {', '.join(sorted(unknown))}")
        return GenerationSettings(**{**base.__dict__, **overrides})

    def _answer_ids(self, token_ids: torch.Tensor) -> list[int]:
        """Generated ids up to the end of the answer (``<|im_end|>``), padding dropped."""
        ids = token_ids.tolist()
        if self.special_ids.im_end in ids:
            ids = ids[: ids.index(self.special_ids.im_end)]
        return [t for t in ids if t != self.special_ids.pad]

    def _decode(self, token_ids: torch.Tensor) -> str:
        return self.tokenizer.decode(self._answer_ids(token_ids), skip_special_tokens=True)

    def _engine(self, engine: str | None) -> str:
        engine = engine or self.engine
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)}")
        if engine != "reference" and not supports_fast_decode(self.model.backbone):
            return "reference"
        return engine

    def decoder(self, compiled: bool = False) -> FastDecoder:
        """The static-cache decoder for this model (one eager, one compiled), built on first use.

        On a CPU with a bf16 backbone, first use also switches the linears to ``weight_layout`` (the decode kernel
        by default; values unchanged, see ``quantize.set_weight_layout``) — from then on both engines run them.
        """
        with self._lock:
            if compiled and weight_layout(self.model.backbone) not in ("plain", "int8"):
                raise ValueError("the compiled engine traces plain nn.Linear weights; this model's linears use the "
                                 f"{weight_layout(self.model.backbone)!r} layout (set weight_layout = 'plain' first)")
            if not compiled and not self._layout_set and can_pack(self.model.backbone):
                if self.weight_layout != "plain":
                    set_weight_layout(self.model.backbone, self.weight_layout)
                self._layout_set = True
            if compiled not in self._decoders:
                # On a GPU the compiled step is graphed too (greedy decodes as whole steps, GreedyStepGraph) and
                # its kernels tuned: 587 tokens/s for the full model on an H200, after a ~55 s compile per cache
                # length (docs/performance.md, section c).
                on_gpu = compiled and self.model.backbone.device.type == "cuda"
                self._decoders[compiled] = FastDecoder(self.model.backbone, compile_step=compiled,
                                                       compile_options=GPU_COMPILE_OPTIONS if on_gpu else None)
            return self._decoders[compiled]

    def enable_batching(self, window_ms: float = 5.0, max_batch: int = 8, max_wait_ms: float = 250.0,
                        continuous: bool = True) -> Batcher:
        """Let concurrent single-conversation ``generate``/``stream`` calls on the fast engine share batched decodes.

        With ``continuous`` (where the decoder supports it) a batch starts at once and later requests join it at
        the next step; otherwise a starting batch waits up to ``max_wait_ms`` for requests still being prepared and
        decodes to its end (see ``Batcher``)."""
        self.batcher = Batcher(self.decoder(), self.special_ids.pad, window_s=window_ms / 1000, max_batch=max_batch,
                               max_wait_s=max_wait_ms / 1000, continuous=continuous)
        return self.batcher

    def disable_batching(self) -> None:
        self.batcher = None

    def generate_ids(
        self,
        prepared: PreparedInputs,
        settings: GenerationSettings,
        engine: str | None = None,
        streamer: Any = None,
        cancel: threading.Event | None = None,
        ignore_eos: bool = False,
    ) -> torch.Tensor:
        """Prompt + new ids ``[batch, prompt + new]`` from either engine. ``ignore_eos`` decodes exactly
        ``max_new_tokens`` (benchmarks); ``cancel`` stops at the next token; ``streamer`` gets tokens as decoded."""
        engine = self._engine(engine)
        config = settings.to_generation_config(self.special_ids)
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        if settings.ctc_beams > 1 and not ignore_eos:
            return self._generate_reranked(prepared, config, settings.ctc_beams, streamer, cancel)
        if engine == "reference":
            if ignore_eos:
                config.eos_token_id = None
            extra = {"stopping_criteria": StoppingCriteriaList([_CancelOnEvent(cancel)])} if cancel else {}
            with torch.inference_mode():
                return self.model.backbone.generate(
                    **prepared.generate_kwargs(), generation_config=config, streamer=streamer, **extra
                )
        if self.batcher is not None and prepared.input_ids.shape[0] == 1 and engine == "fast":
            return self._generate_batched(prepared, settings, config, streamer, cancel, ignore_eos)
        hook = None
        if cancel is not None:
            batch = prepared.input_ids.shape[0]
            hook = lambda step, tokens: torch.full((batch,), cancel.is_set())  # noqa: E731
        return self.decoder(compiled=engine == "compiled").decode(
            prepared.input_ids, prepared.inputs_embeds, prepared.attention_mask, config,
            streamer=streamer, on_step=hook, ignore_eos=ignore_eos,
        )

    def _generate_reranked(self, prepared: PreparedInputs, config: GenerationConfig, beams: int, streamer: Any,
                           cancel: threading.Event | None) -> torch.Tensor:
        """Beam search on the backbone (transformers' ``generate``), then per row the hypothesis with the best
        LM log-probability + ``CTC_WEIGHT`` × CTC log-likelihood of the row's audio (see ``model.ctc``)."""
        head = self.model.ctc_head
        if head is None:
            raise ValueError(f"{self.name} has no CTC head, so it cannot re-rank beams (ctc_beams); use 0")
        rows = prepared.input_ids.shape[0]
        if len(prepared.audio_embeds) != rows or any(audio is None for audio in prepared.audio_embeds):
            raise ValueError("CTC re-ranking scores a transcription against its audio; a conversation has no audio")
        config.num_beams = config.num_return_sequences = beams
        config.output_scores = config.return_dict_in_generate = True
        extra = {"stopping_criteria": StoppingCriteriaList([_CancelOnEvent(cancel)])} if cancel else {}
        with torch.inference_mode():
            output = self.model.backbone.generate(**prepared.generate_kwargs(), generation_config=config, **extra)
            lm_scores = self.model.backbone.compute_transition_scores(
                output.sequences, output.scores, output.beam_indices, normalize_logits=False).sum(-1)
        prompt_length = prepared.input_ids.shape[1]
        chosen = []
        for row, audio in enumerate(prepared.audio_embeds):
            first = row * beams
            beam_ids = [self._answer_ids(output.sequences[first + i, prompt_length:]) for i in range(beams)]
            # The CTC head was trained on transcripts as the tokenizer spells them, so it scores that spelling.
            texts = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in beam_ids]
            spelled = [encode_plain_text(self.tokenizer, text) for text in texts]
            with torch.inference_mode():
                ctc_scores = ctc_log_likelihood(ctc_log_probs(head, audio).cpu(), spelled, self.special_ids.pad)
            scores = lm_scores[first : first + beams].float().cpu() + CTC_WEIGHT * ctc_scores
            chosen.append(beam_ids[int(scores.argmax())] + [self.special_ids.im_end])
        if streamer is not None:  # one piece: the transcription is only known once every beam has finished
            streamer.put(prepared.input_ids[:1].cpu())
            streamer.put(torch.tensor(chosen[0][:-1], dtype=torch.long))
            streamer.end()
        width = max(len(tokens) for tokens in chosen)
        new = torch.full((len(chosen), width), self.special_ids.pad, dtype=torch.long)
        for row, tokens in enumerate(chosen):
            new[row, : len(tokens)] = torch.tensor(tokens)
        return torch.cat([prepared.input_ids, new.to(prepared.input_ids.device)], dim=1)

    def _generate_batched(self, prepared, settings, config, streamer, cancel, ignore_eos) -> torch.Tensor:
        keep = prepared.attention_mask[0].bool()
        input_ids = prepared.input_ids[0, keep]
        request = BatchRequest(
            input_ids=input_ids, inputs_embeds=prepared.inputs_embeds[0, keep], config=config, seed=settings.seed,
            ignore_eos=ignore_eos, cancel=cancel,
            on_token=None if streamer is None else (lambda token: streamer.put(torch.tensor([token]))),
        )
        if streamer is not None:
            streamer.put(input_ids[None].cpu())
        try:
            tokens = self.batcher.run(request)
        finally:
            if streamer is not None:
                streamer.end()
        new = torch.tensor(tokens, dtype=torch.long, device=input_ids.device)
        return torch.cat([prepared.input_ids[0], new])[None]

    @torch.inference_mode()
    def generate(
        self,
        messages: list,
        settings: GenerationSettings | None = None,
        engine: str | None = None,
        **overrides: Any,
    ) -> str | list[str]:
        """Answer one conversation (→ str) or a batch of conversations (→ list[str]) in one call.

        Keyword overrides: max_new_tokens, temperature (0 = greedy), top_p, top_k, repetition_penalty, seed.
        ``engine`` picks ``"fast"`` (default), ``"compiled"`` or ``"reference"`` (transformers ``generate()``).
        The routing trace of the call is left in ``last_routing`` (a list for a batch).
        """
        batch = bool(messages) and isinstance(messages[0], list)
        conversations = messages if batch else [messages]
        settings = self._settings(settings, overrides)
        prepared = self.prepare(conversations)
        output_ids = self.generate_ids(prepared, settings, engine)
        texts = [self._decode(row[prepared.input_ids.shape[1] :]) for row in output_ids]
        self.last_routing = prepared.traces if batch else prepared.traces[0]
        return texts if batch else texts[0]

    def stream(
        self,
        messages: list[dict[str, Any]],
        settings: GenerationSettings | None = None,
        engine: str | None = None,
        **overrides: Any,
    ) -> Iterator[str]:
        """Yield text pieces as they are decoded; their concatenation equals ``generate``'s result.

        Closing the iterator early (a Stop button, a disconnected client) stops the generation thread.
        """
        settings = self._settings(settings, overrides)
        engine = self._engine(engine)
        prepared = self.prepare([messages])
        self.last_routing = prepared.traces[0]
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with torch.inference_mode():
                    self.generate_ids(prepared, settings, engine, streamer=streamer, cancel=cancel)
            except BaseException as exc:  # surfaced in the consumer's thread below
                errors.append(exc)
                streamer.end()

        worker = threading.Thread(target=run, name="eureka-generate", daemon=True)
        worker.start()
        try:
            for piece in streamer:
                if piece:
                    yield piece
        finally:
            cancel.set()
            worker.join()
        if errors:
            raise errors[0]

    @torch.inference_mode()
    def score_replies(self, messages: list[dict[str, Any]], replies: list[str]) -> list[float]:
        """The log-probability of each candidate assistant reply to ``messages``: its tokens and the end of turn,
        teacher-forced after the prompt, summed.

        Why: a multiple-choice question is best answered by the option the model finds likeliest, which is always one
        of the options; a small model answering freely can name an option letter with text that was not offered
        ("B. About 220 Hz" where B is "About 1970 Hz")."""
        if not replies or len(replies) > MAX_SCORED_REPLIES:
            raise ValueError(f"score 1 to {MAX_SCORED_REPLIES} replies, not {len(replies)}")
        prompt = self.prepare([messages]).inputs_embeds[0]  # one conversation: no padding
        reply_ids = [encode_plain_text(self.tokenizer, reply) + [self.special_ids.im_end] for reply in replies]
        width = max(len(ids) for ids in reply_ids)
        context = int(self.config.backbone.get("max_position_embeddings") or 0)
        if context and prompt.shape[0] + width > context:
            raise ValueError(f"the prompt and the longest reply are {prompt.shape[0] + width} tokens; the model's "
                             f"context is {context} tokens. Shorten the replies, the text or the audio.")
        targets = torch.full((len(replies), width), self.special_ids.pad, dtype=torch.long)
        for row, ids in enumerate(reply_ids):
            targets[row, : len(ids)] = torch.tensor(ids)
        targets = targets.to(self.device)
        reply_embeds = self.model.backbone.get_input_embeddings()(targets).to(prompt.dtype)
        inputs_embeds = torch.cat([prompt.expand(len(replies), -1, -1), reply_embeds], dim=1)
        # Right padding is harmless under causal attention: a reply's tokens never see the padding after them.
        logits = self.model.backbone(inputs_embeds=inputs_embeds).logits[:, prompt.shape[0] - 1 : -1].float()
        token_log_probs = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        lengths = torch.tensor([len(ids) for ids in reply_ids], device=self.device)
        in_reply = torch.arange(width, device=self.device) < lengths.unsqueeze(1)
        return (token_log_probs * in_reply).sum(dim=1).tolist()

    @torch.inference_mode()
    def embed_audio(self, sources: list[Any]) -> torch.Tensor:
        """Encoder + adapter only: the [tokens, hidden] embeddings the backbone reads for these clips, in order."""
        audio_embeds, _ = self._audio_embeddings([self.features(source) for source in sources])
        return audio_embeds

    @torch.inference_mode()
    def routing(self, sources: Any | list[Any]) -> RoutingTrace:
        """Encoder + adapter only: the router's decisions for one clip (or several, concatenated)."""
        clips = [self.features(s) for s in (sources if isinstance(sources, list) else [sources])]
        _, routing = self._audio_embeddings(clips)
        return routing_trace(routing, clips)
