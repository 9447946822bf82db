"""Request batching: requests that arrive within a few milliseconds of each other share one batched decode.

Decode reads every weight once per step whatever the batch size, so on a memory-bound machine eight rows cost
little more than one; for a small model (Eureka-mini) a step is mostly fixed per-call overhead, which batching
also shares. Each caller still gets its own result as soon as its row finishes (EOS, its own ``max_new_tokens``
or cancellation), not when the whole batch does.

No thread lives longer than the work: the first request that finds no runner starts one; the runner gathers for
``window_s`` (or until ``max_batch`` requests wait), decodes, repeats while requests are pending, then exits.
Callers announce a request while they prepare it (front-end, encoder, prefill embeddings: :meth:`preparing`), and
the runner waits up to ``max_wait_s`` for announced requests before it starts a batch: concurrent users finish
preparing at staggered times, and a request that misses a batch waits for the whole of it.
Only requests with identical decoding settings share a batch, and a seeded sampling request always runs alone so
its draws stay reproducible.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig

from .fast_decode import FastDecoder

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

    def group(self) -> tuple:
        """Requests with equal keys can share a decode: same processors, same stopping rule, same dtype/width."""
        c = self.config
        solo = next(_solo) if (c.do_sample and self.seed is not None) else None
        return (c.do_sample, c.temperature, c.top_p, c.top_k, c.repetition_penalty, c.eos_token_id, c.pad_token_id,
                self.ignore_eos, self.inputs_embeds.dtype, self.inputs_embeds.shape[-1], solo)


class Batcher:
    """Gathers concurrent :class:`BatchRequest` s into batched :meth:`FastDecoder.decode` calls."""

    def __init__(self, decoder: FastDecoder, pad_id: int, window_s: float = 0.005, max_batch: int = 8,
                 max_wait_s: float = 0.25):
        self.decoder = decoder
        self.pad_id = pad_id
        self.window_s = window_s
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._preparing = 0  # requests announced but not yet submitted
        self._pending: list[tuple[tuple, BatchRequest]] = []
        self._cond = threading.Condition()
        self._runner: threading.Thread | None = None
        self.batch_sizes: list[int] = []  # every batch decoded, for benchmarks and tests

    def run(self, request: BatchRequest) -> list[int]:
        """Submit and wait: the new token ids of this request (EOS included when it stopped there)."""
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
        """Announce a request for the duration of its preparation, so a starting batch can wait for it."""
        with self._cond:
            self._preparing += 1
        try:
            yield
        finally:
            with self._cond:
                self._preparing -= 1
                self._cond.notify_all()

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
            self._cond.wait_for(lambda: full() or self._preparing == 0, timeout=self.max_wait_s)
            self._cond.wait_for(full, timeout=self.window_s)
            key = self._pending[0][0]
            batch = [r for k, r in self._pending if k == key][: self.max_batch]
            self._pending = [(k, r) for k, r in self._pending if all(r is not b for b in batch)]
            return batch

    def _loop(self) -> None:
        while batch := self._take_batch():
            try:
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
        finally:
            for request in live:
                request.done.set()
