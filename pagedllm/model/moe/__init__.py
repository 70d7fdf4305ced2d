"""Mixture-of-experts layers: routing (``router.py``), the expert computation as a pure-torch reference
(``torch_moe.py``, the CPU path and the oracle) and as fused Triton kernels (CUDA: ``fused_moe.py``'s grouped GEMM
over pairs sorted by expert, ``decode_moe.py``'s per-pair GEMVs with the routing inside for steps of a few tokens),
and the ``FusedMoE`` module that holds all experts' weights and picks the path (``layer.py``)."""
