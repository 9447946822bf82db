"""The optimised paths give the reference path's answers: static-cache decode, batching, streaming, cancellation,
encoder cache, int8 weights (within a stated tolerance) and the trimmed-window encoder."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import noise, tone
from transformers.generation.streamers import BaseStreamer

from model import load_model, task_messages
from model.audio import chunk_log_mel
from model.batcher import BatchRequest
from model.config import EurekaConfig
from model.fast_decode import EncoderCache, clip_key, encode_trimmed, encoder_tail, logits_processors
from model.inference import GenerationSettings
from model.loading import MINI_DIR
from model.quantize import (
    Int8Linear,
    backbone_weight_bytes,
    gemv_bf16,
    kernel_library,
    quantize_int8,
    set_weight_layout,
    weight_layout,
)


def clip(seconds: float, freq: float = 440.0):
    return (tone(seconds, freq) + noise(seconds, amplitude=0.02), 16000)


CONVERSATIONS = [
    task_messages("asr", clip(0.7, 300)),
    task_messages("qa", clip(2.9, 900), question="How many beeps?\nA. one\nB. two\nC. three\nD. four"),
    task_messages("caption", clip(1.6, 2000)),
    task_messages("caption", clip(6.3, 150)),
]


@pytest.fixture()
def fresh():
    """A private tiny-random model for tests that change its state (batching, quantisation, trimming)."""
    return load_model("tiny-random")


def new_ids(model, messages, settings: GenerationSettings, engine: str, **kw) -> list[int]:
    prepared = model.prepare([messages])
    return model.generate_ids(prepared, settings, engine, **kw)[0, prepared.input_ids.shape[1]:].tolist()


# --- same tokens as the reference path ----------------------------------------------------------------------------
@pytest.mark.parametrize("penalty", [1.0, 1.05, 1.3])
def test_greedy_tokens_equal_reference(tiny, penalty: float) -> None:
    settings = GenerationSettings(max_new_tokens=48, repetition_penalty=penalty)
    for messages in CONVERSATIONS:
        assert new_ids(tiny, messages, settings, "fast") == new_ids(tiny, messages, settings, "reference")


def test_sampling_draws_equal_reference_with_a_seed(tiny) -> None:
    for temperature, top_p, top_k in [(0.7, 0.8, 20), (1.3, 1.0, 0), (1.0, 0.5, 5)]:
        settings = GenerationSettings(max_new_tokens=32, temperature=temperature, top_p=top_p, top_k=top_k, seed=11)
        for messages in CONVERSATIONS[1:3]:
            assert new_ids(tiny, messages, settings, "fast") == new_ids(tiny, messages, settings, "reference")


def test_processors_mirror_generate(tiny) -> None:
    """The processors we build are the ones generate() builds, in its order (same classes, same parameters)."""
    settings = GenerationSettings(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
    config = settings.to_generation_config(tiny.special_ids)
    mask = torch.ones(1, 5, dtype=torch.long)
    ours = logits_processors(config, mask)
    theirs = tiny.model.backbone._get_logits_processor(
        generation_config=tiny.model.backbone._prepare_generation_config(config)[0], input_ids_seq_length=5,
        model_kwargs={"attention_mask": mask})
    assert [type(p) for p in ours] == [type(p) for p in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert {k: v for k, v in vars(a).items() if not isinstance(v, torch.Tensor)} == \
            {k: v for k, v in vars(b).items() if not isinstance(v, torch.Tensor)}


def test_layer_walk_and_fused_steps_equal_the_model_forward(tiny, monkeypatch) -> None:
    """The layer walk is bit-for-bit the model's forward; the fused step (tiny's default) matches it to float
    rounding, with the same argmax — also past its RoPE table, where it falls back to the rotary module."""
    from transformers import StaticCache

    from model import fast_decode

    decoder = tiny.decoder()
    assert isinstance(decoder._step_fn, fast_decode.FusedQwen3Step)
    backbone = tiny.model.backbone
    ids, mask = torch.tensor([[5], [9]]), torch.ones(2, 1, 1, 16, dtype=torch.bool)
    far = fast_decode.ROPE_TABLE_POSITIONS + 5
    for pos in (torch.tensor([[3], [7]]), torch.tensor([[far], [far + 4]])):
        outputs = []
        for step in (decoder._forward, decoder._layers_step, decoder._step_fn):
            cache = StaticCache(config=backbone.config, max_cache_len=16)
            with torch.inference_mode():
                outputs.append([step(ids, pos, mask, cache), step(ids + 1, pos + 1, mask, cache)])
        for forward, walk, fused in zip(*outputs, strict=True):
            assert torch.equal(forward, walk)
            torch.testing.assert_close(fused, forward, rtol=1e-5, atol=1e-5)
            assert torch.equal(fused.argmax(-1), forward.argmax(-1))

    fused = decoder._step_fn
    with decoder.module_step():  # what the benchmark compares the fused step with
        assert decoder._step_fn == decoder._layers_step
    assert decoder._step_fn is fused

    monkeypatch.setattr(fast_decode, "FUSED_STEP_MAX_BYTES", 0)  # a big model: decode is bound by its weights
    plain = fast_decode.FastDecoder(backbone)
    assert plain._step_fn == plain._layers_step


def test_cuda_graph_step_is_chosen_on_cuda_only(tiny, monkeypatch) -> None:
    """On a CPU the fused step stays (graphs are a GPU thing). Asked for explicitly, the graph step passes through
    on CPU tensors, so the steps it would capture — the module walk, and the fused step in its graph-safe form
    (device-side cache slot and positions) — are checked here against the reference path's tokens, also where a
    decode runs past the graph-safe RoPE table and falls back to the module walk."""
    from model import fast_decode

    assert not tiny.decoder().cuda_graphs
    settings = GenerationSettings(max_new_tokens=24)
    config = settings.to_generation_config(tiny.special_ids)
    prepared = tiny.prepare(CONVERSATIONS[1:3])
    expected = tiny.generate_ids(prepared, settings, "reference")
    args = (prepared.input_ids, prepared.inputs_embeds, prepared.attention_mask, config)

    walk = fast_decode.FastDecoder(tiny.model.backbone, cuda_graphs=True)
    assert isinstance(walk._step_fn, fast_decode.CudaGraphStep) and walk._step_fn.step_fn == walk._layers_step
    assert torch.equal(walk.decode(*args), expected)

    fused = fast_decode.FastDecoder(tiny.model.backbone, cuda_graphs=True, fused=True)
    assert fused._step_fn.step_fn.graph_safe
    assert torch.equal(fused.decode(*args), expected)

    monkeypatch.setattr(fast_decode, "ROPE_TABLE_POSITIONS", prepared.input_ids.shape[1] + 8)
    short_table = fast_decode.FastDecoder(tiny.model.backbone, cuda_graphs=True, fused=True)
    assert short_table.max_step_positions == prepared.input_ids.shape[1] + 8
    assert torch.equal(short_table.decode(*args), expected)


class Collect(BaseStreamer):
    """Every streamer call, as lists."""

    def __init__(self):
        self.puts: list[list[int]] = []

    def put(self, value):
        self.puts.append(value.tolist())

    def end(self):
        pass


def test_overlapped_decode_equals_the_stepwise_one(tiny) -> None:
    """Queuing each step before the host reads the token (the CUDA default) changes no token, streamed token,
    per-row limit or cancellation — only that a stop is noticed one (discarded) step later."""
    from model import fast_decode

    backbone = tiny.model.backbone
    overlapped = fast_decode.FastDecoder(backbone, overlap=True)
    stepwise = fast_decode.FastDecoder(backbone, overlap=False)
    assert not tiny.decoder().overlap  # a CPU model steps
    config = GenerationSettings(max_new_tokens=40).to_generation_config(tiny.special_ids)
    prepared = tiny.prepare(CONVERSATIONS)
    args = (prepared.input_ids, prepared.inputs_embeds, prepared.attention_mask, config)

    def cancel_after(n):
        return lambda step, tokens: torch.full((tokens.shape[0],), step >= n)

    for kwargs in ({}, {"max_new_tokens": [3, 40, 17, 1]}, {"on_step": cancel_after(6)}, {"ignore_eos": True}):
        streamed = [Collect(), Collect()]
        ours = overlapped.decode(*args, streamer=streamed[0], **kwargs)
        theirs = stepwise.decode(*args, streamer=streamed[1], **kwargs)
        assert torch.equal(ours, theirs), kwargs
        assert streamed[0].puts == streamed[1].puts
    assert torch.equal(overlapped.decode(*args), tiny.generate_ids(prepared, GenerationSettings(max_new_tokens=40),
                                                                   "reference"))


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_step_graph_loop_equals_the_stepwise_one(tiny, penalty: float) -> None:
    """The greedy-graph loop (step, argmax and repetition penalty on the device, stopping rules on the host; eager on
    a CPU) gives the stepwise loop's tokens and streamed tokens, per-row limits and cancellation included, also on a
    second decode that reuses the pooled cache's state; sampled decodes keep the ordinary loop."""
    from model import fast_decode

    backbone = tiny.model.backbone
    graphed = fast_decode.FastDecoder(backbone, greedy_graphs=True)
    stepwise = fast_decode.FastDecoder(backbone, overlap=False)
    assert graphed._greedy_step is not None and stepwise._greedy_step is None  # a CPU default: no graphs
    settings = GenerationSettings(max_new_tokens=40, repetition_penalty=penalty)
    config = settings.to_generation_config(tiny.special_ids)
    prepared = tiny.prepare(CONVERSATIONS)
    args = (prepared.input_ids, prepared.inputs_embeds, prepared.attention_mask, config)

    def cancel_after(n):
        return lambda step, tokens: torch.full((tokens.shape[0],), step >= n)

    for kwargs in ({}, {}, {"max_new_tokens": [3, 40, 17, 1]}, {"on_step": cancel_after(6)}, {"ignore_eos": True}):
        streamed = [Collect(), Collect()]
        ours = graphed.decode(*args, streamer=streamed[0], **kwargs)
        assert torch.equal(ours, stepwise.decode(*args, streamer=streamed[1], **kwargs)), kwargs
        assert streamed[0].puts == streamed[1].puts
    (cache,) = [cache for _, cache in graphed.pool._idle]
    assert list(cache._eureka_greedy_graphs) == [None if penalty == 1.0 else penalty]
    expected = tiny.generate_ids(prepared, settings, "reference")
    assert torch.equal(graphed.decode(*args), expected)
    if penalty != 1.0:  # the penalty changes these tokens, so the graph's own penalty is what is checked
        plain = GenerationSettings(max_new_tokens=40, repetition_penalty=1.0)
        assert not torch.equal(expected, tiny.generate_ids(prepared, plain, "reference"))

    sampled = GenerationSettings(max_new_tokens=24, temperature=0.8, seed=3, repetition_penalty=penalty)
    torch.manual_seed(3)
    ours = graphed.decode(*args[:3], sampled.to_generation_config(tiny.special_ids))
    assert torch.equal(ours, tiny.generate_ids(prepared, sampled, "reference"))
    assert list(cache._eureka_greedy_graphs) == [None if penalty == 1.0 else penalty]  # no graph for sampling

    for other in (1.1, 1.2, 1.4, 1.5, 1.1):  # any penalty a request sends: only the most recent few are kept
        settings = GenerationSettings(max_new_tokens=4, repetition_penalty=other)
        graphed.decode(*args[:3], settings.to_generation_config(tiny.special_ids))
    assert list(cache._eureka_greedy_graphs) == [1.2, 1.4, 1.5, 1.1]


def test_compiled_greedy_graph_step_equals_reference(tiny) -> None:
    """The GPU's fastest form — the fused step compiled inside the greedy-graph loop — compiles here too (inductor's
    CPU backend) and gives the reference path's tokens. Settings that cannot combine are refused with a message."""
    from model import fast_decode

    backbone = tiny.model.backbone
    decoder = fast_decode.FastDecoder(backbone, compile_step=True, fused=True, greedy_graphs=True)
    settings = GenerationSettings(max_new_tokens=24)
    prepared = tiny.prepare(CONVERSATIONS[1:2])
    assert torch.equal(decoder.decode(prepared.input_ids, prepared.inputs_embeds, prepared.attention_mask,
                                      settings.to_generation_config(tiny.special_ids)),
                       tiny.generate_ids(prepared, settings, "reference"))
    with pytest.raises(ValueError, match="brings its own CUDA graphs"):
        fast_decode.FastDecoder(backbone, compile_step=True, compile_mode="reduce-overhead", cuda_graphs=True)
    with pytest.raises(ValueError, match="greedy graphs need the fused step"):
        fast_decode.FastDecoder(backbone, fused=False, greedy_graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the lent GPU machine)")
@pytest.mark.parametrize("tuned", [False, True])
def test_cuda_compiled_greedy_graphs_equal_reference(tuned: bool) -> None:
    """On the GPU: the compiled fused step inside the greedy graph (captured once per cache, replayed per token;
    ``tuned``: with the app's inductor options) gives the reference path's tokens in float32, with and without the
    repetition penalty, on a second decode that replays the captured graph and on a batch of two; the app's
    compiled engine is that path."""
    from model import fast_decode

    model = load_model("tiny-random", device="cuda")
    decoder = fast_decode.FastDecoder(model.model.backbone, compile_step=True, fused=True,
                                      compile_options=fast_decode.GPU_COMPILE_OPTIONS if tuned else None)
    assert decoder._greedy_step is not None and decoder.cuda_graphs
    for penalty in (1.0, 1.3):
        settings = GenerationSettings(max_new_tokens=40, repetition_penalty=penalty)
        config = settings.to_generation_config(model.special_ids)
        for conversations in ([CONVERSATIONS[1]], [CONVERSATIONS[1]], CONVERSATIONS[:2]):
            prepared = model.prepare(conversations)
            expected = model.generate_ids(prepared, settings, "reference")
            args = (prepared.input_ids, prepared.inputs_embeds, prepared.attention_mask, config)
            assert torch.equal(decoder.decode(*args), expected), (penalty, len(conversations))
            if tuned:
                assert torch.equal(model.generate_ids(prepared, settings, "compiled"), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the lent GPU machine)")
@pytest.mark.parametrize("fused", [False, True])
def test_cuda_graph_replays_equal_eager_steps(fused: bool, monkeypatch) -> None:
    """A replayed graph runs the eager step's kernels on the same cache: identical tokens, also on a second decode
    that reuses the pooled cache (and its graph) and on a batch of two. ``EUREKA_CUDA_GRAPHS=0`` (ZeroGPU) turns
    graphs off."""
    from model import fast_decode

    model = load_model("tiny-random", device="cuda")
    assert model.decoder().cuda_graphs and model.decoder().overlap
    monkeypatch.setenv("EUREKA_CUDA_GRAPHS", "0")
    assert not fast_decode.FastDecoder(model.model.backbone).cuda_graphs
    monkeypatch.delenv("EUREKA_CUDA_GRAPHS")
    graphed = fast_decode.FastDecoder(model.model.backbone, fused=fused)
    eager = fast_decode.FastDecoder(model.model.backbone, cuda_graphs=False, fused=fused)
    settings = GenerationSettings(max_new_tokens=40)
    config = settings.to_generation_config(model.special_ids)
    for conversations in ([CONVERSATIONS[1]], [CONVERSATIONS[1]], CONVERSATIONS[:2]):
        prepared = model.prepare(conversations)
        args = (prepared.input_ids, prepared.inputs_embeds, prepared.attention_mask, config)
        assert torch.equal(graphed.decode(*args), eager.decode(*args))
        assert torch.equal(model.decoder().decode(*args), model.generate_ids(prepared, settings, "reference"))


def test_batch_equals_single_calls(tiny) -> None:
    singles = [tiny.generate(c, max_new_tokens=24, engine="reference") for c in CONVERSATIONS]
    assert tiny.generate(CONVERSATIONS, max_new_tokens=24) == singles
    assert isinstance(tiny.last_routing, list) and len(tiny.last_routing) == len(CONVERSATIONS)


def test_ignore_eos_decodes_exactly_max_new_tokens(tiny) -> None:
    settings = GenerationSettings(max_new_tokens=70, repetition_penalty=1.0)
    for engine in ("fast", "reference"):
        assert len(new_ids(tiny, CONVERSATIONS[0], settings, engine, ignore_eos=True)) == 70


def test_stream_concatenates_to_generate(tiny) -> None:
    for messages in CONVERSATIONS[:3]:
        full = tiny.generate(messages, max_new_tokens=40)
        assert "".join(tiny.stream(messages, max_new_tokens=40)) == full
        assert full == tiny.generate(messages, max_new_tokens=40, engine="reference")


def test_unknown_engine_is_refused(tiny) -> None:
    with pytest.raises(ValueError, match="unknown engine"):
        tiny.generate(CONVERSATIONS[0], engine="warp")


@pytest.mark.skipif(not (MINI_DIR / "config.json").is_file(), reason="Eureka-mini is not bundled yet")
def test_mini_greedy_tokens_equal_reference() -> None:
    mini = load_model("mini")
    settings = GenerationSettings(max_new_tokens=64)
    for messages in CONVERSATIONS:
        assert new_ids(mini, messages, settings, "fast") == new_ids(mini, messages, settings, "reference")


# --- batching -----------------------------------------------------------------------------------------------------
def concurrent(model, conversations, **settings) -> list[str]:
    results: list[str | None] = [None] * len(conversations)
    barrier = threading.Barrier(len(conversations))

    def call(i: int) -> None:
        barrier.wait()
        results[i] = model.generate(conversations[i], **settings)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(conversations))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_batched_requests_equal_single_requests(fresh) -> None:
    singles = [fresh.generate(c, max_new_tokens=30) for c in CONVERSATIONS]
    batcher = fresh.enable_batching(window_ms=200, max_batch=8)
    assert concurrent(fresh, CONVERSATIONS, max_new_tokens=30) == singles
    assert max(batcher.batch_sizes) > 1
    deadline = time.time() + 5
    while not batcher.idle and time.time() < deadline:
        time.sleep(0.01)
    assert batcher.idle  # the runner thread exits when there is no work


def test_a_starting_batch_waits_for_requests_still_being_prepared(fresh) -> None:
    """Concurrent users finish preparing at different times; an announced request joins the batch instead of
    waiting for all of it. The wait is bounded by ``max_wait_ms`` when an announced request never arrives."""
    singles = [fresh.generate(c, max_new_tokens=12) for c in CONVERSATIONS[:2]]
    batcher = fresh.enable_batching(window_ms=1, max_batch=8, max_wait_ms=60_000, continuous=False)
    results: dict[int, str] = {}

    def call(i: int) -> None:
        results[i] = fresh.generate(CONVERSATIONS[i], max_new_tokens=12)

    first, second = (threading.Thread(target=call, args=(i,)) for i in range(2))
    with batcher.preparing():  # a third user still preparing holds the first request's batch
        first.start()
        time.sleep(0.5)
        assert first.is_alive() and batcher.batch_sizes == []
        second.start()
        deadline = time.time() + 30
        while len(batcher._pending) < 2 and time.time() < deadline:
            time.sleep(0.01)
    first.join(30), second.join(30)
    assert [results[0], results[1]] == singles and batcher.batch_sizes == [2]

    batcher.max_wait_s = 0.2
    with batcher.preparing():  # announced but never submitted: the batch starts after max_wait anyway
        started = time.time()
        assert fresh.generate(CONVERSATIONS[0], max_new_tokens=12) == singles[0]
        assert time.time() - started < 20
    assert batcher.batch_sizes == [2, 1]


@pytest.mark.parametrize(("continuous", "overlap"), [(True, False), (False, False), (False, True)])
def test_batched_rows_keep_their_own_limits_and_settings(fresh, continuous: bool, overlap: bool) -> None:
    """Continuous and fixed batches; fixed ones also with the decode overlapped (the CUDA default), where the
    batcher's per-row stops are decided on the host copies of the tokens."""
    expected = [fresh.generate(c, max_new_tokens=n) for c, n in zip(CONVERSATIONS, (5, 17, 40, 9), strict=True)]
    sampled = fresh.generate(CONVERSATIONS[1], max_new_tokens=12, temperature=0.9, seed=4)
    fresh.decoder().overlap = overlap
    fresh.enable_batching(window_ms=200, continuous=continuous)
    results: dict[int, str] = {}

    def call(i: int, **kw) -> None:
        results[i] = fresh.generate(CONVERSATIONS[i % 4], **kw)

    threads = [threading.Thread(target=call, args=(i,), kwargs={"max_new_tokens": n})
               for i, n in enumerate((5, 17, 40, 9))]
    threads.append(threading.Thread(target=call, args=(5,), kwargs={"max_new_tokens": 12, "temperature": 0.9,
                                                                    "seed": 4}))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [results[i] for i in range(4)] == expected
    assert results[5] == sampled  # a seeded sampling request runs alone, so its draws are reproducible


def wait_for_pending(batcher, n: int, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while len(batcher._pending) < n:
        assert time.time() < deadline, f"fewer than {n} requests queued after {timeout} s"
        time.sleep(0.01)


def batch_request(model, messages, max_new_tokens: int, on_token=None) -> BatchRequest:
    """A prepared greedy request for the batcher directly (what ``generate`` builds for one conversation)."""
    prepared = model.prepare([messages])
    config = model._settings(None, {"max_new_tokens": max_new_tokens}).to_generation_config(model.special_ids)
    return BatchRequest(input_ids=prepared.input_ids[0], inputs_embeds=prepared.inputs_embeds[0], config=config,
                        on_token=on_token)


def explode(token: int) -> None:
    raise RuntimeError("the client went away")


def submit_held(model, messages, max_new_tokens: int, release: threading.Event):
    """Submit a request whose first token blocks the batcher's loop until ``release`` is set (so others can be
    queued while it is known to be running); returns, once it is running, the request and the thread waiting for it.
    (Returning before its first token let a test queue others while the held request itself was still pending.)"""
    running = threading.Event()

    def hold(token: int) -> None:
        running.set()
        release.wait(30)

    request = batch_request(model, messages, max_new_tokens, on_token=hold)
    runner = threading.Thread(target=model.batcher.run, args=(request,))
    runner.start()
    assert running.wait(30), "the held request did not start within 30 s"
    return request, runner


def test_requests_join_a_running_batch_and_equal_single_requests(fresh) -> None:
    """Continuous batching: requests that arrive while a batch decodes join it at the next step (one run serves
    them all) and each gets exactly its single-request tokens, whatever slots its prompt landed in."""
    singles = {i: new_ids(fresh, CONVERSATIONS[i], GenerationSettings(max_new_tokens=n), "fast")
               for i, n in ((0, 60), (1, 25), (2, 40), (3, 9))}
    batcher = fresh.enable_batching(window_ms=1)
    assert batcher.joining
    release = threading.Event()
    first, runner = submit_held(fresh, CONVERSATIONS[0], 60, release)
    results: dict[int, list[int]] = {}

    def call(i: int, n: int) -> None:
        results[i] = new_ids(fresh, CONVERSATIONS[i], GenerationSettings(max_new_tokens=n), "fast")

    callers = [threading.Thread(target=call, args=(i, n)) for i, n in ((1, 25), (2, 40), (3, 9))]
    for caller in callers:
        caller.start()
    wait_for_pending(batcher, 3)
    release.set()
    runner.join(30)
    for caller in callers:
        caller.join(30)
    assert first.tokens == singles[0]
    assert {i: results[i] for i in (1, 2, 3)} == {i: singles[i] for i in (1, 2, 3)}
    deadline = time.time() + 10
    while not batcher.idle and time.time() < deadline:  # the run's statistics are written as it ends
        time.sleep(0.01)
    assert batcher.batch_sizes == [4] and batcher.mean_rows[0] > 1


def test_continuous_batch_slides_its_buffers_without_changing_tokens(fresh, monkeypatch) -> None:
    """A queue of requests keeps one batch of 2 rows running far past the end of its buffers: the live slots slide
    to the start (64-slot buckets here, so it happens several times) and every request still gets its own tokens.
    The loop runs in the test's thread over a pre-filled queue, so the schedule is the same on every run."""
    import model.batcher as batcher_module

    monkeypatch.setattr(batcher_module, "CACHE_BUCKET", 64)
    slides: list[int] = []
    original = batcher_module._Rows._slide
    monkeypatch.setattr(batcher_module._Rows, "_slide", lambda rows, offset: (slides.append(offset),
                                                                                original(rows, offset)))
    plan = [(3, 40)] + [(k % 4, 6 + (7 * k) % 40) for k in range(15)]
    expected = [new_ids(fresh, CONVERSATIONS[i], GenerationSettings(max_new_tokens=n), "fast") for i, n in plan]
    batcher = fresh.enable_batching(max_batch=2)
    requests = []
    for i, n in plan:
        request = batch_request(fresh, CONVERSATIONS[i], n)
        request.prefilled = batcher.decoder.prefill_one(request.input_ids, request.inputs_embeds, n)
        requests.append(request)
    batcher._pending = [(r.group(), r) for r in requests[2:]]
    batcher._decode_continuously(requests[:2])
    assert [r.tokens for r in requests] == expected
    assert batcher.batch_sizes == [len(plan)] and sum(offset < 0 for offset in slides) >= 2


def test_continuous_batch_samples_through_the_warpers(fresh) -> None:
    """Unseeded sampling joins continuous batches; with top_k=1 every draw must be the argmax after the penalty and
    temperature, so the sampled answers equal the greedy ones — a check that the warpers and the draw are applied
    to the right rows."""
    greedy = [fresh.generate(c, max_new_tokens=20) for c in CONVERSATIONS]
    batcher = fresh.enable_batching(window_ms=100)
    assert concurrent(fresh, CONVERSATIONS, max_new_tokens=20, temperature=0.7, top_k=1) == greedy
    assert batcher.joining and max(batcher.batch_sizes) > 1


@pytest.mark.parametrize("continuous", [True, False])
def test_a_failing_batch_reports_to_its_callers_and_the_batcher_keeps_serving(fresh, continuous: bool) -> None:
    """A failure inside a batch (here a caller's token callback raising) reaches every caller in it as an
    exception, not a hang; the next request is served normally."""
    expected = fresh.generate(CONVERSATIONS[0], max_new_tokens=8)
    batcher = fresh.enable_batching(window_ms=1, continuous=continuous)
    request = batch_request(fresh, CONVERSATIONS[1], 8, on_token=explode)
    with pytest.raises(RuntimeError, match="the client went away"):
        batcher.run(request)
    assert fresh.generate(CONVERSATIONS[0], max_new_tokens=8) == expected


def test_a_failing_caller_ends_only_its_own_row_of_a_continuous_batch(fresh) -> None:
    expected = new_ids(fresh, CONVERSATIONS[0], GenerationSettings(max_new_tokens=30), "fast")
    batcher = fresh.enable_batching(window_ms=1)
    release = threading.Event()
    held, runner = submit_held(fresh, CONVERSATIONS[0], 30, release)
    failing = batch_request(fresh, CONVERSATIONS[1], 30, on_token=explode)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            batcher.run(failing)
        except RuntimeError as exc:
            errors.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    wait_for_pending(batcher, 1)
    release.set()
    caller.join(30), runner.join(30)
    assert [str(e) for e in errors] == ["the client went away"] and failing.tokens == [failing.tokens[0]]
    assert held.error is None and held.tokens == expected and batcher.batch_sizes == [2]


def test_a_request_with_other_settings_is_not_overtaken(fresh) -> None:
    """A queued request that cannot join the running batch (other settings) runs next; same-settings requests that
    arrive after it wait behind it instead of joining the running batch ahead of it."""
    expected_other = fresh.generate(CONVERSATIONS[1], max_new_tokens=10, repetition_penalty=1.3)
    expected_same = fresh.generate(CONVERSATIONS[2], max_new_tokens=10)
    batcher = fresh.enable_batching(window_ms=1)
    release = threading.Event()
    _, runner = submit_held(fresh, CONVERSATIONS[0], 30, release)
    results: dict[str, str] = {}
    other = threading.Thread(target=lambda: results.update(
        other=fresh.generate(CONVERSATIONS[1], max_new_tokens=10, repetition_penalty=1.3)))
    other.start()
    wait_for_pending(batcher, 1)
    same = threading.Thread(target=lambda: results.update(same=fresh.generate(CONVERSATIONS[2], max_new_tokens=10)))
    same.start()
    wait_for_pending(batcher, 2)
    release.set()
    for thread in (runner, other, same):
        thread.join(30)
    assert results == {"other": expected_other, "same": expected_same}
    assert batcher.batch_sizes == [1, 1, 1]


def test_batched_stream_equals_generate_and_cancels(fresh) -> None:
    expected = fresh.generate(CONVERSATIONS[2], max_new_tokens=40)
    expected_long = fresh.generate(CONVERSATIONS[3], max_new_tokens=200, repetition_penalty=1.0)
    batcher = fresh.enable_batching(window_ms=5)
    assert "".join(fresh.stream(CONVERSATIONS[2], max_new_tokens=40)) == expected
    batcher.window_s, batcher.max_batch = 30.0, 2  # the next two requests are gathered into one batch
    long_result: list[str] = []
    other = threading.Thread(target=lambda: long_result.append(
        fresh.generate(CONVERSATIONS[3], max_new_tokens=200, repetition_penalty=1.0)))
    other.start()
    stream = fresh.stream(CONVERSATIONS[1], max_new_tokens=400, repetition_penalty=1.0)
    next(stream)
    stream.close()  # returns once this row is dropped, while the other row keeps decoding
    other.join()
    assert batcher.batch_sizes[-1] == 2
    assert long_result == [expected_long]
    deadline = time.time() + 5
    while not batcher.idle and time.time() < deadline:
        time.sleep(0.01)
    assert batcher.idle


# --- encoder cache ------------------------------------------------------------------------------------------------
def test_encoder_cache_hit_returns_identical_results(fresh) -> None:
    audio = clip(4.2, 700)
    first = fresh.generate(task_messages("caption", audio), max_new_tokens=24)
    trace_first = fresh.last_routing
    assert fresh.encoder_cache.stats()["misses"] == 1
    second = fresh.generate(task_messages("caption", audio), max_new_tokens=24)
    assert fresh.encoder_cache.stats()["hits"] == 1
    assert second == first
    for field in ("expert_ids", "expert_weights", "router_probs", "start_s", "end_s"):
        assert (getattr(fresh.last_routing, field) == getattr(trace_first, field)).all()
    assert (fresh.routing(audio).expert_ids == trace_first.expert_ids).all()  # the routing view hits too
    fresh.encoder_cache = None
    assert fresh.generate(task_messages("caption", audio), max_new_tokens=24) == first


def test_encoder_cache_keys_content_and_settings() -> None:
    a, b = tone(1.0, 300), tone(1.0, 301)
    assert clip_key([a], 80) == clip_key([a.copy()], 80)
    assert clip_key([a], 80) != clip_key([b], 80)
    assert clip_key([a], 80) != clip_key([a], 128)
    assert clip_key([a, b], 80) != clip_key([b, a], 80)
    assert clip_key([a], 80, "trim=True") != clip_key([a], 80, "trim=False")
    cache = EncoderCache(max_items=2)
    for key in "xyz":
        cache.put(key, torch.zeros(3))
    assert cache.get("x") is None and cache.get("z") is not None and len(cache) == 2


# --- int8 ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 0.01), (torch.bfloat16, 0.02)])
def test_int8_linear_is_within_tolerance(dtype: torch.dtype, tolerance: float) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96).to(dtype)
    x = torch.randn(5, 3, 256, dtype=dtype)
    quantized = Int8Linear.from_linear(linear)
    with torch.no_grad():
        expected, got = linear(x).float(), quantized(x).float()
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert float((got - expected).abs().max() / expected.abs().max()) < tolerance
    torch.testing.assert_close(quantized.dequantized().float(), linear.weight.float(), atol=linear.weight.abs().max()
                               .item() / 127, rtol=0)


def test_int8_backbone_stays_close_to_float(fresh, tiny) -> None:
    """Stated tolerance on tiny-random: prefill logits within 6 % (max abs diff / max abs logit) and the
    teacher-forced top-1 token the same at ≥ 85 % of prompt positions; both engines agree on the int8 model."""
    info = quantize_int8(fresh)
    assert info["layers"] == 2 * 7 + 1 and info["weight_bytes_after"] < info["weight_bytes_before"] / 3
    for messages in CONVERSATIONS:
        a, b = tiny.prepare([messages]), fresh.prepare([messages])
        with torch.inference_mode():
            la = tiny.model.backbone(inputs_embeds=a.inputs_embeds).logits
            lb = fresh.model.backbone(inputs_embeds=b.inputs_embeds).logits
        assert float((la - lb).abs().max() / la.abs().max()) < 0.06
        assert float((la.argmax(-1) == lb.argmax(-1)).float().mean()) >= 0.85
        settings = GenerationSettings(max_new_tokens=24)
        assert new_ids(fresh, messages, settings, "fast") == new_ids(fresh, messages, settings, "reference")


# --- trimmed-window encoder ---------------------------------------------------------------------------------------
def test_trimmed_encoder_equals_full_window_on_whole_chunks(tiny) -> None:
    features = tiny.features(clip(30.0))
    with torch.inference_mode():
        full = tiny.model.audio_encoder(chunk_log_mel(features.log_mel))
        trimmed = encode_trimmed(tiny.model.audio_encoder, features.log_mel)
    torch.testing.assert_close(trimmed, full.reshape(-1, full.shape[-1]))


@pytest.mark.parametrize("blocks", [0, 1])
def test_encoder_tail_finishes_a_cached_hidden_state_exactly(tiny, blocks: int) -> None:
    """Training caches the hidden state after the first blocks and runs the rest per batch (``--encoder-layers``):
    together they must be the encoder inference runs, also across a 30 s chunk boundary (37 s clip)."""
    features = tiny.features(clip(37.0))
    with torch.inference_mode():
        whole = encode_trimmed(tiny.model.audio_encoder, features.log_mel)
        hidden = encode_trimmed(tiny.model.audio_encoder, features.log_mel, blocks=blocks)
        resumed = encoder_tail(tiny.model.audio_encoder, hidden, blocks)
    assert hidden.shape == whole.shape and not torch.equal(hidden, whole)
    torch.testing.assert_close(resumed, whole, rtol=0, atol=1e-5)


def test_trimmed_encoder_is_opt_in_and_keeps_shapes(fresh) -> None:
    messages = task_messages("caption", clip(7.3))
    full = fresh.prepare([messages]).inputs_embeds
    assert fresh.trim_encoder is False
    fresh.trim_encoder = True
    trimmed = fresh.prepare([messages]).inputs_embeds
    assert trimmed.shape == full.shape
    assert not torch.equal(trimmed, full)  # a different encoder input, so (slightly) different embeddings
    features = fresh.features(clip(37.0))
    with torch.inference_mode():
        out = encode_trimmed(fresh.model.audio_encoder, features.log_mel)
        whole = fresh.model.audio_encoder(chunk_log_mel(features.log_mel))
    assert out.shape[0] == features.log_mel.shape[-1] // 2
    torch.testing.assert_close(out[:1500], whole[0])  # the first, complete 30 s chunk is untouched


def test_a_model_trained_on_trimmed_windows_encodes_that_way_after_a_round_trip(tmp_path) -> None:
    """``encoder_window`` is part of the checkpoint's config: Eureka-mini (trained on trimmed windows) is run the
    way it was trained, without anyone setting ``trim_encoder``."""
    model = load_model("tiny-random")
    model.model.config.encoder_window = "trimmed"
    model.save_pretrained(tmp_path / "ckpt")
    reloaded = load_model(tmp_path / "ckpt")
    assert reloaded.config.encoder_window == "trimmed" and reloaded.trim_encoder is True
    messages = task_messages("caption", clip(7.3))
    expected = load_model(tmp_path / "ckpt")
    expected.trim_encoder = False
    assert not torch.equal(reloaded.prepare([messages]).inputs_embeds, expected.prepare([messages]).inputs_embeds)
    assert load_model("tiny-random").trim_encoder is False  # the official layout stays full-window
    with pytest.raises(ValueError, match="encoder_window"):
        EurekaConfig(encoder_window="trim")


# --- compiled decode step -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_compiled_engine_gives_the_same_tokens(fresh) -> None:
    settings = GenerationSettings(max_new_tokens=20)
    for messages in CONVERSATIONS[:2]:
        assert new_ids(fresh, messages, settings, "compiled") == new_ids(fresh, messages, settings, "reference")


# --- CPU weight layouts and the decode kernel ----------------------------------------------------------------------
needs_kernel = pytest.mark.skipif(kernel_library() is None, reason="no AVX512-BF16 CPU or no C compiler")


@needs_kernel
@pytest.mark.parametrize("rows,n,k", [(1, 64, 64), (3, 130, 100), (8, 96, 2048), (5, 7, 33)])
def test_decode_kernel_matches_linear(rows: int, n: int, k: int) -> None:
    torch.manual_seed(rows)
    w, x, b = torch.randn(n, k).bfloat16(), torch.randn(rows, k).bfloat16(), torch.randn(n).bfloat16()
    ours, theirs = gemv_bf16(x, w, b).float(), torch.nn.functional.linear(x, w, b).float()
    exact = torch.nn.functional.linear(x.double(), w.double(), b.double()).float()
    # both round an fp32 accumulation to bf16; they may differ by one bf16 step where the order of sums differs
    assert float((ours - exact).abs().max()) <= 1.01 * float((theirs - exact).abs().max()) + 1e-2
    assert float((ours != theirs).float().mean()) < 0.01


def test_weight_layouts_switch_in_place_without_changing_values() -> None:
    model = load_model("tiny-random", dtype="bfloat16")
    backbone = model.model.backbone
    prepared = model.prepare([CONVERSATIONS[1]])
    before = backbone_weight_bytes(backbone)
    logits = {}
    for layout in ("plain", "onednn", "kernel", "plain"):
        got = set_weight_layout(backbone, layout)
        assert weight_layout(backbone) == got
        assert backbone_weight_bytes(backbone) == before
        with torch.inference_mode():
            logits[layout] = backbone(inputs_embeds=prepared.inputs_embeds).logits  # prefill: dense path
    assert all(torch.equal(logits["plain"], v) for v in logits.values())
    assert backbone.get_output_embeddings().weight is backbone.get_input_embeddings().weight  # tie kept


def test_fast_engine_switches_bf16_layout_and_compiled_refuses_it() -> None:
    model = load_model("tiny-random", dtype="bfloat16")
    assert weight_layout(model.model.backbone) == "plain"
    model.generate(CONVERSATIONS[0], max_new_tokens=8)
    assert weight_layout(model.model.backbone) == ("kernel" if kernel_library() is not None else "onednn")
    with pytest.raises(ValueError, match="compiled engine"):
        model.generate(CONVERSATIONS[0], max_new_tokens=4, engine="compiled")
    fp32 = load_model("tiny-random")
    fp32.generate(CONVERSATIONS[0], max_new_tokens=4)
    assert weight_layout(fp32.model.backbone) == "plain"  # fp32 already runs MKL's GEMV at full speed
