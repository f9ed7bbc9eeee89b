import math

import pytest
import torch

from rt_lynx_pack.lynx.metrics import psnr, ssim


def test_identical_images():
    image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.isinf(psnr(image, image)).all()
    assert torch.allclose(ssim(image, image), torch.ones(2, dtype=torch.float64))


def test_psnr_of_a_known_error():
    a = torch.zeros(1, 1, 16, 16)
    b = torch.full_like(a, 0.1)               # MSE 0.01 -> 20 dB at range 1, 26.02 dB at range 2
    assert psnr(a, b).item() == pytest.approx(20.0)
    assert psnr(a, b, data_range=2.0).item() == pytest.approx(20 + 20 * math.log10(2))
    noise = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(1)) * 0.05
    assert psnr(torch.zeros_like(noise), noise).item() == pytest.approx(-10 * math.log10(0.05 ** 2), abs=0.05)


def test_ssim_of_constant_images_and_ordering():
    a, b = torch.full((1, 1, 16, 16), 0.2), torch.full((1, 1, 16, 16), 0.6)
    # Constant images: luminance term only, (2 mu_a mu_b + c1) / (mu_a^2 + mu_b^2 + c1).
    c1 = 0.01 ** 2
    assert ssim(a, b).item() == pytest.approx((2 * 0.12 + c1) / (0.04 + 0.36 + c1))
    g = torch.Generator().manual_seed(2)
    image = torch.rand(1, 1, 32, 32, generator=g)
    slightly, heavily = (image + s * torch.randn(image.shape, generator=g) for s in (0.02, 0.3))
    assert 1 > ssim(image, slightly).item() > ssim(image, heavily).item() > 0
    assert ssim(image, -image + 1).item() < 0   # inverted contrast


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
    assert psnr(torch.zeros(3, 8, 8), torch.ones(3, 8, 8)).shape == (1,)
