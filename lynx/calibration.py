"""Calibrating a Lynx LoRA in closed form from activation statistics.

For each sparsified layer with weight W (N x K) the Lynx linear computes S(x) W^T (S = 2:4
sparsify, times the per-token norm compensation when the plan uses it). The low-rank branch adds
x M with M = down^T up^T (K x N, rank r) on the dense input, chosen to minimise over the tokens

    || x W^T - (S(x) W^T + x M) ||^2  =  || d W^T - x M ||^2,      d = x - S(x).

This is least squares in M. With C_xx = sum x^T x and C_xd = sum x^T d (both K x K, streamed over
the calibration tokens, activations never kept):

    unconstrained:  M* = C_xx^-1 C_xd W^T
    rank r:         minimise ||x (M* - M)||^2 = || L^T (M* - M) ||_F^2   with C_xx = L L^T,
                    so take the SVD L^T M* = U S V^T and M_r = L^-T U_r S_r V_r^T (top pairs from the
                    smaller Gram matrix's eigenvectors: far faster than a full SVD).

L^T M* = L^-1 C_xd W^T needs one triangular solve and no inverse. Factors split sqrt(S) to each
side so both stay well scaled in bf16; alpha = rank, so the branch scale is 1.

A ridge, a fraction of the mean eigenvalue of C_xx, is added before the Cholesky factorisation. Its
size matters when the calibration inputs are all of one kind and the model is then used on others,
as with a LoRA calibrated on one prompt: a near-zero ridge also fits the directions the calibration
data barely excites, and on inputs that do excite them the branch adds error instead of cancelling
it. bench/quality.py, digits DiT, PSNR against dense (compensation alone 25.5 dB), the runtime
branch of rank 16 calibrated on one digit and used on all ten: 16.8 dB with a ridge of 1e-6, 26.9
dB with 0.03 (calibrated on all digits: 28.9 and 28.7 dB). The folded part, predicting the dropped
values from the kept ones, leans on the calibration data more: rank 64 on one digit 19.7 dB at
1e-6, 26.4 dB at 0.3 (on all digits: 29.0 and 28.4 dB), hence its larger default.

A folded part (lynx/lora.py) acts on the sparse input instead, F added to W^T beforehand:

    || x W^T - S(x) (W^T + F) ||^2  =  || d W^T - S(x) F ||^2,

the same least squares with S(x) in place of x (statistics C_ss = sum S^T S, C_sd = sum S^T d), so
`fit_low_rank` serves both. It cannot see the dropped values d, only predict them from the kept
ones, so at equal rank it cancels less than the runtime branch (bench/quality.py measures both),
but it costs nothing at run time: the sparse GEMM multiplies W + F^T instead of W. Both together:
the folded part is fitted first, then the runtime branch on the model with it in place, against
the original weight W = W' - F^T (W' the patched weight the layer computes with):

    || x W^T - S(x) W'^T - x M ||^2  =  || d W'^T - x F - x M ||^2,  cross term C_xd W'^T - C_xx F.

Choices:
- Statistics are captured on the layer inputs of the *sparse* model (every planned layer computes
  as the plan says while capturing), which is what each layer sees at inference. All layers are
  fitted against the same sparse model, not sequentially, so the result does not depend on how
  the layers are grouped into passes.
- Each part takes its own passes over the inputs (the runtime one must see the folded model).
- Memory: each layer holds 2 K^2 accumulators. `memory_budget_bytes` packs layers into groups
  whose statistics fit it, one pass over the inputs per group. FLUX.1-dev with the default plan
  (190 sparsified layers: 152 double-block, K = 3072 except img/txt mlp.2 with K = 12288, and 38
  single-block linear1 with K = 3072) needs 57 GB of fp32 statistics (115 GB fp64): a 24 GB
  budget means 3 passes in fp32, an 8 GB budget 8 passes. With single-block linear2 sparsified
  too (228 layers, K up to 15360) it is 129 GB: 6 passes at 24 GB. A K = 12288 layer alone holds
  1.2 GB (fp32). `statistics_bytes` and `plan_groups` compute this for any plan.
"""
import logging
from dataclasses import dataclass, replace
from typing import Any, Callable, ContextManager, Iterable

import torch
import torch.nn as nn

from ..kernels import norm_compensation_scale, sparsify_nm
from .lora import LayerFactors, LynxLoRA
from .patching import LynxLinearForward, LynxPlan, attach_lora, installed

log = logging.getLogger("rt_lynx")

# Fractions of the mean eigenvalue (module docstring: calibrating on one kind of input).
RUNTIME_RIDGE = 0.03
FOLDED_RIDGE = 0.3


@dataclass(frozen=True)
class CalibrationProgress:
    pass_index: int          # 0-based pass over the inputs
    passes: int
    samples_done: int        # inputs run in this pass
    layers_fitted: int       # over all passes
    layers_total: int


def statistics_bytes(in_features: int, dtype: torch.dtype) -> int:
    """Memory of one layer's C_xx and C_xd."""
    return 2 * in_features * in_features * torch.tensor([], dtype=dtype).element_size()


def plan_groups(layer_in_features: dict[str, int], memory_budget_bytes: int | None,
                dtype: torch.dtype) -> list[list[str]]:
    """Layers (in the given order) packed greedily into groups whose statistics fit the budget;
    a layer larger than the budget alone gets its own group. None: one group."""
    if memory_budget_bytes is None:
        return [list(layer_in_features)] if layer_in_features else []
    groups, current, used = [], [], 0
    for name, k in layer_in_features.items():
        size = statistics_bytes(k, dtype)
        if current and used + size > memory_budget_bytes:
            groups.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    if current:
        groups.append(current)
    return groups


def sparse_input(x: torch.Tensor, n: int, m: int, compensate: bool) -> torch.Tensor:
    """S(x): what the Lynx product multiplies W with (kernels/reference.py numerics)."""
    kept = sparsify_nm(x, n, m)
    if not compensate:
        return kept
    return kept * norm_compensation_scale(x, kept).to(kept.dtype)


class _StatisticsCapture(LynxLinearForward):
    """A Lynx forward that first adds its input's C_xx, C_xd (for a folded part: C_ss, C_sd, that
    part multiplying S(x)) to running sums, then computes as the forward it stands in for."""

    def __init__(self, forward: LynxLinearForward, stats_dtype: torch.dtype | None, for_folded_part: bool = False):
        super().__init__(forward.module, forward.name, forward.config, forward.runtime, forward.weights,
                         forward.lora, forward.sparse, forward.folded)
        self.stats_dtype = stats_dtype
        self.for_folded_part = for_folded_part
        self.c_xx: torch.Tensor | None = None
        self.c_xd: torch.Tensor | None = None
        self.tokens = 0

    def __call__(self, x: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
        # Only calls the Lynx linear computes sparse have an error to cancel.
        if self.config.runs_sparse(x) and not self.runtime.dense:
            self._accumulate(x.detach().reshape(-1, x.shape[-1]))
        return super().__call__(x, module)

    def _takes_prologue(self) -> bool:
        # The layer's input must exist to be recorded: a fused block's LayerNorm + modulation or
        # GELU is computed first, then the call comes through __call__.
        return False

    def _takes_epilogue(self) -> bool:
        # Likewise a gated residual: the layer's call comes through __call__, then the addcmul.
        return False

    def layer_weight(self) -> torch.Tensor:
        """The weight the layer computes with (its weight provider: casts, LoRA patches, fp8
        scales), on the statistics' device."""
        probe = torch.zeros(1, self.c_xx.shape[0], dtype=torch.float32, device=self.c_xx.device)
        weight, _, release = self.weights(self.module, probe)
        weight = weight.detach().to(self.c_xx.device, torch.float32)
        if release is not None:
            release()
        return weight

    def _accumulate(self, x: torch.Tensor) -> None:
        # fp64 GEMMs are slow on most GPUs: fp32 there, fp64 on the CPU, unless told.
        dtype = self.stats_dtype or (torch.float64 if x.device.type == "cpu" else torch.float32)
        x = x.to(dtype)
        kept = sparse_input(x, self.config.n, self.config.m, self.config.compensate)
        d = x - kept
        seen = kept if self.for_folded_part else x   # what the part being fitted multiplies
        if self.c_xx is None:
            k = x.shape[-1]
            self.c_xx = torch.zeros(k, k, dtype=dtype, device=x.device)
            self.c_xd = torch.zeros(k, k, dtype=dtype, device=x.device)
        self.c_xx.addmm_(seen.T, seen)
        self.c_xd.addmm_(seen.T, d)
        self.tokens += x.shape[0]

    def fit(self, rank: int, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The part's factors from the statistics and the weight the layer computes with, which
        includes a folded part already in place (then fitted against the weight without it)."""
        folded_delta = None if self.folded is None else self.folded.weight_delta().to(self.c_xx.device)
        return fit_low_rank(self.c_xx, self.c_xd, self.layer_weight(), rank, ridge, folded_delta)


def fit_low_rank(c_xx: torch.Tensor, c_xd: torch.Tensor, weight: torch.Tensor, rank: int,
                 ridge: float, folded_delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(down (r x K), up (N x r)) minimising sum ||d W^T - x down^T up^T||^2 given the statistics
    (see the module docstring). `folded_delta` (N x K): a folded part included in `weight`; the
    error is then measured against weight - folded_delta. Computed in fp64 on the statistics' device."""
    c_xx = c_xx.double()
    k = c_xx.shape[0]
    rank = min(rank, k, weight.shape[0])
    chol = _damped_cholesky(c_xx, ridge)
    target = c_xd.double() @ weight.to(c_xx.device, torch.float64).T               # C_xd W^T, K x N
    if folded_delta is not None:
        target -= c_xx @ folded_delta.to(c_xx.device, torch.float64).T             # - C_xx F
    whitened = torch.linalg.solve_triangular(chol, target, upper=False)            # L^T M* = L^-1 C_xd W^T
    u, root, v = _top_singular(whitened, rank)
    down_t = torch.linalg.solve_triangular(chol.T, u * root, upper=True)           # L^-T U_r sqrt(S_r)
    return down_t.T.contiguous(), (v * root).contiguous()


def _damped_cholesky(c_xx: torch.Tensor, ridge: float, attempts: int = 8) -> torch.Tensor:
    """Cholesky factor of C_xx + ridge * mean(diag) * I. One scale for all features: a feature the
    calibration data barely excites gets the full damping, so the branch cannot blow up on inputs
    that excite it (a ridge scaled per feature lets it: a channel silent in calibration got a
    branch hundreds of times the error it should cancel in a synthetic test). Statistics
    accumulated in fp32 over many tokens can be indefinite (rounding, relative to the largest
    eigenvalue, when a few channels dominate, as in full-size FLUX): a jitter of 1e-6 of the mean
    diagonal, growing tenfold, is then added until the factorisation succeeds. The diagonal is
    damped in place on one copy: a K = 12288 fp64 matrix is 1.2 GB."""
    mean = c_xx.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    damped = c_xx.clone()
    damped.diagonal().add_(ridge * mean)
    added = 0.0
    for attempt in range(attempts):
        jitter = 0.0 if attempt == 0 else 10.0 ** (attempt - attempts + 1)
        damped.diagonal().add_((jitter - added) * mean)
        added = jitter
        chol, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            if attempt:
                log.info("RT-Lynx calibration: a %d-feature layer needed a jitter of %.0e x its mean diagonal",
                         c_xx.shape[0], jitter)
            return chol
    raise ValueError(f"calibration statistics are not positive definite even with a jitter of their mean "
                     f"diagonal: too few or degenerate calibration inputs for this layer ({c_xx.shape[0]} input "
                     f"features)")


def _top_singular(a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_r, sqrt(S_r), V_r) of a's top-`rank` SVD, from the eigenvectors of the smaller Gram matrix:
    a full SVD of a 3072 x 21504 fp64 matrix takes ~100 s on a CPU, this ~10 s. Only the top
    singular pairs are used, so squaring the condition number costs no accuracy that matters."""
    wide = a.shape[0] <= a.shape[1]
    gram = a @ a.T if wide else a.T @ a
    eigenvalues, vectors = torch.linalg.eigh(gram)                                # ascending
    top = vectors[:, -rank:].flip(-1)
    s = eigenvalues[-rank:].flip(-1).clamp_min(0).sqrt()
    # Zero singular values (data that never excites a direction) get a zero branch, not a division by 0.
    inverse = torch.where(s > s[:1] * 1e-12, 1 / s.clamp_min(torch.finfo(s.dtype).tiny), torch.zeros_like(s))
    other = (a.T @ top if wide else a @ top) * inverse
    u, v = (top, other) if wide else (other, top)
    return u, s.sqrt(), v


def uncalibrated_layers(plan: LynxPlan, lora: LynxLoRA) -> list[str]:
    """Sparsified layers of `plan` the file has no branch for: no calibration input reached them
    sparse (e.g. FLUX's text stream with fewer than min_tokens prompt tokens)."""
    return [name for name in plan.forwards if name not in lora.layers and name not in lora.folded_layers]


def calibrate_lynx_lora(model: nn.Module, plan: LynxPlan, inputs: Iterable, rank: int = 32,
                        run: Callable[[Any, Any], Any] | None = None,
                        install: Callable[[LynxPlan], ContextManager] | None = None,
                        memory_budget_bytes: int | None = None, stats_dtype: torch.dtype | None = None,
                        ridge: float = RUNTIME_RIDGE,
                        progress: Callable[[CalibrationProgress], None] | None = None,
                        folded_rank: int = 0, folded_ridge: float = FOLDED_RIDGE) -> LynxLoRA:
    """Fit a Lynx LoRA for every sparsified layer of `plan` on `model`: a runtime branch of rank
    `rank` and / or a part of rank `folded_rank` folded into the weights (0: none).

    inputs: model inputs, iterated once per pass (so a re-iterable sequence when the budget needs
    more than one pass, or both parts are fitted); each goes through `run(target, input)`, by
    default `target(*input)`.
    install: puts a plan's forwards in place for a pass and yields the `target` for `run`; by
    default `installed(model, plan)` (ComfyUI passes one that installs them on a ModelPatcher clone).
    memory_budget_bytes: bound on the statistics held at once (None: all layers in one pass).
    stats_dtype: accumulator dtype (default fp64 on the CPU, fp32 on accelerators).
    ridge, folded_ridge: each part's ridge, a fraction of the mean eigenvalue of its statistics
    (the module docstring says why these defaults).
    Layers no input reached sparse (e.g. always below min_tokens) are left out of the file.
    """
    if rank < 0 or folded_rank < 0 or rank == folded_rank == 0:
        raise ValueError(f"ranks {rank} (runtime) and {folded_rank} (folded): at least one must be positive, "
                         f"neither negative")
    if plan.lora_note:
        # The statistics would measure the error left by that branch against a wrong reference.
        raise ValueError(f"this model already carries a Lynx LoRA ({plan.lora_note}); calibrate on the model "
                         f"straight from the sparsify step")
    for part_rank in (rank, folded_rank):
        too_small = [name for name, (k, n) in plan.sparse_layer_shapes.items() if part_rank > min(k, n)]
        if too_small:
            raise ValueError(f"rank {part_rank} exceeds the in- or out-features of {', '.join(too_small[:4])}")
    run = run or (lambda module, item: module(*item) if isinstance(item, (tuple, list)) else module(item))
    install = install or (lambda capture_plan: installed(model, capture_plan))
    in_features = {name: fwd.module.in_features for name, fwd in plan.forwards.items()}
    groups = plan_groups(in_features, memory_budget_bytes, stats_dtype or torch.float32)
    parts = [(folded, part_rank, part_ridge) for folded, part_rank, part_ridge in
             ((True, folded_rank, folded_ridge), (False, rank, ridge)) if part_rank]
    passes = len(parts) * len(groups)
    if passes > 1 and iter(inputs) is inputs:
        raise ValueError(f"the calibration needs {passes} passes over the inputs: pass a sequence, not a one-shot "
                         f"iterator")
    lora = LynxLoRA(architecture=plan.policy.name, rank=0, alpha=0.0, pattern=plan.config.pattern,
                    compensation=plan.config.compensate, layers={})
    counter = _PassCounter(passes, len(parts) * len(in_features), progress)
    for folded, part_rank, part_ridge in parts:
        # The runtime branch is fitted on the model with the folded part in place.
        fitting_plan = attach_lora(plan, lora, 1.0) if lora.folded_layers else plan
        layers = _fit_part(fitting_plan, groups, inputs, run, install, folded, part_rank, stats_dtype, part_ridge,
                           counter)
        if folded:
            lora = replace(lora, folded_rank=part_rank, folded_alpha=float(part_rank), folded_layers=layers)
        else:
            lora = replace(lora, rank=part_rank, alpha=float(part_rank), layers=layers)
    if not lora.layers and not lora.folded_layers:
        raise ValueError(f"no calibration input ran a sparsified layer sparse (inputs below "
                         f"{plan.config.min_tokens} tokens compute dense): nothing to fit")
    return lora


class _PassCounter:
    """Progress over all passes of all parts."""

    def __init__(self, passes: int, layers_total: int, report: Callable[[CalibrationProgress], None] | None):
        self.passes, self.layers_total, self.report = passes, layers_total, report
        self.pass_index, self.samples, self.fitted = -1, 0, 0

    def next_pass(self) -> None:
        self.pass_index += 1
        self.samples = 0

    def sample_done(self) -> None:
        self.samples += 1
        self._report()

    def layer_fitted(self) -> None:
        self.fitted += 1
        self._report()

    def _report(self) -> None:
        if self.report:
            self.report(CalibrationProgress(self.pass_index, self.passes, self.samples, self.fitted,
                                            self.layers_total))


def _fit_part(plan: LynxPlan, groups: list[list[str]], inputs: Iterable, run, install, folded: bool, rank: int,
              stats_dtype, ridge: float, counter: _PassCounter) -> LayerFactors:
    layers = {}
    for group in groups:
        counter.next_pass()
        captures = {name: _StatisticsCapture(plan.forwards[name], stats_dtype, folded) for name in group}
        capture_plan = replace(plan, forwards={**plan.forwards, **captures})
        with torch.no_grad(), install(capture_plan) as target:
            for item in inputs:
                run(target, item)
                counter.sample_done()
            # Fitted while the plan is in place: the layer's weight is then the one it computed with.
            for name, capture in captures.items():
                if capture.c_xx is not None:
                    down, up = capture.fit(rank, ridge)
                    layers[name] = (down.float().cpu(), up.float().cpu())
                capture.c_xx = capture.c_xd = None  # release before the next group's pass
                counter.layer_fitted()
    return layers
