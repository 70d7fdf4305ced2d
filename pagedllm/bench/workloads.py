"""Standard workloads, generated deterministically and saved/loaded as JSON so every engine gets identical requests.

- ``nano``: nano-vllm's ``bench.py`` exactly (256 prompts of 100-1024 random ids below 10,001, then 256 output
  lengths of 100-1024, ``random.seed(0)``; temperature 0.6, ignore_eos): 142,827 prompt and 133,966 output tokens.
- ``random``: N prompts of fixed input length and fixed output length, random ids, seeded.
- ``sharegpt-like``: input and output lengths drawn from fixed log-normal distributions (see ``SHAREGPT_LIKE``),
  seeded; a stand-in for the ShareGPT conversations of vLLM's serving benchmarks without the download.
- ``shared-prefix``: N prompts that all start with one fixed "system prompt" of ``prefix_len`` random ids, each
  followed by its own ``input_len`` random ids; fixed output length; seeded. What prefix caching is for.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

WORKLOAD_NAMES = ("nano", "random", "sharegpt-like", "shared-prefix")
DEFAULT_TOKEN_ID_BOUND = 10000  # random token ids are drawn from [0, bound], as in nano-vllm (capped by the vocab)

# Log-normal fits of ShareGPT request lengths: the means match the ShareGPT statistics of the vLLM paper (161 input,
# 338 output tokens on average); the spreads are fixed choices. Lengths are clipped to [min_len, max_len].
SHAREGPT_LIKE = {
    "input": {"mu": math.log(161.0) - 0.5 * 1.0**2, "sigma": 1.0, "min_len": 4, "max_len": 1024},
    "output": {"mu": math.log(338.0) - 0.5 * 0.9**2, "sigma": 0.9, "min_len": 4, "max_len": 1024},
}


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload: its prompt token ids and how many tokens to generate."""

    prompt_token_ids: list[int]
    max_tokens: int


@dataclass(frozen=True)
class Workload:
    """A named list of requests with shared sampling settings and the parameters that generated it."""

    name: str
    requests: list[BenchRequest]
    temperature: float
    ignore_eos: bool = True
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(r.prompt_token_ids) for r in self.requests)

    @property
    def num_output_tokens(self) -> int:
        return sum(r.max_tokens for r in self.requests)

    @property
    def max_seq_len(self) -> int:
        """Tokens of the longest request (prompt + output): the context the workload needs."""
        return max(len(r.prompt_token_ids) + r.max_tokens for r in self.requests)

    def prefix(self, limit: int | None) -> Workload:
        """The first ``limit`` requests (all of them for None), recorded in ``params["limit"]``."""
        if limit is None or limit >= len(self.requests):
            return self
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        return replace(self, requests=self.requests[:limit], params={**self.params, "limit": limit})

    def summary(self) -> dict[str, Any]:
        """What a record says about the workload (everything but the token ids)."""
        return {
            "name": self.name,
            "num_requests": len(self.requests),
            "prompt_tokens": self.num_prompt_tokens,
            "output_tokens": self.num_output_tokens,
            "temperature": self.temperature,
            "ignore_eos": self.ignore_eos,
            "params": dict(self.params),
        }


def nano_workload(num_prompts: int = 256, max_input_len: int = 1024, max_output_len: int = 1024,
                  seed: int = 0) -> Workload:
    """nano-vllm's bench.py: every prompt is drawn first, then every output length, from one ``random.seed``."""
    rng = random.Random(seed)
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(100, max_input_len))] for _ in range(num_prompts)]
    max_tokens = [rng.randint(100, max_output_len) for _ in range(num_prompts)]
    params = {"num_prompts": num_prompts, "max_input_len": max_input_len, "max_output_len": max_output_len,
              "seed": seed}
    return Workload("nano", [BenchRequest(p, m) for p, m in zip(prompts, max_tokens)], temperature=0.6,
                    ignore_eos=True, params=params)


def random_workload(num_prompts: int, input_len: int, output_len: int, seed: int = 0,
                    token_id_bound: int = DEFAULT_TOKEN_ID_BOUND, temperature: float = 0.6) -> Workload:
    """``num_prompts`` prompts of exactly ``input_len`` random ids in [0, token_id_bound], ``output_len`` each."""
    _check_positive(num_prompts=num_prompts, input_len=input_len, output_len=output_len)
    rng = random.Random(seed)
    requests = [
        BenchRequest([rng.randint(0, token_id_bound) for _ in range(input_len)], output_len) for _ in range(num_prompts)
    ]
    params = {"num_prompts": num_prompts, "input_len": input_len, "output_len": output_len, "seed": seed,
              "token_id_bound": token_id_bound}
    return Workload("random", requests, temperature=temperature, ignore_eos=True, params=params)


def sharegpt_like_workload(num_prompts: int, seed: int = 0, token_id_bound: int = DEFAULT_TOKEN_ID_BOUND,
                           temperature: float = 0.6) -> Workload:
    """Lengths from the fixed log-normal fits in ``SHAREGPT_LIKE``, random ids in [0, token_id_bound]."""
    _check_positive(num_prompts=num_prompts)
    rng = random.Random(seed)
    requests = []
    for _ in range(num_prompts):
        input_len = _lognormal_length(rng, SHAREGPT_LIKE["input"])
        output_len = _lognormal_length(rng, SHAREGPT_LIKE["output"])
        requests.append(BenchRequest([rng.randint(0, token_id_bound) for _ in range(input_len)], output_len))
    params = {"num_prompts": num_prompts, "seed": seed, "token_id_bound": token_id_bound, "fit": SHAREGPT_LIKE}
    return Workload("sharegpt-like", requests, temperature=temperature, ignore_eos=True, params=params)


def shared_prefix_workload(num_prompts: int, prefix_len: int, input_len: int, output_len: int, seed: int = 0,
                           token_id_bound: int = DEFAULT_TOKEN_ID_BOUND, temperature: float = 0.6) -> Workload:
    """``num_prompts`` prompts of one shared prefix of ``prefix_len`` random ids (drawn first) followed by a distinct
    suffix of ``input_len`` random ids each; ``output_len`` tokens each. Ids in [0, token_id_bound]."""
    _check_positive(num_prompts=num_prompts, prefix_len=prefix_len, input_len=input_len, output_len=output_len)
    rng = random.Random(seed)
    prefix = [rng.randint(0, token_id_bound) for _ in range(prefix_len)]
    requests = [
        BenchRequest(prefix + [rng.randint(0, token_id_bound) for _ in range(input_len)], output_len)
        for _ in range(num_prompts)
    ]
    params = {"num_prompts": num_prompts, "prefix_len": prefix_len, "input_len": input_len, "output_len": output_len,
              "seed": seed, "token_id_bound": token_id_bound}
    return Workload("shared-prefix", requests, temperature=temperature, ignore_eos=True, params=params)


def _lognormal_length(rng: random.Random, fit: dict[str, float]) -> int:
    length = round(rng.lognormvariate(fit["mu"], fit["sigma"]))
    return int(min(max(length, fit["min_len"]), fit["max_len"]))


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")


def make_workload(name: str, num_prompts: int | None = None, input_len: int = 512, output_len: int = 128,
                  seed: int = 0, token_id_bound: int = DEFAULT_TOKEN_ID_BOUND, prefix_len: int = 256) -> Workload:
    """Build a named workload; ``num_prompts`` None means 200 (nano is fixed: 256 prompts, seed 0). ``prefix_len``
    is the shared prefix of ``shared-prefix`` (whose prompts have ``prefix_len + input_len`` tokens)."""
    if name == "nano":  # fixed by definition: take a prefix with Workload.prefix (--limit) to run less of it
        if num_prompts is not None:
            raise ValueError("The nano workload has a fixed size (256 prompts); use --limit N to run its first N")
        return nano_workload()
    if name == "random":
        return random_workload(num_prompts or 200, input_len, output_len, seed, token_id_bound)
    if name == "sharegpt-like":
        return sharegpt_like_workload(num_prompts or 200, seed, token_id_bound)
    if name == "shared-prefix":
        return shared_prefix_workload(num_prompts or 200, prefix_len, input_len, output_len, seed, token_id_bound)
    raise ValueError(f"Unknown workload {name!r}; choose one of {', '.join(WORKLOAD_NAMES)}")


def save_workload(workload: Workload, path: str | Path) -> None:
    Path(path).write_text(json.dumps(asdict(workload)))


def load_workload(path: str | Path) -> Workload:
    data = json.loads(Path(path).read_text())
    try:
        requests = [BenchRequest(list(r["prompt_token_ids"]), int(r["max_tokens"])) for r in data["requests"]]
        return Workload(data["name"], requests, float(data["temperature"]), bool(data.get("ignore_eos", True)),
                        dict(data.get("params", {})))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a workload file (missing or bad field: {exc})") from exc


def max_token_id(workload: Workload) -> int:
    return max((max(r.prompt_token_ids) for r in workload.requests if r.prompt_token_ids), default=0)
