"""The end-to-end benchmark measures what a sampler runs: its step timing reaches the patched
model's block-replace patches (the fused blocks) as well as the Lynx linears."""
import pytest
import torch

from comfyui_env import import_comfyui

import_comfyui()

import comfy.model_management  # noqa: E402

import comfyui_models  # noqa: E402,F401  (puts bench/ on the path)
from comfy_models import TINY_BLOCKS, build_model  # noqa: E402
import e2e  # noqa: E402,I001


def test_step_timing_runs_the_fused_blocks_and_the_lynx_layers():
    args = e2e.parse_args(["--tiny", "--models", "flux", "--no-compile"])
    args.iters, args.warmup = 1, 1
    dev = e2e.Device(torch)
    dense = build_model("flux", blocks=TINY_BLOCKS["flux"], device=dev.device, dtype=torch.float32)
    lynx = e2e.lynx_clone(dense, "bf16")
    replaced = lynx.model_options["transformer_options"]["patches_replace"]["dit"]
    calls = []
    for key, patch in list(replaced.items()):
        def counting(block_args, extra, patch=patch, key=key):
            calls.append(key)
            return patch(block_args, extra)
        replaced[key] = counting
    try:
        lynx_out = e2e.time_steps(lynx.clone(), "flux", 128, dev, torch.float32, args)[5]
        dense_out = e2e.time_steps(dense.clone(), "flux", 128, dev, torch.float32, args)[5]
    finally:
        comfy.model_management.unload_all_models()
    assert set(calls) == {("double_block", 0), ("single_block", 0)}
    assert not torch.equal(lynx_out, dense_out)   # the sparse linears ran too


def test_z_image_bench_model_has_z_image_block_shapes_on_this_comfyui():
    import comfy_models
    from rt_lynx_pack.lynx import SelectionOptions, detect_architecture, select_layers
    spec = comfy_models.ARCHS["z_image"]
    with torch.device("meta"):
        net = comfy_models._network(spec, (2,), "meta", torch.bfloat16)
    shapes = {n: tuple(m.weight.shape) for n, m in net.named_modules() if n.startswith("layers.1.")
              and isinstance(m, torch.nn.Linear) and "adaLN" not in n}
    assert shapes == {"layers.1.attention.qkv": (11520, 3840), "layers.1.attention.out": (3840, 3840),
                      "layers.1.feed_forward.w1": (10240, 3840), "layers.1.feed_forward.w3": (10240, 3840),
                      "layers.1.feed_forward.w2": (3840, 10240)}
    policy = detect_architecture(net)
    sparse = {d.name for d in select_layers(net, policy, SelectionOptions()) if d.sparse}
    assert policy.name == "z_image" and sparse == {f"layers.{i}.{n}" for i in range(2)
                                                   for n in ("attention.qkv", "feed_forward.w2")}
    with pytest.raises(ValueError, match="use build_model"):
        comfy_models.load_model("z_image")
