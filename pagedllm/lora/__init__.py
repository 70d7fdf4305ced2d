"""Multi-LoRA serving: PEFT adapters over one base model, many of them in one batch.

``request.py`` names an adapter (``LoRARequest``); ``adapter.py`` loads and validates a PEFT checkpoint against the
base model; ``validation.py`` checks a request's adapter in the front end; ``layers.py`` adds an adapter's delta to a
linear layer's output per token; ``slots.py`` keeps adapters in a fixed pool of device slots (LRU over a CPU cache)
and maps each step's tokens to slots; ``tiles.py`` sorts a step's tokens by slot into tiles (host side) and
``punica.py`` holds the Triton shrink / expand kernels over those tiles.
"""

from pagedllm.lora.request import LoRARequest

__all__ = ["LoRARequest"]
