"""The training script: the loss goes down, and a run resumes where it stopped."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from model.config import tiny_random_config
from model.data.synth import espeak_available, generate_dataset
from model.data.tasks import to_chat_records
from model.fast_decode import encode_trimmed
from model.loading import build_model
from model.prompts import SpecialTokenIds
from model.train import (
    IGNORE,
    Example,
    TrainConfig,
    TraitHead,
    cache_encoder_outputs,
    cache_encoder_outputs_and_hidden,
    corpus_text,
    letter_weights,
    main,
    make_example,
    per_answer_loss,
    question_kind_weights,
    record_audio,
    remembering_text_encoder,
    sampler,
    sft_pool,
    sft_sampler,
    speech_spans,
    spoken_tokens,
    step_loss,
    train_tokenizer,
)

pytestmark = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed (scripts/setup.sh does)")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    import numpy as np

    from model.data.synth import read_manifest

    out = tmp_path_factory.mktemp("synth")
    manifest = generate_dataset(out, 6, 1, 1, seed=3, workers=1)
    for split in ("train", "val", "test"):
        with open(out / f"records_{split}.jsonl", "w") as handle:
            for meta in (m for m in read_manifest(manifest) if m["split"] == split):
                for record in to_chat_records(meta, meta["audio"], np.random.default_rng(meta["index"])):
                    handle.write(json.dumps(record) + "\n")
    return out


@dataclass
class TinySetup:
    """What a few training steps on the test dataset need: records, tokenizer, a tiny model and its encoder cache."""

    records: list
    tokenizer: object
    ids: SpecialTokenIds
    model: torch.nn.Module
    clips: list[str]
    cache: dict


def tiny_setup(dataset: Path, cache_name: str, window: str = "full") -> TinySetup:
    from model.train import read_records

    torch.manual_seed(0)
    records = read_records(dataset, "train")
    tokenizer = train_tokenizer(corpus_text(records), 400)
    model = build_model(tiny_random_config(vocab_size=len(tokenizer)))
    model.audio_encoder.eval()
    clips = sorted({a for r in records for a in record_audio(r)})
    cache = cache_encoder_outputs(model.audio_encoder, dataset, clips, dataset / cache_name, window=window)
    return TinySetup(records, tokenizer, SpecialTokenIds.from_tokenizer(tokenizer), model, clips, cache)


def auxiliary_term_losses(setup: TinySetup, head: torch.nn.Module, stat: str, **terms) -> list[float]:
    """Five steps on ASR examples with an auxiliary term on: it must add to the loss each step; its values."""
    batch = [make_example(r, setup.tokenizer, setup.ids, setup.cache) for r in setup.records if r["task"] == "asr"][:4]
    optimizer = torch.optim.AdamW(list(setup.model.adapter.parameters()) + list(head.parameters()), lr=3e-3)
    values = []
    for _ in range(5):
        loss, stats = step_loss(setup.model, batch, setup.cache, setup.ids, **terms)
        without, _ = step_loss(setup.model, batch, setup.cache, setup.ids)
        assert loss.item() > without.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        values.append(stats[stat])
    return values


def test_remembering_text_encoder_builds_the_same_examples(dataset: Path) -> None:
    setup = tiny_setup(dataset, "cache-tiny.pt")
    encode = remembering_text_encoder(setup.tokenizer)
    plain = [make_example(r, setup.tokenizer, setup.ids, setup.cache) for r in setup.records]
    remembered = [make_example(r, setup.tokenizer, setup.ids, setup.cache, encode) for r in setup.records]
    assert remembered == plain
    ids = encode("user\n")
    ids.append(-1)  # a caller may extend what it gets: what is remembered stays as it was
    assert encode("user\n") == ids[:-1]


@pytest.mark.parametrize("loss_average", ["token", "example"])
def test_three_steps_lower_the_loss(dataset: Path, loss_average: str) -> None:
    setup = tiny_setup(dataset, "cache-tiny.pt")
    model = setup.model
    batch = [make_example(r, setup.tokenizer, setup.ids, setup.cache) for r in setup.records[:8]]
    params = list(model.adapter.parameters()) + list(model.backbone.parameters())
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    model.train()
    for _ in range(3):
        loss, stats = step_loss(model, batch, setup.cache, setup.ids, loss_average=loss_average)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(stats["lm_loss"])
        assert "aux_loss" in stats
    assert losses[2] < losses[0]


def test_per_answer_loss_weighs_every_answer_alike() -> None:
    """A 2-token answer weighs as much as a 5-token one; answers of equal length give the library's token average."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    torch.manual_seed(0)
    logits = torch.randn(2, 7, 11)
    labels = torch.full((2, 7), IGNORE)
    labels[0, 2:7] = torch.tensor([1, 2, 3, 4, 5])  # a 5-token answer
    labels[1, 5:7] = torch.tensor([6, 7])  # a 2-token answer
    token_losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:],
                                                     ignore_index=IGNORE, reduction="none")
    per_answer = [token_losses[0, 1:6].mean(), token_losses[1, 4:6].mean()]
    assert torch.allclose(per_answer_loss(logits, labels), (per_answer[0] + per_answer[1]) / 2, atol=1e-6)
    assert not torch.allclose(per_answer_loss(logits, labels), ForCausalLMLoss(logits, labels, vocab_size=11))

    labels[1, 2:5] = torch.tensor([8, 9, 10])  # now both answers have 5 tokens
    assert torch.allclose(per_answer_loss(logits, labels), ForCausalLMLoss(logits, labels, vocab_size=11), atol=1e-6)
    with pytest.raises(ValueError, match="loss_average"):
        TrainConfig(loss_average="sentence")


def test_letter_weight_weighs_only_multiple_choice_letters(dataset: Path) -> None:
    """Only a multiple-choice answer's first token (its option letter) is weighed up, and the loss is then the
    weighted mean within each answer; weight 1 is the unweighted loss."""
    setup = tiny_setup(dataset, "cache-tiny.pt")
    records = [next(r for r in setup.records if r["task"] == task) for task in ("qa", "asr", "caption")]
    examples = [make_example(r, setup.tokenizer, setup.ids, setup.cache) for r in records]
    assert [e.choice for e in examples] == [True, False, False]
    qa = examples[0]
    letter_at = next(i for i, label in enumerate(qa.labels) if label != IGNORE)
    assert setup.tokenizer.decode([qa.labels[letter_at]]) == records[0]["target"][0]  # the letter is one token
    width = max(len(e.labels) for e in examples)
    weights = letter_weights(examples, width, 5.0)
    assert weights[0, letter_at] == 5.0 and weights.sum() == 3 * width + 4.0

    torch.manual_seed(0)
    logits = torch.randn(3, width, len(setup.tokenizer))
    labels = torch.full((3, width), IGNORE)
    for row, example in enumerate(examples):
        labels[row, : len(example.labels)] = torch.tensor(example.labels)
    token_losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:],
                                                     ignore_index=IGNORE, reduction="none")
    answer = (labels[0, 1:] != IGNORE).float() * weights[0, 1:]
    per_answer = [(token_losses[0] * answer).sum() / answer.sum()] + [
        token_losses[row][labels[row, 1:] != IGNORE].mean() for row in (1, 2)]
    assert torch.allclose(per_answer_loss(logits, labels, weights), torch.stack(per_answer).mean(), atol=1e-5)
    assert torch.allclose(per_answer_loss(logits, labels, letter_weights(examples, width, 1.0)),
                          per_answer_loss(logits, labels), atol=1e-6)
    with pytest.raises(ValueError, match="letter_weight"):
        TrainConfig(letter_weight=2.0)  # token averaging has no answers to weigh within
    with pytest.raises(ValueError, match="letter_weight"):
        TrainConfig(letter_weight=0.0, loss_average="example")


def test_ctc_term_trains_the_adapter_on_spoken_words(dataset: Path) -> None:
    """The CTC head reads each clip's own transcript; its loss falls and it adds to the training loss."""
    from model.audio import audio_features
    from model.inference import EurekaAudio

    setup = tiny_setup(dataset, "cache-trim.pt", window="trimmed")
    # the trimmed cache holds exactly what inference computes for the same clip
    setup.model.config.encoder_window = "trimmed"
    expected = EurekaAudio(setup.model, setup.tokenizer)._encoder_output([audio_features(dataset / setup.clips[0], 80)])
    assert torch.allclose(setup.cache[setup.clips[0]].float(), expected.float(), atol=2e-3)

    spoken = spoken_tokens(dataset, setup.tokenizer)
    assert any(spoken[c] for c in setup.clips) and all(c in spoken for c in setup.clips)
    setup.model.ctc_head = torch.nn.Linear(setup.model.config.hidden_size, len(setup.tokenizer), bias=False)
    ctc_losses = auxiliary_term_losses(setup, setup.model.ctc_head, "ctc_loss", spoken=spoken, ctc_weight=1.0)
    assert ctc_losses[-1] < ctc_losses[0]


def test_one_pass_caches_equal_the_two_separate_passes(dataset: Path, tmp_path: Path) -> None:
    """``--encoder-layers`` caches the hidden state and the outputs in one encoder pass per clip: the hidden state
    is exactly the encoder's after 2 blocks, the outputs (finished from the float32 hidden state) equal a full pass
    to the float16 the cache stores."""
    from model.audio import audio_features

    setup = tiny_setup(dataset, "cache-trim.pt", window="trimmed")
    encoder, clips = setup.model.audio_encoder, setup.clips[:6]
    outputs, one_pass_hidden = cache_encoder_outputs_and_hidden(encoder, dataset, clips, tmp_path / "out.pt",
                                                                tmp_path / "one_pass_hidden.pt", blocks=2)
    for clip in clips:
        with torch.inference_mode():
            hidden = encode_trimmed(encoder, audio_features(dataset / clip, 80).log_mel, blocks=2)
        assert torch.equal(one_pass_hidden[clip], hidden.to(torch.float16))
        assert outputs[clip].shape == setup.cache[clip].shape
        assert torch.allclose(outputs[clip].float(), setup.cache[clip].float(), atol=2e-3, rtol=1e-3)
    # a second call reads both caches back: with no encoder to run, any recomputation would fail
    again, _ = cache_encoder_outputs_and_hidden(None, dataset, clips, tmp_path / "out.pt",
                                                tmp_path / "one_pass_hidden.pt", blocks=2)
    assert all(torch.equal(again[c], outputs[c]) for c in clips)


def test_ctc_sounds_spell_every_foreground_event_in_time_order(dataset: Path) -> None:
    """--ctc-sounds: the CTC target spells sounds between the speech's words, one word per beep, click or note; the
    background bed and silence are not spelled; without the flag the target is the transcript."""
    from model.train import ctc_text

    meta = {"events": [
        {"kind": "noise", "color": "brown", "background": True, "start_s": 0.0, "end_s": 6.0},
        {"kind": "beeps", "count": 3, "pitch_class": "high", "start_s": 0.1, "end_s": 1.0},
        {"kind": "speech", "text": "we saw seven foxes", "start_s": 1.2, "end_s": 2.6},
        {"kind": "silence", "start_s": 2.6, "end_s": 3.8},
        {"kind": "chord", "name": "F minor", "quality": "minor", "notes": ["F4", "G#4", "C5"], "start_s": 3.8,
         "end_s": 4.6},
        {"kind": "melody", "notes": ["C5", "E5", "G4"], "start_s": 4.7, "end_s": 5.5},
        {"kind": "speech", "text": "it was foggy", "start_s": 5.5, "end_s": 5.9},
    ]}
    assert ctc_text(meta) == "we saw seven foxes it was foggy"
    assert ctc_text(meta, sounds=True) == ("high beeps beeps beeps we saw seven foxes minor chord notes notes notes "
                                           "it was foggy")
    assert ctc_text({"events": [{"kind": "silence", "start_s": 0.0, "end_s": 2.0}]}, sounds=True) == ""

    setup = tiny_setup(dataset, "cache-trim.pt", window="trimmed")
    plain, with_sounds = spoken_tokens(dataset, setup.tokenizer), spoken_tokens(dataset, setup.tokenizer, True)
    assert plain.keys() == with_sounds.keys()
    sounding = [c for c in plain if any(e["kind"] not in ("speech", "silence") and not e.get("background")
                                        for e in metas(dataset)[c]["events"])]
    assert sounding and all(len(with_sounds[c]) > len(plain[c]) for c in sounding)


def metas(data_dir: Path) -> dict[str, dict]:
    from model.data.synth import read_manifest

    return {meta["audio"]: meta for meta in read_manifest(data_dir / "manifest.jsonl")}


def test_training_cli_runs_exports_and_resumes(dataset: Path, tmp_path: Path, capsys) -> None:
    from model import load_model

    args = ["--data", str(dataset), "--out", str(tmp_path / "run"), "--pretrain-steps", "2", "--align-steps", "2",
            "--sft-steps", "2", "--batch-size", "4", "--warmup-steps", "1", "--vocab-size", "400",
            "--sound-questions", "1", "--sound-descriptions", "1", "--ctc-sounds", "1"]
    assert main([*args, "--export", str(tmp_path / "ckpt")]) == 0
    log = [json.loads(line) for line in open(tmp_path / "run" / "train_log.jsonl")]
    assert [row["stage"] for row in log] == ["pretrain"] * 2 + ["align"] * 2 + ["sft"] * 2
    model = load_model(tmp_path / "ckpt")
    assert model.config.n_routed_experts == 8 and model.config.top_k == 2
    # the CTC head the CTC term trained ships with the checkpoint (for re-ranking transcriptions)
    trained = torch.load(tmp_path / "run" / "resume.pt", weights_only=False)["model"]["ctc_head.weight"]
    assert model.config.ctc_head and torch.equal(model.model.ctc_head.weight, trained.half().float())
    # a finished run resumes at its end: nothing is trained twice, and its unchanged encoder cache is not rewritten
    # (runs started from one set of cache files read them side by side)
    cache_file = tmp_path / "run" / "encoder_cache_trimmed.pt"
    written = cache_file.stat().st_mtime_ns
    assert main(args) == 0
    assert len(open(tmp_path / "run" / "train_log.jsonl").readlines()) == 6
    assert "resuming: stage sft step 2" in capsys.readouterr().out
    assert cache_file.stat().st_mtime_ns == written


@pytest.mark.parametrize("sft_lr", [0.0, 1e-3])
def test_sft_decay_steps_reach_the_floor_early_and_hold_it(dataset: Path, tmp_path: Path, sft_lr: float) -> None:
    args = ["--data", str(dataset), "--out", str(tmp_path / "run"), "--pretrain-steps", "3", "--align-steps", "2",
            "--sft-steps", "5", "--sft-decay-steps", "3", "--batch-size", "4", "--warmup-steps", "1",
            "--vocab-size", "400", "--sft-lr", str(sft_lr)]
    assert main(args) == 0
    log = [json.loads(line) for line in open(tmp_path / "run" / "train_log.jsonl")]
    lr = TrainConfig().lr
    peak = sft_lr or lr  # --sft-lr sets SFT's peak alone
    sft = [row["lr"] for row in log if row["stage"] == "sft"]
    # warm-up, the cosine's start, its middle, then the floor from step 3 on, held to the end
    assert sft == pytest.approx([peak, peak, 0.55 * peak, 0.1 * peak, 0.1 * peak])
    with pytest.raises(ValueError, match="sft_lr ≥ 0"):
        TrainConfig(sft_lr=-1e-3)
    # other stages keep their own cosine, which ends with them
    assert [row["lr"] for row in log if row["stage"] == "pretrain"] == pytest.approx([lr, lr, 0.55 * lr])


@pytest.mark.parametrize(("encoder_from_step", "encoder_until_step", "grad_clip"),
                         [(0, 0, "global"), (3, 0, "global"), (0, 2, "global"), (0, 2, "group")])
def test_sft_with_encoder_layers_trains_only_the_last_encoder_blocks(dataset: Path, tmp_path: Path, capsys,
                                                                    encoder_from_step: int,
                                                                    encoder_until_step: int, grad_clip: str) -> None:
    """--encoder-layers 1: the last Whisper block and ln_post learn in SFT (from a cached hidden state); the blocks
    before it stay the real Whisper weights, and the exported checkpoint carries the trained ones. With
    --encoder-from-step 3 the 3 SFT steps all come before it: the encoder stays Whisper's. With --encoder-until-step
    2 it trains in steps 0–1, then its outputs are re-cached once and step 2 reads them. With --grad-clip group the
    log has the encoder's own gradient norm while it trains (zero after)."""
    from model import load_model
    from model.whisper_ct2 import load_whisper_tiny_en_encoder

    run = tmp_path / "run"
    assert main(["--data", str(dataset), "--out", str(run), "--pretrain-steps", "1", "--align-steps", "1",
                 "--sft-steps", "3", "--batch-size", "4", "--warmup-steps", "1", "--vocab-size", "400",
                 "--encoder-layers", "1", "--encoder-lr-scale", "1", "--records-per-clip", "2",
                 "--length-buckets", "2", "--encoder-from-step", str(encoder_from_step),
                 "--encoder-until-step", str(encoder_until_step), "--grad-clip", grad_clip,
                 "--export", str(tmp_path / "ckpt")]) == 0
    whisper = load_whisper_tiny_en_encoder().state_dict()
    trained = torch.load(run / "resume.pt", weights_only=False)["model"]
    changed = {name.rsplit(".", 1)[0] for name in whisper
               if not torch.equal(trained[f"audio_encoder.{name}"], whisper[name])}
    last_block = {"blocks.3.attn.query", "blocks.3.attn.key", "blocks.3.attn.value", "blocks.3.attn.out",
                  "blocks.3.attn_ln", "blocks.3.mlp.0", "blocks.3.mlp.2", "blocks.3.mlp_ln", "ln_post"}
    assert changed == (set() if encoder_from_step == 3 else last_block)
    sft_log = [json.loads(line) for line in open(run / "train_log.jsonl") if '"sft"' in line]
    expected = [encoder_from_step <= step < (encoder_until_step or 3) for step in range(3)]
    assert [row["encoder_trained"] for row in sft_log] == expected
    assert all(row["grad_norm"] > 0 for row in sft_log)
    if grad_clip == "group":
        assert [row["encoder_grad_norm"] > 0 for row in sft_log] == expected
    else:
        assert not any("encoder_grad_norm" in row for row in sft_log)
    assert ("re-cached and fixed" in capsys.readouterr().out) == bool(encoder_until_step)
    assert (run / "encoder_hidden_trimmed_3.pt").is_file()
    exported = load_model(tmp_path / "ckpt").model.audio_encoder.state_dict()
    torch.testing.assert_close(exported["ln_post.weight"].float(), trained["audio_encoder.ln_post.weight"],
                               rtol=0, atol=1e-3)  # stored in float16


def test_clip_gradients_per_group_keeps_each_groups_norm_independent_of_the_others() -> None:
    """"global": one norm over everything, so a group with large gradients shrinks the others' steps; "group": each
    group is clipped to norm 1 alone, so the small group's gradient is the same whether the large one is there."""
    from model.train import clip_gradients

    def two_groups() -> list[dict]:
        small, large = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(9))
        small.grad, large.grad = torch.full((4,), 1.5), torch.full((9,), 10.0)  # norms 3 and 30
        return [{"params": [small]}, {"params": [large]}]

    groups = two_groups()
    norms = clip_gradients(groups, [p for g in groups for p in g["params"]], "global")
    assert norms == {"grad_norm": pytest.approx((3**2 + 30**2) ** 0.5)}
    small, large = (g["params"][0].grad for g in groups)
    assert small.norm() == pytest.approx(3 / norms["grad_norm"], rel=1e-4)  # ≈ 0.1: shrunk by the large group
    assert (small.norm() ** 2 + large.norm() ** 2).sqrt() == pytest.approx(1.0, rel=1e-4)

    groups = two_groups()
    norms = clip_gradients(groups, [p for g in groups for p in g["params"]], "group")
    assert norms == {"grad_norm": pytest.approx(3.0), "encoder_grad_norm": pytest.approx(30.0)}
    assert [g["params"][0].grad.norm().item() for g in groups] == [pytest.approx(1.0, rel=1e-4)] * 2
    alone = two_groups()[:1]
    clip_gradients(alone, alone[0]["params"], "group")
    torch.testing.assert_close(alone[0]["params"][0].grad, groups[0]["params"][0].grad)
    with pytest.raises(ValueError, match="grad_clip must be one of global, group"):
        TrainConfig(grad_clip="layer")


def test_encoder_tail_under_bf16_autocast_stays_close_and_trains_float32_weights() -> None:
    """--encoder-bf16: the trained blocks' outputs stay within bfloat16's rounding of the float32 ones (relative to
    their scale), come back as float32, and the gradients reach the float32 weights as in float32."""
    from model.train import encoder_tail_features
    from model.whisper_ct2 import load_whisper_tiny_en_encoder

    encoder = load_whisper_tiny_en_encoder()
    trained = [*encoder.blocks[3:].parameters(), *encoder.ln_post.parameters()]
    torch.manual_seed(0)
    hidden = {"a.wav": torch.randn(120, 384), "b.wav": torch.randn(52, 384)}
    outputs = {"a.wav": torch.zeros(15, 1536), "b.wav": torch.zeros(6, 1536)}  # token counts (4 frames → 1 token)
    results = {}
    for bf16 in (False, True):
        features = encoder_tail_features(encoder, hidden, outputs, 3, bf16=bf16)(["a.wav", "b.wav", "a.wav"])
        assert {k: v.shape for k, v in features.items()} == {"a.wav": (15, 1536), "b.wav": (6, 1536)}
        assert all(v.dtype == torch.float32 for v in features.values())
        encoder.zero_grad()
        torch.cat(list(features.values())).pow(2).mean().backward()
        results[bf16] = (features, [p.grad.clone() for p in trained])
    for name, exact in results[False][0].items():
        error = (results[True][0][name] - exact).abs().max() / exact.abs().max()
        assert 0 < error < 0.02  # bf16 changed something, by rounding only (measured 0.007)
    cosines = [torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
               for a, b in zip(results[False][1], results[True][1], strict=True)]
    assert min(cosines) > 0.999 and all(p.dtype == torch.float32 for p in trained)


def fake_examples(clips: int, per_clip: int) -> list[Example]:
    """Records of different lengths about ``clips`` clips (what the sampler looks at: length and clip)."""
    return [Example([0] * (10 + 37 * ((c * per_clip + r) % 7)), [], [f"clip{c}.wav"])
            for c in range(clips) for r in range(per_clip)]


def padding(batch: list[Example]) -> int:
    return max(len(e.input_ids) for e in batch) * len(batch) - sum(len(e.input_ids) for e in batch)


def test_sampler_groups_records_by_clip_and_by_length_deterministically() -> None:
    import random

    items = fake_examples(40, 5)
    plain = sampler(items, 8, 0, "sft")
    assert plain(3) == random.Random("0-sft-3").sample(items, 8)  # the default is the original draw
    grouped = sampler(items, 8, 0, "sft", records_per_clip=4, length_buckets=4)
    again = sampler(items, 8, 0, "sft", records_per_clip=4, length_buckets=4)
    for step in range(12):
        batch = grouped(step)
        assert batch == again(step) == grouped(step)  # by step only: a resumed run sees the same batches
        assert len(batch) == 8 and all(len({e.audio[0] for e in batch[i : i + 4]}) == 1 for i in (0, 4))
    bucketed, steps = sampler(items, 8, 0, "sft", length_buckets=8), range(64)
    assert sum(padding(bucketed(s)) for s in steps) < 0.5 * sum(padding(plain(s)) for s in steps)
    text = [Example([0] * n, [], []) for n in range(5, 50)]
    assert len(sampler(text, 8, 0, "pretrain", records_per_clip=4, length_buckets=4)(0)) == 8
    with pytest.raises(ValueError, match="not a multiple of records_per_clip"):
        TrainConfig(batch_size=16, records_per_clip=3)
    with pytest.raises(ValueError, match="encoder_from_step needs encoder_layers"):
        TrainConfig(encoder_from_step=100)
    with pytest.raises(ValueError, match="encoder_until_step needs encoder_layers"):
        TrainConfig(encoder_until_step=100)
    with pytest.raises(ValueError, match="must come after encoder_from_step"):
        TrainConfig(encoder_layers=2, encoder_from_step=100, encoder_until_step=50)
    with pytest.raises(ValueError, match="encoder_until_step must be ≥ 0"):
        TrainConfig(encoder_layers=2, encoder_until_step=-1)


def test_qa_balance_draws_rare_question_kinds_more_often_and_keeps_the_task_mix() -> None:
    records = ([{"task": "qa", "question_kind": "duration"}] * 900
               + [{"task": "qa", "question_kind": "tone_freq"}] * 100 + [{"task": "asr"}] * 500)
    assert question_kind_weights(records, 0.0) == [1.0] * 1500
    weights = question_kind_weights(records, 0.5)
    assert weights[-500:] == [1.0] * 500  # what is not a question keeps its weight
    assert sum(weights[:1000]) == pytest.approx(1000)  # the questions together weigh what they did
    assert sum(weights[:900]) / sum(weights[900:1000]) == pytest.approx(3.0)  # 900:100 → √900:√100
    assert sum(question_kind_weights(records, 1.0)[:900]) == pytest.approx(500)  # 1: every kind alike

    items = [Example([0] * 10, [], [f"clip{i}.wav"]) for i in range(1500)]
    draw = sampler(items, 8, 0, "sft", weights=weights)
    assert draw(5) == sampler(items, 8, 0, "sft", weights=weights)(5)  # still by step only
    drawn = [items.index(e) for step in range(400) for e in draw(step)]
    rare = sum(900 <= i < 1000 for i in drawn) / len(drawn)
    assert 0.11 < rare < 0.19  # expected 250 / 1500 ≈ 0.167; uniformly it would be 0.067
    with pytest.raises(ValueError, match="3 weights for 1500 records"):
        sampler(items, 8, 0, "sft", weights=[1.0] * 3)
    with pytest.raises(ValueError, match="qa_balance must be in"):
        TrainConfig(qa_balance=2.0)


def test_refreshing_the_encoder_cache_stores_what_the_trained_blocks_compute_now() -> None:
    """--encoder-until-step's re-cache: every clip's entry becomes the features function's output, in the cache's
    own dtype, without gradients."""
    from model.train import refresh_encoder_cache

    weight = torch.nn.Parameter(torch.tensor(3.0))
    source = {f"clip{i}": torch.randn(4 + i, 8) for i in range(5)}
    cache = {name: torch.zeros(value.shape, dtype=torch.float16) for name, value in source.items()}
    refresh_encoder_cache(cache, lambda names: {n: source[n] * weight for n in names}, batch=2)
    for name, value in source.items():
        assert cache[name].dtype == torch.float16 and not cache[name].requires_grad
        torch.testing.assert_close(cache[name], (value * 3).half())


def test_sound_questions_ask_about_every_training_sound_event(dataset: Path) -> None:
    """--sound-questions: one question per foreground sound of each training clip, its span and kind right."""
    from model.data.synth import read_manifest
    from model.data.tasks import KIND_LABELS, foreground_events
    from model.train import sound_question_records

    records = sound_question_records(dataset, seed=0)
    expected = [(m["id"], e) for m in read_manifest(dataset / "manifest.jsonl") if m["split"] == "train"
                for e in foreground_events(m) if e["kind"] != "speech"]
    assert expected and len(records) == len(expected)
    for record, (clip_id, event) in zip(records, expected, strict=True):
        question = record["messages"][0]["content"][-1]["text"]
        assert record["clip_id"] == clip_id and record["question_kind"] == "sound_kind"
        assert question.startswith(f"What is heard from {event['start_s']:.1f} s to {event['end_s']:.1f} s?")
        letter, text = record["target"].split(". ", 1)
        assert text == KIND_LABELS[event["kind"]] and f"\n{letter}. {text}" in question
    assert records == sound_question_records(dataset, seed=0)  # seeded


def test_sound_descriptions_describe_every_training_sound_event_as_the_caption_does(dataset: Path) -> None:
    """--sound-descriptions: one open record per foreground sound of each training clip, asking about its span and
    answered with the very phrase the clip's caption uses for that sound."""
    from model.data.synth import read_manifest
    from model.data.tasks import caption, foreground_events
    from model.train import sound_description_train_records

    records = sound_description_train_records(dataset)
    metas = {m["id"]: m for m in read_manifest(dataset / "manifest.jsonl") if m["split"] == "train"}
    expected = [(clip_id, e) for clip_id, m in metas.items() for e in foreground_events(m) if e["kind"] != "speech"]
    assert expected and len(records) == len(expected)
    for record, (clip_id, event) in zip(records, expected, strict=True):
        assert record["clip_id"] == clip_id and record["task"] == "describe"
        question = record["messages"][0]["content"][-1]["text"]
        assert question == f"Describe the sound from {event['start_s']:.1f} s to {event['end_s']:.1f} s."
        phrase = record["target"].removesuffix(".")
        assert f", {phrase[0].lower()}{phrase[1:]}." in caption(metas[clip_id])


def test_trait_term_reads_each_speech_event_and_trains(dataset: Path) -> None:
    """Every speech event of the manifest becomes a span with its traits; the trait loss adds to the loss and falls."""
    from model.data.synth import read_manifest
    from model.train import TRAITS

    spans = speech_spans(dataset)
    metas = read_manifest(dataset / "manifest.jsonl")
    assert sum(len(v) for v in spans.values()) == sum(e["kind"] == "speech" for m in metas for e in m["events"])
    for meta in metas:
        for (start, end, classes), event in zip(spans[meta["audio"]], [e for e in meta["events"]
                                                                      if e["kind"] == "speech"], strict=True):
            assert start < end and abs(start * 0.08 - event["start_s"]) < 0.08
            assert TRAITS["accent"][classes["accent"]] == event["accent"]
    setup = tiny_setup(dataset, "cache-traits.pt")
    traits = TraitHead(setup.model.config.hidden_size)
    trait_losses = auxiliary_term_losses(setup, traits, "trait_loss", traits=traits, spans=spans, trait_weight=1.0)
    assert trait_losses[-1] < trait_losses[0]


def test_sft_sampler_switches_records_per_clip_and_balance_at_their_steps() -> None:
    items = fake_examples(40, 5)
    weights = [5.0 if i < 50 else 1.0 for i in range(len(items))]  # the first 10 clips' records drawn 5× as often
    cfg = TrainConfig(batch_size=8, encoder_layers=2, encoder_until_step=10, records_per_clip=4,
                      frozen_records_per_clip=1, qa_balance=1.0, qa_balance_from_step=20, length_buckets=4)
    draw = sft_sampler(items, cfg, weights)
    for step in range(10):  # the encoder trains: 2 clips × 4 records, drawn uniformly
        assert draw(step) == sampler(items, 8, 0, "sft", 4, 4)(step)
    for step in range(10, 20):  # fixed encoder: a record a clip, still uniform
        assert draw(step) == sampler(items, 8, 0, "sft", 1, 4)(step)
    clips = {e.audio[0] for step in range(10, 20) for e in draw(step)}  # 2 clips a step before: ≤ 20
    assert len(clips) > 20 and all(len({e.audio[0] for e in draw(s)}) > 2 for s in range(10, 20))
    for step in range(20, 30):  # then the weights
        assert draw(step) == sampler(items, 8, 0, "sft", 1, 4, weights)(step)
    assert draw(25) == sft_sampler(items, cfg, weights)(25)  # by step only: a resumed run sees the same batches
    plain = TrainConfig(batch_size=8, records_per_clip=4, length_buckets=4)
    assert sft_sampler(items, plain)(3) == sampler(items, 8, 0, "sft", 4, 4)(3)  # without the options: as before
    with pytest.raises(ValueError, match="frozen_records_per_clip needs encoder_until_step"):
        TrainConfig(frozen_records_per_clip=1)
    with pytest.raises(ValueError, match="qa_balance_from_step needs qa_balance"):
        TrainConfig(qa_balance_from_step=100)
    with pytest.raises(ValueError, match="not a multiple of records_per_clip 3"):
        TrainConfig(batch_size=8, encoder_layers=2, encoder_until_step=5, records_per_clip=4,
                    frozen_records_per_clip=3)


def test_sft_pool_repeats_asr_and_captions_by_their_weights_and_keeps_the_question_balance() -> None:
    records = ([{"task": "qa", "question_kind": "duration"}] * 6 + [{"task": "qa", "question_kind": "tone_freq"}] * 2
               + [{"task": "asr"}] * 3 + [{"task": "caption"}] * 4)
    examples = [Example([i], [], [f"clip{i}.wav"]) for i in range(len(records))]
    plain, none = sft_pool(records, examples, TrainConfig(asr_weight=1))
    assert plain == examples and none is None  # weights of 1: the records, once each, in order
    asr = [e for e, r in zip(examples, records, strict=True) if r["task"] == "asr"]
    assert sft_pool(records, examples, TrainConfig(asr_weight=3))[0] == examples + asr * 2  # the pool before it
    pool, weights = sft_pool(records, examples, TrainConfig(asr_weight=3, caption_weight=2, qa_balance=1.0))
    assert pool[: len(examples)] == examples  # repeats come after, so earlier recipes draw what they drew
    tasks = [records[examples.index(e)]["task"] for e in pool]
    assert (tasks.count("qa"), tasks.count("asr"), tasks.count("caption")) == (8, 9, 8)
    assert len(weights) == len(pool) and weights[8:] == [1.0] * (len(pool) - 8)  # only questions are reweighted
    assert weights[:8] == question_kind_weights(records, 1.0)[:8]  # the balance among questions is unchanged
    with pytest.raises(ValueError, match="asr_weight and caption_weight must be ≥ 1"):
        TrainConfig(caption_weight=0)
