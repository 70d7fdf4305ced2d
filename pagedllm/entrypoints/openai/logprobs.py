"""Engine logprobs (one ``{token id: Logprob}`` per position) in OpenAI's two formats: the legacy completions one
(parallel lists) and the chat one (a list of token entries with their top alternatives).

With ``as_token_ids`` (vLLM's ``return_tokens_as_token_ids``) every token is written ``"token_id:{id}"``, so that a
client can tell apart tokens whose text is not valid UTF-8 on its own or that share a text."""

from __future__ import annotations

from collections.abc import Sequence

from pagedllm.entrypoints.openai.protocol import (
    ChatCompletionLogProb,
    ChatCompletionLogProbs,
    ChatCompletionLogProbsContent,
    CompletionLogProbs,
)
from pagedllm.params import Logprob

# JSON has no -inf: clamp as vLLM does.
_MIN_LOGPROB = -9999.0

Entry = dict[int, Logprob] | None


def _value(logprob: Logprob) -> float:
    return max(logprob.logprob, _MIN_LOGPROB)


def _token_text(tokenizer, token_id: int, logprob: Logprob | None) -> str:
    if logprob is not None and logprob.decoded_token is not None:
        return logprob.decoded_token
    return tokenizer.decode([token_id])


def _token_name(tokenizer, token_id: int, logprob: Logprob | None, as_token_ids: bool) -> str:
    """How a token is written in logprobs: its text, or ``token_id:{id}``."""
    return f"token_id:{token_id}" if as_token_ids else _token_text(tokenizer, token_id, logprob)


def _top(entry: dict[int, Logprob], num_top: int) -> list[tuple[int, Logprob]]:
    """The ``num_top`` most likely alternatives, best first (the entry may also hold the chosen token)."""
    ranked = sorted(entry.items(), key=lambda item: item[1].rank if item[1].rank is not None else 1 << 30)
    return [(token_id, lp) for token_id, lp in ranked if lp.rank is not None and lp.rank <= num_top]


def completion_logprobs(
    token_ids: Sequence[int], entries: Sequence[Entry], num_top: int, tokenizer, initial_offset: int = 0,
    as_token_ids: bool = False,
) -> CompletionLogProbs:
    """``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``; ``top_logprobs`` maps token text to logprob
    for the top ``num_top`` plus the chosen token, as OpenAI returns it. An entry of None (the first prompt token,
    which nothing predicts) gives None values. ``text_offset`` counts characters of the text either way."""
    result = CompletionLogProbs()
    offset = initial_offset
    for token_id, entry in zip(token_ids, entries):
        chosen = entry.get(token_id) if entry is not None else None
        token = _token_name(tokenizer, token_id, chosen, as_token_ids)
        result.tokens.append(token)
        result.text_offset.append(offset)
        offset += len(_token_text(tokenizer, token_id, chosen)) if as_token_ids else len(token)
        if entry is None:
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
            continue
        result.token_logprobs.append(_value(chosen) if chosen is not None else None)
        top: dict[str, float] = {}
        for tid, lp in _top(entry, num_top):  # best first: where two tokens share a text, the likelier one stays
            top.setdefault(_token_name(tokenizer, tid, lp, as_token_ids), _value(lp))
        if chosen is not None:
            top.setdefault(token, _value(chosen))
        result.top_logprobs.append(top)
    return result


def chat_logprobs(
    token_ids: Sequence[int], entries: Sequence[Entry], num_top: int, tokenizer, as_token_ids: bool = False
) -> ChatCompletionLogProbs:
    """``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}`` with exactly the top ``num_top``."""
    content = []
    for token_id, entry in zip(token_ids, entries):
        entry = entry or {}
        chosen = entry.get(token_id)
        token = _token_name(tokenizer, token_id, chosen, as_token_ids)
        content.append(ChatCompletionLogProbsContent(
            token=token,
            logprob=_value(chosen) if chosen is not None else _MIN_LOGPROB,
            bytes=list(token.encode("utf-8", errors="replace")),
            top_logprobs=[_chat_entry(tokenizer, tid, lp, as_token_ids) for tid, lp in _top(entry, num_top)],
        ))
    return ChatCompletionLogProbs(content=content)


def _chat_entry(tokenizer, token_id: int, logprob: Logprob, as_token_ids: bool) -> ChatCompletionLogProb:
    token = _token_name(tokenizer, token_id, logprob, as_token_ids)
    return ChatCompletionLogProb(token=token, logprob=_value(logprob), bytes=list(token.encode("utf-8", errors="replace")))


def prompt_logprobs_json(entries: Sequence[Entry] | None) -> list[dict[int, dict[str, object]] | None] | None:
    """vLLM's ``prompt_logprobs`` field: per prompt token, ``{token id: {"logprob", "rank", "decoded_token"}}``."""
    if entries is None:
        return None
    return [
        None if entry is None else {
            token_id: {"logprob": _value(lp), "rank": lp.rank, "decoded_token": lp.decoded_token}
            for token_id, lp in entry.items()
        }
        for entry in entries
    ]
