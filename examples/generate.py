"""Offline generation with pagedllm's LLM.generate.

    python examples/generate.py                      # a tiny random Llama (no download; gibberish text)
    python examples/generate.py --model PATH_OR_ID   # a real Hugging Face model
"""

from __future__ import annotations

import argparse
import tempfile

from pagedllm import LLM, SamplingParams


def write_demo_model(directory: str) -> str:
    """A tiny random Llama with a byte-level BPE tokenizer, so the example runs with no model download."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([__doc__ * 10], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>").save_pretrained(directory)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=0, eos_token_id=1)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory or hub id (default: a tiny random demo model)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.8)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or write_demo_model(tmp)
        llm = LLM(model)
        prompts = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "Paged attention is"]
        params = SamplingParams(temperature=args.temperature, top_p=0.95, max_tokens=args.max_tokens, seed=0)
        for output in llm.generate(prompts, params):
            print(f"{output.prompt!r} -> {output.outputs[0].text!r}")
        for metric in llm.get_metrics():
            print(f"{metric.name} = {metric.value}")


if __name__ == "__main__":
    main()
