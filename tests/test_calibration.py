import pytest
import torch
import torch.nn.functional as F

from helpers import tree_from_linears
from rt_lynx_pack.kernels import sparse_linear_reference
from rt_lynx_pack.lynx import (LynxConfig, LynxLinearForward, LynxRuntime, SelectionOptions, attach_lora, installed,
                               plan_model)
from rt_lynx_pack.lynx.calibration import (_StatisticsCapture, calibrate_lynx_lora, fit_low_rank, plan_groups,
                                           sparse_input, statistics_bytes, uncalibrated_layers)
from rt_lynx_pack.lynx.linear import modulated_layer_norm
from rt_lynx_pack.lynx.tiny_dit import Modulation, TinyDiTConfig, TinyFluxDiT, random_inputs

LAYER = "double_blocks.0.img_attn.qkv"


def single_layer_model(k=64, n=48, seed=0):
    """One FLUX-named linear (so the FLUX policy plans it), with a second layer so detection works."""
    torch.manual_seed(seed)
    model = tree_from_linears({LAYER: (k, n), "single_blocks.0.linear1": (k, n)}).double()
    plan = plan_model(model, LynxConfig(min_tokens=1), SelectionOptions(include=r"double_blocks"))
    assert list(plan.forwards) == [LAYER]
    return model, plan


def run_layer(model, item):
    return dict(model.named_modules())[LAYER](*item)


def fixed_mask_inputs(latent_basis, batches, tokens, generator):
    """In each group of 4, features 0-1 have |x| in [1, 2] and features 2-3 are small and driven
    by a low-dimensional latent: 2:4 always drops 2-3, so without compensation the sparsify
    error x - S(x) is linear in x and of the latent's rank."""
    latent, k = latent_basis.shape
    batches_out = []
    for _ in range(batches):
        large = (1 + torch.rand(tokens, k, generator=generator, dtype=torch.float64)) * \
            torch.randint(0, 2, (tokens, k), generator=generator).double().mul(2).sub(1)
        small = torch.tanh(torch.randn(tokens, latent, generator=generator, dtype=torch.float64) @ latent_basis) * 0.5
        dropped = (torch.arange(k) % 4) >= 2
        batches_out.append((torch.where(dropped, small, large),))
    return batches_out


def layer_error(model, inputs, lora=None, compensate=True):
    """Relative squared error of the Lynx layer (with the branch if given) vs the dense layer."""
    module = dict(model.named_modules())[LAYER]
    total, reference = 0.0, 0.0
    for (x,) in inputs:
        dense = F.linear(x, module.weight, module.bias)
        lynx = sparse_linear_reference(x, module.weight, module.bias, compensate)
        if lora is not None:
            lynx = lynx + lora.branch(LAYER, 1.0)(x)
        total += (lynx - dense).square().sum().item()
        reference += dense.square().sum().item()
    return total / reference


def test_fit_removes_a_known_low_rank_error_on_held_out_tokens():
    model, _ = single_layer_model()
    plan = plan_model(model, LynxConfig(min_tokens=1, compensate=False), SelectionOptions(include=r"double_blocks"))
    g = torch.Generator().manual_seed(1)
    basis = torch.randn(4, 64, generator=g, dtype=torch.float64) * 0.3
    train = fixed_mask_inputs(basis, 8, 64, g)
    test = fixed_mask_inputs(basis, 4, 64, g)   # same distribution, unseen tokens
    lora = calibrate_lynx_lora(model, plan, train, rank=8, run=run_layer)
    assert (lora.architecture, lora.rank, lora.alpha, lora.pattern, lora.compensation) == \
        ("flux", 8, 8.0, "2:4", False)
    assert lora.layers[LAYER][0].shape == (8, 64) and lora.layers[LAYER][1].shape == (48, 8)
    before = layer_error(model, test, compensate=False)
    after = layer_error(model, test, lora, compensate=False)
    # tanh makes the small features slightly non-linear in the latent: not exactly zero.
    assert after < 0.05 * before, (before, after)


def test_fit_reduces_layer_error_with_compensation_and_outlier_channels():
    model, plan = single_layer_model()
    g = torch.Generator().manual_seed(2)
    channel_gain = torch.exp(1.5 * torch.randn(64, generator=g, dtype=torch.float64))
    train = [(torch.randn(64, 64, generator=g, dtype=torch.float64) * channel_gain,) for _ in range(16)]
    test = [(torch.randn(64, 64, generator=g, dtype=torch.float64) * channel_gain,) for _ in range(4)]
    lora = calibrate_lynx_lora(model, plan, train, rank=16, run=run_layer)
    assert layer_error(model, test, lora) < 0.9 * layer_error(model, test)


def test_full_rank_equals_brute_force_least_squares():
    k, n = 64, 80   # rank K: the branch is unconstrained
    model, plan = single_layer_model(k, n)
    g = torch.Generator().manual_seed(2)
    inputs = [(torch.randn(100, k, generator=g, dtype=torch.float64),) for _ in range(3)]
    lora = calibrate_lynx_lora(model, plan, inputs, rank=min(k, n), run=run_layer, ridge=0.0)
    down, up = lora.layers[LAYER]
    fitted = down.double().T @ up.double().T                      # M = down^T up^T, K x N
    x = torch.cat([x for (x,) in inputs])
    weight = dict(model.named_modules())[LAYER].weight.detach()
    target = (x - sparse_input(x, 2, 4, True)) @ weight.T         # d W^T
    brute_force = torch.linalg.lstsq(x, target).solution
    assert torch.allclose(fitted, brute_force, atol=1e-4, rtol=1e-4)


def test_low_rank_fit_is_optimal_in_the_data_metric():
    """Rank-r answer beats the plain truncated SVD of M* (wrong metric) on the training tokens."""
    g = torch.Generator().manual_seed(3)
    k, n, r = 32, 24, 3
    x = torch.randn(500, k, generator=g, dtype=torch.float64) * torch.logspace(0, -2, k, dtype=torch.float64)
    weight = torch.randn(n, k, generator=g, dtype=torch.float64)
    d = x - sparse_input(x, 2, 4, True)
    down, up = fit_low_rank(x.T @ x, x.T @ d, weight, r, ridge=0.0)
    target = d @ weight.T
    m_star = torch.linalg.lstsq(x, target).solution
    u, s, vh = torch.linalg.svd(m_star, full_matrices=False)
    plain = (u[:, :r] * s[:r]) @ vh[:r]
    ours = (x @ down.T @ up.T - target).square().sum()
    naive = (x @ plain - target).square().sum()
    assert ours < naive


def test_grouped_passes_match_one_pass_and_progress_is_reported():
    torch.manual_seed(0)
    config = TinyDiTConfig(hidden=64, heads=2)
    model = TinyFluxDiT(config).eval()
    plan = plan_model(model)
    g = torch.Generator().manual_seed(1)
    inputs = [random_inputs(config, 2, 48, 32, g) for _ in range(3)]
    one_pass = calibrate_lynx_lora(model, plan, inputs, rank=4)
    events = []
    k_of = {name: fwd.module.in_features for name, fwd in plan.forwards.items()}
    budget = statistics_bytes(256, torch.float64)   # an mlp.2 (K = 256) alone fills it
    groups = plan_groups(k_of, budget, torch.float64)
    assert len(groups) > 2
    grouped = calibrate_lynx_lora(model, plan, inputs, rank=4, memory_budget_bytes=budget,
                                  stats_dtype=torch.float64, progress=events.append)
    assert one_pass.layers.keys() == grouped.layers.keys() == plan.forwards.keys()
    for name, (down, up) in one_pass.layers.items():
        # Factors are unique up to sign per singular vector; compare the product.
        assert torch.allclose(down.T @ up.T, grouped.layers[name][0].T @ grouped.layers[name][1].T, atol=1e-6)
    assert {e.pass_index for e in events} == set(range(len(groups)))
    assert events[-1].layers_fitted == events[-1].layers_total == len(plan.forwards)
    assert max(e.samples_done for e in events) == len(inputs)
    with pytest.raises(ValueError, match="one-shot iterator"):
        calibrate_lynx_lora(model, plan, iter(inputs), rank=4, memory_budget_bytes=budget)


def outlier_tiny_dit():
    torch.manual_seed(0)
    config = TinyDiTConfig(hidden=64, heads=2)
    model = TinyFluxDiT(config).eval()
    # Trained DiTs modulate channels very unevenly (outlier channels), which makes the sparsify
    # error partly predictable; a random init has no such structure, so give it some.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Modulation):
                bias = module.lin.bias.view(module.chunks, config.hidden)
                for scale_chunk in (1, 4)[:module.chunks // 3]:
                    bias[scale_chunk] = torch.exp(1.5 * torch.randn(config.hidden)) - 1
    return config, model


def output_error(model, active_plan, inputs):
    """Relative squared error of the model under `active_plan` vs dense, over `inputs`."""
    total, reference = 0.0, 0.0
    with torch.no_grad():
        for item in inputs:
            dense = model(*item)
            with installed(model, active_plan):
                lynx = model(*item)
            total += (lynx - dense).square().sum().item()
            reference += dense.square().sum().item()
    return total / reference


def test_calibrated_lora_reduces_tiny_dit_output_error_with_the_weights_restored():
    config, model = outlier_tiny_dit()
    plan = plan_model(model)
    g = torch.Generator().manual_seed(5)
    calibration = [random_inputs(config, 2, 64, 32, g) for _ in range(8)]
    held_out = [random_inputs(config, 2, 64, 32, g) for _ in range(3)]
    weights = {name: p.clone() for name, p in model.state_dict().items()}
    errors = {}
    for ranks in ((8, 0), (0, 8), (8, 8)):
        lora = calibrate_lynx_lora(model, plan, calibration, rank=ranks[0], folded_rank=ranks[1])
        assert (len(lora.layers) > 0, len(lora.folded_layers) > 0) == (ranks[0] > 0, ranks[1] > 0)
        errors[ranks] = output_error(model, attach_lora(plan, lora, 1.0), held_out)
        assert all(torch.equal(weights[name], p) for name, p in model.state_dict().items())
    sparse_error = output_error(model, plan, held_out)
    assert errors[8, 0] < 0.8 * sparse_error and errors[0, 8] < 0.9 * sparse_error, (sparse_error, errors)
    assert errors[8, 8] < min(errors[8, 0], errors[0, 8]), errors   # the runtime part adds to the folded one
    with pytest.raises(ValueError, match="already carries a Lynx LoRA"):
        calibrate_lynx_lora(model, attach_lora(plan, lora, 1.0), calibration, rank=8)
    with pytest.raises(ValueError, match="at least one must be positive"):
        calibrate_lynx_lora(model, plan, calibration, rank=0)


def test_layers_below_min_tokens_and_bad_rank():
    model, _ = single_layer_model()
    plan = plan_model(model, LynxConfig(min_tokens=100), SelectionOptions(include=r"double_blocks"))
    with pytest.raises(ValueError, match="no calibration input ran a sparsified layer sparse"):
        calibrate_lynx_lora(model, plan, [(torch.randn(10, 64, dtype=torch.float64),)], rank=4, run=run_layer)
    with pytest.raises(ValueError, match="rank 64 exceeds"):
        calibrate_lynx_lora(model, plan, [(torch.randn(10, 64, dtype=torch.float64),)], rank=64, run=run_layer)


@pytest.mark.parametrize("k, n", [(48, 20), (20, 48)])
def test_fit_matches_the_truncated_svd_of_the_whitened_target(k, n):
    """The Gram-eigenvector shortcut gives the same rank-r product as a full SVD, tall or wide."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(200, k, generator=g, dtype=torch.float64) * torch.logspace(0, -1, k, dtype=torch.float64)
    weight = torch.randn(n, k, generator=g, dtype=torch.float64)
    c_xx, c_xd = x.T @ x, x.T @ (x - sparse_input(x, 2, 4, True))
    down, up = fit_low_rank(c_xx, c_xd, weight, 5, ridge=0.0)
    chol = torch.linalg.cholesky(c_xx)
    u, s, vh = torch.linalg.svd(torch.linalg.solve_triangular(chol, c_xd @ weight.T, upper=False))
    reference = torch.linalg.solve_triangular(chol.T, u[:, :5] * s[:5], upper=True) @ vh[:5]
    assert torch.allclose(down.T @ up.T, reference, atol=1e-8, rtol=1e-6)
    # A target of rank below r: the extra directions get a zero branch, not NaN.
    down, up = fit_low_rank(c_xx, torch.zeros_like(c_xd), weight, 5, ridge=0.0)
    assert torch.isfinite(down).all() and torch.isfinite(up).all() and (down.T @ up.T).abs().max() == 0


def test_text_stream_below_min_tokens_is_left_out_and_the_rest_still_helps():
    """FLUX-style text stream with 8 prompt tokens (< min_tokens): its layers compute dense, see no
    statistics, and get no branch; the image/single-stream layers are fitted and help."""
    config, model = outlier_tiny_dit()
    plan = plan_model(model)
    g = torch.Generator().manual_seed(6)
    calibration = [random_inputs(config, 1, 64, 8, g) for _ in range(16)]
    held_out = [random_inputs(config, 1, 64, 8, g) for _ in range(2)]
    lora = calibrate_lynx_lora(model, plan, calibration, rank=8)
    skipped = uncalibrated_layers(plan, lora)
    assert skipped and all(".txt_" in name for name in skipped)
    assert set(skipped) == {name for name in plan.forwards if ".txt_" in name}
    assert set(lora.layers) | set(skipped) == set(plan.forwards)
    with_lora = attach_lora(plan, lora, 1.0)
    assert f"on {len(lora.layers)}/{len(plan.forwards)} layers" in with_lora.summary()
    assert all((fwd.lora is None) == (name in skipped) for name, fwd in with_lora.forwards.items())

    sparse_error, calibrated_error = output_error(model, plan, held_out), output_error(model, with_lora, held_out)
    assert calibrated_error < 0.8 * sparse_error, (sparse_error, calibrated_error)


def test_calibration_runs_on_an_fp8_plan_and_fits_the_weight_the_layer_uses():
    torch.manual_seed(0)
    config = TinyDiTConfig(hidden=64, heads=2)
    model = TinyFluxDiT(config).eval()
    plan = plan_model(model, LynxConfig(precision="fp8"))
    g = torch.Generator().manual_seed(3)
    inputs = [random_inputs(config, 1, 48, 32, g) for _ in range(2)]
    lora = calibrate_lynx_lora(model, plan, inputs, rank=4)
    assert lora.layers.keys() == plan.forwards.keys()
    assert all(f.fp8_weight is None for f in plan.forwards.values())  # released after the passes


def test_fit_survives_statistics_made_indefinite_by_rounding():
    from rt_lynx_pack.lynx.calibration import fit_low_rank
    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, 32, generator=g, dtype=torch.float64)
    x[:, 0] *= 1e3   # one dominant channel: rounding of the big eigenvalue swamps the ridge
    c_xx = x.T @ x
    c_xx -= 1e-3 * torch.eye(32, dtype=torch.float64) * c_xx.diagonal().mean()   # slightly indefinite
    c_xd = x.T @ torch.randn(400, 32, generator=g, dtype=torch.float64)
    down, up = fit_low_rank(c_xx, c_xd, torch.randn(16, 32, generator=g), rank=4, ridge=1e-6)
    assert down.shape == (4, 32) and up.shape == (16, 4)
    assert torch.isfinite(down).all() and torch.isfinite(up).all()


def test_a_capture_records_the_inputs_a_fused_block_would_compute_in_the_sparsify_pass():
    g = torch.Generator().manual_seed(11)
    layer = torch.nn.Linear(64, 48)
    capture = _StatisticsCapture(LynxLinearForward(layer, "layer", LynxConfig(min_tokens=1), LynxRuntime()), None)
    x = torch.randn(2, 40, 64, generator=g)
    shift, scale = torch.randn(2, 1, 64, generator=g), torch.randn(2, 1, 64, generator=g) / 4
    capture.modulated(x, shift, 1 + scale, 1e-6)
    capture.after_gelu(x)
    # A gated residual after the layer (its GEMM's epilogue in a fused block): the input is recorded too.
    residual, gate = torch.randn(2, 40, 48, generator=g), torch.randn(2, 1, 48, generator=g)
    out = capture.gated_residual(residual, gate, x)
    torch.testing.assert_close(out, torch.addcmul(residual, gate, capture(x)), rtol=0, atol=0)
    capture.gated_residual(residual, gate, x, after_gelu=True)
    assert capture.tokens == 2 * 80 + 2 * 80 + 80   # (and the check's own call above)
    inputs = torch.cat([modulated_layer_norm(x, shift, 1 + scale, 1e-6), F.gelu(x, approximate="tanh"), x, x,
                        F.gelu(x, approximate="tanh")]).reshape(-1, 64)
    torch.testing.assert_close(capture.c_xx, inputs.double().T @ inputs.double())


def test_folded_full_rank_equals_brute_force_least_squares_on_the_sparse_input():
    """A folded branch multiplies S(x): its fit is least squares of d W^T on S(x), not on x."""
    k, n = 64, 80
    model, plan = single_layer_model(k, n)
    g = torch.Generator().manual_seed(2)
    inputs = [(torch.randn(100, k, generator=g, dtype=torch.float64),) for _ in range(3)]
    lora = calibrate_lynx_lora(model, plan, inputs, rank=0, folded_rank=min(k, n), run=run_layer, ridge=0.0,
                               folded_ridge=0.0)
    assert not lora.layers
    down, up = lora.folded_layers[LAYER]
    x = torch.cat([x for (x,) in inputs])
    kept = sparse_input(x, 2, 4, True)
    weight = dict(model.named_modules())[LAYER].weight.detach()
    brute_force = torch.linalg.lstsq(kept, (x - kept) @ weight.T).solution
    assert torch.allclose(down.double().T @ up.double().T, brute_force, atol=1e-4, rtol=1e-4)
    runtime = calibrate_lynx_lora(model, plan, inputs, rank=min(k, n), run=run_layer, ridge=0.0)
    assert not torch.allclose(runtime.layers[LAYER][0].double().T @ runtime.layers[LAYER][1].double().T,
                              brute_force, atol=1e-2)


def test_the_runtime_part_is_fitted_on_the_folded_model_against_the_original_weight():
    """Both parts, the runtime one at full rank: least squares of x W^T - S(x) (W + F^T)^T on x,
    with W the weight before the folded part went in (the layer computes with W + F^T meanwhile)."""
    k, n = 64, 80
    model, plan = single_layer_model(k, n)
    g = torch.Generator().manual_seed(6)
    inputs = [(torch.randn(100, k, generator=g, dtype=torch.float64) ** 3,) for _ in range(3)]
    lora = calibrate_lynx_lora(model, plan, inputs, rank=min(k, n), folded_rank=8, run=run_layer, ridge=0.0,
                               folded_ridge=0.0)
    fold_down, fold_up = (t.double() for t in lora.folded_layers[LAYER])
    fold = fold_down.T @ fold_up.T * (lora.folded_alpha / lora.folded_rank)       # F, K x N
    down, up = (t.double() for t in lora.layers[LAYER])
    x = torch.cat([x for (x,) in inputs])
    weight = dict(model.named_modules())[LAYER].weight.detach()
    error = x @ weight.T - sparse_input(x, 2, 4, True) @ (weight.T + fold)
    brute_force = torch.linalg.lstsq(x, error).solution
    assert torch.allclose(down.T @ up.T, brute_force, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("narrow", ["subspace", "quiet channels"])
def test_default_ridges_keep_a_lora_fitted_on_one_kind_of_input_from_hurting_another(narrow):
    """Calibration inputs narrower than the ones the layer then sees (one prompt): near an
    8-dimensional subspace, used near another; or with every fourth channel near silent, used with
    all channels active. A near-zero ridge fits the runtime branch to the calibration's weak
    directions and multiplies the error elsewhere; with the default ridges no part leaves it much
    above compensation alone. (A ridge scaled per feature fails the quiet channels: 400x.)"""
    k, n = 64, 48
    model, plan = single_layer_model(k, n)
    layer = dict(model.named_modules())[LAYER]
    g = torch.Generator().manual_seed(8)

    def inputs(kind):
        if narrow == "quiet channels":
            scale = torch.ones(k, dtype=torch.float64)
            scale[::4] = 1e-3 if kind == "calibration" else 1.0
            return [(torch.randn(500, k, generator=g, dtype=torch.float64) * scale,) for _ in range(4)]
        basis = torch.randn(8, k, generator=g, dtype=torch.float64)
        return [(torch.randn(500, 8, generator=g, dtype=torch.float64) @ basis
                 + 0.05 * torch.randn(500, k, generator=g, dtype=torch.float64),) for _ in range(4)]
    calibration, other = inputs("calibration"), inputs("use")

    def error(lora=None):
        active = attach_lora(plan, lora, 1.0) if lora is not None else plan
        total = 0.0
        with torch.no_grad(), installed(model, active):
            for (x,) in other:
                total += (layer(x) - F.linear(x, layer.weight, layer.bias)).square().sum().item()
        return total
    compensation_only = error()
    fitted_closely = calibrate_lynx_lora(model, plan, calibration, rank=8, run=run_layer, ridge=1e-6)
    assert error(fitted_closely) > 5 * compensation_only
    for ranks in ({"rank": 8}, {"rank": 0, "folded_rank": 8}, {"rank": 8, "folded_rank": 8}):
        lora = calibrate_lynx_lora(model, plan, calibration, run=run_layer, **ranks)
        assert error(lora) < 1.1 * compensation_only, ranks
