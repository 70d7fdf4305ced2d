"""Flags of ``pagedllm serve``: the server's own, then the engine's (see ``entrypoints/engine_args.py``)."""

from __future__ import annotations

import argparse

from pagedllm.config import runtime_lora_updating_allowed
from pagedllm.engine.async_engine import DEFAULT_HEALTH_STALL_TIMEOUT_S
from pagedllm.entrypoints.default_model import DEFAULT_MODEL_INSTALL, DEFAULT_MODEL_NAME
from pagedllm.entrypoints.engine_args import add_engine_args
from pagedllm.entrypoints.generation_config import DEFAULT_SERVING_MAX_TOKENS
from pagedllm.entrypoints.openai.admission import add_admission_args
from pagedllm.entrypoints.openai.limits import add_limit_args
from pagedllm.entrypoints.openai.lora_modules import LoRAModulePath, parse_lora_module
from pagedllm.entrypoints.openai.reasoning_parsers import REASONING_PARSERS
from pagedllm.entrypoints.openai.tool_parsers import TOOL_CALL_PARSERS


class _RepeatableModel(argparse.Action):
    """``--model``, which may be repeated: ``model`` keeps the first value (one model, as before) and
    ``model_flags`` every value in order (more than one: several models in one server)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        namespace.model_flags = [*(getattr(namespace, "model_flags", None) or []), values]
        setattr(namespace, self.dest, namespace.model_flags[0])


def repeated_models(args: argparse.Namespace) -> list[str]:
    """The values of ``--model`` when it was given more than once (several models in one server), else []."""
    values = getattr(args, "model_flags", None) or []
    return list(values) if len(values) > 1 else []


def _lora_module(text: str) -> LoRAModulePath:
    try:
        return parse_lora_module(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _origins(text: str) -> list[str]:
    return [origin.strip() for origin in text.split(",") if origin.strip()]


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                        help="model to serve: a local Hugging Face model directory, a .gguf file, or a hub id "
                             f"(default: {DEFAULT_MODEL_NAME}, from `{DEFAULT_MODEL_INSTALL}`)")
    parser.add_argument("--model", action=_RepeatableModel, default=None, metavar="[NAME=]MODEL",
                        help="the model, as a flag (the positional MODEL wins); repeat it to serve several models, "
                             "each in its own engine core process with the command line's flags, the GPU memory "
                             "shared evenly (--model A --model B; NAME=MODEL sets a model's served name): a "
                             "short form of --models-config")
    parser.set_defaults(model_flags=None)  # every --model, in order (see _RepeatableModel)
    parser.add_argument("--config", default=None, metavar="FILE.yaml",
                        help="read flags from a YAML file: keys are flag names (max-model-len or max_model_len), "
                             "values what the flag takes (a list, true/false for a switch); flags given on the "
                             "command line win over the file; an unknown key is an error")
    parser.add_argument("--models-config", default=None, metavar="FILE.yaml",
                        help="serve several models, each in its own engine core process with its own engine "
                             "settings, and weighted aliases between them (see the README: Several models in one "
                             "server); the command line's flags are every model's defaults")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 for every interface (default: 127.0.0.1)")
    server.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    server.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on every route that does work: /v1/*, /tokenize, "
                             "/detokenize (and /metrics with --require-api-key-for-metrics); /health, /ready, /ping "
                             "and /version stay open (default: $PAGEDLLM_API_KEY; none = no authentication)")
    server.add_argument("--admin-api-key", default=None,
                        help="with --models-config or several --model: enable the admin API (load and unload models "
                             "at run time: POST /v1/admin/models, DELETE /v1/admin/models/NAME), which wants "
                             "'Authorization: Bearer KEY' (default: $PAGEDLLM_ADMIN_API_KEY; none = no admin API)")
    server.add_argument("--require-api-key-for-metrics", action="store_true",
                        help="with --api-key, /metrics wants the key too (default: open, as scrapers send no key)")
    server.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                        help="model name(s) clients use in 'model'; the first is reported in responses (default: "
                             f"MODEL as given, or {DEFAULT_MODEL_NAME} for the default model)")
    server.add_argument("--lora-modules", type=_lora_module, nargs="+", default=None, metavar="NAME=PATH",
                        help="LoRA adapters to serve (implies --enable-lora): name=path, or JSON "
                             "'{\"name\": ..., \"path\": ..., \"base_model_name\": ...}'; a request's 'model' picks "
                             "one by name")
    server.add_argument("--allowed-origins", type=_origins, default=None, metavar="ORIGINS",
                        help="comma-separated origins allowed by CORS, e.g. 'https://a.example,https://b.example' or "
                             "'*' (default: CORS off)")
    server.add_argument("--chat-template", default=None, metavar="FILE",
                        help="Jinja chat template file (or inline template) for /v1/chat/completions (default: the "
                             "tokenizer's)")
    server.add_argument("--generation-config", default="auto", metavar="auto|vllm|DIR",
                        help="defaults of the sampling fields a request leaves unset (temperature, top_p, top_k, "
                             "min_p, repetition_penalty, max_new_tokens as max_tokens): auto = the model's "
                             "generation_config.json, vllm = none (the engine's own), or a directory holding a "
                             "generation_config.json (default: auto)")
    server.add_argument("--max-tokens-default", type=int, default=None, metavar="N",
                        help="max_tokens of a request that sets none (chat, or completions with max_tokens null), "
                             "capped by the context; 0 = no bound but the context (default: the model's "
                             f"max_new_tokens, else {DEFAULT_SERVING_MAX_TOKENS})")
    server.add_argument("--enable-auto-tool-choice", action="store_true",
                        help="answer tool_choice \"auto\" (the default when a request has tools): read the calls the "
                             "model writes in the format of --tool-call-parser (default: off; such requests get a "
                             "400, as in vLLM)")
    server.add_argument("--tool-call-parser", choices=tuple(TOOL_CALL_PARSERS), default=None,
                        help="the model family's tool-call format, for --enable-auto-tool-choice")
    server.add_argument("--reasoning-parser", choices=tuple(REASONING_PARSERS), default=None,
                        help="split what a reasoning model writes between <think> and </think> into the message's "
                             "reasoning_content (default: none, all text is content)")
    server.add_argument("--graceful-shutdown-timeout", "--shutdown-timeout", dest="graceful_shutdown_timeout",
                        type=float, default=3.0, metavar="SECONDS",
                        help="on SIGTERM/SIGINT, how long in-flight requests may finish before they are aborted; "
                             "new ones get 503 meanwhile, and the server exits 0 (default: 3)")
    server.add_argument("--health-stall-timeout", type=_positive_float, default=DEFAULT_HEALTH_STALL_TIMEOUT_S,
                        metavar="SECONDS",
                        help="/health and /ready answer 503 when the engine loop has made no progress for this long "
                             f"(default: {DEFAULT_HEALTH_STALL_TIMEOUT_S:g})")
    server.add_argument("--data-parallel-size", "-dp", type=_positive_int, default=1, metavar="N",
                        help="run N replicas of the engine (each its own engine core process; on CUDA replica i "
                             "takes GPUs i*tp*pp..(i+1)*tp*pp-1) behind this server: each request goes to the "
                             "replica with the fewest requests in flight, requests sharing a prompt prefix to the "
                             "same one while its load allows (default: 1)")
    server.add_argument("--api-server-count", "-asc", type=_positive_int, default=1, metavar="N",
                        help="serve HTTP from N API server processes (tokenization, detokenization, streaming) in "
                             "front of the one engine core process, on one listening socket: for when one API "
                             "server process's CPU is the limit (many concurrent streams of a small model). See the "
                             "README (Several API server processes) for what it does not support (default: 1)")
    server.add_argument("--no-engine-core-process", dest="engine_core_process", action="store_false",
                        help="run the engine core (scheduler, model) in the server's process, in a thread, instead "
                             "of in its own process (default: its own process, so that HTTP, tokenization and "
                             "streaming never share a GIL with the engine's steps)")
    server.add_argument("--timeout-keep-alive", type=_positive_float, default=5.0, metavar="SECONDS",
                        help="close an idle keep-alive connection after this long (default: 5)")
    server.add_argument("--timeout-request-read", type=_positive_float, default=30.0, metavar="SECONDS",
                        help="a client must send a whole request (headers and body) within this long of connecting "
                             "or of its previous response, else it is disconnected: slow clients cannot hold "
                             "connections (default: 30)")
    server.add_argument("--root-path", default="", metavar="PATH",
                        help="the path prefix a reverse proxy serves this server under, e.g. /llm: routes answer both "
                             "with and without it, and /openapi.json names it as the server URL (default: none)")
    server.add_argument("--ssl-keyfile", default=None, metavar="FILE", help="serve HTTPS with this private key (PEM)")
    server.add_argument("--ssl-certfile", default=None, metavar="FILE",
                        help="serve HTTPS with this certificate (PEM; it may hold the key too)")
    server.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                        help="log level of the server and engine (default: info)")
    server.add_argument("--uvicorn-log-level", default=None,
                        choices=("critical", "error", "warning", "info", "debug", "trace"),
                        help="log level of uvicorn's own loggers (default: --log-level)")
    server.add_argument("--disable-access-log", action="store_true", help="no log line per HTTP request")
    server.add_argument("--disable-log-stats", action="store_true",
                        help="no periodic stats line (throughput, running and waiting requests, KV cache usage, "
                             "every 10 s while the server has work)")
    add_limit_args(parser)
    add_admission_args(parser)
    add_engine_args(parser, serving=True)


def check_serve_args(args: argparse.Namespace) -> None:
    """Flags that only make sense together (ValueError: the command says why and exits)."""
    if getattr(args, "models_config", None) and (args.model_tag or args.model):
        raise ValueError("--models-config lists the models: give no MODEL (nor --model) beside it")
    if repeated_models(args):
        _check_repeated_models(args)
    if getattr(args, "data_parallel_size", 1) > 1 and not getattr(args, "engine_core_process", True):
        raise ValueError("--data-parallel-size > 1 runs each replica in its own engine core process: drop "
                         "--no-engine-core-process")
    if getattr(args, "api_server_count", 1) > 1:
        _check_api_server_count(args)
    if getattr(args, "enable_auto_tool_choice", False) and getattr(args, "tool_call_parser", None) is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (one of "
                         f"{', '.join(TOOL_CALL_PARSERS)})")


def _check_repeated_models(args: argparse.Namespace) -> None:
    if args.model_tag:
        raise ValueError(f"several --model flags list the models: give no positional MODEL ({args.model_tag}) "
                         "beside them")
    if args.served_model_name:
        raise ValueError("--served-model-name names one model: with several --model flags give each model its "
                         "served name as --model NAME=MODEL")


def _check_api_server_count(args: argparse.Namespace) -> None:
    """Features whose state lives in one API server process, refused beside several (each would see its share)."""
    count = args.api_server_count
    refused = [
        ("--models-config", getattr(args, "models_config", None)),
        ("several --model", bool(repeated_models(args))),
        ("--data-parallel-size > 1", getattr(args, "data_parallel_size", 1) > 1),
        ("--no-engine-core-process", not getattr(args, "engine_core_process", True)),
        ("--max-num-waiting", getattr(args, "max_num_waiting", None) is not None),
        ("PAGEDLLM_ALLOW_RUNTIME_LORA_UPDATING", runtime_lora_updating_allowed()),
    ]
    for flag, is_set in refused:
        if is_set:
            raise ValueError(f"--api-server-count {count} does not work with {flag}: each API server process would "
                             "keep its own share of its state; use --api-server-count 1 with it")
