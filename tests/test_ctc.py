"""The CTC head: its likelihood, re-ranking transcription beams with it, fitting it, and carrying it in checkpoints."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from conftest import noise, tone

from model import load_model, task_messages
from model.ctc import ctc_log_likelihood, ctc_log_probs, greedy_ctc
from model.ctc_fit import fit_head
from model.loading import MINI_DIR

HELDOUT = MINI_DIR / "heldout"


def collapse(path: tuple[int, ...], blank: int) -> list[int]:
    return [t for i, t in enumerate(path) if t != blank and (i == 0 or t != path[i - 1])]


def test_ctc_log_likelihood_sums_the_probability_of_every_alignment() -> None:
    """Checked against brute force: every path over 4 frames and 3 symbols that collapses to the hypothesis."""
    torch.manual_seed(0)
    log_probs = torch.randn(4, 3).log_softmax(-1)
    hypotheses = [[1], [1, 2], [1, 1], [], [2, 1, 2]]
    expected = []
    for hypothesis in hypotheses:
        total = sum(math.exp(sum(float(log_probs[t, s]) for t, s in enumerate(path)))
                    for path in itertools.product(range(3), repeat=4) if collapse(path, 0) == hypothesis)
        expected.append(math.log(total) if total else -math.inf)
    assert ctc_log_likelihood(log_probs, hypotheses, blank_id=0).tolist() == pytest.approx(expected, abs=1e-5)
    # "1 1 1" needs 5 frames (a blank between repeats): impossible in 4, so never chosen
    assert ctc_log_likelihood(log_probs, [[1, 1, 1]], blank_id=0).item() == -math.inf


def test_greedy_ctc_merges_repeats_and_drops_blanks() -> None:
    frames = [0, 3, 3, 0, 3, 5, 5, 0]
    log_probs = torch.nn.functional.one_hot(torch.tensor(frames), 6).float().log_softmax(-1)
    assert greedy_ctc(log_probs, blank_id=0) == [3, 3, 5]


def test_fit_head_learns_to_spell_linearly_readable_features() -> None:
    """Features that carry each frame's symbol (plus noise, with blank frames between words): the fitted head's
    greedy reading is exactly the targets, held-out sequences included."""
    generator = torch.Generator().manual_seed(0)
    codebook = torch.randn(8, 16, generator=generator)

    def clip(symbols: list[int]) -> torch.Tensor:
        frames = [s for symbol in symbols for s in (symbol, symbol, 0)]  # each symbol twice, then blank
        return codebook[frames] + 0.1 * torch.randn(len(frames), 16, generator=generator)

    sequences = [torch.randint(1, 8, (5,), generator=generator).tolist() for _ in range(60)]
    clips = [clip(s) for s in sequences]
    head = fit_head(clips[:50], sequences[:50], vocab_size=8, blank_id=0, steps=150, batch_size=16, lr=3e-2)
    for features, symbols in zip(clips[50:], sequences[50:], strict=True):
        assert greedy_ctc(ctc_log_probs(head, features), blank_id=0) == symbols


def with_head(seed: int = 0):
    """tiny-random with a random CTC head (as ``python -m model.ctc`` or training would give it)."""
    model = load_model("tiny-random")
    torch.manual_seed(seed)
    model.config.ctc_head = True
    model.model.ctc_head = torch.nn.Linear(model.config.hidden_size, model.config.backbone["vocab_size"], bias=False)
    return model


def speechlike(seconds: float = 1.2):
    return (tone(seconds, 220) + tone(seconds, 660, amplitude=0.1) + noise(seconds, amplitude=0.02), 16000)


def test_the_head_travels_in_the_checkpoint_and_the_fixed_positional_table_does_not(tmp_path) -> None:
    from safetensors import safe_open

    model = with_head()
    model.save_pretrained(tmp_path / "ckpt")
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as handle:
        names = set(handle.keys())
    assert "ctc_head.weight" in names and "audio_encoder.positional_embedding" not in names
    reloaded = load_model(tmp_path / "ckpt")
    assert reloaded.config.ctc_head and reloaded.asr_ctc_beams > 1
    assert torch.equal(reloaded.model.ctc_head.weight, model.model.ctc_head.weight)
    # rebuilt by the encoder's constructor, identical to the table it would have stored
    table = model.model.audio_encoder.positional_embedding
    assert torch.equal(reloaded.model.audio_encoder.positional_embedding, table)
    messages = task_messages("asr", speechlike())
    assert reloaded.generate(messages, max_new_tokens=8, ctc_beams=3) == model.generate(messages, max_new_tokens=8,
                                                                                       ctc_beams=3)


def test_reranked_transcription_streams_as_one_piece_equal_to_generate() -> None:
    model = with_head()
    messages = task_messages("asr", speechlike())
    full = model.generate(messages, max_new_tokens=10, ctc_beams=4)
    assert list(model.stream(messages, max_new_tokens=10, ctc_beams=4)) == ([full] if full else [])


def test_reranking_picks_the_beam_the_audio_spells_best() -> None:
    """With an overwhelming CTC head that reads one fixed token everywhere, the chosen beam is the one whose
    spelling that head finds likeliest — computed here from the beams themselves, independently of the ranking."""
    from model.ctc import CTC_WEIGHT
    from model.inference import GenerationSettings
    from model.tokenizer import encode_plain_text

    model = with_head()
    messages = task_messages("asr", speechlike())
    settings = GenerationSettings(max_new_tokens=6, ctc_beams=5)
    prepared = model.prepare([messages])
    config = settings.to_generation_config(model.special_ids)
    config.num_beams = config.num_return_sequences = 5
    with torch.inference_mode():
        beams = model.model.backbone.generate(**prepared.generate_kwargs(), generation_config=config)
    texts = [model._decode(row[prepared.input_ids.shape[1]:]) for row in beams]
    assert len(set(texts)) > 1, "the beams must differ for the test to mean anything"
    spelled = [encode_plain_text(model.tokenizer, t) for t in texts]
    with torch.no_grad():
        model.model.ctc_head.weight.mul_(50.0)  # CTC scores dwarf the backbone's
        audio = prepared.audio_embeds[0]
        ctc_scores = ctc_log_likelihood(ctc_log_probs(model.model.ctc_head, audio), spelled, model.special_ids.pad)
    assert CTC_WEIGHT > 0
    assert model.generate(messages, settings) == texts[int(ctc_scores.argmax())]


def test_reranking_refuses_what_it_cannot_do(tiny) -> None:
    messages = task_messages("asr", speechlike())
    with pytest.raises(ValueError, match="no CTC head"):
        tiny.generate(messages, max_new_tokens=4, ctc_beams=3)
    model = with_head()
    with pytest.raises(ValueError, match="temperature 0"):
        model.generate(messages, max_new_tokens=4, ctc_beams=3, temperature=0.7)
    for beams in (-1, 10_000):  # negative, or so many beams that memory would run out first
        with pytest.raises(ValueError, match="ctc_beams must be between 0"):
            model.generate(messages, max_new_tokens=4, ctc_beams=beams)
    with pytest.raises(ValueError, match="has no audio"):
        model.generate([{"role": "user", "content": "hello"}], max_new_tokens=4, ctc_beams=3)
    assert model.generate(messages, max_new_tokens=4, ctc_beams=1) == model.generate(messages, max_new_tokens=4)


@pytest.fixture(scope="module")
def mini():
    return load_model("mini")


def heldout_asr(n: int) -> list[dict]:
    records = [r for r in map(json.loads, open(HELDOUT / "records_test.jsonl")) if r["task"] == "asr"][:n]
    for record in records:
        item = record["messages"][-1]["content"][0]["audio_url"]
        item["url"] = str(HELDOUT / item["url"])
    return records


def test_mini_ships_a_head_that_knows_which_sentence_each_heldout_clip_says(mini) -> None:
    """What re-ranking relies on: for each held-out utterance the bundled head finds the clip's own transcript far
    likelier than any other utterance's — with no language model, from the audio embeddings alone."""
    from model.tokenizer import encode_plain_text

    assert mini.asr_ctc_beams > 1
    records = heldout_asr(8)
    transcripts = [encode_plain_text(mini.tokenizer, r["target"]) for r in records]
    for index, record in enumerate(records):
        audio = mini.embed_audio([record["messages"][-1]["content"][0]["audio_url"]["url"]])
        with torch.inference_mode():
            scores = ctc_log_likelihood(ctc_log_probs(mini.model.ctc_head, audio), transcripts, mini.special_ids.pad)
        others = torch.cat([scores[:index], scores[index + 1:]])
        assert scores[index] > others.max() + 10, (record["target"], scores.tolist())


def test_mini_reranks_a_batch_as_it_reranks_each_conversation(mini) -> None:
    records = heldout_asr(3)
    singles = [mini.generate(r["messages"], max_new_tokens=64, ctc_beams=4) for r in records]
    assert mini.generate([r["messages"] for r in records], max_new_tokens=64, ctc_beams=4) == singles


def rerank_example() -> dict:
    """Held-out clip test-000026 (bundled beside the CI subset for this): greedy decoding hears a word the grammar
    allows but the audio does not say ("eleven" for "eight")."""
    folder = HELDOUT / "rerank"
    record = json.loads((folder / "records_test.jsonl").read_text())
    item = record["messages"][-1]["content"][0]["audio_url"]
    item["url"] = str(folder / item["url"])
    return record


def test_the_asr_tab_reranks_by_default_and_fixes_a_word_greedy_decoding_gets_wrong(mini) -> None:
    """Greedy decoding gets a word of a held-out clip wrong; the ASR tab's default decoding (6 beams re-ranked by the
    CTC head) gets it right."""
    from app import asr

    record = rerank_example()
    audio = record["messages"][-1]["content"][0]["audio_url"]["url"]
    assert asr.transcribe(mini, audio, ctc_beams=0) != record["target"]
    assert asr.transcribe(mini, audio) == record["target"]


def test_the_cli_reranks_asr_by_default_and_says_when_a_model_cannot(capsys) -> None:
    from model.__main__ import main as cli_main

    record = rerank_example()
    audio = record["messages"][-1]["content"][0]["audio_url"]["url"]
    assert cli_main(["--model", "mini", "--audio", audio, "--task", "asr"]) == 0
    assert capsys.readouterr().out.strip() == record["target"]
    assert cli_main(["--model", "mini", "--audio", audio, "--task", "asr", "--ctc-beams", "0"]) == 0
    assert capsys.readouterr().out.strip() != record["target"]
    assert cli_main(["--model", "tiny-random", "--audio", audio, "--ctc-beams", "3", "--max-new-tokens", "4"]) == 2
    assert "no CTC head" in capsys.readouterr().err
    assert cli_main(["--model", "mini", "--audio", audio, "--task", "qa", "--ctc-beams", "3"]) == 2
    assert "applies to --task asr only" in capsys.readouterr().err
