"""Turning a diffusion model's selected linears into Lynx linears without touching its weights.

A `LynxPlan` holds, per selected layer, a `LynxLinearForward`: an nn.Module that a method bound to
that linear (`bound_to`), installed as the linear's `forward`, calls; it computes with the linear's
own weight and bias. With precision fp8 the layers the selection keeps dense get one too, computing
the dense e4m3 product, and so do the blocks' modulation linears (the policy's per-image layers),
reading their weight in e4m3. ComfyUI
installs these through ModelPatcher object patches (so they live on a clone and are undone on
unpatch); outside ComfyUI `installed(plan)` installs them for the duration of a `with` block.
A Lynx LoRA's folded part is a weight patch: ComfyUI adds it through ModelPatcher weight patches
(its LoRA mechanism), `installed` adds it to the weights and restores them from a copy on exit.
"""
import copy
import re
import types
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.nn as nn

from ..kernels import (GatedResidual, cat_gelu_tanh, fast_path_availability, fp8_dense_availability,
                       fp8_dense_shape_supported, gelu_tanh_reference, quantize_weight_fp8)
from .batched_modulation import BatchedModulation
from .linear import (FOLDED_BRANCH_CONFIG, LowRankBranch, LynxConfig, fp8_dense_linear, fp8_weight_linear, lynx_linear,
                     lynx_linear_after_gelu, lynx_linear_modulated, modulated_layer_norm)
from .lora import LynxLoRA, check_fits
from .policies import (ArchitecturePolicy, LayerDecision, SelectionOptions, detect_architecture, is_linear,
                       select_layers, unmeasured_build)

# (module, input) -> (weight, bias, release): the weight and bias to compute with, and a callback
# (or None) to run once the product is done. ComfyUI supplies one that casts/offloads as it would.
WeightProvider = Callable[[nn.Module, torch.Tensor], tuple]


def module_weights(module: nn.Module, x: torch.Tensor):
    return module.weight, module.bias, None


@dataclass
class LynxRuntime:
    """State shared by the patched layers of one patched model."""
    dense_warmup_steps: int = 0
    # Whether the step being computed is a dense warm-up step. A plain bool, set once per model
    # call by the sampler-side wrapper, so torch.compile sees at most two variants of the graph.
    dense: bool = False
    # Whether the model call carries inputs the fused blocks do not compute (a text attention mask),
    # set per call by the host's wrapper: those calls run the blocks' own forwards.
    blocks_as_they_are: bool = False
    # The host's check before each layer computes, which its own layers run (ComfyUI: run_every_op,
    # where Cancel takes effect); None: none.
    before_each_call: Callable[[], None] | None = None
    # (vec, product): the model call's one modulation product (batched_modulation), made by its
    # first block; the host's wrapper sets None before and after each call.
    modulation_product: tuple | None = None

    def set_step(self, step_index: int | None) -> None:
        self.dense = step_index is not None and step_index < self.dense_warmup_steps


def sampling_step_index(sample_sigmas: torch.Tensor | None, sigma: torch.Tensor) -> int | None:
    """Index of the sampling step that evaluates the model at `sigma`, given the schedule
    (descending sigmas, one more than steps). Evaluations between two schedule points (second-order
    samplers) belong to the step they started from. None when the schedule is unknown."""
    if sample_sigmas is None or sample_sigmas.numel() < 2:
        return None
    current = sigma.detach().float().max().to(sample_sigmas.device)
    at_or_above = (sample_sigmas.float() >= current * (1 - 1e-4)).sum().item()
    return max(int(at_or_above) - 1, 0)


def _written_into(previous: torch.Tensor | None, new: torch.Tensor | None) -> torch.Tensor | None:
    """`new`'s values in `previous`'s memory where that has its shape, dtype and device; else `new`."""
    if (previous is None or new is None or previous is new or previous.shape != new.shape
            or previous.dtype != new.dtype or previous.device != new.device or not previous.is_contiguous()):
        return new
    previous.copy_(new)
    return previous


def _forward_calling(layer: "LynxLinearForward"):
    # A function of its own per layer (the layer in its closure), bound to the linear by bound_to.
    def forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return layer(x, module=module)
    forward.rt_lynx_layer = layer
    return forward


def lynx_layer(module: nn.Module) -> "LynxLinearForward | None":
    """The Lynx forward installed on `module` (as `module.forward = layer.bound_to(module)`), or None."""
    if isinstance(module._modules.get("forward"), LynxLinearForward):
        # `module.forward = layer` makes it a child module, and module(x) still runs the class's forward.
        raise TypeError(f"a LynxLinearForward was set as {type(module).__name__}.forward itself; install "
                        "layer.bound_to(module) instead")
    forward = module.__dict__.get("forward")
    if not isinstance(forward, types.MethodType):   # (Dynamo reads getattr(forward, "__func__", None) as None)
        return None
    return getattr(forward.__func__, "rt_lynx_layer", None)


class LynxLinearForward(nn.Module):
    """The forward of one patched linear: y = lynx_linear(x, module's weight, module's bias), or for
    a layer an fp8 model keeps dense (sparse=False) y = fp8_dense_linear(...).

    Installed as `bound_to(module)`, a method bound to the linear that calls this object with the
    linear as `module=`. Why an nn.Module reached that way: torch.compile guards on every Python value
    a compiled call read, on every call, except that it skips the guards under nn.Modules whose
    dicts did not change; an object of another type as the forward (holding its module) made a
    compiled FLUX model's guard check 10x longer than the dense one's (bench/guard_time.py). Calls
    from a compiled region pass `module=` and never read `self.module`, so the linear is reached by
    one path only (two would add a guard that they are the same object)."""

    def __init__(self, module: nn.Linear, name: str, config: LynxConfig, runtime: LynxRuntime,
                 weights: WeightProvider = module_weights, lora: LowRankBranch | None = None, sparse: bool = True,
                 folded: LowRankBranch | None = None):
        if not sparse and (lora is not None or folded is not None or not config.quantizes_dense_layers):
            raise ValueError(f"{name}: a dense layer is only patched for its fp8 product, without a LoRA branch")
        super().__init__()
        self.module = module
        self.name = name
        self.config = config
        self.runtime = runtime
        self.weights = weights
        self.lora = lora
        # A folded branch: already in the weight the provider gives (a weight patch), taken back off
        # where a call computes dense.
        self.folded = folded
        self.sparse = sparse
        # fp8 precision: the e4m3 weight, made once while the weight stays put (prepare_fp8) and
        # dropped when the model is unloaded; without it each call quantises its weight. The bias
        # the layer computes with beside it, where that is not the module's own (cast per call).
        self.fp8_weight: tuple[torch.Tensor, torch.Tensor] | None = None
        self.fp8_bias: torch.Tensor | None = None
        self._owns_fp8_weight = False   # a copy made here, not the layer's stored e4m3 weight
        # A modulation linear's place in its plan's one modulation product (batched_modulation): the
        # BatchedModulation and this layer's output columns there; None for every other layer.
        self.batch: BatchedModulation | None = None
        self.batch_columns: tuple[int, int] | None = None

    @property
    def module(self) -> nn.Module:
        """The linear this forward computes for."""
        return self.__dict__["_linear"]

    def __setattr__(self, name, value):
        if name == "module":   # kept past nn.Module's registration: the linear is the parent, not a child
            self.__dict__["_linear"] = value
        else:
            super().__setattr__(name, value)

    def bound_to(self, module: nn.Module):
        """What to install as `module.forward`: a method bound to the linear that calls this object."""
        return types.MethodType(_forward_calling(self), module)

    def __call__(self, x: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
        return self._with_weights(x, lambda weight, bias: self._product(x, weight, bias), module)

    # The producer's elementwise work taken into the sparsify pass (lynx_linear_modulated,
    # lynx_linear_after_gelu): for the sparse product, with a LoRA branch in bf16 (the kernels take
    # it where their fused down pass does); every other case computes that work first and calls
    # the layer.

    def modulated(self, x: torch.Tensor, shift: torch.Tensor, scale1p: torch.Tensor, eps: float,
                  modulated_input: Callable[[], torch.Tensor] | None = None,
                  module: nn.Module | None = None) -> torch.Tensor:
        """self(modulated_layer_norm(x, shift, scale1p, eps)) for a DiT block's input x (images,
        tokens, features), shift and scale1p one row per image. `modulated_input()`, when given,
        computes that input where it must be written (the linears of one input share it)."""
        if modulated_input is None:   # `is None`, not `or`: torch 2.11's Dynamo cannot branch on a function
            modulated_input = lambda: modulated_layer_norm(x, shift, scale1p, eps)  # noqa: E731
        if x.dim() != 3 or not self._takes_prologue():
            return self(modulated_input(), module)
        return self._with_weights(x, lambda weight, bias: lynx_linear_modulated(
            x, shift, scale1p, eps, weight, bias, self.config, self.fp8_weight, modulated_input, self.lora,
            self.folded), module)

    def after_gelu(self, x: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
        """self(gelu(x, approximate="tanh")): an MLP's down projection of its up projection's output x."""
        if not self._takes_prologue():
            return self(gelu_tanh_reference(x), module)
        return self._with_weights(x, lambda weight, bias: lynx_linear_after_gelu(
            x, weight, bias, self.config, self.fp8_weight, self.lora, self.folded), module)

    def gated_residual(self, residual: torch.Tensor, gate: torch.Tensor, x: torch.Tensor,
                       after_gelu: bool = False, module: nn.Module | None = None) -> torch.Tensor:
        """addcmul(residual, gate, self(x)) (self.after_gelu(x) with `after_gelu`): a DiT block's gated
        residual around this layer, residual shaped as the output, gate one row per image. The sparse
        product adds it in its GEMM's epilogue where the kernels take it (one image), so the layer's
        output is never written; every other case computes the layer, then the addcmul."""
        if not self._takes_epilogue() or (after_gelu and not self._takes_prologue()):
            return torch.addcmul(residual, gate, self.after_gelu(x, module) if after_gelu else self(x, module))
        gated = GatedResidual(residual, gate)
        if after_gelu:
            return self._with_weights(x, lambda weight, bias: lynx_linear_after_gelu(
                x, weight, bias, self.config, self.fp8_weight, self.lora, self.folded, residual=gated), module)
        return self._with_weights(x, lambda weight, bias: self._product(x, weight, bias, gated), module)

    def after_cat_gelu(self, first: torch.Tensor, second: torch.Tensor, residual: torch.Tensor | None = None,
                       gate: torch.Tensor | None = None, module: nn.Module | None = None) -> torch.Tensor:
        """self(cat((first, gelu(second, approximate="tanh")), -1)): FLUX's single-block linear2 of
        the attention output and the MLP's up projection. A layer an fp8 model keeps dense (the
        default for linear2) makes that input inside its quantise pass; others get it written once.
        With `residual` and `gate`: addcmul(residual, gate, that), as gated_residual."""
        if self.sparse:
            joined = cat_gelu_tanh(first, second)
            return self(joined, module) if residual is None else self.gated_residual(residual, gate, joined,
                                                                                     module=module)
        gated = None if residual is None else GatedResidual(residual, gate)
        return self._with_weights(first, lambda weight, bias: fp8_dense_linear(
            first, weight, bias, self.config, dense=self.runtime.dense, fp8_weight=self.fp8_weight, gelu_tail=second,
            residual=gated), module)

    def _takes_prologue(self) -> bool:
        # An fp8 layer adds its LoRA branch after the product, from the input written out.
        return self.sparse and not self.runtime.dense and (self.lora is None or self.config.precision == "bf16")

    def _takes_epilogue(self) -> bool:
        # The sparse product's call takes the residual (and adds it after where its kernel cannot).
        return self.sparse

    def _with_weights(self, x: torch.Tensor, product, module: nn.Module | None) -> torch.Tensor:
        if self.runtime.before_each_call is not None:
            self.runtime.before_each_call()
        weight, bias, release = self._weights_for(x, self.module if module is None else module)
        y = product(weight, bias)
        if release is not None:
            release()
        return y

    def _computes_in_fp8(self, x: torch.Tensor) -> bool:
        return self.config.runs_sparse(x)   # shorter inputs compute dense, in the model's dtype

    def _weights_for(self, x: torch.Tensor, module: nn.Module):
        if (self.fp8_weight is not None and not self.runtime.dense and self._computes_in_fp8(x)
                and self.fp8_weight[0].device == x.device):
            # The e4m3 weight is ready: only the bias is needed, not the provider's cast of the weight
            # (an fp8 checkpoint's weight would be cast to 16 bits on every call for nothing, a weight
            # kept off the device streamed in).
            bias = module.bias if self.fp8_bias is None else self.fp8_bias
            if bias is not None and bias.device != x.device:
                bias = bias.to(x.device)
            return module.weight, bias, None
        return self.weights(module, x)

    def _product(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 residual: GatedResidual | None = None) -> torch.Tensor:
        if self.sparse:
            return lynx_linear(x, weight, bias, self.config, self.lora, dense=self.runtime.dense,
                               fp8_weight=self.fp8_weight, folded=self.folded, residual=residual)
        return fp8_dense_linear(x, weight, bias, self.config, dense=self.runtime.dense, fp8_weight=self.fp8_weight)

    def prepare_fp8(self, weight: torch.Tensor, weight_scale: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None, keep_addresses: bool = False) -> None:
        """Make the e4m3 weight ahead of time from what this layer computes with, weight * weight_scale
        (one scale for the tensor, as scaled fp8 checkpoints store, or one per output channel), on its
        compute device. A weight stored in e4m3 is taken as it is: no copy, no second rounding.
        `bias`: the bias the layer computes with, where its host casts or patches it per call (kept
        as a copy).
        `keep_addresses`: write the new values into the tensors a previous call made where they fit
        (a model replaying CUDA graphs reads its weights where the graphs were recorded; new
        addresses would make it record again)."""
        if self.config.precision != "fp8":
            return
        weight = weight.detach()
        out_features = weight.shape[0]
        scale = torch.ones((), device=weight.device) if weight_scale is None else weight_scale.detach().float()
        if scale.numel() not in (1, out_features):
            raise ValueError(f"{self.name}: a weight scale of {scale.numel()} values for {out_features} output "
                             f"channels; expected one, or one per channel")
        per_channel = scale.to(weight.device).reshape(-1).expand(out_features)
        stored = weight.dtype == torch.float8_e4m3fn and weight.is_contiguous()
        if stored:
            new_weight, new_scale = weight, per_channel.clone()   # the scale always a tensor of our own
        else:
            scaled = weight if weight_scale is None else weight.float() * per_channel[:, None]
            new_weight, new_scale = quantize_weight_fp8(scaled, self.config.backend)
        new_bias = None if bias is None else bias.detach().clone()
        previous_weight, previous_scale = self.fp8_weight or (None, None)
        if keep_addresses:
            if not stored and self._owns_fp8_weight:   # never written into: a stored weight is the model's
                new_weight = _written_into(previous_weight, new_weight)
            new_scale = _written_into(previous_scale, new_scale)
            new_bias = _written_into(self.fp8_bias, new_bias)
        self.fp8_weight, self.fp8_bias, self._owns_fp8_weight = (new_weight, new_scale), new_bias, not stored

    def write_fp8_into(self, weight: torch.Tensor, scale: torch.Tensor) -> None:
        """Have the next prepare_fp8 with keep_addresses write the e4m3 weight and its scale into these
        tensors (this layer's rows of a BatchedModulation)."""
        self.fp8_weight, self._owns_fp8_weight = (weight, scale), True

    def release_fp8(self) -> None:
        self.fp8_weight = self.fp8_bias = None
        self._owns_fp8_weight = False

    def holds_fp8_copy(self) -> bool:
        """Whether an e4m3 copy of this layer's weight, made here, is held (prepare_fp8 with
        keep_addresses writes a new one into it)."""
        return self._owns_fp8_weight and self.fp8_weight[0].shape == self.module.weight.shape

    def rebound(self, module: nn.Module) -> "LynxLinearForward":
        """This forward for `module`, the same layer of a copy of the model (no per-run state)."""
        forward = copy.copy(self)
        forward.module = module
        forward.release_fp8()
        # Branches of their own: a copy on another device (multi-GPU) keeps its prepared factors.
        forward.lora = None if self.lora is None else replace(self.lora, _device_copy=())
        forward.folded = None if self.folded is None else replace(self.folded, _device_copy=())
        return forward

    def with_lora(self, lora: LowRankBranch | None, folded: LowRankBranch | None = None) -> "LynxLinearForward":
        """This layer with a Lynx LoRA: a branch computed at run time and / or one folded into the weight."""
        return LynxLinearForward(self.module, self.name, self.config, self.runtime, self.weights, lora, self.sparse,
                                 folded)

    def prepare_branches(self, device: torch.device, dtype: torch.dtype) -> None:
        """Put the Lynx LoRA's factors on the compute device ahead of a run, in the form its calls take."""
        if self.lora is not None:
            self.lora.prepare(device, dtype, self.config)
        if self.folded is not None:
            self.folded.prepare(device, dtype, FOLDED_BRANCH_CONFIG)

    def release_branches(self) -> None:
        for branch in (self.lora, self.folded):
            if branch is not None:
                branch.release()


class PerImageFp8Forward(LynxLinearForward):
    """The forward of a block's modulation linear in an fp8 model (one input row per image): the
    weight read in e4m3, x kept in its dtype (fp8_weight_linear); dense warm-up steps compute it as
    the original layer does."""

    def __init__(self, module: nn.Linear, name: str, config: LynxConfig, runtime: LynxRuntime,
                 weights: WeightProvider = module_weights):
        super().__init__(module, name, config, runtime, weights, sparse=False)

    def _computes_in_fp8(self, x: torch.Tensor) -> bool:
        return True

    def _product(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return fp8_weight_linear(x, weight, bias, self.config, dense=self.runtime.dense, fp8_weight=self.fp8_weight)


@dataclass
class LynxPlan:
    policy: ArchitecturePolicy
    config: LynxConfig
    runtime: LynxRuntime
    decisions: list[LayerDecision]
    forwards: dict[str, LynxLinearForward] = field(default_factory=dict)   # the sparsified layers
    lora_note: str = ""
    # With precision fp8: the layers the selection keeps dense, computing the dense e4m3 product.
    fp8_dense_forwards: dict[str, LynxLinearForward] = field(default_factory=dict)
    # What else computes differently around the linears (ComfyUI: FLUX blocks with fused elementwise work).
    block_note: str = ""
    # With precision fp8 (and fp8_dense_layers): the blocks' modulation linears, e4m3 weights.
    per_image_forwards: dict[str, LynxLinearForward] = field(default_factory=dict)
    # Said when the model is built otherwise than those the policy's layer choice was measured on.
    build_note: str = ""
    # The per-image forwards' e4m3 weights side by side, for one modulation product per model call.
    modulation_batch: BatchedModulation | None = None

    def __post_init__(self):
        if self.modulation_batch is not None and any(self.per_image_forwards.get(f.name) is not f
                                                     for f in self.modulation_batch.forwards):
            raise ValueError("the plan's modulation batch holds other forwards than its per-image forwards")

    def rebound(self, model: nn.Module) -> "LynxPlan":
        """This plan for `model`, a copy of the model it was made for (the same layer names); the
        runtime is shared, so the host's wrappers of the original still drive it."""
        modules = dict(model.named_modules())

        def rebind(forwards):
            return {name: forward.rebound(modules[name]) for name, forward in forwards.items()}
        per_image = rebind(self.per_image_forwards)
        return replace(self, forwards=rebind(self.forwards), fp8_dense_forwards=rebind(self.fp8_dense_forwards),
                       per_image_forwards=per_image,
                       modulation_batch=None if self.modulation_batch is None else BatchedModulation.of(per_image.values()))

    @property
    def installed_forwards(self) -> dict[str, LynxLinearForward]:
        """Every forward the plan puts in place: the sparsified layers, the fp8 dense ones and the
        fp8 modulation linears."""
        return {**self.forwards, **self.fp8_dense_forwards, **self.per_image_forwards}

    @property
    def sparse_layer_shapes(self) -> dict[str, tuple[int, int]]:
        return {d.name: (d.in_features, d.out_features) for d in self.decisions if d.sparse}

    def summary(self, device: torch.device | None = None) -> str:
        sparse = [d for d in self.decisions if d.sparse]
        dense = [d for d in self.decisions if not d.sparse]
        reasons: dict[str, int] = {}
        for d in dense:
            reasons[d.reason] = reasons.get(d.reason, 0) + 1
        kept = "; ".join(f"{count} {reason}" for reason, count in reasons.items())
        precision = " fp8" if self.config.precision == "fp8" else ""
        text = (f"RT-Lynx: {self.policy.name}, {len(sparse)} linears sparsified {self.config.pattern}{precision}"
                f"{' + norm compensation' if self.config.compensate else ''}, "
                f"{len(dense)} kept dense{f' ({kept})' if kept else ''}")
        if self.fp8_dense_forwards:
            text += f", {len(self.fp8_dense_forwards)} of them in fp8"
        if self.per_image_forwards:
            text += f", {len(self.per_image_forwards)} modulation linears with e4m3 weights"
        if self.runtime.dense_warmup_steps:
            text += f", first {self.runtime.dense_warmup_steps} steps dense"
        if self.lora_note:
            text += f", {self.lora_note}"
        if self.block_note:
            text += f", {self.block_note}"
        if self.build_note:
            text += f", {self.build_note}"
        text += f", backend {self.config.backend}"
        if device is not None and self.config.backend != "reference":
            available, why_not = fast_path_availability(device, self.config.precision)
            text += f" -> {why_not}" if available else f" -> reference ({why_not})"
            kinds = [(label, kernel) for label, kernel, present in (
                ("fp8 dense layers", "e4m3 dense GEMM", self.fp8_dense_forwards),
                ("modulation", "e4m3-weight kernel", self.per_image_forwards)) if present]
            if kinds:
                available, why_not = fp8_dense_availability(device)
                if available:
                    text += "".join(f"; {label} -> {kernel}" for label, kernel in kinds)
                else:
                    text += f"; {' and '.join(label for label, _ in kinds)} -> reference ({why_not})"
        return text


def plan_model(model: nn.Module, config: LynxConfig = LynxConfig(),
               selection: SelectionOptions | None = None, runtime: LynxRuntime | None = None,
               weights: WeightProvider = module_weights, policy: ArchitecturePolicy | None = None) -> LynxPlan:
    """Decide which linears of `model` (the diffusion model itself) become Lynx linears. `policy`:
    for a model none of the pack's policies detects (benchmarks on other transformers)."""
    policy = policy or detect_architecture(model)
    selection = selection or SelectionOptions(m=config.m)
    if selection.m != config.m:
        raise ValueError(f"selection groups of {selection.m} but pattern {config.pattern}")
    runtime = runtime or LynxRuntime()
    decisions = select_layers(model, policy, selection)
    modules = dict(model.named_modules())
    forwards = {d.name: LynxLinearForward(modules[d.name], d.name, config, runtime, weights)
                for d in decisions if d.sparse}
    fp8_dense, per_image = {}, {}
    if config.quantizes_dense_layers:
        fp8_dense = {d.name: LynxLinearForward(modules[d.name], d.name, config, runtime, weights, sparse=False)
                     for d in decisions if not d.sparse and fp8_dense_shape_supported(d.in_features, d.out_features)}
        per_image = {name: PerImageFp8Forward(module, name, config, runtime, weights)
                     for name, module in modules.items() if _is_per_image_layer(policy, name, module)}
    return LynxPlan(policy, config, runtime, decisions, forwards, fp8_dense_forwards=fp8_dense,
                    per_image_forwards=per_image, build_note=unmeasured_build(model, policy),
                    modulation_batch=BatchedModulation.of(per_image.values()))


def _is_per_image_layer(policy: ArchitecturePolicy, name: str, module: nn.Module) -> bool:
    # in_features a multiple of 16: the e4m3-weight kernel's 16-byte loads (every model here has it)
    return (policy.per_image_layers is not None and is_linear(module)
            and re.fullmatch(policy.per_image_layers, name) is not None and module.in_features % 16 == 0)


def attach_lora(plan: LynxPlan, lora: LynxLoRA, strength: float) -> LynxPlan:
    """A new plan whose layers carry the file's compensation branch (the old plan is unchanged)."""
    if plan.lora_note:
        raise ValueError(f"this model already carries a Lynx LoRA ({plan.lora_note}); attach one per model")
    check_fits(lora, plan.policy.name, plan.config.pattern, plan.config.compensate, plan.sparse_layer_shapes)
    forwards = {name: fwd.with_lora(lora.branch(name, strength), lora.folded_branch(name, strength))
                for name, fwd in plan.forwards.items()}
    total = len(plan.forwards)
    parts = [f"rank {lora.rank} on {len(lora.layers)}/{total} layers"] if lora.layers else []
    if lora.folded_layers:
        parts.append(f"rank {lora.folded_rank} folded into the weights of {len(lora.folded_layers)}/{total} layers")
    return replace(plan, forwards=forwards, lora_note=f"Lynx LoRA x{strength:g}: {' + '.join(parts)}")


def folded_weight_patches(plan: LynxPlan) -> dict[str, LowRankBranch]:
    """Layer name -> the folded branch to add to its weight (scale * up @ down)."""
    return {name: fwd.folded for name, fwd in plan.forwards.items() if fwd.folded is not None}


@contextmanager
def installed(model: nn.Module, plan: LynxPlan):
    """Run `model` with the plan's forwards in place, a Lynx LoRA's folded part added to its weights;
    restores the modules (and those weights, from a copy) on exit."""
    modules = dict(model.named_modules())
    previous, saved_weights = {}, {}
    batch = plan.modulation_batch
    if batch is not None and any(f.module.weight.dtype == torch.float8_e4m3fn for f in batch.forwards):
        batch = None   # a weight stored in e4m3 is taken as it is: the one tensor would be a second copy
    try:
        for name, branch in folded_weight_patches(plan).items():
            weight = modules[name].weight
            saved_weights[name] = weight.detach().to("cpu", copy=True)   # off the GPU, as ComfyUI's backups
            with torch.no_grad():   # in fp32, then rounded once to the weight's dtype, as ComfyUI patches
                weight.copy_(weight.float() + branch.weight_delta().to(weight.device))
        forwards = plan.installed_forwards
        for name, forward in forwards.items():
            module = modules[name]
            previous[name] = module.__dict__.get("forward")
            module.forward = forward.bound_to(module)
            if forward.batch is None or batch is None:
                forward.prepare_fp8(module.weight)
        if batch is not None:
            first = batch.forwards[0].module
            batch.write(first.weight.device, first.bias.dtype if first.bias is not None else first.weight.dtype,
                        lambda forward: forward.prepare_fp8(forward.module.weight, keep_addresses=True))
        yield model
    finally:
        with torch.no_grad():
            for name, weight in saved_weights.items():
                modules[name].weight.copy_(weight)
        if batch is not None:
            batch.release()
        for name, old in previous.items():
            forwards[name].release_fp8()
            if old is None:
                del modules[name].forward
            else:
                modules[name].forward = old
