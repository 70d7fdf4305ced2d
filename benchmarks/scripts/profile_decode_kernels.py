"""GPU time of a batch-1 decode graph replay, kernel by kernel, for a reference architecture.

    python benchmarks/scripts/profile_decode_kernels.py --model qwen3-0.6b --context 100

Brings one request of random ids to ``--context`` tokens through the engine, then replays its batch-1 decode graph:
CUDA-event time per replay, and a torch.profiler table of the kernels inside the replays (per replay: calls and
microseconds per kernel name; GEMM rows with the bytes of their weights, so achieved bandwidth can be read off).
Also times a batch-1 graph captured with a short context bound (``--short-bound``), which launches fewer decode
attention splits than the max_model_len-bound graph the engine captures.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from pagedllm import LLM, SamplingParams
from pagedllm.bench.models import resolve_model
from pagedllm.worker.cuda_graphs import StepGraphs, decode_metadata


def time_replays(replay, n: int = 200) -> float:
    for _ in range(10):
        replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(n):
        replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def kernel_table(replay, n: int = 20) -> list[tuple[str, float, float]]:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            replay()
        torch.cuda.synchronize()
    total_us, calls = defaultdict(float), defaultdict(int)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            total_us[event.name] += event.device_time if hasattr(event, "device_time") else event.cuda_time
            calls[event.name] += 1
    rows = [(name, calls[name] / n, total_us[name] / n) for name in total_us]
    return sorted(rows, key=lambda r: -r[2])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen3-0.6b")
    parser.add_argument("--context", type=int, default=100)
    parser.add_argument("--short-bound", type=int, default=256)
    parser.add_argument("--quantization", default=None, help="e.g. fp8 (online) or gptq (dummy packed weights)")
    args = parser.parse_args()
    llm = LLM(resolve_model(args.model), load_format="dummy", skip_tokenizer_init=True, max_num_seqs=4,
              quantization=args.quantization)
    engine = llm.llm_engine
    rng = random.Random(0)
    prompt = [rng.randint(0, 10000) for _ in range(32)]
    engine.add_request("0", {"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=4096,
                                                                          ignore_eos=True))
    for _ in range(args.context - 32 + 1):
        engine.step()
    runner = engine.engine_core.model_runner
    torch.cuda.synchronize()
    replay = lambda: runner.decode_graphs.replay(1)
    summary = {"model": args.model, "quantization": args.quantization, "context": args.context, "max_model_len": runner.config.scheduler_config.max_model_len}
    summary["replay_bs1_ms"] = time_replays(replay)
    rows = kernel_table(replay)
    summary["kernel_sum_bs1_ms"] = sum(r[2] for r in rows) / 1000
    summary["kernels_per_replay"] = sum(r[1] for r in rows)

    buffers = runner.buffers
    short = StepGraphs()

    def forward(size: int) -> torch.Tensor:
        metadata = decode_metadata(buffers.slot_mapping.device[:size], buffers.query_start_loc.device[: size + 1],
                                   buffers.seq_lens.device[:size], buffers.block_tables.device[:size],
                                   args.short_bound)
        return runner.model(buffers.input_ids.device[:size], buffers.positions.device[:size], runner.kv_caches,
                            metadata)

    with torch.inference_mode():
        short.capture([1], forward, runner.device)
    summary[f"replay_bs1_bound{args.short_bound}_ms"] = time_replays(lambda: short.replay(1))
    short_rows = kernel_table(lambda: short.replay(1))
    print(json.dumps(summary, indent=1))
    for title, table in (("max_model_len-bound graph", rows), (f"bound {args.short_bound}", short_rows)):
        print(f"==== {title}: calls/replay, us/replay, us/call, name")
        for name, n_calls, us in table[:24]:
            print(f"{n_calls:6.1f} {us:9.1f} {us / n_calls:8.2f}  {name[:110]}")
    hidden = runner.model_config.hidden_size
    layer = runner.model.model.layers[0]
    mlp = getattr(layer, "mlp", None)
    projections = [("qkv", layer.self_attn.qkv_proj), ("o", layer.self_attn.o_proj)]
    if hasattr(mlp, "gate_up_proj"):  # a dense MLP (an MoE block's experts are one stacked weight: see moe_microbench)
        projections += [("gate_up", mlp.gate_up_proj), ("down", mlp.down_proj)]
    if hasattr(mlp, "gate"):
        projections.append(("router", mlp.gate))
    for name, module in projections:
        w = module.weight
        print(f"weight {name}: {tuple(w.shape)} {w.numel() * w.element_size() / 1e6:.1f} MB (hidden {hidden})")


if __name__ == "__main__":
    main()
