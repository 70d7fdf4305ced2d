"""Every bench subcommand end to end on CPU with a tiny model, through the same entry point as the CLI."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys

import pytest

from pagedllm.bench.cli import add_bench_parser, main
from pagedllm.bench.record import RECORD_FIELDS
from pagedllm.bench.workloads import load_workload, nano_workload
from tests.bench.fake_openai_server import MODEL_NAME, FakeOpenAIServer

FIGURES = ("num_requests", "prompt_tokens", "output_tokens", "elapsed_s", "requests_per_s", "output_tokens_per_s",
           "total_tokens_per_s")


def _run(argv: list[str], path) -> dict:
    assert main([*argv, "--output-json", str(path)]) == 0
    record = json.loads(path.read_text())
    missing = [field for field in RECORD_FIELDS if field not in record]
    assert not missing, f"record lacks {missing}"
    assert record["elapsed_s"] > 0 and record["output_tokens_per_s"] > 0
    assert record["output_tokens_per_s"] == pytest.approx(record["output_tokens"] / record["elapsed_s"])
    return record


@pytest.mark.slow
def test_throughput_with_hf_baselines(bench_model_dir, tmp_path):
    record = _run(["throughput", "--model", bench_model_dir, "--workload", "random", "--num-prompts", "3",
                   "--input-len", "12", "--output-len", "5", "--compare", "hf", "--disable-tqdm"],
                  tmp_path / "throughput.json")
    assert (record["bench"], record["engine"], record["device"]) == ("throughput", "pagedllm", "cpu")
    assert (record["num_requests"], record["prompt_tokens"], record["output_tokens"]) == (3, 36, 15)
    assert record["workload"]["name"] == "random" and record["config"]["dtype"] == "float32"
    assert record["versions"]["torch"] and record["versions"]["transformers"]
    assert 0 < record["peak_kv_cache_usage"] <= 1 and record["num_preemptions"] == 0
    assert record["roofline"]["output_tokens_per_s"] > 0 and 0 < record["roofline_fraction"]
    assert set(record["baselines"]) == {"hf-static", "hf-continuous"}
    for name, baseline in record["baselines"].items():
        assert baseline["engine"] == name
        assert all(baseline[f] > 0 for f in FIGURES)
        assert (baseline["prompt_tokens"], baseline["output_tokens"]) == (36, 15)
        assert baseline["computed_output_tokens"] == 15 and baseline["roofline_fraction"] > 0


def test_throughput_nano_prefix(bench_model_dir, tmp_path):
    record = _run(["throughput", "--model", bench_model_dir, "--workload", "nano", "--limit", "1",
                   "--save-workload", str(tmp_path / "nano.json"), "--disable-tqdm"], tmp_path / "nano-record.json")
    first = nano_workload().requests[0]
    assert (record["prompt_tokens"], record["output_tokens"]) == (964, 845) == (len(first.prompt_token_ids),
                                                                                 first.max_tokens)
    assert record["workload"]["params"]["limit"] == 1 and record["workload"]["temperature"] == 0.6
    assert load_workload(tmp_path / "nano.json").requests == [first]


def test_throughput_on_cpu_sizes_the_context_to_the_workload(bench_model_dir, tmp_path):
    # 8 blocks of 16 tokens cannot hold the model's 2048-token context: the engine would refuse to start. The bench
    # sizes the context to the workload's longest request (at least 64 tokens, for the warm-ups) instead.
    record = _run(["throughput", "--model", bench_model_dir, "--workload", "random", "--num-prompts", "2",
                   "--input-len", "12", "--output-len", "5", "--num-gpu-blocks-override", "8", "--disable-tqdm"],
                  tmp_path / "fit.json")
    assert record["config"]["max_model_len"] == 64 and record["output_tokens"] == 10


@pytest.mark.slow
def test_latency_with_hf_generate(bench_model_dir, tmp_path):
    record = _run(["latency", "--model", bench_model_dir, "--batch-size", "2", "--input-len", "8", "--output-len",
                   "4", "--num-iters-warmup", "1", "--num-iters", "2", "--compare", "hf-static"],
                  tmp_path / "latency.json")
    assert record["bench"] == "latency" and record["num_requests"] == 2 and record["output_tokens"] == 8
    assert len(record["latency"]["all_s"]) == 2 and record["latency"]["p99_s"] >= record["latency"]["p50_s"]
    assert record["elapsed_s"] == pytest.approx(record["latency"]["mean_s"])
    # The decode step is the requests' own time per output token (their token timestamps): never negative, even
    # on a busy machine where a difference of two runs' means could be.
    assert record["prefill_latency"]["mean_s"] > 0 and record["decode_step_ms"] >= 0
    assert record["roofline"]["decode_step_ms"] > 0
    assert record["roofline_fraction"] is None or record["roofline_fraction"] > 0  # None for a step of 0 ms
    baseline = record["baselines"]["hf-static"]
    assert len(baseline["iteration_s"]) == 2 and baseline["batch_size"] == 2
    assert baseline["latency"]["mean_s"] == pytest.approx(baseline["elapsed_s"])
    assert (baseline["output_tokens"], baseline["computed_output_tokens"]) == (8, 8)


def test_failed_baseline_is_reported_not_fatal(bench_model_dir, tmp_path, monkeypatch, capsys):
    def fail(name, *args, **kwargs):
        raise RuntimeError(f"Baseline {name} failed (exit code 1)")

    monkeypatch.setattr("pagedllm.bench.common.run_baseline", fail)
    record = _run(["throughput", "--model", bench_model_dir, "--workload", "random", "--num-prompts", "2",
                   "--input-len", "4", "--output-len", "2", "--compare", "hf-static", "--disable-tqdm"],
                  tmp_path / "t.json")
    assert record["baselines"] == {"hf-static": {"engine": "hf-static", "error": "Baseline hf-static failed (exit "
                                                                                  "code 1)"}}
    assert "pagedllm" in capsys.readouterr().out


@pytest.fixture
def fake_server():
    server = FakeOpenAIServer(fail_max_tokens=frozenset({13}))
    yield server
    server.close()


def test_serve_token_ids_poisson_concurrency_goodput(fake_server, tmp_path):
    record = _run(["serve", "--base-url", fake_server.base_url, "--workload", "random", "--num-prompts", "12",
                   "--input-len", "6", "--output-len", "5", "--request-rate", "200", "--max-concurrency", "4",
                   "--goodput", "ttft:5000", "tpot:5000", "--label", "fake", "--disable-tqdm"],
                  tmp_path / "serve.json")
    assert (record["bench"], record["engine"], record["model"]) == ("serve", "fake", MODEL_NAME)
    assert (record["num_requests"], record["prompt_tokens"], record["output_tokens"]) == (12, 72, 60)
    metrics = record["metrics"]
    assert metrics["completed"] == 12 and metrics["failed"] == 0 and metrics["good_requests"] == 12
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        assert set(metrics[name]) == {"mean", "median", "std", "p99"}
        assert metrics[name]["mean"] > 0
    assert metrics["e2el_ms"]["mean"] >= metrics["ttft_ms"]["mean"]
    assert record["request_rate"] == 200 and record["max_concurrency"] == 4
    sent = fake_server.requests
    assert len(sent) == 12 and all(isinstance(r["prompt"], list) and len(r["prompt"]) == 6 for r in sent)
    assert all(r["stream"] and r["ignore_eos"] and r["max_tokens"] == 5 and r["model"] == MODEL_NAME for r in sent)


@pytest.mark.slow  # spawns client processes (~10 s on 2 cores)
def test_serve_from_several_client_processes(fake_server, tmp_path, capsys):
    """--num-clients 3: every request sent once, by the client processes, all answered, same totals as one client;
    --max-concurrency is split between them."""
    argv = ["serve", "--base-url", fake_server.base_url, "--workload", "random", "--num-prompts", "10",
            "--input-len", "6", "--output-len", "5", "--disable-tqdm"]
    record = _run([*argv, "--num-clients", "3", "--max-concurrency", "6"], tmp_path / "three.json")
    assert record["config"]["num_clients"] == 3
    assert (record["num_requests"], record["prompt_tokens"], record["output_tokens"]) == (10, 60, 50)
    assert record["metrics"]["completed"] == 10 and record["metrics"]["failed"] == 0
    single = _run([*argv, "--num-clients", "1"], tmp_path / "one.json")
    assert single["output_tokens"] == record["output_tokens"]
    sent = [r["prompt"] for r in fake_server.requests]
    assert len(sent) == 20 and sorted(sent[:10]) == sorted(sent[10:])  # the same requests, each sent once
    assert main([*argv, "--num-clients", "4", "--max-concurrency", "6"]) == 2
    few = _run([*argv[:argv.index("--num-prompts") + 1], "2", *argv[argv.index("--num-prompts") + 2:],
                "--num-clients", "3"], tmp_path / "few.json")  # more clients than requests: none starts empty-handed
    assert few["metrics"]["completed"] == 2
    assert "--max-concurrency 6 is not a multiple of --num-clients 4" in capsys.readouterr().err


def test_arrival_offsets_are_a_poisson_schedule_or_all_at_once():
    from pagedllm.bench.serve import arrival_offsets

    assert arrival_offsets(4, math.inf, 0) == [0.0] * 4
    offsets = arrival_offsets(2000, 100.0, 1)
    assert offsets[0] == 0.0 and offsets == sorted(offsets)
    assert offsets[-1] / 1999 == pytest.approx(0.01, rel=0.1)  # mean gap 1 / rate
    assert offsets == arrival_offsets(2000, 100.0, 1)  # seeded


def test_serve_text_prompts_and_failed_requests(fake_server, tmp_path):
    # Every request asks for 13 tokens, which the fake server answers with HTTP 500: reported, and exit code 1.
    assert main(["serve", "--base-url", fake_server.base_url, "--model", MODEL_NAME, "--workload", "random",
                 "--num-prompts", "3", "--input-len", "4", "--output-len", "13", "--prompt-format", "text",
                 "--disable-tqdm", "--output-json", str(tmp_path / "failed.json")]) == 1
    failed = json.loads((tmp_path / "failed.json").read_text())
    assert failed["metrics"]["failed"] == 3 and failed["num_requests"] == 0 and "HTTP 500" in failed["errors"][0]
    assert all(isinstance(r["prompt"], str) and len(r["prompt"].split()) == 4 for r in fake_server.requests)
    record = _run(["serve", "--base-url", fake_server.base_url, "--workload", "sharegpt-like", "--num-prompts", "4",
                   "--prompt-format", "text", "--disable-tqdm"], tmp_path / "serve-text.json")
    assert record["metrics"]["completed"] == 4 and record["workload"]["name"] == "sharegpt-like"


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    base = {"engine": "pagedllm", "model": "m", "device": "cpu", "workload": {"name": "nano"},
            "output_tokens_per_s": 100.0}
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "t.json").write_text(json.dumps(
        {**base, "bench": "throughput", "baselines": {"hf-static": {"output_tokens_per_s": 50.0}}}))
    summary = {"mean": 1.0, "median": 1.0, "std": 0.0, "p99": 2.0}
    for rate in (1.0, float("inf")):
        (tmp_path / "records" / f"s{rate}.json").write_text(json.dumps(
            {**base, "bench": "serve", "request_rate": rate,
             "metrics": {key: summary for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")}}))
    (tmp_path / "records" / "other.json").write_text("[1, 2]")  # not a record: skipped
    out = tmp_path / "plots"
    assert main(["plot", str(tmp_path / "records"), "--output-dir", str(out),
                 "--output-json", str(tmp_path / "plot.json")]) == 0
    for name in ("throughput.png", "serving.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(json.loads((tmp_path / "plot.json").read_text())["records"]) == 3


def test_add_bench_parser_plugs_into_a_cli():
    parser = argparse.ArgumentParser(prog="pagedllm")
    add_bench_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "latency", "--model", "llama-3.1-8b", "--batch-size", "1"])
    assert callable(args.func) and args.batch_size == 1 and args.model == "llama-3.1-8b"
    args = parser.parse_args(["bench", "throughput", "--compare", "hf", "--limit", "8"])
    assert args.compare == ["hf"] and args.limit == 8 and args.workload == "nano"
    assert parser.parse_args(["bench"]).func(parser.parse_args(["bench"])) == 2  # no subcommand: help
    bench = parser._subparsers._group_actions[0].choices["bench"]
    for sub in bench._subparsers._group_actions[0].choices.values():
        for action in sub._actions:
            assert action.help, f"{sub.prog} {action.option_strings or action.dest} has no help text"


def test_module_entry_point_help():
    done = subprocess.run([sys.executable, "-m", "pagedllm.bench", "serve", "--help"], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0 and "--request-rate" in done.stdout and "--goodput" in done.stdout


def test_warm_up_reads_every_adapter_once_before_the_timed_run(monkeypatch):
    """With adapters, the warm-up sends one request per distinct adapter (so each is read from disk into the CPU
    cache untimed), at least ``num_requests`` in all."""
    from pagedllm.bench import engine_runner
    from pagedllm.bench.workloads import BenchRequest, Workload
    from pagedllm.lora.request import LoRARequest

    seen = []
    monkeypatch.setattr(engine_runner, "run_workload",
                        lambda llm, workload, lora_requests=None: seen.append((workload, lora_requests))
                        or argparse.Namespace(elapsed_s=0.0))
    workload = Workload("random", [BenchRequest([5, 6, 7], 4)] * 6, 0.0, True)
    adapters = [LoRARequest(f"a{i}", i + 1, f"/adapters/{i}") for i in range(3)]
    engine_runner.warm_up(None, workload, lora_requests=adapters * 2)
    engine_runner.warm_up(None, workload)
    (with_loras, loras), (plain, no_loras) = seen
    assert [r.lora_int_id for r in loras] == [1, 2, 3] and len(with_loras.requests) == 3
    assert no_loras is None and len(plain.requests) == 2
