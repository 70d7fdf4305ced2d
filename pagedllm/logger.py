"""One log format for every process of pagedllm: the server's own loggers, uvicorn's (which propagate to the handler
set here instead of formatting lines their own way) and the engine core process's (its lines are tagged)."""

from __future__ import annotations

import logging

DATE_FORMAT = "%m-%d %H:%M:%S"  # as vLLM's lines: month-day and time


def log_format(process_tag: str | None = None) -> str:
    """``LEVEL MM-DD HH:MM:SS [tag] logger: message``; the tag names a process other than the server's."""
    tag = f"[{process_tag}] " if process_tag else ""
    return f"%(levelname)s %(asctime)s {tag}%(name)s: %(message)s"


def configure_logging(level: str = "info", process_tag: str | None = None) -> None:
    """Install the root handler every logger of the process writes through (first call wins, as basicConfig)."""
    logging.basicConfig(level=level.upper(), format=log_format(process_tag), datefmt=DATE_FORMAT)
