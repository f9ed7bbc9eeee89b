"""Random-weight diffusion models in ComfyUI's real key layout, loaded through ComfyUI's loader.

FLUX at its real width (3072; ComfyUI's detection fixes it) with few blocks: the same layer
shapes as FLUX.1-dev, so the same kernels and policies run as on the real model.
"""
import torch


def flux_state_dict(double_blocks: int = 1, single_blocks: int = 1, seed: int = 0, std: float = 0.02):
    import comfy.ops
    from comfy.ldm.flux.model import Flux

    torch.manual_seed(seed)
    model = Flux(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
                 mlp_ratio=4.0, num_heads=24, depth=double_blocks, depth_single_blocks=single_blocks,
                 axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True,
                 dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1 and ("norm" in name or name.endswith(".scale")):
                param.fill_(1.0)
            else:
                param.normal_(0, std)
    return model.state_dict()


def load_flux(double_blocks: int = 1, single_blocks: int = 1, dtype=torch.float32):
    """A ModelPatcher made by comfy.sd.load_diffusion_model_state_dict (UNETLoader's path)."""
    import comfy.sd

    patcher = comfy.sd.load_diffusion_model_state_dict(flux_state_dict(double_blocks, single_blocks),
                                                       model_options={"dtype": dtype})
    assert patcher is not None, "ComfyUI did not detect the FLUX checkpoint"
    return patcher


def flux_conditioning(tokens: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, 4096, generator=g), {"pooled_output": torch.randn(1, 768, generator=g),
                                                          "guidance": 3.5}]]


def sample(patcher, steps: int = 2, size: int = 16, seed: int = 0, cfg: float = 1.0, batch: int = 1):
    """ComfyUI's KSampler path (nodes.common_ksampler), euler, on a size x size latent."""
    import nodes

    latent = {"samples": torch.zeros(batch, 16, size, size)}
    (out,) = nodes.common_ksampler(patcher, seed=seed, steps=steps, cfg=cfg, sampler_name="euler",
                                   scheduler="simple", positive=flux_conditioning(), negative=flux_conditioning(seed=1),
                                   latent=latent)
    return out["samples"]
