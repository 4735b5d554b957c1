"""The OpenAI-compatible client and the VLM judge against a real local HTTP server."""

from __future__ import annotations

import base64
import io
import json
import time

import pytest
from PIL import Image

from lens_model.recipe import EndpointSection
from lens_model.rl.llm import LLMError, chat_json, extract_json
from lens_model.rl.rubrics import INTEGRITY
from lens_model.rl.vlm_judge import OpenAIJudge, question
from tests.fake_openai import FakeOpenAI, Fault

ASK = [{"role": "user", "content": "answer in JSON"}]


def endpoint(api: FakeOpenAI, **kw: object) -> EndpointSection:
    return EndpointSection(base_url=api.base_url, model="fake-model",
                           **{"timeout_s": 5.0, "max_retries": 2, **kw})


@pytest.mark.parametrize("text", [
    '{"a": 1}', 'Sure!\n```json\n{"a": 1}\n```\nDone.', '```\n{"a": 1}\n```',
    'Here it is: {"a": 1} -- hope that helps'])
def test_extract_json_accepts_bare_fenced_and_embedded(text: str) -> None:
    assert extract_json(text) == {"a": 1}


@pytest.mark.parametrize("text", ["no json here", "[1, 2]", "```json\n{broken\n```"])
def test_extract_json_refuses_non_objects(text: str) -> None:
    with pytest.raises(ValueError, match="no JSON object"):
        extract_json(text)


def test_chat_json_sends_model_messages_and_key(monkeypatch) -> None:
    monkeypatch.setenv("MY_KEY", "sekrit")
    with FakeOpenAI(lambda req: '```json\n{"ok": true}\n```') as api:
        assert chat_json(endpoint(api, key_variable="MY_KEY"), ASK, "test") == {"ok": True}
        monkeypatch.delenv("MY_KEY")
        chat_json(endpoint(api, key_variable="MY_KEY"), ASK, "test")
    assert api.requests[0]["model"] == "fake-model" and api.requests[0]["messages"] == ASK
    auth = [{k.lower(): v for k, v in h.items()}["authorization"] for h in api.headers]
    assert auth == ["Bearer sekrit", "Bearer EMPTY"]


def test_endpoint_from_environment_and_missing(monkeypatch) -> None:
    with FakeOpenAI(lambda req: '{"ok": 1}') as api:
        monkeypatch.setenv("LENS_LLM_BASE_URL", api.base_url)
        monkeypatch.setenv("LENS_LLM_MODEL", "env-model")
        assert chat_json(EndpointSection(), ASK, "test") == {"ok": 1}
    assert api.requests[0]["model"] == "env-model"
    monkeypatch.delenv("LENS_LLM_BASE_URL")
    with pytest.raises(LLMError, match="no base_url.*LENS_LLM_BASE_URL"):
        chat_json(EndpointSection(model="m"), ASK, "test")


def test_timeout_is_retried_a_bounded_number_of_times() -> None:
    with FakeOpenAI(lambda req: Fault(delay_s=1.0, content='{"late": 1}')) as api:
        start = time.perf_counter()
        with pytest.raises(LLMError) as err:
            chat_json(endpoint(api, timeout_s=0.3, max_retries=1), ASK, "caption item 'x'")
        took = time.perf_counter() - start
    assert len(api.requests) == 2 and took < 1.8
    msg = str(err.value)
    assert "caption item 'x'" in msg and "fake-model at http://127.0.0.1" in msg
    assert "after 2 tries" in msg and "timeout_s" in msg


def test_malformed_body_then_good_answer_succeeds() -> None:
    replies = iter([Fault(body=b"<html>oops"), Fault(status=503), "not json at all",
                    '{"n": 3}'])
    with FakeOpenAI(lambda req: next(replies)) as api:
        assert chat_json(endpoint(api, max_retries=3), ASK, "test") == {"n": 3}
    assert len(api.requests) == 4


def test_non_json_content_fails_after_retries_with_the_last_error() -> None:
    with FakeOpenAI(lambda req: "I cannot answer in JSON, sorry") as api:
        with pytest.raises(LLMError, match="after 3 tries.*no JSON object"):
            chat_json(endpoint(api), ASK, "test")
    assert len(api.requests) == 3


def test_check_rejections_are_retried_and_client_errors_are_not() -> None:
    answers = iter(['{"n": -1}', '{"n": 2}'])

    def positive(answer: dict) -> None:
        if answer["n"] < 0:
            raise ValueError("n must be positive")

    with FakeOpenAI(lambda req: next(answers)) as api:
        assert chat_json(endpoint(api), ASK, "test", check=positive) == {"n": 2}
    with FakeOpenAI(lambda req: Fault(status=401)) as api:
        with pytest.raises(LLMError, match="HTTP 401.*key_variable|HTTP 401.*LENS_LLM_API_KEY"):
            chat_json(endpoint(api), ASK, "test")
    assert len(api.requests) == 1  # a refused key is not asked again


def test_credentials_in_the_url_stay_out_of_errors() -> None:
    with FakeOpenAI(lambda req: "nope") as api:
        url = api.base_url.replace("http://", "http://user:pw@")
        with pytest.raises(LLMError) as err:
            chat_json(EndpointSection(base_url=url, model="m", max_retries=0), ASK, "test")
    assert "pw" not in str(err.value) and "127.0.0.1" in str(err.value)


# ---------------------------------------------------------------- the VLM judge

RUBRICS = {"circle_count": {"kind": "count", "shape": "circle", "color": "red", "count": 2},
           "sky": {"kind": "question", "text": "Is the sky blue?"}}


def _asked(req: dict) -> tuple[dict[str, str], Image.Image]:
    """The rubric questions and the image a judge request carries."""
    text, image = req["messages"][-1]["content"]
    questions = json.loads(text["text"].split("\n", 1)[1].rsplit("\nAnswer", 1)[0])
    url = image["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    return questions, Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def test_judge_sends_png_and_questions_and_reads_verdicts() -> None:
    def handler(req: dict) -> str:
        questions, image = _asked(req)
        # the image's width says which verdict to give, so answers can be told apart
        return json.dumps({name: int(image.width == 32) for name in questions})

    images = [Image.new("RGB", (32, 32), "red"), Image.new("RGB", (40, 24), "blue")]
    with FakeOpenAI(handler) as api:
        got = OpenAIJudge(endpoint(api)).judge(images, [RUBRICS, RUBRICS])
    assert got[0].passed == {"circle_count": True, "sky": True, INTEGRITY: True}
    assert got[1].passed == {"circle_count": False, "sky": False, INTEGRITY: False}
    assert got[0].reward == 1.0 and got[1].reward == 0.0
    questions, image = _asked(api.requests[0])
    assert questions["circle_count"] == "Are there exactly 2 red circles?"
    assert questions["sky"] == "Is the sky blue?" and "stray" in questions[INTEGRITY]


def test_judge_gives_none_after_retries_never_a_silent_zero() -> None:
    def handler(req: dict) -> str | Fault:
        questions, image = _asked(req)
        if image.width == 40:
            return json.dumps({"sky": 1})  # never answers every rubric
        if image.width == 48:
            return Fault(delay_s=1.0)
        return json.dumps({name: 1 for name in questions})

    images = [Image.new("RGB", (w, 24)) for w in (32, 40, 48)]
    with FakeOpenAI(handler) as api:
        got = OpenAIJudge(endpoint(api, timeout_s=0.4, max_retries=1)).judge(
            images, [RUBRICS] * 3)
    assert got[0] is not None and all(got[0].passed.values())
    assert got[1] is None and got[2] is None
    assert len(api.requests) == 1 + 2 + 2


def test_judge_refuses_mismatched_lists_and_missing_endpoint(monkeypatch) -> None:
    monkeypatch.delenv("LENS_LLM_BASE_URL", raising=False)
    with pytest.raises(LLMError, match="base_url"):
        OpenAIJudge(EndpointSection(model="m"))
    with FakeOpenAI(lambda req: "{}") as api:
        with pytest.raises(ValueError, match="one rubric set per image"):
            OpenAIJudge(endpoint(api)).judge([Image.new("RGB", (8, 8))], [])


@pytest.mark.parametrize("check, text", [
    ({"kind": "present", "shape": None, "color": "blue"}, "Is there at least one blue object?"),
    ({"kind": "color", "shape": "star", "color": "pink"},
     "Is there a star, and is every star pink?"),
    ({"kind": "size", "shape": "square", "size": "large"}, "Is some square large"),
    ({"kind": "relation", "type": "left of", "a": {"shape": "cross", "color": None},
      "b": {"shape": "star", "color": "red"}}, "Is a cross left of a red star?"),
    ({"kind": "total", "count": 3}, "Are there exactly 3 objects"),
])
def test_every_shapes_check_becomes_a_question(check: dict, text: str) -> None:
    assert question(check).startswith(text)
