"""The OpenAI-compatible HTTP server: ``build_app(engine, args)`` makes the FastAPI app, ``run_server(args)`` loads
the model and serves it with uvicorn until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http import HTTPStatus

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagedllm import __version__
from pagedllm.config import server_api_key_from_env
from pagedllm.engine.async_engine import AsyncEngine, EngineDeadError
from pagedllm.entrypoints.chat_utils import load_chat_template
from pagedllm.entrypoints.default_model import DEFAULT_MODEL_NAME, default_model_path
from pagedllm.entrypoints.engine_args import engine_args_from_cli
from pagedllm.entrypoints.openai.errors import OpenAIError, error_response, from_validation_errors
from pagedllm.entrypoints.openai.limits import RequestLimits
from pagedllm.entrypoints.openai.metrics import build_registry, render_metrics
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
    json_response,
    parse_body,
)
from pagedllm.entrypoints.openai.serving_completions import OpenAIServingCompletion
from pagedllm.entrypoints.openai.serving_tokenization import OpenAIServingTokenization

logger = logging.getLogger("pagedllm.server")

_CLIENT_CLOSED_REQUEST = 499  # nginx's code for "the client went away"; nobody reads it


@dataclass(frozen=True)
class ServerConfig:
    """The server's own settings (the engine has its config)."""

    served_model_names: tuple[str, ...]
    model_root: str
    api_key: str | None = None
    allowed_origins: tuple[str, ...] = ()
    chat_template: str | None = None  # template text, already read from --chat-template
    limits: RequestLimits = RequestLimits()

    @classmethod
    def from_args(cls, args: argparse.Namespace, engine: AsyncEngine) -> ServerConfig:
        model = engine.model_config.model
        names = tuple(args.served_model_name or [getattr(args, "model_name", None) or model])
        return cls(
            served_model_names=names,
            model_root=model,
            api_key=args.api_key or server_api_key_from_env(),
            allowed_origins=tuple(args.allowed_origins or ()),
            chat_template=load_chat_template(args.chat_template),
            limits=RequestLimits.from_args(args),
        )


def build_app(engine: AsyncEngine, args: argparse.Namespace | ServerConfig) -> FastAPI:
    """The FastAPI app serving ``engine``; shutting the app down (lifespan end) shuts the engine down."""
    config = args if isinstance(args, ServerConfig) else ServerConfig.from_args(args, engine)
    max_model_len = engine.config.scheduler_config.max_model_len
    ctx = ServingContext(
        engine=engine,
        models=ServedModels(config.served_model_names, config.model_root, max_model_len),
        tokenizer=engine.tokenizer,
        max_model_len=max_model_len,
        vocab_size=engine.model_config.vocab_size,
        chat_template=config.chat_template,
        limits=config.limits,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        # uvicorn has stopped accepting and finished (or cancelled) the in-flight requests by now.
        logger.info("Shutting the engine down")
        await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="pagedllm OpenAI-compatible server", version=__version__, lifespan=lifespan)
    _add_exception_handlers(app)
    if config.allowed_origins:
        # No credentials (cookies): the API authenticates with a bearer header, which CORS allows as any header.
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins), allow_credentials=False,
                           allow_methods=["*"], allow_headers=["*"])
    app.include_router(_public_routes(ctx, build_registry(engine.get_metrics, ctx.models.default_name)))
    app.include_router(_v1_routes(ctx), dependencies=[Depends(_api_key_check(config.api_key))])
    return app


# ---- routes ------------------------------------------------------------------------------------------------------


def _public_routes(ctx: ServingContext, registry) -> APIRouter:
    router = APIRouter()
    tokenization = OpenAIServingTokenization(ctx)

    @router.get("/health")
    async def health() -> Response:
        if ctx.engine.is_healthy():
            return Response(status_code=HTTPStatus.OK)
        return error_response("The engine loop is not running or not making progress",
                              HTTPStatus.SERVICE_UNAVAILABLE, code="engine_unavailable")

    @router.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": __version__})

    @router.get("/metrics")
    async def metrics() -> Response:
        body, content_type = render_metrics(registry)
        return Response(body, media_type=content_type)

    @router.post("/tokenize")
    async def tokenize(raw_request: Request) -> Response:
        body = await raw_request.body()
        model = TokenizeChatRequest if _has_key(body, "messages") else TokenizeCompletionRequest
        request = await parse_body(raw_request, model)
        return json_response(tokenization.tokenize(request))

    @router.post("/detokenize")
    async def detokenize(raw_request: Request) -> Response:
        request = await parse_body(raw_request, DetokenizeRequest)
        return json_response(tokenization.detokenize(request))

    return router


def _v1_routes(ctx: ServingContext) -> APIRouter:
    router = APIRouter(prefix="/v1")
    completions = OpenAIServingCompletion(ctx)
    chat = OpenAIServingChat(ctx)

    @router.get("/models")
    async def models() -> Response:
        return json_response(ctx.models.model_list())

    @router.post("/completions")
    async def create_completion(raw_request: Request) -> Response:
        request = await parse_body(raw_request, CompletionRequest)
        return await completions.create_completion(request, raw_request)

    @router.post("/chat/completions")
    async def create_chat_completion(raw_request: Request) -> Response:
        request = await parse_body(raw_request, ChatCompletionRequest)
        return await chat.create_chat_completion(request, raw_request)

    return router


def _has_key(body: bytes, key: str) -> bool:
    try:
        value = json.loads(body)
    except ValueError:
        return False  # the parser reports it
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


def _add_exception_handlers(app: FastAPI) -> None:
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
    async def client_disconnected(_: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=_CLIENT_CLOSED_REQUEST)

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_: Request, exc: EngineDeadError) -> Response:
        return error_response(str(exc), HTTPStatus.SERVICE_UNAVAILABLE, code="engine_unavailable")

    @app.exception_handler(ValueError)
    async def value_error(_: Request, exc: ValueError) -> Response:  # bad input that no check above named
        return error_response(str(exc), HTTPStatus.BAD_REQUEST)


# ---- running -----------------------------------------------------------------------------------------------------


def run_server(args: argparse.Namespace) -> int:
    """Load the model, serve it until SIGTERM/SIGINT, shut down gracefully; the exit code (0 after a signal)."""
    import uvicorn

    model = args.model_tag or args.model
    if model is None:
        model = default_model_path()
        args.model_name = DEFAULT_MODEL_NAME
    else:
        args.model_name = model
    engine_args = engine_args_from_cli(args, model)
    load_chat_template(args.chat_template)  # a wrong path fails now, not after the model has loaded
    _exit_quietly_on_signals()
    engine = AsyncEngine.from_engine_args(engine_args)
    try:
        app = build_app(engine, args)
        names = ", ".join(args.served_model_name or [args.model_name])
        logger.info("Serving %s as %s on http://%s:%d", model, names, args.host, args.port)
        grace = args.graceful_shutdown_timeout
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                access_log=not args.disable_access_log,
                                # A backstop only: _GracefulServer ends the streams itself after `grace`.
                                timeout_graceful_shutdown=grace + 5)
        _make_graceful_server(config, engine, grace).run()
    finally:
        engine.shutdown()
    return 0


def _make_graceful_server(config, engine: AsyncEngine, grace_s: float):
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn's server, which on shutdown stops accepting and lets in-flight requests finish; past its own
        deadline it cancels them mid-response (a traceback each). This one stops the engine after ``grace_s``
        instead: every open stream then ends cleanly with an error event and ``[DONE]``, every waiting request
        with a 503, and the connections close by themselves."""

        async def shutdown(self, sockets=None) -> None:
            loop = asyncio.get_running_loop()
            timer = loop.call_later(grace_s, lambda: loop.run_in_executor(None, engine.shutdown))
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
