"""vLLM's extension fields on the server: ``return_token_ids`` and ``return_tokens_as_token_ids`` (completions and
chat, whole and streamed) and the ``guided_*`` fields mapped onto structured outputs.

The model has random weights; a regex of lowercase letters keeps its outputs ASCII, so that the ids it returns
decode back to exactly its text."""

from __future__ import annotations

import json
import re

import httpx
import pytest

USER = [{"role": "user", "content": "Say some letters."}]
LETTERS = {"guided_regex": "[a-z]{40}"}  # never finished within max_tokens: every id is a letter token
MAX_TOKENS = 6


def _post(http: httpx.Client, path: str, body: dict) -> dict:
    response = http.post(path, json={"model": "tiny", "temperature": 0, "max_tokens": MAX_TOKENS, **body})
    assert response.status_code == 200, response.text
    return response.json()


def _stream(http: httpx.Client, path: str, body: dict) -> list[dict]:
    chunks = []
    with http.stream("POST", path, json={"model": "tiny", "temperature": 0, "max_tokens": MAX_TOKENS,
                                         "stream": True, **body}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line.removeprefix("data: ")))
    assert chunks and all("error" not in chunk for chunk in chunks), chunks
    return chunks


def _detokenize(http: httpx.Client, token_ids: list[int]) -> str:
    return http.post("/detokenize", json={"tokens": token_ids}).json()["prompt"]


# ---- return_token_ids: completions -------------------------------------------------------------------------------


def test_completion_returns_prompt_and_output_token_ids(http):
    prompt = "The letters are"
    body = _post(http, "/v1/completions", {"prompt": prompt, "return_token_ids": True, **LETTERS})
    choice = body["choices"][0]
    assert choice["prompt_token_ids"] == http.post("/tokenize", json={"prompt": prompt}).json()["tokens"]
    assert len(choice["token_ids"]) == body["usage"]["completion_tokens"] == MAX_TOKENS
    assert _detokenize(http, choice["token_ids"]) == choice["text"]


def test_completion_without_return_token_ids_has_none(http):
    choice = _post(http, "/v1/completions", {"prompt": "The letters are", **LETTERS})["choices"][0]
    assert choice["prompt_token_ids"] is None and choice["token_ids"] is None


def test_completion_token_ids_of_several_prompts_and_token_id_prompts(http):
    prompts = [[5, 6, 7], [8, 9]]
    body = _post(http, "/v1/completions", {"prompt": prompts, "return_token_ids": True, **LETTERS})
    by_index = sorted(body["choices"], key=lambda choice: choice["index"])
    assert [choice["prompt_token_ids"] for choice in by_index] == prompts
    assert all(len(choice["token_ids"]) == MAX_TOKENS for choice in by_index)


def test_completion_stream_sends_prompt_ids_first_and_each_chunks_ids(http):
    request = {"prompt": "The letters are", "return_token_ids": True, **LETTERS}
    whole = _post(http, "/v1/completions", request)["choices"][0]
    chunks = _stream(http, "/v1/completions", request)
    choices = [choice for chunk in chunks for choice in chunk["choices"]]
    assert choices[0]["prompt_token_ids"] == whole["prompt_token_ids"]
    assert all("prompt_token_ids" not in choice for choice in choices[1:])
    assert [token for choice in choices for token in choice["token_ids"]] == whole["token_ids"]
    assert "".join(choice["text"] for choice in choices) == whole["text"]


def test_completion_stream_without_return_token_ids_leaves_the_fields_out(http):
    chunks = _stream(http, "/v1/completions", {"prompt": "The letters are", **LETTERS})
    assert all("token_ids" not in choice and "prompt_token_ids" not in choice
               for chunk in chunks for choice in chunk["choices"])


# ---- return_tokens_as_token_ids: completions ---------------------------------------------------------------------


def test_completion_logprob_tokens_as_token_ids(http):
    body = _post(http, "/v1/completions", {"prompt": "The letters are", "logprobs": 2, "return_token_ids": True,
                                           "return_tokens_as_token_ids": True, **LETTERS})
    choice = body["choices"][0]
    assert choice["logprobs"]["tokens"] == [f"token_id:{token}" for token in choice["token_ids"]]
    for top in choice["logprobs"]["top_logprobs"]:
        assert top and all(re.fullmatch(r"token_id:\d+", key) for key in top)
    # text_offset still counts characters of the text
    offsets = choice["logprobs"]["text_offset"]
    assert offsets[0] == 0 and offsets[-1] < len(choice["text"])


def test_completion_echo_logprob_tokens_as_token_ids(http):
    body = _post(http, "/v1/completions", {"prompt": [5, 6, 7], "echo": True, "logprobs": 1,
                                           "return_token_ids": True, "return_tokens_as_token_ids": True, **LETTERS})
    choice = body["choices"][0]
    assert choice["logprobs"]["tokens"] == [f"token_id:{t}" for t in [5, 6, 7, *choice["token_ids"]]]


def test_completion_stream_logprob_tokens_as_token_ids(http):
    chunks = _stream(http, "/v1/completions", {"prompt": "The letters are", "logprobs": 1, "return_token_ids": True,
                                                "return_tokens_as_token_ids": True, **LETTERS})
    choices = [choice for chunk in chunks for choice in chunk["choices"]]
    streamed_ids = [token for choice in choices for token in choice["token_ids"]]
    logprob_tokens = [token for choice in choices if choice["logprobs"] for token in choice["logprobs"]["tokens"]]
    assert logprob_tokens == [f"token_id:{token}" for token in streamed_ids]
    assert len(streamed_ids) == MAX_TOKENS


# ---- return_token_ids and return_tokens_as_token_ids: chat --------------------------------------------------------


def test_chat_returns_prompt_and_output_token_ids(http):
    body = _post(http, "/v1/chat/completions", {"messages": USER, "return_token_ids": True, **LETTERS})
    assert body["prompt_token_ids"] == http.post("/tokenize", json={"messages": USER}).json()["tokens"]
    choice = body["choices"][0]
    assert len(choice["token_ids"]) == MAX_TOKENS
    assert _detokenize(http, choice["token_ids"]) == choice["message"]["content"]


def test_chat_without_return_token_ids_has_none(http):
    body = _post(http, "/v1/chat/completions", {"messages": USER, **LETTERS})
    assert body["prompt_token_ids"] is None and body["choices"][0]["token_ids"] is None


def test_chat_stream_sends_prompt_ids_in_the_first_chunk_only(http):
    request = {"messages": USER, "return_token_ids": True, **LETTERS}
    whole = _post(http, "/v1/chat/completions", request)
    chunks = _stream(http, "/v1/chat/completions", request)
    assert chunks[0]["prompt_token_ids"] == whole["prompt_token_ids"]
    assert all("prompt_token_ids" not in chunk for chunk in chunks[1:])
    streamed = [token for chunk in chunks for choice in chunk["choices"] for token in choice.get("token_ids", [])]
    assert streamed == whole["choices"][0]["token_ids"]


def test_chat_logprob_tokens_as_token_ids(http):
    body = _post(http, "/v1/chat/completions", {"messages": USER, "logprobs": True, "top_logprobs": 2,
                                                "return_token_ids": True, "return_tokens_as_token_ids": True,
                                                **LETTERS})
    choice = body["choices"][0]
    content = choice["logprobs"]["content"]
    assert [entry["token"] for entry in content] == [f"token_id:{token}" for token in choice["token_ids"]]
    assert all(re.fullmatch(r"token_id:\d+", top["token"]) for entry in content for top in entry["top_logprobs"])


def test_chat_stream_logprob_tokens_as_token_ids(http):
    chunks = _stream(http, "/v1/chat/completions", {"messages": USER, "logprobs": True,
                                                    "return_tokens_as_token_ids": True, "return_token_ids": True,
                                                    **LETTERS})
    choices = [choice for chunk in chunks for choice in chunk["choices"]]
    tokens = [entry["token"] for choice in choices if choice.get("logprobs") for entry in choice["logprobs"]["content"]]
    ids = [token for choice in choices for token in choice.get("token_ids", [])]
    assert tokens == [f"token_id:{token}" for token in ids] and len(ids) == MAX_TOKENS


# ---- guided_* ----------------------------------------------------------------------------------------------------


def test_guided_choice_answers_one_of_the_choices(http):
    options = ["alpha", "beta", "gamma"]
    for path, request in (("/v1/completions", {"prompt": "Pick:"}), ("/v1/chat/completions", {"messages": USER})):
        body = _post(http, path, {**request, "guided_choice": options, "n": 4, "temperature": 1.0, "seed": 3,
                                  "max_tokens": 20})
        texts = [choice.get("text", choice.get("message", {}).get("content")) for choice in body["choices"]]
        assert len(texts) == 4 and all(text in options for text in texts), texts


def test_guided_regex_output_matches(http):
    pattern = r"[0-9]{3}-[a-z]{2}"
    body = _post(http, "/v1/completions", {"prompt": "Code:", "guided_regex": pattern, "n": 3, "temperature": 1.0,
                                           "seed": 5, "max_tokens": 30, "guided_decoding_backend": "xgrammar"})
    for choice in body["choices"]:
        assert choice["finish_reason"] == "stop" and re.fullmatch(pattern, choice["text"]), choice


def test_guided_json_output_validates(http):
    schema = {"type": "object", "properties": {"size": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["size"], "additionalProperties": False}
    body = _post(http, "/v1/chat/completions", {"messages": USER, "guided_json": schema, "max_tokens": 60,
                                                "guided_whitespace_pattern": None})
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop" and set(json.loads(choice["message"]["content"])) == {"size"}


def test_guided_grammar_output_matches(http):
    grammar = 'root ::= ("yes" | "no") "!"'
    body = _post(http, "/v1/completions", {"prompt": "Answer:", "guided_grammar": grammar, "max_tokens": 10})
    assert body["choices"][0]["text"] in ("yes!", "no!")


@pytest.mark.parametrize(("body", "param"), [
    ({"guided_choice": ["a"], "guided_regex": "b"}, "guided_regex"),
    ({"guided_regex": "b", "structured_outputs": {"regex": "c"}}, "guided_regex"),
    ({"guided_json": {"type": "object"}, "response_format": {"type": "json_object"}}, "guided_json"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": "a", "guided_decoding_backend": "outlines"}, "guided_decoding_backend"),
    ({"guided_regex": "a", "guided_whitespace_pattern": r"[ ]?"}, "guided_whitespace_pattern"),
    ({"guided_regex": "(", "max_tokens": 3}, "guided_regex"),
    ({"guided_regex": "a", "use_beam_search": True, "n": 2}, "guided_regex"),
])
def test_guided_fields_that_cannot_be_honoured_are_400s(http, body, param):
    response = http.post("/v1/completions", json={"model": "tiny", "prompt": "hi", **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_chat_guided_conflict_names_the_guided_field(http):
    response = http.post("/v1/chat/completions", json={"messages": USER, "guided_choice": ["a"],
                                                       "guided_grammar": 'root ::= "a"'})
    assert response.status_code == 400 and response.json()["error"]["param"] == "guided_choice"
