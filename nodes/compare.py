"""The "RT-Lynx Compare" node: the dense and the Lynx model sampled with the same seed, decoded,
shown side by side, with PSNR/SSIM of the Lynx image against the dense one."""
import math

import torch

from ..lynx.metrics import psnr, ssim


def compare_report(dense: torch.Tensor, lynx: torch.Tensor, seed: int) -> str:
    """One line for ComfyUI images (B, H, W, C) in [0, 1]; a batch reports its mean."""
    a, b = dense.movedim(-1, 1), lynx.movedim(-1, 1)
    p = psnr(a, b).mean().item()
    s = ssim(a, b).mean().item()
    shown = "inf" if math.isinf(p) else f"{p:.1f}"
    return f"PSNR {shown} dB, SSIM {s:.4f} (dense vs Lynx, seed {seed})"


def side_by_side(dense: torch.Tensor, lynx: torch.Tensor) -> torch.Tensor:
    """(B, H, 2W, C): dense left, Lynx right."""
    return torch.cat([dense, lynx], dim=2)


class RTLynxCompare:
    CATEGORY = "RT-Lynx"
    FUNCTION = "compare"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("dense_vs_lynx", "report")
    DESCRIPTION = ("Samples the dense model and the Lynx model with the same seed and settings, decodes both, and "
                   "returns them side by side (dense left, Lynx right) with PSNR/SSIM of the Lynx image vs dense.")

    @classmethod
    def INPUT_TYPES(cls):
        import comfy.samplers
        return {"required": {
            "dense_model": ("MODEL", {"tooltip": "The model before RT-Lynx Sparsify Model."}),
            "lynx_model": ("MODEL", {"tooltip": "The same model after RT-Lynx Sparsify Model (and Lynx LoRA)."}),
            "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",),
            "latent_image": ("LATENT",),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
            "cfg": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
            "sampler_name": (comfy.samplers.KSampler.SAMPLERS,),
            "scheduler": (comfy.samplers.KSampler.SCHEDULERS,),
            "vae": ("VAE",),
        }}

    def compare(self, dense_model, lynx_model, positive, negative, latent_image, seed, steps, cfg, sampler_name,
                scheduler, vae):
        import nodes

        images = []
        for model in (dense_model, lynx_model):
            (latent,) = nodes.common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                              latent_image, denoise=1.0)
            image = vae.decode(latent["samples"])
            if image.dim() == 5:  # video VAEs: frames as batch, as VAEDecode does
                image = image.reshape(-1, *image.shape[-3:])
            images.append(image.float().cpu())
        dense, lynx = images
        return side_by_side(dense, lynx), compare_report(dense, lynx, seed)
