"""How the sparse product runs: reference numerics, fast CUDA kernels and the dispatch between them.

Nothing here imports ComfyUI. Importing this package is cheap: kernels build on first use or
ahead of time through install.py.
"""
from .dispatch import REQUESTS, BackendChoice, fast_path_availability, log_once, select_backend, sparse_linear
from .reference import keep_mask_nm, norm_compensation_scale, sparse_linear_reference, sparsify_nm

__all__ = [
    "REQUESTS", "BackendChoice", "fast_path_availability", "log_once", "select_backend", "sparse_linear",
    "keep_mask_nm", "norm_compensation_scale", "sparse_linear_reference", "sparsify_nm",
]
