"""LangChain's ``ChatOpenAI`` against the shared server: invoke, stream, ``bind_tools`` forcing a tool, and
``with_structured_output`` (JSON schema and function calling). The model has random weights: the answers are
checked for their shape, and grammars make the forced outputs valid."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, Field

langchain_openai = pytest.importorskip("langchain_openai")


class Weather(BaseModel):
    """The weather in a city."""

    city: str = Field(pattern="^[A-Za-z]{1,8}$")
    days: int = Field(ge=1, le=7)


def _chat(server, max_tokens: int):
    return langchain_openai.ChatOpenAI(model="tiny", base_url=server.url_for("/v1"), api_key=server.api_key,
                                       max_tokens=max_tokens, temperature=0.0, max_retries=0, timeout=120)


@pytest.fixture
def chat(server):
    return _chat(server, 40)


@pytest.fixture
def long_chat(server):
    """Room for a forced call: the random model may write long strings where the schema lets it."""
    return _chat(server, 200)


def test_invoke_and_stream(chat):
    message = chat.invoke("Say hello.")
    assert isinstance(message.content, str) and message.content
    assert message.response_metadata["finish_reason"] in ("stop", "length")
    assert message.usage_metadata["output_tokens"] > 0
    streamed = "".join(chunk.content for chunk in chat.stream("Say hello."))
    assert streamed == message.content  # greedy: the same text, streamed


def test_bind_tools_forcing_a_tool(long_chat):
    def get_time(zone: str) -> str:
        """The time in a zone."""
        return "12:00"

    forced = long_chat.bind_tools([get_time, Weather], tool_choice="Weather")
    message = forced.invoke("What is the weather in Paris?")
    assert message.response_metadata["finish_reason"] == "tool_calls", message
    (call,) = message.tool_calls
    assert call["name"] == "Weather" and set(call["args"]) == {"city", "days"}
    assert isinstance(call["args"]["city"], str) and isinstance(call["args"]["days"], int)
    assert call["id"].startswith("call_")
    chunks = list(forced.stream("What is the weather in Paris?"))
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    assert [tool_call["name"] for tool_call in merged.tool_calls] == ["Weather"]
    assert merged.tool_calls[0]["args"] == call["args"]  # greedy: the same call, streamed


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output(long_chat, method):
    structured = long_chat.with_structured_output(Weather, method=method)
    weather = structured.invoke("What is the weather in Paris?")
    assert isinstance(weather, Weather) and 1 <= weather.days <= 7
