"""FLUX transformer blocks with the elementwise work between their linears fused.

In eager mode most of a FLUX step outside the GEMMs and attention is elementwise work between the
linears, much of it in fp32: per-head q/k RMSNorm, the RoPE inside flux.math.attention and the
concatenation of the text and image streams are a dozen passes over the attention inputs. These
forwards compute a ComfyUI DoubleStreamBlock / SingleStreamBlock (comfy.ldm.flux.layers) with that
work in one pass (kernels.qk_norm_rope) and each gated residual in one addcmul. The linears,
norms and modulations are still the block's own modules, so the Lynx forwards, ComfyUI's weight
casts and LoRA patches apply unchanged. Attention itself is the caller's (ComfyUI's
optimized_attention).

Only blocks whose structure and forward signature are the ones written against here are taken
(`fused_block_kind`); any other keeps its own forward.
"""
import inspect
from typing import Callable

import torch
import torch.nn as nn

from ..kernels import qk_norm_rope

# attention(q, k, v, heads, mask, transformer_options) with q, k, v as (batch, heads, tokens,
# head_dim) -> (batch, tokens, heads * head_dim)
Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor | None, dict], torch.Tensor]

QK_NORM_EPS = 1e-6   # comfy.ldm.flux.layers.RMSNorm's
FP16_MAX = 65504.0

# The forward parameters of the block classes these forwards reproduce (ComfyUI 0.3.x). A block
# whose forward takes others has changed behaviour and keeps its own forward.
_DOUBLE_PARAMETERS = {"self", "img", "txt", "vec", "pe", "attn_mask", "modulation_dims_img",
                      "modulation_dims_txt", "transformer_options"}
_SINGLE_PARAMETERS = {"self", "x", "vec", "pe", "attn_mask", "modulation_dims", "transformer_options"}
_DOUBLE_MODULES = ("img_mod", "txt_mod", "img_norm1", "img_norm2", "txt_norm1", "txt_norm2", "img_attn.qkv",
                   "img_attn.proj", "img_attn.norm.query_norm", "img_attn.norm.key_norm", "txt_attn.qkv",
                   "txt_attn.proj", "txt_attn.norm.query_norm", "txt_attn.norm.key_norm", "img_mlp", "txt_mlp")
_SINGLE_MODULES = ("modulation", "pre_norm", "linear1", "linear2", "norm.query_norm", "norm.key_norm", "mlp_act")


def fused_block_kind(block: nn.Module) -> tuple[str | None, str]:
    """("double" | "single", "") when `block` is a FLUX block these forwards compute, else (None, why not)."""
    kinds = {"DoubleStreamBlock": ("double", _DOUBLE_PARAMETERS, _DOUBLE_MODULES, ("num_heads", "flipped_img_txt")),
             "SingleStreamBlock": ("single", _SINGLE_PARAMETERS, _SINGLE_MODULES,
                                   ("num_heads", "hidden_size", "mlp_hidden_dim"))}
    name = type(block).__name__
    if name not in kinds:
        return None, f"{name} is not a FLUX double or single stream block"
    kind, parameters, modules, attributes = kinds[name]
    found = set(inspect.signature(type(block).forward).parameters)
    if found != parameters:
        return None, f"{name}.forward takes {sorted(found - parameters) or 'fewer'} parameters than the fused forward knows"
    present = dict(block.named_modules())
    missing = [m for m in modules if m not in present] + [a for a in attributes if not hasattr(block, a)]
    if missing:
        return None, f"{name} lacks {missing}"
    return kind, ""


def _modulate(x: torch.Tensor, mod) -> torch.Tensor:
    return torch.addcmul(mod.shift, x, 1 + mod.scale)


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(x, nan=0.0, posinf=FP16_MAX, neginf=-FP16_MAX) if x.dtype == torch.float16 else x


def flux_double_block(block: nn.Module, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, pe: torch.Tensor,
                      attn_mask: torch.Tensor | None, transformer_options: dict,
                      attention: Attention) -> tuple[torch.Tensor, torch.Tensor]:
    """DoubleStreamBlock.forward (no modulation_dims) with fused q/k norm + RoPE and gated residuals."""
    img_mod1, img_mod2 = block.img_mod(vec)
    txt_mod1, txt_mod2 = block.txt_mod(vec)
    img_qkv = block.img_attn.qkv(_modulate(block.img_norm1(img), img_mod1))
    txt_qkv = block.txt_attn.qkv(_modulate(block.txt_norm1(txt), txt_mod1))
    # Attention runs over the concatenated streams, text first unless the block is flipped.
    first, second = ((img_qkv, block.img_attn), (txt_qkv, block.txt_attn)) if block.flipped_img_txt else \
        ((txt_qkv, block.txt_attn), (img_qkv, block.img_attn))
    q, k, v = qk_norm_rope(first[0], first[1].norm.query_norm.scale, first[1].norm.key_norm.scale,
                           second[0], second[1].norm.query_norm.scale, second[1].norm.key_norm.scale,
                           pe, block.num_heads, QK_NORM_EPS)
    attn = attention(q, k, v, block.num_heads, attn_mask, transformer_options)
    attn_first, attn_second = attn[:, :first[0].shape[1]], attn[:, first[0].shape[1]:]
    img_attn, txt_attn = (attn_first, attn_second) if block.flipped_img_txt else (attn_second, attn_first)

    img = torch.addcmul(img, img_mod1.gate, block.img_attn.proj(img_attn))
    img = torch.addcmul(img, img_mod2.gate, block.img_mlp(_modulate(block.img_norm2(img), img_mod2)))
    txt = torch.addcmul(txt, txt_mod1.gate, block.txt_attn.proj(txt_attn))
    txt = torch.addcmul(txt, txt_mod2.gate, block.txt_mlp(_modulate(block.txt_norm2(txt), txt_mod2)))
    return img, _clamp_fp16(txt)


def flux_single_block(block: nn.Module, x: torch.Tensor, vec: torch.Tensor, pe: torch.Tensor,
                      attn_mask: torch.Tensor | None, transformer_options: dict, attention: Attention) -> torch.Tensor:
    """SingleStreamBlock.forward (no modulation_dims) with fused q/k norm + RoPE and gated residual."""
    mod, _ = block.modulation(vec)
    qkv, mlp = torch.split(block.linear1(_modulate(block.pre_norm(x), mod)),
                           [3 * block.hidden_size, block.mlp_hidden_dim], dim=-1)
    q, k, v = qk_norm_rope(qkv, block.norm.query_norm.scale, block.norm.key_norm.scale, None, None, None,
                           pe, block.num_heads, QK_NORM_EPS)
    attn = attention(q, k, v, block.num_heads, attn_mask, transformer_options)
    out = block.linear2(torch.cat((attn, block.mlp_act(mlp)), 2))
    return _clamp_fp16(torch.addcmul(x, mod.gate, out))


def fusable_call(pe: torch.Tensor | None, hidden: torch.Tensor) -> bool:
    """Whether one call's inputs are what the fused forwards take (FLUX's fp32 RoPE table, 16-bit or fp32
    activations); otherwise the block's own forward runs."""
    return pe is not None and pe.dtype == torch.float32 and pe.dim() == 6 and hidden.dim() == 3
