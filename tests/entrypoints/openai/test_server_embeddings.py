"""``POST /v1/embeddings`` on a real ``pagedllm serve --runner pooling`` process (engine core in its own process):
the ``openai`` client (float and base64) and LangChain's ``OpenAIEmbeddings`` get the vectors ``LLM.embed`` gives
for the same model; string, string-list, token-id and token-id-list inputs; dimensions; usage; the 4xx answers
(empty, too many and too long inputs, bad dimensions, the other kind of request on each kind of server)."""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterator

import httpx
import pytest
import torch
import torch.nn.functional as F

from pagedllm import LLM
from tests.entrypoints.openai.conftest import RemoteServer

MAX_MODEL_LEN = 64
FLAGS = ["--device", "cpu", "--block-size", "4", "--num-gpu-blocks-override", "256", "--max-model-len",
         str(MAX_MODEL_LEN), "--max-num-batched-tokens", "16", "--max-num-seqs", "4",
         "--max-embedding-inputs", "8"]
TEXTS = ["Once upon a time there was a little model", "The quick brown fox jumps over the lazy dog.", "Paged"]


@pytest.fixture(scope="module")
def embed_server(server_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteServer]:
    remote = RemoteServer(server_model_dir, [*FLAGS, "--runner", "pooling", "--served-model-name", "tiny-embed"],
                          tmp_path_factory.mktemp("embed_server_logs"))
    yield remote
    remote.terminate()


@pytest.fixture(scope="module")
def offline(server_model_dir: str) -> LLM:
    return LLM(server_model_dir, task="embed", device="cpu", block_size=4, num_gpu_blocks_override=256,
               max_model_len=MAX_MODEL_LEN)


def expected(offline: LLM, inputs, **params) -> list[torch.Tensor]:
    from pagedllm import PoolingParams

    outputs = offline.embed(inputs, PoolingParams(**params), use_tqdm=False)
    return [torch.tensor(output.outputs.embedding) for output in outputs]


def assert_close_vectors(got: list[list[float]], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for vector, reference in zip(got, want):
        vector = torch.tensor(vector)
        assert vector.shape == reference.shape
        assert F.cosine_similarity(vector, reference, dim=0).item() > 0.9999


def test_openai_client_float_and_base64(embed_server, offline):
    client = embed_server.client()
    floats = client.embeddings.create(model="tiny-embed", input=TEXTS, encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1, 2] and floats.object == "list"
    assert floats.model == "tiny-embed"
    assert_close_vectors([d.embedding for d in floats.data], expected(offline, TEXTS))
    tokens = sum(len(offline.get_tokenizer().encode(text)) for text in TEXTS)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == tokens
    default = client.embeddings.create(model="tiny-embed", input=TEXTS)  # the client asks for base64 and decodes it
    for a, b in zip(default.data, floats.data):
        assert a.embedding == pytest.approx(b.embedding, abs=1e-6)


def test_base64_is_little_endian_float32(embed_server):
    body = {"model": "tiny-embed", "input": TEXTS[0]}
    floats = httpx.post(embed_server.url_for("/v1/embeddings"), json=body, timeout=60).json()
    encoded = httpx.post(embed_server.url_for("/v1/embeddings"), json={**body, "encoding_format": "base64"},
                         timeout=60).json()
    raw = base64.b64decode(encoded["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert decoded == pytest.approx(floats["data"][0]["embedding"], abs=1e-6)


def test_token_id_inputs_and_dimensions(embed_server, offline):
    client = embed_server.client()
    ids = [[5, 17, 42, 99, 7], [3, 250, 11]]
    one = client.embeddings.create(model="tiny-embed", input=ids[0], encoding_format="float")
    assert_close_vectors([one.data[0].embedding], expected(offline, [{"prompt_token_ids": ids[0]}]))
    many = client.embeddings.create(model="tiny-embed", input=ids, dimensions=8, encoding_format="float")
    assert [len(d.embedding) for d in many.data] == [8, 8]
    assert_close_vectors([d.embedding for d in many.data],
                         expected(offline, [{"prompt_token_ids": i} for i in ids], dimensions=8))
    assert many.usage.prompt_tokens == 8


def test_langchain_openai_embeddings(embed_server, offline):
    langchain_openai = pytest.importorskip("langchain_openai")
    embeddings = langchain_openai.OpenAIEmbeddings(model="tiny-embed", base_url=embed_server.url_for("/v1"),
                                                   api_key="none", check_embedding_ctx_length=False,
                                                   tiktoken_enabled=False, max_retries=0)
    documents = embeddings.embed_documents(TEXTS)
    assert_close_vectors(documents, expected(offline, TEXTS))
    query = embeddings.embed_query(TEXTS[1])
    assert_close_vectors([query], expected(offline, [TEXTS[1]]))


@pytest.mark.parametrize("body, param", [
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": ["a", ""]}, "input"),
    ({"input": ["x"] * 9}, "input"),  # --max-embedding-inputs 8
    ({"input": [1] * (MAX_MODEL_LEN + 1)}, "input"),
    ({"input": [100000]}, "input"),
    ({"input": "hi", "dimensions": 10_000}, "dimensions"),
    ({"input": "hi", "dimensions": 0}, "dimensions"),
    ({"input": "hi", "encoding_format": "int8"}, "encoding_format"),
    ({"input": 3}, "input"),
])
def test_bad_requests_are_400s(embed_server, body, param):
    response = httpx.post(embed_server.url_for("/v1/embeddings"), json={"model": "tiny-embed", **body}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


def test_too_long_input_is_a_400_unless_truncated(embed_server, offline):
    ids = list(range(3, 3 + MAX_MODEL_LEN + 10))
    response = httpx.post(embed_server.url_for("/v1/embeddings"), json={"input": ids}, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    kept = httpx.post(embed_server.url_for("/v1/embeddings"), json={"input": ids, "truncate_prompt_tokens": 20},
                      timeout=60).json()
    assert kept["usage"]["prompt_tokens"] == 20
    assert_close_vectors([kept["data"][0]["embedding"]], expected(offline, [{"prompt_token_ids": ids[-20:]}]))


def test_unknown_model_is_a_404(embed_server):
    response = httpx.post(embed_server.url_for("/v1/embeddings"), json={"model": "nope", "input": "hi"}, timeout=60)
    assert response.status_code == 404


def test_an_embedding_server_refuses_generation(embed_server):
    for path, body in (("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        response = httpx.post(embed_server.url_for(path), json={"model": "tiny-embed", **body}, timeout=60)
        assert response.status_code == 400, response.text
        assert "--runner pooling" in response.json()["error"]["message"]
    models = httpx.get(embed_server.url_for("/v1/models"), timeout=10).json()
    assert [card["id"] for card in models["data"]] == ["tiny-embed"]


def test_a_generation_server_refuses_embeddings(server, http):
    response = http.post("/v1/embeddings", json={"model": "tiny", "input": "hi"})
    assert response.status_code == 400
    assert "--runner pooling" in response.json()["error"]["message"]


def test_metrics_count_embeddings_and_no_kv_is_kept(embed_server):
    before = embed_server.wait_idle()
    client = embed_server.client()
    result = client.embeddings.create(model="tiny-embed", input=TEXTS, encoding_format="float")
    after = embed_server.wait_idle()
    assert after["pagedllm:kv_cache_usage_perc"] == 0
    assert after["pagedllm:prompt_tokens_total"] - before["pagedllm:prompt_tokens_total"] == result.usage.prompt_tokens
    assert after["pagedllm:generation_tokens_total"] == before["pagedllm:generation_tokens_total"]
    assert after["pagedllm:request_success_total"] - before["pagedllm:request_success_total"] == len(TEXTS)


def test_embeddings_route_is_documented(engine):
    from fastapi.testclient import TestClient

    from pagedllm.entrypoints.openai.server import build_app
    from tests.entrypoints.openai.conftest import serve_args

    schema = TestClient(build_app(engine, serve_args())).get("/openapi.json").json()
    operation = schema["paths"]["/v1/embeddings"]["post"]
    assert operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("EmbeddingResponseOut")
