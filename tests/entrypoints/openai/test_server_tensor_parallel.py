"""``pagedllm serve ... -tp 2`` on CPU: the engine core process starts a worker process per rank, and a greedy
completion equals the one of the single-device engine."""

from __future__ import annotations

import httpx
import pytest

from tests.entrypoints.openai.conftest import ENGINE_KWARGS, RemoteServer


@pytest.mark.slow
def test_serve_with_tensor_parallel_size_2(server_model_dir, tmp_path):
    from pagedllm import LLM, SamplingParams

    llm = LLM(server_model_dir, **ENGINE_KWARGS)
    try:
        expected = llm.generate(["Hello parallel world"], SamplingParams(temperature=0, max_tokens=12,
                                                                        ignore_eos=True), use_tqdm=False)
    finally:
        llm.llm_engine.shutdown()
    remote = RemoteServer(server_model_dir, ["--device", "cpu", "--block-size", "16", "--num-gpu-blocks-override",
                                             "2048", "--max-model-len", "1024", "-tp", "2"], tmp_path)
    try:
        body = {"model": server_model_dir, "prompt": "Hello parallel world", "max_tokens": 12, "temperature": 0,
                "ignore_eos": True}
        response = httpx.post(remote.url_for("/v1/completions"), json=body, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == expected[0].outputs[0].text
        assert "tp2 x pp1" in remote.log()
    finally:
        remote.terminate()
