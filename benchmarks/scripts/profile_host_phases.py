"""Where a batch-1 step's wall time goes: host time per phase of the engine loop, and the GPU time beside it.

    python benchmarks/scripts/profile_host_phases.py --model qwen3-0.6b --input-len 32 --output-len 128

Runs ``bench latency``'s workload (one request of random ids, temperature 1.0) through ``LLM.generate`` with
every phase of a step wrapped in a host timer (inclusive times: a phase's inner phases are part of it), once for
the whole generation and once with ``max_tokens=1`` (the prefill step). Then times the GPU alone: a decode graph
replay, and the LM head + sampler, with CUDA events. Prints one JSON summary (ms per step per phase) and a
torch.profiler table of a few decode steps and of the prefill step.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict

import torch
from host_timing import wrap_timed  # this folder is on sys.path when a script runs
from torch.profiler import ProfilerActivity, profile

from pagedllm import LLM, SamplingParams
from pagedllm.bench.models import resolve_model
from pagedllm.worker import sampler as sampler_module


class PhaseTimers:
    """Inclusive host time per named phase, summed over the calls made while ``active``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, owner, attribute: str, name: str) -> None:
        wrap_timed(owner, attribute, lambda seconds: self._add(name, seconds))

    def _add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds
        self.calls[name] += 1

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def per_step_ms(self, num_steps: int) -> dict[str, float]:
        return {name: round(1000 * s / num_steps, 4) for name, s in self.seconds.items()}


def instrument(llm: LLM, timers: PhaseTimers) -> None:
    engine = llm.llm_engine
    core = engine.engine_core
    runner = core.model_runner
    timers.wrap(engine, "step", "llm_engine.step")
    timers.wrap(core, "step", "engine_core.step")
    timers.wrap(core.scheduler, "schedule", "schedule")
    timers.wrap(core.scheduler, "update_from_output", "update_from_output")
    timers.wrap(engine.output_processor, "process_outputs", "process_outputs")
    timers.wrap(engine.metrics, "record_step", "metrics.record_step")
    timers.wrap(runner, "execute_model", "execute_model")
    for attribute in ("_update_states", "_copy_blocks", "_prepare_inputs", "_forward", "_sample", "_upload",
                      "_upload_padded", "_prompt_logprobs", "_prepare_grammars"):
        if hasattr(runner, attribute):
            timers.wrap(runner, attribute, "runner." + attribute)
    timers.wrap(runner.decode_graphs, "replay", "graph.replay")
    timers.wrap(runner.model, "compute_logits", "compute_logits")
    timers.wrap(runner, "sampler", "sampler")
    timers.wrap(sampler_module.SamplingMetadata, "build", "SamplingMetadata.build")


def run(llm: LLM, prompt: list[int], max_tokens: int) -> float:
    params = SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def gpu_ms(fn, iters: int = 200) -> float:
    """Median device time of ``fn`` (no host sync inside), by CUDA events."""
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def phase_profile(llm: LLM, timers: PhaseTimers, prompt: list[int], max_tokens: int, iters: int) -> dict:
    timers.reset()
    wall = sum(run(llm, prompt, max_tokens) for _ in range(iters))
    num_steps = timers.calls["llm_engine.step"]
    return {"wall_ms_per_generate": round(1000 * wall / iters, 3), "steps": num_steps,
            "wall_ms_per_step": round(1000 * wall / num_steps, 4),
            "host_ms_per_step": timers.per_step_ms(num_steps)}


@torch.inference_mode()
def device_times(llm: LLM) -> dict:
    runner = llm.llm_engine.engine_core.model_runner
    out = {}
    if runner.use_cuda_graphs:
        out["decode_graph_replay_bs1_gpu_ms"] = gpu_ms(lambda: runner.decode_graphs.replay(1))
        hidden = runner.decode_graphs.replay(1)[0][:1]  # (hidden, logits)
        out["lm_head_bs1_gpu_ms"] = gpu_ms(lambda: runner.model.compute_logits(hidden))
        logits = runner.model.compute_logits(hidden)
        row = sampler_module.SamplingRow(SamplingParams(temperature=1.0), [1, 2, 3], [], 7)
        metadata = sampler_module.SamplingMetadata.build([row], logits.shape[1], runner.device, ())
        out["sampler_bs1_gpu_ms"] = gpu_ms(lambda: runner.sampler(logits, metadata))
        greedy = sampler_module.SamplingMetadata.build(
            [sampler_module.SamplingRow(SamplingParams(temperature=0.0), [1], [], 7)], logits.shape[1], runner.device, ())
        out["sampler_greedy_bs1_gpu_ms"] = gpu_ms(lambda: runner.sampler(logits, greedy))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen3-0.6b")
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()

    llm = LLM(resolve_model(args.model), load_format="dummy", skip_tokenizer_init=True)
    rng = random.Random(0)
    prompt = [rng.randint(0, 10000) for _ in range(args.input_len)]
    for _ in range(3):
        run(llm, prompt, args.output_len)
    timers = PhaseTimers()
    instrument(llm, timers)
    summary = {"model": args.model, "device": torch.cuda.get_device_name(),
               "cuda_graphs": llm.llm_engine.engine_core.model_runner.use_cuda_graphs}
    summary["generate"] = phase_profile(llm, timers, prompt, args.output_len, args.iters)
    summary["prefill_only"] = phase_profile(llm, timers, prompt, 1, args.iters)
    gen, pre = summary["generate"], summary["prefill_only"]
    summary["decode_step_ms_latency_style"] = round(
        (gen["wall_ms_per_generate"] - pre["wall_ms_per_generate"]) / (args.output_len - 1), 4)
    summary.update(device_times(llm))

    for label, max_tokens in (("decode steps (whole generate of 16 tokens)", 16), ("prefill only", 1)):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run(llm, prompt, max_tokens)
        print(f"==== {label}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
