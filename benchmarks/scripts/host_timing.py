"""Host time of named calls, for the profiling scripts: a method or function replaced by a wrapper that reports how
long each call took, also when it raises."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable


def wrap_timed(owner, attribute: str, record: Callable[[float], None]) -> None:
    """Replace ``owner.attribute`` (on an object, a class or a module) by a wrapper that calls ``record(seconds)``
    after each call."""
    original = getattr(owner, attribute)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            record(time.perf_counter() - start)

    # A class's static or class method is called without an instance, and ``original`` is already bound: its
    # wrapper must not bind one. An instance method set on the class binds as it did.
    unbound = isinstance(owner, type) and isinstance(inspect.getattr_static(owner, attribute),
                                                     (staticmethod, classmethod))
    setattr(owner, attribute, staticmethod(timed) if unbound else timed)
