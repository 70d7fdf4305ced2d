"""Incremental detokenization of one request's output tokens, and stop strings.

Text is produced a token at a time and adds up to what decoding the whole sequence gives (prompt text removed),
even when a character spans several tokens (byte-level BPE, SentencePiece byte fallback): text that ends in U+FFFD
(an incomplete UTF-8 sequence so far) is held back until a later token completes it, or until the request finishes.
One case cannot match without stalling streams: a run of byte-fallback tokens that is valid UTF-8 for a while and
then invalid, which decode() turns into U+FFFDs as a whole; there the text already streamed stays.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

try:  # tokenizers >= 0.21.1: the Rust incremental decoder vLLM v1 uses for fast tokenizers
    from tokenizers.decoders import DecodeStream
except ImportError:  # pragma: no cover - older tokenizers: the slow path handles every tokenizer
    DecodeStream = None

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from pagedllm.params import SamplingParams

_REPLACEMENT_CHAR = "\ufffd"
# DecodeStream's error when a decode does not start with the previous one (tokenizers mod.rs), which happens
# for the byte-fallback case above; see vllm-project/vllm#17448.
_INVALID_PREFIX_ERR = "Invalid prefix encountered"
# Priming context: the decoders see a few tokens before the first output token so that context-dependent
# decoding (SentencePiece's leading-space strip, bytes of a character split across the prompt's end) is right.
_MIN_CONTEXT_TOKENS = 4
_MAX_CONTEXT_TOKENS = 24


class _WindowDecoder:
    """Turns token ids into text one id at a time, holding back text that ends in an incomplete character.

    The window holds the ids of the last emitted chunk (decoding context) then the ids not emitted yet; the new
    text is decode(window) minus decode(context). This base class is the classic prefix_offset / read_offset
    algorithm (vLLM's slow path); subclasses provide `_decode` and may compute `_next_text` faster.
    """

    def __init__(self) -> None:
        self._window: list[int] = []
        self._read_offset = 0  # window[:read_offset] is the context, already emitted

    def _decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def _next_text(self, token_id: int) -> str | None:
        """Text that window[-1] (token_id) completes, or None while it is incomplete."""
        return self._text_after_context(is_final=False)

    def _text_after_context(self, is_final: bool) -> str | None:
        context_text = self._decode(self._window[: self._read_offset])
        text = self._decode(self._window)
        if not text.startswith(context_text):
            # Not prefix-stable: byte fallback turns a whole run of byte tokens into U+FFFDs when a later byte
            # makes it invalid UTF-8. What was streamed stays; continue from the unemitted ids alone.
            context_text, text = "", self._decode(self._window[self._read_offset :])
        if len(text) <= len(context_text) or (text.endswith(_REPLACEMENT_CHAR) and not is_final):
            return None
        return text[len(context_text) :]

    def step(self, token_id: int) -> str:
        """Feed the next id; return the text it completes ('' when held back)."""
        self._window.append(token_id)
        text = self._next_text(token_id)
        if text is None:
            return ""
        self._advance()
        return text

    def _advance(self) -> None:
        """Everything in the window was emitted: the unread part becomes the next context."""
        del self._window[: self._read_offset]
        self._read_offset = len(self._window)

    def prime(self, prompt_ids: list[int]) -> None:
        """Feed a short suffix of the prompt as context, discarding its text."""
        for token_id in prompt_ids[_context_start(prompt_ids, self._decode) :]:
            self.step(token_id)

    def flush(self) -> str:
        """Text of the held-back ids; an incomplete character at the end is U+FFFD, as in decode()."""
        if self._read_offset == len(self._window):
            return ""
        text = self._text_after_context(is_final=True)
        self._advance()
        return text or ""


def _context_start(ids: list[int], decode: Callable[[list[int]], str]) -> int:
    """Start of the shortest suffix (>= 4 tokens) that decodes to clean, non-empty text, else of the last 24.

    A suffix that starts inside a multi-byte character decodes to U+FFFD, and one that is only skipped special
    tokens decodes to '' (the first output token would then lose its SentencePiece leading space).
    """
    num_ids = len(ids)
    for length in range(min(_MIN_CONTEXT_TOKENS, num_ids), min(num_ids, _MAX_CONTEXT_TOKENS) + 1):
        text = decode(ids[num_ids - length :])
        if text and _REPLACEMENT_CHAR not in text:
            return num_ids - length
    return max(0, num_ids - _MAX_CONTEXT_TOKENS)


class _FastDecoder(_WindowDecoder):
    """Fast (Rust) tokenizers: tokenizers' DecodeStream, which keeps the same window on the Rust side."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, skip_special: bool, spaces_between_special: bool) -> None:
        super().__init__()
        self._rust = tokenizer._tokenizer
        self._skip_special = skip_special
        self._stream: DecodeStream | None = DecodeStream(skip_special_tokens=skip_special)
        # Decoders that join tokens with spaces (WordPiece...) put one between special tokens; vLLM's
        # spaces_between_special_tokens=False drops it by emitting a special token's raw text after another one.
        self._special_text: dict[int, str] = {}
        if not skip_special and not spaces_between_special:
            self._special_text = {i: t.content for i, t in self._rust.get_added_tokens_decoder().items()}
        self._last_was_special = False

    def _decode(self, ids: list[int]) -> str:
        return self._rust.decode(ids, skip_special_tokens=self._skip_special)

    def _next_text(self, token_id: int) -> str | None:
        text = self._stream_step(token_id) if self._stream is not None else super()._next_text(token_id)
        special_text = self._special_text.get(token_id)
        if special_text is not None and self._last_was_special:
            text = special_text
        self._last_was_special = special_text is not None
        return text

    def _stream_step(self, token_id: int) -> str | None:
        try:
            return self._stream.step(self._rust, token_id)
        except Exception as error:
            if not str(error).startswith(_INVALID_PREFIX_ERR):
                raise
        # The stream cannot go on (vllm-project/vllm#17448); the offsets algorithm over the same window can.
        self._stream = None
        return super()._next_text(token_id)


class _SlowDecoder(_WindowDecoder):
    """Any other tokenizer (python 'slow' ones): decodes the window with tokenizer.decode.

    For slow tokenizers decode is convert_ids_to_tokens + convert_tokens_to_string; going through decode keeps
    the tokenizer's own rules for which tokens are skipped and how special tokens are spaced.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, skip_special: bool, spaces_between_special: bool) -> None:
        super().__init__()
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._spaces_between_special = spaces_between_special

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        # No clean-up: it rewrites " ." etc. across the whole text, so windows would not add up (vLLM skips it too).
        return self._tokenizer.decode(
            ids,
            skip_special_tokens=self._skip_special,
            clean_up_tokenization_spaces=False,
            spaces_between_special_tokens=self._spaces_between_special,
        )


def _make_decoder(tokenizer: PreTrainedTokenizerBase, params: SamplingParams) -> _WindowDecoder:
    if DecodeStream is not None and getattr(tokenizer, "is_fast", False) and hasattr(tokenizer, "_tokenizer"):
        return _FastDecoder(tokenizer, params.skip_special_tokens, params.spaces_between_special_tokens)
    return _SlowDecoder(tokenizer, params.skip_special_tokens, params.spaces_between_special_tokens)


class IncrementalDetokenizer:
    """Detokenizes one request's output tokens incrementally and finds stop strings.

    output_text is the text the output tokens add after the prompt, i.e. decode(prompt + output) minus
    decode(prompt); it is cut at the first stop string. With tokenizer None or params.detokenize False it stays ''.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase | None, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        self.output_text = ""
        self.token_ids: list[int] = []
        self._stop = [s for s in params.stop or () if s]  # '' would match everywhere
        self._include_stop = params.include_stop_str_in_output
        # Characters that may be the start of a stop string are not streamed until it is known they are not.
        self._hold_back = max(map(len, self._stop)) - 1 if self._stop and not self._include_stop else 0
        self._num_returned_chars = 0
        self._is_text_final = False  # a stop string matched, or the text was flushed at the end
        self._decoder: _WindowDecoder | None = None
        if tokenizer is not None and params.detokenize:
            self._decoder = _make_decoder(tokenizer, params)
            self._decoder.prime(prompt_token_ids)

    def update(self, new_token_ids: list[int], stop_terminated: bool) -> str | None:
        """Append new tokens and extend output_text; return the stop string it now ends with, if any.

        stop_terminated: the last new token ended the request (eos / stop_token_ids); like vLLM, its text is only
        added with include_stop_str_in_output.
        """
        self.token_ids.extend(new_token_ids)
        if self._decoder is None or self._is_text_final:
            return None
        if stop_terminated and not self._include_stop:
            new_token_ids = new_token_ids[:-1]
        num_chars_before = len(self.output_text)
        for token_id in new_token_ids:
            self.output_text += self._decoder.step(token_id)
        return self._check_stop_strings(num_chars_before)

    def _check_stop_strings(self, num_chars_before: int) -> str | None:
        """Cut output_text at the earliest stop string that ends in the text added after num_chars_before."""
        best: tuple[int, str] | None = None
        for stop in self._stop:
            # Start early enough to see a stop string that began in earlier text and ends in the new text.
            index = self.output_text.find(stop, max(0, num_chars_before - len(stop) + 1))
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return None
        index, stop = best
        self.output_text = self.output_text[: index + len(stop) if self._include_stop else index]
        self._is_text_final = True
        return stop

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """Text to show now: all of it (delta=False) or only what was not returned before (delta=True).

        While not finished, the last len(longest stop) - 1 characters are held back (when stop strings are
        excluded from the output), so a partial stop string is never streamed and then taken back.
        """
        if finished:
            self._flush()
        end = len(self.output_text) - (0 if finished else self._hold_back)
        if not delta:
            return self.output_text[: max(end, 0)]
        if end <= self._num_returned_chars:
            return ""
        text = self.output_text[self._num_returned_chars : end]
        self._num_returned_chars = end
        return text

    def _flush(self) -> None:
        """At the end, add the text held back for an incomplete character (as U+FFFD, exactly as decode() would)."""
        if self._decoder is not None and not self._is_text_final:
            self.output_text += self._decoder.flush()
        self._is_text_final = True
