"""The scheduler holds back a request whose grammar is compiling, without blocking the others (no torch)."""

from pagedllm.config import SchedulerConfig
from pagedllm.core.interface import ModelRunnerOutput
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.request import Request
from pagedllm.core.scheduler import Scheduler
from pagedllm.params import SamplingParams


class FakeGrammar:
    def __init__(self) -> None:
        self.ready = False
        self.error = None

    def is_ready(self) -> bool:
        return self.ready


def _request(request_id: str, grammar=None) -> Request:
    params = SamplingParams(max_tokens=8)
    return Request(request_id, [5] * 4, params, 0, (0,), 8, structured_output=grammar)


def test_waiting_for_grammar_does_not_block_others_and_terminates():
    scheduler = Scheduler(SchedulerConfig(8, 64, 64), KVCacheManager(32, 4))
    grammar = FakeGrammar()
    scheduler.add_request(_request("constrained", grammar))
    scheduler.add_request(_request("free"))
    output = scheduler.schedule()
    assert [d.req_id for d in output.new_reqs] == ["free"]
    scheduler.update_from_output(output, ModelRunnerOutput({"free": 3}))
    grammar.ready = True
    output = scheduler.schedule()
    assert [d.req_id for d in output.new_reqs] == ["constrained"]
    assert output.new_reqs[0].structured_output is grammar
    # The runner's matcher accepted the grammar's last token: the runner says so in its output.
    results = scheduler.update_from_output(
        output, ModelRunnerOutput({"free": 3, "constrained": 4}, grammars_terminated={"constrained"}))
    finished = {r.request_id: r.finish_reason for r in results}
    assert finished == {"free": None, "constrained": "stop"}


def test_grammar_that_failed_to_compile_aborts_the_request():
    scheduler = Scheduler(SchedulerConfig(8, 64, 64), KVCacheManager(32, 4))
    grammar = FakeGrammar()
    grammar.ready, grammar.error = True, "structured_outputs grammar compilation timed out"
    scheduler.add_request(_request("bad", grammar))
    output = scheduler.schedule()
    assert not output.new_reqs and not scheduler.has_unfinished_requests()
    (result,) = scheduler.take_pending_outputs()
    assert result.finish_reason == "abort" and "timed out" in result.stop_reason
