"""vLLM's serve flags, each honoured: --config FILE.yaml (the command line wins), --ssl-keyfile/--ssl-certfile,
--root-path, --uvicorn-log-level, --disable-log-stats and the stats line, --swap-space with --preemption-mode,
--max-logprobs; GET /v1/models/{id}; /docs answering that it is off; one log format for every logger.

One real server (HTTPS, most flags from a YAML file) for what only a running server shows; the app's own options
in process, on a shared engine; the rest on the parsed flags."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from pagedllm.engine.metrics import PREFIX, Metric
from pagedllm.entrypoints.cli import _reparse_with_config_file, main, make_parser
from pagedllm.entrypoints.engine_args import engine_args_from_cli
from pagedllm.entrypoints.openai.server import ServerConfig, _start_stats_logger, build_app
from pagedllm.entrypoints.openai.stats_logger import StatsLogger
from tests.entrypoints.openai.conftest import ENGINE_KWARGS, RemoteServer, serve_args

LOG_LINE = r"^{level} \d\d-\d\d \d\d:\d\d:\d\d {tag}{logger}: "  # pagedllm.logger's format
STATS_LINE = (r"Avg prompt throughput: [\d.]+ tokens/s, Avg generation throughput: [\d.]+ tokens/s, "
              r"Running: \d+ reqs, Waiting: \d+ reqs, KV cache usage: [\d.]+%, Prefix cache hit rate: [\d.]+%")
CONFIG_YAML = """\
served_model_name: [from-file, second-name]
max-logprobs: 3                 # the command line says 4: it wins
root_path: /llm
preemption-mode: swap
swap_space: 0.01
enable_prefix_caching: false
uvicorn-log-level: warning
"""


# ---- one real server: HTTPS, flags from a YAML file ------------------------------------------------------------


class HttpsServer(RemoteServer):
    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (key, certificate), made with the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a test certificate with")
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return key, cert


@pytest.fixture(scope="module")
def https_server(server_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpsServer]:
    """A KV cache of 16 blocks (256 tokens) so that four long sequences must preempt, by swapping."""
    directory = tmp_path_factory.mktemp("flags_server")
    key, cert = make_certificate(directory)
    config = directory / "serve.yaml"
    config.write_text(CONFIG_YAML)
    flags = ["--config", str(config), "--max-logprobs", "4", "--ssl-keyfile", str(key), "--ssl-certfile", str(cert),
             "--device", "cpu", "--block-size", "16", "--num-gpu-blocks-override", "16", "--max-model-len", "256"]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SSL_CERT_FILE", str(cert))  # httpx (here and in RemoteServer) trusts the test certificate
        env.setenv("PAGEDLLM_LOG_STATS_INTERVAL", "0.5")
        remote = HttpsServer(server_model_dir, flags, directory)
        yield remote
        remote.terminate()


def llm_url(server: RemoteServer, path: str) -> str:
    return server.url_for("/llm" + path)


def test_https_with_the_given_certificate(https_server):
    assert httpx.get(https_server.url_for("/health"), timeout=10).status_code == 200
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{https_server.port}/health", timeout=10)


def test_config_file_sets_flags_and_the_command_line_wins(https_server):
    models = httpx.get(llm_url(https_server, "/v1/models"), timeout=10).json()
    assert [card["id"] for card in models["data"]] == ["from-file", "second-name"]
    body = {"model": "second-name", "prompt": "hi", "max_tokens": 1}
    ok = httpx.post(llm_url(https_server, "/v1/completions"), json={**body, "logprobs": 4}, timeout=60)
    assert ok.status_code == 200, ok.text
    over = httpx.post(llm_url(https_server, "/v1/completions"), json={**body, "logprobs": 5}, timeout=60)
    assert over.status_code == 400 and "--max-logprobs" in over.json()["error"]["message"]


def test_root_path_serves_routes_with_and_without_the_prefix(https_server):
    assert httpx.get(https_server.url_for("/llm/v1/models/from-file"), timeout=10).status_code == 200
    assert httpx.get(https_server.url_for("/v1/models/from-file"), timeout=10).status_code == 200  # proxy-stripped
    schema = httpx.get(https_server.url_for("/llm/openapi.json"), timeout=10).json()
    assert schema["servers"] == [{"url": "/llm"}]


def test_swap_preemption_with_swap_space(https_server):
    """n=4 sequences of 200 tokens need ~52 blocks of the 16: preemption must happen, and swap."""
    body = {"prompt": [5, 6, 7], "n": 4, "max_tokens": 200, "ignore_eos": True, "temperature": 1.0, "seed": 1}
    response = httpx.post(llm_url(https_server, "/v1/completions"), json=body, timeout=300)
    assert response.status_code == 200, response.text
    assert [len(choice["text"]) > 0 for choice in response.json()["choices"]] == [True] * 4
    metrics = https_server.metrics()
    assert metrics[PREFIX + "num_swap_preemptions_total"] > 0
    info = httpx.get(https_server.url_for("/metrics"), timeout=10).text
    assert 'preemption_mode="swap"' in info and 'enable_prefix_caching="False"' in info
    assert int(re.search(r'num_cpu_blocks="(\d+)"', info).group(1)) > 0


def test_stats_line_and_one_log_format(https_server):
    httpx.post(llm_url(https_server, "/v1/completions"), json={"prompt": "hi", "max_tokens": 8}, timeout=60)
    deadline = time.monotonic() + 30
    while not re.search(STATS_LINE, https_server.log()) and time.monotonic() < deadline:
        time.sleep(0.2)
    log = https_server.log()
    assert re.search(LOG_LINE.format(level="INFO", tag="", logger=r"pagedllm\.stats") + STATS_LINE, log,
                     re.MULTILINE), log[-3000:]
    assert re.search(LOG_LINE.format(level="INFO", tag="", logger=r"pagedllm\.server") + "Serving .* on https://",
                     log, re.MULTILINE)
    assert re.search(LOG_LINE.format(level="INFO", tag=r"\[engine core\] ", logger=r"pagedllm\.engine\.\w+"), log,
                     re.MULTILINE)
    assert "Uvicorn running on" not in log  # --uvicorn-log-level warning (from the file) hides uvicorn's INFO lines


def test_uvicorn_lines_have_the_servers_format(server):
    """On the shared server (uvicorn at INFO): uvicorn's own lines go through the same handler and format."""
    assert re.search(LOG_LINE.format(level="INFO", tag="", logger=r"uvicorn\.error") + "Uvicorn running on",
                     server.log(), re.MULTILINE), server.log()[-3000:]


# ---- the app in process ----------------------------------------------------------------------------------------


def test_model_card_by_id(engine):
    client = TestClient(build_app(engine, serve_args("--served-model-name", "tiny", "org/with-slash")))
    card = client.get("/v1/models/org/with-slash")
    assert card.status_code == 200
    assert card.json()["id"] == "org/with-slash" and card.json()["object"] == "model"
    assert client.get("/v1/models/tiny").json()["max_model_len"] == ENGINE_KWARGS["max_model_len"]
    missing = client.get("/v1/models/nope")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found" and missing.json()["error"]["param"] == "model"


def test_model_card_route_is_documented(engine):
    schema = TestClient(build_app(engine, serve_args())).get("/openapi.json").json()
    ok = schema["paths"]["/v1/models/{model_id}"]["get"]["responses"]["200"]
    assert ok["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ModelCardOut"}


def test_docs_answer_that_they_are_off(engine):
    client = TestClient(build_app(engine, serve_args()))
    for path in ("/docs", "/redoc"):
        response = client.get(path)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "docs_disabled" and "/openapi.json" in response.text
    assert client.get("/openapi.json").status_code == 200


def test_root_path_in_process(engine):
    client = TestClient(build_app(engine, serve_args("--root-path", "/proxy")))
    assert client.get("/proxy/v1/models").status_code == 200
    assert client.get("/v1/models").status_code == 200
    assert client.get("/openapi.json").json()["servers"] == [{"url": "/proxy"}]


def test_disable_log_stats_starts_no_stats_logger(engine, monkeypatch):
    monkeypatch.setenv("PAGEDLLM_LOG_STATS_INTERVAL", "2.5")
    assert ServerConfig.from_args(serve_args(), engine).log_stats_interval_s == 2.5
    disabled = ServerConfig.from_args(serve_args("--disable-log-stats"), engine)
    assert disabled.log_stats_interval_s is None
    assert _start_stats_logger(engine, disabled.log_stats_interval_s) is None


# ---- flags, parsed -----------------------------------------------------------------------------------------------


def parse_serve(argv: list[str]) -> argparse.Namespace:
    parser = make_parser()
    args = parser.parse_args(argv)
    return _reparse_with_config_file(parser, argv, args) if args.config else args


def test_config_file_keys_with_dashes_or_underscores_lists_and_switches(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("port: 9001\nmax_model_len: 512\nserved-model-name: [a, b]\nenable_prefix_caching: false\n"
                      "disable-log-stats: true\nno-engine-core-process: true\nswap_space: 0.5\napi-key: null\n")
    args = parse_serve(["serve", "MODEL", "--config", str(config), "--port", "9002"])
    assert (args.model_tag, args.port, args.max_model_len, args.served_model_name) == ("MODEL", 9002, 512, ["a", "b"])
    assert args.enable_prefix_caching is False and args.disable_log_stats and args.engine_core_process is False
    assert args.swap_space == 0.5 and args.api_key is None


@pytest.mark.parametrize(("text", "message"), [
    ("bogus_key: 1\nport: 1\n", "unknown key(s) bogus_key"),
    ("config: other.yaml\n", "unknown key(s) config"),
    ("disable-log-stats: 3\n", "is a switch"),
    ("host: [a, b]\n", "takes one value"),
    ("- port\n", "expected a mapping"),
    ("port: [\n", "not valid YAML"),
    ("port: many\n", "a value above is invalid"),
])
def test_config_file_errors_name_the_file(tmp_path, capsys, text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    assert main(["serve", "--config", str(config)]) == 2
    error = capsys.readouterr().err
    assert message in error and str(config) in error


def test_swap_flags_reach_the_engine_config(server_model_dir):
    args = parse_serve(["serve", "--swap-space", "0.5", "--preemption-mode", "recompute", "--device", "cpu"])
    config = engine_args_from_cli(args, server_model_dir).create_engine_config()
    assert config.cache_config.swap_space_bytes == 2**29 and config.scheduler_config.preemption_mode == "recompute"
    no_space = parse_serve(["serve", "--preemption-mode", "swap", "--device", "cpu"])  # CPU: 0 GiB by default
    with pytest.raises(ValueError, match="needs CPU swap space"):
        engine_args_from_cli(no_space, server_model_dir).create_engine_config()


def test_ssl_files_are_checked_before_the_model_loads(server_model_dir, capsys, tmp_path):
    assert main(["serve", server_model_dir, "--ssl-keyfile", str(tmp_path / "key.pem")]) == 2
    assert "--ssl-keyfile needs --ssl-certfile" in capsys.readouterr().err
    assert main(["serve", server_model_dir, "--ssl-certfile", str(tmp_path / "missing.pem")]) == 2
    assert "no such file" in capsys.readouterr().err


# ---- the stats line ------------------------------------------------------------------------------------------------


class FakeMetrics:
    def __init__(self) -> None:
        self.values = {"prompt_tokens_total": 0, "generation_tokens_total": 0, "num_requests_running": 0,
                       "num_requests_waiting": 0, "kv_cache_usage_perc": 0.0, "prefix_cache_queries_total": 0,
                       "prefix_cache_hits_total": 0}

    def __call__(self) -> list[Metric]:
        return [Metric(PREFIX + name, "gauge", value) for name, value in self.values.items()]


def test_stats_line_reports_throughput_since_the_last_line_and_is_quiet_when_idle():
    metrics = FakeMetrics()
    stats = StatsLogger(metrics, interval_s=10)
    stats.next_line(100.0)
    assert stats.next_line(110.0) is None  # nothing ran: no line
    metrics.values.update(prompt_tokens_total=200, generation_tokens_total=50, num_requests_running=2,
                          kv_cache_usage_perc=0.25, prefix_cache_queries_total=200, prefix_cache_hits_total=50)
    assert stats.next_line(120.0) == ("Avg prompt throughput: 20.0 tokens/s, Avg generation throughput: 5.0 tokens/s, "
                                      "Running: 2 reqs, Waiting: 0 reqs, KV cache usage: 25.0%, "
                                      "Prefix cache hit rate: 25.0%")
    metrics.values.update(num_requests_running=0)
    assert stats.next_line(130.0) is None
