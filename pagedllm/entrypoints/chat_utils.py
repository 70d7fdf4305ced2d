"""Chat templates: render a conversation into a prompt, shared by ``LLM.chat`` and the OpenAI server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ChatMessages = list[dict[str, Any]]

# Arguments of ``apply_chat_template`` itself, or variables it sets: in chat_template_kwargs they would collide with
# what pagedllm passes or change what rendering returns (token ids, tensors, a dict) instead of adding a variable.
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs",
})
MAX_TEMPLATE_KWARGS = 64  # variables
MAX_TEMPLATE_KWARGS_CHARS = 64 * 1024  # their size as JSON: the template may loop over them


def check_chat_template_kwargs(kwargs: dict[str, Any] | None) -> None:
    """Extra template variables (e.g. ``{"enable_thinking": False}``): at most 64, 64 KiB as JSON, none of the
    reserved names; ValueError otherwise."""
    if not kwargs:
        return
    if len(kwargs) > MAX_TEMPLATE_KWARGS:
        raise ValueError(f"chat_template_kwargs may hold at most {MAX_TEMPLATE_KWARGS} variables, got {len(kwargs)}")
    reserved = sorted(RESERVED_TEMPLATE_KWARGS.intersection(kwargs))
    if reserved:
        raise ValueError(f"chat_template_kwargs may not set {', '.join(reserved)}: these are arguments of the "
                         "rendering itself, not template variables")
    if len(json.dumps(kwargs, default=str)) > MAX_TEMPLATE_KWARGS_CHARS:
        raise ValueError(f"chat_template_kwargs may be at most {MAX_TEMPLATE_KWARGS_CHARS} characters as JSON")


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
    check_chat_template_kwargs(chat_template_kwargs)
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
