"""Pooling runners for decoder models (embeddings): one vector per prompt from its final-normed hidden states.

Torch-free at import (``params``, ``config``, ``outputs``): the scheduler side and the front end use them; only
``pooler`` (the runner side) imports torch.
"""

from pagedllm.pooling.config import POOLING_TYPES, PoolerConfig, load_pooler_config
from pagedllm.pooling.outputs import EmbeddingOutput, EmbeddingRequestOutput
from pagedllm.pooling.params import PoolingParams

__all__ = ["POOLING_TYPES", "EmbeddingOutput", "EmbeddingRequestOutput", "PoolerConfig", "PoolingParams",
           "load_pooler_config"]
