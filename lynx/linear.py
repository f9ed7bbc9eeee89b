"""How one RT-Lynx linear layer computes.

    y = s * (sparse(x) @ W^T) + b  +  up(down(x)) * scale
        |------------------------- kernels.sparse_linear --------------------------------|
                                            |-- optional Lynx LoRA, on the DENSE x --|

The LoRA branch is computed by the kernels too: on the sm90 backend inside the sparse GEMM (one
k-tile more), elsewhere as two small products added after. A Lynx LoRA's *folded* part is not
computed at all: its up @ down is added to W beforehand (lynx/lora.py), so it acts on sparse(x)
at no cost; the calls that compute dense take it back off (`folded=`).

With precision "fp8" the product runs on e4m3 operands: sparse(x) quantised per token (the
compensation folded into its scale) and W per output channel, quantised once per weight
(kernels.sparse_linear_fp8; kernels/reference.py defines the math). The layers such a model keeps
dense (for quality, or by the user's filters) run the same quantisation without the sparsity on
dense e4m3 tensor cores (`fp8_dense_linear`), unless `fp8_dense_layers` is off; so do the blocks'
per-image linears (modulation), with the weight alone in e4m3 (`fp8_weight_linear`).

A DiT block may hand a layer the elementwise work that makes its input rather than the input:
`lynx_linear_modulated` (the block's LayerNorm + modulation) and `lynx_linear_after_gelu` (the
MLP's GELU) compute that work followed by `lynx_linear`, with the work inside the kernels'
sparsify pass, so the input is never written (the same math up to rare one-ulp roundings). A
layer an fp8 model keeps dense may take its input as cat((first, gelu(second))) (FLUX's
single-block linear2: `fp8_dense_linear(..., gelu_tail=)`), made inside the quantise pass. The
block's gated residual after a layer, residual + gate * y (`residual=`), is added in the GEMM's
epilogue (the sparse one, or the dense e4m3 one of a layer kept dense) where the kernels take it, so
y is never written.

sparse(x) keeps the n largest |x| of each m consecutive input features (2:4 by default); s is
the per-token norm compensation ||x|| / ||sparse(x)|| (or 1 when switched off). Inputs with
fewer than `min_tokens` tokens per sequence (e.g. a modulation vector per image, a short prompt)
are computed dense.
"""
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from ..kernels import (PRECISIONS, REQUESTS, GatedResidual, LowRankOperands, cat_gelu_tanh, dense_linear_fp8,
                       gated_residual_reference, gelu_tanh_reference, linear_fp8_weight, log_once, low_rank_reference,
                       modulated_layer_norm_reference, prepare_low_rank, quantize_weight_fp8, sparse_linear,
                       sparse_linear_fp8, sparse_linear_gelu, sparse_linear_modulated)


@dataclass(frozen=True)
class LynxConfig:
    n: int = 2
    m: int = 4
    compensate: bool = True
    backend: str = "auto"
    min_tokens: int = 32
    precision: str = "bf16"   # "bf16": x's own 16-bit dtype; "fp8": e4m3 operands
    fp8_dense_layers: bool = True   # with "fp8": the layers kept dense also compute in e4m3

    def __post_init__(self):
        if not 0 < self.n < self.m:
            raise ValueError(f"pattern {self.n}:{self.m}: need 0 < n < m")
        if self.backend not in REQUESTS:
            raise ValueError(f"backend {self.backend!r}: choose one of {REQUESTS}")
        if self.min_tokens < 1:
            raise ValueError("min_tokens must be at least 1")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: choose one of {PRECISIONS}")
        if self.precision == "fp8" and (self.n, self.m) != (2, 4):
            raise ValueError(f"fp8 precision is defined for 2:4 only, not {self.pattern}")

    @property
    def pattern(self) -> str:
        return f"{self.n}:{self.m}"

    def sequence_tokens(self, x: torch.Tensor) -> int:
        """Tokens per sequence: x.shape[-2] for (batch, ..., tokens, features), rows for 2-D x.
        Counting per sequence, not per batch, keeps an image the same with or without CFG batching."""
        return x.shape[-2] if x.dim() >= 3 else x.numel() // max(x.shape[-1], 1)

    def runs_sparse(self, x: torch.Tensor) -> bool:
        return self.sequence_tokens(x) >= self.min_tokens

    @property
    def quantizes_dense_layers(self) -> bool:
        return self.precision == "fp8" and self.fp8_dense_layers


# A folded branch computes only on dense calls, as two small products (no K-extension form).
FOLDED_BRANCH_CONFIG = LynxConfig(backend="reference")


@dataclass
class LowRankBranch:
    """x -> up(down(x)) * scale; down is (rank, in_features), up is (out_features, rank)."""
    down: torch.Tensor
    up: torch.Tensor
    scale: float
    _device_copy: tuple = field(default=(), repr=False, compare=False)

    def __post_init__(self):
        if self.down.dim() != 2 or self.up.dim() != 2 or self.down.shape[0] != self.up.shape[1]:
            raise ValueError(f"low-rank branch shapes do not chain: down {tuple(self.down.shape)}, "
                             f"up {tuple(self.up.shape)}")

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def prepare(self, device: torch.device, dtype: torch.dtype, config: LynxConfig | None = None) -> None:
        """Put the factors on the compute device ahead of the run (outside any compiled region),
        in the form the backend there takes for `config`'s calls (default LynxConfig())."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())  # as tensors report it
        config = config or LynxConfig()
        key = self._copy_key(device, dtype, config)
        if self._device_copy and self._device_copy[0] == key:
            return   # kept where it is: a model replaying CUDA graphs reads it at the recorded addresses
        self._device_copy = (key, prepare_low_rank(self.down, self.up, self.scale, device, dtype, config.backend,
                                                   config.precision))

    @staticmethod
    def _copy_key(device: torch.device, dtype: torch.dtype, config: LynxConfig) -> tuple:
        # What the prepared form depends on (prepare_low_rank's arguments besides the factors).
        return device, dtype, config.backend, config.precision

    def release(self) -> None:
        self._device_copy = ()

    def operands_for(self, x: torch.Tensor, config: LynxConfig | None = None) -> LowRankOperands:
        # Kept on the compute device once, not copied on every call.
        config = config or LynxConfig()
        if not self._device_copy or self._device_copy[0] != self._copy_key(x.device, x.dtype, config):
            self.prepare(x.device, x.dtype, config)
        return self._device_copy[1]

    def __call__(self, x: torch.Tensor, config: LynxConfig | None = None) -> torch.Tensor:
        """The branch alone, up(down(x)) * scale (calibration, comparisons, a folded branch taken off)."""
        return low_rank_reference(x, self.operands_for(x, config))

    def weight_delta(self) -> torch.Tensor:
        """scale * up @ down (out_features x in_features, fp32): the branch as a change of the weight."""
        return (self.up.float() @ self.down.float()) * self.scale


def _e4m3_weight(weight: torch.Tensor, fp8_weight: tuple[torch.Tensor, torch.Tensor] | None,
                 config: LynxConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(wq, w_scale): the copy made ahead of time, else the weight quantised on this call."""
    return fp8_weight if fp8_weight is not None else quantize_weight_fp8(weight, config.backend)


def lynx_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: LynxConfig,
                lora: LowRankBranch | None = None, dense: bool = False,
                fp8_weight: tuple[torch.Tensor, torch.Tensor] | None = None,
                folded: LowRankBranch | None = None, residual: GatedResidual | None = None) -> torch.Tensor:
    """The Lynx product for x of shape (..., in_features); `dense=True` gives plain F.linear
    (plus the LoRA branch, which only makes sense with the sparse product, so it is skipped).
    `fp8_weight` is quantize_weight_fp8(weight) made ahead of time; without it an fp8 config
    quantises the weight in the call. `folded`: a branch already added to `weight` for the
    sparse product; a call that computes dense subtracts it (x W^T up to W's rounding).
    `residual`: the result is residual + gate * y (a block's gated residual; y shaped as x's)."""
    in_features = x.shape[-1]
    bias = _checked_bias(x, weight, bias)
    if dense or not config.runs_sparse(x):
        y = _model_dtype_linear(x, weight, bias, config, dense)
        return _with_residual(y if folded is None else y - folded(x, FOLDED_BRANCH_CONFIG), residual)
    if in_features % config.m:
        raise ValueError(f"in_features={in_features} is not a multiple of {config.m}: "
                         f"this layer cannot be {config.pattern} sparse")
    x2d = x.reshape(-1, in_features)
    low_rank = lora.operands_for(x, config) if lora is not None else None
    if config.precision == "fp8":
        wq, w_scale = _e4m3_weight(weight, fp8_weight, config)
        y = sparse_linear_fp8(x2d, wq, w_scale, bias, config.compensate, config.backend, low_rank, residual)
    else:
        y = sparse_linear(x2d, weight.to(x.dtype), bias, config.compensate, config.backend, config.n, config.m,
                          low_rank, residual)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _with_residual(y: torch.Tensor, residual: GatedResidual | None) -> torch.Tensor:
    return y if residual is None else gated_residual_reference(y, residual)


def modulated_layer_norm(x: torch.Tensor, shift: torch.Tensor, scale1p: torch.Tensor, eps: float) -> torch.Tensor:
    """A DiT block's LayerNorm (no affine) and modulation of x (images, tokens, features), as the
    model computes them: addcmul(shift, layer_norm(x), scale1p), shift and scale1p one row per image."""
    images, tokens, features = x.shape
    return modulated_layer_norm_reference(x.reshape(-1, features), shift.reshape(images, features),
                                          scale1p.reshape(images, features), tokens, eps).reshape(x.shape)


def lynx_linear_modulated(x: torch.Tensor, shift: torch.Tensor, scale1p: torch.Tensor, eps: float,
                          weight: torch.Tensor, bias: torch.Tensor | None, config: LynxConfig,
                          fp8_weight: tuple[torch.Tensor, torch.Tensor] | None = None,
                          modulated_input: Callable[[], torch.Tensor] | None = None,
                          lora: LowRankBranch | None = None, folded: LowRankBranch | None = None) -> torch.Tensor:
    """lynx_linear(modulated_layer_norm(x, shift, scale1p, eps), ..., lora) with the normalisation
    and modulation inside the kernels' sparsify pass where they can, so the block's modulated
    activations are never written; where they cannot (among others: a LoRA branch outside the
    fused down pass, fp8 with a branch), `modulated_input()` (when given; shaped as x) computes
    them."""
    images, tokens, features = x.shape
    if modulated_input is None:   # `is None`, not `or`: torch 2.11's Dynamo cannot branch on a function
        modulated_input = lambda: modulated_layer_norm(x, shift, scale1p, eps)  # noqa: E731

    def fused(x2d, *product, low_rank=None):
        return sparse_linear_modulated(x2d, shift.reshape(images, features), scale1p.reshape(images, features), tokens,
                                       eps, *product, modulated_input=lambda: modulated_input().reshape(-1, features),
                                       low_rank=low_rank)
    return _lynx_linear_after(x, modulated_input, fused, weight, bias, config, fp8_weight, lora, folded)


def lynx_linear_after_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: LynxConfig,
                           fp8_weight: tuple[torch.Tensor, torch.Tensor] | None = None,
                           lora: LowRankBranch | None = None, folded: LowRankBranch | None = None,
                           residual: GatedResidual | None = None) -> torch.Tensor:
    """lynx_linear(gelu(x, approximate="tanh"), ..., lora, residual=residual), an MLP's down
    projection, with the GELU inside the kernels' sparsify pass where it can be, so the activation is
    never written."""
    return _lynx_linear_after(x, lambda: gelu_tanh_reference(x), sparse_linear_gelu, weight, bias, config,
                              fp8_weight, lora, folded, residual)


def _lynx_linear_after(x, prepared_input, fused, weight, bias, config: LynxConfig, fp8_weight,
                       lora: LowRankBranch | None, folded: LowRankBranch | None,
                       residual: GatedResidual | None = None) -> torch.Tensor:
    """The Lynx product of prepared_input() (elementwise work on x): fused(x2d, weight, bias,
    compensate, backend[, w_scale], low_rank=[, residual=]) computes it from x itself; patterns other
    than 2:4 and inputs that run dense take prepared_input() through lynx_linear."""
    if (config.n, config.m) != (2, 4) or not config.runs_sparse(x):
        return lynx_linear(prepared_input(), weight, bias, config, lora, fp8_weight=fp8_weight, folded=folded,
                           residual=residual)
    bias = _checked_bias(x, weight, bias)
    x2d = x.reshape(-1, x.shape[-1])
    low_rank = lora.operands_for(x, config) if lora is not None else None
    gated = {} if residual is None else {"residual": residual}   # the modulated op takes none
    if config.precision == "fp8":
        wq, w_scale = _e4m3_weight(weight, fp8_weight, config)
        y = fused(x2d, wq, bias, config.compensate, config.backend, w_scale, low_rank=low_rank, **gated)
    else:
        y = fused(x2d, weight.to(x.dtype), bias, config.compensate, config.backend, low_rank=low_rank, **gated)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def fp8_dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: LynxConfig,
                     dense: bool = False, fp8_weight: tuple[torch.Tensor, torch.Tensor] | None = None,
                     gelu_tail: torch.Tensor | None = None, residual: GatedResidual | None = None) -> torch.Tensor:
    """A layer an fp8 model keeps dense: y = a * w_scale * (e4m3(x) @ wq^T) + b, x quantised per
    token, the weight per output channel (`fp8_weight`, else quantised in the call).
    `dense=True` (dense warm-up steps) and short inputs give plain F.linear, as in lynx_linear.
    With `gelu_tail` (x's leading dims) the input is cat((x, gelu_tanh(gelu_tail)), -1), which the
    quantise pass makes from both without writing it. `residual` as in lynx_linear."""
    if gelu_tail is not None and (dense or not config.runs_sparse(x) or gelu_tail.shape[:-1] != x.shape[:-1]):
        x, gelu_tail = cat_gelu_tanh(x, gelu_tail), None   # (which refuses mismatched leading dims)
    tail_features = 0 if gelu_tail is None else gelu_tail.shape[-1]
    bias = _checked_bias(x, weight, bias, tail_features)
    if dense or not config.runs_sparse(x):
        return _with_residual(_model_dtype_linear(x, weight, bias, config, dense), residual)
    wq, w_scale = _e4m3_weight(weight, fp8_weight, config)
    tail2d = None if gelu_tail is None else gelu_tail.reshape(-1, tail_features)
    y = dense_linear_fp8(x.reshape(-1, x.shape[-1]), wq, w_scale, bias, config.backend, tail2d, residual)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def fp8_weight_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: LynxConfig,
                      dense: bool = False, fp8_weight: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """A per-image linear of an fp8 model (a block's modulation: one input row per image and step):
    y = x @ (wq * w_scale)^T + b with the e4m3 weight made ahead of the run (`fp8_weight`), x kept in
    its dtype: the product is a read of the weight, and e4m3 halves it. Without that weight (no room
    for the copy, an offloaded layer) and in dense warm-up steps (`dense=True`): plain F.linear, as
    the original layer; quantising the weight in every call would cost more than the read it saves."""
    bias = _checked_bias(x, weight, bias)
    if dense or fp8_weight is None:
        return F.linear(x, weight.to(x.dtype), bias)
    wq, w_scale = fp8_weight
    y = linear_fp8_weight(x.reshape(-1, x.shape[-1]), wq, w_scale, bias, config.backend)
    return y.reshape(*x.shape[:-1], wq.shape[0])


def _checked_bias(x, weight, bias, tail_features: int = 0):
    if weight.shape[-1] != x.shape[-1] + tail_features:
        raise ValueError(f"input has {x.shape[-1] + tail_features} features, weight expects {weight.shape[-1]}")
    return bias.to(x.dtype) if bias is not None and bias.dtype != x.dtype else bias


def _model_dtype_linear(x, weight, bias, config: LynxConfig, dense: bool) -> torch.Tensor:
    if not dense and not torch.compiler.is_compiling():
        log_once(f"{config.sequence_tokens(x)} tokens x {x.shape[-1]} features: dense "
                 f"(fewer than {config.min_tokens} tokens per sequence)")
    return F.linear(x, weight.to(x.dtype), bias)  # weights stored in another dtype compute in x's
