"""Multi-LoRA serving: PEFT adapters over one base model, many of them in one batch.

``request.py`` names an adapter (``LoRARequest``); ``adapter.py`` loads and validates a PEFT checkpoint against the
base model; ``validation.py`` checks a request's adapter in the front end; ``layers.py`` adds an adapter's delta to a
linear layer's output per token; ``slots.py`` keeps adapters in a fixed pool of device slots (LRU over a CPU cache)
and maps each step's tokens to slots; ``punica.py`` holds the Triton shrink / expand kernels (per token, and over
tiles of tokens sorted by adapter).
"""

from pagedllm.lora.request import LoRARequest

__all__ = ["LoRARequest"]
