"""LoRA through a real ``pagedllm serve`` process and the ``openai`` client: adapters by name (``--lora-modules`` in
both forms), /v1/models with parents, one concurrent burst of the base model and two adapters equal to offline runs,
load / unload / reload at run time (PAGEDLLM_ALLOW_RUNTIME_LORA_UPDATING), errors as OpenAI-shaped 4xx, and the
lora_requests_info metric."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Iterator

import httpx
import pytest

from pagedllm import LLM, LoRARequest, SamplingParams
from pagedllm.params import BeamSearchParams
from tests.entrypoints.openai.conftest import RemoteServer

pytest.importorskip("peft")
pytest.importorskip("openai")

FLAGS = ["--device", "cpu", "--block-size", "4", "--num-gpu-blocks-override", "512", "--max-model-len", "128"]
PROMPTS = [[5, 17, 42, 99, 7], [3, 250, 11, 64, 12, 90], [8, 8, 30]]


@pytest.fixture(scope="module")
def lora_server(lora_base, lora_adapter, tmp_path_factory, monkeypatch_module) -> Iterator[RemoteServer]:
    monkeypatch_module.setenv("PAGEDLLM_ALLOW_RUNTIME_LORA_UPDATING", "true")
    second = json.dumps({"name": "attn", "path": lora_adapter("llama", "attn_r4"), "base_model_name": "tiny"})
    remote = RemoteServer(lora_base("llama"), [*FLAGS, "--served-model-name", "tiny", "--max-loras", "2",
                                               "--lora-modules", f"all={lora_adapter('llama', 'all_r8')}", second],
                          tmp_path_factory.mktemp("lora_server_logs"))
    yield remote
    remote.terminate()


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    patch = pytest.MonkeyPatch()
    yield patch
    patch.undo()


@pytest.fixture(scope="module")
def offline(lora_base) -> LLM:
    return LLM(lora_base("llama"), device="cpu", block_size=4, num_gpu_blocks_override=512, max_model_len=128,
               enable_lora=True, max_loras=4)


def offline_tokens(llm: LLM, lora: LoRARequest | None) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False, lora_request=lora)
    return [o.outputs[0].token_ids for o in outputs]


async def burst(server: RemoteServer, models: list[str]) -> dict[str, list[list[int]]]:
    """Every prompt with every model, all at once; the generated token ids per model."""
    client = server.async_client()

    async def one(model: str, prompt: list[int]) -> list[int]:
        response = await client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0.0,
                                                   extra_body={"ignore_eos": True, "return_token_ids": True})
        return response.choices[0].token_ids

    results = await asyncio.gather(*(one(m, p) for m in models for p in PROMPTS))
    await client.close()
    return {m: results[i * len(PROMPTS):(i + 1) * len(PROMPTS)] for i, m in enumerate(models)}


def test_models_lists_adapters_with_parent(lora_server):
    cards = {card.id: card for card in lora_server.client().models.list().data}
    assert set(cards) == {"tiny", "all", "attn"}
    assert cards["all"].parent == "tiny" and cards["attn"].parent == "tiny" and cards["tiny"].parent is None
    assert "/" not in (cards["all"].root or "")  # no server path is shown


def test_concurrent_burst_of_base_and_two_adapters_matches_offline(lora_server, offline, lora_adapter):
    served = asyncio.run(burst(lora_server, ["tiny", "all", "attn"]))
    assert served["tiny"] == offline_tokens(offline, None)
    assert served["all"] == offline_tokens(offline, LoRARequest("all", 1, lora_adapter("llama", "all_r8")))
    assert served["attn"] == offline_tokens(offline, LoRARequest("attn", 2, lora_adapter("llama", "attn_r4")))
    assert served["all"] != served["tiny"] != served["attn"]
    metrics = httpx.get(lora_server.url_for("/metrics"), timeout=10).text
    assert 'pagedllm:lora_requests_info{' in metrics and 'max_lora="2"' in metrics


def post(server: RemoteServer, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url_for(path), json=body, timeout=60)


def test_load_unload_reload_at_run_time(lora_server, offline, lora_adapter, tmp_path):
    mlp = lora_adapter("llama", "ko_r2")
    assert post(lora_server, "/v1/load_lora_adapter", {"lora_name": "extra", "lora_path": mlp}).status_code == 200
    assert asyncio.run(burst(lora_server, ["extra"]))["extra"] == offline_tokens(offline, LoRARequest("x", 7, mlp))
    duplicate = post(lora_server, "/v1/load_lora_adapter", {"lora_name": "extra", "lora_path": mlp})
    assert duplicate.status_code == 400 and "already been loaded" in duplicate.json()["error"]["message"]
    assert post(lora_server, "/v1/unload_lora_adapter", {"lora_name": "extra"}).status_code == 200
    gone = post(lora_server, "/v1/completions", {"model": "extra", "prompt": "hi", "max_tokens": 2})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    unknown = post(lora_server, "/v1/unload_lora_adapter", {"lora_name": "extra"})
    assert unknown.status_code == 404 and "cannot be found" in unknown.json()["error"]["message"]
    other = lora_adapter("llama", "all_r8", seed=99)  # reloaded under the same name with other weights
    assert post(lora_server, "/v1/load_lora_adapter", {"lora_name": "extra", "lora_path": other}).status_code == 200
    assert asyncio.run(burst(lora_server, ["extra"]))["extra"] == offline_tokens(offline, LoRARequest("y", 8, other))
    assert post(lora_server, "/v1/unload_lora_adapter", {"lora_name": "extra"}).status_code == 200


@pytest.mark.parametrize(("body", "message"), [
    ({"lora_name": "bad", "lora_path": "/no/such/adapter"}, "not a directory"),
    ({"lora_name": "tiny", "lora_path": "/x"}, "already been loaded"),  # the base model's name
    ({"lora_name": "bad"}, "lora_path"),
])
def test_bad_loads_are_4xx_and_the_server_keeps_serving(lora_server, body, message):
    response = post(lora_server, "/v1/load_lora_adapter", body)
    assert response.status_code == 400
    assert message in json.dumps(response.json()["error"])
    assert asyncio.run(burst(lora_server, ["all"]))["all"]


def test_qwen3_adapter_on_llama_server_is_a_400(lora_server, lora_adapter):
    response = post(lora_server, "/v1/load_lora_adapter",
                    {"lora_name": "wrong", "lora_path": lora_adapter("qwen3", "attn_r4")})
    assert response.status_code == 400 and "do not match the base model" in response.json()["error"]["message"]


@pytest.mark.parametrize(("env", "allowed"), [
    ({}, False), ({"PAGEDLLM_ALLOW_RUNTIME_LORA_UPDATING": "true"}, True),
    ({"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}, True), ({"PAGEDLLM_ALLOW_RUNTIME_LORA_UPDATING": "false"}, False),
])
def test_runtime_updating_flag_reads_both_names(monkeypatch, env, allowed):
    from pagedllm.config import runtime_lora_updating_allowed

    monkeypatch.delenv("PAGEDLLM_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
    monkeypatch.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert runtime_lora_updating_allowed() is allowed


def test_lora_modules_flag_forms():
    from pagedllm.entrypoints.openai.lora_modules import LoRAModulePath, parse_lora_module

    assert parse_lora_module("sql=/a/b") == LoRAModulePath("sql", "/a/b")
    assert parse_lora_module('{"name": "s", "path": "/p", "base_model_name": "m"}') == LoRAModulePath("s", "/p", "m")
    for bad in ("nopath", "=x", '{"name": "s"}'):
        with pytest.raises(ValueError):
            parse_lora_module(bad)


def test_requests_running_on_an_unloaded_adapter_finish_first(lora_server, offline, lora_adapter):
    path = lora_adapter("llama", "mlp_r16_rslora")
    assert post(lora_server, "/v1/load_lora_adapter", {"lora_name": "leaving", "lora_path": path}).status_code == 200
    params = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
    expected = offline.generate({"prompt_token_ids": PROMPTS[0]}, params, use_tqdm=False,
                                lora_request=LoRARequest("leaving", 9, path))[0].outputs[0].token_ids

    async def run() -> tuple[list[int], int]:
        client = lora_server.async_client()
        running = asyncio.create_task(client.completions.create(
            model="leaving", prompt=PROMPTS[0], max_tokens=100, temperature=0.0,
            extra_body={"ignore_eos": True, "return_token_ids": True}))
        await asyncio.sleep(0.3)  # the request is running (100 tokens take longer on CPU)
        async with httpx.AsyncClient() as http:
            unload = await http.post(lora_server.url_for("/v1/unload_lora_adapter"), json={"lora_name": "leaving"})
        response = await running
        await client.close()
        return response.choices[0].token_ids, unload.status_code

    tokens, status = asyncio.run(run())
    assert status == 200 and tokens == expected


def test_chat_completion_picks_the_adapter(lora_server, offline, lora_adapter):
    client = lora_server.client()
    messages = [{"role": "user", "content": "Once upon a time"}]

    def chat(model: str) -> str:
        response = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0.0,
                                                  extra_body={"ignore_eos": True})
        assert response.model == model
        return response.choices[0].message.content

    lora = LoRARequest("all", 1, lora_adapter("llama", "all_r8"))
    expected = offline.chat(messages, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False,
                            lora_request=lora)[0].outputs[0].text
    assert chat("all") == expected != chat("tiny")


def test_unload_drops_the_weights_and_a_reload_reads_the_files_again(lora_server, offline, lora_adapter, tmp_path):
    first, second = lora_adapter("llama", "all_r8"), lora_adapter("llama", "all_r8", seed=123)
    path = tmp_path / "swapped"
    shutil.copytree(first, path)
    assert post(lora_server, "/v1/load_lora_adapter", {"lora_name": "swap", "lora_path": str(path)}).status_code == 200
    assert asyncio.run(burst(lora_server, ["swap"]))["swap"] == offline_tokens(offline, LoRARequest("a", 21, first))
    assert post(lora_server, "/v1/unload_lora_adapter", {"lora_name": "swap"}).status_code == 200
    shutil.rmtree(path)
    shutil.copytree(second, path)  # other weights under the same path
    assert post(lora_server, "/v1/load_lora_adapter", {"lora_name": "swap", "lora_path": str(path)}).status_code == 200
    served = asyncio.run(burst(lora_server, ["swap"]))["swap"]
    assert served == offline_tokens(offline, LoRARequest("b", 22, second)) != offline_tokens(
        offline, LoRARequest("a", 21, first))
    assert post(lora_server, "/v1/unload_lora_adapter", {"lora_name": "swap"}).status_code == 200
    deadline = time.monotonic() + 10  # the core logs each adapter its workers dropped
    while lora_server.log().count("(unloaded) removed from the workers") < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert lora_server.log().count("(unloaded) removed from the workers") >= 2


def test_responses_request_picks_the_adapter(lora_server, offline, lora_adapter):
    lora = LoRARequest("all", 1, lora_adapter("llama", "all_r8"))
    messages = [{"role": "user", "content": "Once upon a time"}]
    params = SamplingParams(temperature=0.0, max_tokens=8)

    def respond(model: str) -> str:
        response = post(lora_server, "/v1/responses", {"model": model, "input": "Once upon a time",
                                                        "max_output_tokens": 8, "temperature": 0.0})
        assert response.status_code == 200, response.text
        assert response.json()["model"] == model
        return response.json()["output"][0]["content"][0]["text"]

    expected = offline.chat(messages, params, use_tqdm=False, lora_request=lora)[0].outputs[0].text
    base = offline.chat(messages, params, use_tqdm=False)[0].outputs[0].text
    assert respond("all") == expected
    assert respond("tiny") == base


@pytest.mark.parametrize("model", ["all", "tiny"])
def test_beam_search_picks_the_adapter(lora_server, offline, lora_adapter, model):
    lora = LoRARequest("all", 1, lora_adapter("llama", "all_r8")) if model == "all" else None
    params = BeamSearchParams(beam_width=2, max_tokens=6, ignore_eos=True)
    (expected,) = offline.beam_search([{"prompt_token_ids": PROMPTS[0]}], params, lora_request=lora)
    response = post(lora_server, "/v1/completions", {"model": model, "prompt": PROMPTS[0], "max_tokens": 6, "n": 2,
                                                      "use_beam_search": True, "ignore_eos": True,
                                                      "return_token_ids": True})
    assert response.status_code == 200, response.text
    served = [choice["token_ids"] for choice in response.json()["choices"]]
    assert served == [sequence.token_ids for sequence in expected.sequences]  # generated tokens, best first
