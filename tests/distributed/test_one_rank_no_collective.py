"""One rank (tp = pp = 1, the in-process executor) issues no collective and no point-to-point call (issue 18: "the
tp=1 path must add no collective"): generation runs while every ``torch.distributed`` call the communicator could
reach, and the communicator classes' own methods, raise. The same patch stops a two-rank layer, so it is in place."""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist

from pagedllm.distributed.communicator import Communicator, TorchDistributedCommunicator
from pagedllm.distributed.parallel_state import GroupState, ParallelState, set_parallel_state
from pagedllm.model.linear import Linear
from tests.distributed.conftest import PROMPTS, greedy_tokens

_DIST_CALLS = ("init_process_group", "new_group", "all_reduce", "all_gather", "all_gather_into_tensor",
               "all_gather_object", "broadcast", "broadcast_object_list", "send", "recv", "isend", "irecv",
               "batch_isend_irecv", "gather", "scatter", "reduce", "reduce_scatter", "reduce_scatter_tensor",
               "all_to_all", "all_to_all_single", "barrier")
_COMMUNICATOR_METHODS = ("all_reduce", "all_gather", "broadcast", "send", "recv")
_REAL_ALL_REDUCE = TorchDistributedCommunicator.all_reduce


class CollectiveCalled(AssertionError):
    pass


def _refuse(name: str):
    def refuse(*args, **kwargs):
        raise CollectiveCalled(f"{name} was called")

    return refuse


@pytest.fixture
def no_collectives(monkeypatch):
    for name in _DIST_CALLS:
        monkeypatch.setattr(dist, name, _refuse(f"torch.distributed.{name}"))
    for cls in (Communicator, TorchDistributedCommunicator):
        for name in _COMMUNICATOR_METHODS:
            monkeypatch.setattr(cls, name, _refuse(f"{cls.__name__}.{name}"))


def test_one_rank_generates_without_any_collective(tiny_model_dir, no_collectives):
    tokens = greedy_tokens(tiny_model_dir("llama"))
    # The engine fails the requests of a step that raised instead of raising: a refused call shows as no tokens.
    assert [len(row) for row in tokens] == [8] * len(PROMPTS)
    assert not dist.is_initialized()  # not even a process group of one


@pytest.mark.parametrize("refused", ["TorchDistributedCommunicator.all_reduce", "torch.distributed.all_reduce"])
def test_the_patch_stops_a_two_rank_row_parallel_layer(no_collectives, monkeypatch, refused):
    if refused.startswith("torch."):  # the communicator's real method, so that the call reaches torch.distributed
        monkeypatch.setattr(TorchDistributedCommunicator, "all_reduce", _REAL_ALL_REDUCE)
    comm = object.__new__(TorchDistributedCommunicator)  # its __init__ asks a process group for the rank: none here
    comm.group, comm.ranks, comm.rank, comm.world_size = None, [0, 1], 0, 2
    with set_parallel_state(ParallelState(tp=GroupState(0, 2, comm))):
        layer = Linear(8, 4, parallel="row")
    with pytest.raises(CollectiveCalled, match=re.escape(refused)):
        layer(torch.zeros(3, layer.input_size))
