"""Where multi-LoRA steps lose time against the base model (issue 17): decode kernels, prefill kernels, host work.

    python benchmarks/scripts/lora_profile.py --model qwen3-0.6b --num-loras 8 --output-json /tmp/lora_profile.json

Runs the nano workload's first ``--num-requests`` prompts (100-1024 random ids) with ``max_tokens`` capped at
``--max-tokens``, dummy weights, prefix caching off, on two engines, each in its own subprocess (a clean device):
``base`` (no LoRA) and ``loras`` (``--num-loras`` random rank-``--max-lora-rank`` adapters on all projections,
requests spread evenly, ``max_loras`` slots); ``--engines base,loras,loras-serial`` adds the LoRA engine with the
shrink serial after the base GEMM in the CUDA graphs (``PAGEDLLM_LORA_OVERLAP_SHRINK=0``). Each engine runs the batch
twice:

1. timed: per kind of step (``prefill`` = the step holds a prefill chunk, ``decode`` = decode only) the number of
   steps and their mean batch (requests, tokens, distinct adapters), the device time of the forward (CUDA events
   around it: includes any gap where the device waits for an eager step's launches), and the host time per step of
   each phase (``execute_model_async``: the runner's whole host time for a step, the ``runner.*`` and ``lora.*``
   phases inside it; shared phases outside the runner per step of any kind);
2. under torch.profiler, prefill steps and decode steps in two sessions: every kernel's total device time and count
   per step (LoRA kernels -- names holding shrink / expand / sgmv / lora -- summed apart).

Prints one JSON summary (and writes it to ``--output-json``); read ``gap`` first: per kind of step, LoRA minus
base in wall, device-forward, kernel, LoRA-kernel and host milliseconds per step, and the steps each took.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import defaultdict

from host_timing import wrap_timed  # this folder is on sys.path when a script runs

KINDS = ("prefill", "decode")
LORA_KERNEL = re.compile(r"shrink|expand|sgmv|lora", re.IGNORECASE)
TOP_KERNELS = 15
ENGINES = ("base", "loras", "loras-serial")
LAUNCH = "execute_model_async"  # the runner's host time of a step: the runner.* and lora.* phases are inside it


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen3-0.6b")
    parser.add_argument("--num-requests", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--num-loras", type=int, default=8)
    parser.add_argument("--max-loras", type=int, default=8)
    parser.add_argument("--max-lora-rank", type=int, default=16)
    parser.add_argument("--output-json", default=None)
    parser.add_argument("--engines", default="base,loras",
                        help="engines to compare, comma-separated: base, loras, loras-serial (the LoRA shrink after "
                             "the base GEMM in CUDA graphs, PAGEDLLM_LORA_OVERLAP_SHRINK=0); the gap is loras - base")
    parser.add_argument("--engine", choices=ENGINES, default=None,
                        help="(internal) profile this one engine and print its JSON")
    return parser.parse_args(argv)


# ---- in the subprocess: one engine ---------------------------------------------------------------------------


class StepTimes:
    """Per kind of step: steps, batch sizes, host seconds per runner phase, CUDA events around each forward."""

    def __init__(self) -> None:
        self.kind = "decode"
        self.steps = dict.fromkeys(KINDS, 0)
        self.batch = {kind: defaultdict(int) for kind in KINDS}
        self.host_s = {kind: defaultdict(float) for kind in KINDS}
        self.shared_host_s: dict[str, float] = defaultdict(float)  # phases outside the runner (any kind of step)
        self.events: dict[str, list] = {kind: [] for kind in KINDS}

    def wrap(self, owner, attribute: str, name: str, shared: bool = False) -> None:
        wrap_timed(owner, attribute, lambda seconds: self._add(name, seconds, shared))

    def _add(self, name: str, seconds: float, shared: bool) -> None:
        (self.shared_host_s if shared else self.host_s[self.kind])[name] += seconds

    def wrap_step(self, runner) -> None:
        """``execute_model_async``: sets the step's kind (and counts it) before its phases run."""
        original = runner.execute_model_async

        def step(scheduler_output):
            counts = scheduler_output.num_scheduled_tokens
            if counts:
                self.kind = "decode" if all(n == 1 for n in counts.values()) and not scheduler_output.new_reqs \
                    else "prefill"
                self._count(runner, counts)
            return original(scheduler_output)

        runner.execute_model_async = step
        self.wrap(runner, "execute_model_async", LAUNCH)

    def _count(self, runner, counts: dict[str, int]) -> None:
        self.steps[self.kind] += 1
        batch = self.batch[self.kind]
        batch["requests"] += len(counts)
        batch["tokens"] += sum(counts.values())
        adapters = {getattr(runner.requests[r].lora_request, "lora_int_id", None) for r in counts
                    if r in runner.requests}
        batch["adapters"] += len(adapters - {None})

    def wrap_forward(self, runner) -> None:
        """CUDA events around each forward (device time, read after the run); none on CPU (a smoke run)."""
        import torch

        original = runner._forward
        if runner.device.type != "cuda":
            return

        def forward(inputs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            hidden = original(inputs)
            end.record()
            self.events[self.kind].append((start, end))
            return hidden

        runner._forward = forward

    def summary(self, wall_s: float) -> dict:
        total_steps = sum(self.steps.values())
        out = {"wall_s": round(wall_s, 3), "wall_ms_per_step": round(1000 * wall_s / max(total_steps, 1), 4),
               "shared_host_ms_per_step": _per_step(self.shared_host_s, total_steps)}
        for kind in KINDS:
            steps = self.steps[kind]
            forward_ms = [start.elapsed_time(end) for start, end in self.events[kind]]
            out[kind] = {
                "steps": steps,
                "mean_batch": {name: round(value / max(steps, 1), 2) for name, value in self.batch[kind].items()},
                "forward_device_ms_per_step": round(sum(forward_ms) / max(steps, 1), 4) if forward_ms else None,
                "host_ms_per_step": _per_step(self.host_s[kind], steps),
            }
        return out


def _per_step(seconds: dict[str, float], steps: int) -> dict[str, float]:
    return {name: round(1000 * value / max(steps, 1), 4) for name, value in sorted(seconds.items())}


def build_engine(args: argparse.Namespace):
    from pagedllm import LLM
    from pagedllm.bench.models import resolve_model

    lora = args.engine != "base"
    lora_kwargs = {"enable_lora": True, "max_loras": args.max_loras, "max_lora_rank": args.max_lora_rank,
                   "max_cpu_loras": max(args.num_loras, args.max_loras)} if lora else {}
    return LLM(resolve_model(args.model), load_format="dummy", skip_tokenizer_init=True, max_model_len=2048,
               enable_prefix_caching=False, **lora_kwargs)


def requests_of(args: argparse.Namespace, llm) -> list[tuple[list[int], int, object]]:
    """(prompt ids, max_tokens, adapter or None) of the batch: the nano workload's first prompts, outputs capped."""
    from pagedllm.bench.lora import random_adapters, spread
    from pagedllm.bench.workloads import nano_workload

    workload = nano_workload().prefix(args.num_requests)
    adapters = []
    if args.engine != "base":
        adapters = random_adapters(llm.llm_engine.config.model_config, args.num_loras, args.max_lora_rank)
    loras = spread(adapters, len(workload.requests)) or [None] * len(workload.requests)
    return [(r.prompt_token_ids, min(r.max_tokens, args.max_tokens), lora) for r, lora in zip(workload.requests, loras)]


def add_batch(llm, batch, tag: str) -> None:
    from pagedllm import SamplingParams

    for index, (prompt, max_tokens, lora) in enumerate(batch):
        params = SamplingParams(temperature=0.6, max_tokens=max_tokens, ignore_eos=True)
        llm.llm_engine.add_request(f"{tag}-{index}", {"prompt_token_ids": prompt}, params, lora_request=lora)


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def prefilling(llm) -> bool:
    scheduler = llm.llm_engine.engine_core.scheduler
    return bool(scheduler.waiting) or any(r.num_computed_tokens < r.num_prompt_tokens for r in scheduler.running)


def timed_pass(llm, batch) -> dict:
    engine = llm.llm_engine
    core = engine.engine_core
    runner = core.model_runner
    times = StepTimes()
    times.wrap_step(runner)
    times.wrap_forward(runner)
    for attribute in ("_prepare_inputs", "_forward", "_sample"):
        times.wrap(runner, attribute, "runner." + attribute)
    if runner.lora is not None:
        for attribute in ("stage_step", "upload"):
            times.wrap(runner.lora, attribute, "lora." + attribute)
    times.wrap(core.scheduler, "schedule", "scheduler.schedule", shared=True)
    times.wrap(core.scheduler, "update_from_output", "scheduler.update_from_output", shared=True)
    times.wrap(core, "_finish_in_flight", "core._finish_in_flight (waits for the device)", shared=True)
    times.wrap(engine.output_processor, "process_outputs", "output_processor.process_outputs", shared=True)
    add_batch(llm, batch, "timed")
    synchronize()
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    synchronize()
    return times.summary(time.perf_counter() - start)


def profiled_pass(llm, batch) -> dict:
    """The batch again under torch.profiler: the steps until every prompt is computed, then the decode steps."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    engine = llm.llm_engine
    add_batch(llm, batch, "profiled")
    out = {}
    for kind, more in (("prefill", lambda: prefilling(llm)), ("decode", engine.has_unfinished_requests)):
        steps = 0
        with profile(activities=activities) as prof:
            while more():
                engine.step()
                steps += 1
            synchronize()
        out[kind] = kernel_table(prof, steps)
    return out


def kernel_table(prof, steps: int) -> dict:
    """Device time per step of every kernel (and copy), the LoRA kernels' sum, and the top ones with counts."""
    from torch.autograd import DeviceType

    total_us: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for event in prof.events():
        if event.device_type == DeviceType.CUDA:
            total_us[event.name] += event.device_time_total
            counts[event.name] += 1
    steps = max(steps, 1)
    top = sorted(total_us, key=total_us.get, reverse=True)[:TOP_KERNELS]
    return {
        "steps": steps,
        "kernel_ms_per_step": round(sum(total_us.values()) / 1000 / steps, 4),
        "lora_kernel_ms_per_step": round(sum(t for n, t in total_us.items() if LORA_KERNEL.search(n)) / 1000 / steps, 4),
        "launches_per_step": round(sum(counts.values()) / steps, 1),
        "top": [{"kernel": name[:90], "ms_per_step": round(total_us[name] / 1000 / steps, 4),
                 "count_per_step": round(counts[name] / steps, 2)} for name in top],
    }


def profile_engine(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    llm = build_engine(args)
    batch = requests_of(args, llm)
    build_s = time.perf_counter() - start
    add_batch(llm, batch[: args.max_loras], "warmup")  # every adapter of the first steps in a slot, kernels loaded
    while llm.llm_engine.has_unfinished_requests():
        llm.llm_engine.step()
    result = {"engine": args.engine, "startup_s": round(build_s, 2), "timed": timed_pass(llm, batch),
              "kernels": profiled_pass(llm, batch)}
    runner = llm.llm_engine.engine_core.model_runner
    if runner.lora is not None:
        result["slot_loads"] = runner.lora.num_slot_loads
    return result


# ---- in the parent: both engines and the gap -------------------------------------------------------------------


def run_engine(engine: str, argv: list[str]) -> dict:
    env = {**os.environ, "PAGEDLLM_LORA_OVERLAP_SHRINK": "0"} if engine == "loras-serial" else None
    completed = subprocess.run([sys.executable, __file__, *argv, "--engine", engine], check=False,
                               capture_output=True, text=True, env=env)
    if completed.returncode != 0:
        return {"engine": engine, "error": completed.stderr[-3000:]}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def gap(base: dict, loras: dict) -> dict:
    """Per kind of step: LoRA minus base, per step, and the steps each took."""
    out = {"wall_s": _delta(base["timed"]["wall_s"], loras["timed"]["wall_s"])}
    for kind in KINDS:
        b_timed, l_timed = base["timed"][kind], loras["timed"][kind]
        b_kernels, l_kernels = base["kernels"][kind], loras["kernels"][kind]
        out[kind] = {
            "steps": [b_timed["steps"], l_timed["steps"]],
            "mean_requests": [b_timed["mean_batch"].get("requests"), l_timed["mean_batch"].get("requests")],
            "forward_device_ms": _delta(b_timed["forward_device_ms_per_step"], l_timed["forward_device_ms_per_step"]),
            "kernel_ms": _delta(b_kernels["kernel_ms_per_step"], l_kernels["kernel_ms_per_step"]),
            "lora_kernel_ms": l_kernels["lora_kernel_ms_per_step"],
            "launches": _delta(b_kernels["launches_per_step"], l_kernels["launches_per_step"]),
            "host_launch_ms": _delta(b_timed["host_ms_per_step"].get(LAUNCH), l_timed["host_ms_per_step"].get(LAUNCH)),
        }
    return out


def _delta(base: float | None, lora: float | None) -> dict[str, float | None]:
    if base is None or lora is None:
        return {"base": base, "loras": lora, "delta": None}
    return {"base": round(base, 4), "loras": round(lora, 4), "delta": round(lora - base, 4)}


def main() -> None:
    args = parse_args()
    if args.engine is not None:
        print(json.dumps(profile_engine(args)))
        return
    results = {engine: run_engine(engine, sys.argv[1:]) for engine in args.engines.split(",")}
    summary = {"model": args.model, "num_requests": args.num_requests, "max_tokens": args.max_tokens,
               "num_loras": args.num_loras, "max_loras": args.max_loras, "rank": args.max_lora_rank, **results}
    if {"base", "loras"} <= set(results) and not any("error" in r for r in results.values()):
        summary["gap"] = gap(results["base"], results["loras"])
    text = json.dumps(summary, indent=1)
    print(text)
    if args.output_json:
        with open(args.output_json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
