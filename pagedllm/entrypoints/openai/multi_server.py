"""A server of several models (``pagedllm serve --models-config models.yaml``, or ``--model A --model B``): one
AsyncEngine, with its own engine
core process, per model; a request's ``model`` (a served name, a LoRA adapter of one, or a weighted alias) picks the
engine. The per-model request handlers are those of the single-model server; this module routes to them, answers
/v1/models for all of them, and adds the admin API that loads and unloads models at run time.

Probes: ``/health`` is 503 when a serving model's engine is unhealthy or its core process died (a restart is what
recovers it; the other models keep serving meanwhile); a model that failed to start does not make it 503.
``/ready`` is 200 once the configured models have started (the server listens only then) while at least one model
serves and the server is neither draining nor overloaded.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from http import HTTPStatus

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from pydantic_core import from_json

from pagedllm import __version__
from pagedllm.config import admin_api_key_from_env, log_stats_interval_from_env, server_api_key_from_env
from pagedllm.engine.async_engine import EngineDeadError, RequestFailedError
from pagedllm.engine.data_parallel import serving_reason, stats_sources
from pagedllm.entrypoints.openai.admission import AdmissionConfig, AdmissionControl
from pagedllm.entrypoints.openai.errors import OpenAIError, error_response
from pagedllm.entrypoints.openai.http_guards import InFlightRequests, RequestGuard, server_draining
from pagedllm.entrypoints.openai.limits import RequestLimits
from pagedllm.entrypoints.openai.metrics import build_models_registry
from pagedllm.entrypoints.openai.model_pool import (
    ModelPool,
    ServedModel,
    drain_and_stop,
    model_not_found,
    start_model,
)
from pagedllm.entrypoints.openai.model_router import AliasRouter
from pagedllm.entrypoints.openai.models_config import (
    ModelsConfig,
    check_unique_names,
    load_models_config,
    model_spec,
    models_from_flags,
)
from pagedllm.entrypoints.openai.openapi import install_openapi
from pagedllm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)
from pagedllm.entrypoints.openai.protocol_responses import ResponsesRequest
from pagedllm.entrypoints.openai.server import (
    _add_client_error_handlers,
    _add_deadline_handlers,
    _api_key_check,
    _check_ssl_files,
    _docs_routes,
    _exit_quietly_on_signals,
    _has_key,
    _make_graceful_server,
    _metrics_routes,
    uvicorn_config,
)
from pagedllm.entrypoints.openai.serving_common import internal_error, json_response, parse_body, read_json_body
from pagedllm.entrypoints.openai.stats_logger import StatsLogger
from pagedllm.platform import tune_gc_for_serving

logger = logging.getLogger("pagedllm.server")

DEFAULT_UNLOAD_TIMEOUT_S = 60.0  # how long an unload lets the requests in flight finish


@dataclass(frozen=True)
class MultiServerConfig:
    """The server-wide settings of a server of several models (each model's own are in its ModelSpec)."""

    api_key: str | None = None
    admin_api_key: str | None = None  # None: no admin API
    metrics_require_api_key: bool = False
    allowed_origins: tuple[str, ...] = ()
    root_path: str = ""
    limits: RequestLimits = RequestLimits()
    max_num_waiting: int | None = None  # admission control counts the whole server's requests
    max_queue_delay_s: float | None = None
    log_stats_interval_s: float | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> MultiServerConfig:
        delay_ms = getattr(args, "max_queue_delay_ms", None)
        return cls(
            api_key=args.api_key or server_api_key_from_env(),
            admin_api_key=getattr(args, "admin_api_key", None) or admin_api_key_from_env(),
            metrics_require_api_key=getattr(args, "require_api_key_for_metrics", False),
            allowed_origins=tuple(args.allowed_origins or ()),
            root_path=getattr(args, "root_path", None) or "",
            limits=RequestLimits.from_args(args),
            max_num_waiting=getattr(args, "max_num_waiting", None),
            max_queue_delay_s=None if delay_ms is None else delay_ms / 1000,
            log_stats_interval_s=None if getattr(args, "disable_log_stats", True) else log_stats_interval_from_env(),
        )


def build_multi_app(pool: ModelPool, config: MultiServerConfig,
                    base_args: argparse.Namespace | None = None) -> FastAPI:
    """The FastAPI app serving the pool's models; ending the app (lifespan end) shuts every engine down.
    ``base_args``: every loaded model's default flags (the admin API's loads)."""
    admission = AdmissionControl(AdmissionConfig(pool.total_max_num_seqs(), config.max_num_waiting,
                                                 config.max_queue_delay_s))
    app = FastAPI(title="pagedllm OpenAI-compatible server", version=__version__,
                  lifespan=_lifespan(pool, config.log_stats_interval_s), docs_url=None, redoc_url=None)
    app.root_path = config.root_path
    app.state.in_flight = InFlightRequests()
    _add_client_error_handlers(app)
    _add_server_error_handlers(app, pool)
    _add_deadline_handlers(app, admission)
    app.add_middleware(RequestGuard, max_body_bytes=config.limits.max_request_body_bytes,
                       is_draining=lambda: pool.is_draining, in_flight=app.state.in_flight, admission=admission)
    if config.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins), allow_credentials=False,
                           allow_methods=["*"], allow_headers=["*"])
    _include_routes(app, pool, config, admission, base_args)
    install_openapi(app)
    return app


def _include_routes(app: FastAPI, pool: ModelPool, config: MultiServerConfig, admission: AdmissionControl,
                    base_args: argparse.Namespace | None) -> None:
    key_check = [Depends(_api_key_check(config.api_key))]
    # Server-wide admission metrics carry an empty model_name (the same as no label to Prometheus).
    registry = build_models_registry(lambda: [*pool.metric_sources(), ("", admission.metrics)])
    app.include_router(_probe_routes(pool, admission))
    app.include_router(_docs_routes())
    app.include_router(_metrics_routes(registry), dependencies=key_check if config.metrics_require_api_key else [])
    app.include_router(_tokenizer_routes(pool), dependencies=key_check)
    admin_check = [Depends(_api_key_check(config.admin_api_key))] if config.admin_api_key else key_check
    app.include_router(_status_routes(pool), dependencies=admin_check)  # before /v1/models/{id}
    if config.admin_api_key and base_args is not None:
        app.include_router(_admin_routes(pool, admission, base_args), dependencies=admin_check)
    app.include_router(_v1_routes(pool), dependencies=key_check)


def _lifespan(pool: ModelPool, log_stats_interval_s: float | None):
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        tasks = [] if log_stats_interval_s is None else [
            asyncio.create_task(StatsLogger(get_metrics, log_stats_interval_s, tag).run())
            for model in pool.serving() for tag, get_metrics in stats_sources(model.engine, model.name)]
        yield
        for task in tasks:
            task.cancel()
        logger.info("Shutting the engines down")
        await asyncio.to_thread(pool.shutdown)

    return lifespan


# ---- routing -----------------------------------------------------------------------------------------------------


def _route(pool: ModelPool, request) -> ServedModel:
    """The model the request goes to; an alias in ``request.model`` is replaced by the target's served name, so the
    response names the model that really served it."""
    model, name = pool.route(request.model, getattr(request, "user", None))
    request.model = name
    return model


def _v1_routes(pool: ModelPool) -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.get("/models")
    async def models() -> Response:
        return json_response(_model_list(pool))

    @router.get("/models/{model_id:path}")
    async def model(model_id: str) -> Response:
        return json_response(_model_card(pool, model_id))

    @router.post("/completions")
    async def create_completion(raw_request: Request) -> Response:
        request = await parse_body(raw_request, CompletionRequest)
        return await _route(pool, request).completions.create_completion(request, raw_request)

    @router.post("/chat/completions")
    async def create_chat_completion(raw_request: Request) -> Response:
        request = await parse_body(raw_request, ChatCompletionRequest)
        return await _route(pool, request).chat.create_chat_completion(request, raw_request)

    @router.post("/responses")
    async def create_response(raw_request: Request) -> Response:
        request = await parse_body(raw_request, ResponsesRequest)
        return await _route(pool, request).responses.create_response(request, raw_request)

    return router


def _model_list(pool: ModelPool) -> ModelList:
    """Every serving model's names and adapters, then the aliases with a serving target."""
    cards = [card for model in pool.serving() for card in model.ctx.models.model_list().data]
    for alias in pool.router.aliases.values():
        if any(pool.is_serving_name(target) for target in alias.targets):
            cards.append(ModelCard(id=alias.name, root=alias.name))
    return ModelList(data=cards)


def _model_card(pool: ModelPool, name: str) -> ModelCard:
    if name in pool.router:
        return ModelCard(id=name, root=name)
    model = pool.find(name)
    if model is None or not model.is_serving:
        raise model_not_found(name)
    return model.ctx.models.model_card(name)


def _tokenizer_routes(pool: ModelPool) -> APIRouter:
    router = APIRouter()

    @router.post("/tokenize")
    async def tokenize(raw_request: Request) -> Response:
        from pagedllm.entrypoints.openai.serving_common import validate_body

        body = await read_json_body(raw_request)
        request = validate_body(body, TokenizeChatRequest if _has_key(body, "messages") else TokenizeCompletionRequest)
        return json_response(await _route(pool, request).tokenization.tokenize(request))

    @router.post("/detokenize")
    async def detokenize(raw_request: Request) -> Response:
        request = await parse_body(raw_request, DetokenizeRequest)
        return json_response(await _route(pool, request).tokenization.detokenize(request))

    return router


# ---- probes ------------------------------------------------------------------------------------------------------


def _probe_routes(pool: ModelPool, admission: AdmissionControl) -> APIRouter:
    """Open to everyone (no key), answered from flags at once."""
    router = APIRouter()

    @router.get("/health")
    @router.get("/ping")
    async def health() -> Response:
        return _health_response(pool)

    @router.get("/ready")
    async def ready() -> Response:
        if pool.is_draining:
            return server_draining().to_response()
        if admission.is_overloaded():
            return error_response("The server is overloaded: its queue is full (--max-num-waiting)",
                                  HTTPStatus.SERVICE_UNAVAILABLE, code="server_overloaded")
        if not any(serving_reason(model.engine) is None for model in pool.serving()):  # a replica is enough
            return error_response("No model is serving", HTTPStatus.SERVICE_UNAVAILABLE, code="engine_unavailable")
        return Response(status_code=HTTPStatus.OK)

    @router.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": __version__})

    return router


def _health_response(pool: ModelPool) -> Response:
    problems = pool.health_problems()
    if not problems:
        return Response(status_code=HTTPStatus.OK)
    return error_response(f"Unhealthy: {'; '.join(problems)}", HTTPStatus.SERVICE_UNAVAILABLE,
                          code="engine_unavailable")


def _add_server_error_handlers(app: FastAPI, pool: ModelPool) -> None:
    @app.exception_handler(EngineDeadError)
    async def engine_dead(_: Request, exc: EngineDeadError) -> Response:
        if pool.is_draining:
            return server_draining().to_response()
        return error_response(str(exc), HTTPStatus.SERVICE_UNAVAILABLE, code="engine_unavailable")

    @app.exception_handler(RequestFailedError)
    async def request_failed(_: Request, exc: RequestFailedError) -> Response:
        return error_response(str(exc), HTTPStatus.INTERNAL_SERVER_ERROR, code="request_failed")

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> Response:
        return internal_error(exc, None, "while handling the request").to_response()


# ---- admin API ---------------------------------------------------------------------------------------------------


def _status_routes(pool: ModelPool) -> APIRouter:
    """Every model's state, failed and dead ones too (with the reason): keyed by the admin key when there is one."""
    router = APIRouter(prefix="/v1/admin")

    @router.get("/models")
    async def status() -> Response:
        aliases = {alias.name: dict(alias.weights) for alias in pool.router.aliases.values()}
        return JSONResponse({"object": "list", "data": [model.status() for model in pool.models],
                             "aliases": aliases})

    return router


def _admin_routes(pool: ModelPool, admission: AdmissionControl, base_args: argparse.Namespace) -> APIRouter:
    """Load and unload models at run time (only with --admin-api-key)."""
    router = APIRouter(prefix="/v1/admin")
    one_load_at_a_time = asyncio.Lock()  # a GPU's memory profile at start must not see another half-made cache

    @router.post("/models")
    async def load(raw_request: Request) -> Response:
        model = ServedModel(_load_spec(pool, await read_json_body(raw_request), base_args))
        pool.models.append(model)
        async with one_load_at_a_time:
            await asyncio.to_thread(start_model, model)
        if not model.is_serving:
            pool.models.remove(model)
            raise OpenAIError(f"The model {model.name} did not start: {model.reason}", code="model_load_failed")
        _resize_admission(admission, pool)
        return JSONResponse(model.status(), status_code=HTTPStatus.CREATED)

    @router.delete("/models/{name:path}")
    async def unload(name: str, timeout: float = DEFAULT_UNLOAD_TIMEOUT_S) -> Response:
        model = next((model for model in pool.models if name in model.spec.names), None)
        if model is None:
            raise model_not_found(name)
        if model.state in ("unloading", "loading"):
            raise OpenAIError(f"The model {name} is {model.state}", HTTPStatus.CONFLICT, code="model_busy")
        await drain_and_stop(model, timeout)
        pool.models.remove(model)
        _resize_admission(admission, pool)
        logger.info("Model %s unloaded", model.name)
        return JSONResponse({"id": model.name, "object": "model", "deleted": True})

    return router


def _load_spec(pool: ModelPool, body: bytes, base_args: argparse.Namespace):
    """The load request's model entry (a models-config entry as JSON), checked against the names in use."""
    try:
        entry = from_json(body or b"null")
    except ValueError as exc:
        raise OpenAIError(f"The body is not valid JSON: {exc}") from None
    try:
        spec = model_spec(entry, base_args, "load request")
        check_unique_names((*(model.spec for model in pool.models), spec), pool.router.aliases, "load request")
    except ValueError as exc:
        status = HTTPStatus.CONFLICT if "given twice" in str(exc) else HTTPStatus.BAD_REQUEST
        raise OpenAIError(str(exc), status, code="invalid_model_settings") from None
    return spec


def _resize_admission(admission: AdmissionControl, pool: ModelPool) -> None:
    """The gate's running places are all serving models' max_num_seqs together."""
    admission.config = replace(admission.config, max_num_seqs=pool.total_max_num_seqs())


# ---- running -----------------------------------------------------------------------------------------------------


def models_to_serve(args: argparse.Namespace) -> ModelsConfig:
    """The models of the --models-config file, or of the repeated --model flags."""
    from pagedllm.entrypoints.openai.cli_args import repeated_models

    if args.models_config:
        return load_models_config(args.models_config, args)
    return models_from_flags(repeated_models(args), args)


def run_multi_server(args: argparse.Namespace) -> int:
    """Start every model (of --models-config, or of several --model; one after another; one that fails is logged
    and left out), serve them until SIGTERM/SIGINT, shut down gracefully."""
    from pagedllm.entrypoints.openai.cli_args import check_serve_args

    check_serve_args(args)
    models_config = models_to_serve(args)
    _check_ssl_files(args.ssl_keyfile, args.ssl_certfile)
    _exit_quietly_on_signals()
    pool = ModelPool([ServedModel(spec) for spec in models_config.models],
                     AliasRouter(models_config.aliases, getattr(args, "seed", 0) or 0))
    try:
        for model in pool.models:  # one after another: a GPU's memory profile must not see a half-made cache
            start_model(model)
        if not pool.serving():
            raise ValueError("no model started: "
                             + "; ".join(f"{model.name}: {model.reason}" for model in pool.models))
        app = build_multi_app(pool, MultiServerConfig.from_args(args), args)
        logger.info("Serving %s on %s:%d", ", ".join(model.name for model in pool.serving()), args.host, args.port)
        server = _make_graceful_server(uvicorn_config(app, args), pool, args.graceful_shutdown_timeout,
                                       app.state.in_flight)
        tune_gc_for_serving()
        server.run()
    finally:
        pool.shutdown()
    return 0
