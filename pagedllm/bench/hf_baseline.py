"""HF transformers baselines, each run in its own process (``python -m pagedllm.bench.hf_baseline``) so that its
memory is gone before the next engine starts on the same device.

- ``hf-static``: ``model.generate`` over batches of up to ``batch_size`` requests in workload order, left-padded;
  every row runs to the longest ``max_tokens`` of its batch (EOS disabled), only the requested tokens are credited.
- ``hf-continuous``: transformers' continuous batching (``continuous_batching_context_manager`` + ``add_request``
  with each request's ``max_new_tokens`` and ``eos_token_id=-1``).

The architecture is built from ``config.json`` with random weights (``from_config``) in the benchmark's dtype.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BASELINES = ("hf-static", "hf-continuous")
DEFAULT_STATIC_BATCH_SIZE = 64
_DTYPES = ("float32", "float16", "bfloat16")


# ---- the parent side ---------------------------------------------------------------------------------------------

def run_baseline(name: str, model_dir: str, workload_path: str, dtype: str, device: str, seed: int = 0,
                 iters: int = 1, warmup_iters: int = 0, batch_size: int = DEFAULT_STATIC_BATCH_SIZE) -> dict[str, Any]:
    """Run baseline ``name`` in a fresh Python process on the same device; return its result record."""
    if name not in BASELINES:
        raise ValueError(f"Unknown baseline {name!r}; choose from {', '.join(BASELINES)}")
    with tempfile.TemporaryDirectory(prefix="pagedllm-bench-") as tmp:
        out = Path(tmp) / "result.json"
        command = [
            sys.executable, "-m", "pagedllm.bench.hf_baseline", "--baseline", name, "--model", model_dir,
            "--workload-json", workload_path, "--dtype", dtype, "--device", device, "--seed", str(seed),
            "--iters", str(iters), "--warmup-iters", str(warmup_iters), "--batch-size", str(batch_size),
            "--result-json", str(out),
        ]
        print(f"[bench] running baseline {name} in a subprocess", flush=True)
        done = subprocess.run(command, check=False)
        if done.returncode != 0 or not out.is_file():
            raise RuntimeError(f"Baseline {name} failed (exit code {done.returncode}); its output is above")
        result = json.loads(out.read_text())
        print(f"[bench] {name}: {result['output_tokens']} output tokens in {result['elapsed_s']:.2f} s = "
              f"{result['output_tokens_per_s']:,.1f} output tok/s", flush=True)
        return result


# ---- the child side ----------------------------------------------------------------------------------------------

def load_hf_model(model_dir: str, dtype: str, device: str, seed: int):
    """The architecture of ``model_dir/config.json`` with random weights, built directly on ``device``."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.generation_config.eos_token_id = None  # never stop early: rows run to max_new_tokens
    model.generation_config.pad_token_id = 0
    return model.eval().requires_grad_(False)


def generation_config(temperature: float, max_new_tokens: int, eos_token_id: int | None):
    """Plain temperature sampling (no top-k/top-p), or greedy at temperature 0, as the engine runs the workload."""
    import transformers

    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {
        "do_sample": False}
    return transformers.GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=0,
                                         **sampling)


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def run_static_pass(model, workload, batch_size: int, device: str) -> tuple[int, int]:
    """One pass of static batching over the workload; returns (tokens credited: the requested ones that were
    generated, tokens computed: every row of every batch to the batch's longest request)."""
    import torch

    credited = computed = 0
    for batch in _batches(workload.requests, batch_size):
        width = max(len(r.prompt_token_ids) for r in batch)
        input_ids = torch.zeros((len(batch), width), dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, request in enumerate(batch):  # left padding: the prompt ends at the last column
            length = len(request.prompt_token_ids)
            input_ids[row, width - length:] = torch.tensor(request.prompt_token_ids)
            attention_mask[row, width - length:] = 1
        max_new_tokens = max(r.max_tokens for r in batch)
        output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                generation_config=generation_config(workload.temperature, max_new_tokens, None))
        num_new = output.shape[1] - width
        if num_new != max_new_tokens:
            print(f"[hf-static] warning: generate stopped after {num_new} of {max_new_tokens} tokens", flush=True)
        credited += sum(min(num_new, r.max_tokens) for r in batch)
        computed += num_new * len(batch)
    return credited, computed


def run_continuous_pass(manager, workload, pass_index: int) -> tuple[int, int]:
    """Submit every request to a running continuous-batching manager and wait for all; returns (tokens credited:
    generated up to each request's max_tokens, tokens generated)."""
    requested = {}
    for index, request in enumerate(workload.requests):
        request_id = f"p{pass_index}-r{index}"
        manager.add_request(input_ids=request.prompt_token_ids, request_id=request_id,
                            max_new_tokens=request.max_tokens, eos_token_id=-1)
        requested[request_id] = request.max_tokens
    credited = generated = 0
    pending = set(requested)
    while pending:
        result = manager.get_result(timeout=1)
        if result is None:
            if not manager.is_running():
                raise RuntimeError("The continuous batching manager stopped before finishing every request")
            continue
        if result.request_id not in pending or not result.is_finished():
            continue
        if getattr(result, "error", None):
            raise RuntimeError(f"Request {result.request_id} failed in HF continuous batching: {result.error}")
        pending.discard(result.request_id)
        num_tokens = len(result.generated_tokens)
        if num_tokens != requested[result.request_id]:
            print(f"[hf-continuous] warning: request {result.request_id} got {num_tokens} tokens, asked for "
                  f"{requested[result.request_id]}", flush=True)
        credited += min(num_tokens, requested[result.request_id])
        generated += num_tokens
    return credited, generated


def _continuous_manager(model, workload, max_new_tokens: int):
    """``continuous_batching_context_manager`` with the workload's sizes as hints where this transformers has them
    (5.x), so the cache is sized as ``generate_batch`` would size it."""
    import inspect

    kwargs: dict[str, Any] = {"generation_config": generation_config(workload.temperature, max_new_tokens, -1),
                              "block": True, "timeout": 30}
    if "workload_hints" in inspect.signature(model.continuous_batching_context_manager).parameters:
        from transformers.generation.continuous_batching.utils import WorkloadHints

        kwargs["workload_hints"] = WorkloadHints(
            max_prompt_length=max(len(r.prompt_token_ids) for r in workload.requests),
            max_generated_length=max_new_tokens,
            num_requests=len(workload.requests),
        )
    if str(model.device) == "cpu":
        kwargs["continuous_batching_config"] = _cpu_continuous_batching_config(workload, max_new_tokens)
    return model.continuous_batching_context_manager(**kwargs)


def _cpu_continuous_batching_config(workload, max_new_tokens: int):
    """On CPU, transformers sizes the paged cache from RAM and fills static tensors of that size (many seconds even
    for a tiny model): size it to the workload instead. On GPU the defaults stand, as a user would run them."""
    from transformers import ContinuousBatchingConfig

    page = 256  # the default page (block) size of both transformers 5.17 and 5.23
    pages = sum(-(-(len(r.prompt_token_ids) + r.max_tokens) // page) for r in workload.requests)
    longest = max(len(r.prompt_token_ids) for r in workload.requests)
    return ContinuousBatchingConfig(num_blocks=pages + 1, max_batch_tokens=max(256, min(longest, 2048)))


def _warmup_workload(workload):
    from dataclasses import replace

    from pagedllm.bench.workloads import BenchRequest

    first = workload.requests[0].prompt_token_ids[:16]
    return replace(workload, requests=[BenchRequest(first, 8), BenchRequest(first[:8], 8)])


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from pagedllm.bench.device import synchronize
    from pagedllm.bench.record import throughput_figures
    from pagedllm.bench.workloads import load_workload

    workload = load_workload(args.workload_json)
    start = time.perf_counter()
    model = load_hf_model(args.model, args.dtype, args.device, args.seed)
    load_s = time.perf_counter() - start
    torch.manual_seed(args.seed)
    times: list[float] = []
    credited = computed = 0
    attn_implementation = getattr(model.config, "_attn_implementation", None)
    with torch.no_grad():  # not inference_mode: transformers' CB thread updates its tensors in place
        if args.baseline == "hf-static":
            run_static_pass(model, _warmup_workload(workload), args.batch_size, args.device)
            for index in range(args.warmup_iters + args.iters):
                synchronize(args.device)
                start = time.perf_counter()
                credited, computed = run_static_pass(model, workload, args.batch_size, args.device)
                synchronize(args.device)
                if index >= args.warmup_iters:
                    times.append(time.perf_counter() - start)
        else:
            max_new_tokens = max(r.max_tokens for r in workload.requests)
            with _continuous_manager(model, workload, max_new_tokens) as manager:
                run_continuous_pass(manager, _warmup_workload(workload), -1)
                attn_implementation = getattr(model.config, "_attn_implementation", None)  # CB's, while it runs
                for index in range(args.warmup_iters + args.iters):
                    start = time.perf_counter()
                    credited, computed = run_continuous_pass(manager, workload, index)
                    synchronize(args.device)
                    if index >= args.warmup_iters:
                        times.append(time.perf_counter() - start)
    elapsed = sum(times) / len(times)
    import transformers

    return {
        "engine": args.baseline,
        **throughput_figures(len(workload.requests), workload.num_prompt_tokens, credited, elapsed),
        "computed_output_tokens": computed,
        "iteration_s": times,
        "load_s": load_s,
        "transformers_version": transformers.__version__,
        "attn_implementation": attn_implementation,
        "dtype": args.dtype,
        "batch_size": args.batch_size if args.baseline == "hf-static" else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pagedllm.bench.hf_baseline",
                                     description="Run one HF transformers baseline over a saved workload.")
    parser.add_argument("--baseline", choices=BASELINES, required=True, help="which baseline to run")
    parser.add_argument("--model", required=True, help="model directory holding config.json")
    parser.add_argument("--workload-json", required=True, help="workload file written by the bench command")
    parser.add_argument("--dtype", choices=_DTYPES, required=True, help="weight and activation dtype")
    parser.add_argument("--device", required=True, help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and of sampling")
    parser.add_argument("--iters", type=int, default=1, help="timed passes over the workload")
    parser.add_argument("--warmup-iters", type=int, default=0, help="untimed passes before the timed ones")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_STATIC_BATCH_SIZE,
                        help="largest batch of hf-static")
    parser.add_argument("--result-json", required=True, help="where to write the result")
    args = parser.parse_args(argv)
    result = run(args)
    Path(args.result_json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
