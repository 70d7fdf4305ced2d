"""``--reasoning-parser qwen3`` through a real server with the real Qwen3 tokenizer and chat template (a tiny random
model: a regex grammar makes it write a thinking block, as it would never do by itself), ``chat_template_kwargs``
reaching the template, reasoning before a Hermes tool call, a named tool_choice, n > 1 at temperature 0, and the
flags' errors. Skipped where the shared tokenizer assets are absent (except the tests on the shared server)."""

from __future__ import annotations

import json

import httpx
import pytest

from pagedllm.entrypoints.cli import main
from tests.entrypoints.openai.conftest import ENGINE_FLAGS, RemoteServer
from tests.utils import ASSETS, build_tiny_model

QWEN3_TOKENIZER = ASSETS / "tokenizers" / "qwen3"
needs_qwen3 = pytest.mark.skipif(not QWEN3_TOKENIZER.is_dir(), reason="no Qwen3 tokenizer in the shared assets")

USER = [{"role": "user", "content": "What is 2 + 2?"}]
THINKING = r"<think>\nI add 2 and 2[.]\n</think>\n\nIt is 4[.]"
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}
THINK_THEN_CALL = (r'<think>\nI need the time[.]\n</think>\n\n<tool_call>\n\{"name": "get_time", "arguments": '
                   r'\{"zone": "(UTC|CET)"\}\}\n</tool_call>')


@pytest.fixture(scope="module")
def qwen3_server(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random Qwen3 with the real tokenizer (its ids for <|im_end|> and friends), serving with reasoning and
    Hermes tool calls."""
    if not QWEN3_TOKENIZER.is_dir():
        pytest.skip("no Qwen3 tokenizer in the shared assets")
    from transformers import AutoTokenizer

    model_dir = build_tiny_model(tmp_path_factory.mktemp("qwen3_reasoning"), "qwen3", vocab_size=151936,
                                 max_position_embeddings=1024, bos_token_id=151643, eos_token_id=151645,
                                 pad_token_id=151643)
    AutoTokenizer.from_pretrained(str(QWEN3_TOKENIZER)).save_pretrained(model_dir)
    remote = RemoteServer(model_dir, [*ENGINE_FLAGS, "--served-model-name", "qwen3-tiny", "--reasoning-parser", "qwen3",
                                      "--enable-auto-tool-choice", "--tool-call-parser", "hermes"],
                          tmp_path_factory.mktemp("qwen3_reasoning_logs"))
    yield remote
    remote.terminate()


def _guided(regex: str) -> dict:
    return {"model": "qwen3-tiny", "messages": USER, "temperature": 0.0, "max_tokens": 80,
            "extra_body": {"structured_outputs": {"regex": regex}}}


def _stream_parts(stream) -> tuple[str, str, list, str | None]:
    """(reasoning, content, tool-call deltas, finish reason) of a one-choice stream; no chunk mixes reasoning
    with anything else."""
    reasoning, content, calls, finish = "", "", [], None
    for chunk in stream:
        for choice in chunk.choices:
            delta_reasoning = getattr(choice.delta, "reasoning_content", None)
            assert not (delta_reasoning and (choice.delta.content or choice.delta.tool_calls))
            reasoning += delta_reasoning or ""
            content += choice.delta.content or ""
            calls += choice.delta.tool_calls or []
            finish = choice.finish_reason or finish
    return reasoning, content, calls, finish


@needs_qwen3
def test_reasoning_content_whole_and_streamed(qwen3_server):
    client = qwen3_server.client()
    whole = client.chat.completions.create(**_guided(THINKING))
    (choice,) = whole.choices
    assert choice.message.reasoning_content == "\nI add 2 and 2.\n"
    assert choice.message.content == "\n\nIt is 4."
    assert choice.finish_reason == "stop"
    reasoning, content, calls, finish = _stream_parts(client.chat.completions.create(stream=True, **_guided(THINKING)))
    assert (reasoning, content, calls, finish) == ("\nI add 2 and 2.\n", "\n\nIt is 4.", [], "stop")
    hidden = client.chat.completions.create(**{**_guided(THINKING), "extra_body": {
        "structured_outputs": {"regex": THINKING}, "include_reasoning": False}})
    assert hidden.choices[0].message.reasoning_content is None
    assert hidden.choices[0].message.content == "\n\nIt is 4."


@needs_qwen3
def test_enable_thinking_false_reaches_the_template_and_turns_reasoning_off(qwen3_server):
    client = qwen3_server.client()
    kwargs = {"chat_template_kwargs": {"enable_thinking": False}}
    with httpx.Client(base_url=qwen3_server.base_url, timeout=60) as http:
        tokens = http.post("/tokenize", json={"messages": USER, **kwargs}).json()["tokens"]
        prompt = http.post("/detokenize", json={"tokens": tokens}).json()["prompt"]
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # Qwen3's template, told no thinking
    completion = client.chat.completions.create(**{**_guided(THINKING), "extra_body": {
        "structured_outputs": {"regex": THINKING}, **kwargs}})
    assert completion.choices[0].message.reasoning_content is None
    assert completion.choices[0].message.content == "<think>\nI add 2 and 2.\n</think>\n\nIt is 4."


@needs_qwen3
def test_tool_call_after_reasoning(qwen3_server):
    client = qwen3_server.client()
    request = {**_guided(THINK_THEN_CALL), "tools": [TIME_TOOL]}
    (choice,) = client.chat.completions.create(**request).choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.reasoning_content == "\nI need the time.\n"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_time" and json.loads(call.function.arguments)["zone"] in ("UTC", "CET")
    reasoning, content, calls, finish = _stream_parts(client.chat.completions.create(stream=True, **request))
    assert (reasoning, content, finish) == ("\nI need the time.\n", "", "tool_calls")
    assert calls[0].function.name == "get_time"
    assert "".join(delta.function.arguments or "" for delta in calls) == call.function.arguments


@needs_qwen3
def test_named_tool_choice_is_a_call_without_reasoning(qwen3_server):
    """A named function is a grammar from the first token: the model cannot think first; the output is the call."""
    client = qwen3_server.client()
    (choice,) = client.chat.completions.create(
        model="qwen3-tiny", messages=USER, tools=[TIME_TOOL], max_tokens=40, temperature=0.0,
        tool_choice={"type": "function", "function": {"name": "get_time"}}).choices
    assert choice.finish_reason == "tool_calls" and choice.message.reasoning_content is None
    assert choice.message.content is None
    assert json.loads(choice.message.tool_calls[0].function.arguments)["zone"] in ("UTC", "CET")


def test_n_greedy_choices_through_the_server(client):
    """n > 1 at temperature 0 answers n choices of the same greedy text (it used to be a 400)."""
    completion = client.chat.completions.create(model="tiny", messages=USER, n=2, temperature=0.0, max_tokens=12)
    assert [choice.index for choice in completion.choices] == [0, 1]
    assert completion.choices[0].message.content == completion.choices[1].message.content
    assert completion.usage.completion_tokens == 2 * 12 or completion.choices[0].finish_reason == "stop"
    texts = {0: "", 1: ""}
    for chunk in client.chat.completions.create(model="tiny", messages=USER, n=2, temperature=0.0, max_tokens=12,
                                                stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts[0] == texts[1] == completion.choices[0].message.content


@pytest.mark.slow
def test_tool_choice_auto_needs_the_flag(server_model_dir, tmp_path):
    """Without --enable-auto-tool-choice, tools with tool_choice "auto" (or none given) are a 400 saying so, as in
    vLLM; named and "required" choices still work."""
    from fastapi.testclient import TestClient

    from pagedllm.config import EngineArgs
    from pagedllm.engine.async_engine import AsyncEngine
    from pagedllm.entrypoints.openai.server import ServerConfig, build_app
    from tests.entrypoints.openai.conftest import ENGINE_KWARGS

    engine = AsyncEngine.from_engine_args(EngineArgs(model=server_model_dir, **ENGINE_KWARGS))
    try:
        http = TestClient(build_app(engine, ServerConfig(served_model_names=("tiny",))))
        body = {"messages": USER, "tools": [TIME_TOOL], "max_tokens": 4}
        for extra in ({}, {"tool_choice": "auto"}):
            response = http.post("/v1/chat/completions", json={**body, **extra})
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["param"] == "tool_choice" and "--enable-auto-tool-choice" in error["message"]
        named = {"tool_choice": {"type": "function", "function": {"name": "get_time"}}, "max_tokens": 30}
        assert http.post("/v1/chat/completions", json={**body, **named}).status_code == 200
    finally:
        engine.shutdown()


def test_flag_errors(server_model_dir, capsys):
    with pytest.raises(SystemExit):
        main(["serve", server_model_dir, "--reasoning-parser", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", server_model_dir, "--tool-call-parser", "nope"])
    assert "choose from" in capsys.readouterr().err
    assert main(["serve", server_model_dir, "--enable-auto-tool-choice", "--device", "cpu"]) == 2
    assert "--enable-auto-tool-choice needs --tool-call-parser" in capsys.readouterr().err


def test_chat_template_kwargs_are_bounded(http):
    for kwargs, words in (({"tokenize": True}, "tokenize"), ({f"k{i}": i for i in range(65)}, "at most 64"),
                          ({"big": "x" * 70_000}, "characters")):
        response = http.post("/v1/chat/completions", json={"messages": USER, "chat_template_kwargs": kwargs})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "chat_template_kwargs" and words in error["message"]
