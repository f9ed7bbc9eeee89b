"""The "RT-Lynx Sparsify Model" node."""
import logging

from ..kernels import PRECISIONS, REQUESTS, fast_path_availability, fp8_dense_availability
from ..lynx import LynxConfig, LynxRuntime, SelectionOptions, plan_model
from .comfy_glue import comfy_linear_weights, comfy_per_op_check, install_fused_blocks, install_plan, installed_plan

log = logging.getLogger("rt_lynx")

PATTERNS = ["2:4"]


class RTLynxSparsifyModel:
    CATEGORY = "RT-Lynx"
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL",)
    DESCRIPTION = ("Sparsifies the inputs of the transformer's linear layers online to 2:4 and runs them on "
                   "sparse tensor cores (FLUX.1, Qwen-Image, Z-Image). Bypass the node for the dense model.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "pattern": (PATTERNS, {"default": "2:4", "tooltip": "Keep n of every m consecutive input features."}),
            "compensation": ("BOOLEAN", {"default": True, "tooltip":
                             "Rescale each token's kept activations to its dense L2 norm."}),
            "skip_first_blocks": ("INT", {"default": 0, "min": 0, "max": 200,
                                  "tooltip": "Keep the first k transformer blocks dense."}),
            "skip_last_blocks": ("INT", {"default": 0, "min": 0, "max": 200,
                                 "tooltip": "Keep the last k transformer blocks dense."}),
            "dense_warmup_steps": ("INT", {"default": 0, "min": 0, "max": 1000,
                                   "tooltip": "Run the first s sampling steps dense, then sparse."}),
            "default_dense_layers": ("BOOLEAN", {"default": True, "tooltip":
                                     "Keep the layers each architecture keeps dense for quality "
                                     "(FLUX single-block linear2; Z-Image attention out and MLP up)."}),
            "include_layers": ("STRING", {"default": "", "tooltip":
                               "Regex on layer names; only matching layers are sparsified. Empty: all."}),
            "exclude_layers": ("STRING", {"default": "", "tooltip":
                               "Regex on layer names; matching layers stay dense. Empty: none."}),
            "backend": (list(REQUESTS), {"default": "auto", "tooltip":
                        "auto: sparse tensor cores when available, else the PyTorch reference path. "
                        "cuda: fail unless the fast kernels run here. reference: always PyTorch."}),
            "precision": (list(PRECISIONS), {"default": "bf16", "tooltip":
                          "bf16: the product in the model's 16-bit dtype. fp8: activations (per token) and "
                          "weights (per channel, quantised once per sampling run) in e4m3; faster, less exact, and an "
                          "fp8 copy of the sparsified weights in VRAM while sampling."}),
            "fp8_dense_layers": ("BOOLEAN", {"default": True, "tooltip":
                                 "With precision fp8: the layers kept dense (not sparsified) compute in fp8 too, "
                                 "on dense e4m3 tensor cores with the same per-token / per-channel scales (and an "
                                 "fp8 copy of their weights), and the blocks' modulation linears read an e4m3 copy "
                                 "of their weight. Off: they stay in the model's dtype. Ignored for bf16."}),
            "fused_blocks": ("BOOLEAN", {"default": True, "tooltip":
                             "FLUX, Qwen-Image: compute each block's q/k norm, RoPE and gated residuals in fused "
                             "kernels, and the LayerNorm + modulation and GELU before a sparsified linear inside its "
                             "sparsify pass, and FLUX's linear2 input in one pass (same math, fewer passes; helps with "
                             "and without torch.compile). Dense warm-up steps keep the original blocks. FLUX, "
                             "Qwen-Image and Z-Image: the RoPE table in one op, the same bits, which torch.compile "
                             "leaves whole (its fused version takes 1.3 ms of a FLUX step)."}),
        }}

    def patch(self, model, pattern, compensation, skip_first_blocks, skip_last_blocks, dense_warmup_steps,
              default_dense_layers, include_layers, exclude_layers, backend, precision="bf16",
              fp8_dense_layers=True, fused_blocks=True):
        if installed_plan(model) is not None:
            raise ValueError("this model is already patched by RT-Lynx Sparsify Model; use one per model")
        n, m = (int(v) for v in pattern.split(":"))
        config = LynxConfig(n=n, m=m, compensate=compensation, backend=backend, precision=precision,
                            fp8_dense_layers=fp8_dense_layers)
        selection = SelectionOptions(skip_first_blocks=skip_first_blocks, skip_last_blocks=skip_last_blocks,
                                     include=include_layers, exclude=exclude_layers,
                                     use_default_dense_layers=default_dense_layers, m=m)
        if backend == "cuda":
            available, why_not = fast_path_availability(model.load_device, precision)
            if available and config.quantizes_dense_layers:
                available, why_not = fp8_dense_availability(model.load_device)
            if not available:
                raise RuntimeError(f"RT-Lynx backend 'cuda' cannot run here: {why_not}. "
                                   f"Choose 'auto' to fall back to the PyTorch reference path.")
        diffusion_model = model.get_model_object("diffusion_model")
        runtime = LynxRuntime(dense_warmup_steps=dense_warmup_steps, before_each_call=comfy_per_op_check())
        plan = plan_model(diffusion_model, config, selection, runtime, weights=comfy_linear_weights)
        patched = install_plan(model, plan)
        if fused_blocks:
            plan.block_note = install_fused_blocks(patched, diffusion_model, plan.runtime,
                                                   plan.modulation_batch is not None)
        summary = plan.summary(model.load_device)
        log.info(summary)
        print(summary)
        return (patched,)
