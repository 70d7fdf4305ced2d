"""More than one device: the communicator (collectives behind a small interface), the rank layout of this process
(tensor- and pipeline-parallel groups) and how the executor sets it up.

``parallel_state.get_parallel_state()`` is read while the model is built (each layer keeps what it needs), never in
the step's hot path. One process = one rank; a single-device engine has the default one-rank state, whose groups
have no communicator, so the tp=1 model holds exactly the modules it held before parallelism existed.
"""

from pagedllm.distributed.parallel_state import (
    GroupState,
    ParallelState,
    get_parallel_state,
    init_distributed,
    layer_range,
    set_parallel_state,
)

__all__ = ["GroupState", "ParallelState", "get_parallel_state", "init_distributed", "layer_range",
           "set_parallel_state"]
