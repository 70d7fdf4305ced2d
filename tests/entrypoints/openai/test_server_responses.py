"""``POST /v1/responses`` (OpenAI's Responses API) through a real server and the ``openai`` client: whole and
streamed responses (the event sequence the SDK reads, the same text as a whole response at temperature 0),
instructions, max_output_tokens, text.format through the grammar, a function-tool round trip with
previous_response_id, and 400s for what the server cannot honour. The model has random weights: grammars (a
json_schema format, a forced function) make the outputs valid and make generation end by itself."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import openai
import pytest

from pagedllm.entrypoints.openai.protocol import DeltaFunctionCall, DeltaMessage, DeltaToolCall
from pagedllm.entrypoints.openai.protocol_responses import ResponsesRequest, ResponsesResponse
from pagedllm.entrypoints.openai.response_store import ResponseStore, StoredResponse
from pagedllm.entrypoints.openai.responses_output import ResponseStreamWriter
from pagedllm.entrypoints.openai.serving_responses import input_messages, output_messages
from tests.utils import ASSETS

CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "pattern": "^[a-z]{1,6}$"},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
CITY_FORMAT = {"format": {"type": "json_schema", "name": "city", "schema": CITY, "strict": True}}
WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "Weather forecast", "parameters": CITY}
FORCE_WEATHER = {"type": "function", "name": "get_weather"}


def _create(client, **kwargs):
    return client.responses.create(model="tiny", temperature=0, **kwargs)


def _events(client, **kwargs) -> list:
    with client.responses.create(model="tiny", temperature=0, stream=True, **kwargs) as stream:
        return list(stream)


# ---- whole responses ---------------------------------------------------------------------------------------------


def test_plain_response(client):
    response = _create(client, input="Once upon a time", max_output_tokens=8, metadata={"k": "v"}, user="u1")
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.model == "tiny" and response.metadata == {"k": "v"} and response.user == "u1"
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.content[0].type == "output_text" and response.output_text == message.content[0].text
    usage = response.usage
    assert usage.input_tokens > 0 and 0 < usage.output_tokens <= 8
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


def test_max_output_tokens_makes_it_incomplete(client):
    response = _create(client, input="Once upon a time", max_output_tokens=4)
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 4
    assert response.output[0].status == "incomplete"


def test_instructions_come_first_as_a_system_message(client, http):
    response = _create(client, input="Hello", instructions="Answer in French.", max_output_tokens=2)
    assert response.instructions == "Answer in French."
    tokenized = http.post("/tokenize", json={"model": "tiny", "messages": [
        {"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"}]}).json()
    assert response.usage.input_tokens == tokenized["count"]


def test_input_items_render_like_the_chat_conversation(client, http):
    items = [{"role": "developer", "content": "Be brief."},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
             {"role": "assistant", "content": [{"type": "output_text", "text": "Hello!"}]},
             {"role": "user", "content": "Bye"}]
    response = _create(client, input=items, max_output_tokens=2)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    tokenized = http.post("/tokenize", json={"model": "tiny", "messages": messages}).json()
    assert response.usage.input_tokens == tokenized["count"]


def test_json_schema_text_format_is_valid_json(client):
    response = _create(client, input="A city as JSON", text=CITY_FORMAT, max_output_tokens=80)
    assert response.status == "completed", response
    jsonschema.validate(json.loads(response.output_text), CITY)
    assert response.text.format.type == "json_schema"


# ---- streams -----------------------------------------------------------------------------------------------------


def test_stream_events_in_order_with_the_whole_response_text(client):
    whole = _create(client, input="A city as JSON", text=CITY_FORMAT, max_output_tokens=80)
    events = _events(client, input="A city as JSON", text=CITY_FORMAT, max_output_tokens=80)
    types = [event.type for event in events]
    num_deltas = types.count("response.output_text.delta")
    assert num_deltas >= 1
    assert types == (["response.created", "response.in_progress", "response.output_item.added",
                      "response.content_part.added"] + ["response.output_text.delta"] * num_deltas
                     + ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                        "response.completed"])
    assert [event.sequence_number for event in events] == list(range(len(events)))
    streamed = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert streamed == whole.output_text
    assert events[-2].item.content[0].text == streamed and events[-2].item.status == "completed"
    final = events[-1].response
    assert final.id == events[0].response.id and final.status == "completed" and final.output_text == streamed
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_stream_helper_gives_the_final_response(client):
    with client.responses.stream(model="tiny", input="A city as JSON", text=CITY_FORMAT, temperature=0,
                                 max_output_tokens=80) as stream:
        final = stream.get_final_response()
    jsonschema.validate(json.loads(final.output_text), CITY)


def test_stream_cut_by_max_output_tokens_ends_incomplete(client):
    whole = _create(client, input="Once upon a time", max_output_tokens=6)
    events = _events(client, input="Once upon a time", max_output_tokens=6)
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    assert events[-2].item.status == "incomplete"
    assert events[-1].response.output_text == whole.output_text


# ---- tools and previous_response_id ------------------------------------------------------------------------------


def test_function_tool_round_trip_with_previous_response_id(client):
    first = _create(client, input="Weather in Paris?", tools=[WEATHER_TOOL], tool_choice=FORCE_WEATHER,
                    max_output_tokens=60)
    assert first.status == "completed", first
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    assert call.id.startswith("fc_")
    jsonschema.validate(json.loads(call.arguments), CITY)

    second = _create(client, previous_response_id=first.id, tools=[WEATHER_TOOL], max_output_tokens=4,
                     input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"}])
    assert second.previous_response_id == first.id
    # the second prompt holds the whole first turn (its call included) and the call's output
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens


def test_streamed_function_call_arguments(client):
    events = _events(client, input="Weather in Paris?", tools=[WEATHER_TOOL], tool_choice=FORCE_WEATHER,
                     max_output_tokens=60)
    types = [event.type for event in events]
    assert types[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert types[-3:] == ["response.function_call_arguments.done", "response.output_item.done",
                          "response.completed"]
    added, done = events[2].item, events[-2].item
    assert added.type == "function_call" and added.arguments == "" and added.call_id == done.call_id
    arguments = "".join(event.delta for event in events if event.type == "response.function_call_arguments.delta")
    assert arguments == events[-3].arguments == done.arguments
    jsonschema.validate(json.loads(arguments), CITY)
    assert events[-1].response.output[0].arguments == arguments


def test_chained_responses_keep_the_conversation(client):
    first = _create(client, input="Hello", instructions="Be brief.", max_output_tokens=3)
    second = _create(client, input="And then?", previous_response_id=first.id, max_output_tokens=3)
    # instructions are not carried over; the first turn's input and output are
    assert second.usage.input_tokens > first.usage.output_tokens
    assert second.instructions is None


def test_unknown_previous_response_id_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as error:
        _create(client, input="Hi", previous_response_id="resp_unknown", max_output_tokens=2)
    assert error.value.body["code"] == "previous_response_not_found"
    assert error.value.body["param"] == "previous_response_id"


def test_a_response_not_stored_cannot_be_continued(client):
    first = _create(client, input="Hi", store=False, max_output_tokens=2)
    assert first.store is False
    with pytest.raises(openai.BadRequestError):
        _create(client, input="Hi", previous_response_id=first.id, max_output_tokens=2)


# ---- refused ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "param"), [
    ({"background": True}, "background"),
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"truncation": "auto"}, "truncation"),
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
    ({"input": [{"type": "web_search_call", "id": "ws_1"}]}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
    ({"tools": [WEATHER_TOOL], "tool_choice": "required", "text": CITY_FORMAT}, "tool_choice"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"max_output_tokens": 5000}, "max_output_tokens"),
    ({"input": []}, "input"),
])
def test_what_the_server_cannot_honour_is_a_400(http, body, param):
    response = http.post("/v1/responses", json={"model": "tiny", "input": "Hi", **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error


def test_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="nope", input="Hi")


# ---- without a server --------------------------------------------------------------------------------------------


def _stored(response_id: str) -> StoredResponse:
    return StoredResponse(ResponsesResponse(id=response_id, status="completed", model="m"), ())


def test_store_drops_the_least_recently_used():
    store = ResponseStore(max_entries=2)
    for response_id in ("a", "b"):
        store.put(_stored(response_id))
    assert store.get("a") is not None  # now "b" is the least recently used
    store.put(_stored("c"))
    assert store.get("b") is None and store.get("a") is not None and store.get("c") is not None
    assert len(store) == 2
    off = ResponseStore(max_entries=0)
    off.put(_stored("a"))
    assert off.get("a") is None


def test_function_calls_join_the_assistant_turn():
    request = ResponsesRequest.model_validate({"input": [
        {"role": "user", "content": "Weather?"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "Hm"}]},
        {"role": "assistant", "content": "Let me look."},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{\"a\": 1}"},
        {"type": "function_call_output", "call_id": "c1", "output": "one"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "two"}]},
    ]})
    messages = input_messages(request.input)
    assert [message["role"] for message in messages] == ["user", "assistant", "tool", "tool"]  # reasoning: none
    assert messages[1]["content"] == "Let me look."
    assert [call["id"] for call in messages[1]["tool_calls"]] == ["c1", "c2"]
    assert messages[3] == {"role": "tool", "tool_call_id": "c2", "content": "two"}
    output = ResponsesResponse.model_validate({"id": "r", "status": "completed", "model": "m", "output": [
        {"id": "fc_1", "type": "function_call", "status": "completed", "call_id": "c3", "name": "f",
         "arguments": "{}"}]}).output
    assert output_messages(output) == [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c3", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]


QWEN3 = Path(ASSETS) / "tokenizers" / "qwen3"


@pytest.mark.skipif(not QWEN3.is_dir(), reason="the shared Qwen3 tokenizer is not available")
def test_tool_round_trip_renders_in_a_tool_aware_template():
    """A real tool-calling template (Qwen3's) writes the call and its output where the model expects them."""
    from transformers import AutoTokenizer

    from pagedllm.entrypoints.chat_utils import render_chat
    from pagedllm.entrypoints.openai.protocol import ChatMessage

    request = ResponsesRequest.model_validate({"input": [
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{\"city\": \"paris\"}"},
        {"type": "function_call_output", "call_id": "c1", "output": "Sunny"},
    ]})
    tokenizer = AutoTokenizer.from_pretrained(str(QWEN3))
    conversation = [ChatMessage.model_validate(message).to_template_dict() for message in input_messages(request.input)]
    prompt = render_chat(tokenizer, conversation)["prompt"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "paris"}}\n</tool_call>' in prompt
    assert "<tool_response>\nSunny\n</tool_response>" in prompt


def test_stream_writer_items_follow_the_deltas():
    """Reasoning, then text, then a call: each opens its own item and closes the one before; the final response
    holds what the deltas said (with --reasoning-parser a reasoning model's stream looks like this)."""
    writer = ResponseStreamWriter(lambda status, output, usage: ResponsesResponse(
        id="resp_1", status=status, model="m", output=output, usage=usage))
    start = DeltaToolCall(index=0, id="call_1", type="function", function=DeltaFunctionCall(name="f", arguments=""))
    text = writer.start() + writer.deltas([
        DeltaMessage(reasoning_content="Think"), DeltaMessage(reasoning_content="ing"), DeltaMessage(content="Hi"),
        DeltaMessage(tool_calls=[start]),
        DeltaMessage(tool_calls=[DeltaToolCall(index=0, function=DeltaFunctionCall(arguments="{}"))])])
    events, response = writer.finish("completed", None)
    lines = (text + events).splitlines()
    types = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    datas = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert types == [data["type"] for data in datas]
    assert [data["sequence_number"] for data in datas] == list(range(len(datas)))
    assert types[2:] == [
        "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
        "response.reasoning_text.delta", "response.reasoning_text.done", "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    reasoning, message, call = response.output
    assert reasoning.content[0].text == "Thinking" and message.content[0].text == "Hi"
    assert (call.call_id, call.name, call.arguments) == ("call_1", "f", "{}")
    assert [item.status for item in response.output] == ["completed"] * 3
    assert [data["output_index"] for data in datas if data["type"] == "response.output_item.added"] == [0, 1, 2]
