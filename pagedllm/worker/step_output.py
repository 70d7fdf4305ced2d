"""A step's output, possibly still being computed on the device: what ``ModelRunner.execute_model_async`` returns.

Under async scheduling the engine launches step N+1 before it reads step N's sampled tokens, so the runner hands out
a handle: ``result()`` waits for the step (its one device->host copy, made non-blocking into pinned memory when the
step was launched), gives the sampled tokens to the runner's request states and returns the plain
``ModelRunnerOutput``. The first ``result()`` does the work; later calls return the same output.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from pagedllm.core.interface import ModelRunnerOutput, TopLogprobs
from pagedllm.worker.sampler import LogprobsTensors


class StepOutput(Protocol):
    """A step's output, ready now or once the device has finished the step."""

    def result(self) -> ModelRunnerOutput: ...


class ReadyOutput:
    """The output of a step the runner already waited for (no sampling, or a grammar that checked the draws)."""

    def __init__(self, output: ModelRunnerOutput) -> None:
        self.output = output

    def result(self) -> ModelRunnerOutput:
        return self.output


class PendingSampledOutput:
    """Sampled tokens on their way to host memory; ``states`` are the runner's states of the sampling rows (the
    objects, not ids: a request id reused after a finish must not receive an old step's token)."""

    def __init__(self, req_ids: list[str], states: list[Any], sampled_host: torch.Tensor,
                 copied: torch.cuda.Event | None, logprobs: LogprobsTensors | None) -> None:
        self.req_ids = req_ids
        self.states = states
        self.sampled_host = sampled_host  # [len(req_ids)] int64, pinned on CUDA
        self.copied = copied  # recorded after the copy on CUDA; None on CPU, where the copy is already done
        self.logprobs = logprobs
        self.prompt_logprobs: dict[str, list[TopLogprobs]] = {}  # computed at launch (they wait for the step)
        self.pooled_outputs: dict[str, list[float]] = {}  # embedding vectors, also made at launch
        self._output: ModelRunnerOutput | None = None

    @property
    def is_resolved(self) -> bool:
        return self._output is not None

    def result(self) -> ModelRunnerOutput:
        if self._output is None:
            if self.copied is not None:
                self.copied.synchronize()
            self._output = self._resolve(self.sampled_host.tolist())
        return self._output

    def _resolve(self, sampled: list[int]) -> ModelRunnerOutput:
        for state, token_id in zip(self.states, sampled):
            state.resolve_pending(token_id)
        output = ModelRunnerOutput(dict(zip(self.req_ids, sampled)), prompt_logprobs=self.prompt_logprobs,
                                   pooled_outputs=self.pooled_outputs)
        if self.logprobs is not None:
            output.logprobs = per_request_logprobs(self.req_ids, self.states, self.logprobs)
        return output


def per_request_logprobs(req_ids: list[str], states: list[Any], tensors: LogprobsTensors) -> dict[str, TopLogprobs]:
    """Slice each asking row to the number it asked for (-1: the whole vocabulary, as in vLLM)."""
    tensors = tensors.cpu()
    return {
        req_id: tensors.to_top_logprobs(row, state.sampling_params.logprobs)
        for row, (req_id, state) in enumerate(zip(req_ids, states))
        if state.sampling_params.logprobs is not None
    }
