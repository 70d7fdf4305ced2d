"""A stream reader that falls behind gets what piled up as one output (DELTA concatenated, others the latest)."""

from __future__ import annotations

import asyncio

import pytest

from pagedllm.engine.async_engine import _Stream
from pagedllm.engine.output_processor import merge_delta_outputs
from pagedllm.params import CompletionOutput, Logprob, RequestOutput


def delta(tokens: list[int], index: int = 0, finish: str | None = None, logprobs: bool = False,
          prompt_logprobs=None) -> RequestOutput:
    completion = CompletionOutput(index, "".join(f"<{t}>" for t in tokens), tokens, logprobs=(
        [{t: Logprob(-1.0)} for t in tokens] if logprobs else None), finish_reason=finish)
    return RequestOutput("r", None, [1, 2], prompt_logprobs, [completion], finish is not None)


def test_merge_concatenates_each_sequence_and_keeps_the_later_state() -> None:
    first = delta([5, 6], logprobs=True, prompt_logprobs=[None, {2: Logprob(-0.5)}])
    second = RequestOutput("r", None, [1, 2], None,
                           [delta([7], logprobs=True).outputs[0], delta([9], index=1, finish="length").outputs[0]],
                           False)
    merged = merge_delta_outputs(first, second)
    assert [c.index for c in merged.outputs] == [0, 1]
    assert merged.outputs[0].token_ids == [5, 6, 7] and merged.outputs[0].text == "<5><6><7>"
    assert [next(iter(entry)) for entry in merged.outputs[0].logprobs] == [5, 6, 7]
    assert merged.outputs[1].token_ids == [9] and merged.outputs[1].finish_reason == "length"
    assert merged.prompt_logprobs == first.prompt_logprobs
    assert first.outputs[0].token_ids == [5, 6]  # inputs untouched


@pytest.mark.parametrize("is_delta", [True, False])
def test_a_lagging_reader_gets_one_output_then_a_held_error(is_delta: bool) -> None:
    async def scenario() -> None:
        stream = _Stream(asyncio.get_running_loop(), is_delta)
        for item in (delta([1]), delta([2]), delta([3], finish="stop"), RuntimeError("engine died")):
            stream.put_nowait(item)
        merged = await stream.get()
        assert merged.outputs[0].token_ids == ([1, 2, 3] if is_delta else [3]) and merged.finished
        with pytest.raises(RuntimeError, match="engine died"):
            await stream.get()

    asyncio.run(scenario())


def test_merging_many_at_once_equals_merging_them_in_pairs() -> None:
    outputs = [
        delta([1], prompt_logprobs=None),
        RequestOutput("r", None, [1, 2], [None, {2: Logprob(-0.5)}],
                      [delta([2], logprobs=True).outputs[0], delta([8], index=1).outputs[0]], False),
        delta([3]),
        RequestOutput("r", None, [1, 2], None, [delta([9], index=1, finish="stop").outputs[0]], False),
        delta([4], finish="length"),
    ]
    pairwise = outputs[0]
    for later in outputs[1:]:
        pairwise = merge_delta_outputs(pairwise, later)
    merged = merge_delta_outputs(*outputs)
    assert merged == pairwise
    assert merged.outputs[0].token_ids == [1, 2, 3, 4] and merged.outputs[0].finish_reason == "length"
    assert merged.outputs[0].logprobs == [{2: Logprob(-1.0)}]  # only the sequence's own entries
    assert merged.outputs[1].text == "<8><9>" and merged.outputs[1].finish_reason == "stop"
    assert merged.prompt_logprobs == outputs[1].prompt_logprobs and merged.finished
