"""Tests for pagedllm.engine.detokenizer: incremental detokenization and stop strings.

The central property: the deltas streamed one token at a time add up to the text the output adds to the prompt
when the whole sequence is decoded at once (see `expected_output_text`), for emoji, CJK, accents, byte-level BPE,
SentencePiece byte fallback and random ids, on the fast (DecodeStream) and the slow (offsets) path.
"""

from __future__ import annotations

import functools
import random
import re
import types

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizer, PreTrainedTokenizerFast

from pagedllm.engine import detokenizer
from pagedllm.engine.detokenizer import IncrementalDetokenizer
from tests.utils import ASSETS

REAL_TOKENIZERS = ["qwen3", "llama3-8b-instruct", "mistral-7b-instruct-v0.3", "llama2-sentencepiece"]
TEXTS = [
    "Hello, world! 👨‍👩‍👧 is one family emoji; 🇫🇷🇯🇵 are flags, 👍🏽 has a skin tone.",
    "日本語のテキスト、中文文本和한국어 텍스트。",
    "Café naïve résumé — “quotes”, ½ ∑ Ω, Ångström, e\u0301 (combining accent).",
    "mixed: абв αβγ עברית العربية हिन्दी 😀😃🙏 end",
    "line one\n\n  indented\ttab\r\nlast line\n",
    "  leading spaces, trailing spaces  ",
]
PROMPTS = ["", "Say:", "Q: 🙂", "中文"]


def make_params(**overrides: object) -> types.SimpleNamespace:
    """Stand-in for pagedllm.params.SamplingParams with the fields the detokenizer reads."""
    fields = {
        "skip_special_tokens": True,
        "spaces_between_special_tokens": True,
        "stop": [],
        "include_stop_str_in_output": False,
        "detokenize": True,
    }
    fields.update(overrides)
    return types.SimpleNamespace(**fields)


@functools.cache
def load_real_tokenizer(name: str) -> PreTrainedTokenizerFast:
    if not (ASSETS / "tokenizers").is_dir():
        pytest.skip(f"shared assets (real tokenizers) not found at {ASSETS}; set PAGEDLLM_ASSETS")
    return AutoTokenizer.from_pretrained(str(ASSETS / "tokenizers" / name))


@functools.cache
def tiny_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 / Qwen / Llama 3 style) trained here, so no files are needed."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(TEXTS * 20 + ["the quick brown fox jumps over the lazy dog. STOP!"] * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        bos_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )


class ByteTokenizer(PreTrainedTokenizer):
    """A python ('slow') tokenizer with one token per UTF-8 byte: every non-ASCII character spans tokens."""

    @property
    def vocab_size(self) -> int:
        return 256

    def get_vocab(self) -> dict[str, int]:
        return {self._convert_id_to_token(i): i for i in range(256)} | dict(self.added_tokens_encoder)

    def _tokenize(self, text: str) -> list[str]:
        return [self._convert_id_to_token(byte) for byte in text.encode()]

    def _convert_token_to_id(self, token: str) -> int:
        return int(token[3:5], 16)

    def _convert_id_to_token(self, index: int) -> str:
        return f"<0x{index:02X}>"

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        data = bytearray()
        for token in tokens:
            is_byte = len(token) == 6 and token.startswith("<0x")
            data += bytes([int(token[3:5], 16)]) if is_byte else token.encode()
        return data.decode("utf-8", errors="replace")


@functools.cache
def byte_tokenizer() -> ByteTokenizer:
    return ByteTokenizer(eos_token="<|end|>", additional_special_tokens=["<|sep|>"])


@pytest.fixture(params=["fast", "slow"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on the DecodeStream path and on the slow (offsets) path, which any tokenizer can use."""
    if request.param == "slow":
        monkeypatch.setattr(detokenizer, "DecodeStream", None)
    return request.param


def expected_output_text(tokenizer, prompt_ids: list[int], output_ids: list[int], skip: bool) -> str:
    """The text the output adds in context: decode(prompt + output) minus decode(prompt).

    Not decode(output): SentencePiece decoders (Metaspace / Strip) drop the leading space of the first token of a
    decode, so "▁world" after a prompt reads " world" in context but "world" alone; and a character whose bytes
    straddle the prompt's end only exists in context. Clean-up of tokenization spaces is off: it rewrites the
    whole text (" ." -> "."), which no streaming decoder can do; vLLM does not either, and transformers 5.2x
    ignores it for BPE anyway (llama3's config asks for it).
    """
    kwargs = {"skip_special_tokens": skip, "clean_up_tokenization_spaces": False}
    full_text = tokenizer.decode(prompt_ids + output_ids, **kwargs)
    prompt_text = tokenizer.decode(prompt_ids, **kwargs)
    assert full_text.startswith(prompt_text)
    return full_text[len(prompt_text) :]


def stream(tokenizer, prompt_ids: list[int], output_ids: list[int], params, chunk: int = 1) -> str:
    """Feed output_ids `chunk` at a time, collecting streamed deltas, then finish; return the concatenation."""
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, params)
    deltas = []
    for start in range(0, len(output_ids), chunk):
        detok.update(output_ids[start : start + chunk], stop_terminated=False)
        deltas.append(detok.get_next_output_text(finished=False, delta=True))
    deltas.append(detok.get_next_output_text(finished=True, delta=True))
    assert "".join(deltas) == detok.output_text == detok.get_next_output_text(finished=True, delta=False)
    assert detok.token_ids == output_ids
    return "".join(deltas)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


# --- the central property on real tokenizers --------------------------------------------------------------


@pytest.mark.parametrize("name", REAL_TOKENIZERS)
@pytest.mark.parametrize("skip", [True, False])
def test_stream_matches_decode_on_texts(name: str, skip: bool, path: str) -> None:
    tokenizer = load_real_tokenizer(name)
    params = make_params(skip_special_tokens=skip)
    for prompt in PROMPTS:
        prompt_ids = tokenizer.encode(prompt) if prompt else []  # with BOS where the tokenizer adds one
        for text in TEXTS:
            output_ids = encode(tokenizer, text) + [tokenizer.eos_token_id] + encode(tokenizer, " after eos")
            expected = expected_output_text(tokenizer, prompt_ids, output_ids, skip)
            assert stream(tokenizer, prompt_ids, output_ids, params) == expected, (prompt, text)


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def has_unstable_byte_run(tokenizer, ids: list[int], skip: bool) -> bool:
    """True when a run of byte-fallback tokens has a valid UTF-8 prefix but is invalid as a whole.

    The ByteFallback decoder turns an invalid run into one U+FFFD per byte, including the characters of its
    valid prefix, which were already streamed (decode is not prefix-stable there). Matching that exactly would
    mean holding back every byte run until a non-byte token, stalling the streaming of CJK text on Llama 2. The
    detokenizer keeps what it streamed and resynchronises (test_unstable_byte_run_resyncs).
    """
    rust = tokenizer._tokenizer
    skipped = {i for i, token in rust.get_added_tokens_decoder().items() if token.special} if skip else set()
    runs: list[bytearray] = [bytearray()]
    for token in (rust.id_to_token(i) for i in ids if i not in skipped):
        match = _BYTE_TOKEN.fullmatch(token)
        if match:
            runs[-1].append(int(match.group(1), 16))
        elif runs[-1]:
            runs.append(bytearray())
    return any(not is_utf8(run) and any(is_utf8(run[:k]) for k in range(1, len(run))) for run in runs)


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@functools.cache
def partial_byte_ids(name: str) -> list[int]:
    """Ids whose text alone is not valid UTF-8: byte-level pieces of characters, SentencePiece byte tokens."""
    rust = load_real_tokenizer(name)._tokenizer
    texts = rust.decode_batch([[i] for i in range(rust.get_vocab_size())])
    return [i for i, text in enumerate(texts) if "\ufffd" in text]


def random_output(rng: random.Random, vocab_size: int, special: list[int], partial: list[int]) -> list[int]:
    ids = []
    for _ in range(rng.randrange(1, 40)):
        kind = rng.random()
        pool = partial if kind < 0.45 else special if kind < 0.55 else None
        ids.append(rng.choice(pool) if pool else rng.randrange(vocab_size))
    return ids


@pytest.mark.parametrize("name", REAL_TOKENIZERS)
def test_stream_matches_decode_on_random_ids(name: str, path: str) -> None:
    tokenizer = load_real_tokenizer(name)
    partial = partial_byte_ids(name)
    assert len(partial) > 100
    special = sorted(tokenizer.added_tokens_decoder)
    vocab_size = len(tokenizer)  # computed once: it builds the vocabulary dict on some transformers versions
    rng = random.Random(1234)
    num_checked = 0
    for _ in range(250):
        skip = rng.random() < 0.5
        prompt_ids = tokenizer.encode(rng.choice(PROMPTS))
        output_ids = random_output(rng, vocab_size, special, partial)
        if has_unstable_byte_run(tokenizer, prompt_ids + output_ids, skip):
            continue
        expected = expected_output_text(tokenizer, prompt_ids, output_ids, skip)
        chunk = rng.choice([1, 1, 1, 3])  # several tokens per update, as with speculative decoding
        assert stream(tokenizer, prompt_ids, output_ids, make_params(skip_special_tokens=skip), chunk) == expected
        num_checked += 1
    assert num_checked > 150


def test_unstable_byte_run_resyncs(path: str) -> None:
    tokenizer = load_real_tokenizer("mistral-7b-instruct-v0.3")
    byte = tokenizer.convert_tokens_to_ids
    # C4 A1 is "ġ" (streamed as soon as it is complete); B4 then makes the run invalid UTF-8.
    output_ids = [byte("<0xC4>"), byte("<0xA1>"), byte("<0xB4>")] + encode(tokenizer, " ethical 🙂 text")
    text = stream(tokenizer, tokenizer.encode("Hi"), output_ids, make_params())
    assert text == "ġ\ufffd ethical 🙂 text"  # decode() says "\ufffd\ufffd\ufffd ethical 🙂 text"


@pytest.mark.parametrize("name", REAL_TOKENIZERS)
def test_character_split_between_prompt_and_output(name: str, path: str) -> None:
    tokenizer = load_real_tokenizer(name)
    ids = tokenizer.encode("Hi 🙂 there")
    for cut in range(1, len(ids)):
        prompt_text = tokenizer.decode(ids[:cut], skip_special_tokens=True)
        text = stream(tokenizer, ids[:cut], ids[cut:], make_params())
        if prompt_text.endswith("\ufffd"):  # the prompt ends inside the emoji: the output completes it
            assert text == "🙂 there"
        else:
            assert prompt_text + text == "Hi 🙂 there"


# --- tokenizers built here (always run) -------------------------------------------------------------------


@pytest.mark.parametrize("skip", [True, False])
def test_tiny_bpe_tokenizer(skip: bool, path: str) -> None:
    tokenizer = tiny_bpe_tokenizer()
    rng = random.Random(7)
    vocab_size = len(tokenizer)
    cases = [(tokenizer.encode(prompt), encode(tokenizer, text)) for prompt in PROMPTS for text in TEXTS]
    cases += [(encode(tokenizer, "Q:"), [rng.randrange(vocab_size) for _ in range(30)]) for _ in range(50)]
    for prompt_ids, output_ids in cases:
        expected = expected_output_text(tokenizer, prompt_ids, output_ids, skip)
        assert stream(tokenizer, prompt_ids, output_ids, make_params(skip_special_tokens=skip)) == expected


def test_slow_byte_tokenizer() -> None:
    tokenizer = byte_tokenizer()
    assert not tokenizer.is_fast
    detok = IncrementalDetokenizer(tokenizer, [], make_params())
    assert isinstance(detok._decoder, detokenizer._SlowDecoder)
    rng = random.Random(3)
    vocab_size = len(tokenizer)
    for skip in (True, False):
        for text in TEXTS:
            output_ids = encode(tokenizer, text) + [tokenizer.eos_token_id]
            assert stream(tokenizer, encode(tokenizer, "é:"), output_ids, make_params(skip_special_tokens=skip)) == (
                text + ("" if skip else "<|end|>")
            )
        for _ in range(50):  # random bytes: invalid sequences and a possibly incomplete last character
            output_ids = [rng.randrange(vocab_size) for _ in range(20)]
            expected = expected_output_text(tokenizer, [], output_ids, skip)
            assert stream(tokenizer, [], output_ids, make_params(skip_special_tokens=skip)) == expected


def test_incomplete_last_character_is_flushed_at_finish() -> None:
    tokenizer = byte_tokenizer()
    detok = IncrementalDetokenizer(tokenizer, [], make_params())
    detok.update(encode(tokenizer, "ok 🙂")[:-1], stop_terminated=False)  # the emoji lacks its last byte
    assert detok.get_next_output_text(finished=False, delta=True) == "ok "
    assert detok.get_next_output_text(finished=True, delta=True) == "\ufffd"  # as decode() shows it


def test_special_tokens_skipped_or_kept(path: str) -> None:
    tokenizer = tiny_bpe_tokenizer()
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    output_ids = [start] + encode(tokenizer, "fox") + [end, start] + encode(tokenizer, " dog")
    assert stream(tokenizer, [], output_ids, make_params(skip_special_tokens=True)) == "fox dog"
    assert stream(tokenizer, [], output_ids, make_params(skip_special_tokens=False)) == (
        "<|im_start|>fox<|im_end|><|im_start|> dog"
    )


def test_spaces_between_special_tokens() -> None:
    """WordPiece-style decoders join tokens with spaces; False drops the one between two special tokens."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(special_tokens=["[UNK]", "[A]", "[B]"])
    tokenizer.train_from_iterator(["hello world"] * 5, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", additional_special_tokens=["[A]", "[B]"]
    )
    output_ids = wrapped.encode("hello [A] [B] world")
    with_spaces = make_params(skip_special_tokens=False, spaces_between_special_tokens=True)
    without = make_params(skip_special_tokens=False, spaces_between_special_tokens=False)
    assert stream(wrapped, [], output_ids, with_spaces) == "hello [A] [B] world"
    assert stream(wrapped, [], output_ids, without) == "hello [A][B] world"


# --- stop strings, stop tokens, hold-back -----------------------------------------------------------------


def piece_ids(*pieces: str) -> list[list[int]]:
    """Ids of each piece encoded on its own: byte-level BPE concatenates, so token boundaries fall between pieces."""
    return [encode(tiny_bpe_tokenizer(), piece) for piece in pieces]


def feed(detok: IncrementalDetokenizer, pieces: list[list[int]]) -> tuple[str | None, str]:
    """Feed the pieces a token at a time until a stop string; return (stop string, streamed text)."""
    streamed = ""
    for ids in pieces:
        for token_id in ids:
            stop = detok.update([token_id], stop_terminated=False)
            streamed += detok.get_next_output_text(finished=stop is not None, delta=True)
            if stop is not None:
                return stop, streamed
    return None, streamed + detok.get_next_output_text(finished=True, delta=True)


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_two_tokens(include: bool) -> None:
    params = make_params(stop=["fox!"], include_stop_str_in_output=include)
    detok = IncrementalDetokenizer(tiny_bpe_tokenizer(), [], params)
    stop, streamed = feed(detok, piece_ids("the quick fo", "x! jumps", " over"))
    assert stop == "fox!"
    assert streamed == detok.output_text == ("the quick fox!" if include else "the quick ")


@pytest.mark.parametrize("include", [False, True])
def test_several_stop_strings_earliest_wins(include: bool) -> None:
    params = make_params(stop=["lazy", "fox", "quick brown"], include_stop_str_in_output=include)
    detok = IncrementalDetokenizer(tiny_bpe_tokenizer(), [], params)
    # One update brings all three: the one that starts first is the stop, and nothing after it stays.
    stop = detok.update(encode(tiny_bpe_tokenizer(), "the quick brown fox jumps over the lazy dog"), False)
    assert stop == "quick brown"
    assert detok.get_next_output_text(finished=True, delta=False) == ("the quick brown" if include else "the ")
    assert detok.update(encode(tiny_bpe_tokenizer(), " more"), False) is None  # the text is final
    assert detok.output_text == ("the quick brown" if include else "the ")


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_at_the_very_start(include: bool) -> None:
    params = make_params(stop=["STOP"], include_stop_str_in_output=include)
    detok = IncrementalDetokenizer(tiny_bpe_tokenizer(), [], params)
    stop, streamed = feed(detok, piece_ids("STOP", "! the dog"))
    assert stop == "STOP"
    assert streamed == ("STOP" if include else "")


def test_stop_string_with_multibyte_characters() -> None:
    detok = IncrementalDetokenizer(tiny_bpe_tokenizer(), [], make_params(stop=["🇯🇵"]))
    stop, streamed = feed(detok, piece_ids("flags 🇫🇷", "🇯🇵 and more"))
    assert (stop, streamed) == ("🇯🇵", "flags 🇫🇷")


def test_partial_stop_string_is_held_back_while_streaming() -> None:
    detok = IncrementalDetokenizer(tiny_bpe_tokenizer(), [], make_params(stop=["STOP!"]))
    detok.update(encode(tiny_bpe_tokenizer(), "the dog STO"), False)
    # 4 = len("STOP!") - 1 characters may begin the stop string: not streamed yet.
    assert detok.get_next_output_text(finished=False, delta=True) == "the dog"
    assert detok.get_next_output_text(finished=False, delta=False) == "the dog"
    detok.update(encode(tiny_bpe_tokenizer(), "P?"), False)  # not the stop string after all
    assert detok.get_next_output_text(finished=False, delta=True) == " S"
    assert detok.get_next_output_text(finished=False, delta=True) == ""
    assert detok.get_next_output_text(finished=True, delta=True) == "TOP?"
    assert detok.output_text == "the dog STOP?"


def test_no_hold_back_when_stop_string_is_included() -> None:
    params = make_params(stop=["STOP!"], include_stop_str_in_output=True)
    detok = IncrementalDetokenizer(tiny_bpe_tokenizer(), [], params)
    detok.update(encode(tiny_bpe_tokenizer(), "the dog STO"), False)
    assert detok.get_next_output_text(finished=False, delta=True) == "the dog STO"


@pytest.mark.parametrize("include", [False, True])
def test_stop_terminated(include: bool) -> None:
    tokenizer = tiny_bpe_tokenizer()
    params = make_params(skip_special_tokens=False, include_stop_str_in_output=include)
    eos_detok = IncrementalDetokenizer(tokenizer, [], params)
    assert eos_detok.update(encode(tokenizer, "the dog") + [tokenizer.eos_token_id], stop_terminated=True) is None
    assert eos_detok.get_next_output_text(finished=True, delta=True) == "the dog" + ("<|im_end|>" if include else "")
    assert eos_detok.token_ids[-1] == tokenizer.eos_token_id  # the stop token stays in token_ids
    # A stop_token_id can be an ordinary token ("!" is one byte, so one token): its text is dropped the same way.
    (exclamation_id,) = encode(tokenizer, "!")
    stop_id_detok = IncrementalDetokenizer(tokenizer, [], params)
    stop_id_detok.update(encode(tokenizer, "the dog"), stop_terminated=False)
    stop_id_detok.update([exclamation_id], stop_terminated=True)
    assert stop_id_detok.get_next_output_text(finished=True, delta=False) == "the dog" + ("!" if include else "")


def test_stop_terminated_only_drops_the_last_token() -> None:
    tokenizer = tiny_bpe_tokenizer()
    detok = IncrementalDetokenizer(tokenizer, [], make_params(skip_special_tokens=False))
    new_ids = encode(tokenizer, "the dog") + [tokenizer.eos_token_id]
    detok.update(new_ids, stop_terminated=True)
    assert detok.output_text == "the dog"
    assert detok.token_ids == new_ids


@pytest.mark.parametrize("params", [make_params(), make_params(detokenize=False)])
def test_no_text_without_tokenizer_or_detokenize(params) -> None:
    tokenizer = None if params.detokenize else tiny_bpe_tokenizer()
    detok = IncrementalDetokenizer(tokenizer, [1, 2, 3], params)
    assert detok.update([5, 6], stop_terminated=False) is None
    assert detok.update([7], stop_terminated=True) is None
    assert detok.token_ids == [5, 6, 7]
    assert detok.get_next_output_text(finished=True, delta=True) == ""
    assert detok.output_text == ""
