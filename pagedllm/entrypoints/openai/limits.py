"""Work limits of the server: every per-request cost a client controls has a bound, set by a ``serve`` flag.

Over a limit the request is a 400 naming the field (or a 413 for the body size); nothing runs. The checks here read
plain request attributes and raise ``LimitExceeded``, so that this module stays light (the CLI imports it for its
flags); the handlers turn it into the OpenAI error.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class RequestLimits:
    """The bounds a request is checked against before any work starts (defaults close to vLLM's and OpenAI's)."""

    max_request_body_bytes: int = 4 * 1024 * 1024  # checked before the body is parsed or tokenized
    max_n: int = 16  # n, best_of and beam width: sequences one request may run
    max_prompts_per_request: int = 64  # prompts in one completions request (a list of strings or of id lists)
    max_logprobs: int = 20  # logprobs / top_logprobs / prompt_logprobs (vLLM's max_logprobs)
    max_stop_sequences: int = 16  # stop strings (OpenAI allows 4)
    max_stop_sequence_chars: int = 1024  # length of one stop string
    max_stop_token_ids: int = 1024  # entries of stop_token_ids (the scheduler checks each output token against them)
    max_logit_bias_entries: int = 1024  # entries of logit_bias
    max_tools: int = 128  # tools of one chat request (OpenAI's limit)
    # n x prompts (beam width x prompts with use_beam_search): the sequences one request runs at once. Without it
    # the two limits above multiply (16 x 64 = 1,024 sequences from one request).
    max_sequences_per_request: int = 256
    # Responses kept in memory for /v1/responses' previous_response_id (the least recently used go first); each
    # holds a conversation that fit the context.
    max_stored_responses: int = 1000
    max_embedding_inputs: int = 2048  # inputs of one /v1/embeddings request (OpenAI's limit)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RequestLimits:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None})


_HELP = {
    "max_request_body_bytes": "largest request body in bytes; a larger one is a 413 before it is parsed",
    "max_n": "largest n / best_of / beam width of one request",
    "max_prompts_per_request": "most prompts in one /v1/completions request",
    "max_logprobs": "largest logprobs, top_logprobs and prompt_logprobs",
    "max_stop_sequences": "most stop strings of one request",
    "max_stop_sequence_chars": "longest stop string, in characters",
    "max_stop_token_ids": "most stop_token_ids of one request",
    "max_logit_bias_entries": "most logit_bias entries of one request",
    "max_tools": "most tools of one chat request",
    "max_sequences_per_request": "most sequences one request runs: n (or the beam width) times its prompts",
    "max_stored_responses": "most /v1/responses responses kept for previous_response_id; the least recently used "
                            "are dropped first (0: none are kept)",
    "max_embedding_inputs": "most inputs of one /v1/embeddings request",
}


def add_limit_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("request limits (over a limit: a 400 naming the field)")
    defaults = RequestLimits()
    for f in fields(RequestLimits):
        default = getattr(defaults, f.name)
        group.add_argument("--" + f.name.replace("_", "-"), type=int, default=default, metavar="N",
                           help=f"{_HELP[f.name]} (default: {default})")


# ---- checks ------------------------------------------------------------------------------------------------------


class LimitExceeded(ValueError):
    """A request over one of the limits: ``param`` names the field, the message the limit and its flag."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_at_most(param: str, what: str, value: int, limits: RequestLimits, limit_name: str) -> None:
    limit = getattr(limits, limit_name)
    if value > limit:
        raise LimitExceeded(param, f"{what} must be at most {limit} ({_flag(limit_name)}), got {value}")


def check_sampling_limits(request: Any, limits: RequestLimits, logprobs_param: str, num_logprobs: int | None) -> None:
    """The bounds every completions or chat request shares (``request``: its ``SamplingFields``); the endpoint's own
    logprobs field is ``logprobs_param`` with value ``num_logprobs`` (None: not asked for)."""
    width = "n (the beam width with use_beam_search)" if request.use_beam_search else "n"
    _check_at_most("n", width, request.n, limits, "max_n")
    best_of = getattr(request, "best_of", None)
    if best_of is not None:
        _check_at_most("best_of", "best_of", best_of, limits, "max_n")
    if num_logprobs is not None:
        _check_at_most(logprobs_param, logprobs_param, num_logprobs, limits, "max_logprobs")
    if request.prompt_logprobs is not None:
        _check_at_most("prompt_logprobs", "prompt_logprobs", request.prompt_logprobs, limits, "max_logprobs")
    _check_stop_strings(request.stop, limits)
    _check_at_most("stop_token_ids", "The number of stop_token_ids", len(request.stop_token_ids or ()), limits,
                   "max_stop_token_ids")
    _check_at_most("logit_bias", "The number of logit_bias entries", len(request.logit_bias or {}), limits,
                   "max_logit_bias_entries")


def _check_stop_strings(stop: str | Sequence[str] | None, limits: RequestLimits) -> None:
    strings = [stop] if isinstance(stop, str) else list(stop or ())
    _check_at_most("stop", "The number of stop strings", len(strings), limits, "max_stop_sequences")
    longest = max((len(string) for string in strings), default=0)
    _check_at_most("stop", "The length of a stop string", longest, limits, "max_stop_sequence_chars")


def check_prompt_limits(num_prompts: int, n: int, limits: RequestLimits) -> None:
    """The prompts of one completions request, and the sequences they run with ``n`` each."""
    _check_at_most("prompt", "The number of prompts", num_prompts, limits, "max_prompts_per_request")
    _check_at_most("n", f"n x prompts ({n} x {num_prompts})", n * num_prompts, limits, "max_sequences_per_request")


def check_embedding_inputs_limit(num_inputs: int, limits: RequestLimits) -> None:
    _check_at_most("input", "The number of inputs", num_inputs, limits, "max_embedding_inputs")


def check_tools_limit(tools: Sequence[Any] | None, limits: RequestLimits) -> None:
    _check_at_most("tools", "The number of tools", len(tools or ()), limits, "max_tools")
