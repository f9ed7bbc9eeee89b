"""The numerics of RT-Lynx, written plainly in PyTorch.

This file is the single definition of what the fast kernels compute; every kernel is tested
against it. It runs on any device and dtype and is traceable by torch.compile (no data-dependent
control flow), so on GPUs without a fast kernel Inductor can still fuse the sparsify pass.
"""
import torch
import torch.nn.functional as F


def check_nm(n: int, m: int) -> None:
    if not (0 < n < m):
        raise ValueError(f"N:M sparsity needs 0 < n < m, got {n}:{m}")


def keep_mask_nm(x: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Boolean mask keeping, in each group of m consecutive entries of the last dim, the n of
    largest magnitude. Ties go to the lower index, so the mask is deterministic (all-zero groups
    keep their first n entries, which changes nothing numerically).

    Max/compare formulation: an entry is kept when fewer than n entries of its group beat it,
    where j beats i if |x_j| > |x_i|, or |x_j| == |x_i| and j < i. m passes of elementwise
    compares; no topk, sort or scatter.
    """
    check_nm(n, m)
    k = x.shape[-1]
    if k % m:
        raise ValueError(f"last dim {k} is not a multiple of m={m}")
    mag = x.abs().reshape(*x.shape[:-1], k // m, m)
    beaten_by = torch.zeros(mag.shape, dtype=torch.int8, device=x.device)
    position = torch.arange(m, device=x.device)
    for j in range(m):
        other = mag[..., j:j + 1]
        beaten_by += (other > mag) | ((other == mag) & (position > j))
    return (beaten_by < n).reshape(x.shape)


def sparsify_nm(x: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Zero all but the n largest-magnitude entries of each group of m along the last dim."""
    return torch.where(keep_mask_nm(x, n, m), x, torch.zeros((), dtype=x.dtype, device=x.device))


def norm_compensation_scale(x: torch.Tensor, x_kept: torch.Tensor) -> torch.Tensor:
    """Per-token scale s = ||x|| / ||x_kept|| (fp32, shape x.shape[:-1] + (1,)).

    s * x_kept has the dense token's L2 norm. A token whose kept part is all zero (so the whole
    token is zero, since the largest entries are kept) gets s = 1 instead of 0/0.
    """
    dense_sq = x.float().square().sum(-1, keepdim=True)
    kept_sq = x_kept.float().square().sum(-1, keepdim=True)
    safe_kept = torch.where(kept_sq > 0, kept_sq, torch.ones_like(kept_sq))
    return torch.where(kept_sq > 0, torch.sqrt(dense_sq / safe_kept), torch.ones_like(kept_sq))


def sparse_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            compensate: bool, n: int = 2, m: int = 4) -> torch.Tensor:
    """y = s * (sparse(x) @ W^T) + b, the product in x's dtype, scale and bias applied in fp32.

    The scale is applied after the product (it is per token, so it commutes with the GEMM);
    that is also where the fast kernels apply it.
    """
    x_kept = sparsify_nm(x, n, m)
    y = F.linear(x_kept, weight)
    if not compensate and bias is None:
        return y
    y = y.float()
    if compensate:
        y = y * norm_compensation_scale(x, x_kept)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
