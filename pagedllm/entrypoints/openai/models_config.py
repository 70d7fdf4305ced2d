"""``pagedllm serve --models-config models.yaml``: several models in one server, each with its own engine settings.

::

    models:
      - model: /models/llama-3.1-8b
        served_model_name: [llama, llama-3.1-8b]
        gpu_memory_utilization: 0.45
        max_model_len: 8192
      - model: /models/qwen3-8b
        served_model_name: qwen
        gpu_memory_utilization: 0.45
    aliases:
      chat: {llama: 90, qwen: 10}

A model's keys are ``pagedllm serve`` flags (as in ``--config``: dashes or underscores, a list for a flag of several
values, true/false for a switch); ``model`` is required. The command line's flags are every model's defaults, so a
flag shared by all goes there. Flags that concern the whole server (host, port, keys, TLS, admission control, ...)
are refused in a model's entry: they have one value per server. An alias maps its name to target served names and
weights (see ``model_router.py``).

``pagedllm serve --model A --model NAME=B`` is the short form: those models with the command line's flags and no
aliases (``models_from_flags``).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pagedllm.entrypoints.config_file import config_file_flags, load_config_file

MODELS_CONFIG_FLAG = "--models-config"
# One value per server: a model's entry may not set them (the command line or --config does).
SERVER_WIDE_FLAGS = frozenset({
    "host", "port", "api_key", "admin_api_key", "require_api_key_for_metrics", "allowed_origins", "root_path",
    "ssl_keyfile", "ssl_certfile", "log_level", "uvicorn_log_level", "disable_access_log", "timeout_keep_alive",
    "timeout_request_read", "graceful_shutdown_timeout", "max_num_waiting", "max_queue_delay_ms",
    "max_request_body_bytes", "models_config", "config", "model_tag",
})


@dataclass(frozen=True)
class ModelSpec:
    """One model of the server: its served names (the first is reported in responses) and its full ``serve``
    flags (the command line's, overridden by the model's entry)."""

    names: tuple[str, ...]
    model: str
    args: argparse.Namespace

    @property
    def name(self) -> str:
        return self.names[0]


@dataclass(frozen=True)
class ModelsConfig:
    """The models of a ``--models-config`` file, in order (the first answers requests that name no model), and the
    aliases as {alias: {target served name: weight}}."""

    models: tuple[ModelSpec, ...]
    aliases: dict[str, dict[str, float]]


def load_models_config(path: str, base_args: argparse.Namespace) -> ModelsConfig:
    """Read and check the file at ``path``; ``base_args`` (the command line) gives every model's defaults."""
    values = load_config_file(path)
    unknown = set(values) - {"models", "aliases"}
    if unknown:
        raise ValueError(f"{MODELS_CONFIG_FLAG} {path}: unknown key(s) {', '.join(sorted(map(str, unknown)))} "
                         "(expected: models, aliases)")
    entries = values.get("models")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{MODELS_CONFIG_FLAG} {path}: 'models' must be a non-empty list of models")
    models = tuple(model_spec(entry, base_args, f"{path}: models[{i}]") for i, entry in enumerate(entries))
    aliases = _aliases(values.get("aliases") or {}, path)
    check_unique_names(models, aliases, f"{MODELS_CONFIG_FLAG} {path}")
    _check_alias_targets(models, aliases, path)
    return ModelsConfig(models, aliases)


def models_from_flags(values: list[str], base_args: argparse.Namespace) -> ModelsConfig:
    """Several ``--model [NAME=]MODEL`` flags as a models file listing them with the command line's flags. Each
    engine sizes its KV cache from its own fraction of the GPU's memory, so the command line's
    ``--gpu-memory-utilization`` is split evenly between them (at 0.9 each, the second would find no memory)."""
    share = base_args.gpu_memory_utilization / len(values)
    models = tuple(model_spec({**_model_flag_entry(value), "gpu_memory_utilization": share}, base_args,
                              f"--model {value}") for value in values)
    check_unique_names(models, (), "--model (NAME=MODEL gives a model a name of its own)")
    return ModelsConfig(models, {})


def _model_flag_entry(value: str) -> dict[str, str]:
    """``NAME=MODEL``: that model under that served name; a value without '=' (or a path that exists) is the model."""
    name, sep, model = value.partition("=")
    if not sep or os.path.exists(value):
        return {"model": value}
    if not name or not model:
        raise ValueError(f"--model {value}: expected MODEL or NAME=MODEL")
    return {"model": model, "served_model_name": name}


def model_spec(entry: Any, base_args: argparse.Namespace, where: str) -> ModelSpec:
    """One model's entry (of the file, or of a load request of the admin API) as a ModelSpec; ValueError naming
    ``where`` for a bad entry."""
    if not isinstance(entry, dict) or not entry.get("model"):
        raise ValueError(f"{where}: expected a mapping with at least 'model' (the model's path or hub id)")
    parser = _model_parser(base_args)
    refused = sorted(str(key) for key in entry if str(key).replace("-", "_") in SERVER_WIDE_FLAGS)
    if refused:
        raise ValueError(f"{where}: {', '.join(refused)} concern(s) the whole server: set on the command line")
    flags = config_file_flags(entry, parser, where)
    try:
        args = parser.parse_args([word for _, words in flags for word in words])
    except SystemExit:  # argparse has printed which flag and value it refused
        raise ValueError(f"{where}: a value above is invalid") from None
    args.model_name = args.model
    return ModelSpec(tuple(args.served_model_name or [args.model]), args.model, args)


def _model_parser(base_args: argparse.Namespace) -> argparse.ArgumentParser:
    """``serve``'s parser with the command line's values as defaults; exit_on_error off where argparse allows."""
    from pagedllm.entrypoints.openai.cli_args import add_serve_args

    parser = argparse.ArgumentParser(prog="pagedllm serve (a model of --models-config)", add_help=False)
    add_serve_args(parser)
    parser.set_defaults(**{key: value for key, value in vars(base_args).items() if key not in ("model", "model_tag")})
    parser.set_defaults(model=None, model_tag=None, model_flags=None, served_model_name=None, config=None,
                        models_config=None)
    return parser


def _aliases(values: Any, path: str) -> dict[str, dict[str, float]]:
    if not isinstance(values, dict):
        raise ValueError(f"{MODELS_CONFIG_FLAG} {path}: 'aliases' must map alias names to {{model: weight}}")
    return {str(name): _alias_weights(name, weights, path) for name, weights in values.items()}


def _alias_weights(name: Any, weights: Any, path: str) -> dict[str, float]:
    where = f"{MODELS_CONFIG_FLAG} {path}: alias {name}"
    if not isinstance(weights, dict) or not weights:
        raise ValueError(f"{where}: expected a non-empty mapping of served model names to weights")
    bad = [str(target) for target, weight in weights.items()
           if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0]
    if bad:
        raise ValueError(f"{where}: the weights of {', '.join(bad)} must be positive numbers")
    return {str(target): float(weight) for target, weight in weights.items()}


def check_unique_names(models: tuple[ModelSpec, ...], aliases: Iterable[str], where: str) -> None:
    """Every served name and alias names one thing (``where`` starts the error message)."""
    seen: set[str] = set()
    for name in [*(name for spec in models for name in spec.names), *aliases]:
        if name in seen:
            raise ValueError(f"{where}: the name {name!r} is given twice (served model names "
                             "and aliases must be unique)")
        seen.add(name)


def _check_alias_targets(models: tuple[ModelSpec, ...], aliases: dict[str, dict[str, float]], path: str) -> None:
    """Every alias target is a served name of the file (the admin API may unload it later: then it is skipped)."""
    served = {name for spec in models for name in spec.names}
    for alias, weights in aliases.items():
        missing = sorted(set(weights) - served)
        if missing:
            raise ValueError(f"{MODELS_CONFIG_FLAG} {path}: alias {alias} names {', '.join(missing)}, which no "
                             "model serves")
