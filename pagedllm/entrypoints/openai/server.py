"""The OpenAI-compatible HTTP server: ``build_app(engine, args)`` makes the FastAPI app, ``run_server(args)`` loads
the model and serves it with uvicorn until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http import HTTPStatus

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic_core import from_json
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from pagedllm import __version__
from pagedllm.config import (
    EngineArgs,
    log_stats_interval_from_env,
    runtime_lora_updating_allowed,
    server_api_key_from_env,
)
from pagedllm.engine.async_engine import (
    AsyncEngine,
    EngineDeadError,
    QueueTimeoutError,
    RequestFailedError,
    RequestTimeoutError,
)
from pagedllm.engine.data_parallel import make_serving_engine, max_num_running, serving_reason, stats_sources
from pagedllm.entrypoints.chat_utils import load_chat_template
from pagedllm.entrypoints.default_model import DEFAULT_MODEL_NAME, default_model_path, is_default_model
from pagedllm.entrypoints.engine_args import engine_args_from_cli
from pagedllm.entrypoints.generation_config import GenerationDefaults, load_generation_defaults, serving_defaults
from pagedllm.entrypoints.openai.admission import AdmissionConfig, AdmissionControl, admission_config, deadline_error
from pagedllm.entrypoints.openai.cli_args import check_serve_args
from pagedllm.entrypoints.openai.errors import (
    OpenAIError,
    error_response,
    from_validation_errors,
    nesting_too_deep,
    quote_bounded,
)
from pagedllm.entrypoints.openai.http_guards import (
    BodyTooLarge,
    InFlightRequests,
    RequestGuard,
    body_too_large,
    server_draining,
)
from pagedllm.entrypoints.openai.limits import RequestLimits
from pagedllm.entrypoints.openai.lora_modules import (
    LoadLoRAAdapterRequest,
    LoRAModulePath,
    ServedLoRAs,
    UnloadLoRAAdapterRequest,
)
from pagedllm.entrypoints.openai.metrics import build_registry, render_metrics
from pagedllm.entrypoints.openai.openapi import install_openapi
from pagedllm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)
from pagedllm.entrypoints.openai.serving_chat import OpenAIServingChat
from pagedllm.entrypoints.openai.serving_common import (
    ClientDisconnected,
    ServedModels,
    ServingContext,
    internal_error,
    json_response,
    parse_body,
    read_json_body,
    validate_body,
)
from pagedllm.entrypoints.openai.protocol_embeddings import EmbeddingRequest
from pagedllm.entrypoints.openai.protocol_responses import ResponsesRequest
from pagedllm.entrypoints.openai.serving_embeddings import OpenAIServingEmbedding, check_serves_generation
from pagedllm.entrypoints.openai.serving_completions import OpenAIServingCompletion
from pagedllm.entrypoints.openai.serving_responses import OpenAIServingResponses
from pagedllm.entrypoints.openai.serving_tokenization import OpenAIServingTokenization
from pagedllm.entrypoints.openai.shared_metrics import SharedMetrics
from pagedllm.entrypoints.openai.slow_clients import request_read_deadline_protocol
from pagedllm.platform import tune_gc_for_serving

logger = logging.getLogger("pagedllm.server")
from pagedllm.entrypoints.openai.stats_logger import StatsLogger

_CLIENT_CLOSED_REQUEST = 499  # nginx's code for "the client went away"; nobody reads it


@dataclass(frozen=True)
class ServerConfig:
    """The server's own settings (the engine has its config)."""

    served_model_names: tuple[str, ...]
    api_key: str | None = None
    metrics_require_api_key: bool = False  # /metrics is open by default, as in vLLM (scrapers send no key)
    allowed_origins: tuple[str, ...] = ()
    chat_template: str | None = None  # template text, already read from --chat-template
    generation_defaults: GenerationDefaults = GenerationDefaults()  # for the fields a request leaves unset
    limits: RequestLimits = RequestLimits()
    reasoning_parser: str | None = None  # --reasoning-parser
    auto_tool_parser: str | None = None  # --tool-call-parser, with --enable-auto-tool-choice (None: "auto" refused)
    root_path: str = ""  # the path prefix a proxy serves this server under (--root-path)
    log_stats_interval_s: float | None = None  # seconds between stats lines; None: none (--disable-log-stats)
    lora_modules: tuple[LoRAModulePath, ...] = ()  # --lora-modules: adapters served by name from the start
    allow_runtime_lora_updating: bool = False  # /v1/load_lora_adapter and /v1/unload_lora_adapter
    admission: AdmissionConfig | None = None  # --max-num-waiting / --max-queue-delay-ms (None: admit everything)
    # One of several API server processes (--api-server-count): its index, and where they share their metrics.
    api_server_index: int | None = None
    metrics_dir: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, engine: AsyncEngine) -> ServerConfig:
        model = engine.model_config.model
        names = tuple(args.served_model_name or [getattr(args, "model_name", None) or model])
        return cls(
            served_model_names=names,
            api_key=args.api_key or server_api_key_from_env(),
            metrics_require_api_key=getattr(args, "require_api_key_for_metrics", False),
            allowed_origins=tuple(args.allowed_origins or ()),
            chat_template=load_chat_template(args.chat_template),
            generation_defaults=_generation_defaults(args, model),
            limits=RequestLimits.from_args(args),
            reasoning_parser=getattr(args, "reasoning_parser", None),
            auto_tool_parser=args.tool_call_parser if getattr(args, "enable_auto_tool_choice", False) else None,
            root_path=getattr(args, "root_path", None) or "",
            log_stats_interval_s=None if getattr(args, "disable_log_stats", True) else log_stats_interval_from_env(),
            lora_modules=tuple(getattr(args, "lora_modules", None) or ()),
            allow_runtime_lora_updating=runtime_lora_updating_allowed(),
            admission=admission_config(args, max_num_running(engine)),
            api_server_index=getattr(args, "api_server_index", None),
            metrics_dir=getattr(args, "metrics_dir", None),
        )


def _generation_defaults(args: argparse.Namespace, model_path: str) -> GenerationDefaults:
    """--generation-config's defaults, bounded by --max-tokens-default (see generation_config.serving_defaults)."""
    defaults = load_generation_defaults(getattr(args, "generation_config", "auto"), model_path)
    return serving_defaults(defaults, getattr(args, "max_tokens_default", None))


def build_app(engine: AsyncEngine, args: argparse.Namespace | ServerConfig) -> FastAPI:
    """The FastAPI app serving ``engine``; shutting the app down (lifespan end) shuts the engine down."""
    config = args if isinstance(args, ServerConfig) else ServerConfig.from_args(args, engine)
    ctx = serving_context(engine, config)
    admission = _admission_control(config.admission, engine)
    get_metrics, shared_metrics = _metrics_source(config, engine, admission)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tasks = [_start_stats_logger(engine, config.log_stats_interval_s)]
        if shared_metrics is not None:
            tasks.append(asyncio.create_task(shared_metrics.write_periodically(), name="pagedllm-shared-metrics"))
        yield
        for task in tasks:
            if task is not None:
                task.cancel()
        # uvicorn has stopped accepting and finished (or cancelled) the in-flight requests by now.
        logger.info("Shutting the engine down")
        await asyncio.to_thread(engine.shutdown)
        if shared_metrics is not None:
            shared_metrics.write()  # the last requests count in the whole server's totals

    app = FastAPI(title="pagedllm OpenAI-compatible server", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None)  # the docs pages: see _docs_routes
    # As vLLM sets it: routes answer with the prefix and without it (a proxy that strips it). Set after construction:
    # FastAPI deprecates the constructor argument in favour of uvicorn's, which answers only stripped paths.
    app.root_path = config.root_path
    app.state.in_flight = InFlightRequests()  # read by the graceful shutdown (run_server)
    _add_exception_handlers(app, engine, admission)
    # Added before CORS, so it runs inside it: its 413, 429 and 503 answers carry CORS headers too.
    app.add_middleware(RequestGuard, max_body_bytes=config.limits.max_request_body_bytes,
                       is_draining=lambda: _is_draining(engine), in_flight=app.state.in_flight, admission=admission)
    if config.allowed_origins:
        # No credentials (cookies): the API authenticates with a bearer header, which CORS allows as any header.
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins), allow_credentials=False,
                           allow_methods=["*"], allow_headers=["*"])
    key_check = [Depends(_api_key_check(config.api_key))]
    registry = build_registry(get_metrics, ctx.models.default_name)
    app.include_router(_probe_routes(ctx, admission))
    app.include_router(_docs_routes())
    app.include_router(_metrics_routes(registry), dependencies=key_check if config.metrics_require_api_key else [])
    app.include_router(_tokenizer_routes(ctx), dependencies=key_check)  # they do work: keyed like /v1
    app.include_router(_v1_routes(ctx), dependencies=key_check)
    if config.allow_runtime_lora_updating and ctx.models.loras is not None:
        app.include_router(_lora_routes(ctx.models.loras, engine), dependencies=key_check)
    install_openapi(app)
    return app


def serving_context(engine: AsyncEngine, config: ServerConfig) -> ServingContext:
    """What the handlers of one model need (a server of several models builds one per model)."""
    max_model_len = engine.config.scheduler_config.max_model_len
    return ServingContext(
        engine=engine,
        models=ServedModels(config.served_model_names, max_model_len, _served_loras(engine, config)),
        tokenizer=engine.tokenizer,
        max_model_len=max_model_len,
        vocab_size=engine.model_config.vocab_size,
        chat_template=config.chat_template,
        generation_defaults=config.generation_defaults,
        limits=config.limits,
        reasoning_parser=config.reasoning_parser,
        auto_tool_parser=config.auto_tool_parser,
    )


def _metrics_source(config: ServerConfig, engine: AsyncEngine,
                    admission: AdmissionControl) -> tuple[Callable[[], list], SharedMetrics | None]:
    """What /metrics reports: this process's metrics, or with several API server processes everyone's (and the
    ``SharedMetrics`` that writes this one's share for the others)."""
    def own_metrics() -> list:
        return [*engine.get_metrics(), *admission.metrics()]

    if config.metrics_dir is None:
        return own_metrics, None
    shared = SharedMetrics(config.metrics_dir, config.api_server_index or 0, own_metrics)
    return shared.collect, shared


def _admission_control(config: AdmissionConfig | None, engine: AsyncEngine) -> AdmissionControl:
    """The gate of the generation routes; without limits it only counts (its metrics read 0 rejections)."""
    return AdmissionControl(config or AdmissionConfig(max_num_running(engine)))


def _served_loras(engine: AsyncEngine, config: ServerConfig) -> ServedLoRAs | None:
    """The adapters served by name (those of --lora-modules, each validated now: a bad one stops the start), or
    None when the engine has no LoRA."""
    if engine.config.lora_config is None:
        return None
    loras = ServedLoRAs(engine.engine.input_processor.lora_validator.check, config.served_model_names)
    for module in config.lora_modules:
        try:
            loras.add(module.name, module.path, module.base_model_name)
        except OpenAIError as exc:
            raise ValueError(f"--lora-modules {module.name}: {exc.message}") from None
    return loras


def _start_stats_logger(engine: AsyncEngine, interval_s: float | None) -> asyncio.Task | None:
    if interval_s is None:
        return None
    loggers = [StatsLogger(get_metrics, interval_s, tag) for tag, get_metrics in stats_sources(engine)]

    async def run_all() -> None:  # one line per data-parallel replica
        await asyncio.gather(*(stats.run() for stats in loggers))

    return asyncio.create_task(run_all(), name="pagedllm-stats-logger")


def _is_draining(engine: AsyncEngine) -> bool:
    """Shutting down but still running the requests in flight (a dead engine is not draining: it is dead)."""
    return engine.is_running and not engine.is_ready()


# ---- routes ------------------------------------------------------------------------------------------------------


def _probe_routes(ctx: ServingContext, admission: AdmissionControl) -> APIRouter:
    """Open to everyone, even with --api-key: they answer from flags at once and do no work."""
    router = APIRouter()

    @router.get("/health")
    async def health() -> Response:
        return _health_response(ctx.engine)

    @router.get("/ping")  # SageMaker's name for /health, as vLLM serves it
    async def ping() -> Response:
        return _health_response(ctx.engine)

    @router.get("/ready")
    async def ready() -> Response:
        # Not ready while draining or while the queue is full: a load balancer sends new work elsewhere. (Before
        # the model has loaded nothing listens: a probe's refused connection says "not ready" too.)
        if _is_draining(ctx.engine):
            return server_draining().to_response()
        if admission.is_overloaded():
            return error_response("The server is overloaded: its queue is full (--max-num-waiting)",
                                  HTTPStatus.SERVICE_UNAVAILABLE, code="server_overloaded")
        # Data parallel: ready while one replica serves (/health names a dead one).
        return _reason_response(serving_reason(ctx.engine))

    @router.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": __version__})

    return router


_DOCS_OFF = ("The interactive API docs (/docs, /redoc) are off: FastAPI's Swagger UI and ReDoc pages load their "
             "scripts from a CDN, which an offline server cannot reach. The OpenAPI schema is served at "
             "/openapi.json: open it in any OpenAPI viewer or client generator.")


def _docs_routes() -> APIRouter:
    """A clear answer where FastAPI's docs pages would be, rather than a page that never finishes loading."""
    router = APIRouter(include_in_schema=False)

    @router.get("/docs")
    @router.get("/redoc")
    async def docs_off() -> Response:
        return error_response(_DOCS_OFF, HTTPStatus.NOT_FOUND, code="docs_disabled")

    return router


def _health_response(engine: AsyncEngine) -> Response:
    """200 while the engine loop runs and makes progress; else a 503 saying why (flags only: never waits)."""
    return _reason_response(engine.health_reason())


def _reason_response(reason: str | None) -> Response:
    if reason is None:
        return Response(status_code=HTTPStatus.OK)
    return error_response(f"The engine is unhealthy: {reason}", HTTPStatus.SERVICE_UNAVAILABLE,
                          code="engine_unavailable")


def _metrics_routes(registry) -> APIRouter:
    router = APIRouter()

    @router.get("/metrics")
    async def metrics() -> Response:
        body, content_type = render_metrics(registry)
        return Response(body, media_type=content_type)

    return router


def _tokenizer_routes(ctx: ServingContext) -> APIRouter:
    router = APIRouter()
    tokenization = OpenAIServingTokenization(ctx)

    @router.post("/tokenize")
    async def tokenize(raw_request: Request) -> Response:
        body = await read_json_body(raw_request)
        model = TokenizeChatRequest if _has_key(body, "messages") else TokenizeCompletionRequest
        return json_response(await tokenization.tokenize(validate_body(body, model)))

    @router.post("/detokenize")
    async def detokenize(raw_request: Request) -> Response:
        request = await parse_body(raw_request, DetokenizeRequest)
        return json_response(await tokenization.detokenize(request))

    return router


def _lora_routes(loras: ServedLoRAs, engine: AsyncEngine) -> APIRouter:
    """Adapters loaded and unloaded at run time (only with PAGEDLLM_ALLOW_RUNTIME_LORA_UPDATING, as vLLM's). An
    unload stops new requests for the adapter now; the engine drops its weights once those running have finished."""
    router = APIRouter(prefix="/v1")

    @router.post("/load_lora_adapter")
    async def load_lora_adapter(raw_request: Request) -> Response:
        request = await parse_body(raw_request, LoadLoRAAdapterRequest)
        await loras.add_off_loop(request.lora_name, request.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{request.lora_name}' added successfully.")

    @router.post("/unload_lora_adapter")
    async def unload_lora_adapter(raw_request: Request) -> Response:
        request = await parse_body(raw_request, UnloadLoRAAdapterRequest)
        engine.remove_lora(loras.remove(request.lora_name).lora_int_id)
        return PlainTextResponse(f"Success: LoRA adapter '{request.lora_name}' removed successfully.")

    return router


def _v1_routes(ctx: ServingContext) -> APIRouter:
    router = APIRouter(prefix="/v1")
    completions = OpenAIServingCompletion(ctx)
    chat = OpenAIServingChat(ctx)
    responses = OpenAIServingResponses(ctx)
    embeddings = OpenAIServingEmbedding(ctx)
    # A server generates or embeds (--runner pooling): the generation routes refuse at once on an embedding one.
    async def serves_generation() -> None:  # async: FastAPI runs a plain def dependency in a thread, per request
        check_serves_generation(ctx)

    generates = [Depends(serves_generation)]

    @router.get("/models")
    async def models() -> Response:
        return json_response(ctx.models.model_list())

    @router.get("/models/{model_id:path}")  # ":path": served names often hold a slash ("Qwen/Qwen3-0.6B")
    async def model(model_id: str) -> Response:
        return json_response(ctx.models.model_card(model_id))

    @router.post("/embeddings")
    async def create_embedding(raw_request: Request) -> Response:
        request = await parse_body(raw_request, EmbeddingRequest)
        return await embeddings.create_embedding(request, raw_request)

    @router.post("/completions", dependencies=generates)
    async def create_completion(raw_request: Request) -> Response:
        request = await parse_body(raw_request, CompletionRequest)
        return await completions.create_completion(request, raw_request)

    @router.post("/chat/completions", dependencies=generates)
    async def create_chat_completion(raw_request: Request) -> Response:
        request = await parse_body(raw_request, ChatCompletionRequest)
        return await chat.create_chat_completion(request, raw_request)

    @router.post("/responses", dependencies=generates)
    async def create_response(raw_request: Request) -> Response:
        request = await parse_body(raw_request, ResponsesRequest)
        return await responses.create_response(request, raw_request)

    return router


def _has_key(body: bytes, key: str) -> bool:
    try:
        value = from_json(body)  # stops at a fixed depth, where json.loads would recurse into a RecursionError
    except ValueError:
        return False  # validate_body reports it
    return isinstance(value, dict) and key in value


def _api_key_check(api_key: str | None) -> Callable:
    expected = api_key.encode() if api_key else None

    async def check(request: Request) -> None:
        if expected is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken does not tell how much of a guessed key was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise OpenAIError("Missing or invalid API key: send 'Authorization: Bearer <key>'",
                              HTTPStatus.UNAUTHORIZED, code="invalid_api_key")

    return check


# ---- errors ------------------------------------------------------------------------------------------------------


def _add_exception_handlers(app: FastAPI, engine: AsyncEngine, admission: AdmissionControl) -> None:
    """Every error answers in OpenAI's shape; what the client did wrong is a 4xx, and a 5xx names no internals."""
    _add_client_error_handlers(app)
    _add_server_error_handlers(app, engine)
    _add_deadline_handlers(app, admission)


def _add_deadline_handlers(app: FastAPI, admission: AdmissionControl) -> None:
    @app.exception_handler(QueueTimeoutError)
    @app.exception_handler(RequestTimeoutError)
    async def dropped(_: Request, exc: Exception) -> Response:  # the engine dropped it at a deadline
        return deadline_error(exc, admission.retry_after_s(time.monotonic())).to_response()


def _add_client_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, exc: OpenAIError) -> Response:
        return exc.to_response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        return from_validation_errors(exc.errors()).to_response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        return error_response(str(exc.detail), exc.status_code)

    @app.exception_handler(ClientDisconnected)
    @app.exception_handler(ClientDisconnect)  # Starlette's: the client left while its body was being read
    async def client_disconnected(_: Request, exc: Exception) -> Response:
        return Response(status_code=_CLIENT_CLOSED_REQUEST)

    @app.exception_handler(BodyTooLarge)
    async def too_large(_: Request, exc: BodyTooLarge) -> Response:
        response = body_too_large(exc.max_bytes).to_response()
        response.headers["connection"] = "close"  # the rest of the body is unread: the connection cannot go on
        return response

    @app.exception_handler(RecursionError)
    async def too_deep(_: Request, exc: RecursionError) -> Response:  # some code walked a deeply nested value
        return nesting_too_deep().to_response()

    @app.exception_handler(ValueError)
    async def value_error(_: Request, exc: ValueError) -> Response:  # bad input that no check above named
        return error_response(quote_bounded(exc, 300), HTTPStatus.BAD_REQUEST)


def _add_server_error_handlers(app: FastAPI, engine: AsyncEngine) -> None:
    @app.exception_handler(EngineDeadError)
    async def engine_dead(_: Request, exc: EngineDeadError) -> Response:
        if _is_draining(engine):  # the request got past the gate just before draining began
            return server_draining().to_response()
        return error_response(str(exc), HTTPStatus.SERVICE_UNAVAILABLE, code="engine_unavailable")

    @app.exception_handler(RequestFailedError)
    async def request_failed(_: Request, exc: RequestFailedError) -> Response:  # its message is about this request
        return error_response(str(exc), HTTPStatus.INTERNAL_SERVER_ERROR, code="request_failed")

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> Response:
        # A bug, not the client's doing: the detail goes to the log only (it may concern other requests).
        return internal_error(exc, None, "while handling the request").to_response()


# ---- running -----------------------------------------------------------------------------------------------------


def run_server(args: argparse.Namespace) -> int:
    """Load the model, serve it until SIGTERM/SIGINT, shut down gracefully; the exit code (0 after a signal)."""
    model, engine_args = prepare_serving(args)
    _exit_quietly_on_signals()
    delay_ms = getattr(args, "max_queue_delay_ms", None)
    engine = make_serving_engine(engine_args, getattr(args, "data_parallel_size", 1),
                                 health_stall_timeout_s=args.health_stall_timeout,
                                 core_process=getattr(args, "engine_core_process", True),
                                 warm_up_grammars=True,  # the first constrained request need not wait
                                 max_queue_delay_s=None if delay_ms is None else delay_ms / 1000)
    try:
        app = build_app(engine, args)
        log_serving(model, args)
        return serve_app(app, engine, args)
    finally:
        engine.shutdown()


def prepare_serving(args: argparse.Namespace) -> tuple[str, EngineArgs]:
    """The model to serve and its engine arguments, after the checks that must fail before the model loads (flags,
    chat template, TLS files: ValueError)."""
    model = args.model_tag or args.model
    if is_default_model(model):
        model = default_model_path()
        args.model_name = DEFAULT_MODEL_NAME
    else:
        args.model_name = model
    engine_args = engine_args_from_cli(args, model)
    load_chat_template(args.chat_template)  # a wrong path fails now, not after the model has loaded
    check_serve_args(args)  # likewise
    _check_ssl_files(args.ssl_keyfile, args.ssl_certfile)  # likewise
    return model, engine_args


def log_serving(model: str, args: argparse.Namespace, how: str = "") -> None:
    names = ", ".join(args.served_model_name or [args.model_name])
    scheme = "https" if args.ssl_certfile else "http"
    logger.info("Serving %s as %s on %s://%s:%d%s%s", model, names, scheme, args.host, args.port, args.root_path, how)


def serve_app(app: FastAPI, engine: AsyncEngine, args: argparse.Namespace, sockets: list | None = None) -> int:
    """Serve ``app`` (on ``sockets``, already listening, else on --host/--port) until SIGTERM/SIGINT or the engine
    core's death, draining gracefully; the exit code (1: the core died)."""
    grace = args.graceful_shutdown_timeout
    server = _make_graceful_server(uvicorn_config(app, args), engine, grace, app.state.in_flight)
    engine.on_core_death(lambda: setattr(server, "should_exit", True))  # the streams have failed: stop serving
    tune_gc_for_serving()
    server.run(sockets=sockets)
    return 1 if engine.core_died else 0


def uvicorn_config(app: FastAPI, args: argparse.Namespace):
    """uvicorn's settings from the server flags."""
    import uvicorn

    return uvicorn.Config(app, host=args.host, port=args.port,
                          # log_config=None: uvicorn's loggers propagate to the root handler of
                          # pagedllm.logger, so their lines have the same format as the server's.
                          log_config=None, log_level=args.uvicorn_log_level or args.log_level,
                          access_log=not args.disable_access_log,
                          ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile,
                          timeout_keep_alive=args.timeout_keep_alive,
                          http=request_read_deadline_protocol(args.timeout_request_read),
                          # A backstop only: _GracefulServer ends the streams itself after the grace period.
                          timeout_graceful_shutdown=args.graceful_shutdown_timeout + 5,
                          headers=_api_server_header(args))


def _api_server_header(args: argparse.Namespace) -> list[tuple[str, str]]:
    """With several API server processes, each response names the one that answered (uvicorn adds it as it adds
    ``server``: no per-request work), which shows how the kernel spreads the connections."""
    index = getattr(args, "api_server_index", None)
    return [] if index is None else [("x-pagedllm-api-server", str(index))]


def _check_ssl_files(keyfile: str | None, certfile: str | None) -> None:
    """uvicorn reads them only once the model has loaded: a wrong path should fail before that."""
    if keyfile and not certfile:
        raise ValueError("--ssl-keyfile needs --ssl-certfile (the certificate that goes with the key)")
    for flag, path in (("--ssl-keyfile", keyfile), ("--ssl-certfile", certfile)):
        if path and not os.path.isfile(path):
            raise ValueError(f"{flag}: no such file: {path}")


def _make_graceful_server(config, engine: AsyncEngine, grace_s: float, in_flight: InFlightRequests):
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn's server, which on shutdown stops accepting and lets in-flight requests finish; past its own
        deadline it cancels them mid-response (a traceback each). This one first drains: it keeps listening, so
        that new work gets a clean 503 (and /ready says 503) instead of a refused connection, while the requests
        in flight finish, for up to ``grace_s``. Then it closes the listener and, once ``grace_s`` is over, stops
        the engine: every open stream ends cleanly with an error event and ``[DONE]``, every waiting request with
        a 503, and the connections close by themselves."""

        async def shutdown(self, sockets=None) -> None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + grace_s
            engine.begin_draining()
            logger.info("Draining: %d request(s) in flight, new ones get 503", in_flight.count)
            await in_flight.wait_until_idle(grace_s, should_stop=lambda: self.force_exit)
            timer = loop.call_later(max(0.0, deadline - loop.time()),
                                    lambda: loop.run_in_executor(None, engine.shutdown))
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

    return GracefulServer(config)


def _exit_quietly_on_signals() -> None:
    """While uvicorn serves, its own handlers catch SIGTERM/SIGINT and shut down gracefully; afterwards it re-raises
    the signal to whatever handler came before. This one turns that (and a signal during model loading) into a
    clean exit with status 0 instead of death by signal or a KeyboardInterrupt traceback."""

    def exit_zero(signum: int, frame: object) -> None:
        raise SystemExit(0)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, exit_zero)
