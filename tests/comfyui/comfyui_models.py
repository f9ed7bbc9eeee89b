"""The random-weight model builders live in bench/comfy_models.py (the end-to-end benchmark uses
the same ones); the tests import them from here."""
import pathlib
import sys

BENCH = str(pathlib.Path(__file__).resolve().parents[2] / "bench")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

from comfy_models import (ARCHS, build_model, conditioning, empty_latent, flux_conditioning,  # noqa: E402,F401
                          load_flux, load_model, randomize_, sample, state_dict)


def sparsify(model, **overrides):
    """RT-Lynx Sparsify Model on `model` with the node's defaults (backend auto), `overrides` applied."""
    from rt_lynx_pack.nodes import RTLynxSparsifyModel
    options = dict(pattern="2:4", compensation=True, skip_first_blocks=0, skip_last_blocks=0, dense_warmup_steps=0,
                   default_dense_layers=True, include_layers="", exclude_layers="", backend="auto")
    options.update(overrides)
    return RTLynxSparsifyModel().patch(model, **options)[0]


def relative_error(a, b):
    """||a - b|| / ||b|| (Frobenius)."""
    return ((a - b).norm() / b.norm()).item()


def watch_each_step(patcher, probe):
    """A list that gets probe()'s value at every denoising step of `patcher`'s sampling runs (an
    APPLY_MODEL wrapper on that clone), to see the per-run state while it exists."""
    from comfy.patcher_extension import WrappersMP
    seen = []

    def wrapper(executor, *args, **kwargs):
        seen.append(probe())
        return executor(*args, **kwargs)
    patcher.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "rt_lynx_test_watch", wrapper)
    return seen


# A user's runs change the step count, the resolution and CFG.
COMPILED_RUNS = [dict(steps=2), dict(steps=3), dict(steps=2, size=(16, 24)), dict(steps=2, cfg=2.0)]


def graphs_after_each_run(model, arch: str = "flux", **sample_options):
    """Dynamo's count of distinct graphs after each of COMPILED_RUNS sampled through ComfyUI's
    torch.compile wrapper (aot_eager) on a clone of `model`."""
    import pytest
    import torch
    import comfy.ldm.flux.math as flux_math
    import comfy.ldm.modules.attention as comfy_attention
    import comfy.ldm.qwen_image.model as qwen_image
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from torch._dynamo.utils import counters
    compiled = model.clone()
    set_torch_compile_wrapper(compiled, backend="aot_eager")
    torch._dynamo.reset()
    counters.clear()
    counts = []
    with pytest.MonkeyPatch.context() as patch:
        # ComfyUI's CPU attention asks psutil for free memory, a graph break that splits the model
        # into frames whose inputs are guarded whatever the blocks do; GPUs run SDPA, one frame.
        patch.setattr(flux_math, "optimized_attention", comfy_attention.attention_pytorch)
        patch.setattr(qwen_image, "optimized_attention_masked", comfy_attention.attention_pytorch)
        for run in COMPILED_RUNS:
            sample(compiled, arch=arch, **sample_options, **run)
            counts.append(counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    return counts
