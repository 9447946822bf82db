"""Property-based fuzzing (hypothesis) of the two places untrusted data enters: the audio front-end and the parsers
of DataFlux's LLM replies and reviewer lists.

The front-end must end every input in exactly one of two ways: ``AudioInputError`` with a message, or mono float32
samples that are finite and bounded. Inputs: random bytes, valid encoded clips with random corruption (flipped
bytes, overwritten header fields, truncation) — which reaches far deeper into libsndfile than random bytes — numpy
arrays of any dtype, shape and rate (NaN, inf, empty, huge values), and data URIs.

The DataFlux parsers already have totality tests for random text and JSON (``tests/test_dataflux_llm.py``); the
properties here are the ones those leave open: structured-but-wrong replies, round trips of the question layout,
option texts full of regex metacharacters, and the reviewer-list parser. CI budgets: 100–200 examples, no deadline.
"""

from __future__ import annotations

import base64
import io
import json
import string

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dataflux_ui.answers import parse_choice
from dataflux_ui.auth import parse_users
from dataflux_ui.core import LETTERS, format_question, parse_question
from dataflux_ui.judge import CONSISTENCY, FINAL_ACTIONS, WINNERS, parse_verdict
from dataflux_ui.llm import ReplyError, extract_json
from dataflux_ui.questions import parse_generator_reply
from model.audio import MAX_ABS_SAMPLE, SAMPLE_RATE, AudioInputError, load_audio

# soundfile's virtual-IO seek callback raises (and cffi ignores) "negative seek value" on some corrupt streams:
# libsndfile then gets an error return and refuses the file, which is the behaviour under test.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                          HealthCheck.data_too_large])
FEW = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MAX_SECONDS = 5.0  # small, so that corrupted headers claiming long audio are refused quickly


def assert_valid_or_refused(source: object, max_seconds: float = MAX_SECONDS) -> np.ndarray | None:
    """The front-end's contract: AudioInputError (with a message), or a usable 16 kHz mono float32 clip."""
    try:
        samples = load_audio(source, max_seconds=max_seconds)
    except AudioInputError as exc:
        assert str(exc).strip(), "the error must say what is wrong"
        return None
    assert isinstance(samples, np.ndarray) and samples.dtype == np.float32 and samples.ndim == 1
    assert samples.size > 0 and np.isfinite(samples).all()
    assert float(np.abs(samples).max()) <= 2 * MAX_ABS_SAMPLE  # the resampler may overshoot a little
    assert len(samples) <= max_seconds * SAMPLE_RATE + 2
    return samples


def encode(fmt: str, subtype: str, rate: int, channels: int) -> bytes:
    t = np.arange(int(0.25 * rate)) / rate
    mono = 0.4 * np.sin(2 * np.pi * 440 * t) + 0.05 * np.random.default_rng(0).standard_normal(len(t))
    samples = np.stack([mono * (1 - 0.1 * c) for c in range(channels)], axis=1)
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


SEEDS = [
    encode("WAV", "PCM_16", 16000, 1),
    encode("WAV", "FLOAT", 44100, 2),
    encode("WAV", "PCM_U8", 8000, 1),
    encode("WAV", "PCM_24", 48000, 6),
    encode("FLAC", "PCM_16", 22050, 2),
    encode("OGG", "VORBIS", 16000, 1),
    encode("AIFF", "PCM_16", 16000, 1),
    encode("MP3", "MPEG_LAYER_III", 22050, 1),
]


@st.composite
def corrupted(draw: st.DrawFn) -> bytes:
    """A valid clip with a few bytes overwritten (biased to the header), optionally truncated or extended."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        header = draw(st.booleans())
        position = draw(st.integers(0, min(len(data), 64) - 1 if header else len(data) - 1))
        width = draw(st.sampled_from([1, 2, 4]))
        value = draw(st.sampled_from([0, 1, 0xFF, 0x7F, 0x80, 0xFFFFFFFF, 0x7FFFFFFF, 3]) | st.integers(0, 2**32 - 1))
        data[position : position + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")
    cut = draw(st.one_of(st.none(), st.integers(0, len(data))))
    if cut is not None:
        data = data[:cut]
    if draw(st.booleans()):
        data += draw(st.binary(max_size=64))
    return bytes(data)


# --- audio front-end ------------------------------------------------------------------------------------------------
@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_are_refused_or_decoded(data: bytes) -> None:
    assert_valid_or_refused(data)


@FUZZ
@given(corrupted())
def test_corrupted_clips_are_refused_or_decoded_the_same_way_twice(data: bytes) -> None:
    first, second = assert_valid_or_refused(data), assert_valid_or_refused(data)
    assert (first is None) == (second is None), "decoding the same bytes twice disagreed"
    if first is not None:
        np.testing.assert_array_equal(first, second)


def test_a_header_that_overstates_the_length_yields_only_decoded_samples() -> None:
    """Regression (found by the property above): a truncated MP3 still declares its full length (11025 frames, 1775
    decodable). Reading it in ``SoundFile.blocks()`` padded the rest with uninitialised memory — NaN, 1e22 or stale
    heap bytes, different on every call."""
    t = np.arange(int(0.5 * 22050)) / 22050
    buffer = io.BytesIO()
    sf.write(buffer, (0.4 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 22050, format="MP3",
             subtype="MPEG_LAYER_III")
    truncated = buffer.getvalue()[:900]
    with sf.SoundFile(io.BytesIO(truncated)) as handle:
        declared = handle.frames
    runs = [load_audio(truncated) for _ in range(3)]
    assert all(np.array_equal(runs[0], run) for run in runs[1:])
    assert len(runs[0]) < 0.5 * declared * SAMPLE_RATE / 22050
    assert float(np.abs(runs[0]).max()) < 1.0


@FEW
@given(corrupted())
def test_corrupted_clips_from_files_and_data_uris(data: bytes) -> None:
    """The path and data-URI routes end the same way as bytes (same decoder, different wrapping)."""
    from_bytes = assert_valid_or_refused(data)
    uri = "data:audio/wav;base64," + base64.b64encode(data).decode()
    from_uri = assert_valid_or_refused(uri)
    assert (from_bytes is None) == (from_uri is None)
    if from_bytes is not None:
        np.testing.assert_array_equal(from_bytes, from_uri)


@FUZZ
@given(st.text(max_size=80), st.text(alphabet=string.ascii_letters + string.digits + "+/=@!-_ ", max_size=200))
def test_data_uris_are_refused_or_decoded(header: str, payload: str) -> None:
    assert_valid_or_refused(f"data:{header},{payload}")


DTYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32",
          "float64", "bool", "complex64"]


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=40)
                 | st.sampled_from([(0,), (1,), (2, 0), (0, 2), (3, 1), (1, 3), (400, 2), (2, 400), (1200,)]))
    if dtype.kind == "f":
        elements = st.floats(allow_nan=True, allow_infinity=True, width=dtype.itemsize * 8)
    elif dtype.kind == "c":
        elements = st.complex_numbers(allow_nan=True, width=dtype.itemsize * 8)
    else:
        elements = None
    return draw(hnp.arrays(dtype, shape, elements=elements))


RATES = st.one_of(st.integers(-10, 2_000_000), st.sampled_from([8000, 16000, 44100, 96000, 1000, 768000]),
                  st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6), st.none(),
                  st.just(np.int64(22050)), st.just(np.array([16000])))


@FUZZ
@given(arrays(), RATES, st.sampled_from(["tuple", "gradio", "dict", "bare", "list"]))
def test_arrays_of_any_dtype_shape_and_rate(array: np.ndarray, rate: object, form: str) -> None:
    source: object = {
        "tuple": (array, rate), "gradio": (rate, array), "dict": {"array": array, "sampling_rate": rate},
        "bare": array, "list": (array.tolist(), rate),
    }[form]
    samples = assert_valid_or_refused(source)
    if samples is not None and form in ("tuple", "dict") and array.ndim == 1:
        expected = array.shape[0] * SAMPLE_RATE / int(rate)
        assert abs(len(samples) - expected) <= 2, "resampled length follows the duration"


@FEW
@given(st.lists(st.one_of(st.floats(), st.integers(), st.text(max_size=3), st.none(),
                          st.lists(st.floats(), max_size=3)), max_size=20), RATES)
def test_ragged_and_mixed_python_lists(values: list, rate: object) -> None:
    assert_valid_or_refused((values, rate))


def test_fuzz_seeds_are_valid_clips() -> None:
    """The corruption starts from clips that decode, so every refusal above is the corruption's doing."""
    for seed in SEEDS:
        assert assert_valid_or_refused(seed) is not None


# --- DataFlux parsers -----------------------------------------------------------------------------------------------
LINE_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"),
                                           blacklist_characters="\x1c\x1d\x1e\x85"), min_size=1, max_size=40)
OPTION = LINE_TEXT.filter(lambda s: s.strip() != "")


@st.composite
def questions(draw: st.DrawFn) -> tuple[str, list[str]]:
    stem = draw(OPTION)
    options = draw(st.lists(OPTION, min_size=4, max_size=4, unique_by=lambda o: o.strip().lower()))
    return stem, options


@FUZZ
@given(questions())
def test_question_layout_round_trips(question: tuple[str, list[str]]) -> None:
    stem, options = question
    text = format_question(stem, options)
    try:
        parsed_stem, parsed_options = parse_question(text)
    except ReplyError:
        # only a stem that itself looks like the option lines may be refused
        assume(False)
        return
    assert parsed_options == [o.strip() for o in options]
    assert parsed_stem == " ".join(stem.split()) or parsed_stem == stem.strip()
    assert parse_question(format_question(parsed_stem, parsed_options)) == (parsed_stem, parsed_options)


@st.composite
def generator_replies(draw: st.DrawFn) -> str:
    """Structured replies: a real is_success, questions mixing valid ones, mangled ones and other JSON values."""
    valid = st.builds(lambda q: format_question(*q), questions())
    mangled = valid.map(lambda q: q.replace("\nC.", "\nX.")) | valid.map(lambda q: q.rsplit("\n", 1)[0]) \
        | valid.map(lambda q: q.replace("\n", " "))
    other = st.one_of(st.none(), st.integers(), st.text(max_size=30), st.lists(st.text(max_size=5), max_size=3))
    items = draw(st.lists(st.one_of(valid, mangled, other), max_size=9))
    payload = {"is_success": draw(st.booleans()), "questions": items}
    if draw(st.booleans()):
        payload["extra"] = draw(st.text(max_size=10))
    wrapper = draw(st.sampled_from(["{}", "```json\n{}\n```", "Here you go: {} Hope it helps."]))
    return wrapper.replace("{}", json.dumps(payload))


@FUZZ
@given(generator_replies())
def test_generator_replies_keep_only_well_formed_questions(reply: str) -> None:
    try:
        result = parse_generator_reply(reply)
    except ReplyError:
        return
    assert set(result) == {"is_success", "questions"} and len(result["questions"]) <= 5
    for question in result["questions"]:
        stem, options = parse_question(question)
        assert len(options) == 4 and format_question(stem, options) == question


def case_and_space(value: str) -> st.SearchStrategy[str]:
    return st.sampled_from([value, value.lower(), f"  {value} ", value.title()])


@st.composite
def verdict_replies(draw: st.DrawFn) -> dict:
    """Verdicts that are nearly right: valid enums in any case and padding, booleans as strings, missing fields."""
    reply = {
        "consensus": draw(st.sampled_from([True, False, "true", "False", " TRUE ", "yes", 1, None])),
        "consistency_with_caption": draw(st.sampled_from(CONSISTENCY).flatmap(case_and_space) | st.text(max_size=8)),
        "winner": draw(st.sampled_from(WINNERS).flatmap(case_and_space) | st.just("MODEL_C")),
        "reasoning": draw(st.text(max_size=40) | st.integers()),
        "final_action": draw(st.sampled_from(FINAL_ACTIONS).flatmap(case_and_space)),
    }
    for key in draw(st.lists(st.sampled_from(sorted(reply)), max_size=2, unique=True)):
        del reply[key]
    return reply


@FUZZ
@given(verdict_replies())
def test_nearly_right_verdicts_are_normalised_or_refused(reply: dict) -> None:
    try:
        verdict = parse_verdict(json.dumps(reply))
    except ReplyError:
        return
    assert isinstance(verdict["consensus"], bool)
    assert verdict["consistency_with_caption"] in CONSISTENCY and verdict["winner"] in WINNERS
    assert verdict["final_action"] in FINAL_ACTIONS and verdict["reasoning"] == reply["reasoning"].strip()


@FUZZ
@given(st.lists(st.text(min_size=1, max_size=12), min_size=4, max_size=4), st.text(max_size=40),
       st.sampled_from(LETTERS))
def test_parse_choice_with_any_option_texts(options: list[str], reply: str, letter: str) -> None:
    """Options full of regex metacharacters, empty or overlapping: never an exception, always None or A-D."""
    assert parse_choice(reply, options) in (None, *LETTERS)
    assert parse_choice(f"{letter}.", options) == letter
    assert parse_choice(f"The answer is ({letter})", options) == letter


@FEW
@given(st.integers(1, 20_000), st.sampled_from(['{"a":', '{"a":[', "["]))
def test_extract_json_survives_pathological_nesting(depth: int, opener: str) -> None:
    """Deeply nested JSON (a recursion bomb for recursive parsers): a dict or ReplyError, never RecursionError."""
    closer = "".join("}" if c == "{" else "]" for c in opener if c in "{[")[::-1]
    text = opener * depth + "1" + closer * depth
    try:
        assert isinstance(extract_json(text), dict)
    except ReplyError:
        pass
    # stray braces before the object (fewer than the parser's bound on object starts it tries)
    assert extract_json("noise " + "{" * min(depth, 150) + ' {"ok": true} trailing') == {"ok": True}


NAME = st.text(alphabet=string.ascii_letters + string.digits + "_.-@", min_size=1, max_size=12)
PASSWORD = st.text(alphabet=st.characters(blacklist_characters=",\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029",
                                          blacklist_categories=("Cs",)), min_size=1, max_size=16) \
    .filter(lambda p: p == p.strip() and p != "")


@FUZZ
@given(st.dictionaries(NAME, PASSWORD, max_size=5), st.sampled_from([",", "\n", " ,\n  "]))
def test_reviewer_lists_round_trip(users: dict[str, str], separator: str) -> None:
    text = separator.join(f"{name}:{password}" for name, password in users.items())
    assert parse_users(text + "\n# a comment\n") == users


@FUZZ
@given(st.text(max_size=200))
def test_reviewer_list_parser_raises_only_value_error(text: str) -> None:
    try:
        users = parse_users(text)
    except ValueError as exc:
        assert "name:password" in str(exc)
        return
    assert all(name and name == name.strip() and password for name, password in users.items())
