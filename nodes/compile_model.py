"""The "RT-Lynx Compile Model" node: torch.compile through ComfyUI's own compile wrapper, with the
mode the Lynx kernels were measured under (ComfyUI 0.3.6x's TorchCompileModel offers no mode)."""

# Inductor modes that keep the Lynx ops as they are (torch.library custom ops: captured, not traced into).
COMPILE_MODES = {
    "default": None,
    "reduce-overhead": "reduce-overhead",
    "max-autotune-no-cudagraphs": "max-autotune-no-cudagraphs",
}


def compile_wrapper_api():
    """ComfyUI's `set_torch_compile_wrapper`, or a RuntimeError saying which ComfyUI lacks it."""
    try:
        from comfy_api.torch_helpers import set_torch_compile_wrapper
    except ImportError as error:
        raise RuntimeError("RT-Lynx Compile Model needs comfy_api.torch_helpers.set_torch_compile_wrapper, "
                           "which this ComfyUI does not have; update ComfyUI") from error
    return set_torch_compile_wrapper


class RTLynxCompileModel:
    CATEGORY = "RT-Lynx"
    FUNCTION = "compile"
    RETURN_TYPES = ("MODEL",)
    DESCRIPTION = ("Compiles the diffusion model with torch.compile (Inductor) when sampling starts, through ComfyUI's "
                   "own compile wrapper; place it before or after RT-Lynx Sparsify Model. The first step compiles "
                   "(a minute or more for a full-size model; again for a new resolution or batch).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "mode": (list(COMPILE_MODES), {"default": "reduce-overhead", "tooltip":
                     "reduce-overhead: Inductor replays each step as CUDA graphs, which removes the launch gaps "
                     "between the many short kernels of a Lynx step (FLUX.1-dev 1024² fp8 on an H100: 1.64-1.66x a "
                     "step over the compiled dense model, against 1.58x in default mode). It keeps a memory pool per "
                     "resolution and needs the model's weights resident in VRAM (an fp8 Lynx model keeps its e4m3 "
                     "weight copies between runs, where the graphs read them); choose default when ComfyUI "
                     "offloads weights (low VRAM)."}),
        }}

    def compile(self, model, mode):
        set_torch_compile_wrapper = compile_wrapper_api()
        if mode not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {mode!r}; one of {', '.join(COMPILE_MODES)}")
        compiled = model.clone()
        set_torch_compile_wrapper(model=compiled, backend="inductor", mode=COMPILE_MODES[mode])
        return (compiled,)
