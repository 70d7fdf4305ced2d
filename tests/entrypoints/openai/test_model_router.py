"""Weighted aliases (model_router.py), the --models-config file and repeated --model flags (models_config.py),
without a server."""

from __future__ import annotations

import argparse
from collections import Counter

import pytest

from pagedllm.entrypoints.cli import main
from pagedllm.entrypoints.openai.cli_args import add_serve_args, repeated_models
from pagedllm.entrypoints.openai.model_router import AliasRouter, sticky_point
from pagedllm.entrypoints.openai.models_config import load_models_config, model_spec, models_from_flags

WEIGHTS = {"a": 90, "b": 10}


def _shares(choices: list[str]) -> dict[str, float]:
    counts = Counter(choices)
    return {target: counts[target] / len(choices) for target in WEIGHTS}


def test_1000_decisions_without_user_split_within_3_percent_of_the_weights():
    router = AliasRouter({"chat": WEIGHTS}, seed=0)
    shares = _shares([router.resolve("chat", None) for _ in range(1000)])
    assert shares["a"] == pytest.approx(0.9, abs=0.03) and shares["b"] == pytest.approx(0.1, abs=0.03)


@pytest.mark.parametrize("seed", range(5))
def test_every_run_of_1000_decisions_without_user_is_within_1_percent(seed):
    router = AliasRouter({"chat": {"a": 30, "b": 50, "c": 20}}, seed=seed)
    for _ in range(3):  # consecutive windows, not only the first
        counts = Counter(router.resolve("chat", None) for _ in range(1000))
        for target, weight in (("a", 0.3), ("b", 0.5), ("c", 0.2)):
            assert counts[target] / 1000 == pytest.approx(weight, abs=0.01)


def test_users_split_within_3_percent_of_the_weights():
    # Sticky choices are a hash per user: as random as independent draws. 10,000 users put 3% at ~6 standard
    # deviations of a 50/50 split (1,000 users would put it at ~2: a split that strays further is not a bug).
    router = AliasRouter({"chat": {"a": 30, "b": 50, "c": 20}}, seed=0)
    counts = Counter(router.resolve("chat", f"user-{i}") for i in range(10_000))
    for target, weight in (("a", 0.3), ("b", 0.5), ("c", 0.2)):
        assert counts[target] / 10_000 == pytest.approx(weight, abs=0.03)


def test_a_user_always_gets_the_same_target_and_the_seed_fixes_the_rest():
    first, second = AliasRouter({"chat": WEIGHTS}, seed=1), AliasRouter({"chat": WEIGHTS}, seed=1)
    for i in range(50):
        picks = {first.resolve("chat", f"u{i}") for _ in range(5)} | {second.resolve("chat", f"u{i}")}
        assert len(picks) == 1
    assert [first.resolve("chat", None) for _ in range(20)] == [second.resolve("chat", None) for _ in range(20)]
    assert 0 <= sticky_point("chat", "x") < 1 and sticky_point("chat", "x") != sticky_point("other", "x")


def test_targets_that_do_not_serve_are_left_out():
    router = AliasRouter({"chat": WEIGHTS})
    assert {router.resolve("chat", f"u{i}", lambda name: name == "b") for i in range(100)} == {"b"}
    assert router.resolve("chat", "u", lambda name: False) is None
    with pytest.raises(KeyError):
        router.resolve("nope", None)


# ---- the file ----------------------------------------------------------------------------------------------------


def _base_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    return parser.parse_args(list(argv))


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "models.yaml"
    path.write_text(text)
    return str(path)


def test_each_model_gets_the_command_line_flags_overridden_by_its_own(tmp_path):
    path = _write(tmp_path, """
models:
  - model: /m/a
    served_model_name: [a, a2]
    max_model_len: 512
  - model: /m/b
    gpu-memory-utilization: 0.4
    dtype: bfloat16
aliases:
  chat: {a2: 3, /m/b: 1}
""")
    config = load_models_config(path, _base_args("--max-model-len", "1024", "--device", "cpu", "--port", "9000"))
    first, second = config.models
    assert first.names == ("a", "a2") and first.args.max_model_len == 512 and first.args.device == "cpu"
    assert second.names == ("/m/b",) and second.args.max_model_len == 1024 and second.args.dtype == "bfloat16"
    assert second.args.gpu_memory_utilization == 0.4 and first.args.gpu_memory_utilization == 0.9
    assert config.aliases == {"chat": {"a2": 3.0, "/m/b": 1.0}}


@pytest.mark.parametrize("text, message", [
    ("models: []", "non-empty list"),
    ("models: [{served_model_name: x}]", "at least 'model'"),
    ("models: [{model: /a, port: 1}]", "whole server"),
    ("models: [{model: /a, no_such_flag: 1}]", "unknown key"),
    ("models: [{model: /a, served_model_name: x}, {model: /b, served_model_name: x}]", "given twice"),
    ("models: [{model: /a}]\naliases: {c: {/b: 1}}", "which no model serves"),
    ("models: [{model: /a}]\naliases: {c: {/a: 0}}", "positive numbers"),
    ("models: [{model: /a}]\nother: 1", "unknown key"),
])
def test_bad_files_are_refused_with_the_reason(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        load_models_config(_write(tmp_path, text), _base_args())


def test_a_load_request_entry_is_parsed_like_a_file_entry():
    spec = model_spec({"model": "/m/c", "served_model_name": "c", "max_num_seqs": 4}, _base_args(), "load")
    assert spec.name == "c" and spec.args.max_num_seqs == 4 and spec.args.model_name == "/m/c"


# ---- repeated --model --------------------------------------------------------------------------------------------


def test_repeated_model_flags_are_a_models_file_with_the_command_line_flags():
    args = _base_args("--model", "a=/m/a", "--model", "/m/b", "--max-model-len", "512",
                      "--gpu-memory-utilization", "0.8")
    assert repeated_models(args) == ["a=/m/a", "/m/b"]
    config = models_from_flags(repeated_models(args), args)
    assert [(spec.names, spec.model) for spec in config.models] == [(("a",), "/m/a"), (("/m/b",), "/m/b")]
    assert all(spec.args.max_model_len == 512 for spec in config.models)
    assert all(spec.args.gpu_memory_utilization == pytest.approx(0.4) for spec in config.models)  # an even split
    assert config.aliases == {}


def test_one_model_flag_is_one_model_as_before():
    args = _base_args("--model", "/m/a")
    assert args.model == "/m/a" and repeated_models(args) == []


def test_an_existing_path_with_an_equals_sign_is_a_model_not_a_name(tmp_path):
    model_dir = tmp_path / "run=3"
    model_dir.mkdir()
    config = models_from_flags([str(model_dir), "/m/b"], _base_args())
    assert config.models[0].model == str(model_dir) and config.models[0].names == (str(model_dir),)


@pytest.mark.parametrize("argv, message", [
    (["--model", "/m/a", "--model", "/m/a"], "'/m/a' is given twice"),
    (["--model", "x=/m/a", "--model", "x=/m/b"], "'x' is given twice"),
    (["--model", "=/m/a", "--model", "/m/b"], "expected MODEL or NAME=MODEL"),
    (["--models-config", "models.yaml", "--model", "/m/a", "--model", "/m/b"], "--models-config lists the models"),
    (["/m/c", "--model", "/m/a", "--model", "/m/b"], "no positional MODEL"),
    (["--served-model-name", "x", "--model", "/m/a", "--model", "/m/b"], "--model NAME=MODEL"),
])
def test_serve_refuses_bad_repeated_model_flags_before_loading(argv, message, capsys):
    assert main(["serve", *argv]) == 2
    assert message in capsys.readouterr().err
