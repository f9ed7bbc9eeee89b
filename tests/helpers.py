"""Shared test helpers: module trees named like the real models, brute-force references."""
import importlib.util
import pathlib
import sys

import torch
import torch.nn as nn

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"


def load_bench(name: str):
    """bench/<name>.py as a module (bench/ is not a package; its scripts import each other by name)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"{name}_bench", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tree_from_linears(shapes: dict[str, tuple[int, int]]) -> nn.Module:
    """A module tree whose nn.Linear leaves have exactly the given dotted names and shapes."""
    root = nn.Module()
    for name, (in_features, out_features) in shapes.items():
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, nn.Linear(in_features, out_features))
    return root


def brute_force_sparsify(x: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep, per group of m, the n entries first in order (|x| descending, index ascending)."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.zeros_like(flat)
    for row in range(flat.shape[0]):
        for start in range(0, flat.shape[1], m):
            group = [(-abs(flat[row, start + i].item()), i) for i in range(m)]
            for _, i in sorted(group)[:n]:
                out[row, start + i] = flat[row, start + i]
    return out.reshape(x.shape)


def flux_like_shapes(hidden: int = 64, double: int = 2, single: int = 2) -> dict[str, tuple[int, int]]:
    """Every nn.Linear of ComfyUI's Flux class, at a small width."""
    h, mlp = hidden, 4 * hidden
    shapes = {"img_in": (16, h), "txt_in": (32, h), "time_in.in_layer": (256, h), "time_in.out_layer": (h, h),
              "vector_in.in_layer": (48, h), "vector_in.out_layer": (h, h),
              "guidance_in.in_layer": (256, h), "guidance_in.out_layer": (h, h),
              "final_layer.linear": (h, 16), "final_layer.adaLN_modulation.1": (h, 2 * h)}
    for i in range(double):
        for s in ("img", "txt"):
            shapes |= {f"double_blocks.{i}.{s}_mod.lin": (h, 6 * h), f"double_blocks.{i}.{s}_attn.qkv": (h, 3 * h),
                       f"double_blocks.{i}.{s}_attn.proj": (h, h), f"double_blocks.{i}.{s}_mlp.0": (h, mlp),
                       f"double_blocks.{i}.{s}_mlp.2": (mlp, h)}
    for i in range(single):
        shapes |= {f"single_blocks.{i}.linear1": (h, 3 * h + mlp), f"single_blocks.{i}.linear2": (h + mlp, h),
                   f"single_blocks.{i}.modulation.lin": (h, 3 * h)}
    return shapes


def qwen_image_like_shapes(hidden: int = 64, blocks: int = 2) -> dict[str, tuple[int, int]]:
    h = hidden
    shapes = {"img_in": (64, h), "txt_in": (96, h), "time_text_embed.timestep_embedder.linear_1": (256, h),
              "time_text_embed.timestep_embedder.linear_2": (h, h), "norm_out.linear": (h, 2 * h), "proj_out": (h, 64)}
    for i in range(blocks):
        b = f"transformer_blocks.{i}"
        shapes |= {f"{b}.img_mod.1": (h, 6 * h), f"{b}.txt_mod.1": (h, 6 * h)}
        for proj in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            shapes[f"{b}.attn.{proj}"] = (h, h)
        shapes[f"{b}.attn.to_out.0"] = (h, h)
        for s in ("img", "txt"):
            shapes |= {f"{b}.{s}_mlp.net.0.proj": (h, 4 * h), f"{b}.{s}_mlp.net.2": (4 * h, h)}
    return shapes


def z_image_like_shapes(hidden: int = 64, blocks: int = 3, z_image_modulation: bool = False) -> dict[str, tuple[int, int]]:
    """Lumina 2's NextDiT; with z_image_modulation, Z-Image's: adaLN_modulation is Sequential(Linear(256, 4h))."""
    h, ff = hidden, 3 * hidden
    modulation = ("adaLN_modulation.0", (256, 4 * h)) if z_image_modulation else ("adaLN_modulation.1", (h, 4 * h))
    shapes = {"x_embedder": (64, h), "t_embedder.mlp.0": (256, h), "t_embedder.mlp.2": (h, h),
              "cap_embedder.1": (96, h), "final_layer.linear": (h, 64), "final_layer.adaLN_modulation.1": (h, h)}
    for group, count in (("noise_refiner", 1), ("context_refiner", 1), ("layers", blocks)):
        for i in range(count):
            b = f"{group}.{i}"
            shapes |= {f"{b}.attention.qkv": (h, 3 * h), f"{b}.attention.out": (h, h),
                       f"{b}.feed_forward.w1": (h, ff), f"{b}.feed_forward.w3": (h, ff),
                       f"{b}.feed_forward.w2": (ff, h)}
            if group != "context_refiner":   # ComfyUI builds the caption refiner without modulation
                shapes[f"{b}.{modulation[0]}"] = modulation[1]
    return shapes


def comfyui_embed_nd(ids, theta, axes_dim):
    """comfy.ldm.flux.layers.EmbedND.forward with comfy.ldm.flux.math.rope (ComfyUI 0.3.64), for a
    device that computes in place (CUDA, CPU)."""
    def rope(pos, dim):
        scale = torch.linspace(0, (dim - 2) / dim, steps=dim // 2, dtype=torch.float64, device=pos.device)
        omega = 1.0 / (theta ** scale)
        out = torch.einsum("...n,d->...nd", pos.to(dtype=torch.float32), omega)
        out = torch.stack([torch.cos(out), -torch.sin(out), torch.sin(out), torch.cos(out)], dim=-1)
        out = out.reshape(*out.shape[:-1], 2, 2)
        return out.to(dtype=torch.float32)
    return torch.cat([rope(ids[..., i], axes_dim[i]) for i in range(ids.shape[-1])], dim=-3).unsqueeze(1)


def flux_ids(batch, text_tokens, height, width, **options):
    """bench/rope_table.py's: FLUX's ids as Flux._forward builds them."""
    return load_bench("rope_table").flux_ids(batch, text_tokens, height, width, **options)
