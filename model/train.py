"""Train Eureka-mini: the paper's recipe at toy scale, top to bottom (``python -m model.train --data DIR``).

Stages (reference doc section 5): a tokenizer and backbone text pre-training on the corpus text; alignment with only
the MoE adapter trainable; joint SFT over ASR, multiple-choice QA and dense captioning with the load-balancing loss.
The Whisper encoder is frozen (real tiny.en weights), so its outputs are computed once and cached per clip.
Seeded and resumable: a checkpoint after every stage and every ``--save-every`` steps.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from .audio import audio_features, chunk_log_mel
from .config import EurekaConfig
from .ctc import ctc_loss
from .data.synth import ACCENTS, RATE_CLASSES, VOICE_PITCH_CLASSES, read_manifest
from .data.tasks import foreground_events, sound_description_records, sound_kind_records, transcript
from .evaluate import answer_letter
from .fast_decode import encode_trimmed, encoder_tail
from .inference import TOKEN_SECONDS, EurekaAudio
from .loading import build_model
from .prompts import CAPTION_PROMPT, SpecialTokenIds, build_prompt
from .tokenizer import ALL_SPECIAL_TOKENS, THINK_TOKENS, encode_plain_text, wrap_tokenizer

IGNORE = -100
LOSS_AVERAGES = ("token", "example")
GRAD_CLIPS = ("global", "group")


@dataclass
class TrainConfig:
    """Everything that decides the result; saved beside the checkpoint."""

    seed: int = 0
    vocab_size: int = 1024
    batch_size: int = 16
    lr: float = 2e-3
    sft_lr: float = 0.0  # > 0: SFT's peak learning rate instead of lr (pre-training and alignment keep lr); 1e-3
    # fits SFT better than 2e-3 (lower training loss from its first steps; lower WER and higher caption recall over
    # two seeds, MC within seed spread: model card, session 15)
    weight_decay: float = 0.01
    warmup_steps: int = 50
    pretrain_steps: int = 300
    align_steps: int = 300
    sft_steps: int = 1500
    sft_decay_steps: int = 0  # > 0: SFT's cosine reaches its floor (0.1 × lr) at this step and holds it (0: at the end)
    asr_weight: int = 2  # k > 1: SFT draws ASR records k times as often; the bundled checkpoint's recipe uses 2 (3:
    # test MC lower, every validation score higher, in one seed each: model card, session 16)
    caption_weight: int = 1  # k > 1: SFT draws dense captions k times as often (their records repeated k times)
    ctc_weight: float = 0.5
    trait_weight: float = 0.0
    loss_average: str = "token"  # "token": every answer token counts once; "example": every answer counts once
    letter_weight: float = 1.0  # with loss_average "example": a multiple-choice answer's option letter weighs this
    # many of its tokens (1: one token like the rest; 4 and 10 did not help: model card, session 16)
    sound_questions: int = 0  # 1: add a "what is heard from X s to Y s?" question per training sound event
    sound_descriptions: int = 0  # 1: add a "describe the sound from X s to Y s" record per training sound event
    ctc_sounds: int = 0  # 1: the CTC targets also spell each sound event ("high beeps beeps", "pink noise"), in order
    encoder_layers: int = 0  # SFT also trains the encoder's last N blocks and ln_post (0: encoder frozen throughout)
    encoder_lr_scale: float = 0.1  # their learning rate, × lr (pre-trained weights: smaller steps)
    encoder_from_step: int = 0  # with encoder_layers: SFT steps before this one keep the encoder frozen (cheaper)
    encoder_bf16: int = 0  # 1: the trained encoder blocks run under bfloat16 autocast (CPU; blocks ≈ 1.5× faster)
    encoder_until_step: int = 0  # with encoder_layers: from this SFT step on, its outputs are re-cached, then fixed
    qa_balance: float = 0.0  # a > 0: SFT draws a question of a kind with n training questions ∝ n ** -a (0: uniform)
    qa_balance_from_step: int = 0  # with qa_balance: SFT steps before this one draw questions uniformly
    records_per_clip: int = 1  # k > 1: an SFT batch is batch_size / k clips with k records each (features run once)
    frozen_records_per_clip: int = 0  # with encoder_until_step: records_per_clip once the encoder is fixed (0: same)
    length_buckets: int = 1  # n > 1: batches drawn n at a time and grouped by length (less padding)
    grad_clip: str = "global"  # "global": one norm over all parameters; "group": each param group clipped alone
    save_every: int = 200

    def __post_init__(self) -> None:
        if self.loss_average not in LOSS_AVERAGES:
            raise ValueError(f"loss_average must be one of {', '.join(LOSS_AVERAGES)}, not {self.loss_average!r}")
        if self.letter_weight <= 0 or (self.letter_weight != 1.0 and self.loss_average != "example"):
            raise ValueError("letter_weight must be > 0, and other than 1 only with loss_average 'example' (it "
                             "weighs a token within its answer)")
        if self.grad_clip not in GRAD_CLIPS:
            raise ValueError(f"grad_clip must be one of {', '.join(GRAD_CLIPS)}, not {self.grad_clip!r}")
        if self.records_per_clip < 1 or self.length_buckets < 1 or self.encoder_layers < 0:
            raise ValueError("records_per_clip and length_buckets must be ≥ 1, encoder_layers ≥ 0")
        if self.asr_weight < 1 or self.caption_weight < 1:
            raise ValueError("asr_weight and caption_weight must be ≥ 1 (1: a task's records drawn as often as any)")
        if self.encoder_from_step < 0 or (self.encoder_from_step and not self.encoder_layers):
            raise ValueError("encoder_from_step needs encoder_layers > 0 (it delays their training) and must be ≥ 0")
        if not 0.0 <= self.qa_balance <= 1.0:
            raise ValueError("qa_balance must be in [0, 1] (0: every record alike; 1: every question kind alike)")
        if self.lr <= 0 or self.sft_lr < 0:
            raise ValueError("lr must be > 0 and sft_lr ≥ 0 (0: SFT uses lr)")
        if self.sft_decay_steps < 0:
            raise ValueError("sft_decay_steps must be ≥ 0 (0: SFT's cosine ends with SFT)")
        if self.encoder_until_step < 0:
            raise ValueError("encoder_until_step must be ≥ 0 (0: the encoder trains to the end)")
        if self.encoder_until_step and (not self.encoder_layers or self.encoder_until_step <= self.encoder_from_step):
            raise ValueError("encoder_until_step needs encoder_layers > 0 and must come after encoder_from_step")
        if self.qa_balance_from_step < 0 or (self.qa_balance_from_step and not self.qa_balance):
            raise ValueError("qa_balance_from_step needs qa_balance > 0 (it delays the balance) and must be ≥ 0")
        if self.frozen_records_per_clip < 0 or (self.frozen_records_per_clip and not self.encoder_until_step):
            raise ValueError("frozen_records_per_clip needs encoder_until_step (it applies once the encoder is "
                             "fixed) and must be ≥ 0")
        for per_clip in (self.records_per_clip, self.frozen_records_per_clip or self.records_per_clip):
            if self.batch_size % per_clip:  # else SFT batches would silently shrink
                raise ValueError(f"batch_size {self.batch_size} is not a multiple of records_per_clip {per_clip}")


def mini_config(vocab_size: int) -> EurekaConfig:
    """Whisper tiny.en encoder → 8-expert top-2 adapter (+1 shared) → a 4-layer Qwen3 trained from scratch."""
    return EurekaConfig(
        n_mels=80, n_audio_state=384, n_audio_head=6, n_audio_layer=4, encoder_window="trimmed",
        n_routed_experts=8, n_shared_experts=1, top_k=2, expert_dim=96, expert_out_dim=256,
        aux_loss_weight=0.01,
        backbone={
            "model_type": "qwen3", "vocab_size": vocab_size, "hidden_size": 256, "intermediate_size": 512,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "tie_word_embeddings": True,
        },
    )


# --- data ------------------------------------------------------------------------------------------------------
def read_records(data_dir: Path, split: str) -> list[dict[str, Any]]:
    """Chat records ({task, messages, target}) whose audio paths are relative to ``data_dir``."""
    with open(data_dir / f"records_{split}.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def training_clip_records(data_dir: Path, build: Callable[[dict[str, Any]], list[dict[str, Any]]]) -> list[dict]:
    """``build(meta)``'s records for every training clip of the dataset's manifest, in manifest order."""
    return [record for meta in read_manifest(data_dir / "manifest.jsonl") if meta["split"] == "train"
            for record in build(meta)]


def sound_question_records(data_dir: Path, seed: int) -> list[dict[str, Any]]:
    """``--sound-questions``: a sound-kind question per foreground sound event of every training clip (seeded)."""
    return training_clip_records(data_dir, lambda meta: sound_kind_records(
        meta, meta["audio"], np.random.default_rng([seed, 11, meta["index"]])))


def sound_description_train_records(data_dir: Path) -> list[dict[str, Any]]:
    """``--sound-descriptions``: a description record per foreground sound event of every training clip."""
    return training_clip_records(data_dir, lambda meta: sound_description_records(meta, meta["audio"]))


def record_audio(record: dict[str, Any]) -> list[str]:
    return [item["audio_url"]["url"] for m in record["messages"] if isinstance(m["content"], list)
            for item in m["content"] if item.get("type") == "audio_url"]


def corpus_text(records: list[dict[str, Any]]) -> list[str]:
    """Every text the model reads or writes: targets, questions, prompts."""
    texts = [r["target"] for r in records]
    for record in records:
        for message in record["messages"]:
            content = message["content"]
            items = [{"type": "text", "text": content}] if isinstance(content, str) else content
            texts.extend(i["text"] for i in items if i.get("type") == "text")
    return texts


def train_tokenizer(texts: list[str], vocab_size: int):
    """A small byte-level BPE over our corpus, with the official special-token names."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(ALL_SPECIAL_TOKENS) + list(THINK_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return wrap_tokenizer(tokenizer)


def stack_frames(frames: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """[frames, d] encoder output → [n_tokens, 4·d]: four 20 ms frames per 80 ms audio token, padding dropped."""
    return frames.reshape(-1, 4 * frames.shape[-1])[:n_tokens]


@torch.inference_mode()
def cache_encoder_outputs(encoder, data_dir: Path, clips: list[str], cache_path: Path, batch: int = 8,
                          window: str = "full") -> dict:
    """Stacked encoder outputs per clip ([tokens, 4·384], float16): the frozen encoder runs once per clip.

    ``window`` must match how the trained model will encode at inference (``EurekaConfig.encoder_window``):
    "trimmed" uses the very function inference uses, one clip at a time. (``--encoder-layers`` also needs the hidden
    state before the trained blocks: :func:`cache_encoder_outputs_and_hidden` makes both caches in one pass.)
    """
    cache: dict[str, torch.Tensor] = torch.load(cache_path) if cache_path.is_file() else {}
    todo = [c for c in clips if c not in cache]
    if window == "trimmed":
        batch = 1
    device = encoder.conv1.weight.device
    for start in tqdm(range(0, len(todo), batch), desc="encoder cache", unit="batch", mininterval=5):
        names = todo[start : start + batch]
        features = [audio_features(data_dir / name, 80) for name in names]
        if window == "trimmed":
            frames = [encode_trimmed(encoder, f.log_mel.to(device)) for f in features]
        else:
            chunks = [chunk_log_mel(f.log_mel).to(device) for f in features]
            frames = encoder(torch.cat(chunks)).split([c.shape[0] for c in chunks])
        for name, feature, clip_frames in zip(names, features, frames, strict=True):
            cache[name] = stack_frames(clip_frames, feature.n_tokens).to("cpu", torch.float16).clone()
        if start // batch % 1000 == 999:
            torch.save(cache, cache_path)
    if todo:  # unchanged: not rewritten (several runs may read one cache file)
        torch.save(cache, cache_path)
    return cache


@torch.inference_mode()
def cache_encoder_outputs_and_hidden(encoder, data_dir: Path, clips: list[str], cache_path: Path, hidden_path: Path,
                                     blocks: int) -> tuple[dict, dict]:
    """Both caches SFT with trained encoder blocks needs (``--encoder-layers``), in one encoder pass per clip: the
    hidden state after ``blocks`` blocks ([frames, d], float16) and the stacked encoder outputs finished from its
    float32 value (``encoder_tail``: the same outputs as a full pass, tested). Trimmed window only, the one training
    with ``--encoder-layers`` supports. Why one pass: two would run the convolutions and first blocks twice."""
    outputs: dict[str, torch.Tensor] = torch.load(cache_path) if cache_path.is_file() else {}
    hidden: dict[str, torch.Tensor] = torch.load(hidden_path) if hidden_path.is_file() else {}
    todo = [c for c in clips if c not in outputs or c not in hidden]
    for done, name in enumerate(tqdm(todo, desc="encoder cache", unit="clip", mininterval=5), start=1):
        feature = audio_features(data_dir / name, 80)
        state = encode_trimmed(encoder, feature.log_mel.to(encoder.conv1.weight.device), blocks=blocks)
        hidden[name] = state.to("cpu", torch.float16).clone()
        frames = encoder_tail(encoder, state, blocks)
        outputs[name] = stack_frames(frames, feature.n_tokens).to("cpu", torch.float16).clone()
        if done % 1000 == 0:
            torch.save(outputs, cache_path)
            torch.save(hidden, hidden_path)
    if todo:  # unchanged: not rewritten (several runs may read one cache file)
        torch.save(outputs, cache_path)
        torch.save(hidden, hidden_path)
    return outputs, hidden


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    audio: list[str]
    choice: bool = False  # a multiple-choice answer ("B. text"): its first answer token is the option letter


def encoder_tail_features(encoder, hidden: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor],
                          blocks: int, bf16: bool = False) -> Callable[[list[str]], dict[str, torch.Tensor]]:
    """Clip names → their stacked encoder outputs, the blocks after ``blocks`` run now (with gradients) from the cached
    hidden state ``hidden``; ``outputs`` (the frozen cache) gives each clip's token count. ``bf16``
    (``--encoder-bf16``): the blocks' matrix products run under bfloat16 autocast (weights and their updates stay
    float32), 1.55× faster forward + backward on this host's AVX512-BF16 CPU (measured in session 9 on 8 clips, one
    thread) — the encoder blocks are ≈ 40 % of an SFT step, the cost that puts the recipe over its time budget. In
    session 9's run a whole SFT step took 0.56–0.58 s over the first 1 000 steps against 0.70–0.72 s in float32 the
    same day (another run), but 0.65–0.78 s later on: the saving is real, its size on a shared host is not settled.

    Why train encoder blocks at all: the paper's SFT trains everything, and a linear probe of the frozen Whisper
    tiny.en shows its last blocks discard what the questions ask about — held-out voice-pitch class is read from
    87 % of speech events after the first two blocks but 65 % from the output, accent 63 → 53 %.
    """
    device_type = next(iter(hidden.values())).device.type if hidden else "cpu"  # autocast is per device type

    def features(names: list[str]) -> dict[str, torch.Tensor]:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            tails = {name: encoder_tail(encoder, hidden[name].float(), blocks) for name in dict.fromkeys(names)}
        return {name: stack_frames(tail.float(), outputs[name].shape[0]) for name, tail in tails.items()}
    return features


@torch.no_grad()
def refresh_encoder_cache(cache: dict[str, torch.Tensor], features: Callable[[list[str]], dict[str, torch.Tensor]],
                          batch: int = 32) -> None:
    """Replace every cached encoder output with what the encoder computes now (``--encoder-until-step``), in memory
    only: the cache file keeps Whisper's own outputs for the next run.

    Why: an SFT step that trains the encoder blocks takes 0.64 s on this host, one that reads fixed outputs 0.38 s,
    and this re-caching 57 s for 8 000 clips (session 13) — what lets a recipe fit the 60-minute budget. With one
    gradient-norm clip over all parameters, where the encoder's gradients dominate the norm, the switch made every
    other step ≈ 8× larger at once (a loss spike); use ``--grad-clip group``. Session 15's checkpoint
    trained the encoder until SFT step 2 000 of 6 700 and scored at least as well as session 12's, which trained it
    throughout (≈ 82 min against 57.5 from nothing); the bundled one (session 16) does the same; see the model card.
    """
    names = list(cache)
    for start in tqdm(range(0, len(names), batch), desc="re-caching encoder outputs", unit="batch", mininterval=5):
        for name, output in features(names[start : start + batch]).items():
            cache[name] = output.to(cache[name].dtype)


def remembering_text_encoder(tokenizer) -> Callable[[str], list[int]]:
    """``encode_plain_text`` with ``tokenizer``, each distinct text encoded once.

    Why: building the recipe's 37 902 SFT examples encodes the same role headers, prompts and options ≈ 270 000
    times: 10.7 s of the run's start, 4.6 s with this (session 17), for a recipe that must fit 60 minutes."""
    encoded = functools.lru_cache(maxsize=None)(lambda text: tuple(encode_plain_text(tokenizer, text)))
    return lambda text: list(encoded(text))


def make_example(record: dict[str, Any], tokenizer, ids: SpecialTokenIds, cache: dict,
                 encode: Callable[[str], list[int]] | None = None) -> Example:
    """Prompt exactly as at inference, then the target and ``<|im_end|>``; loss only on the answer. ``encode``: the
    text encoder to use (default ``encode_plain_text`` with ``tokenizer``; see ``remembering_text_encoder``)."""
    encode = encode or (lambda text: encode_plain_text(tokenizer, text))
    audio = record_audio(record)
    prompt = build_prompt(record["messages"], encode, ids, [cache[a].shape[0] for a in audio])
    answer = encode(record["target"]) + [ids.im_end]
    choice = record.get("task") == "qa" and answer_letter(record["target"]) is not None
    return Example(prompt.input_ids + answer, [IGNORE] * len(prompt.input_ids) + answer, audio, choice)


def text_example(text: str, tokenizer, ids: SpecialTokenIds) -> Example:
    """Plain-text pre-training sample: the text then ``<|im_end|>``."""
    tokens = encode_plain_text(tokenizer, text) + [ids.im_end]
    return Example(tokens, tokens, [])


def sound_words(event: dict[str, Any]) -> list[str]:
    """A sound event in the caption's own words, one word per countable unit ("beeps" × 3: CTC spells the count).

    The unit words are the captions' plurals because the corpus tokenizer has each as one token ("beep" is two, and
    a 0.2 s note — 2.5 audio tokens — could not hold "note"'s three)."""
    kind = event["kind"]
    if kind in ("tone", "beeps"):
        return [event["pitch_class"], *(["tone"] if kind == "tone" else ["beeps"] * event["count"])]
    if kind == "clicks":
        return ["clicks"] * event["count"]
    if kind == "chirp":
        return [event["direction"], "chirp"]
    if kind == "noise":
        return [event["color"], "noise"]
    if kind == "melody":
        return ["notes"] * len(event["notes"])
    if kind == "chord":
        return [event["quality"], "chord"]
    return []


def ctc_text(meta: dict[str, Any], sounds: bool = False) -> str:
    """What the CTC head must spell for a clip: its transcript, or with ``sounds`` every foreground event in time
    order — the speech's words and each sound's ``sound_words`` ("high beeps beeps we saw seven foxes").

    Why ``sounds`` (``--ctc-sounds``): with transcripts alone every non-speech token's CTC target is the blank, and
    the model's captions name a sound's kind for 2–12 % of held-out sounds, on training clips as badly (a chord
    captioned as "a rising chirp sweeping from 410 Hz to 270 Hz"); spelling sounds gives them the same word-like
    audio embeddings that made transcription a matter of copying."""
    if not sounds:
        return transcript(meta)
    return " ".join(event["text"] if event["kind"] == "speech" else " ".join(sound_words(event))
                    for event in foreground_events(meta) if event["kind"] == "speech" or sound_words(event))


def spoken_tokens(data_dir: Path, tokenizer, sounds: bool = False) -> dict[str, list[int]]:
    """Clip path → token ids of ``ctc_text`` (empty for clips with nothing to spell): the CTC targets."""
    manifest = data_dir / "manifest.jsonl"
    if not manifest.is_file():
        return {}
    return {meta["audio"]: encode_plain_text(tokenizer, ctc_text(meta, sounds)) for meta in read_manifest(manifest)}


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, labels (−100 on padding) and attention mask."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), IGNORE)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return input_ids, labels, mask


# --- training ----------------------------------------------------------------------------------------------------
# Speaker traits a question or caption asks about, with their classes (from the data generator's metadata).
TRAITS: dict[str, tuple[str, ...]] = {
    "gender": ("female", "male", "other"),
    "accent": tuple(ACCENTS),
    "pitch_class": tuple(VOICE_PITCH_CLASSES),
    "rate_class": tuple(RATE_CLASSES),
}


class TraitHead(torch.nn.Module):
    """Training-only auxiliary heads: each speech event's speaker traits from its pooled adapter outputs.

    Why: like word identity before the CTC term, speaker traits are present in the frozen encoder's features (a
    linear probe on pooled features reads gender and speaking rate of held-out voices at ≈ 95 %) but the model
    learned them poorly from QA answers alone. Asking the adapter to make them linearly readable per event is cheap.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.heads = torch.nn.ModuleDict({t: torch.nn.Linear(hidden_size, len(c)) for t, c in TRAITS.items()})

    def forward(self, pooled: torch.Tensor, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(torch.nn.functional.cross_entropy(self.heads[t](pooled), labels[t]) for t in TRAITS)


def speech_spans(data_dir: Path) -> dict[str, list[tuple[int, int, dict[str, int]]]]:
    """Clip path → its speech events as (first token, end token, trait class ids): the trait targets."""
    manifest = data_dir / "manifest.jsonl"
    if not manifest.is_file():
        return {}
    spans = {}
    for meta in read_manifest(manifest):
        events = []
        for event in (e for e in meta["events"] if e["kind"] == "speech"):
            start = int(event["start_s"] / TOKEN_SECONDS)
            end = max(start + 1, int(event["end_s"] / TOKEN_SECONDS))
            events.append((start, end, {t: TRAITS[t].index(event[t]) for t in TRAITS}))
        spans[meta["audio"]] = events
    return spans


def trait_loss(head: TraitHead, per_clip: list[torch.Tensor], names: list[str], spans: dict) -> torch.Tensor | None:
    pooled, labels = [], {t: [] for t in TRAITS}
    for clip_embeds, name in zip(per_clip, names, strict=True):
        for start, end, classes in spans.get(name, []):
            segment = clip_embeds[start : min(end, clip_embeds.shape[0])]
            if segment.shape[0] == 0:
                continue
            pooled.append(segment.mean(0))
            for trait, index in classes.items():
                labels[trait].append(index)
    if not pooled:
        return None
    return head(torch.stack(pooled), {t: torch.tensor(v, device=pooled[0].device) for t, v in labels.items()})


def per_answer_loss(logits: torch.Tensor, labels: torch.Tensor,
                    token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy averaged within each answer, then over answers (``--loss-average example``);
    ``token_weights`` (labels' shape): a weighted average within each answer instead (``letter_weights``).

    Why: a multiple-choice answer's one informative token (its letter) is ~1 % of a batch's answer tokens beside
    captions and transcripts, so with the usual token average (transformers' causal-LM loss, ``token``) the
    speaker-trait questions barely move the model.
    """
    targets = labels[:, 1:]
    token_losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    counted = (targets != IGNORE).float()
    answer_tokens = counted.sum(1)
    if token_weights is not None:
        counted = counted * token_weights[:, 1:]
    per_answer = (token_losses * counted).sum(1) / counted.sum(1).clamp(min=1e-6)
    return per_answer[answer_tokens > 0].mean()


def letter_weights(examples: list[Example], width: int, weight: float) -> torch.Tensor:
    """Per-token loss weights (``collate``'s width): ``weight`` on each multiple-choice answer's option letter, 1
    elsewhere.

    Why try it: the letter is what picks the option, yet it is one of an answer's 3–10 tokens, and session 15's
    checkpoint got the letter alone right for only 77.7 % of held-out test questions, while its text named the right
    option for 91.5 % of the answers that quote one. Measured (session 16, weight 4 and 10 over the recipe's last 1 000
    SFT steps): the letter was right no more often (76.7 %) — it lacks the skill, not the gradient — so the bundled
    recipe keeps 1."""
    weights = torch.ones((len(examples), width))
    for row, example in enumerate(examples):
        if example.choice:
            weights[row, next(i for i, label in enumerate(example.labels) if label != IGNORE)] = weight
    return weights


def step_loss(model, examples: list[Example], cache: dict, ids: SpecialTokenIds,
              spoken: dict[str, list[int]] | None = None,
              ctc_weight: float = 0.0, traits: TraitHead | None = None, spans: dict | None = None,
              trait_weight: float = 0.0, loss_average: str = "token",
              letter_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Next-token loss on answers, plus λ·L_aux from the adapter, and the CTC and trait terms when they are on;
    ``letter_weight``: see ``letter_weights`` (with ``loss_average`` "example").

    The CTC term (``ctc_weight`` > 0, ``spoken`` transcripts): the model's CTC head must spell each clip's transcript
    from its adapter outputs. Why: a backbone trained from scratch learns to read words out of 80 ms audio tokens
    slowly from the next-token loss alone (it first learns the sentence templates and guesses the slot words); a CTC
    loss asks every adapter output to say which word is spoken there, so word identity is linearly present in the
    audio embeddings from the alignment stage on, and decoding becomes copying."""
    device = model.backbone.get_input_embeddings().weight.device
    input_ids, labels, mask = (t.to(device) for t in collate(examples, ids.pad))
    audio_names = [a for e in examples for a in e.audio]
    audio_embeds, routing = None, None
    if audio_names:
        audio_embeds, routing = model.adapter(torch.cat([cache[a] for a in audio_names]).float())
    inputs_embeds = model.embed(input_ids, audio_embeds, ids.audio_pad)
    if loss_average == "token":  # the library's loss: every answer token counts once
        loss = model.backbone(inputs_embeds=inputs_embeds, attention_mask=mask, labels=labels).loss
    else:
        weights = letter_weights(examples, labels.shape[1], letter_weight).to(device) if letter_weight != 1.0 else None
        loss = per_answer_loss(model.backbone(inputs_embeds=inputs_embeds, attention_mask=mask).logits, labels,
                               weights)
    stats = {"lm_loss": float(loss.detach())}
    if routing is not None:
        loss = loss + model.config.aux_loss_weight * routing.aux_loss
        stats["aux_loss"] = float(routing.aux_loss.detach())
    if not audio_names:
        return loss, stats
    per_clip = list(audio_embeds.split([cache[a].shape[0] for a in audio_names]))
    known = [i for i, a in enumerate(audio_names) if spoken and a in spoken]  # clips with a known transcript
    if known and model.ctc_head is not None and ctc_weight > 0:
        spelling_loss = ctc_loss(model.ctc_head, [per_clip[i] for i in known], [spoken[audio_names[i]] for i in known],
                                 ids.pad)
        loss = loss + ctc_weight * spelling_loss
        stats["ctc_loss"] = float(spelling_loss.detach())
    if traits is not None and trait_weight > 0:
        if (traits_loss := trait_loss(traits, per_clip, audio_names, spans or {})) is not None:
            loss = loss + trait_weight * traits_loss
            stats["trait_loss"] = float(traits_loss.detach())
    return loss, stats


def lr_at(step: int, total: int, cfg: TrainConfig, peak: float | None = None) -> float:
    """Linear warm-up, then a cosine from ``peak`` (default ``cfg.lr``) down to 0.1 × ``peak`` at step ``total``,
    held after it."""
    peak = cfg.lr if peak is None else peak
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def clip_gradients(param_groups: list[dict], params: list, mode: str) -> dict[str, float]:
    """Clips gradients to norm 1 and returns the norms before clipping, for the log.

    "global" clips one norm over every parameter. "group" clips each param group alone (a second group is SFT's
    encoder blocks, logged as ``encoder_grad_norm``). Why it exists (model card,
    session 8): the trained encoder blocks' gradient norm is 18–30 against 2–4 for the rest, so a global clip scales
    the adapter's and backbone's gradients by ≈ 10× less than their own norm would — and by ≈ 8× more at once when
    the encoder stops training (``encoder_until_step``), a jump AdamW's second moments take hundreds of steps to
    follow. Clipped per group, the rest's step size does not depend on whether the encoder trains (measured in
    session 9: the spike is gone)."""
    if mode == "global":
        return {"grad_norm": float(torch.nn.utils.clip_grad_norm_(params, 1.0))}
    norms = [float(torch.nn.utils.clip_grad_norm_(group["params"], 1.0)) for group in param_groups]
    return {"grad_norm": norms[0], **({"encoder_grad_norm": norms[1]} if len(norms) > 1 else {})}


def run_stage(name: str, model, param_groups: list[dict], batches, total: int, cache: dict, ids: SpecialTokenIds,
              cfg: TrainConfig, out: Path, state: dict, spoken: dict[str, list[int]] | None = None,
              traits: TraitHead | None = None, spans: dict | None = None,
              audio_features: Callable[[list[str]], dict] | None = None) -> None:
    """One stage: AdamW over ``param_groups`` (each ``{"params": [...], "lr_scale": s}``); resumes from ``state`` if
    it stopped inside this stage. ``audio_features``: computes a batch's audio inputs from step
    ``cfg.encoder_from_step`` on (before it, and without it, ``cache`` holds them) until ``cfg.encoder_until_step``,
    where ``cache`` is refreshed from it once (also when a run resumes past that step) and used from then on."""
    params = [p for group in param_groups for p in group["params"]]
    optimizer = torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = state.get("step", 0) if state.get("stage") == name else 0
    if start and "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    log = open(out / "train_log.jsonl", "a", encoding="utf-8")
    progress = tqdm(range(start, total), desc=name, unit="step", initial=start, total=total)
    model.train()
    until = cfg.encoder_until_step or total
    decay = min(total, cfg.sft_decay_steps or total) if name == "sft" else total  # where the cosine reaches its floor
    peak = cfg.sft_lr if name == "sft" and cfg.sft_lr else cfg.lr
    for step in progress:
        lr = lr_at(step, decay, cfg, peak)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # states saved before it: 1
        batch = batches(step)
        if audio_features is not None and step >= until:
            print(f"\nSFT step {step}: the encoder's outputs are re-cached and fixed from here on", flush=True)
            refresh_encoder_cache(cache, audio_features)
            audio_features = None
        trains_encoder = audio_features is not None and step >= cfg.encoder_from_step
        inputs = audio_features([a for e in batch for a in e.audio]) if trains_encoder else cache
        loss, stats = step_loss(model, batch, inputs, ids, spoken, cfg.ctc_weight, traits, spans,
                                cfg.trait_weight, cfg.loss_average, cfg.letter_weight)
        if cfg.encoder_layers and name == "sft":
            stats["encoder_trained"] = trains_encoder
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        stats.update(clip_gradients(param_groups, params, cfg.grad_clip))
        optimizer.step()
        progress.set_postfix(loss=f"{stats['lm_loss']:.3f}")
        log.write(json.dumps({"stage": name, "step": step, "lr": lr, **stats}) + "\n")
        if (step + 1) % cfg.save_every == 0 and step + 1 < total:
            save_state(out, model, {"stage": name, "step": step + 1, "optimizer": optimizer.state_dict()}, traits)
    log.close()
    model.eval()
    save_state(out, model, {"stage": name, "step": total}, traits)


STAGES = ("pretrain", "align", "sft")


def save_state(out: Path, model, state: dict, traits: TraitHead | None = None) -> None:
    state = {**state, "model": model.state_dict(), "torch_rng": torch.get_rng_state(),
             "traits": traits.state_dict() if traits is not None else None}
    torch.save(state, out / "resume.pt.tmp")
    (out / "resume.pt.tmp").replace(out / "resume.pt")


def question_kind_weights(records: list[dict], balance: float) -> list[float]:
    """Each record's SFT sampling weight: a question of a kind with n training questions weighs ∝ n ** −balance.

    Why: the synthetic data asks a few kinds thousands of times (is there speech, how long, how many speakers: all
    right on held-out clips) and the pure-sound kinds (tone frequency, clicks, chords…) a few hundred times each —
    the kinds the model gets wrong. The weights are scaled so the questions together weigh what they did (each
    other record weighs 1): the task mix stays, only the questions' kinds are rebalanced.
    """
    kinds = [r.get("question_kind") if r.get("task") == "qa" else None for r in records]
    counts = Counter(k for k in kinds if k is not None)
    if not balance or not counts:
        return [1.0] * len(records)
    scale = sum(counts.values()) / sum(n ** (1 - balance) for n in counts.values())
    return [1.0 if k is None else scale * counts[k] ** -balance for k in kinds]


def sft_pool(records: list[dict], examples: list[Example],
             cfg: TrainConfig) -> tuple[list[Example], list[float] | None]:
    """SFT's records (``examples``, one per record) with ASR's repeated ``asr_weight`` and captions'
    ``caption_weight`` times in all, and their sampling weights (``question_kind_weights``; None without
    ``qa_balance``). Repeats go after the records, so weights of 1 leave the pool — and the batches — as they were.

    Why weights: ASR is the hardest task for a model this small, and a dense caption is one record a clip against
    three questions, yet it carries most of the facts the evaluation looks for."""
    repeats = [(e, r) for task, weight in (("asr", cfg.asr_weight), ("caption", cfg.caption_weight))
               for _ in range(weight - 1) for e, r in zip(examples, records, strict=True) if r["task"] == task]
    pool = examples + [e for e, _ in repeats]
    weights = question_kind_weights(records + [r for _, r in repeats], cfg.qa_balance) if cfg.qa_balance else None
    return pool, weights


def sampler(items: list[Example], batch_size: int, seed: int, stage: str, records_per_clip: int = 1,
            length_buckets: int = 1, weights: list[float] | None = None) -> Callable[[int], list[Example]]:
    """Deterministic batches by step, so a resumed run sees the same data as an uninterrupted one.

    ``records_per_clip`` k > 1: each record drawn brings k − 1 others about the same clip (drawn from ``items``, so
    the task mix stays the same), so a batch holds batch_size / k clips, whose audio features are computed once —
    what makes training encoder blocks affordable. ``length_buckets`` n > 1: n batches are drawn at once and grouped
    by length, so each pads to similar lengths (random batches of the synthetic records are ≈ 40 % padding).
    ``weights`` (one per item): records are drawn in proportion to them, with replacement (None: uniformly, without).
    """
    if weights is not None and len(weights) != len(items):
        raise ValueError(f"{len(weights)} weights for {len(items)} records")
    by_clip: dict[str, list[Example]] = {}
    for item in items:
        if item.audio:
            by_clip.setdefault(item.audio[0], []).append(item)
    groups_per_batch = max(1, batch_size // records_per_clip) if by_clip else batch_size

    def group(anchor: Example, rng: random.Random) -> list[Example]:
        others = [e for e in by_clip.get(anchor.audio[0], []) if e is not anchor] if anchor.audio else []
        return [anchor] + [rng.choice(others) for _ in range(records_per_clip - 1)] if others else [anchor]

    def batch(step: int) -> list[Example]:
        rng = random.Random(f"{seed}-{stage}-{step // length_buckets}")
        count = min(groups_per_batch * length_buckets, len(items))
        anchors = rng.sample(items, count) if weights is None else rng.choices(items, weights, k=count)
        if records_per_clip == 1 and length_buckets == 1:
            return anchors  # the original sampler, draw for draw
        groups = sorted((group(a, rng) for a in anchors), key=lambda g: max(len(e.input_ids) for e in g))
        batches = [groups[i : i + groups_per_batch] for i in range(0, len(groups), groups_per_batch)]
        rng.shuffle(batches)
        return [e for g in batches[step % length_buckets % len(batches)] for e in g]
    return batch


def sft_sampler(items: list[Example], cfg: TrainConfig,
                weights: list[float] | None = None) -> Callable[[int], list[Example]]:
    """SFT's batches by step: ``cfg.records_per_clip`` records a clip while the encoder trains and
    ``cfg.frozen_records_per_clip`` once ``cfg.encoder_until_step`` has fixed it; question kinds drawn by ``weights``
    from ``cfg.qa_balance_from_step`` on (uniformly before it, and without weights).

    Why switch: several records a clip only save the encoder blocks' work, which a fixed encoder no longer does, and
    they cost distinct utterances a step (4 clips × 4 records never learnt to copy words: model card, session 5). The
    balance delayed to a late step mirrors the recipe of session 12's checkpoint, whose last 1 000 steps alone drew
    every question kind alike (the bundled one's last 2 000 do).
    """
    draws: dict[tuple[int, bool], Callable[[int], list[Example]]] = {}

    def batch(step: int) -> list[Example]:
        fixed = bool(cfg.encoder_until_step) and step >= cfg.encoder_until_step
        per_clip = (cfg.frozen_records_per_clip or cfg.records_per_clip) if fixed else cfg.records_per_clip
        balanced = weights is not None and step >= cfg.qa_balance_from_step
        if (per_clip, balanced) not in draws:
            draws[per_clip, balanced] = sampler(items, cfg.batch_size, cfg.seed, "sft", per_clip, cfg.length_buckets,
                                                weights if balanced else None)
        return draws[per_clip, balanced](step)
    return batch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m model.train", description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path, help="dataset dir from `python -m model.data --records`")
    parser.add_argument("--out", type=Path, default=Path("runs/mini"), help="work dir (cache, log, resume state)")
    parser.add_argument("--export", type=Path, help="write the final checkpoint here (e.g. assets/eureka-mini)")
    parser.add_argument("--extra-records", type=Path, nargs="*", default=[],
                        help="more JSONL chat records to train on (e.g. a DataFlux export)")
    parser.add_argument("--device", default="cpu", help="where to train: cpu (the recipe's budget) or e.g. cuda; "
                        "the encoder caches are kept on the CPU in their files either way")
    for field, value in TrainConfig().__dict__.items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = TrainConfig(**{k: getattr(args, k) for k in TrainConfig().__dict__})
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_config.json").write_text(json.dumps(cfg.__dict__, indent=2))
    started = time.perf_counter()

    records = read_records(args.data, "train")
    if cfg.sound_questions:
        records += sound_question_records(args.data, cfg.seed)
    if cfg.sound_descriptions:
        records += sound_description_train_records(args.data)
    for path in args.extra_records:
        records += [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    tokenizer_dir = args.out / "tokenizer"
    if (tokenizer_dir / "tokenizer.json").is_file():
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        tokenizer = train_tokenizer(corpus_text(records) + [CAPTION_PROMPT], cfg.vocab_size)
        tokenizer.save_pretrained(tokenizer_dir)
    ids = SpecialTokenIds.from_tokenizer(tokenizer)

    model = build_model(mini_config(len(tokenizer)))
    from .whisper_ct2 import load_whisper_tiny_en_encoder
    model.audio_encoder.load_state_dict(load_whisper_tiny_en_encoder().state_dict())
    model.audio_encoder.requires_grad_(False)
    if cfg.ctc_weight > 0:  # the CTC term's head, exported with the model (to re-rank transcriptions); initialised
        # here, after the Whisper weights load, the order in which the model card's seeded runs drew it
        model.config.ctc_head = True
        model.ctc_head = torch.nn.Linear(model.config.hidden_size, len(tokenizer), bias=False)
    state = torch.load(args.out / "resume.pt", weights_only=False, map_location="cpu") \
        if (args.out / "resume.pt").is_file() else {}
    if state:
        model.load_state_dict(state["model"])
        torch.set_rng_state(state["torch_rng"])
        print(f"resuming: stage {state['stage']} step {state['step']}")

    clips = sorted({a for r in records for a in record_audio(r)})
    device = torch.device(args.device)
    model.to(device)
    model.audio_encoder.eval()
    window = model.config.encoder_window
    cache_path = args.out / f"encoder_cache_{window}.pt"
    encoder_params, sft_features = [], None
    if not cfg.encoder_layers:
        cache = cache_encoder_outputs(model.audio_encoder, args.data, clips, cache_path, window=window)
    else:  # SFT trains the last blocks: cache the hidden state before them, run them per batch
        first_trained = len(model.audio_encoder.blocks) - cfg.encoder_layers
        if first_trained < 0:
            raise SystemExit(f"--encoder-layers {cfg.encoder_layers}: the encoder has "
                             f"{len(model.audio_encoder.blocks)} blocks")
        if window != "trimmed":
            raise SystemExit(f"--encoder-layers needs the trimmed encoder window (this config's is {window!r})")
        hidden_path = args.out / f"encoder_hidden_{window}_{first_trained}.pt"
        cache, hidden = cache_encoder_outputs_and_hidden(model.audio_encoder, args.data, clips, cache_path,
                                                         hidden_path, first_trained)
        cache = {name: cache[name] for name in clips}  # a shared cache file may hold more (re-caching does these)
        hidden = {name: hidden[name].to(device) for name in clips}
        sft_features = encoder_tail_features(model.audio_encoder, hidden, cache, first_trained,
                                             bool(cfg.encoder_bf16))
        encoder_params = [*model.audio_encoder.blocks[first_trained:].parameters(),
                          *model.audio_encoder.ln_post.parameters()]
    cache = {name: output.to(device) for name, output in cache.items()}
    spoken = spoken_tokens(args.data, tokenizer, bool(cfg.ctc_sounds))
    spans = speech_spans(args.data)
    traits = TraitHead(model.config.hidden_size)
    if state.get("traits"):
        traits.load_state_dict(state["traits"])
    traits.to(device)
    encode = remembering_text_encoder(tokenizer)
    audio_examples = [make_example(r, tokenizer, ids, cache, encode) for r in records]
    text_examples = [text_example(t, tokenizer, ids) for t in sorted(set(corpus_text(records)))]
    sft_examples, sft_weights = sft_pool(records, audio_examples, cfg)

    # Training-only heads join the optimiser only when their loss is on (a resumed optimiser state must match).
    auxiliary = (list(model.ctc_head.parameters()) if cfg.ctc_weight > 0 else []) + \
        (list(traits.parameters()) if cfg.trait_weight > 0 else [])
    def groups(params: list, encoder: list | None = None) -> list[dict]:
        return [{"params": params, "lr_scale": 1.0}] + \
            ([{"params": encoder, "lr_scale": cfg.encoder_lr_scale}] if encoder else [])
    plan = [
        ("pretrain", groups(list(model.backbone.parameters())), text_examples, cfg.pretrain_steps),
        ("align", groups(list(model.adapter.parameters()) + auxiliary),
         [e for e, r in zip(audio_examples, records, strict=True) if r["task"] in ("asr", "caption")], cfg.align_steps),
        ("sft", groups([*model.adapter.parameters(), *auxiliary, *model.backbone.parameters()], encoder_params),
         sft_examples, cfg.sft_steps),
    ]
    # A stage is finished when its saved step reached the steps asked for now, so a run can also be extended.
    done = 0
    if state:
        done = STAGES.index(state["stage"]) + (state["step"] >= plan[STAGES.index(state["stage"])][3])
    for index, (name, param_groups, examples, steps) in enumerate(plan):
        if index < done:
            continue
        for p in model.parameters():
            p.requires_grad_(False)
        for group in param_groups:
            for p in group["params"]:
                p.requires_grad_(True)
        batches = sft_sampler(examples, cfg, sft_weights) if name == "sft" else \
            sampler(examples, cfg.batch_size, cfg.seed, name, 1, cfg.length_buckets)
        run_stage(name, model, param_groups, batches, steps, cache, ids, cfg, args.out, state, spoken, traits,
                  spans, sft_features if name == "sft" else None)
        state = {}

    minutes = (time.perf_counter() - started) / 60
    print(f"training done in {minutes:.1f} min")
    if args.export:
        model.to("cpu")
        EurekaAudio(model, tokenizer, name="eureka-mini").save_pretrained(args.export, dtype=torch.float16)
        print(f"wrote {args.export}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
