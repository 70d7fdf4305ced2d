"""The core's output routing (``core_routing.FrontEndRoutes``): one front end gets every message whole; several get
each their own requests' outputs, their own answers, and a heartbeat when silent."""

from __future__ import annotations

import time

from pagedllm.engine.contracts import (
    AddRequests,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    GrammarPrepared,
    MessageCodec,
    SchedulerStats,
    UtilityResult,
)
from pagedllm.engine.core_routing import FrontEndRoutes
from pagedllm.params import SamplingParams


class FakeSocket:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data: bytes, copy: bool = True) -> None:
        self.sent.append(data)


def received(socket: FakeSocket) -> list[EngineCoreOutputs]:
    codec = MessageCodec()
    return [codec.decode_core_to_front(data) for data in socket.sent]


def add(routes: FrontEndRoutes, front_end: int, *request_ids: str) -> None:
    requests = [EngineCoreRequest(request_id, [1], SamplingParams(), 0, 4, 0.0) for request_id in request_ids]
    routes.added(AddRequests(requests, front_end))


def test_one_front_end_gets_every_message_whole():
    socket = FakeSocket()
    routes = FrontEndRoutes([socket], MessageCodec(), heartbeat_interval_s=1.0)
    message = EngineCoreOutputs([EngineCoreOutput("r", [3])], 1.0, utility_results=[UtilityResult(1, 2)])
    routes.send(message)
    assert received(socket) == [message]
    assert routes.owner == {}  # nothing to remember with one front end


def test_several_front_ends_get_their_own_outputs_and_answers():
    sockets = [FakeSocket(), FakeSocket(), FakeSocket()]
    routes = FrontEndRoutes(sockets, MessageCodec(), heartbeat_interval_s=60.0)
    add(routes, 0, "a0-x", "0_a0-y")
    add(routes, 1, "a1-x")
    stats = SchedulerStats(num_running=3)
    routes.send(EngineCoreOutputs(
        [EngineCoreOutput("a0-x", [5]), EngineCoreOutput("a1-x", [6], finish_reason="length"),
         EngineCoreOutput("0_a0-y", [7])],
        2.0, stats, first_scheduled_times={"a1-x": 1.5},
        utility_results=[UtilityResult(1, "zero", front_end=0), UtilityResult(1, "two", front_end=2)],
        grammar_results=[GrammarPrepared(4, front_end=1)]))
    first, second, third = (received(socket) for socket in sockets)
    assert [o.request_id for o in first[0].outputs] == ["a0-x", "0_a0-y"]
    assert first[0].utility_results == [UtilityResult(1, "zero")] and first[0].first_scheduled_times == {}
    assert [o.request_id for o in second[0].outputs] == ["a1-x"]
    assert second[0].first_scheduled_times == {"a1-x": 1.5} and second[0].grammar_results == [GrammarPrepared(4, front_end=1)]
    assert third[0].outputs == [] and third[0].utility_results == [UtilityResult(1, "two", front_end=2)]
    assert all(message[0].scheduler_stats == stats for message in (first, second, third))
    assert routes.owner == {"a0-x": 0, "0_a0-y": 0}  # a1-x finished


def test_aborted_requests_are_forgotten():
    routes = FrontEndRoutes([FakeSocket(), FakeSocket()], MessageCodec(), heartbeat_interval_s=60.0)
    add(routes, 1, "a1-x", "a1-y")
    routes.forget(["a1-x"])
    assert routes.owner == {"a1-y": 1}


def test_a_silent_front_end_gets_a_heartbeat():
    sockets = [FakeSocket(), FakeSocket()]
    routes = FrontEndRoutes(sockets, MessageCodec(), heartbeat_interval_s=0.05)
    add(routes, 0, "a0-x")
    time.sleep(0.06)
    assert routes.heartbeat_due()
    routes.send(EngineCoreOutputs([EngineCoreOutput("a0-x", [1])], 3.0, SchedulerStats(num_waiting=2)))
    heartbeat = received(sockets[1])
    assert len(heartbeat) == 1 and heartbeat[0].outputs == [] and heartbeat[0].scheduler_stats.num_waiting == 2
    assert not routes.heartbeat_due()
    routes.send(EngineCoreOutputs([EngineCoreOutput("a0-x", [2])], 3.1))
    assert len(sockets[1].sent) == 1  # heard from the core just now: nothing to say
