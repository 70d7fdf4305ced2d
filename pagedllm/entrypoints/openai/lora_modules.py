"""The LoRA adapters a server answers to by name: those of ``--lora-modules`` and, when
``PAGEDLLM_ALLOW_RUNTIME_LORA_UPDATING`` is set, those loaded and unloaded at run time (``/v1/load_lora_adapter``,
``/v1/unload_lora_adapter``, as vLLM's).

A request's ``model`` picks the adapter. Every adapter is validated against the base model when it is added (a bad
one is a 400 and the server goes on serving) and gets a fresh integer id, so a name loaded again after an unload
never meets the old weights in the engine's caches. Unloading stops new requests at once: those already running keep
their adapter to the end, then the engine's workers drop its weights (``EngineCore.remove_lora``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus

from pagedllm.entrypoints.openai.errors import OpenAIError, quote_bounded
from pagedllm.entrypoints.openai.protocol import RequestModel
from pagedllm.lora.request import LoRARequest


@dataclass(frozen=True)
class LoRAModulePath:
    """One ``--lora-modules`` entry: ``name=path`` or ``{"name": ..., "path": ..., "base_model_name": ...}``."""

    name: str
    path: str
    base_model_name: str | None = None


def parse_lora_module(text: str) -> LoRAModulePath:
    """``name=path`` or the JSON form; ValueError (argparse shows it) on anything else."""
    text = text.strip()
    if text.startswith("{"):
        try:
            entry = json.loads(text)
            return LoRAModulePath(str(entry["name"]), str(entry["path"]), entry.get("base_model_name"))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"--lora-modules JSON needs 'name' and 'path': {text!r} ({exc})") from None
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--lora-modules takes name=path or JSON, got {text!r}")
    return LoRAModulePath(name, path)


class LoadLoRAAdapterRequest(RequestModel):
    """``POST /v1/load_lora_adapter``."""

    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(RequestModel):
    """``POST /v1/unload_lora_adapter`` (``lora_int_id`` is accepted as vLLM's and ignored: names identify)."""

    lora_name: str
    lora_int_id: int | None = None


class ServedLoRAs:
    """Adapter name -> ``LoRARequest``; ``validate`` raises ValueError for an adapter the engine cannot serve."""

    def __init__(self, validate: Callable[[LoRARequest], object], reserved_names: tuple[str, ...]) -> None:
        self._validate = validate
        self._reserved = reserved_names  # the base model's served names
        self._adapters: dict[str, LoRARequest] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # add() runs on worker threads (validation reads files)

    def get(self, name: str | None) -> LoRARequest | None:
        return None if name is None else self._adapters.get(name)

    def all(self) -> list[LoRARequest]:
        return list(self._adapters.values())

    def add(self, name: str, path: str, base_model_name: str | None = None) -> LoRARequest:
        """Validate and register an adapter; OpenAIError 400 on a taken name or a bad adapter."""
        with self._lock:
            if name in self._adapters or name in self._reserved:
                raise OpenAIError(f"The lora adapter '{quote_bounded(name)}' has already been loaded.",
                                  param="lora_name", code="lora_adapter_exists")
            try:
                request = LoRARequest(name, next(self._ids), path, base_model_name)
                self._validate(request)
            except ValueError as exc:
                raise OpenAIError(str(exc), param="lora_path", code="invalid_lora_adapter") from None
            self._adapters[name] = request
            return request

    async def add_off_loop(self, name: str, path: str) -> LoRARequest:
        return await asyncio.to_thread(self.add, name, path)

    def remove(self, name: str) -> LoRARequest:
        """Stop serving ``name`` (running requests finish with it); OpenAIError 404 for an unknown name."""
        with self._lock:
            request = self._adapters.pop(name, None)
        if request is None:
            raise OpenAIError(f"The lora adapter '{quote_bounded(name)}' cannot be found.", HTTPStatus.NOT_FOUND,
                              param="lora_name", code="lora_adapter_not_found")
        return request
