"""vLLM's ``POST /tokenize`` (a prompt, or messages through the chat template) and ``POST /detokenize``.

The tokenizer runs on the front-end's worker threads (``offload.off_loop``): a multi-megabyte prompt takes seconds
to tokenize, and on the event loop it would hold up every other request's stream and /health meanwhile.
"""

from __future__ import annotations

from pagedllm.entrypoints.openai.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)
from pagedllm.entrypoints.openai.offload import off_loop
from pagedllm.entrypoints.openai.serving_chat import render_messages
from pagedllm.entrypoints.openai.serving_common import ServingContext, check_token_ids


class OpenAIServingTokenization:
    """Tokenizes and detokenizes with the served model's tokenizer (and chat template)."""

    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def tokenize(self, request: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
        self.ctx.models.check(request.model)
        return await off_loop(self._tokenize, request)

    async def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        self.ctx.models.check(request.model)
        check_token_ids(request.tokens, self.ctx.vocab_size, "tokens")
        return DetokenizeResponse(prompt=await off_loop(self.ctx.tokenizer.decode, request.tokens))

    def _tokenize(self, request: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
        tokenizer = self.ctx.tokenizer
        if isinstance(request, TokenizeChatRequest):
            token_ids = render_messages(self.ctx, request)["prompt_token_ids"]
        else:
            token_ids = tokenizer.encode(request.prompt, add_special_tokens=request.add_special_tokens)
        token_strs = tokenizer.convert_ids_to_tokens(token_ids) if request.return_token_strs else None
        return TokenizeResponse(count=len(token_ids), max_model_len=self.ctx.max_model_len, tokens=token_ids,
                                token_strs=token_strs)
