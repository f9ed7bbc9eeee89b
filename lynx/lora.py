"""The Lynx LoRA file format: the single definition of how a compensation branch is stored.

A `.safetensors` file with up to two low-rank parts per sparsified layer (name relative to the
diffusion model), each with scale = alpha / rank * strength:
    runtime  "<layer>.lynx_down" (rank, in_features), "<layer>.lynx_up" (out_features, rank):
             up(down(x)) * scale is added to the layer output, computed on the DENSE input at run
             time (the paper's Lynx LoRA).
    folded   "<layer>.lynx_folded_down" (folded_rank, in_features), "<layer>.lynx_folded_up"
             (out_features, folded_rank): scale * up @ down is added to the WEIGHT beforehand, so
             it acts on the sparse input the product already multiplies, y = S(x) (W + scale up
             down)^T, at no run-time cost. Calls that compute dense (warm-up steps, short
             sequences) take it back off: x W'^T - up(down(x)) * scale.
A file with both is fitted in that order: the folded part first, the runtime part on the
model with the folded part in place (lynx/calibration.py).
Metadata (all strings):
    rt_lynx.format          "lynx_lora"
    rt_lynx.format_version  "1": runtime part only (what packs before the folded part read);
                            "2": a folded part, maybe a runtime one
    rt_lynx.architecture    policy name the file was made for ("flux", "qwen_image", "z_image")
    rt_lynx.rank, rt_lynx.alpha                  the runtime part ("0" when it has none)
    rt_lynx.folded_rank, rt_lynx.folded_alpha    the folded part (version 2)
    rt_lynx.pattern         "2:4"
    rt_lynx.compensation    "norm" or "none": the sparsify variant whose error the branch cancels
    rt_lynx.pack_version    the pack version that wrote it
A file is refused when its architecture, pattern or compensation differ from the patched model's,
or a layer is not sparsified there or has other shapes (the ranks fix them); the error lists
the keys. rank and alpha scale the branch; pack_version is informational.
"""
from dataclasses import dataclass, field

import torch

from .linear import LowRankBranch
from .version import PACK_VERSION

FORMAT = "lynx_lora"
RUNTIME_FORMAT_VERSION = "1"
FORMAT_VERSION = "2"
# (down suffix, up suffix) of each part.
RUNTIME_SUFFIXES = (".lynx_down", ".lynx_up")
FOLDED_SUFFIXES = (".lynx_folded_down", ".lynx_folded_up")

LayerFactors = dict[str, tuple[torch.Tensor, torch.Tensor]]   # layer name -> (down, up)


@dataclass
class LynxLoRA:
    architecture: str
    rank: int                 # the runtime part (0: none)
    alpha: float
    pattern: str
    compensation: bool
    layers: LayerFactors      # the runtime part
    folded_rank: int = 0      # the folded part (0: none)
    folded_alpha: float = 0.0
    folded_layers: LayerFactors = field(default_factory=dict)

    def branch(self, layer: str, strength: float) -> LowRankBranch | None:
        """The runtime branch of `layer`, if the file has one."""
        return _branch(self.layers, layer, self.alpha, self.rank, strength)

    def folded_branch(self, layer: str, strength: float) -> LowRankBranch | None:
        """The folded branch of `layer` (to be added to its weight), if the file has one."""
        return _branch(self.folded_layers, layer, self.folded_alpha, self.folded_rank, strength)


def _branch(layers: LayerFactors, layer: str, alpha: float, rank: int, strength: float) -> LowRankBranch | None:
    if layer not in layers:
        return None
    down, up = layers[layer]
    return LowRankBranch(down, up, scale=alpha / rank * strength)


class LynxLoRAMismatch(ValueError):
    """The file does not fit the patched model; the message lists the mismatching keys."""


def _metadata(lora: LynxLoRA) -> dict[str, str]:
    meta = {
        "rt_lynx.format": FORMAT,
        "rt_lynx.format_version": FORMAT_VERSION if lora.folded_layers else RUNTIME_FORMAT_VERSION,
        "rt_lynx.architecture": lora.architecture,
        "rt_lynx.rank": str(lora.rank),
        "rt_lynx.alpha": repr(float(lora.alpha)),
        "rt_lynx.pattern": lora.pattern,
        "rt_lynx.compensation": "norm" if lora.compensation else "none",
        "rt_lynx.pack_version": PACK_VERSION,
    }
    if lora.folded_layers:
        meta |= {"rt_lynx.folded_rank": str(lora.folded_rank), "rt_lynx.folded_alpha": repr(float(lora.folded_alpha))}
    return meta


def save_lynx_lora(lora: LynxLoRA, path: str, dtype: torch.dtype = torch.bfloat16) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for layers, rank, (down_suffix, up_suffix) in ((lora.layers, lora.rank, RUNTIME_SUFFIXES),
                                                   (lora.folded_layers, lora.folded_rank, FOLDED_SUFFIXES)):
        for name, (down, up) in layers.items():
            if down.shape[0] != rank or up.shape[1] != rank:
                raise ValueError(f"{name}: rank {down.shape[0]}/{up.shape[1]} differs from the file's {rank}")
            tensors[name + down_suffix] = down.detach().to("cpu", dtype).contiguous()
            tensors[name + up_suffix] = up.detach().to("cpu", dtype).contiguous()
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
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    parts = [RUNTIME_SUFFIXES] + ([FOLDED_SUFFIXES] if version == FORMAT_VERSION else [])
    claimed, (layers, folded_layers) = set(), ({}, {})
    for (down_suffix, up_suffix), found in zip(parts, (layers, folded_layers)):
        for key in tensors:
            if key.endswith(down_suffix) and key[:-len(down_suffix)] + up_suffix in tensors:
                name = key[:-len(down_suffix)]
                found[name] = (tensors[key], tensors[name + up_suffix])
                claimed |= {key, name + up_suffix}
    stray = [key for key in tensors if key not in claimed]
    if stray:
        raise LynxLoRAMismatch(f"{path}: keys without their pair or of unknown kind: {_listing(stray)}")
    missing = [key for key in ("rt_lynx.architecture", "rt_lynx.rank", "rt_lynx.alpha", "rt_lynx.pattern",
                               "rt_lynx.compensation") + (("rt_lynx.folded_rank", "rt_lynx.folded_alpha")
                                                          if folded_layers else ()) if key not in meta]
    if missing:
        raise LynxLoRAMismatch(f"{path}: metadata without {', '.join(missing)}")
    folded = {"folded_rank": int(meta["rt_lynx.folded_rank"]), "folded_alpha": float(meta["rt_lynx.folded_alpha"]),
              "folded_layers": folded_layers} if folded_layers else {}
    return LynxLoRA(
        architecture=meta["rt_lynx.architecture"], rank=int(meta["rt_lynx.rank"]),
        alpha=float(meta["rt_lynx.alpha"]), pattern=meta["rt_lynx.pattern"],
        compensation=meta["rt_lynx.compensation"] == "norm", layers=layers, **folded)


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
    for layers, rank, part in ((lora.layers, lora.rank, ""), (lora.folded_layers, lora.folded_rank, "folded ")):
        for name, (down, up) in layers.items():
            if name not in sparse_layer_shapes:
                unknown.append(part + name)
                continue
            in_features, out_features = sparse_layer_shapes[name]
            if down.shape != (rank, in_features) or up.shape != (out_features, rank):
                wrong_shape.append(f"{part}{name} (file down {tuple(down.shape)} up {tuple(up.shape)}, "
                                   f"layer {in_features}->{out_features} at rank {rank})")
    if unknown:
        problems.append(f"{len(unknown)} keys are not sparsified layers of this model: {_listing(unknown)}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} keys have the wrong shape: {_listing(wrong_shape, 6)}")
    if not lora.layers and not lora.folded_layers:
        problems.append("the file holds no layers")
    if problems:
        raise LynxLoRAMismatch("Lynx LoRA does not fit this model: " + "; ".join(problems))
