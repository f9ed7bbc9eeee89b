"""How the sparse product runs: reference numerics, fast CUDA kernels and the dispatch between them.

Nothing here imports ComfyUI. Importing this package is cheap: kernels build on first use or
ahead of time through install.py.
"""
from .dispatch import (PRECISIONS, REQUESTS, BackendChoice, block_ops_availability, cat_gelu_tanh, dense_linear_fp8,
                       fast_path_availability, fp8_dense_availability, fp8_dense_shape_supported, linear_fp8_weight,
                       log_once, prepare_low_rank, qk_norm_rope, qk_norm_rope_split, quantize_weight_fp8,
                       select_backend, sparse_linear, sparse_linear_fp8, sparse_linear_gelu, sparse_linear_modulated)
from .reference import (GatedResidual, LowRankOperands, cat_gelu_tanh_reference, dense_linear_fp8_reference,
                        gated_residual_reference, gelu_tanh_reference, keep_mask_nm, linear_e4m3_weight_reference,
                        low_rank_reference, modulated_layer_norm_reference, norm_compensation_scale,
                        qk_norm_rope_reference, qk_norm_rope_split_reference, sparse_linear_fp8_reference,
                        sparse_linear_reference, sparsify_nm)
from .rope import rope_table

__all__ = [
    "PRECISIONS", "REQUESTS", "BackendChoice", "dense_linear_fp8", "fast_path_availability", "linear_fp8_weight",
    "log_once",
    "prepare_low_rank", "select_backend", "sparse_linear", "sparse_linear_fp8", "sparse_linear_gelu",
    "sparse_linear_modulated", "fp8_dense_availability", "fp8_dense_shape_supported", "block_ops_availability",
    "qk_norm_rope", "qk_norm_rope_split", "cat_gelu_tanh", "rope_table",
    "GatedResidual", "LowRankOperands", "cat_gelu_tanh_reference", "dense_linear_fp8_reference",
    "gated_residual_reference", "gelu_tanh_reference", "keep_mask_nm", "linear_e4m3_weight_reference",
    "low_rank_reference",
    "modulated_layer_norm_reference", "norm_compensation_scale", "qk_norm_rope_reference",
    "qk_norm_rope_split_reference", "quantize_weight_fp8", "sparse_linear_fp8_reference", "sparse_linear_reference",
    "sparsify_nm",
]
