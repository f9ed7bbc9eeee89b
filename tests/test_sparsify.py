import zlib

import pytest
import torch

from helpers import brute_force_sparsify
from rt_lynx_pack.kernels import keep_mask_nm, norm_compensation_scale, sparsify_nm


def heavy_tailed(*shape, generator):
    return torch.randn(*shape, generator=generator) ** 3 * 10


INPUTS = {
    "random": lambda g: torch.randn(5, 3, 32, generator=g),
    "heavy_tailed": lambda g: heavy_tailed(7, 64, generator=g),
    "student_t": lambda g: torch.randn(6, 48, generator=g) / torch.rand(6, 48, generator=g).clamp_min(1e-3) ** 0.7,
    "tied": lambda g: torch.randint(-2, 3, (9, 40), generator=g).float(),
    "all_zero": lambda g: torch.zeros(4, 16),
    "negative_ties": lambda g: torch.tensor([[-1.0, 1.0, -1.0, 1.0, 0.0, -0.0, 3.0, -3.0]]),
}


@pytest.mark.parametrize("kind", INPUTS)
@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8)])
def test_sparsify_matches_brute_force(kind, nm):
    g = torch.Generator().manual_seed(zlib.crc32(kind.encode()))
    x = INPUTS[kind](g)
    assert torch.equal(sparsify_nm(x, *nm), brute_force_sparsify(x, *nm))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sparsify_low_precision_keeps_exact_values(dtype):
    x = torch.randn(8, 128, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = sparsify_nm(x)
    assert out.dtype == dtype
    assert torch.equal(out, brute_force_sparsify(x.float(), 2, 4).to(dtype))


def test_mask_keeps_exactly_n_per_group_even_for_ties():
    x = torch.ones(3, 64)
    mask = keep_mask_nm(x)
    assert torch.equal(mask.view(3, 16, 4).sum(-1), torch.full((3, 16), 2))
    # Ties go to the lower index: the first two of every group.
    assert mask.view(3, 16, 4)[..., :2].all() and not mask.view(3, 16, 4)[..., 2:].any()


def test_bad_shapes_and_patterns_are_refused():
    with pytest.raises(ValueError, match="multiple of m=4"):
        sparsify_nm(torch.randn(2, 6))
    with pytest.raises(ValueError, match="0 < n < m"):
        sparsify_nm(torch.randn(2, 8), 4, 4)


def test_compensation_restores_each_token_norm():
    x = torch.randn(10, 256, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    kept = sparsify_nm(x)
    scale = norm_compensation_scale(x, kept)
    assert scale.shape == (10, 1)
    assert (scale > 1).all()
    torch.testing.assert_close((scale.double() * kept).norm(dim=-1), x.norm(dim=-1), rtol=1e-6, atol=0)


def test_compensation_of_zero_rows_is_one_not_nan():
    x = torch.zeros(3, 32)
    x[1] = torch.randn(32)
    scale = norm_compensation_scale(x, sparsify_nm(x))
    assert torch.isfinite(scale).all()
    assert scale[0].item() == 1.0 and scale[2].item() == 1.0 and scale[1].item() > 1.0
