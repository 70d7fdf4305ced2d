"""The models of a server of several models: each an AsyncEngine with its own engine core process, started, stopped
and failing independently of the others.

A model's state: ``loading`` (its engine starts), ``serving``, ``failed`` (it did not start: the reason is kept),
``dead`` (its core process died while serving: its requests get 503, the other models go on) and ``unloading``
(the admin API removes it: it takes no new requests while those in flight finish).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus

from pagedllm.engine.async_engine import AsyncEngine
from pagedllm.engine.data_parallel import DataParallelEngine, make_serving_engine, max_num_running
from pagedllm.entrypoints.openai.errors import OpenAIError, quote_bounded
from pagedllm.entrypoints.openai.model_router import AliasRouter
from pagedllm.entrypoints.openai.models_config import ModelSpec
from pagedllm.entrypoints.openai.serving_chat import OpenAIServingChat
from pagedllm.entrypoints.openai.serving_common import ServingContext
from pagedllm.entrypoints.openai.serving_completions import OpenAIServingCompletion
from pagedllm.entrypoints.openai.serving_responses import OpenAIServingResponses
from pagedllm.entrypoints.openai.serving_tokenization import OpenAIServingTokenization

logger = logging.getLogger("pagedllm.server")

_DRAIN_POLL_S = 0.05


@dataclass(eq=False)
class ServedModel:
    """One model of the server: its spec, and once started its engine and request handlers."""

    spec: ModelSpec
    state: str = "loading"
    reason: str | None = None  # why it failed or died
    engine: AsyncEngine | DataParallelEngine | None = None
    ctx: ServingContext | None = None
    completions: OpenAIServingCompletion | None = None
    chat: OpenAIServingChat | None = None
    responses: OpenAIServingResponses | None = None
    tokenization: OpenAIServingTokenization | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def current_state(self) -> str:
        """``state``, with a serving model whose core process died reported ``dead`` (it cannot come back)."""
        if self.state == "serving" and self.engine is not None and self.engine.core_died:
            return "dead"
        return self.state

    @property
    def is_serving(self) -> bool:
        return self.current_state == "serving"

    def answers_to(self, name: str) -> bool:
        """One of its served names, or one of its LoRA adapters."""
        if name in self.spec.names:
            return True
        return self.ctx is not None and self.ctx.models.lora_request(name) is not None

    def unavailable_reason(self) -> str:
        state = self.current_state
        if state == "dead":
            return self.engine.health_reason() or "its engine core process died"
        return {"loading": "it is still loading", "unloading": "it is being unloaded"}.get(state, self.reason or state)

    def status(self) -> dict:
        """What the admin API shows: names, state and reason (never paths)."""
        state = self.current_state
        reason = None if state == "serving" else self.unavailable_reason()
        status = {"id": self.name, "served_model_names": list(self.spec.names), "state": state, "reason": reason,
                  "core_pid": self.core_pid}
        if isinstance(self.engine, DataParallelEngine):  # every replica's core process, in engine-label order
            status["core_pids"] = [replica.engine.core_client.process.pid for replica in self.engine.replicas]
        return status

    @property
    def core_pid(self) -> int | None:
        """The engine core process's id (an operator's handle on it), or None without one."""
        client = getattr(getattr(self.engine, "engine", None), "core_client", None)
        return None if client is None else client.process.pid


class ModelPool:
    """The server's models by name, the aliases, and what the probes and the shutdown need from all of them."""

    def __init__(self, models: list[ServedModel], router: AliasRouter) -> None:
        self.models = models  # in order: the first serving one answers requests that name no model
        self.router = router
        self.is_draining = False

    def find(self, name: str) -> ServedModel | None:
        return next((model for model in self.models if model.answers_to(name)), None)

    def serving(self) -> list[ServedModel]:
        return [model for model in self.models if model.is_serving]

    def is_serving_name(self, name: str) -> bool:
        model = self.find(name)
        return model is not None and model.is_serving

    def route(self, requested: str | None, user: str | None) -> tuple[ServedModel, str | None]:
        """The model a request's ``model`` (and ``user``, for an alias) goes to, and the name the request should
        carry to it (an alias becomes its target's served name). Unknown: 404; known but not serving: 503."""
        if requested is None:
            return self._default_model(), None
        if requested in self.router:
            target = self.router.resolve(requested, user, self.is_serving_name)
            if target is None:
                raise _unavailable(requested, "none of the alias's models is serving")
            return self.find(target), target
        model = self.find(requested)
        if model is None:
            raise model_not_found(requested)
        if not model.is_serving:
            raise _unavailable(requested, model.unavailable_reason())
        return model, requested

    def _default_model(self) -> ServedModel:
        serving = self.serving()
        if not serving:
            raise _unavailable("(default)", "no model is serving")
        return serving[0]

    def health_problems(self) -> list[str]:
        """Why the server is unhealthy: each serving model whose engine is not healthy, each dead one. Models that
        failed to start or are loading do not count (a restart would not fix a bad setting; the admin API can)."""
        problems = []
        for model in self.models:
            if model.current_state in ("serving", "dead") and (reason := model.engine.health_reason()) is not None:
                problems.append(f"{model.name}: {reason}")
        return problems

    def metric_sources(self) -> list[tuple[str, Callable]]:
        return [(model.name, model.engine.get_metrics) for model in self.models
                if model.engine is not None and model.state in ("serving", "unloading")]

    def total_max_num_seqs(self) -> int:
        return sum(max_num_running(model.engine) for model in self.serving()) or 1

    def begin_draining(self) -> None:
        """SIGTERM: every engine takes no new requests (the graceful shutdown of server.py calls this)."""
        self.is_draining = True
        for model in self.models:
            if model.engine is not None:
                model.engine.begin_draining()

    def shutdown(self) -> None:
        """Stop every engine (in parallel: each waits for its own core process)."""
        engines = [model.engine for model in self.models if model.engine is not None]
        if engines:
            with ThreadPoolExecutor(len(engines)) as pool:
                list(pool.map(lambda engine: engine.shutdown(), engines))


async def drain_and_stop(model: ServedModel, timeout_s: float) -> None:
    """Unload: take no new requests, let those in flight finish (up to ``timeout_s``; then they are aborted),
    then stop the engine and its core process."""
    model.state = "unloading"
    engine = model.engine
    if engine is not None:
        engine.begin_draining()
        deadline = time.monotonic() + timeout_s
        while engine.num_requests_in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(_DRAIN_POLL_S)
        await asyncio.to_thread(engine.shutdown)


def model_not_found(name: str) -> OpenAIError:
    return OpenAIError(f"The model `{quote_bounded(name)}` does not exist.", HTTPStatus.NOT_FOUND, param="model",
                       code="model_not_found")


def _unavailable(name: str, reason: str) -> OpenAIError:
    return OpenAIError(f"The model `{quote_bounded(name)}` is not available: {reason}",
                       HTTPStatus.SERVICE_UNAVAILABLE, param="model", code="model_unavailable")


# ---- starting a model --------------------------------------------------------------------------------------------


def start_model(model: ServedModel) -> None:
    """Start the model's engine (blocking: run it off the event loop) and build its handlers. A model that cannot
    start is ``failed`` with the reason, logged; nothing is raised, so the other models are not affected."""
    try:
        _start_engine(model)
        _build_handlers(model)
    except Exception as exc:  # noqa: BLE001 - any failure of one model's start is that model's alone
        model.state, model.reason = "failed", f"{type(exc).__name__}: {exc}"
        logger.error("Model %s failed to start: %s", model.name, model.reason)
        if model.engine is not None:
            model.engine.shutdown()
            model.engine = None
        return
    model.state = "serving"
    logger.info("Model %s (%s) is serving", model.name, ", ".join(model.spec.names))


def _start_engine(model: ServedModel) -> None:
    from pagedllm.entrypoints.chat_utils import load_chat_template
    from pagedllm.entrypoints.engine_args import engine_args_from_cli
    from pagedllm.entrypoints.openai.cli_args import check_serve_args

    args = model.spec.args
    check_serve_args(args)
    load_chat_template(args.chat_template)  # a wrong path fails before the model loads
    delay_ms = getattr(args, "max_queue_delay_ms", None)
    model.engine = make_serving_engine(
        engine_args_from_cli(args, model.spec.model), getattr(args, "data_parallel_size", 1),
        health_stall_timeout_s=args.health_stall_timeout, core_process=args.engine_core_process,
        warm_up_grammars=True, max_queue_delay_s=None if delay_ms is None else delay_ms / 1000)
    name = model.name
    model.engine.on_core_death(lambda: logger.error(
        "Model %s: its engine core process died; its requests get 503, the other models keep serving", name))


def _build_handlers(model: ServedModel) -> None:
    from pagedllm.entrypoints.openai.server import ServerConfig, serving_context

    ctx = serving_context(model.engine, ServerConfig.from_args(model.spec.args, model.engine))
    model.ctx = ctx
    model.completions = OpenAIServingCompletion(ctx)
    model.chat = OpenAIServingChat(ctx)
    model.responses = OpenAIServingResponses(ctx)
    model.tokenization = OpenAIServingTokenization(ctx)
