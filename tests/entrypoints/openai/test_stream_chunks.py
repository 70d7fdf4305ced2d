"""A plain completion or chat stream's chunks are serialized from dicts, without the pydantic models: the bytes must
be exactly those the models give."""

from __future__ import annotations

import pytest

from pagedllm.entrypoints.openai.protocol import (
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    CompletionResponseStreamChoice,
    CompletionStreamResponse,
    DeltaMessage,
)
from pagedllm.entrypoints.openai.serving_chat import _plain_choice as _plain_chat_choice
from pagedllm.entrypoints.openai.serving_common import sse, sse_plain_chunk
from pagedllm.entrypoints.openai.serving_completions import _plain_choice, _stream_chunk
from pagedllm.params import CompletionOutput

# Every escape JSON has (quotes, backslash, control characters, U+2028/9), non-ASCII of 2-4 UTF-8 bytes, DEL.
TEXTS = ["", " hello", 'say "hi"\\', "".join(map(chr, range(32))), "\u2028\u2029\x7f", "é中🙂", "\ufffd", "a\nb\tc"]


def model_chunk(choices: list[tuple[int, str, str | None, int | str | None]], model: str) -> str:
    return sse(CompletionStreamResponse(id="cmpl-1", created=1700000000, model=model, choices=[
        CompletionResponseStreamChoice(index=index, text=text, finish_reason=finish, stop_reason=stop)
        for index, text, finish, stop in choices]))


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("finish,stop", [(None, None), ("length", None), ("stop", 151645), ("stop", "\n\n"),
                                         ("abort", None)])
def test_a_plain_chunk_has_the_models_bytes(text: str, finish: str | None, stop: int | str | None) -> None:
    completion = CompletionOutput(0, text, [1], finish_reason=finish, stop_reason=stop)
    fast = _stream_chunk("cmpl-1", 1700000000, "Qwen/Qwen3-0.6B", [_plain_choice(3, text, completion)])
    assert fast == model_chunk([(3, text, finish, stop)], "Qwen/Qwen3-0.6B").encode()


def test_several_choices_and_an_unusual_model_name() -> None:
    completions = [CompletionOutput(i, text, [], finish_reason="length" if i else None) for i, text in
                   enumerate(TEXTS[:3])]
    fast = _stream_chunk("cmpl-1", 1700000000, 'a"é\u2028', [_plain_choice(2 * i, c.text, c) for i, c in
                                                                 enumerate(completions)])
    expected = model_chunk([(2 * i, c.text, c.finish_reason, None) for i, c in enumerate(completions)], 'a"é\u2028')
    assert fast == expected.encode()


def test_choices_with_logprobs_or_token_ids_keep_the_models() -> None:
    choice = CompletionResponseStreamChoice(index=0, text="x", token_ids=[5])
    chunk = _stream_chunk("cmpl-1", 1, "m", [choice])
    assert chunk == sse(CompletionStreamResponse(id="cmpl-1", created=1, model="m", choices=[choice]))
    assert '"token_ids":[5]' in chunk


# ---- chat completions ---------------------------------------------------------------------------------------------


def chat_model_chunk(completions: list[CompletionOutput], model: str) -> str:
    return sse(ChatCompletionStreamResponse(id="chatcmpl-1", created=1700000000, model=model, choices=[
        ChatCompletionResponseStreamChoice(index=c.index, delta=DeltaMessage(content=c.text or None),
                                           finish_reason=c.finish_reason, stop_reason=c.stop_reason)
        for c in completions]))


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("finish,stop", [(None, None), ("length", None), ("stop", 151645), ("stop", "\n\n")])
def test_a_plain_chat_chunk_has_the_models_bytes(text: str, finish: str | None, stop: int | str | None) -> None:
    completion = CompletionOutput(2, text, [1], finish_reason=finish, stop_reason=stop)
    choice = _plain_chat_choice(completion)
    if choice is None:  # nothing to send: no text, not finished
        assert not text and finish is None
        return
    fast = sse_plain_chunk("chat.completion.chunk", "chatcmpl-1", 1700000000, 'Qwen/Qwen3-0.6B"é', [choice])
    assert fast == chat_model_chunk([completion], 'Qwen/Qwen3-0.6B"é').encode()


def test_several_plain_chat_choices_in_one_chunk() -> None:
    completions = [CompletionOutput(i, text, [], finish_reason="length" if i == 2 else None)
                   for i, text in enumerate(TEXTS[1:4])]
    fast = sse_plain_chunk("chat.completion.chunk", "chatcmpl-1", 1700000000, "m",
                           [_plain_chat_choice(c) for c in completions])
    assert fast == chat_model_chunk(completions, "m").encode()
