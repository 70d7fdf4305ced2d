"""The ``pagedllm`` command: ``serve`` (OpenAI-compatible server), ``generate`` (offline), ``chat`` (a client for
a running server), ``bench`` (benchmarks, when installed), ``--version``.

Heavy modules (torch, FastAPI) are imported only by the subcommand that runs, so ``--help`` and ``--version`` are
instant.
"""

from __future__ import annotations

import argparse
import sys

from pagedllm import __version__
from pagedllm.config import server_api_key_from_env
from pagedllm.entrypoints.chat_client import DEFAULT_CHAT_MAX_TOKENS
from pagedllm.entrypoints.default_model import DEFAULT_MODEL_INSTALL, DEFAULT_MODEL_NAME, DefaultModelMissing
from pagedllm.entrypoints.engine_args import add_engine_args
from pagedllm.entrypoints.openai.cli_args import add_serve_args, repeated_models
from pagedllm.logger import configure_logging


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pagedllm",
        description="pagedllm: a high-throughput, memory-efficient LLM inference and serving engine.",
    )
    parser.add_argument("--version", action="version", version=f"pagedllm {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="{serve,generate,chat,bench}")
    _add_serve(subparsers)
    _add_generate(subparsers)
    _add_chat(subparsers)
    _add_bench(subparsers)
    parser.set_defaults(func=lambda args: _print_help(parser))
    return parser


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve MODEL over an OpenAI-compatible API: /v1/completions, /v1/chat/completions, /v1/models, "
                    "/health, /metrics, /tokenize, /detokenize, /version. Without MODEL, serves "
                    f"{DEFAULT_MODEL_NAME} (install it with `{DEFAULT_MODEL_INSTALL}`).")
    add_serve_args(parser)
    parser.set_defaults(func=_run_serve, command_parser=parser)  # command_parser: what --config fills in


def _add_generate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate", help="generate text offline (no server) and print it",
        description="Load MODEL in this process, generate a completion for each --prompt and print it.")
    parser.add_argument("--model", default=None,
                        help=f"local model directory, .gguf file or hub id (default: {DEFAULT_MODEL_NAME})")
    parser.add_argument("--prompt", action="append", required=True,
                        help="prompt text; repeat the flag for several prompts (generated as one batch)")
    parser.add_argument("--chat", action="store_true",
                        help="send each prompt as a user message through the model's chat template")
    parser.add_argument("--system", default=None, help="system message for --chat")
    parser.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate (default: 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default: 1)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 = off")
    add_engine_args(parser)
    parser.set_defaults(func=_run_generate)


def _add_chat(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "chat", help="chat interactively with a running server",
        description="A small interactive client for a running OpenAI-compatible server: type a message, the reply "
                    "streams back. Ctrl-C cancels a reply (the server aborts it), /clear starts over, /exit or "
                    "Ctrl-D quits. A reply cut at --max-tokens says so.")
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1",
                        help="the server's API base URL (default: http://127.0.0.1:8000/v1)")
    parser.add_argument("--api-key", default=None, help="bearer token, if the server wants one "
                                                        "(default: $PAGEDLLM_API_KEY)")
    parser.add_argument("--model", default=None, help="model name (default: the first the server lists)")
    parser.add_argument("--system", default=None, help="system message at the start of the conversation")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_CHAT_MAX_TOKENS,
                        help=f"most tokens per reply; 0 = the server's default (default: {DEFAULT_CHAT_MAX_TOKENS})")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: server's)")
    parser.set_defaults(func=_run_chat)


def _add_bench(subparsers: argparse._SubParsersAction) -> None:
    try:
        from pagedllm.bench.cli import add_bench_parser
    except ImportError:  # the benchmark suite is optional
        return
    add_bench_parser(subparsers)


# ---- subcommands -------------------------------------------------------------------------------------------------


def _run_serve(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    if args.models_config or repeated_models(args):
        from pagedllm.entrypoints.openai.multi_server import run_multi_server

        return run_multi_server(args)
    if args.api_server_count > 1:
        from pagedllm.entrypoints.openai.api_servers import run_api_servers

        return run_api_servers(args)
    from pagedllm.entrypoints.openai.server import run_server

    return run_server(args)


def _run_generate(args: argparse.Namespace) -> int:
    configure_logging("warning")
    from pagedllm.entrypoints.engine_args import engine_kwargs_from_cli
    from pagedllm.entrypoints.llm import LLM
    from pagedllm.params import SamplingParams

    engine_kwargs = engine_kwargs_from_cli(args)
    llm = LLM(args.model, **engine_kwargs)  # None: the default model
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k)
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        conversations = [system + [{"role": "user", "content": prompt}] for prompt in args.prompt]
        outputs = llm.chat(conversations, params, use_tqdm=False)
    else:
        outputs = llm.generate(args.prompt, params, use_tqdm=False)
    for output in outputs:
        print(output.outputs[0].text)
    return 0


def _run_chat(args: argparse.Namespace) -> int:
    from pagedllm.entrypoints.chat_client import ChatClient, run_chat

    params = {key: value for key, value in (("max_tokens", args.max_tokens or None), ("temperature", args.temperature))
              if value is not None}
    client = ChatClient(args.url, args.api_key or server_api_key_from_env())
    try:
        return run_chat(client, args.model, args.system, params)
    except KeyboardInterrupt:  # between turns (run_chat handles it at the prompt and during a reply): no traceback
        return 130


def _reparse_with_config_file(parser: argparse.ArgumentParser, argv: list[str] | None,
                              args: argparse.Namespace) -> argparse.Namespace:
    """The command line again, over the defaults that ``--config FILE`` sets: what the line gives wins."""
    from pagedllm.entrypoints.config_file import apply_config_file

    apply_config_file(args.command_parser, args.config)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "config", None):
            args = _reparse_with_config_file(parser, argv, args)
        return args.func(args)
    except DefaultModelMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # a bad flag value or model the engine refused: say why, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
