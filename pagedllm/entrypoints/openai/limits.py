"""Work limits of the server: every per-request cost a client controls has a bound, set by a ``serve`` flag.

Over a limit the request is a 400 naming the field (or a 413 for the body size); nothing runs.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class RequestLimits:
    """The bounds a request is checked against before any work starts (defaults close to vLLM's and OpenAI's)."""

    max_request_body_bytes: int = 4 * 1024 * 1024  # checked before the body is parsed or tokenized
    max_n: int = 16  # n, best_of and beam width: sequences one request may run
    max_prompts_per_request: int = 64  # prompts in one completions request (a list of strings or of id lists)
    max_logprobs: int = 20  # logprobs / top_logprobs / prompt_logprobs (vLLM's max_logprobs)
    max_stop_sequences: int = 16  # stop strings (OpenAI allows 4) and, separately, stop_token_ids
    max_stop_sequence_chars: int = 1024  # length of one stop string
    max_logit_bias_entries: int = 1024  # entries of logit_bias
    max_tools: int = 128  # tools of one chat request (OpenAI's limit)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RequestLimits:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None})


_HELP = {
    "max_request_body_bytes": "largest request body in bytes; a larger one is a 413 before it is parsed",
    "max_n": "largest n / best_of / beam width of one request",
    "max_prompts_per_request": "most prompts in one /v1/completions request",
    "max_logprobs": "largest logprobs, top_logprobs and prompt_logprobs",
    "max_stop_sequences": "most stop strings, and most stop_token_ids, of one request",
    "max_stop_sequence_chars": "longest stop string, in characters",
    "max_logit_bias_entries": "most logit_bias entries of one request",
    "max_tools": "most tools of one chat request",
}


def add_limit_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("request limits (over a limit: a 400 naming the field)")
    defaults = RequestLimits()
    for f in fields(RequestLimits):
        default = getattr(defaults, f.name)
        group.add_argument("--" + f.name.replace("_", "-"), type=int, default=default, metavar="N",
                           help=f"{_HELP[f.name]} (default: {default})")
