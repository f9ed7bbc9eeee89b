"""The RoPE table of FLUX-style DiTs (FLUX, Qwen-Image, Z-Image) as one op the compiler leaves whole.

  torch.ops.rt_lynx.rope_table(ids, theta, axes_dim) -> (batch, 1, tokens, sum(axes_dim) / 2, 2, 2) fp32

computes what ComfyUI's EmbedND (comfy.ldm.flux.layers) does, bit for bit: per position axis the
frequencies 1 / theta^linspace(0, (d - 2) / d, d / 2) in fp64, the angles position * frequency in
fp64, and [[cos, -sin], [sin, cos]] rounded to fp32. Under torch.compile Inductor fuses EmbedND into
one kernel that recomputes the fp64 power and both trigonometric functions for every output
element: 1.3 ms of every FLUX 1024² step on an H200 (bench/results/e2e-20261204-1646-*). As an op
with its own eager implementation it is about twenty small launches (ComfyUI's eager EmbedND about
forty). Elementwise ops only, so the values do not depend on how the tensors are laid out. Nothing
is cached between calls: an allocation kept from a call would outlive a CUDA-graph warm-up's pool.
"""
import torch

from . import cusparselt as _cusparselt


def _define_op():
    if _cusparselt.op_defined("rope_table"):
        return
    lib = torch.library.Library("rt_lynx", "FRAGMENT")
    lib.define("rope_table(Tensor ids, float theta, int[] axes_dim) -> Tensor")
    lib.impl("rope_table", rope_table_eager, "CompositeExplicitAutograd")

    @torch.library.register_fake("rt_lynx::rope_table", lib=lib)
    def _(ids, theta, axes_dim):
        _check(ids, axes_dim)
        return ids.new_empty((*ids.shape[:-1], sum(axes_dim) // 2, 2, 2), dtype=torch.float32).unsqueeze(1)

    _define_op.library = lib


def _check(ids: torch.Tensor, axes_dim) -> None:
    if ids.dim() != 3 or ids.shape[-1] != len(axes_dim):
        raise ValueError(f"rope_table: ids must be (batch, tokens, {len(axes_dim)}), got {tuple(ids.shape)}")
    if any(d <= 0 or d % 2 for d in axes_dim):
        raise ValueError(f"rope_table: every axis dim must be even and positive, got {list(axes_dim)}")


def rope_table_eager(ids: torch.Tensor, theta: float, axes_dim) -> torch.Tensor:
    _check(ids, axes_dim)
    positions = ids.to(torch.float32)
    angles = []
    for i, dim in enumerate(axes_dim):   # ComfyUI's rope, per position axis
        scale = torch.linspace(0, (dim - 2) / dim, steps=dim // 2, dtype=torch.float64, device=ids.device)
        omega = 1.0 / (theta ** scale)
        # fp32 positions times fp64 frequencies: the product in fp64, as ComfyUI's einsum promotes it
        angles.append(positions[..., i:i + 1] * omega)
    angle = torch.cat(angles, dim=-1)
    cos, sin = torch.cos(angle).to(torch.float32), torch.sin(angle).to(torch.float32)
    table = torch.stack([cos, -sin, sin, cos], dim=-1)   # rounding commutes with negation
    return table.view(*angle.shape, 2, 2).unsqueeze(1)


_define_op()


def rope_table(ids: torch.Tensor, theta: float, axes_dim) -> torch.Tensor:
    """ComfyUI's EmbedND(theta, axes_dim)(ids) for ids (batch, tokens, axes), as one op."""
    return torch.ops.rt_lynx.rope_table(ids, float(theta), [int(d) for d in axes_dim])
