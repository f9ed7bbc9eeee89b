"""The Lynx LoRA file format: the single definition of how a compensation branch is stored.

A `.safetensors` file. Per sparsified layer (name relative to the diffusion model):
    "<layer>.lynx_down"   (rank, in_features)    x -> down(x)
    "<layer>.lynx_up"     (out_features, rank)   -> up(down(x))
with scale = alpha / rank * strength, the file holds one of two kinds of branch:
    runtime  up(down(x)) * scale is added to the layer output, computed on the DENSE input at run
             time (the paper's Lynx LoRA; format version 1, no rt_lynx.branch key);
    folded   scale * up @ down is added to the weight, so it acts on the SPARSE input that the
             product already multiplies: y = S(x) (W + scale up down)^T, no cost at run time
             (format version 2, rt_lynx.branch "folded"). Calls that compute dense (warm-up
             steps, short sequences) take it back off: x W'^T - up(down(x)) * scale.
Metadata (all strings):
    rt_lynx.format          "lynx_lora"
    rt_lynx.format_version  "1" (runtime) or "2" (any kind, named by rt_lynx.branch)
    rt_lynx.branch          "runtime" or "folded" (version 2)
    rt_lynx.architecture    policy name the file was made for ("flux", "qwen_image", "z_image")
    rt_lynx.rank, rt_lynx.alpha
    rt_lynx.pattern         "2:4"
    rt_lynx.compensation    "norm" or "none": the sparsify variant whose error the branch cancels
    rt_lynx.pack_version    the pack version that wrote it
A file is refused when its architecture, pattern or compensation differ from the patched model's,
or a layer is not sparsified there or has other shapes (the rank fixes them); the error lists
the keys. rank and alpha scale the branch; pack_version is informational.
"""
from dataclasses import dataclass

import torch

from .linear import LowRankBranch
from .version import PACK_VERSION

FORMAT = "lynx_lora"
RUNTIME_FORMAT_VERSION = "1"   # written for runtime branches, so packs that predate folded ones read them
FORMAT_VERSION = "2"
BRANCH_KINDS = ("runtime", "folded")
DOWN_SUFFIX = ".lynx_down"
UP_SUFFIX = ".lynx_up"


@dataclass
class LynxLoRA:
    architecture: str
    rank: int
    alpha: float
    pattern: str
    compensation: bool
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]   # name -> (down, up)
    folded: bool = False   # the branch acts on the sparse input, added to the weight (module docstring)

    @property
    def kind(self) -> str:
        return "folded" if self.folded else "runtime"

    def branch(self, layer: str, strength: float) -> LowRankBranch:
        down, up = self.layers[layer]
        return LowRankBranch(down, up, scale=self.alpha / self.rank * strength)


class LynxLoRAMismatch(ValueError):
    """The file does not fit the patched model; the message lists the mismatching keys."""


def _metadata(lora: LynxLoRA) -> dict[str, str]:
    kind = {"rt_lynx.format_version": FORMAT_VERSION, "rt_lynx.branch": "folded"} if lora.folded else \
        {"rt_lynx.format_version": RUNTIME_FORMAT_VERSION}
    return {
        "rt_lynx.format": FORMAT,
        **kind,
        "rt_lynx.architecture": lora.architecture,
        "rt_lynx.rank": str(lora.rank),
        "rt_lynx.alpha": repr(float(lora.alpha)),
        "rt_lynx.pattern": lora.pattern,
        "rt_lynx.compensation": "norm" if lora.compensation else "none",
        "rt_lynx.pack_version": PACK_VERSION,
    }


def save_lynx_lora(lora: LynxLoRA, path: str, dtype: torch.dtype = torch.bfloat16) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for name, (down, up) in lora.layers.items():
        if down.shape[0] != lora.rank or up.shape[1] != lora.rank:
            raise ValueError(f"{name}: rank {down.shape[0]}/{up.shape[1]} differs from the file's {lora.rank}")
        tensors[name + DOWN_SUFFIX] = down.detach().to("cpu", dtype).contiguous()
        tensors[name + UP_SUFFIX] = up.detach().to("cpu", dtype).contiguous()
    save_file(tensors, path, metadata=_metadata(lora))


def load_lynx_lora(path: str) -> LynxLoRA:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        meta = handle.metadata() or {}
        if meta.get("rt_lynx.format") != FORMAT:
            raise LynxLoRAMismatch(f"{path} is not a Lynx LoRA (metadata rt_lynx.format is "
                                   f"{meta.get('rt_lynx.format')!r}); ordinary LoRAs go through ComfyUI's LoraLoader")
        version = meta.get("rt_lynx.format_version")
        if version not in (RUNTIME_FORMAT_VERSION, FORMAT_VERSION):
            raise LynxLoRAMismatch(f"{path}: format version {version!r}, this pack reads "
                                   f"{RUNTIME_FORMAT_VERSION!r} and {FORMAT_VERSION!r}")
        kind = meta.get("rt_lynx.branch", "runtime") if version == FORMAT_VERSION else "runtime"
        if kind not in BRANCH_KINDS:
            raise LynxLoRAMismatch(f"{path}: branch kind {kind!r}, this pack knows {', '.join(BRANCH_KINDS)}")
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    layers, stray = {}, []
    for key in tensors:
        if key.endswith(DOWN_SUFFIX):
            name = key[:-len(DOWN_SUFFIX)]
            if name + UP_SUFFIX not in tensors:
                stray.append(key)
                continue
            layers[name] = (tensors[key], tensors[name + UP_SUFFIX])
        elif not (key.endswith(UP_SUFFIX) and key[:-len(UP_SUFFIX)] + DOWN_SUFFIX in tensors):
            stray.append(key)
    if stray:
        raise LynxLoRAMismatch(f"{path}: keys without their pair or of unknown kind: {_listing(stray)}")
    return LynxLoRA(
        architecture=meta["rt_lynx.architecture"], rank=int(meta["rt_lynx.rank"]),
        alpha=float(meta["rt_lynx.alpha"]), pattern=meta["rt_lynx.pattern"],
        compensation=meta["rt_lynx.compensation"] == "norm", layers=layers, folded=kind == "folded")


def _listing(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")


def check_fits(lora: LynxLoRA, architecture: str, pattern: str, compensation: bool,
               sparse_layer_shapes: dict[str, tuple[int, int]]) -> None:
    """Raise LynxLoRAMismatch unless every layer of the file is a sparsified layer of the model
    with matching (in_features, out_features), and the file was made for this setup."""
    problems = []
    if lora.architecture != architecture:
        problems.append(f"made for architecture {lora.architecture!r}, the model is {architecture!r}")
    if lora.pattern != pattern:
        problems.append(f"made for pattern {lora.pattern}, the model is patched with {pattern}")
    if lora.compensation != compensation:
        problems.append(f"made {'with' if lora.compensation else 'without'} norm compensation, "
                        f"the model is patched {'with' if compensation else 'without'} it")
    unknown, wrong_shape = [], []
    for name, (down, up) in lora.layers.items():
        if name not in sparse_layer_shapes:
            unknown.append(name)
            continue
        in_features, out_features = sparse_layer_shapes[name]
        if down.shape != (lora.rank, in_features) or up.shape != (out_features, lora.rank):
            wrong_shape.append(f"{name} (file down {tuple(down.shape)} up {tuple(up.shape)}, "
                               f"layer {in_features}->{out_features} at rank {lora.rank})")
    if unknown:
        problems.append(f"{len(unknown)} keys are not sparsified layers of this model: {_listing(unknown)}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} keys have the wrong shape: {_listing(wrong_shape, 6)}")
    if not lora.layers:
        problems.append("the file holds no layers")
    if problems:
        raise LynxLoRAMismatch("Lynx LoRA does not fit this model: " + "; ".join(problems))
