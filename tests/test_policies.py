import pytest
import torch.nn as nn

from helpers import flux_like_shapes, qwen_image_like_shapes, tree_from_linears, z_image_like_shapes
from rt_lynx_pack.lynx import SelectionOptions, detect_architecture, select_layers
from rt_lynx_pack.lynx.tiny_dit import TinyDiTConfig, TinyFluxDiT


def decide(shapes, **options):
    model = tree_from_linears(shapes)
    policy = detect_architecture(model)
    return policy, {d.name: d for d in select_layers(model, policy, SelectionOptions(**options))}


def test_flux_selects_block_linears_only():
    policy, decisions = decide(flux_like_shapes())
    assert policy.name == "flux"
    sparse = {n for n, d in decisions.items() if d.sparse}
    assert sparse == {f"double_blocks.{i}.{s}_{l}" for i in range(2) for s in ("img", "txt")
                      for l in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")} | {f"single_blocks.{i}.linear1" for i in range(2)}
    assert decisions["single_blocks.0.linear2"].reason.startswith("flux default")
    # Embedders, modulation and the final layer are never considered.
    assert not any(k in decisions for k in ("img_in", "double_blocks.0.img_mod.lin", "single_blocks.0.modulation.lin",
                                            "final_layer.linear", "time_in.in_layer"))


def test_flux_all_eligible_and_block_skips_count_double_then_single():
    _, decisions = decide(flux_like_shapes(double=2, single=3), use_default_dense_layers=False,
                          skip_first_blocks=1, skip_last_blocks=2)
    assert decisions["single_blocks.0.linear2"].sparse
    assert not decisions["double_blocks.0.img_attn.qkv"].sparse  # block 0
    assert decisions["double_blocks.1.img_attn.qkv"].sparse     # block 1
    assert decisions["single_blocks.0.linear1"].sparse          # block 2
    assert "last 2" in decisions["single_blocks.1.linear1"].reason  # block 3 of 5
    assert "last 2" in decisions["single_blocks.2.linear1"].reason


def test_include_exclude_and_feature_limits():
    _, decisions = decide(flux_like_shapes(), include=r"img_", exclude=r"mlp\.2")
    assert decisions["double_blocks.0.img_attn.qkv"].sparse
    assert decisions["double_blocks.0.txt_attn.qkv"].reason == "not matched by include filter"
    assert decisions["double_blocks.0.img_mlp.2"].reason == "matched by exclude filter"
    shapes = flux_like_shapes()
    shapes["double_blocks.0.img_attn.proj"] = (66, 64)
    shapes["double_blocks.1.img_attn.proj"] = (32, 64)
    _, decisions = decide(shapes)
    assert "not a multiple of 4" in decisions["double_blocks.0.img_attn.proj"].reason
    assert "< 64" in decisions["double_blocks.1.img_attn.proj"].reason
    with pytest.raises(ValueError, match="invalid layer filter"):
        SelectionOptions(include="(")


def test_qwen_image_selects_attention_and_both_mlps_not_modulation():
    policy, decisions = decide(qwen_image_like_shapes())
    assert policy.name == "qwen_image"
    sparse = {n for n, d in decisions.items() if d.sparse}
    assert len(sparse) == 2 * (8 + 4)
    assert "transformer_blocks.1.attn.to_out.0" in sparse and "transformer_blocks.0.txt_mlp.net.0.proj" in sparse
    assert not any("_mod" in n or n in ("proj_out", "img_in", "norm_out.linear") for n in decisions)


def test_z_image_keeps_paper_skips_and_refiners_dense():
    policy, decisions = decide(z_image_like_shapes())
    assert policy.name == "z_image"
    sparse = sorted(n for n, d in decisions.items() if d.sparse)
    assert sparse == [f"layers.{i}.{l}" for i in range(3) for l in ("attention.qkv", "feed_forward.w2")]
    assert not any("refiner" in n for n in decisions)
    _, decisions = decide(z_image_like_shapes(), use_default_dense_layers=False)
    assert sum(d.sparse for d in decisions.values()) == 3 * 5


def test_unknown_model_is_refused_with_the_known_list():
    with pytest.raises(ValueError, match="unsupported diffusion model.*flux.*qwen_image.*z_image"):
        detect_architecture(nn.Sequential(nn.Linear(64, 64)))


def test_tiny_dit_is_named_like_flux():
    model = TinyFluxDiT(TinyDiTConfig())
    assert detect_architecture(model).name == "flux"
    flux_names = set(flux_like_shapes(double=2, single=4))
    tiny_names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    # Every linear of the tiny DiT exists in Flux (it only lacks the vector/guidance embedders).
    assert tiny_names <= flux_names
    assert flux_names - tiny_names == {"vector_in.in_layer", "vector_in.out_layer",
                                       "guidance_in.in_layer", "guidance_in.out_layer"}


def test_fp8_reads_each_architectures_block_modulation_weights_in_e4m3_and_nothing_else():
    from rt_lynx_pack.lynx import LynxConfig, plan_model
    expected = {
        "flux": {f"double_blocks.{i}.{s}_mod.lin" for i in range(2) for s in ("img", "txt")}
        | {f"single_blocks.{i}.modulation.lin" for i in range(2)},
        "qwen_image": {f"transformer_blocks.{i}.{s}_mod.1" for i in range(2) for s in ("img", "txt")},
        "lumina2": {"layers.0.adaLN_modulation.1", "layers.1.adaLN_modulation.1", "noise_refiner.0.adaLN_modulation.1"},
        "z_image": {"layers.0.adaLN_modulation.0", "layers.1.adaLN_modulation.0", "noise_refiner.0.adaLN_modulation.0"},
    }
    for kind, shapes in (("flux", flux_like_shapes()), ("qwen_image", qwen_image_like_shapes()),
                         ("lumina2", z_image_like_shapes(blocks=2)),
                         ("z_image", z_image_like_shapes(blocks=2, z_image_modulation=True))):
        model = tree_from_linears(shapes)
        plan = plan_model(model, LynxConfig(precision="fp8"))
        assert set(plan.per_image_forwards) == expected[kind], kind
        assert not set(plan.per_image_forwards) & (set(plan.forwards) | set(plan.fp8_dense_forwards))
        assert not plan_model(model, LynxConfig()).per_image_forwards
        assert not plan_model(model, LynxConfig(precision="fp8", fp8_dense_layers=False)).per_image_forwards
    # A modulation whose in_features the kernel cannot take keeps its own forward.
    shapes = flux_like_shapes() | {"double_blocks.0.img_mod.lin": (72, 6 * 64)}
    assert "double_blocks.0.img_mod.lin" not in plan_model(tree_from_linears(shapes),
                                                           LynxConfig(precision="fp8")).per_image_forwards


def test_a_model_built_otherwise_than_those_measured_gets_the_choice_with_a_note():
    from rt_lynx_pack.lynx import LynxConfig, plan_model
    assert plan_model(tree_from_linears(flux_like_shapes())).build_note == ""
    assert plan_model(tree_from_linears(qwen_image_like_shapes())).build_note == ""
    # FLUX.2 / Chroma: FLUX's block names, the modulation outside the blocks.
    shapes = {n: s for n, s in flux_like_shapes().items() if "_mod" not in n and "modulation" not in n}
    plan = plan_model(tree_from_linears(shapes), LynxConfig())
    assert plan.forwards and "flux layer choice on a model built otherwise" in plan.build_note
    assert f", {plan.build_note}" in plan.summary()


def test_linears_are_recognised_by_shape_and_input_scaled_ones_are_left_alone():
    import torch
    from rt_lynx_pack.lynx.policies import is_linear

    class QuantizedLinear(nn.Module):   # ComfyUI's quantized layers: a linear in all but class
        def __init__(self, in_features, out_features):
            super().__init__()
            self.in_features, self.out_features = in_features, out_features
            self.weight = nn.Parameter(torch.zeros(out_features, in_features))

    assert is_linear(nn.Linear(8, 4)) and is_linear(QuantizedLinear(8, 4))
    assert not is_linear(nn.LayerNorm(8)) and not is_linear(nn.Conv1d(8, 4, 1))
    scaled = QuantizedLinear(8, 4)
    scaled.pre_quant_scale = torch.ones(8)
    assert not is_linear(scaled)
