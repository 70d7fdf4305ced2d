"""Where a step's time goes: host time per engine phase and the GPU kernels, for a reference architecture.

    python benchmarks/scripts/profile_steps.py --model qwen3-0.6b --num-seqs 256 --input-len 512 --steps 30

Runs ``--num-seqs`` requests of ``--input-len`` random ids to the point where all decode, then times
``--steps`` decode steps: wall time per step, host time in schedule / execute / update, and a torch.profiler
table of the GPU kernels of those steps. Prints a JSON summary (and the table) to stdout.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
from torch.profiler import ProfilerActivity, profile

from pagedllm import LLM, SamplingParams
from pagedllm.bench.models import resolve_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen3-0.6b")
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=False,
                        help="step with async scheduling (host phases are then not taken apart: they overlap)")
    args = parser.parse_args()

    llm = LLM(resolve_model(args.model), load_format="dummy", skip_tokenizer_init=True,
              max_num_seqs=max(args.num_seqs, 1), max_model_len=4096, enforce_eager=args.enforce_eager,
              async_scheduling=args.async_scheduling)
    engine = llm.llm_engine
    rng = random.Random(0)
    params = SamplingParams(temperature=args.temperature, max_tokens=100_000 // 100, ignore_eos=True)
    for i in range(args.num_seqs):
        prompt = [rng.randint(0, 10000) for _ in range(args.input_len)]
        engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
    core = engine.engine_core
    while core.scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in core.scheduler.running):
        engine.step()
    for _ in range(5):  # warm-up decode steps
        engine.step()

    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / args.steps

    # Host time per phase: the core's step, taken apart (execute_model includes the one device->host sync).
    scheduler, runner = core.scheduler, core.model_runner
    timings = {"schedule": 0.0, "execute_model": 0.0}
    for _ in range(0 if args.async_scheduling else args.steps):
        t0 = time.perf_counter()
        output = scheduler.schedule()
        t1 = time.perf_counter()
        result = runner.execute_model(output)
        t2 = time.perf_counter()
        core.scheduler.update_from_output(output, result)
        timings["schedule"] += t1 - t0
        timings["execute_model"] += t2 - t1
    summary = {
        "model": args.model, "num_seqs": args.num_seqs, "input_len": args.input_len,
        "cuda_graphs": runner.use_cuda_graphs, "attention_backend": engine.config.attention_backend,
        "step_ms": 1000 * wall, "tokens_per_s": args.num_seqs / wall,
        "async_scheduling": args.async_scheduling,
        "host_ms_per_step": None if args.async_scheduling else {k: 1000 * v / args.steps for k, v in timings.items()},
        "device": torch.cuda.get_device_name(),
    }
    num_profiled = 10
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(num_profiled):
            engine.step()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    print(averages.table(sort_by="cuda_time_total", row_limit=25))
    # The GPU's busy time per step (every kernel's own time, us -> ms): against step_ms, what the host leaves idle.
    kernel_us = sum(getattr(event, "self_device_time_total", 0) for event in averages)
    summary["gpu_kernel_ms_per_step"] = kernel_us / 1000 / num_profiled
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
