"""Transformer blocks with the elementwise work between their linears fused (FLUX, Qwen-Image).

In eager mode much of a step outside the GEMMs and attention is elementwise work between the
linears: per-head q/k RMSNorm, RoPE on broadcast pair tensors and the concatenation of the text
and image streams are a dozen passes over the attention inputs. These forwards compute ComfyUI's
FLUX DoubleStreamBlock / SingleStreamBlock (comfy.ldm.flux.layers) and Qwen-Image's
QwenImageTransformerBlock (comfy.ldm.qwen_image.model) with that work in one pass
(kernels.qk_norm_rope / qk_norm_rope_split) and each gated residual in one addcmul. The linears,
norms and modulations are still the block's own modules, so the Lynx forwards, ComfyUI's weight
casts and LoRA patches apply unchanged. A Lynx layer takes the elementwise work that produces its
input into its sparsify pass: after a LayerNorm + modulation (LynxLinearForward.modulated) and
after the MLP's GELU (LynxLinearForward.after_gelu), so the block's modulated activations and the
MLP's activation are never written; and the gated residual after it into its GEMM's epilogue
(LynxLinearForward.gated_residual), so its own output is not written either. FLUX's single-block
linear2 input, the attention output and the GELU of the MLP's hidden state side by side, is made
in one pass (kernels.cat_gelu_tanh), or inside an fp8 dense layer's quantise pass
(LynxLinearForward.after_cat_gelu). Attention itself is the caller's (ComfyUI's
optimized_attention). The models' RoPE table (EmbedND) is computed by one op that torch.compile
keeps whole (`rope_table_forward`; kernels/rope.py says why).

Only blocks whose structure and forward signatures are the ones written against here are taken
(`fused_block_kind`); any other keeps its own forward.
"""
import inspect
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import cat_gelu_tanh, qk_norm_rope, qk_norm_rope_split, rope_table
from .batched_modulation import modulation_output
from .patching import lynx_layer

# attention(q, k, v, heads, mask, transformer_options) -> (batch, tokens, heads * head_dim), taking
# q, k, v as the model's own attention call does: (batch, heads, tokens, head_dim) for FLUX,
# (batch, tokens, heads * head_dim) for Qwen-Image.
Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor | None, dict], torch.Tensor]

QK_NORM_EPS = 1e-6   # comfy.ldm.flux.layers.RMSNorm's (ComfyUI 0.3.x), fixed in its forward
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
_FLUX_QK_NORMS = {"double": ("img_attn.norm.query_norm", "img_attn.norm.key_norm", "txt_attn.norm.query_norm",
                             "txt_attn.norm.key_norm"),
                  "single": ("norm.query_norm", "norm.key_norm")}
_QWEN_PARAMETERS = {"self", "hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask", "temb",
                    "image_rotary_emb", "transformer_options"}
# Later ComfyUI releases add a per-call parameter the block-replace arguments do not carry; the
# glue sends calls that set it to the block's own forward.
_QWEN_LATER_PARAMETERS = _QWEN_PARAMETERS | {"timestep_zero_index"}
_QWEN_ATTENTION_PARAMETERS = {"self", "hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask",
                              "attention_mask", "image_rotary_emb", "transformer_options"}
_QWEN_NORMS = ("attn.norm_added_q", "attn.norm_added_k", "attn.norm_q", "attn.norm_k")   # text stream first
_QWEN_MODULES = ("img_mod", "txt_mod", "img_norm1", "img_norm2", "txt_norm1", "txt_norm2", "img_mlp", "txt_mlp",
                 "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                 "attn.to_out.0", "attn.to_out.1", "attn.to_add_out") + _QWEN_NORMS


def fused_block_kind(block: nn.Module) -> tuple[str | None, str]:
    """("double" | "single" | "qwen_image", "") when `block` is a block these forwards compute, else
    (None, why not)."""
    kinds = {"DoubleStreamBlock": ("double", (_DOUBLE_PARAMETERS,), _DOUBLE_MODULES, ("num_heads",)),
             "SingleStreamBlock": ("single", (_SINGLE_PARAMETERS,), _SINGLE_MODULES,
                                   ("num_heads", "hidden_size", "mlp_hidden_dim")),
             "QwenImageTransformerBlock": ("qwen_image", (_QWEN_PARAMETERS, _QWEN_LATER_PARAMETERS), _QWEN_MODULES,
                                           ("_modulate", "attn.heads"))}
    name = type(block).__name__
    if name not in kinds:
        return None, f"{name} is not a FLUX or Qwen-Image transformer block"
    kind, parameter_sets, modules, attributes = kinds[name]
    problems = [_signature_problem(type(block), parameters) for parameters in parameter_sets]
    problem = "" if "" in problems else problems[0]
    present = dict(block.named_modules())
    missing = [m for m in modules if m not in present] + [a for a in attributes if not _has_path(block, a)]
    if missing:
        problem = problem or f"{name} lacks {missing}"
    if kind in _FLUX_QK_NORMS and not problem:
        head_dim = block.hidden_size // block.num_heads if kind == "single" else block.img_attn.qkv.out_features // (
            3 * block.num_heads)
        problem = next((f"{name}'s {n}: {p}" for n in _FLUX_QK_NORMS[kind]
                        for p in [_qk_norm_problem(present[n], head_dim)] if p), "")
        if not problem and len({qk_norm_parameters(present[n])[1] for n in _FLUX_QK_NORMS[kind]}) != 1:
            problem = f"{name}'s q/k norms differ in eps"   # the fused pass takes one
    if kind == "single" and not problem:
        # Later FLUX-class models (SiLU-gated or "yak" MLPs) widen linear1's MLP part or change its activation.
        if (getattr(block, "mlp_hidden_dim_first", block.mlp_hidden_dim) != block.mlp_hidden_dim
                or getattr(block, "yak_mlp", False) or not isinstance(block.modulation, nn.Module)):
            problem = f"{name} has another MLP or no modulation of its own"
    if kind == "qwen_image" and not problem:
        problem = _signature_problem(type(block.attn), _QWEN_ATTENTION_PARAMETERS)
        eps = {getattr(present[norm], "eps", None) for norm in _QWEN_NORMS}
        if len(eps) != 1 or None in eps or any(getattr(present[n], "weight", None) is None for n in _QWEN_NORMS):
            problem = problem or f"{name}'s q/k norms differ in eps or have no weight"
    return (None, problem) if problem else (kind, "")


def _qk_norm_problem(norm: nn.Module, head_dim: int) -> str:
    """"" when `norm` is a FLUX q/k RMSNorm the fused pass computes: ComfyUI's own RMSNorm class
    (weight `scale`, eps 1e-6; ComfyUI 0.3.x) or torch.nn.RMSNorm (ComfyUI's ops.RMSNorm later) with
    a weight per feature of the head."""
    if (type(norm).__module__, type(norm).__name__) == ("comfy.ldm.flux.layers", "RMSNorm"):
        weight = getattr(norm, "scale", None)
    elif isinstance(norm, nn.RMSNorm) and tuple(norm.normalized_shape) == (head_dim,):
        weight = norm.weight
    else:
        return f"{type(norm).__name__} is not an RMSNorm the fused pass knows"
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (head_dim,) or "forward" in norm.__dict__:
        return "its weight is not one per head feature, or its forward is patched"
    return ""


def qk_norm_parameters(norm: nn.Module) -> tuple[torch.Tensor, float]:
    """(weight, eps) of a q/k norm `_qk_norm_problem` accepted. torch.nn.RMSNorm without an eps
    uses torch's default, the fp32 epsilon for 16-bit and fp32 inputs (the input's opmath type)."""
    if isinstance(norm, nn.RMSNorm):
        return norm.weight, torch.finfo(torch.float32).eps if norm.eps is None else float(norm.eps)
    return norm.scale, QK_NORM_EPS


def rope_table_forward(embedder: nn.Module) -> tuple[Callable | None, str]:
    """(forward, "") computing `embedder`, ComfyUI's EmbedND (the RoPE table of FLUX, Qwen-Image and
    Lumina 2 / Z-Image), through the rope_table op, once its output matched the module's own on a
    small CPU input bit for bit; else (None, why not). Ids of another shape than (batch, tokens,
    axes) take the module's own forward. theta and axes_dim are read here, once."""
    if type(embedder).__name__ != "EmbedND" or not hasattr(embedder, "theta") or not hasattr(embedder, "axes_dim"):
        return None, f"{type(embedder).__name__} is not ComfyUI's EmbedND"
    problem = _signature_problem(type(embedder), {"self", "ids"})
    if problem:
        return None, problem
    theta, axes_dim = embedder.theta, tuple(int(d) for d in embedder.axes_dim)
    own_forward = type(embedder).forward.__get__(embedder)
    probe = torch.arange(7 * len(axes_dim), dtype=torch.float32).reshape(1, 7, len(axes_dim)) * 1.75 - 3
    try:
        same = torch.equal(rope_table(probe, theta, axes_dim), own_forward(probe))
    except Exception as error:   # a module this op does not reproduce keeps its forward
        return None, f"the RoPE table op does not take this EmbedND ({error})"
    if not same:
        return None, "the RoPE table op differs from this EmbedND's output"

    def forward(ids: torch.Tensor) -> torch.Tensor:
        if ids.dim() == 3 and ids.shape[-1] == len(axes_dim):
            return rope_table(ids, theta, axes_dim)
        return own_forward(ids)
    return forward, ""


def _signature_problem(cls, parameters: set[str]) -> str:
    found = set(inspect.signature(cls.forward).parameters)
    if found == parameters:
        return ""
    return f"{cls.__name__}.forward takes {sorted(found - parameters) or 'fewer'} parameters than the fused forward knows"


def _has_path(module: nn.Module, path: str) -> bool:
    for part in path.split("."):
        if not hasattr(module, part):
            return False
        module = getattr(module, part)
    return True


class _Modulation(NamedTuple):
    shift: torch.Tensor   # (batch, 1, features), as FLUX's ModulationOut holds them
    scale: torch.Tensor
    gate: torch.Tensor


def _flux_modulation(modulation: nn.Module, vec: torch.Tensor):
    """modulation(vec) for ComfyUI's FLUX Modulation (lin(silu(vec)) in 6 or 3 chunks): the first and
    second (shift, scale, gate), the second None for a single block; its product taken from the
    model call's one modulation product where its linear is in one (batched_modulation)."""
    multiplier, double = getattr(modulation, "multiplier", None), getattr(modulation, "is_double", None)
    own = (type(modulation).__name__ == "Modulation" and "forward" not in modulation.__dict__
           and multiplier == (6 if double else 3))
    y = modulation_output(lynx_layer(modulation.lin), vec) if own else None
    if y is None:
        return modulation(vec)
    parts = y[:, None, :].chunk(multiplier, dim=-1)
    return _Modulation(*parts[:3]), _Modulation(*parts[3:]) if double else None


def _qwen_modulation_parameters(modulation: nn.Module, temb: torch.Tensor) -> torch.Tensor:
    """modulation(temb) for Qwen-Image's Sequential(SiLU, Linear), from the model call's one
    modulation product where its linear is in one."""
    if (isinstance(modulation, nn.Sequential) and len(modulation) == 2 and type(modulation[0]) is nn.SiLU
            and "forward" not in modulation.__dict__ and "forward" not in modulation[0].__dict__):
        y = modulation_output(lynx_layer(modulation[1]), temb)
        if y is not None:
            return y
    return modulation(temb)


def _qwen_modulation(params: torch.Tensor) -> _Modulation:
    # The split QwenImageTransformerBlock._modulate makes of its (batch, 3 * features) parameters
    # (ComfyUI 0.3.64); its addcmul is _modulated_linears'.
    shift, scale, gate = params.chunk(3, dim=-1)
    return _Modulation(shift.unsqueeze(1), scale.unsqueeze(1), gate.unsqueeze(1))


def _modulated_linears(linears: tuple[nn.Module, ...], norm: nn.Module, x: torch.Tensor, shift: torch.Tensor,
                       scale: torch.Tensor) -> list[torch.Tensor]:
    """[linear(addcmul(shift, norm(x), 1 + scale)) for each linear]. A Lynx layer (its forward has
    `modulated`) after a plain LayerNorm takes the norm and the modulation into its sparsify pass;
    where any layer needs them written, they are computed once, as the block computes them."""
    scale1p = 1 + scale
    plain_norm = (isinstance(norm, nn.LayerNorm) and norm.weight is None and norm.bias is None
                  and tuple(norm.normalized_shape) == (x.shape[-1],) and "forward" not in norm.__dict__)
    written = []

    def modulated_input() -> torch.Tensor:
        if not written:
            written.append(torch.addcmul(shift, norm(x), scale1p))
        return written[0]
    outputs = []
    for linear in linears:
        fused = _lynx_forward_method(linear, "modulated") if plain_norm else None
        outputs.append(fused(x, shift, scale1p, norm.eps, modulated_input) if fused is not None
                       else linear(modulated_input()))
    return outputs


def _lynx_forward_method(linear: nn.Module, name: str):
    # The Lynx forward ComfyUI's object patch (or `installed`) put on the module, its method `name`
    # computing for this linear; None for a plain layer.
    layer = lynx_layer(linear)
    if layer is None:
        return None
    method = getattr(layer, name)
    return lambda *args, **kwargs: method(*args, module=linear, **kwargs)


def _gated_residual(linear: nn.Module, residual: torch.Tensor, gate: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """addcmul(residual, gate, linear(x)), in a Lynx layer's GEMM epilogue where it has one."""
    fused = _lynx_forward_method(linear, "gated_residual")
    return fused(residual, gate, x) if fused is not None else torch.addcmul(residual, gate, linear(x))


def _is_identity_dropout(module: nn.Module) -> bool:
    return isinstance(module, nn.Dropout) and not (module.training and module.p > 0)


def _mlp_with_residual(mlp: nn.Module, norm: nn.Module, x: torch.Tensor, mod) -> torch.Tensor:
    """addcmul(x, mod.gate, mlp(addcmul(mod.shift, norm(x), 1 + mod.scale))), a block's MLP and its
    gated residual, for FLUX's Sequential(Linear, GELU, Linear) and Qwen-Image's FeedForward(GELU(proj),
    Dropout, Linear): the up projection through _modulated_linears, the down projection through a Lynx
    layer's `gated_residual` with the GELU in its sparsify pass (and the residual in its GEMM's
    epilogue) where it has one."""
    if isinstance(mlp, nn.Sequential) and len(mlp) == 3 and isinstance(mlp[1], nn.GELU):
        up, approximate, down = mlp[0], mlp[1].approximate, mlp[2]
    elif (type(mlp).__name__ == "FeedForward" and len(mlp.net) == 3 and type(mlp.net[0]).__name__ == "GELU"
          and _is_identity_dropout(mlp.net[1])):
        up, approximate, down = mlp.net[0].proj, mlp.net[0].approximate, mlp.net[2]
    else:
        return torch.addcmul(x, mod.gate, mlp(torch.addcmul(mod.shift, norm(x), 1 + mod.scale)))
    (hidden,) = _modulated_linears((up,), norm, x, mod.shift, mod.scale)
    fused = _lynx_forward_method(down, "gated_residual") if approximate == "tanh" else None
    if fused is not None:
        return fused(x, mod.gate, hidden, after_gelu=True)
    return torch.addcmul(x, mod.gate, down(F.gelu(hidden, approximate=approximate)))


def _linear_of_cat_activation(linear: nn.Module, first: torch.Tensor, second: torch.Tensor,
                              activation: nn.Module, residual: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """addcmul(residual, gate, linear(cat((first, activation(second)), -1))), the concatenation and a
    tanh GELU in one pass, or inside a Lynx layer's own pass where it has one (`after_cat_gelu`,
    which adds the gated residual in its GEMM's epilogue where it can)."""
    if not (isinstance(activation, nn.GELU) and activation.approximate == "tanh" and "forward" not in activation.__dict__):
        return torch.addcmul(residual, gate, linear(torch.cat((first, activation(second)), -1)))
    fused = _lynx_forward_method(linear, "after_cat_gelu")
    if fused is not None:
        return fused(first, second, residual, gate)
    return torch.addcmul(residual, gate, linear(cat_gelu_tanh(first, second)))


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(x, nan=0.0, posinf=FP16_MAX, neginf=-FP16_MAX) if x.dtype == torch.float16 else x


def flux_double_block(block: nn.Module, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, pe: torch.Tensor,
                      attn_mask: torch.Tensor | None, transformer_options: dict,
                      attention: Attention) -> tuple[torch.Tensor, torch.Tensor]:
    """DoubleStreamBlock.forward (no modulation_dims) with fused q/k norm + RoPE and gated residuals."""
    img_mod1, img_mod2 = _flux_modulation(block.img_mod, vec)
    txt_mod1, txt_mod2 = _flux_modulation(block.txt_mod, vec)
    (img_qkv,) = _modulated_linears((block.img_attn.qkv,), block.img_norm1, img, img_mod1.shift, img_mod1.scale)
    (txt_qkv,) = _modulated_linears((block.txt_attn.qkv,), block.txt_norm1, txt, txt_mod1.shift, txt_mod1.scale)
    # Attention runs over the concatenated streams, text first unless the block is flipped (a
    # ComfyUI 0.3.x attribute; later releases always put the text first).
    flipped = getattr(block, "flipped_img_txt", False)
    first, second = ((img_qkv, block.img_attn), (txt_qkv, block.txt_attn)) if flipped else \
        ((txt_qkv, block.txt_attn), (img_qkv, block.img_attn))
    (q_weight_a, eps), (k_weight_a, _) = (qk_norm_parameters(n) for n in (first[1].norm.query_norm,
                                                                           first[1].norm.key_norm))
    q_weight_b, k_weight_b = (qk_norm_parameters(n)[0] for n in (second[1].norm.query_norm, second[1].norm.key_norm))
    q, k, v = qk_norm_rope(first[0], q_weight_a, k_weight_a, second[0], q_weight_b, k_weight_b,
                           pe, block.num_heads, eps)
    attn = attention(q, k, v, block.num_heads, attn_mask, transformer_options)
    attn_first, attn_second = attn[:, :first[0].shape[1]], attn[:, first[0].shape[1]:]
    img_attn, txt_attn = (attn_first, attn_second) if flipped else (attn_second, attn_first)

    img = _gated_residual(block.img_attn.proj, img, img_mod1.gate, img_attn)
    img = _mlp_with_residual(block.img_mlp, block.img_norm2, img, img_mod2)
    txt = _gated_residual(block.txt_attn.proj, txt, txt_mod1.gate, txt_attn)
    txt = _mlp_with_residual(block.txt_mlp, block.txt_norm2, txt, txt_mod2)
    return img, _clamp_fp16(txt)


def flux_single_block(block: nn.Module, x: torch.Tensor, vec: torch.Tensor, pe: torch.Tensor,
                      attn_mask: torch.Tensor | None, transformer_options: dict, attention: Attention) -> torch.Tensor:
    """SingleStreamBlock.forward (no modulation_dims) with fused q/k norm + RoPE and gated residual."""
    mod, _ = _flux_modulation(block.modulation, vec)
    (projected,) = _modulated_linears((block.linear1,), block.pre_norm, x, mod.shift, mod.scale)
    qkv, mlp = torch.split(projected, [3 * block.hidden_size, block.mlp_hidden_dim], dim=-1)
    (q_weight, eps), (k_weight, _) = (qk_norm_parameters(n) for n in (block.norm.query_norm, block.norm.key_norm))
    q, k, v = qk_norm_rope(qkv, q_weight, k_weight, None, None, None, pe, block.num_heads, eps)
    attn = attention(q, k, v, block.num_heads, attn_mask, transformer_options)
    return _clamp_fp16(_linear_of_cat_activation(block.linear2, attn, mlp, block.mlp_act, x, mod.gate))


def qwen_image_block(block: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                     temb: torch.Tensor, pe: torch.Tensor, transformer_options: dict,
                     attention: Attention) -> tuple[torch.Tensor, torch.Tensor]:
    """QwenImageTransformerBlock.forward with fused q/k norm + RoPE and gated residuals; returns
    (encoder_hidden_states, hidden_states) as the block does."""
    img_mod1, img_mod2 = [_qwen_modulation(m) for m in _qwen_modulation_parameters(block.img_mod, temb).chunk(2, dim=-1)]
    txt_mod1, txt_mod2 = [_qwen_modulation(m) for m in _qwen_modulation_parameters(block.txt_mod, temb).chunk(2, dim=-1)]
    attn = block.attn
    txt_q, txt_k, txt_v = _modulated_linears((attn.add_q_proj, attn.add_k_proj, attn.add_v_proj), block.txt_norm1,
                                             encoder_hidden_states, txt_mod1.shift, txt_mod1.scale)
    img_q, img_k, img_v = _modulated_linears((attn.to_q, attn.to_k, attn.to_v), block.img_norm1, hidden_states,
                                             img_mod1.shift, img_mod1.scale)
    # Attention runs over the text tokens, then the image tokens.
    q, k, v = qk_norm_rope_split(txt_q, txt_k, txt_v, attn.norm_added_q.weight, attn.norm_added_k.weight,
                                 img_q, img_k, img_v, attn.norm_q.weight, attn.norm_k.weight, pe, attn.heads,
                                 attn.norm_q.eps)
    joint = attention(q, k, v, attn.heads, None, transformer_options)
    text_tokens = encoder_hidden_states.shape[1]
    if _is_identity_dropout(attn.to_out[1]):
        hidden_states = _gated_residual(attn.to_out[0], hidden_states, img_mod1.gate, joint[:, text_tokens:])
    else:
        hidden_states = torch.addcmul(hidden_states, img_mod1.gate,
                                      attn.to_out[1](attn.to_out[0](joint[:, text_tokens:])))
    encoder_hidden_states = _gated_residual(attn.to_add_out, encoder_hidden_states, txt_mod1.gate,
                                            joint[:, :text_tokens])
    hidden_states = _mlp_with_residual(block.img_mlp, block.img_norm2, hidden_states, img_mod2)
    encoder_hidden_states = _mlp_with_residual(block.txt_mlp, block.txt_norm2, encoder_hidden_states, txt_mod2)
    return encoder_hidden_states, hidden_states


def fusable_call(block: nn.Module, pe: torch.Tensor | None, hidden: torch.Tensor, tokens: int) -> bool:
    """Whether one call is what the fused forwards compute: a RoPE table (FLUX's fp32, Qwen-Image's in
    the activations' dtype) for the `tokens` attention runs over, and q/k norm weights not patched
    per call by ComfyUI (a LoRA weight function the fused forward would not see; a plain cast to the
    activations' device and dtype it makes itself); otherwise the block's own forward runs."""
    if (pe is None or pe.dim() != 6 or hidden.dim() != 3 or pe.dtype not in (torch.float32, hidden.dtype)
            or 1 not in pe.shape[1:3] or pe.shape[1] * pe.shape[2] != tokens):
        return False
    kind = {"QwenImageTransformerBlock": "qwen_image", "DoubleStreamBlock": "double",
            "SingleStreamBlock": "single"}.get(type(block).__name__)
    norms = [block.get_submodule(name) for name in (_QWEN_NORMS if kind == "qwen_image" else _FLUX_QK_NORMS.get(kind, ()))]
    return not any(getattr(n, "weight_function", None) or getattr(n, "bias_function", None) for n in norms)
