"""The ``bench`` command line: ``pagedllm bench throughput | latency | memory | serve | plot`` (and ``python -m
pagedllm.bench ...``). Each subcommand's module is imported only when it runs, so ``--help`` stays fast."""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from collections.abc import Callable

from pagedllm.bench.hf_baseline import BASELINES
from pagedllm.bench.models import reference_model_names
from pagedllm.bench.workloads import WORKLOAD_NAMES
from pagedllm.entrypoints.engine_args import add_engine_args

_COMPARE_CHOICES = ("hf", *BASELINES)


def add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``bench`` subcommand (with throughput | latency | memory | serve | plot) to a CLI's subparsers. Each leaf sets
    ``func``: call ``args.func(args)``, which returns the exit code."""
    parser = subparsers.add_parser(
        "bench", help="benchmark pagedllm (throughput, latency, memory) or any OpenAI-compatible server (serve)",
        description="Benchmarks: offline throughput and latency of pagedllm next to HF transformers baselines, "
                    "KV memory saved by block sharing, serving latency of any OpenAI-compatible server, and charts "
                    "of the results.")
    add_bench_subcommands(parser)


def add_bench_subcommands(parser: argparse.ArgumentParser) -> None:
    subparsers = parser.add_subparsers(dest="bench_command", metavar="{throughput,latency,memory,serve,plot}")
    parser.set_defaults(func=lambda args: _print_help(parser))
    _add_throughput(subparsers)
    _add_latency(subparsers)
    _add_memory(subparsers)
    _add_serve(subparsers)
    _add_plot(subparsers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pagedllm.bench", description="pagedllm benchmarks")
    add_bench_subcommands(parser)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:  # a bad flag value, workload or model: say why, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _runner(module: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        return importlib.import_module(f"pagedllm.bench.{module}").main(args)

    return run


# ---- subcommands -------------------------------------------------------------------------------------------------

def _add_throughput(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "throughput", help="offline throughput of a workload through LLM.generate",
        description="Run a whole workload offline (after a warm-up) and report requests/s, output and total tokens/s, "
                    "peak KV cache usage and preemptions, next to the memory roofline and, with --compare hf, HF "
                    "transformers baselines run on the same device and workload.")
    _add_model_args(parser)
    _add_workload_args(parser, default="nano")
    _add_engine_args(parser)
    _add_compare(parser)
    parser.add_argument("--structured-fraction", type=float, default=0.0, metavar="F",
                        help="that fraction of the requests (spread evenly) carries a fixed JSON schema; needs a "
                             "vocabulary: --tokenizer (e.g. a real tokenizer directory with random weights) or the "
                             "model's own. Then the same prompts also run unconstrained with each request's "
                             "max_tokens = the tokens it generated constrained, and the record reports both and the "
                             "throughput loss (default: 0, no constraints)")
    parser.add_argument("--disable-tqdm", action="store_true", help="no progress bar during the timed run")
    parser.add_argument("--num-loras", type=int, default=0, metavar="N",
                        help="N random LoRA adapters of rank --max-lora-rank on all projections, requests spread "
                             "evenly over them (--max-loras of them in one step); 0 = the base model (default: 0)")
    _add_output_json(parser)
    parser.set_defaults(func=_runner("throughput"))


def _add_latency(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "latency", help="end-to-end latency of one batch of fixed input and output lengths",
        description="Time one batch of random prompts (fixed batch size, input and output length): warm-up "
                    "iterations, then timed ones; report mean/p50/p99 latency, prefill latency, ms per decode step "
                    "and the decode step's memory roofline (weights + KV bytes over the measured bandwidth).")
    _add_model_args(parser)
    parser.add_argument("--batch-size", type=int, default=8, help="requests in the batch (default: 8)")
    parser.add_argument("--input-len", type=int, default=32, help="prompt tokens per request (default: 32)")
    parser.add_argument("--output-len", type=int, default=128, help="output tokens per request (default: 128)")
    parser.add_argument("--num-iters-warmup", type=int, default=3, help="untimed iterations first (default: 3)")
    parser.add_argument("--num-iters", type=int, default=10, help="timed iterations (default: 10)")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="sampling temperature, 0 = greedy (default: 1.0, as vLLM's latency benchmark)")
    _add_engine_args(parser)
    _add_compare(parser)
    _add_output_json(parser)
    parser.set_defaults(func=_runner("latency"))


def _add_memory(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "memory", help="KV blocks saved by sharing: parallel sampling and beam search vs independent requests",
        description="Measure the KV cache blocks in use (mean and peak over the engine steps) for parallel sampling "
                    "(SamplingParams(n=N), sequences sharing the prompt's blocks with copy-on-write) and beam search "
                    "(width W, beams sharing prefix blocks through prefix caching), each next to the same work as "
                    "N (or W) independent requests per prompt on an engine with prefix caching off, which shares "
                    "nothing; report the blocks saved in percent, as the PagedAttention paper does.")
    _add_model_args(parser)
    _add_workload_args(parser, default="random")
    parser.add_argument("--modes", nargs="+", choices=("parallel-sampling", "beam-search"),
                        default=["parallel-sampling", "beam-search"],
                        help="which sharing modes to measure (default: both)")
    parser.add_argument("--n", type=int, default=4,
                        help="sequences per prompt for parallel sampling, and independent requests per prompt in its "
                             "baseline (default: 4)")
    parser.add_argument("--beam-width", type=int, default=4,
                        help="beam width, and independent requests per prompt in its baseline (default: 4)")
    parser.add_argument("--length-penalty", type=float, default=1.0, help="beam search length penalty (default: 1.0)")
    _add_engine_args(parser)  # bench memory sets prefix caching per run itself
    _add_output_json(parser)
    parser.set_defaults(func=_runner("memory"))


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="serving benchmark against a running OpenAI-compatible server",
        description="Replay a workload against any OpenAI-compatible server (streaming /v1/completions) with Poisson "
                    "arrivals; report TTFT, TPOT, ITL and E2E latency (mean, median, p99) and goodput, with the "
                    "definitions of vLLM's bench serve.")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000",
                        help="server address (default: http://127.0.0.1:8000)")
    parser.add_argument("--endpoint", default="/v1/completions", help="completions path (default: /v1/completions)")
    parser.add_argument("--model", default=None,
                        help="model name sent in requests (default: the first one the server lists at /v1/models)")
    parser.add_argument("--api-key", default=None, help="bearer token for the server, if it wants one")
    parser.add_argument("--label", default="server",
                        help="engine name written in the record, e.g. pagedllm or vllm (default: server)")
    parser.add_argument("--device-label", default="unknown",
                        help="device the server runs on, for the record (the client cannot see it; default: unknown)")
    _add_workload_args(parser, default="sharegpt-like")
    parser.add_argument("--request-rate", type=float, default=math.inf,
                        help="requests per second, arrivals a Poisson process; inf sends all at once (default: inf)")
    parser.add_argument("--max-concurrency", type=int, default=None,
                        help="most requests in flight at once (default: no limit)")
    parser.add_argument("--num-clients", type=int, default=1,
                        help="client processes sending the requests (request i from client i mod N, at the same "
                             "arrival times): one Python client streams at most ~10-20k chunks a second, so a fast "
                             "server needs several to be measured (default: 1)")
    parser.add_argument("--prompt-format", choices=("token-ids", "text"), default="token-ids",
                        help="send prompts as token-id lists, or as text (decoded with --tokenizer, else one common "
                             "word per token) (default: token-ids)")
    parser.add_argument("--tokenizer", default=None, help="local tokenizer to decode prompts for --prompt-format text")
    parser.add_argument("--goodput", nargs="+", metavar="NAME:MS", default=None,
                        help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:10000 (milliseconds; names ttft, tpot, "
                             "e2el)")
    parser.add_argument("--metric-percentiles", type=_percentiles, default=[99.0],
                        help="comma-separated percentiles reported besides mean and median (default: 99)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take (default: 600)")
    parser.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    _add_output_json(parser)
    parser.set_defaults(func=_runner("serve"))


def _add_plot(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plot", help="PNG charts from benchmark records",
        description="Turn records written with --output-json into PNG charts: throughput by engine (throughput and "
                    "latency records) and latency percentiles vs request rate (serve records). Needs matplotlib "
                    '(pip install "pagedllm[bench]").')
    parser.add_argument("records", nargs="+", help="record JSON files, or directories searched for *.json")
    parser.add_argument("--output-dir", default="benchmarks/plots",
                        help="where to write throughput.png and serving.png (default: benchmarks/plots)")
    _add_output_json(parser, what="a JSON list of the charts written")
    parser.set_defaults(func=_runner("plot"))


# ---- flag groups -------------------------------------------------------------------------------------------------

def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="qwen3-0.6b",
                        help=f"a reference architecture ({', '.join(reference_model_names())}; config only, random "
                             "weights), a local model directory, or a hub id (default: qwen3-0.6b)")


def _add_workload_args(parser: argparse.ArgumentParser, default: str) -> None:
    group = parser.add_argument_group("workload")
    group.add_argument("--workload", choices=WORKLOAD_NAMES, default=default,
                       help=f"nano: nano-vllm's bench.py (256 fixed requests); random: fixed lengths; sharegpt-like: "
                            f"log-normal lengths; shared-prefix: one system prompt of --prefix-len tokens + a distinct "
                            f"suffix of --input-len tokens per prompt (default: {default})")
    group.add_argument("--workload-json", default=None, help="load the workload from this file instead of generating")
    group.add_argument("--save-workload", default=None, help="also write the workload to this JSON file")
    group.add_argument("--num-prompts", type=int, default=None,
                       help="requests of random, sharegpt-like and shared-prefix (default: 200; nano has a fixed 256)")
    group.add_argument("--input-len", type=int, default=512,
                       help="prompt tokens of the random workload; the distinct suffix of shared-prefix (default: 512)")
    group.add_argument("--output-len", type=int, default=128,
                       help="output tokens of the random and shared-prefix workloads (default: 128)")
    group.add_argument("--prefix-len", type=int, default=256,
                       help="tokens of the prefix every shared-prefix prompt starts with (default: 256)")
    group.add_argument("--limit", type=int, default=None,
                       help="run only the first N requests of the workload (recorded in the record's workload)")
    group.add_argument("--seed", type=int, default=0,
                       help="seed of random and sharegpt-like workloads, of arrivals and of the engine (default: 0)")


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    """The engine flags of ``pagedllm serve``, but random weights by default: nothing to download."""
    add_engine_args(parser)
    parser.set_defaults(load_format="dummy")


def _add_compare(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compare", action="append", choices=_COMPARE_CHOICES, default=None,
                        help="also run baselines, each in its own subprocess on the same device and workload: hf = "
                             "hf-static (model.generate, batches of 64) and hf-continuous (transformers' continuous "
                             "batching); repeatable")


def _add_output_json(parser: argparse.ArgumentParser, what: str = "the result record") -> None:
    parser.add_argument("--output-json", default=None, help=f"write {what} to this JSON file")


def _percentiles(text: str) -> list[float]:
    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not 0 < p < 100 for p in values):
        raise argparse.ArgumentTypeError(f"percentiles must lie strictly between 0 and 100, got {text!r}")
    return values
