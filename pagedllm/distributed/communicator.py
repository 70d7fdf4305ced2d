"""Collectives of one process group behind a small interface, so a custom all-reduce (a one-shot kernel over
NVLink for small decode tensors) can replace the ``torch.distributed`` one later without touching the layers."""

from __future__ import annotations

import torch
import torch.distributed as dist


class Communicator:
    """The collectives a model needs within one group (tensor- or pipeline-parallel). Ranks are group ranks."""

    rank: int
    world_size: int

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of ``x`` over the group (in place where possible; use the return value)."""
        raise NotImplementedError

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's ``x`` concatenated along ``dim`` in rank order (same shape on every rank)."""
        raise NotImplementedError

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """``x`` of group rank ``src`` on every rank (in place)."""
        raise NotImplementedError

    def send(self, x: torch.Tensor, dst: int) -> None:
        raise NotImplementedError

    def recv(self, x: torch.Tensor, src: int) -> torch.Tensor:
        """Receive into ``x`` (whose shape and dtype the receiver knows) from group rank ``src``."""
        raise NotImplementedError


class TorchDistributedCommunicator(Communicator):
    """``torch.distributed`` over a process group: gloo on CPU, NCCL on CUDA."""

    def __init__(self, group: dist.ProcessGroup, ranks: list[int]) -> None:
        self.group = group
        self.ranks = ranks  # global ranks, in group-rank order
        self.rank = ranks.index(dist.get_rank())
        self.world_size = len(ranks)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=dim)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        dist.broadcast(x, src=self.ranks[src], group=self.group)
        return x

    def send(self, x: torch.Tensor, dst: int) -> None:
        dist.send(x.contiguous(), dst=self.ranks[dst], group=self.group)

    def recv(self, x: torch.Tensor, src: int) -> torch.Tensor:
        dist.recv(x, src=self.ranks[src], group=self.group)
        return x
