"""Request batching: requests that arrive within a few milliseconds of each other share one batched decode.

Decode reads every weight once per step whatever the batch size, so on a memory-bound machine eight rows cost
little more than one; for a small model (Eureka-mini) a step is mostly fixed per-call overhead, which batching
also shares. Each caller still gets its own result as soon as its row finishes (EOS, its own ``max_new_tokens``
or cancellation), not when the whole batch does.

No thread lives longer than the work: the first request that finds no runner starts one; the runner gathers for
``window_s`` (or until ``max_batch`` requests wait), decodes, repeats while requests are pending, then exits.
Callers announce a request while they prepare it (front-end, encoder, prefill embeddings: :meth:`preparing`), and
for a fixed batch the runner waits up to ``max_wait_s`` for announced requests before it starts: concurrent users
finish preparing at staggered times, and a request that misses a fixed batch waits for the whole of it.
Only requests with identical decoding settings share a batch, and a seeded sampling request always runs alone so
its draws stay reproducible.

Continuous batching (``continuous=True``, where the decoder's step can take joining rows: the eager fused Qwen3
step, i.e. Eureka-mini on a CPU): a request that arrives while a batch decodes joins it at the next step instead
of waiting for the whole batch, and a finished row's place is free for the next request at once. Why: clients that
send a request as soon as the last one returns otherwise move in lockstep — all prepare their clips (encoder, both
cores busy), then all decode (one core busy: a small model's decode step is Python and dispatch overhead) — and
with joining, one client's preparation overlaps the others' decoding. The caller prefills its own prompt (in its
thread, off the decode loop); the runner copies those keys and values into a free row of its buffers, in the slots
just before the current one (each row keeps its own RoPE positions, so where its slots lie does not matter), and
slides the live slots to the start of the buffers when half of the attended slots are dead or the end is reached.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import GenerationConfig

from .fast_decode import CACHE_BUCKET, FastDecoder, logits_processors, one_openmp_thread

_solo = itertools.count()


@dataclass(eq=False)
class BatchRequest:
    """One conversation, prepared: prompt ids and embeddings (unpadded), and how to decode it."""

    input_ids: torch.Tensor  # [prompt]
    inputs_embeds: torch.Tensor  # [prompt, hidden]
    config: GenerationConfig
    seed: int | None = None
    ignore_eos: bool = False
    on_token: Callable[[int], None] | None = None  # called in the runner thread for every new token of this row
    cancel: threading.Event | None = None
    tokens: list[int] = field(default_factory=list)
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    # continuous batching: the prompt's keys/values per layer and its first token's logits (FastDecoder.prefill_one)
    prefilled: tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor] | None = None

    @property
    def limit(self) -> int:
        return int(self.config.max_new_tokens)

    @property
    def seeded(self) -> bool:
        return bool(self.config.do_sample and self.seed is not None)

    def group(self) -> tuple:
        """Requests with equal keys can share a decode: same processors, same stopping rule, same dtype/width."""
        c = self.config
        solo = next(_solo) if self.seeded else None
        return (c.do_sample, c.temperature, c.top_p, c.top_k, c.repetition_penalty, c.eos_token_id, c.pad_token_id,
                self.ignore_eos, self.inputs_embeds.dtype, self.inputs_embeds.shape[-1], solo)


class Batcher:
    """Gathers concurrent :class:`BatchRequest` s into batched :meth:`FastDecoder.decode` calls."""

    def __init__(self, decoder: FastDecoder, pad_id: int, window_s: float = 0.005, max_batch: int = 8,
                 max_wait_s: float = 0.25, continuous: bool = True):
        """``continuous``: let requests join a running batch where the decoder supports it (``decoder.joinable``)."""
        self.decoder = decoder
        self.pad_id = pad_id
        self.window_s = window_s
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.continuous = continuous
        self._preparing = 0  # requests announced but not yet submitted
        self._prepare_lock = threading.Lock()
        self._pending: list[tuple[tuple, BatchRequest]] = []
        self._cond = threading.Condition()
        self._runner: threading.Thread | None = None
        self.batch_sizes: list[int] = []  # requests served by every batch decoded, for benchmarks and tests
        self.mean_rows: list[float] = []  # continuous batches: rows decoded per step, on average

    def run(self, request: BatchRequest) -> list[int]:
        """Submit and wait: the new token ids of this request (EOS included when it stopped there).

        For a continuous batch the prompt is prefilled here, in the caller's thread."""
        if self.joining and not request.seeded:
            with self._beside_decoding():
                request.prefilled = self.decoder.prefill_one(request.input_ids, request.inputs_embeds, request.limit)
        self.submit(request)
        request.done.wait()
        if request.error is not None:
            raise request.error
        return request.tokens

    def submit(self, request: BatchRequest) -> BatchRequest:
        with self._cond:
            self._pending.append((request.group(), request))
            if self._runner is None:
                self._runner = threading.Thread(target=self._loop, name="eureka-batcher", daemon=True)
                self._runner.start()
            self._cond.notify_all()
        return request

    @contextmanager
    def preparing(self) -> Iterator[None]:
        """Announce a request for the duration of its preparation, so a starting batch can wait for it.

        With joining, preparations run one at a time, first come first served: the encoder already uses every core,
        and one at a time the first request decodes while the next prepares, where eight at once would all finish
        together, leave the decode loop idle meanwhile, and keep the clients in lockstep."""
        with self._cond:
            self._preparing += 1
        try:
            with self._prepare_lock if self.joining else contextlib.nullcontext(), self._beside_decoding():
                yield
        finally:
            with self._cond:
                self._preparing -= 1
                self._cond.notify_all()

    def _beside_decoding(self) -> contextlib.AbstractContextManager:
        """While a continuous batch decodes (on one core), work in the callers' threads takes one OpenMP thread too:
        with two, its second thread fights the decode loop for its core and both slow down."""
        return one_openmp_thread() if self.joining and self._runner is not None else contextlib.nullcontext()

    @property
    def joining(self) -> bool:
        """Requests join running batches (continuous batching is on and the decoder supports it)."""
        return self.continuous and self.decoder.joinable

    @property
    def idle(self) -> bool:
        """No runner thread (the last batch has finished and nothing is pending)."""
        with self._cond:
            return self._runner is None

    def _take_batch(self) -> list[BatchRequest]:
        with self._cond:
            if not self._pending:  # nothing arrived while the last batch ran: the runner exits
                self._runner = None
                return []
            full = lambda: len(self._pending) >= self.max_batch  # noqa: E731
            if not self.joining:  # a continuous batch does not wait: latecomers join it
                self._cond.wait_for(lambda: full() or self._preparing == 0, timeout=self.max_wait_s)
            self._cond.wait_for(full, timeout=self.window_s)
            key = self._pending[0][0]
            batch = [r for k, r in self._pending if k == key][: self.max_batch]
            self._pending = [(k, r) for k, r in self._pending if all(r is not b for b in batch)]
            return batch

    def _loop(self) -> None:
        while batch := self._take_batch():
            try:
                if all(r.prefilled is not None for r in batch):
                    self._decode_continuously(batch)
                else:
                    self._decode(batch)
            except BaseException as exc:  # every waiting caller sees the failure
                for request in batch:
                    if not request.done.is_set():
                        request.error = exc
                        request.done.set()

    def _decode(self, batch: list[BatchRequest]) -> None:
        live = [r for r in batch if not (r.cancel is not None and r.cancel.is_set())]
        for request in batch:
            if request not in live:
                request.done.set()
        if not live:
            return
        self.batch_sizes.append(len(live))
        width = max(r.input_ids.shape[0] for r in live)
        first = live[0]
        device, hidden = first.inputs_embeds.device, first.inputs_embeds.shape[-1]
        input_ids = torch.full((len(live), width), self.pad_id, dtype=torch.long, device=device)
        inputs_embeds = torch.zeros(len(live), width, hidden, dtype=first.inputs_embeds.dtype, device=device)
        attention_mask = torch.zeros(len(live), width, dtype=torch.long, device=device)
        for i, request in enumerate(live):
            n = request.input_ids.shape[0]
            input_ids[i, width - n :] = request.input_ids
            inputs_embeds[i, width - n :] = request.inputs_embeds
            attention_mask[i, width - n :] = 1
        limits = [int(r.config.max_new_tokens) for r in live]
        eos = first.config.eos_token_id
        eos_ids = set() if eos is None or first.ignore_eos else ({eos} if isinstance(eos, int) else set(eos))
        active = [True] * len(live)

        def on_step(step: int, next_tokens: torch.Tensor) -> torch.Tensor:
            stop = torch.zeros(len(live), dtype=torch.bool)
            for i, (request, token) in enumerate(zip(live, next_tokens.tolist(), strict=True)):
                if not active[i]:
                    stop[i] = True
                    continue
                if request.cancel is not None and request.cancel.is_set():
                    active[i], stop[i] = False, True
                    request.done.set()
                    continue
                request.tokens.append(token)
                if request.on_token is not None:
                    request.on_token(token)
                if token in eos_ids or len(request.tokens) >= limits[i]:
                    active[i], stop[i] = False, True
                    request.done.set()
            return stop

        if first.seed is not None:
            torch.manual_seed(first.seed)
        try:
            self.decoder.decode(input_ids, inputs_embeds, attention_mask, first.config, max_new_tokens=limits,
                                on_step=on_step, ignore_eos=first.ignore_eos)
        except BaseException as exc:  # set before the callers wake below, or they would return partial tokens
            for request in live:
                if not request.done.is_set():
                    request.error = exc
            raise
        finally:
            for request in live:
                request.done.set()

    # --- continuous batching ----------------------------------------------------------------------------------
    def _admissible(self, key: tuple, rows: _Rows) -> list[BatchRequest]:
        """Pending requests that can join ``rows`` now, in arrival order; stops at the first that cannot (other
        settings, or too long for these buffers), so it runs next, once this batch drains, and is not starved."""
        joining = []
        with self._cond:
            while self._pending and rows.room > len(joining):
                pending_key, request = self._pending[0]
                if pending_key != key or request.prefilled is None or not rows.fits(request):
                    break
                joining.append(request)
                self._pending.pop(0)
        return joining

    @torch.inference_mode()
    def _decode_continuously(self, batch: list[BatchRequest]) -> None:
        """Decode ``batch`` while admitting same-settings requests that arrive, until no row is left.

        The loop runs on one OpenMP thread (``one_openmp_thread``), leaving the other core to the next request's
        preparation."""
        with one_openmp_thread():
            self._decode_rows(batch)

    def _decode_rows(self, batch: list[BatchRequest]) -> None:
        key = batch[0].group()
        slots = max(2 * _Rows.span(r) for r in batch)
        rows = _Rows(self.decoder, batch[0], len(batch), self.max_batch, max(slots, 4 * CACHE_BUCKET))
        run = len(self.batch_sizes)
        self.batch_sizes.append(0)  # counted as requests join, before any of them can finish
        steps, row_steps = 0, 0
        try:
            joining = batch
            while True:
                for request in joining:
                    if request.cancel is not None and request.cancel.is_set():
                        request.done.set()
                    else:
                        rows.admit(request)
                        self.batch_sizes[run] += 1
                if not rows.active:
                    break
                rows.choose_and_emit()
                if rows.active:
                    row_steps += rows.step()
                    steps += 1
                joining = self._admissible(key, rows)
        except BaseException as exc:  # every admitted caller sees the failure; the runner goes on serving
            for request in [*rows.requests(), *batch]:
                if not request.done.is_set():
                    request.error = exc
                    request.done.set()
        finally:
            self.mean_rows.append(round(row_steps / steps, 2) if steps else 0.0)


@dataclass(eq=False)
class _Row:
    request: BatchRequest
    first_slot: int  # where its prompt starts in the buffers
    new_tokens: int = 0


class _Rows:
    """A continuous batch: key/value buffers with a row per request and one write slot shared by all rows.

    A joining request's prompt goes into a free row, in the slots just before the write slot; every row keeps its
    own RoPE positions, and the attention mask (``valid``) marks each row's own slots. Rows are decoded as the first
    ``hi`` rows of the buffers (free rows below ``hi`` are computed and ignored). Attention reads slots up to the
    write slot, so when half of those are dead (their rows finished) or the write slot reaches the end, the live
    slots slide to the start; rows fit in half the buffer (``fits``), so a slide at the end frees at least half.
    The buffer holds twice the first requests' longest prompt + new tokens (at least 4 cache buckets, so longer
    later ones can join), and starts with a row per first request; rows are added as requests join, up to
    ``max_rows`` (one long request does not reserve eight rows of its length).
    """

    def __init__(self, decoder: FastDecoder, first: BatchRequest, n_rows: int, max_rows: int, slots: int):
        self.step_rows = decoder.step_rows
        self.max_rows = max_rows
        self.length = -(-slots // CACHE_BUCKET) * CACHE_BUCKET
        prompt_keys, first_logits = first.prefilled[0][0][0], first.prefilled[1]
        self.device = first.inputs_embeds.device

        def rows_of(*shape: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(n_rows, *shape, dtype=dtype, device=self.device)

        kv_shape = (prompt_keys.shape[0], self.length, prompt_keys.shape[-1])  # kv heads, slots, head dim
        self.kv = [(rows_of(*kv_shape, dtype=prompt_keys.dtype), rows_of(*kv_shape, dtype=prompt_keys.dtype))
                   for _ in range(decoder.backbone.config.num_hidden_layers)]
        self.valid = rows_of(self.length, dtype=torch.bool)
        self.logits = rows_of(first_logits.shape[-1], dtype=torch.float32)
        self.positions = rows_of(dtype=torch.long)
        self.next_tokens = rows_of(dtype=torch.long)
        self.rows: list[_Row | None] = [None] * n_rows
        self.slot = 0  # the slot the next step writes

        settings = first.config
        self.do_sample = bool(settings.do_sample)
        self.penalty = float(settings.repetition_penalty or 1.0)
        # what generate() sees: the prompt (padding excluded) and the new tokens; here as a per-row vocabulary mask
        self.seen = rows_of(first_logits.shape[-1], dtype=torch.bool) if self.penalty != 1.0 else None
        warpers_only = copy.deepcopy(settings)
        warpers_only.repetition_penalty = 1.0
        self.warpers = logits_processors(warpers_only, self.valid)
        eos = settings.eos_token_id
        self.eos_ids = set() if eos is None or first.ignore_eos else ({eos} if isinstance(eos, int) else set(eos))

    # --- bookkeeping
    @property
    def active(self) -> list[int]:
        return [i for i, row in enumerate(self.rows) if row is not None]

    @property
    def room(self) -> int:
        """How many more requests can join now (free rows, and rows not yet added)."""
        return sum(row is None for row in self.rows) + self.max_rows - len(self.rows)

    def _add_row(self) -> None:
        def grown(tensor: torch.Tensor) -> torch.Tensor:
            return torch.cat([tensor, torch.zeros_like(tensor[:1])])

        self.kv = [(grown(keys), grown(values)) for keys, values in self.kv]
        self.valid, self.logits = grown(self.valid), grown(self.logits)
        self.positions, self.next_tokens = grown(self.positions), grown(self.next_tokens)
        if self.seen is not None:
            self.seen = grown(self.seen)
        self.rows.append(None)

    def requests(self) -> list[BatchRequest]:
        return [row.request for row in self.rows if row is not None]

    @staticmethod
    def span(request: BatchRequest) -> int:
        """Slots a request can occupy: its prompt and every new token."""
        return request.input_ids.shape[0] + request.limit

    def fits(self, request: BatchRequest) -> bool:
        return 2 * self.span(request) <= self.length

    @property
    def live_start(self) -> int:
        """The first slot any live row uses (the write slot when no row is live)."""
        return min((row.first_slot for row in self.rows if row is not None), default=self.slot)

    def _slide(self, offset: int) -> None:
        """Move every live slot by ``offset`` (negative: towards the start)."""
        start = self.live_start
        source, target = slice(start, self.slot), slice(start + offset, self.slot + offset)
        for keys, values in self.kv:
            keys[:, :, target] = keys[:, :, source].clone()
            values[:, :, target] = values[:, :, source].clone()
        valid = self.valid[:, source].clone()
        self.valid.zero_()
        self.valid[:, target] = valid
        for row in self.rows:
            if row is not None:
                row.first_slot += offset
        self.slot += offset

    def _compact(self) -> None:
        """Slide the live slots to the start of the buffers."""
        if start := self.live_start:
            self._slide(-start)

    # --- the three phases of a step
    def admit(self, request: BatchRequest) -> None:
        """Put a prefilled request into the lowest free row; its first token is chosen with the others' next."""
        kv, logits = request.prefilled
        request.prefilled = None  # the buffers hold it now
        n = request.input_ids.shape[0]
        if None not in self.rows:
            self._add_row()
        index = self.rows.index(None)
        if not self.active:
            self.slot = 0
        if n > self.slot:  # too few slots before the write slot: make room
            self._compact()
            if n > self.slot:
                self._slide(n - self.slot)
        first = self.slot - n
        for (keys, values), (prompt_keys, prompt_values) in zip(self.kv, kv, strict=True):
            keys[index, :, first : self.slot] = prompt_keys
            values[index, :, first : self.slot] = prompt_values
        self.valid[index] = False
        self.valid[index, first : self.slot] = True
        self.positions[index] = n
        self.logits[index] = logits
        if self.seen is not None:
            self.seen[index] = False
            self.seen[index, request.input_ids] = True
        self.rows[index] = _Row(request, first)

    def choose_and_emit(self) -> None:
        """Pick every live row's next token (penalty, warpers, argmax or a draw: generate()'s order), hand it to
        its caller, and free the rows that are done (EOS, their own limit, or cancelled)."""
        hi = max(self.active) + 1
        scores = self.logits[:hi]
        if self.seen is not None:
            penalised = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
            scores = torch.where(self.seen[:hi], penalised, scores)
        scores = self.warpers(None, scores)
        if self.do_sample:
            tokens = torch.multinomial(F.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            tokens = scores.argmax(dim=-1)
        self.next_tokens[:hi] = tokens
        for index, token in enumerate(tokens.tolist()):
            row = self.rows[index]
            if row is None:
                continue
            request = row.request
            if request.cancel is not None and request.cancel.is_set():
                self._free(index)
                continue
            request.tokens.append(token)
            row.new_tokens += 1
            if self.seen is not None:
                self.seen[index, token] = True
            if request.on_token is not None:
                try:
                    request.on_token(token)
                except Exception as exc:  # this caller's failure (e.g. its stream) ends its row only
                    request.error = exc
                    self._free(index)
                    continue
            if token in self.eos_ids or row.new_tokens >= request.limit:
                self._free(index)

    def _free(self, index: int) -> None:
        self.rows[index].request.done.set()
        self.rows[index] = None
        self.valid[index] = False

    def step(self) -> int:
        """Decode one token for rows ``[0, hi)``; returns how many of them are live."""
        if self.slot >= self.length or 2 * self.live_start >= self.slot:
            self._compact()  # at the end of the buffers, or when half of the attended slots are dead
        hi = max(self.active) + 1
        slot = self.slot
        self.valid[:hi, slot] = True  # free rows too: a fully masked row would give NaN (ignored, but noisy)
        mask = self.valid[:hi, None, None, : slot + 1]
        kv = [(keys[:hi], values[:hi]) for keys, values in self.kv]
        self.logits[:hi] = self.step_rows(self.next_tokens[:hi, None], self.positions[:hi, None], mask, kv, slot)
        self.positions[:hi] += 1
        self.slot += 1
        return len(self.active)
