"""``pagedllm serve --config FILE.yaml``: a command's flags from a YAML file, as vLLM reads one.

Keys are flag names, with dashes or underscores (``max-model-len`` or ``max_model_len``); a value is what the flag
takes on the command line: a list for a flag of several values, true or false for a switch, null for the default.
The file's values become the command's defaults, so a flag given on the command line wins over the file. An
unknown key, or a value the flag refuses, is an error naming the file.
"""

from __future__ import annotations

import argparse
from typing import Any

import yaml

CONFIG_FLAG = "--config"


def apply_config_file(parser: argparse.ArgumentParser, path: str) -> None:
    """Make the flags of the file at ``path`` the defaults of ``parser``. The file's flags are parsed alone first, so
    that their types and choices are checked exactly as on the command line."""
    flags = config_file_flags(load_config_file(path), parser, path)
    argv = [part for _, parts in flags for part in parts]
    try:
        from_file = parser.parse_args(argv)
    except SystemExit:  # argparse has printed which flag and value it refused
        raise ValueError(f"{CONFIG_FLAG} {path}: a value above is invalid") from None
    parser.set_defaults(**{action.dest: getattr(from_file, action.dest) for action, _ in flags})


def load_config_file(path: str) -> dict[str, Any]:
    """The file's mapping of flag names to values (an empty file is an empty mapping)."""
    try:
        with open(path, encoding="utf-8") as file:
            values = yaml.safe_load(file)
    except OSError as exc:
        raise ValueError(f"{CONFIG_FLAG}: cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{CONFIG_FLAG} {path} is not valid YAML: {exc}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{CONFIG_FLAG} {path}: expected a mapping of flag names to values, "
                         f"got a {type(values).__name__}")
    return values


def config_file_flags(values: dict[str, Any], parser: argparse.ArgumentParser,
                      path: str) -> list[tuple[argparse.Action, list[str]]]:
    """Each key of the file as (the flag's action, its command-line words); every unknown key is named at once."""
    options = parser._option_string_actions  # noqa: SLF001 - argparse has no public table of its flags
    flags, unknown = [], []
    for key, value in values.items():
        flag = "--" + str(key).replace("_", "-")
        action = options.get(flag)
        if action is None or action.dest in ("help", "config"):
            unknown.append(str(key))
        elif value is not None:
            flags.append((action, _command_line_words(flag, action, value, path)))
    if unknown:
        raise ValueError(f"{CONFIG_FLAG} {path}: unknown key(s) {', '.join(unknown)}: not flags of this command "
                         "(see --help)")
    return flags


def _command_line_words(flag: str, action: argparse.Action, value: Any, path: str) -> list[str]:
    if action.nargs == 0:  # a switch: store_true, store_false, --x/--no-x
        return _switch_words(flag, action, value, path)
    if isinstance(value, list):
        if action.nargs not in ("+", "*"):
            raise ValueError(f"{CONFIG_FLAG} {path}: {flag} takes one value, got a list")
        return [flag, *map(str, value)]
    return [flag, str(value)]


def _switch_words(flag: str, action: argparse.Action, value: Any, path: str) -> list[str]:
    if not isinstance(value, bool):
        raise ValueError(f"{CONFIG_FLAG} {path}: {flag} is a switch: true or false, got {value!r}")
    if value:
        return [flag]
    if isinstance(action, argparse.BooleanOptionalAction):  # false turns the pair's other half on
        return [flag.replace("--no-", "--", 1) if flag.startswith("--no-") else "--no-" + flag[2:]]
    return []  # a plain switch left off: its default
