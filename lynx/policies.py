"""Which linear layers RT-Lynx sparsifies, per architecture: the single source of that decision.

A policy lists the transformer blocks of an architecture and, inside a block, the linears whose
inputs are sparsified. Everything not listed (embedders, modulation/adaLN, final layer, norms)
stays dense; the blocks' modulation linears are listed apart, for fp8 precision's e4m3 weights.
Layer names are relative to the diffusion model (ComfyUI's `diffusion_model`).
"""
import re
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class ArchitecturePolicy:
    name: str
    # Each block list, in execution order: regex capturing the block index at the name's start.
    block_lists: tuple[str, ...]
    # In-block layer names (after "<list>.<i>.") that are sparsified.
    sparse_layers: str
    # In-block layers kept dense by default because sparsifying them costs visible quality.
    default_dense_layers: str | None
    # Layer names whose presence identifies the architecture.
    signature: tuple[str, ...]
    notes: str = ""
    # Full names of the linears applied once per image and step (the blocks' modulation / adaLN):
    # never sparsified; with fp8 precision their weights are read in e4m3 (lynx.linear.fp8_weight_linear).
    per_image_layers: str | None = None
    # Layers of the models the layer choice was measured on, beyond the signature: a model with the
    # signature but not these is built otherwise (FLUX.2's shared modulation, Chroma's) and gets the
    # same choice, unmeasured.
    measured_layers: tuple[str, ...] = ()


FLUX = ArchitecturePolicy(
    name="flux",
    block_lists=(r"double_blocks\.(\d+)\.", r"single_blocks\.(\d+)\."),
    sparse_layers=r"(img|txt)_attn\.(qkv|proj)|(img|txt)_mlp\.(0|2)|linear1|linear2",
    # linear2 of a single block holds the attention-out and MLP-down projections, which the
    # paper keeps dense for FLUX.
    default_dense_layers=r"linear2",
    signature=("double_blocks.0.img_attn.qkv", "single_blocks.0.linear1"),
    notes="FLUX.1 (ComfyUI comfy.ldm.flux.model.Flux)",
    per_image_layers=r"(double_blocks\.\d+\.(img|txt)_mod|single_blocks\.\d+\.modulation)\.lin",
    measured_layers=("double_blocks.0.img_mod.lin", "single_blocks.0.modulation.lin"),
)

QWEN_IMAGE = ArchitecturePolicy(
    name="qwen_image",
    block_lists=(r"transformer_blocks\.(\d+)\.",),
    sparse_layers=(r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
                   r"|(img|txt)_mlp\.net\.(0\.proj|2)"),
    default_dense_layers=None,
    signature=("transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.img_mlp.net.2"),
    notes="Qwen-Image (ComfyUI comfy.ldm.qwen_image.model.QwenImageTransformer2DModel)",
    per_image_layers=r"transformer_blocks\.\d+\.(img|txt)_mod\.1",
    measured_layers=("transformer_blocks.0.img_mod.1",),
)

Z_IMAGE = ArchitecturePolicy(
    name="z_image",
    block_lists=(r"layers\.(\d+)\.",),
    sparse_layers=r"attention\.(qkv|out)|feed_forward\.(w1|w2|w3)",
    # The paper keeps Z-Image's attention-out and MLP-up (w1 gate, w3 up) dense.
    default_dense_layers=r"attention\.out|feed_forward\.(w1|w3)",
    signature=("layers.0.attention.qkv", "layers.0.feed_forward.w2"),
    notes="Z-Image / Lumina 2 NextDiT (ComfyUI comfy.ldm.lumina.model.NextDiT); refiner blocks stay dense",
    # Lumina 2: Sequential(SiLU, Linear) -> ".1"; Z-Image (z_image_modulation): Sequential(Linear) -> ".0".
    per_image_layers=r"(layers|noise_refiner)\.\d+\.adaLN_modulation\.[01]",
)

POLICIES = {p.name: p for p in (FLUX, QWEN_IMAGE, Z_IMAGE)}


@dataclass(frozen=True)
class SelectionOptions:
    skip_first_blocks: int = 0
    skip_last_blocks: int = 0
    include: str = ""            # regex on the full layer name; empty = everything the policy allows
    exclude: str = ""            # regex on the full layer name; empty = nothing
    use_default_dense_layers: bool = True
    min_in_features: int = 64    # below this the sparse kernel cannot win and quality suffers
    m: int = 4                   # group size of the pattern: in_features must divide by it

    def __post_init__(self):
        if self.skip_first_blocks < 0 or self.skip_last_blocks < 0:
            raise ValueError("block skips must be >= 0")
        for pattern in (self.include, self.exclude):
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"invalid layer filter regex {pattern!r}: {error}") from None


@dataclass(frozen=True)
class LayerDecision:
    name: str
    in_features: int
    out_features: int
    block_index: int             # position in the model's block order
    sparse: bool
    reason: str                  # why it stays dense ("" when sparse)


def detect_architecture(model: nn.Module) -> ArchitecturePolicy:
    names = {name for name, _ in model.named_modules()}
    for policy in POLICIES.values():
        if all(key in names for key in policy.signature):
            return policy
    known = ", ".join(f"{p.name} ({p.notes})" for p in POLICIES.values())
    raise ValueError(f"unsupported diffusion model {type(model).__name__}: RT-Lynx knows {known}")


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or a module that is one in all but class: in_features, out_features and a weight of
    (out_features, in_features), as the linears of ComfyUI's quantized checkpoints (weights held
    in a quantized tensor class, the module not an nn.Linear subclass). Not a layer that scales its
    input before the product (`pre_quant_scale`, AWQ-style smoothing of quantized checkpoints):
    replacing its forward would drop that scale."""
    if getattr(module, "pre_quant_scale", None) is not None:
        return False
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    in_features, out_features = getattr(module, "in_features", None), getattr(module, "out_features", None)
    return (isinstance(weight, torch.Tensor) and isinstance(in_features, int) and isinstance(out_features, int)
            and tuple(weight.shape) == (out_features, in_features))


def unmeasured_build(model: nn.Module, policy: ArchitecturePolicy) -> str:
    """"" when `model` is built as the models `policy`'s layer choice was measured on, else a phrase
    saying it is not."""
    names = {name for name, _ in model.named_modules()}
    if all(name in names for name in policy.measured_layers):
        return ""
    return f"{policy.name} layer choice on a model built otherwise ({type(model).__name__}): its quality is not measured"


def _block_of(policy: ArchitecturePolicy, name: str):
    """(list index, block index, in-block name) of a layer inside a block, else None."""
    for list_index, pattern in enumerate(policy.block_lists):
        match = re.match(pattern, name)
        if match:
            return list_index, int(match.group(1)), name[match.end():]
    return None


def select_layers(model: nn.Module, policy: ArchitecturePolicy,
                  options: SelectionOptions) -> list[LayerDecision]:
    """Every linear layer that the policy covers, each with its decision and reason."""
    in_blocks = []
    for name, module in model.named_modules():
        if not is_linear(module):
            continue
        where = _block_of(policy, name)
        if where is not None and re.fullmatch(policy.sparse_layers, where[2]):
            in_blocks.append((name, module, where))

    # Blocks numbered in execution order across lists (FLUX: double blocks, then single blocks).
    block_keys = sorted({(w[0], w[1]) for _, _, w in in_blocks})
    block_order = {key: i for i, key in enumerate(block_keys)}
    total_blocks = len(block_keys)

    decisions = []
    for name, module, (list_index, block, local_name) in in_blocks:
        order = block_order[(list_index, block)]
        reason = ""
        if order < options.skip_first_blocks:
            reason = f"first {options.skip_first_blocks} blocks kept dense"
        elif order >= total_blocks - options.skip_last_blocks:
            reason = f"last {options.skip_last_blocks} blocks kept dense"
        elif (options.use_default_dense_layers and policy.default_dense_layers
              and re.fullmatch(policy.default_dense_layers, local_name)):
            reason = f"{policy.name} default: {local_name} stays dense for quality"
        elif options.include and not re.search(options.include, name):
            reason = "not matched by include filter"
        elif options.exclude and re.search(options.exclude, name):
            reason = "matched by exclude filter"
        elif module.in_features % options.m:
            reason = f"in_features {module.in_features} not a multiple of {options.m}"
        elif module.in_features < options.min_in_features:
            reason = f"in_features {module.in_features} < {options.min_in_features}"
        decisions.append(LayerDecision(name, module.in_features, module.out_features, order,
                                       sparse=not reason, reason=reason))
    return decisions
