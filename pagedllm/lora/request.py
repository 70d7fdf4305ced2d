"""``LoRARequest``: which adapter a request runs with, as vLLM's (``LoRARequest(lora_name, lora_int_id, lora_path)``).

Plain data (a msgspec Struct): it travels from the front end to the engine core and on to the worker unchanged.
``lora_int_id`` (>= 1) is the adapter's identity everywhere below the front end: slots, the CPU cache and the prefix
cache's block hashes are keyed by it, so one id must always name the same adapter files.
"""

from __future__ import annotations

import msgspec


class LoRARequest(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    """A PEFT adapter by name, positive integer id and directory (``adapter_config.json`` + weights)."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be an integer >= 1, got {self.lora_int_id!r}")
        if not self.lora_name:
            raise ValueError("lora_name must be a non-empty string")
        if not self.lora_path:
            raise ValueError(f"LoRA adapter {self.lora_name!r}: lora_path is required")

    @property
    def adapter_id(self) -> int:
        """vLLM's alias of ``lora_int_id``."""
        return self.lora_int_id
