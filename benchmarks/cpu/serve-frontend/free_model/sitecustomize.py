"""Benchmark-only hooks for `pagedllm serve` started by ../run.sh (this folder on PYTHONPATH), in every process.

PAGEDLLM_BENCH_FREE_MODEL=1: the model's forward pass is one embedding lookup, so that the engine core's steps
cost little more than scheduling and sampling and the API server process is the bottleneck, as on a GPU.
Sampling, stop checks and detokenization stay real: with tied embeddings, greedy decoding follows a scrambled
sequence of ordinary token ids.

PAGEDLLM_BENCH_GC_LOG=1: the CPU seconds spent in garbage collections, per generation, are printed on SIGUSR2 and
at exit (`[gc] pid N: ...`).
"""

import os

if os.environ.get("PAGEDLLM_BENCH_FREE_MODEL") == "1":
    from pagedllm.model import llama

    def _embedding_only(self, input_ids, positions, kv_caches, attn_metadata):
        scrambled = (input_ids * 31 + positions * 17 + 5) % self.config.vocab_size
        return self.model.embed_tokens(scrambled)

    llama.LlamaForCausalLM.forward = _embedding_only

if os.environ.get("PAGEDLLM_BENCH_GC_LOG") == "1":
    import atexit
    import gc
    import signal
    import sys
    import time

    _started = {}
    _totals = {0: [0, 0.0], 1: [0, 0.0], 2: [0, 0.0]}  # generation -> [collections, CPU seconds]

    def _time_collections(phase, info):
        generation = info["generation"]
        if phase == "start":
            _started[generation] = time.thread_time()  # a collection runs on one thread, holding the GIL
        else:
            _totals[generation][0] += 1
            _totals[generation][1] += time.thread_time() - _started[generation]

    def _report():  # one write: the engine core logs to the same file
        sys.stderr.write(f"[gc] pid {os.getpid()}: " + ", ".join(f"generation {g}: {n} collections {s:.3f} s CPU"
                                                                 for g, (n, s) in _totals.items()) + "\n")
        sys.stderr.flush()

    gc.callbacks.append(_time_collections)
    atexit.register(_report)
    signal.signal(signal.SIGUSR2, lambda signum, frame: _report())
