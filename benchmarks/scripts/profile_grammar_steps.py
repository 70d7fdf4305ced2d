"""Where the host time of a structured-output run goes: runs ``pagedllm bench throughput`` (arguments passed through)
with timers around the grammar side of sampling and the step, and prints their totals for the whole process.
For comparison with the default:

- ``--mask-every-draw`` turns off checking draws after the fact (every row under a grammar masked before its draw);
- ``--check-every-grammar`` checks draws after the fact for every grammar, as for those with slow masks;
- ``--by-allowed-share`` makes the share of the vocabulary a row's mask allowed decide its next step's way even
  where its unmasked draw is known;
- ``--counted-repeats`` keeps xgrammar's counted repetitions (no chains of rules for bounded strings).

    python benchmarks/scripts/profile_grammar_steps.py --model qwen3-0.6b --tokenizer .assets/tokenizers/qwen3 \\
        --workload random --num-prompts 256 --input-len 256 --output-len 256 --structured-fraction 0.5
"""

from __future__ import annotations

import collections
import dataclasses
import sys

from host_timing import wrap_timed  # this folder is on sys.path when a script runs

from pagedllm.bench.cli import main
from pagedllm.core.scheduler import Scheduler
from pagedllm.structured_output import bounded_repeats
from pagedllm.structured_output.manager import StructuredOutputRequest
from pagedllm.worker import grammar_sampling
from pagedllm.worker.model_runner import ModelRunner

TOTALS: collections.Counter = collections.Counter()
CALLS: collections.Counter = collections.Counter()


def timed(owner: type, name: str, label: str) -> None:
    wrap_timed(owner, name, lambda seconds: _add(label, seconds))


def _add(label: str, seconds: float) -> None:
    TOTALS[label] += seconds
    CALLS[label] += 1


timed(ModelRunner, "execute_model", "runner.execute_model (whole step but scheduling)")
timed(Scheduler, "schedule", "scheduler.schedule")
timed(grammar_sampling.GrammarSampling, "prepare", "grammar: prepare (tokens accepted, masks filled before the draw)")
timed(grammar_sampling.GrammarSampling, "finish", "grammar: finish (commits, candidates offered, redraws)")
timed(grammar_sampling.GrammarSampling, "_fill_masks", "grammar: mask fills (inside the two above)")
timed(grammar_sampling.GrammarSampling, "_offer_candidates", "grammar: candidates offered (inside finish)")

arguments = sys.argv[1:]
if "--mask-every-draw" in arguments:
    arguments.remove("--mask-every-draw")
    grammar_sampling.GrammarSampling.__init__.__defaults__ = (False,)  # check_draws=False
if "--check-every-grammar" in arguments:
    arguments.remove("--check-every-grammar")
    StructuredOutputRequest.slow_masks = property(lambda self: self._matcher is not None)
if "--counted-repeats" in arguments:
    arguments.remove("--counted-repeats")
    bounded_repeats.MAX_CHAIN_RULES = 0
if "--by-allowed-share" in arguments:
    arguments.remove("--by-allowed-share")
    after_masked_draws = grammar_sampling.GrammarSampling._after_masked_draws
    grammar_sampling.GrammarSampling._after_masked_draws = lambda self, step, states, output: after_masked_draws(
        self, step, states, dataclasses.replace(output, unmasked_draws=None))
status = main(["throughput", *arguments])
for label, total in TOTALS.most_common():
    print(f"{label:60s} {total:8.3f} s over {CALLS[label]:6d} calls ({1e3 * total / CALLS[label]:.3f} ms each)")
sys.exit(status)
