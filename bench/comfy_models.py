"""Random-weight diffusion models in ComfyUI's real key layout, built with ComfyUI's own classes.

Shared by tests/comfyui (through tests/comfyui/comfyui_models.py) and bench/e2e.py. ComfyUI must be
importable (COMFYUI_PATH on sys.path) before these functions run.

- `load_model(arch, blocks)`: a checkpoint state dict at the architecture's real width (ComfyUI's
  detection fixes the width) with few blocks, loaded by comfy.sd.load_diffusion_model_state_dict,
  i.e. UNETLoader's path. For CPU tests.
- `build_model(arch, blocks=None, device, dtype)`: full size when blocks is None (FLUX.1-dev 19+38
  blocks, Qwen-Image 60). No state dict of real tensors is ever made (24-41 GB): the network is
  built once on the meta device only for ComfyUI's detection to read keys and shapes, then
  ComfyUI's detected model_config builds comfy.model_base's model directly on `device` and the
  weights are randomised in place. Everything after loading weights (ModelPatcher, sampling,
  patches) is stock ComfyUI.
"""
from dataclasses import dataclass
from typing import Callable

import torch

QWEN_LATENT_CHANNELS = 16


@dataclass(frozen=True)
class Arch:
    name: str
    module: str                 # ComfyUI module and class of the diffusion model
    cls: str
    config: Callable[[tuple], dict]   # blocks -> constructor kwargs (real width)
    full_blocks: tuple
    context_dim: int
    # True where ComfyUI's detection cannot tell these sizes from another model's with the same
    # keys: build_model then gives the detected config these sizes (no state dict load).
    sizes_over_detection: bool = False


def _flux_config(blocks):
    import dataclasses

    import comfy.ldm.flux.model as flux
    double, single = blocks
    config = dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
                  mlp_ratio=4.0, num_heads=24, depth=double, depth_single_blocks=single, axes_dim=[16, 56, 56],
                  theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)
    if "txt_ids_dims" in {f.name for f in dataclasses.fields(flux.FluxParams)}:
        config["txt_ids_dims"] = []   # later ComfyUI releases: FLUX.1's text positions are all zero
    return config


def _qwen_config(blocks):
    return dict(patch_size=2, in_channels=64, out_channels=16, num_layers=blocks[0], attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56))


def _lumina2_config(blocks):
    # What ComfyUI's detection fixes for Lumina 2 (model_detection.py, cap_embedder.1.weight branch).
    return dict(patch_size=2, in_channels=16, dim=2304, n_layers=blocks[0], n_heads=24, n_kv_heads=8,
                qk_norm=True, cap_feat_dim=2304, axes_dims=[32, 32, 32], axes_lens=[300, 512, 512])


def _nextdit_mlp_base():
    """The hidden size NextDiT's blocks hand FeedForward before its multiplier, per dim: 4 in
    ComfyUI 0.3.64, 1 in releases that load Z-Image."""
    import comfy.ldm.lumina.model as lumina
    import comfy.ops
    block = lumina.JointTransformerBlock(0, 64, 1, 1, 1, 1.0, 1e-5, False, operation_settings={
        "operations": comfy.ops.disable_weight_init, "device": "meta", "dtype": torch.float32})
    return block.feed_forward.w1.out_features // 64


def _z_image_config(blocks):
    # Z-Image's sizes (dim 3840, 30 heads of 128, SwiGLU hidden 10240, 2560-wide captions, RoPE axes
    # 32/48/48) on the NextDiT class it shares with Lumina 2. ComfyUI 0.3.64 has no Z-Image
    # detection: its NextDiT builds the blocks' linears and attention at Z-Image's shapes, but the
    # blocks' modulation reads 1024 features after a SiLU (Z-Image: 256) and RoPE's theta is 10000
    # (Z-Image: 256), which changes values, not costs.
    return dict(patch_size=2, in_channels=16, dim=3840, n_layers=blocks[0], n_heads=30, n_kv_heads=30,
                multiple_of=256, ffn_dim_multiplier=10240 / 3840 / _nextdit_mlp_base(), qk_norm=True,
                cap_feat_dim=2560, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512])


ARCHS = {
    "flux": Arch("flux", "comfy.ldm.flux.model", "Flux", _flux_config, (19, 38), 4096),
    "qwen_image": Arch("qwen_image", "comfy.ldm.qwen_image.model", "QwenImageTransformer2DModel",
                       _qwen_config, (60,), 3584),
    "lumina2": Arch("lumina2", "comfy.ldm.lumina.model", "NextDiT", _lumina2_config, (26,), 2304),
    "z_image": Arch("z_image", "comfy.ldm.lumina.model", "NextDiT", _z_image_config, (30,), 2560,
                    sizes_over_detection=True),
}
TINY_BLOCKS = {"flux": (1, 1), "qwen_image": (1,), "lumina2": (1,), "z_image": (1,)}


def _network(arch: Arch, blocks, device, dtype):
    import importlib

    import comfy.ops
    cls = getattr(importlib.import_module(arch.module), arch.cls)
    return cls(**arch.config(blocks), dtype=dtype, device=device, operations=comfy.ops.disable_weight_init)


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights ~ N(0, 1/fan_in) (activations keep their scale through 60 blocks in bf16), norm
    scales 1, other vectors N(0, 0.02). In place, on the module's device."""
    torch.manual_seed(seed)
    for name, param in module.named_parameters():
        if param.ndim < 2 and (name.endswith(".scale") or ("norm" in name and name.endswith(".weight"))):
            param.fill_(1.0)
            continue
        std = param[0].numel() ** -0.5 if param.ndim >= 2 else 0.02
        if param.dtype.itemsize == 1:   # fp8 weights: no normal_ for them, drawn in fp32 and stored
            param.copy_(torch.empty(param.shape, device=param.device).normal_(0, std))
        else:
            param.normal_(0, std)
    return module


def state_dict(arch: str, blocks=None, seed: int = 0) -> dict:
    """A random fp32 checkpoint on the CPU in ComfyUI's key layout (few blocks: small enough)."""
    spec = ARCHS[arch]
    net = randomize_(_network(spec, blocks or TINY_BLOCKS[arch], "cpu", torch.float32), seed)
    return net.state_dict()


def load_model(arch: str, blocks=None, dtype=torch.float32, seed: int = 0, sd: dict | None = None):
    """A ModelPatcher made by comfy.sd.load_diffusion_model_state_dict (UNETLoader's path).
    `dtype` is the weight dtype (model_options "dtype", as UNETLoader's weight_dtype sets it)."""
    import comfy.sd

    if ARCHS[arch].sizes_over_detection:
        raise ValueError(f"{arch}: ComfyUI's detection would load these weights at another model's sizes; "
                         "use build_model")
    # The loader empties the dict it is given: hand it a shallow copy.
    sd = dict(sd) if sd is not None else state_dict(arch, blocks, seed)
    patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": dtype})
    assert patcher is not None, f"ComfyUI did not detect the {arch} checkpoint"
    return patcher


def build_model(arch: str, blocks=None, device="cuda", dtype=torch.bfloat16, seed: int = 0):
    """A ModelPatcher whose model ComfyUI's own model_config built on `device`, random weights.
    blocks None: the full-size model."""
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher

    spec = ARCHS[arch]
    with torch.device("meta"):
        meta_sd = _network(spec, blocks or spec.full_blocks, "meta", dtype).state_dict()
    model_config = comfy.model_detection.model_config_from_unet(meta_sd, "")
    assert model_config is not None, f"ComfyUI did not detect the {arch} layout"
    if spec.sizes_over_detection:
        model_config.unet_config.update(spec.config(blocks or spec.full_blocks))
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:   # as ComfyUI names its load device: cuda:<index>
        device = torch.device("cuda", torch.cuda.current_device())
    manual_cast = comfy.model_management.unet_manual_cast(dtype, device, model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(dtype, manual_cast)
    model = model_config.get_model(meta_sd, "", device=device)
    del meta_sd
    randomize_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=device,
                                            offload_device=comfy.model_management.unet_offload_device())


def load_flux(double_blocks: int = 1, single_blocks: int = 1, dtype=torch.float32):
    return load_model("flux", (double_blocks, single_blocks), dtype)


def conditioning(arch: str, tokens: int = 8, seed: int = 0, batch: int = 1, device="cpu", dtype=torch.float32):
    """ComfyUI CONDITIONING as the architecture's text encoder node would give it."""
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(batch, tokens, ARCHS[arch].context_dim, generator=g).to(device, dtype)
    if arch == "flux":
        extra = {"pooled_output": torch.randn(batch, 768, generator=g).to(device, dtype), "guidance": 3.5}
    elif arch in ("lumina2", "z_image"):
        # Lumina2.extra_conds only passes num_tokens when a mask is given; NextDiT needs it.
        extra = {"attention_mask": torch.ones(batch, tokens, dtype=torch.long, device=device)}
    else:
        extra = {}
    return [[ctx, extra]]


def flux_conditioning(tokens: int = 8, seed: int = 0):
    return conditioning("flux", tokens, seed)


def empty_latent(arch: str, batch: int, height: int, width: int, device="cpu"):
    """Latent of `height` x `width` latent pixels; Qwen-Image's is 5-D (B, C, T=1, H, W)."""
    if arch == "qwen_image":
        return torch.zeros(batch, QWEN_LATENT_CHANNELS, 1, height, width, device=device)
    return torch.zeros(batch, 16, height, width, device=device)


def sample(patcher, steps: int = 2, size=16, seed: int = 0, cfg: float = 1.0, batch: int = 1,
           arch: str = "flux", tokens: int = 8):
    """ComfyUI's KSampler path (nodes.common_ksampler), euler, on a size (or (h, w)) latent."""
    import nodes

    height, width = (size, size) if isinstance(size, int) else size
    latent = {"samples": empty_latent(arch, batch, height, width)}
    (out,) = nodes.common_ksampler(patcher, seed=seed, steps=steps, cfg=cfg, sampler_name="euler",
                                   scheduler="simple", positive=conditioning(arch, tokens),
                                   negative=conditioning(arch, tokens, seed=1), latent=latent)
    return out["samples"]
