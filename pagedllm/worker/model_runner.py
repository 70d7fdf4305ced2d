"""Turns a SchedulerOutput into tensors, runs the model over the paged KV cache, and samples.

The runner keeps a persistent state per request (its known token ids and block table), updated by the
scheduler's diff each step, so nothing per request is rebuilt from scratch.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pagedllm.attention.backend import AttentionMetadata
from pagedllm.attention.kv_quant import as_bytes, is_fp8, kv_cache_torch_dtype
from pagedllm.config import EngineConfig
from pagedllm.core.interface import ModelRunnerOutput, SchedulerOutput, TopLogprobs
from pagedllm.distributed.parallel_state import get_parallel_state, layer_range
from pagedllm.model.linear import tp_attention_heads
from pagedllm.model.loader import get_model, torch_dtype
from pagedllm.params import SamplingParams
from pagedllm.pooling.pooler import Pooler, PoolingChunk
from pagedllm.worker import late_compiles
from pagedllm.worker.cuda_graphs import (
    StepGraphs,
    capture_sizes,
    decode_context_bounds,
    decode_metadata,
    mixed_capture_sizes,
    mixed_metadata,
)
from pagedllm.worker.request_state import CachedRequestState
from pagedllm.worker.sampler import (
    Sampler,
    SamplingMetadata,
    SamplingRow,
    compute_logprobs,
)
from pagedllm.worker.step_buffers import StepBuffers
from pagedllm.worker.step_output import PendingSampledOutput, ReadyOutput, StepOutput, per_request_logprobs

logger = logging.getLogger(__name__)

# The sampler warm-up's row temperatures, cycled over the rows: 1.0 divides by nothing, 0.5 by a temperature; with a
# greedy row (0.0) each again. Each is its own specialization of the sampling kernels.
_WARM_UP_TEMPERATURES = ((1.0,), (0.5,), (0.0, 1.0), (0.0, 0.5))

# Decode graphs that also run the LM head, so that a decode step's logits come out of the replay: the head's launch
# and host work leave the step, and its kernel joins the graph's chain of dependent launches. Its logits buffer
# (max_num_seqs x vocab, float32) then stays in the graphs' memory pool. Under one device only (the
# tensor-parallel head all-gathers). On an H200 it took the batch-1 decode step of Qwen3-0.6B from 1.14 / 1.34 to
# 0.92 / 0.92 ms (same call, interleaved; benchmarks/h200/session33); ``without_decode_kernels.py graph_logits``
# switches it off.
LOGITS_IN_DECODE_GRAPHS = True
# ... for graphs of at most this many rows. Each captured graph keeps its own logits buffer alive in the pool (its
# output), so all sizes up to 256 would hold about 4,200 rows x vocab x 4 bytes (2.6 GB for Qwen3's vocabulary);
# up to 16 rows they hold 31 rows (19 MB). Larger batches spread the head's host work over their rows anyway.
LOGITS_GRAPH_MAX_ROWS = 16


@dataclass(slots=True)
class _StepInputs:
    """One step's flat batch, staged in the step buffers, plus where to read logits from."""

    num_tokens: int
    num_reqs: int
    query_lens: list[int]
    seq_lens: list[int]
    sample_req_ids: list[str]  # requests whose tokens are all computed after this step: they sample
    sample_indices: list[int]  # flat index of each sampling request's last token
    prompt_logprob_spans: list[tuple[str, int, int, int]]  # (req_id, flat start, first prompt position, count)
    # Async scheduling: flat indices of tokens the previous step is still sampling, and their rows in its output.
    placeholder_indices: list[int] = field(default_factory=list)
    placeholder_sources: list[int] = field(default_factory=list)
    sample_index_tensor: torch.Tensor | None = None  # sample_indices on the device (None: every token samples)
    pooling_chunks: list[PoolingChunk] = field(default_factory=list)  # embedding requests' rows, to pool
    logits: torch.Tensor | None = None  # the step's logits, where its decode graph computed them

    @property
    def is_decode_only(self) -> bool:
        return self.num_tokens == self.num_reqs


class ModelRunner:
    """Owns the model, the KV cache tensors and the sampler of one device."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_config = config.model_config
        self.block_size = config.cache_config.block_size
        self.device = torch.device(config.device)
        self.dtype = torch_dtype(self.model_config.dtype)
        self.kv_cache_dtype = kv_cache_torch_dtype(config.kv_cache_dtype)  # the model's, or FP8
        # calculate_kv_scales: the first step runs eagerly and sets every layer's K/V scales from its own K/V.
        self._kv_scales_pending = config.cache_config.calculate_kv_scales and is_fp8(self.kv_cache_dtype)
        torch.manual_seed(config.seed)  # the same on every rank: tensor-parallel ranks sample the same tokens
        # This rank's share of the model (everything on one device): its KV heads and its pipeline stage's layers.
        state = get_parallel_state()
        self.pp_comm = state.pp.comm  # None without pipeline parallelism
        self.is_last_stage = state.pp.is_last
        self.logits_in_decode_graphs = (LOGITS_IN_DECODE_GRAPHS and self.is_last_stage and state.tp.size == 1
                                        and not config.is_pooling)
        _, self.num_kv_heads, _ = tp_attention_heads(self.model_config.num_attention_heads,
                                                     self.model_config.num_key_value_heads, state.tp)
        start_layer, end_layer = layer_range(self.model_config.num_hidden_layers, state.pp.rank, state.pp.size)
        self.num_layers = end_layer - start_layer
        start = time.perf_counter()
        self.model = get_model(self.model_config, config.load_format, config.device, config.attention_backend,
                               pooling=config.is_pooling)
        self.startup_seconds = {"load": time.perf_counter() - start}
        # Counted at their stored size (FP8 / packed int4 under quantization): the KV budget gets what they save.
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        logger.info("Model weights: %.2f GiB (quantization: %s)", self.weight_bytes / 2**30,
                    self.model_config.quantization or "none")
        self.sampler = Sampler()
        self.pooler = Pooler()
        self.requests: dict[str, CachedRequestState] = {}
        self.kv_caches: list[torch.Tensor] = []
        self.cpu_kv_caches: list[torch.Tensor] = []  # the swap pool, same layout as kv_caches
        sched = config.scheduler_config
        self.max_blocks_per_req = -(-sched.max_model_len // self.block_size)
        self.buffers = StepBuffers(sched.max_num_batched_tokens, sched.max_num_seqs, self.max_blocks_per_req,
                                   self.device)
        self.lora = self._make_lora_slots(config)  # None without LoRA
        # Graphs replay fixed launch shapes: only the Triton backend's kernels are built for that.
        self.use_cuda_graphs = (
            self.device.type == "cuda" and not config.enforce_eager and config.attention_backend == "triton"
            and self.pp_comm is None  # stages send and receive between graphs' kernels: eager under pp
        )
        self.decode_graphs = StepGraphs()  # keyed by padded number of requests, for any context up to max_model_len
        # Context bound -> decode graphs of the small batch sizes whose attention launches fewer splits under that
        # bound (ascending bounds; see cuda_graphs.DECODE_CONTEXT_BOUNDS).
        self.bounded_decode_graphs: dict[int, StepGraphs] = {}
        self.mixed_graphs = StepGraphs()  # steps with a prefill, keyed by padded number of tokens
        self._block_table_versions = itertools.count(1)
        self.grammar_sampling: Any = None  # worker.grammar_sampling.GrammarSampling, made when first needed
        # Async scheduling (see step_output.py): the steps whose sampled tokens the host has not read (oldest
        # first), the last sampled tensor (the next step reads its pending tokens from it), two pinned buffers the
        # sampled tokens are copied into (a step's copy must not overwrite what the previous step's reader has yet
        # to read), and an event recorded once a step's inputs are on the device (its host buffers may be rewritten).
        self._unread_steps: deque[PendingSampledOutput] = deque()
        self._last_sampled: torch.Tensor | None = None
        self._sampled_host = [torch.zeros(sched.max_num_seqs, dtype=torch.int64, pin_memory=True)
                              for _ in range(2)] if self.device.type == "cuda" else []
        self._num_sampling_steps = 0
        # (Waiting on it before its first record returns at once: torch creates the CUDA event when first recorded.)
        self._inputs_uploaded = torch.cuda.Event() if self.device.type == "cuda" else None

    def _make_lora_slots(self, config: EngineConfig) -> Any:
        """The adapter slot pool (``lora/slots.py``), hooked into the model's linear layers; None without LoRA."""
        if config.lora_config is None:
            return None
        from pagedllm.lora.slots import LoRASlotPool
        from pagedllm.platform import triton_ops_enabled

        use_kernels = self.device.type == "cuda" and triton_ops_enabled()
        pool = LoRASlotPool(self.model, self.model_config, config.lora_config,
                            config.scheduler_config.max_num_batched_tokens, self.device, self.dtype, use_kernels)
        logger.info("LoRA: %d slots of rank %d (%.2f GiB)", config.lora_config.max_loras,
                    config.lora_config.max_lora_rank, pool.num_bytes / 2**30)
        return pool

    def remove_lora(self, lora_id: int) -> None:
        """Forget an unloaded adapter (its slot and CPU copy)."""
        if self.lora is not None:
            self.lora.remove(lora_id)

    # ---- KV cache ------------------------------------------------------------------------------------------

    @property
    def kv_block_bytes(self) -> int:
        """Bytes of one block over this rank's layers and KV heads, in the cache's dtype (an FP8 cache fits twice the
        blocks of bf16)."""
        model_config = self.model_config
        per_head_layer = self.config.kv_bytes_per_token // (model_config.num_hidden_layers
                                                             * model_config.num_key_value_heads)
        return per_head_layer * self.num_layers * self.num_kv_heads * self.block_size

    def determine_num_blocks(self) -> int:
        """How many KV blocks the budget allows: an explicit override, a byte budget, or the GPU's free memory."""
        cache_config = self.config.cache_config
        if cache_config.num_gpu_blocks_override is not None:
            return cache_config.num_gpu_blocks_override
        if cache_config.kv_cache_memory_bytes is not None:
            num_blocks = cache_config.kv_cache_memory_bytes // self.kv_block_bytes
            return min(num_blocks, self._max_useful_blocks())
        return self._num_blocks_from_gpu_memory(cache_config.gpu_memory_utilization)

    def _max_useful_blocks(self) -> int:
        """Blocks for max_num_seqs sequences of max_model_len tokens: a larger cache could never be filled."""
        sched = self.config.scheduler_config
        return sched.max_num_seqs * -(-sched.max_model_len // self.block_size)

    def _num_blocks_from_gpu_memory(self, utilization: float) -> int:
        """Size the cache from ``utilization`` of device memory minus weights and the peak of a max-size step."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self._profile_run()
        peak = torch.cuda.max_memory_allocated(self.device)
        _, total = torch.cuda.mem_get_info(self.device)
        budget = int(total * utilization) - peak
        if budget < self.kv_block_bytes:
            raise ValueError(
                f"No memory left for the KV cache: {total / 2**30:.1f} GiB total, gpu_memory_utilization="
                f"{utilization}, peak use without cache {peak / 2**30:.1f} GiB. Raise gpu_memory_utilization, "
                "lower max_num_batched_tokens or use a smaller model."
            )
        return min(budget // self.kv_block_bytes, self._max_useful_blocks())

    @torch.inference_mode()
    def _profile_run(self) -> None:
        """One forward over max_num_batched_tokens tokens of a single sequence, to measure peak activations."""
        start = time.perf_counter()
        sched = self.config.scheduler_config
        num_tokens = min(sched.max_num_batched_tokens, sched.max_model_len)
        num_blocks = -(-num_tokens // self.block_size)
        kv_caches = self._allocate_kv_caches(num_blocks)
        self.buffers.write_block_table_row(0, 0, list(range(num_blocks)))  # version 0: no request's
        inputs = _StepInputs(num_tokens, 1, [num_tokens], [num_tokens], [], [], [])
        self.buffers.input_ids.np[:num_tokens] = 0
        self._stage_positions_and_slots(inputs)
        input_ids, positions, metadata = self._upload(inputs, num_tokens, 1)
        hidden = self.model(input_ids, positions, kv_caches, metadata)
        if self.is_last_stage and not self.config.is_pooling:  # (a pooling model has no LM head)
            self.model.compute_logits(hidden[-sched.max_num_seqs :])
        del kv_caches, hidden
        torch.cuda.synchronize(self.device)
        self.startup_seconds["profile"] = time.perf_counter() - start

    @property
    def num_cpu_blocks(self) -> int:
        """Blocks of the CPU swap pool that ``swap_space`` holds."""
        return self.config.cache_config.swap_space_bytes // self.kv_block_bytes

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.kv_caches = self._allocate_kv_caches(num_blocks)
        if self.num_cpu_blocks:
            # Pinned on CUDA so swaps are asynchronous DMA copies ordered on the compute stream.
            pin = self.device.type == "cuda"
            self.cpu_kv_caches = self._allocate_kv_caches(self.num_cpu_blocks, torch.device("cpu"), pin)
        max_model_len = self.config.scheduler_config.max_model_len
        logger.info(
            "KV cache (%s): %d blocks of %d tokens (%.1f GiB, %d tokens); max concurrency at max_model_len %d: %.1fx",
            self.config.kv_cache_dtype,
            num_blocks,
            self.block_size,
            num_blocks * self.kv_block_bytes / 2**30,
            num_blocks * self.block_size,
            max_model_len,
            num_blocks * self.block_size / max_model_len,
        )
        if self.use_cuda_graphs:
            self._capture_cuda_graphs()
        if self.device.type == "cuda":
            self._warm_up_sampling()
            if self.lora is not None:
                self.lora.warm_up_kernels()
            late_compiles.install()  # from here on, a kernel compile stalls a step: say so

    @torch.inference_mode()
    def _warm_up_sampling(self) -> None:
        """Compile the LM head's and the sampler's kernels before any request: a first compile in the middle of a
        run stalls that step, and every request in it, for up to a second (``late_compiles`` logs any left). The LM
        head runs outside the CUDA graphs, on the skinny GEMM up to its row limit and on cuBLAS above; the sampler
        has one kernel for small batches and one for large, each specialized on whether the rows divide by a
        temperature and whether some rows are greedy (``_WARM_UP_TEMPERATURES``), and more for rows under a grammar
        (``Sampler.warm_up``)."""
        max_rows = self.config.scheduler_config.max_num_seqs
        for num_rows in sorted({1, min(2, max_rows), max_rows}):
            logits = self._warm_up_logits(num_rows)
            for temperatures in _WARM_UP_TEMPERATURES:
                params = [SamplingParams(temperature=temperatures[i % len(temperatures)]) for i in range(num_rows)]
                rows = [SamplingRow(p, [0], [], 0) for p in params]
                metadata = SamplingMetadata.build(rows, self.model_config.vocab_size, self.device, ())
                self.sampler.warm_up(logits, metadata)
        torch.cuda.synchronize(self.device)

    def _warm_up_logits(self, num_rows: int) -> torch.Tensor:
        """Logits of ``num_rows`` rows as a step makes them: through the LM head where this worker has one."""
        if not self.is_last_stage or self.config.is_pooling:
            return torch.zeros(num_rows, self.model_config.vocab_size, device=self.device)
        hidden = torch.zeros(num_rows, self.model_config.hidden_size, dtype=self.dtype, device=self.device)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def _capture_cuda_graphs(self) -> None:
        if self.lora is not None:
            self.lora.prepare_capture()  # the graphs hold the LoRA kernels, which read the slots of each replay
        pool = torch.cuda.graph_pool_handle() if self.device.type == "cuda" else None
        seconds = self._capture_decode_graphs(pool) + self._capture_mixed_graphs(pool)
        self.startup_seconds["cuda_graphs"] = seconds

    def _capture_decode_graphs(self, pool) -> float:
        sched = self.config.scheduler_config
        buffers = self.buffers
        buffers.query_start_loc.np[0] = 0
        buffers.fill_padding(0, 0, sched.max_num_seqs)  # every row padding: the captures write no KV slot
        self._upload_padded(sched.max_num_seqs, sched.max_num_seqs)

        def forward_for(context_bound: int) -> Callable[[int], tuple[torch.Tensor, torch.Tensor | None]]:
            def forward(size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
                """The hidden states, and the logits where ``logits_in_decode_graphs`` and the size is at most
                ``LOGITS_GRAPH_MAX_ROWS`` (every decode row samples)."""
                metadata = decode_metadata(
                    buffers.slot_mapping.device[:size],
                    buffers.query_start_loc.device[: size + 1],
                    buffers.seq_lens.device[:size],
                    buffers.block_tables.device[:size],
                    context_bound,
                )
                hidden = self.model(buffers.input_ids.device[:size], buffers.positions.device[:size], self.kv_caches,
                                    metadata)
                with_logits = self.logits_in_decode_graphs and size <= LOGITS_GRAPH_MAX_ROWS
                return hidden, self.model.compute_logits(hidden) if with_logits else None

            return forward

        sizes = capture_sizes(sched.max_num_seqs)
        seconds = self.decode_graphs.capture(sizes, forward_for(sched.max_model_len), self.device, pool)
        if self.device.type == "cuda":
            seconds += self._capture_bounded_decode_graphs(sizes, forward_for, pool)
        return seconds

    def _capture_bounded_decode_graphs(self, sizes: list[int], forward_for, pool) -> float:
        """For each context bound, the decode graphs of the sizes whose attention splits fewer ways under it."""
        from pagedllm.attention.triton_paged import num_decode_splits  # graphs run only the Triton backend

        max_model_len = self.config.scheduler_config.max_model_len
        num_kv_heads = self.num_kv_heads

        def splits(size: int, bound: int) -> int:
            return num_decode_splits(size, num_kv_heads, bound, self.device)

        seconds = 0.0
        for bound in decode_context_bounds(max_model_len):
            fewer = [size for size in sizes if splits(size, bound) < splits(size, max_model_len)]
            if fewer:
                graphs = self.bounded_decode_graphs[bound] = StepGraphs()
                seconds += graphs.capture(fewer, forward_for(bound), self.device, pool)
        return seconds

    def _decode_graphs_for(self, padded_num_reqs: int, max_seq_len: int) -> StepGraphs:
        """The graphs to replay a decode step of ``padded_num_reqs`` rows with: those of the smallest context bound
        that holds ``max_seq_len`` and has that size, else the max_model_len ones."""
        for bound, graphs in self.bounded_decode_graphs.items():
            if max_seq_len <= bound and graphs.padded_size(padded_num_reqs) == padded_num_reqs:
                return graphs
        return self.decode_graphs

    def _mixed_graph_num_reqs(self, padded_num_tokens: int) -> int:
        """Requests a mixed graph of ``padded_num_tokens`` tokens holds: every request has at least one token."""
        return min(padded_num_tokens, self.config.scheduler_config.max_num_seqs)

    def _capture_mixed_graphs(self, pool) -> float:
        sizes = mixed_capture_sizes(self.config.scheduler_config.max_num_batched_tokens)
        if not sizes:
            return 0.0
        buffers, max_model_len = self.buffers, self.config.scheduler_config.max_model_len
        largest, largest_reqs = sizes[-1], self._mixed_graph_num_reqs(sizes[-1])
        # All padding, valid at every size: no request has a query (the prefill kernel returns at once) and no
        # token a KV slot, so the captures write nothing outside their own output.
        buffers.fill_mixed_padding(0, 0, largest, largest_reqs)
        buffers.query_start_loc.np[: largest_reqs + 1] = 0
        self._upload_padded(largest, largest_reqs)

        def forward(size: int) -> torch.Tensor:
            num_reqs = self._mixed_graph_num_reqs(size)
            metadata = mixed_metadata(
                buffers.slot_mapping.device[:size],
                buffers.query_start_loc.device[: num_reqs + 1],
                buffers.seq_lens.device[:num_reqs],
                buffers.block_tables.device[:num_reqs],
                max_model_len,
            )
            return self.model(buffers.input_ids.device[:size], buffers.positions.device[:size], self.kv_caches,
                              metadata)

        return self.mixed_graphs.capture(sizes, forward, self.device, pool)

    def _allocate_kv_caches(
        self, num_blocks: int, device: torch.device | None = None, pin_memory: bool = False
    ) -> list[torch.Tensor]:
        device = device or self.device
        shape = (2, num_blocks, self.block_size, self.num_kv_heads, self.model_config.head_dim)
        # On CPU, zero-filling gigabytes costs seconds and commits all the memory at start: leave it unwritten
        # (slots are always written before they are read). Device caches are zeroed: kernels may load masked slots.
        allocate = torch.empty if device.type == "cpu" and not pin_memory else torch.zeros
        return [
            allocate(shape, dtype=self.kv_cache_dtype, device=device, pin_memory=pin_memory)
            for _ in range(self.num_layers)
        ]

    def _copy_blocks(self, scheduler_output: SchedulerOutput) -> None:
        """Before this step's forward pass writes any block: swap out to the CPU pool, make the copy-on-write
        copies, swap in (a block freed by a swap-out may be this step's copy target, never the other way)."""
        for pairs, sources, targets in (
            (scheduler_output.blocks_to_swap_out, self.kv_caches, self.cpu_kv_caches),
            (scheduler_output.blocks_to_copy, self.kv_caches, self.kv_caches),
            (scheduler_output.blocks_to_swap_in, self.cpu_kv_caches, self.kv_caches),
        ):
            if not pairs:
                continue
            source_ids = torch.tensor([src for src, _ in pairs], device=sources[0].device)
            target_ids = torch.tensor([dst for _, dst in pairs], device=targets[0].device)
            # Host-to-device may run asynchronously (ordered on the stream); device-to-host must land before the
            # host reads it, so it copies synchronously: swap-outs are rare, a sync then is cheap.
            non_blocking = targets[0].device.type == "cuda"
            for source, target in zip(sources, targets):
                # As bytes: the same copy for any cache dtype (torch lacks some indexed copies of FP8).
                as_bytes(target)[:, target_ids] = as_bytes(source)[:, source_ids].to(target.device,
                                                                                     non_blocking=non_blocking)

    # ---- one step ------------------------------------------------------------------------------------------

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step and wait for it (synchronous scheduling)."""
        return self.execute_model_async(scheduler_output).result()

    @torch.inference_mode()
    def execute_model_async(self, scheduler_output: SchedulerOutput) -> StepOutput:
        """Launch one step; ``result()`` of the answer waits for it. Requests may hold a token the previous step is
        still sampling (async scheduling): this step reads it on the device. Every earlier step's output is read
        here first, so at most the previous step is ever unread."""
        self._update_states(scheduler_output)
        self._copy_blocks(scheduler_output)
        if scheduler_output.is_empty:
            return ReadyOutput(ModelRunnerOutput({}))
        self._read_earlier_steps(scheduler_output)
        inputs = self._prepare_inputs(scheduler_output)
        hidden = self._forward(inputs)
        output = self._sample(hidden, inputs)
        output.prompt_logprobs.update(self._prompt_logprobs(hidden, inputs))  # (waits for the step: rare)
        if inputs.pooling_chunks and self.is_last_stage:  # (waits for the step: the vectors go to the host)
            output.pooled_outputs.update(self.pooler.pool(hidden, inputs.pooling_chunks))
        return ReadyOutput(output) if isinstance(output, ModelRunnerOutput) else output

    def _read_earlier_steps(self, scheduler_output: SchedulerOutput) -> None:
        """Read the outputs of the steps before the previous one, and the previous one's too when a row of this step
        samples from the tokens generated so far (a grammar, penalties): it must know them all."""
        unread = self._unread_steps
        while unread and (len(unread) > 1 or unread[0].is_resolved):
            unread.popleft().result()
        if unread and any(self.requests[req_id].reads_output_history for req_id in scheduler_output.num_scheduled_tokens):
            unread.popleft().result()

    def _forward(self, inputs: _StepInputs) -> torch.Tensor:
        """Hidden states of the step's tokens: a graph replay for a step of a captured size, else eager."""
        if self._kv_scales_pending:
            return self._forward_computing_kv_scales(inputs)
        if inputs.is_decode_only:
            padded = self.decode_graphs.padded_size(inputs.num_reqs)
            if padded is not None:
                self.buffers.fill_padding(inputs.num_tokens, inputs.num_reqs, padded)
                self._upload_padded(padded, padded)
                self._finish_inputs(inputs)
                graphs = self._decode_graphs_for(padded, max(inputs.seq_lens)) if self.bounded_decode_graphs \
                    else self.decode_graphs
                hidden, logits = graphs.replay(padded)
                inputs.logits = None if logits is None else logits[: inputs.num_tokens]
                return hidden[: inputs.num_tokens]
        else:
            padded = self.mixed_graphs.padded_size(inputs.num_tokens)
            if padded is not None:
                padded_reqs = self._mixed_graph_num_reqs(padded)
                self.buffers.fill_mixed_padding(inputs.num_tokens, inputs.num_reqs, padded, padded_reqs)
                self._upload_padded(padded, padded_reqs)
                self._finish_inputs(inputs)
                return self.mixed_graphs.replay(padded)[: inputs.num_tokens]
        input_ids, positions, metadata = self._upload(inputs, inputs.num_tokens, inputs.num_reqs)
        self._finish_inputs(inputs)
        return self.model(input_ids, positions, self.kv_caches, metadata)

    def _forward_computing_kv_scales(self, inputs: _StepInputs) -> torch.Tensor:
        """The first step with calculate_kv_scales: eager (a graph would not run the scale computation), each layer
        setting its K/V scales from this step's keys and values before storing them; later steps use them."""
        input_ids, positions, metadata = self._upload(inputs, inputs.num_tokens, inputs.num_reqs)
        metadata.compute_kv_scales = True
        self._finish_inputs(inputs)
        self._kv_scales_pending = False
        return self.model(input_ids, positions, self.kv_caches, metadata)

    def _finish_inputs(self, inputs: _StepInputs) -> None:
        """After the staged inputs are uploaded: the tokens the previous step is still sampling (copied on the device),
        the rows to sample; then mark the host buffers free for the next step."""
        self._fill_placeholders(inputs)
        num_samples = len(inputs.sample_indices)
        if num_samples != inputs.num_tokens:  # some token does not sample (a prefill): the sampling rows are gathered
            self.buffers.sample_indices.np[:num_samples] = inputs.sample_indices
            inputs.sample_index_tensor = self.buffers.sample_indices.upload(num_samples)
        if self._inputs_uploaded is not None:
            self._inputs_uploaded.record()

    def _fill_placeholders(self, inputs: _StepInputs) -> None:
        num_placeholders = len(inputs.placeholder_indices)
        if not num_placeholders:
            return
        buffers = self.buffers
        buffers.placeholder_indices.np[:num_placeholders] = inputs.placeholder_indices
        buffers.placeholder_sources.np[:num_placeholders] = inputs.placeholder_sources
        sources = buffers.placeholder_sources.upload(num_placeholders)
        tokens = self._last_sampled.index_select(0, sources)
        buffers.input_ids.device.index_copy_(0, buffers.placeholder_indices.upload(num_placeholders), tokens)

    def _update_states(self, scheduler_output: SchedulerOutput) -> None:
        for req_id in scheduler_output.finished_req_ids:
            self.requests.pop(req_id, None)
            self.pooler.forget(req_id)
        for data in scheduler_output.new_reqs:
            state = self.requests[data.req_id] = CachedRequestState.from_new(data)
            state.block_table_version = next(self._block_table_versions)
        for data in scheduler_output.cached_reqs:
            state = self.requests[data.req_id]
            if data.block_ids_reset is not None:
                state.block_ids = list(data.block_ids_reset)
                state.block_table_version = next(self._block_table_versions)
            else:
                state.block_ids.extend(data.new_block_ids)
            state.num_computed_tokens = data.num_computed_tokens
        if not self.is_last_stage:  # the last stage has these tokens: it sampled them
            for data in scheduler_output.cached_reqs:
                if data.new_token_ids:
                    self.requests[data.req_id].add_carried_outputs(data.num_computed_tokens, data.new_token_ids)

    def _prepare_inputs(self, scheduler_output: SchedulerOutput) -> _StepInputs:
        """Stage the step's inputs in the host buffers (one pass over the batch, then numpy)."""
        if self._inputs_uploaded is not None:
            self._inputs_uploaded.synchronize()  # the previous step's uploads have read the buffers rewritten here
        buffers = self.buffers
        token_ids: list[int] = []
        query_lens, seq_lens = [], []
        sample_req_ids, sample_indices, prompt_spans = [], [], []
        placeholder_indices, placeholder_sources = [], []
        pooling_chunks: list[PoolingChunk] = []
        for row, (req_id, num_new) in enumerate(scheduler_output.num_scheduled_tokens.items()):
            state = self.requests[req_id]
            start = state.num_computed_tokens
            end = start + num_new
            flat_start = len(token_ids)
            if num_new == 1 and start < len(state.token_ids):
                token_ids.append(state.token_ids[start])
            else:
                token_ids.extend(state.token_ids[start:end])
                if end > len(state.token_ids):  # its last token is being sampled by the previous step
                    placeholder_indices.append(len(token_ids))
                    placeholder_sources.append(state.pending_row)
                    token_ids.append(0)
            query_lens.append(num_new)
            seq_lens.append(end)
            buffers.write_block_table_row(row, state.block_table_version, state.block_ids)
            if state.pooling_params is not None:
                pooling_chunks.append(PoolingChunk(req_id, state.pooling_params, flat_start, num_new, start,
                                                   end == state.num_prompt_tokens))
            elif end == len(state.token_ids) + state.num_pending:
                sample_req_ids.append(req_id)
                sample_indices.append(flat_start + num_new - 1)
            if state.sampling_params.prompt_logprobs is not None:
                num_prompt_positions = min(end, state.num_prompt_tokens - 1) - start
                if num_prompt_positions > 0:
                    prompt_spans.append((req_id, flat_start, start, num_prompt_positions))
            state.num_computed_tokens = end

        inputs = _StepInputs(len(token_ids), len(query_lens), query_lens, seq_lens, sample_req_ids, sample_indices,
                             prompt_spans, placeholder_indices, placeholder_sources, pooling_chunks=pooling_chunks)
        buffers.input_ids.np[: inputs.num_tokens] = token_ids
        self._stage_positions_and_slots(inputs)
        if self.lora is not None:
            self.lora.stage_step([self.requests[req_id].lora_request for req_id in scheduler_output.num_scheduled_tokens],
                                 query_lens)
        return inputs

    def _stage_positions_and_slots(self, inputs: _StepInputs) -> None:
        """Query starts, context lengths, each token's position and KV slot, from the staged block tables."""
        buffers, num_tokens, num_reqs = self.buffers, inputs.num_tokens, inputs.num_reqs
        query_lens = np.asarray(inputs.query_lens, dtype=np.int64)
        seq_lens = np.asarray(inputs.seq_lens, dtype=np.int64)
        query_start_loc = buffers.query_start_loc.np
        query_start_loc[0] = 0
        np.cumsum(query_lens, out=query_start_loc[1 : num_reqs + 1])
        buffers.seq_lens.np[:num_reqs] = seq_lens
        # Token t of request r sits at position (context before this step) + (t - first token of r).
        request_of_token = np.repeat(np.arange(num_reqs), query_lens)
        positions = buffers.positions.np[:num_tokens]
        positions[:] = np.arange(num_tokens) - query_start_loc[request_of_token]
        positions += (seq_lens - query_lens)[request_of_token]
        block_ids = buffers.block_tables.np[request_of_token, positions // self.block_size]
        buffers.slot_mapping.np[:num_tokens] = block_ids * self.block_size + positions % self.block_size

    def _upload(
        self, inputs: _StepInputs, num_tokens: int, num_reqs: int
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Copy the staged step to the device: (input_ids, positions, metadata) for an eager forward."""
        buffers = self.buffers
        if self.lora is not None:
            self.lora.upload(num_tokens)
        metadata = AttentionMetadata(
            slot_mapping=buffers.slot_mapping.upload(num_tokens),
            query_start_loc=buffers.query_start_loc.upload(num_reqs + 1),
            seq_lens=buffers.seq_lens.upload(num_reqs),
            block_tables=buffers.upload_block_tables(num_reqs),
            query_lens_cpu=inputs.query_lens,
            seq_lens_cpu=inputs.seq_lens,
            max_query_len=max(inputs.query_lens),
            max_seq_len=max(inputs.seq_lens),
        )
        return buffers.input_ids.upload(num_tokens), buffers.positions.upload(num_tokens), metadata

    def _upload_padded(self, padded_num_tokens: int, padded_num_reqs: int) -> None:
        """Copy a staged, padded step into the buffers a graph reads."""
        buffers = self.buffers
        for buffer in (buffers.input_ids, buffers.positions, buffers.slot_mapping):
            buffer.upload(padded_num_tokens)
        if self.lora is not None:
            self.lora.upload(padded_num_tokens)
        buffers.seq_lens.upload(padded_num_reqs)
        buffers.upload_block_tables(padded_num_reqs)
        buffers.query_start_loc.upload(padded_num_reqs + 1)

    def _sample(self, hidden: torch.Tensor, inputs: _StepInputs) -> ModelRunnerOutput | PendingSampledOutput:
        """Launch the step's sampling: the output is read later (``PendingSampledOutput``), except under a grammar
        whose draws are checked on the host (then the step is waited for here)."""
        if not inputs.sample_req_ids or not self.is_last_stage:
            # (An earlier pipeline stage has no logits: it learns the sampled tokens from the next steps' inputs.)
            return ModelRunnerOutput({})
        logits = inputs.logits
        if logits is None:
            logits = self.model.compute_logits(self._sampled_hidden(hidden, inputs))
        states = [self.requests[req_id] for req_id in inputs.sample_req_ids]
        rows = [
            SamplingRow(s.sampling_params, s.prompt_token_ids, s.output_token_ids, s.sampling_seed, s.num_pending)
            for s in states
        ]
        metadata = SamplingMetadata.build(rows, self.model_config.vocab_size, self.device, self.model_config.eos_token_ids)
        grammar_step = self._prepare_grammars(states, metadata)
        sampler_output = self.sampler(logits, metadata)
        if grammar_step is not None:
            return self._finish_grammar_step(inputs, states, logits, metadata, sampler_output, grammar_step)
        return self._pending_output(inputs.sample_req_ids, states, sampler_output)

    def _pending_output(self, req_ids: list[str], states: list[CachedRequestState], sampler_output) -> PendingSampledOutput:
        """Start the copy of the sampled tokens to the host (non-blocking) and note them as pending in the states."""
        sampled = sampler_output.sampled_token_ids
        copied = None
        if self._sampled_host:
            self._num_sampling_steps += 1
            host = self._sampled_host[self._num_sampling_steps % 2][: len(req_ids)]
            host.copy_(sampled, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
            sampled_host = host
        else:
            sampled_host = sampled
        for row, state in enumerate(states):
            state.num_pending += 1
            state.pending_row = row
        self._last_sampled = sampled
        pending = PendingSampledOutput(req_ids, states, sampled_host, copied, sampler_output.logprobs)
        self._unread_steps.append(pending)
        return pending

    def _finish_grammar_step(self, inputs: _StepInputs, states: list[CachedRequestState], logits: torch.Tensor,
                             metadata: SamplingMetadata, sampler_output, grammar_step) -> ModelRunnerOutput:
        """Check the draws of rows under a grammar on the host (redrawing refused ones), waiting for the step."""
        sampled = sampler_output.sampled_token_ids.tolist()  # the step's one device->host sync
        sampled = self.grammar_sampling.finish(
            grammar_step, states, sampled, sampler_output, metadata, lambda m: self.sampler(logits, m)
        )
        logprobs = sampler_output.logprobs
        if logprobs is not None and grammar_step.changed:  # some token is not the first draw
            logprobs = compute_logprobs(logits, torch.tensor(sampled, device=logits.device), metadata.max_num_logprobs)
        output = ModelRunnerOutput(dict(zip(inputs.sample_req_ids, sampled)))
        for state, token_id in zip(states, sampled):
            state.append_output(token_id)
        if logprobs is not None:
            output.logprobs = per_request_logprobs(inputs.sample_req_ids, states, logprobs)
        output.grammars_terminated = {
            req_id for req_id, state in zip(inputs.sample_req_ids, states)
            if state.structured_output is not None and state.structured_output.is_terminated()
        }
        return output

    def _sampled_hidden(self, hidden: torch.Tensor, inputs: _StepInputs) -> torch.Tensor:
        """The hidden states of the sampling tokens (the indices went through a staged buffer with the inputs: a
        Python list index would be a blocking copy from pageable memory)."""
        if inputs.sample_index_tensor is None:  # every token samples (a decode step): no gather
            return hidden[: inputs.num_tokens]
        return hidden.index_select(0, inputs.sample_index_tensor)

    def _prepare_grammars(self, states: list[CachedRequestState], metadata: SamplingMetadata) -> Any:
        """The rows under a grammar (``GrammarSampling.prepare``: masks filled, checked rows named), or None (no
        cost) when there is none."""
        if self.grammar_sampling is None:
            if all(state.structured_output is None for state in states):
                return None
            # Made on the first step under a grammar, so an engine without structured outputs never allocates it.
            from pagedllm.worker.grammar_sampling import GrammarSampling

            self.grammar_sampling = GrammarSampling(
                self.config.scheduler_config.max_num_seqs, self.model_config.vocab_size, self.device
            )
        return self.grammar_sampling.prepare(states, metadata)

    def _prompt_logprobs(self, hidden: torch.Tensor, inputs: _StepInputs) -> dict[str, list[TopLogprobs]]:
        result = {}
        if not self.is_last_stage:  # only the last pipeline stage has logits (and its output is the engine's)
            return result
        for req_id, flat_start, first_position, count in inputs.prompt_logprob_spans:
            state = self.requests[req_id]
            logits = self.model.compute_logits(hidden[flat_start : flat_start + count])
            targets = state.token_ids[first_position + 1 : first_position + 1 + count]
            num_top = state.sampling_params.prompt_logprobs
            num_columns = self.model_config.vocab_size if num_top == -1 else num_top
            tensors = compute_logprobs(logits, torch.tensor(targets, device=self.device), num_columns).cpu()
            result[req_id] = [tensors.to_top_logprobs(row, num_top) for row in range(count)]
        return result

