"""Image similarity between a dense and a Lynx result: PSNR and SSIM, in torch only.

Images are (B, C, H, W) or (C, H, W) floats; `data_range` is max - min of the value range
(1 for [0, 1] images, 2 for [-1, 1]). Both return one value per image.
"""
import math

import torch
import torch.nn.functional as F


def _batched(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.dim() == 3:
        a, b = a[None], b[None]
    if a.dim() != 4:
        raise ValueError(f"expected (B, C, H, W) or (C, H, W), got {tuple(a.shape)}")
    return a.double(), b.double()


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """10 log10(range^2 / MSE) per image; inf for identical images."""
    a, b = _batched(a, b)
    mse = (a - b).square().flatten(1).mean(1)
    return torch.where(mse > 0, 10 * torch.log10(data_range ** 2 / mse.clamp_min(1e-300)),
                       torch.full_like(mse, math.inf))


def _gaussian_window(size: int, sigma: float, dtype, device) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-coords.square() / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, window: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM per image (Wang et al. 2004: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03,
    valid positions only, channels averaged). The window shrinks to the image for small images."""
    a, b = _batched(a, b)
    size = min(window, a.shape[-1], a.shape[-2])
    channels = a.shape[1]
    kernel = _gaussian_window(size, sigma, a.dtype, a.device).expand(channels, 1, size, size)

    def blur(x):
        return F.conv2d(x, kernel, groups=channels)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a.square()
    var_b = blur(b * b) - mu_b.square()
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a.square() + mu_b.square() + c1) * (var_a + var_b + c2))
    return ssim_map.flatten(1).mean(1)
