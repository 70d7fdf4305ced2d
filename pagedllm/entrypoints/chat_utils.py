"""Chat templates: render a conversation into a prompt, shared by ``LLM.chat`` and the OpenAI server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ChatMessages = list[dict[str, Any]]


def render_chat(
    tokenizer,
    conversation: ChatMessages,
    chat_template: str | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    chat_template_kwargs: dict[str, Any] | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Render ``conversation`` with ``chat_template`` (default: the tokenizer's) into an engine prompt
    ``{"prompt": text, "prompt_token_ids": ids}``; ``tools`` (OpenAI function specs) go to the template as
    ``tools``."""
    if chat_template is None and tokenizer.chat_template is None:
        raise ValueError("The tokenizer has no chat template; pass chat_template=...")
    text = tokenizer.apply_chat_template(
        conversation,
        chat_template=chat_template,
        tokenize=False,
        add_generation_prompt=add_generation_prompt and not continue_final_message,
        continue_final_message=continue_final_message,
        **({"tools": tools} if tools else {}),
        **(chat_template_kwargs or {}),
    )
    # The template already wrote any BOS token: do not add special tokens twice.
    return {"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}


def load_chat_template(value: str | None) -> str | None:
    """A chat template given as a file path (vLLM's ``--chat-template``) or inline Jinja text; None stays None."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if any(marker in value for marker in ("{{", "{%")):
        return value  # inline template text
    raise ValueError(f"Chat template {value!r} is neither a readable file nor a Jinja template")
