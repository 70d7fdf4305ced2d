"""Where the engine core's outputs go: one socket per front end (API server process).

With one front end (``pagedllm serve``'s default) each message goes to it whole, as before. With several
(``--api-server-count N``) a step's ``EngineCoreOutputs`` is split: each request's outputs go to the front end that
added it (remembered from its ``AddRequests`` until it finishes or is aborted), each answer to the front end that
asked, and every front end hears from the core at least every heartbeat interval even when none of its requests
moved: the scheduler stats it exports as metrics, and its proof that the core is alive (its /health).
"""

from __future__ import annotations

import time

import zmq

from pagedllm.engine.contracts import AddRequests, EngineCoreOutputs, MessageCodec


class FrontEndRoutes:
    """The core's output sockets, indexed by front end, and which front end owns each request in flight."""

    def __init__(self, sockets: list[zmq.Socket], codec: MessageCodec, heartbeat_interval_s: float) -> None:
        self.sockets = sockets
        self.codec = codec
        self.heartbeat_interval_s = heartbeat_interval_s
        self.is_shared = len(sockets) > 1
        self.owner: dict[str, int] = {}  # core request id -> its front end (only when shared)
        self.last_sent = [time.monotonic()] * len(sockets)

    def added(self, message: AddRequests) -> None:
        if self.is_shared:
            for request in message.requests:
                self.owner[request.request_id] = message.front_end

    def forget(self, request_ids: list[str]) -> None:
        """Aborted requests: the core sends nothing more for them."""
        if self.is_shared:
            for request_id in request_ids:
                self.owner.pop(request_id, None)

    def heartbeat_due(self) -> bool:
        return time.monotonic() - min(self.last_sent) >= self.heartbeat_interval_s

    def send(self, outputs: EngineCoreOutputs) -> None:
        """Send a step's outputs (or a heartbeat: no outputs) to whom they concern."""
        if not self.is_shared:
            self._send_to(0, outputs)
            return
        for front_end, share in self._split(outputs).items():
            self._send_to(front_end, share)

    def _send_to(self, front_end: int, outputs: EngineCoreOutputs) -> None:
        self.sockets[front_end].send(self.codec.encode(outputs), copy=False)
        self.last_sent[front_end] = time.monotonic()

    def _split(self, outputs: EngineCoreOutputs) -> dict[int, EngineCoreOutputs]:
        shares: dict[int, EngineCoreOutputs] = {}

        def share(front_end: int) -> EngineCoreOutputs:
            found = shares.get(front_end)
            if found is None:
                found = shares[front_end] = EngineCoreOutputs([], outputs.timestamp, outputs.scheduler_stats,
                                                              outputs.engine_fault)
            return found

        # First scheduled times come with a request's first output, which may also finish it: routed first.
        for request_id, scheduled_at in outputs.first_scheduled_times.items():
            share(self.owner.get(request_id, 0)).first_scheduled_times[request_id] = scheduled_at
        for output in outputs.outputs:
            owner = self.owner.pop(output.request_id, 0) if output.finished else self.owner.get(output.request_id, 0)
            share(owner).outputs.append(output)
        for result in outputs.utility_results:
            share(result.front_end).utility_results.append(result)
        for answer in outputs.grammar_results:
            share(answer.front_end).grammar_results.append(answer)
        self._add_heartbeats(share)
        return shares

    def _add_heartbeats(self, share) -> None:
        now = time.monotonic()
        for front_end, sent_at in enumerate(self.last_sent):
            if now - sent_at >= self.heartbeat_interval_s:
                share(front_end)
