"""The rank layout of this process: which tensor-parallel rank and pipeline stage it is, and its communicators.

Global rank = ``pp_rank * tp_size + tp_rank``: the ranks of one stage are consecutive (one tensor-parallel group per
stage, on adjacent devices, where NVLink is), and a pipeline group links the same tp rank of every stage.

The state is per process and set once, by the worker before it builds its model (``init_distributed``), or by a
test around a model it builds (``set_parallel_state`` as a context manager). Layers read it at construction only.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from pagedllm.distributed.communicator import Communicator, TorchDistributedCommunicator


@dataclass(frozen=True)
class GroupState:
    """One group as this rank sees it; ``comm`` is None for a group of one (no collective is ever issued)."""

    rank: int = 0
    size: int = 1
    comm: Communicator | None = None

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1


@dataclass(frozen=True)
class ParallelState:
    """This process's tensor-parallel group, pipeline-parallel group and a group of all ranks."""

    tp: GroupState = field(default_factory=GroupState)
    pp: GroupState = field(default_factory=GroupState)
    world: GroupState = field(default_factory=GroupState)

    @property
    def rank(self) -> int:
        return self.world.rank


_STATE = ParallelState()


def get_parallel_state() -> ParallelState:
    return _STATE


@contextlib.contextmanager
def set_parallel_state(state: ParallelState) -> Iterator[ParallelState]:
    """Use ``state`` until the block ends (tests; a worker sets its state for good with ``init_distributed``)."""
    global _STATE
    previous, _STATE = _STATE, state
    try:
        yield state
    finally:
        _STATE = previous


def free_port() -> int:
    """A TCP port free on localhost now (for ``tcp://127.0.0.1:<port>`` init methods)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distributed_init_method(host: str = "127.0.0.1") -> str:
    return f"tcp://{host}:{free_port()}"


def init_distributed(rank: int, tp_size: int, pp_size: int, init_method: str, device: str,
                     timeout_s: float = 600.0) -> ParallelState:
    """Join the process group (gloo on CPU, NCCL on CUDA), make the tp, pp and world groups, and set this
    process's state. Every rank must call it with the same sizes and ``init_method``."""
    import datetime

    import torch.distributed as dist

    global _STATE
    world_size = tp_size * pp_size
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    tp_rank, pp_rank = rank % tp_size, rank // tp_size
    tp = pp = None
    # new_group must be called by every rank for every group, in the same order.
    for stage in range(pp_size):
        ranks = [stage * tp_size + r for r in range(tp_size)]
        group = dist.new_group(ranks) if tp_size > 1 else None
        if stage == pp_rank:
            tp = GroupState(tp_rank, tp_size, TorchDistributedCommunicator(group, ranks) if group else None)
    for column in range(tp_size):
        ranks = [s * tp_size + column for s in range(pp_size)]
        group = dist.new_group(ranks) if pp_size > 1 else None
        if column == tp_rank:
            pp = GroupState(pp_rank, pp_size, TorchDistributedCommunicator(group, ranks) if group else None)
    world = GroupState(rank, world_size, TorchDistributedCommunicator(dist.group.WORLD, list(range(world_size))))
    _STATE = ParallelState(tp, pp, world)
    return _STATE


def destroy_distributed() -> None:
    import torch.distributed as dist

    global _STATE
    if dist.is_initialized():
        dist.destroy_process_group()
    _STATE = ParallelState()


def divide(numerator: int, denominator: int, what: str) -> int:
    """``numerator / denominator``, which must be exact (a clear error naming ``what`` otherwise)."""
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by tensor_parallel_size ({denominator})")
    return numerator // denominator


def layer_range(num_layers: int, pp_rank: int, pp_size: int) -> tuple[int, int]:
    """The decoder layers [start, end) of stage ``pp_rank``: as even as possible, earlier stages one more (the last
    stage also holds the final norm and the LM head)."""
    if num_layers < pp_size:
        raise ValueError(f"pipeline_parallel_size ({pp_size}) is larger than the number of layers ({num_layers})")
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return start, start + base + (1 if pp_rank < extra else 0)


def device_for_rank(device: str, local_rank: int) -> str:
    """The device string of a rank: ``cuda:<local_rank>`` on CUDA, ``cpu`` on CPU."""
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        return f"cuda:{local_rank}"
    return device
