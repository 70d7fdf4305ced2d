"""The front end's check of a request's adapter, before anything is queued: LoRA enabled, a well-formed
``LoRARequest``, one id naming one adapter, and the adapter itself loadable over this base model (read once per id,
so a bad adapter is a clear ValueError for its request and never reaches the engine core)."""

from __future__ import annotations

import threading

from pagedllm.config import LoRAConfig, ModelConfig
from pagedllm.lora.adapter import load_adapter
from pagedllm.lora.request import LoRARequest


class LoRARequestValidator:
    """Remembers the adapters already checked (id -> (name, path)), so a request pays for the check once."""

    def __init__(self, model_config: ModelConfig, lora_config: LoRAConfig | None) -> None:
        self.model_config = model_config
        self.lora_config = lora_config
        self._checked: dict[int, tuple[str, str]] = {}
        self._lock = threading.Lock()  # the event loop and worker threads may check at once

    def check(self, lora_request: object) -> LoRARequest | None:
        """The request's adapter, validated; ValueError (or TypeError) naming what is wrong."""
        if lora_request is None:
            return None
        if not isinstance(lora_request, LoRARequest):
            raise TypeError(f"lora_request must be a LoRARequest, got {type(lora_request).__name__}")
        if self.lora_config is None:
            raise ValueError("LoRA is not enabled on this engine: pass enable_lora=True (server: --enable-lora)")
        identity = (lora_request.lora_name, lora_request.lora_path)
        with self._lock:
            known = self._checked.get(lora_request.lora_int_id)
            if known == identity:
                return lora_request
            if known is not None:
                raise ValueError(f"lora_int_id {lora_request.lora_int_id} already names adapter {known[0]!r} "
                                 f"({known[1]}); each adapter needs its own id")
            load_adapter(lora_request.lora_path, lora_request.lora_name, lora_request.lora_int_id,
                         self.model_config, self.lora_config.max_lora_rank)
            self._checked[lora_request.lora_int_id] = identity
        return lora_request

    def forget(self, lora_int_id: int) -> None:
        """An unloaded adapter: its id may name another adapter later."""
        with self._lock:
            self._checked.pop(lora_int_id, None)
