"""Work that can take milliseconds (tokenizing a large prompt, rendering a chat template, detokenizing a long list
of ids) runs here, off the event loop, so that one big request never holds up the others' streams or /health.

The tokenizers' Rust code releases the GIL while it works (measured: a 3.6 MB encode on a thread left the event
loop's longest pause at 75 ms, against the whole 2-3 s on the loop itself).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

_NUM_THREADS = 4  # a few requests tokenize at once; more would only contend for the same cores
_executor = concurrent.futures.ThreadPoolExecutor(_NUM_THREADS, thread_name_prefix="pagedllm-frontend")


async def off_loop(fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` on a front-end worker thread; its exception is raised here."""
    return await asyncio.get_running_loop().run_in_executor(_executor, functools.partial(fn, *args, **kwargs))
