"""Mixture-of-experts layers: routing (``router.py``), the expert computation as a pure-torch reference
(``torch_moe.py``, the CPU path and the oracle) and as fused Triton kernels (``fused_moe.py``, CUDA), and the
``FusedMoE`` module that holds all experts' weights and picks the path (``layer.py``)."""
