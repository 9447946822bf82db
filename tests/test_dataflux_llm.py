"""LLM-facing parts of DataFlux: reply parsers (property-based) and a protocol test against a local HTTP server.

The server on 127.0.0.1 serves canned but valid OpenAI-style replies. It only checks the wire protocol and the
prompt structure (category path, exemplars, caption, rules; both answers for the judge) — not any model quality.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from dataflux_helpers import FixedAnswerer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from dataflux_ui.answers import EndpointAnswerer, parse_choice
from dataflux_ui.core import AnswerResult, ClipContext, JudgeInput, parse_question
from dataflux_ui.judge import LLMJudge, RuleJudge, parse_verdict
from dataflux_ui.llm import OpenAIChat, ReplyError, extract_json
from dataflux_ui.models import Clip, Generation, Verdict
from dataflux_ui.pipeline import Components, PipelineConfig, run_pipeline
from dataflux_ui.questions import LLMQuestionGenerator, OfflineQuestionGenerator, parse_generator_reply
from dataflux_ui.store import open_store
from dataflux_ui.taxonomy import load_taxonomy
from model.data import generate_clip, generate_dataset

QUESTION = "What is the gender of the speaker?\nA. Male\nB. Female\nC. A young child\nD. A robot voice"
GOOD_QUESTIONS = {"is_success": True, "questions": [QUESTION.replace("the speaker", f"speaker {i}")
                                                    for i in range(5)]}
GOOD_VERDICT = {"consensus": False, "consistency_with_caption": "STRONG_MATCH", "winner": "MODEL_B",
                "reasoning": "The caption says a female speaker.", "final_action": "KEEP_USING_WINNER"}
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                           max_leaves=12)


# --- parsers never crash --------------------------------------------------------------------------------------------
@PROPERTY
@given(st.one_of(st.text(), json_values.map(json.dumps), st.none(), st.integers()))
def test_parsers_raise_only_reply_error(reply):
    for parse in (extract_json, parse_generator_reply, parse_verdict, parse_question):
        try:
            result = parse(reply)
        except ReplyError:
            continue
        assert isinstance(result, dict | tuple)


@PROPERTY
@given(st.text(max_size=30), st.text(max_size=30), st.sampled_from(["```json\n{}\n```", "{}", "Sure! {} Done."]))
def test_valid_json_is_found_in_noise(prefix, suffix, wrapper):
    for payload, parse in ((GOOD_VERDICT, parse_verdict), (GOOD_QUESTIONS, parse_generator_reply)):
        reply = prefix.replace("{", "(") + wrapper.replace("{}", json.dumps(payload)) + suffix.replace("{", "(")
        assert parse(reply) == payload


@PROPERTY
@given(st.dictionaries(st.sampled_from(list(GOOD_VERDICT) + ["extra"]), json_values, max_size=7))
def test_verdict_validation(data):
    try:
        verdict = parse_verdict(json.dumps(data))
    except ReplyError:
        return
    assert list(verdict) == list(GOOD_VERDICT)
    assert not (verdict["final_action"] == "KEEP_USING_WINNER" and verdict["winner"] == "NONE")


@PROPERTY
@given(st.text(max_size=80))
def test_parse_choice_total(reply):
    assert parse_choice(reply, ["Male", "Female", "A young child", "A robot voice"]) in (None, "A", "B", "C", "D")


def test_parser_messages_are_clear():
    with pytest.raises(ReplyError, match="no JSON object"):
        extract_json("I cannot help with that.")
    with pytest.raises(ReplyError, match="winner"):
        parse_verdict(json.dumps({**GOOD_VERDICT, "winner": "MODEL_C"}))
    with pytest.raises(ReplyError, match="needs a winner"):
        parse_verdict(json.dumps({**GOOD_VERDICT, "winner": "NONE"}))
    with pytest.raises(ReplyError, match="lacks"):
        parse_verdict('{"consensus": true}')
    with pytest.raises(ReplyError, match="no question"):
        parse_generator_reply('{"is_success": true, "questions": ["just a sentence"]}')
    assert parse_generator_reply('{"is_success": false, "questions": ["x"]}') == {"is_success": False,
                                                                                 "questions": []}
    mentions = QUESTION.replace("the speaker?", "the speaker according to the caption?")
    assert parse_generator_reply(json.dumps({"is_success": True, "questions": [mentions, QUESTION]})) == {
        "is_success": True, "questions": [QUESTION]}
    deep = "[" * 100000 + "]" * 100000
    with pytest.raises(ReplyError):
        extract_json(deep)


def test_parse_choice_reads_common_replies():
    options = ["Male", "Female", "A young child", "A robot voice"]
    replies = {"B": "B", "B. Female": "B", "(C)": "C", "A young child": "C", "Answer: D": "D",
               "The answer is C.": "C", "female": "B", "<THINK>hm</THINK><RESPONSE>D. A robot voice</RESPONSE>": "D",
               "Male": "A", "": None, "no idea": None}
    assert {reply: parse_choice(reply, options) for reply in replies} == replies


# --- offline generator and rule judge -------------------------------------------------------------------------------
def test_offline_generator_follows_the_published_format():
    taxonomy = {c.key: c for c in load_taxonomy()}
    _, meta = generate_clip(0, "train", seed=0)  # speech + noise
    clip = ClipContext(path="x.wav", seed=3, meta=meta)
    generated = OfflineQuestionGenerator().generate(taxonomy["gender"], clip)
    assert set(generated.reply) == {"is_success", "questions"} and generated.reply["is_success"]
    assert len(generated.reply["questions"]) == 5 == len(set(generated.reply["questions"]))
    for question, key in zip(generated.reply["questions"], generated.keys, strict=True):
        _, options = parse_question(question)
        assert options[["A", "B", "C", "D"].index(key)] == meta["events"][0]["gender"].capitalize()
    again = OfflineQuestionGenerator().generate(taxonomy["gender"], clip)
    assert again.reply == generated.reply  # seeded
    assert OfflineQuestionGenerator().generate(taxonomy["chord"], clip).reply == {"is_success": False,
                                                                                  "questions": []}


def test_taxonomy_leaves_have_exemplars_in_the_published_layout():
    leaves = load_taxonomy()
    assert len(leaves) >= 15 and all(len(c.levels) == 4 for c in leaves)
    for leaf in leaves:
        assert 2 <= len(leaf.exemplars) <= 3
        for exemplar in leaf.exemplars:
            parse_question(exemplar)


def _answer(letter):
    return AnswerResult("m", "trace", letter, f"{letter}. x" if letter else "", letter or "?")


@pytest.mark.parametrize(("a", "b", "winner", "action"), [
    ("B", "C", "MODEL_A", "KEEP_USING_WINNER"), ("C", "B", "MODEL_B", "KEEP_USING_WINNER"),
    ("B", "B", "TIE", "KEEP_USING_WINNER"), ("A", "C", "NONE", "DISCARD"), (None, None, "NONE", "DISCARD"),
])
def test_rule_judge_published_outcomes(a, b, winner, action):
    item = JudgeInput("P > S > G > Gender", "a female speaker says hello", QUESTION,
                      ["Male", "Female", "A young child", "A robot voice"], _answer(a), _answer(b), key="B")
    verdict = RuleJudge().judge(item)
    assert list(verdict) == list(GOOD_VERDICT)
    assert (verdict["winner"], verdict["final_action"]) == (winner, action)
    caption_only = RuleJudge(use_key=False).judge(item)  # "Female" is the only option the caption names
    assert (caption_only["winner"], caption_only["final_action"]) == (winner, action)


# --- a local OpenAI-compatible server -------------------------------------------------------------------------------
class FakeLLM(ThreadingHTTPServer):
    """Serves /v1/chat/completions with canned, valid replies; records every request."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict] = []
        self.bad_replies = 0  # answer this many requests with junk first

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server: FakeLLM = self.server
        server.requests.append({"path": self.path, "body": body})
        prompt = json.dumps(body["messages"])
        if server.bad_replies > 0:
            server.bad_replies -= 1
            text = "Sorry, I am not sure."
        elif "input_audio" in prompt:
            text = "<THINK>A high, breathy voice.</THINK><RESPONSE>B. Female</RESPONSE>"
        elif "Model A:" in prompt:
            text = "```json\n" + json.dumps(GOOD_VERDICT) + "\n```"
        else:
            text = "Here you go: " + json.dumps(GOOD_QUESTIONS)
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def fake_llm():
    server = FakeLLM()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_llm_generator_judge_and_answerer_protocol(fake_llm, tmp_path):
    chat = OpenAIChat(fake_llm.url, model="judge-model")
    category = {c.key: c for c in load_taxonomy()}["gender"]
    clip = ClipContext(path=str(tmp_path / "a.wav"), seed=1, caption="A female speaker says hello.")
    generated = LLMQuestionGenerator(chat).generate(category, clip)
    assert generated.reply == GOOD_QUESTIONS and generated.keys == [None] * 5
    request = fake_llm.requests[-1]
    assert request["path"] == "/v1/chat/completions" and request["body"]["model"] == "judge-model"
    user = request["body"]["messages"][-1]["content"]
    assert category.path in user and category.exemplars[0] in user and clip.caption in user
    assert "is_success" in user and "caption" in user  # the rules

    item = JudgeInput(category.path, clip.caption, QUESTION, ["Male", "Female", "A young child", "A robot voice"],
                      _answer("A"), _answer("B"))
    assert LLMJudge(chat).judge(item) == GOOD_VERDICT
    user = fake_llm.requests[-1]["body"]["messages"][-1]["content"]
    assert "Model A:\n<THINK>trace</THINK><RESPONSE>A. x</RESPONSE>" in user and "Model B:" in user
    assert clip.caption in user and category.path in user

    fake_llm.bad_replies = 1  # one junk reply: retried, then fine
    assert LLMJudge(chat).judge(item) == GOOD_VERDICT
    fake_llm.bad_replies = 10
    with pytest.raises(ReplyError, match="no usable verdict"):
        LLMJudge(chat).judge(item)
    fake_llm.bad_replies = 0

    import soundfile as sf

    sf.write(tmp_path / "a.wav", [0.0] * 1600, 16000)
    (result,) = EndpointAnswerer(chat).answer(clip, [QUESTION])
    assert (result.chosen_option, result.response, result.reasoning) == ("B", "B. Female", "A high, breathy voice.")
    content = fake_llm.requests[-1]["body"]["messages"][0]["content"]
    assert content[0]["type"] == "input_audio" and content[0]["input_audio"]["format"] == "wav"


def test_pipeline_with_llm_generator_and_judge(fake_llm, tmp_path, tiny):
    generate_dataset(tmp_path / "data", 2, 0, 0, seed=2, workers=1)
    store = open_store(tmp_path / "llm.sqlite")
    config = PipelineConfig(captioner="reference", generator="llm", judge="llm", llm_url=fake_llm.url,
                            categories_per_clip=1)
    components = Components(config, model=tiny)
    components.answerers = (FixedAnswerer("A"), FixedAnswerer("B"))
    result = run_pipeline(store, tmp_path / "data", components=components, progress=False)
    assert result["complete_clips"] == 2 and result["questions"] == 10 and result["kept"] == 10
    with store.session() as session:
        assert all(v.winner == "MODEL_B" for v in session.scalars(select(Verdict)))
        assert all(g.generator.startswith("llm:") for g in session.scalars(select(Generation)))
    fake_llm.bad_replies = 100  # a broken endpoint: the clip's error is recorded, the run goes on
    generate_dataset(tmp_path / "more", 1, 0, 0, seed=99, workers=1)
    result = run_pipeline(store, tmp_path / "more", components=components, progress=False)
    assert result["failed_clips"] == 1
    with store.session() as session:
        assert "ReplyError" in session.scalars(select(Clip).where(Clip.error.is_not(None))).one().error
    store.close()
