"""Write a tiny random Qwen3 model whose core steps are cheap on a CPU, so that a `pagedllm serve` run measures the
API server process: 1 layer, hidden 32, one KV head of 8, vocab 4096 (ids below 4096 are ordinary Qwen3 BPE
tokens, so with the Qwen3 tokenizer the detokenization is real). Usage: python build_tiny_qwen3.py OUT_DIR"""

import sys

import torch
import transformers

config = transformers.Qwen3Config(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                  max_position_embeddings=2048, bos_token_id=151643, eos_token_id=151645,
                                  tie_word_embeddings=True)
torch.manual_seed(0)
model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
model.save_pretrained(sys.argv[1], safe_serialization=True)
