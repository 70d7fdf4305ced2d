"""Pipeline parallelism with one step in flight per stage against one step at a time (issue 18 item 2), on 2 GPUs.

One pp=2 engine runs the same batch twice: as built (2 steps in flight, the running requests split into one group per
stage) and as the loop was before (``one_step_at_a_time``: the whole batch in each step, the host waiting for the
last stage before it schedules again, so each stage idles half the time). A tp=1 engine on one GPU runs it too, for
scale; both eager (no CUDA graphs under pp). Writes ``$OUT/pp_in_flight.json`` and prints one line per run:

    python benchmarks/scripts/pp_in_flight.py --model llama-3.1-8b

Read ``speedup_in_flight`` (output tokens/s of pp2 in flight over pp2 one step at a time) and each run's
``steps_unanswered_mean`` (2 when the pipeline stays full). On CPU (smoke run):
``--device cpu --model <tiny model dir> --load-format auto --num-requests 8 --input-len 16 --output-len 8``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

from pagedllm import LLM, SamplingParams
from pagedllm.bench.models import resolve_model


class LaunchCounter:
    """Steps launched, and how many were unanswered right after each launch (the mp executor's queue)."""

    def __init__(self, executor) -> None:
        self.unanswered: list[int] = []
        launch = executor.execute_model_async

        def counting_launch(scheduler_output):
            step = launch(scheduler_output)
            self.unanswered.append(len(getattr(executor, "_unanswered", [step])))
            return step

        executor.execute_model_async = counting_launch

    def summary(self) -> dict:
        count = len(self.unanswered)
        return {"steps": count, "steps_unanswered_mean": round(sum(self.unanswered) / max(count, 1), 3),
                "steps_unanswered_max": max(self.unanswered, default=0)}


def one_step_at_a_time(llm: LLM) -> None:
    """Make a pp engine run as before this change: one step in flight, the whole running batch in it. The earlier
    stages still learn the sampled ids from the SchedulerOutput (the old loop broadcast them: about the same cost)."""
    core = llm.llm_engine.engine_core
    core.max_steps_in_flight = 1
    scheduler = core.scheduler
    scheduler.num_stages = 1  # no split into groups (nothing is in flight when it schedules)
    schedule = scheduler.schedule

    def schedule_carrying_tokens():
        output = schedule()
        scheduler._carry_sampled_tokens(output)
        return output

    scheduler.schedule = schedule_carrying_tokens


def timed_batch(llm: LLM, args, label: str) -> dict:
    rng = random.Random(0)
    vocab = llm.llm_engine.config.model_config.vocab_size
    prompts = [{"prompt_token_ids": [rng.randrange(vocab) for _ in range(args.input_len)]}
               for _ in range(args.num_requests)]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up
    counter = LaunchCounter(llm.llm_engine.engine_core.executor)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    num_output = sum(len(o.outputs[0].token_ids) for o in outputs)
    record = {"run": label, "wall_s": round(wall, 3), "output_tokens_per_s": round(num_output / wall, 1),
              "total_tokens_per_s": round((num_output + args.num_requests * args.input_len) / wall, 1),
              **counter.summary()}
    print(json.dumps(record), flush=True)
    return record


def make_llm(args, **parallel) -> LLM:
    return LLM(resolve_model(args.model), device=args.device, load_format=args.load_format, skip_tokenizer_init=True,
               enforce_eager=True, max_model_len=args.input_len + args.output_len, max_num_seqs=args.num_requests,
               max_num_batched_tokens=args.max_num_batched_tokens, **parallel)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=4096)
    args = parser.parse_args()
    records = []
    llm = make_llm(args, pipeline_parallel_size=2)
    records.append(timed_batch(llm, args, "pp2-in-flight"))
    one_step_at_a_time(llm)
    records.append(timed_batch(llm, args, "pp2-one-step-at-a-time"))
    llm.llm_engine.engine_core.shutdown()
    del llm
    records.append(timed_batch(make_llm(args), args, "tp1"))
    result = {"model": args.model, "num_requests": args.num_requests, "input_len": args.input_len,
              "output_len": args.output_len, "runs": records,
              "speedup_in_flight": round(records[0]["output_tokens_per_s"] / records[1]["output_tokens_per_s"], 3)}
    print(json.dumps({"speedup_in_flight": result["speedup_in_flight"]}))
    out_dir = os.environ.get("OUT", "/tmp")
    with open(os.path.join(out_dir, "pp_in_flight.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
