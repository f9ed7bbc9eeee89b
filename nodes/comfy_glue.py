"""How a LynxPlan is installed on a ComfyUI ModelPatcher, with ComfyUI's own mechanisms.

- Each patched linear gets its `forward` replaced through an object patch
  ("diffusion_model.<layer>.forward"): ComfyUI applies object patches when the clone is loaded
  and restores them when another clone of the model is, so the loaded model is never changed
  in place and two patched clones do not interfere. The module tree, its weights, lowvram
  casting and ComfyUI's own LoRA weight patches stay as they are; the new forward asks ComfyUI
  for the weight exactly as the original forward would.
- The plan rides along as a ModelPatcher attachment, so "Load Lynx LoRA" can find it.
- A Lynx LoRA's folded part is a low-rank weight patch on the clone (ModelPatcher.add_patches with
  ComfyUI's own LoRA adapter), applied and undone by ComfyUI like any LoRA; the Lynx forwards then
  receive the patched weight and take the branch back off where they compute dense.
- Dense warm-up steps need the step index: an APPLY_MODEL wrapper reads it off the schedule.
- FLUX and Qwen-Image blocks can compute their elementwise work fused (lynx/fused_blocks.py):
  installed as ComfyUI's own block-replace patches ("dit" double_block / single_block), which
  the models' forwards call in place of the block; a block another node already replaces is left
  alone.
- Per-run state is made before each sampling run (ON_PRE_RUN; ON_LOAD does not fire when a clone
  reuses weights already in place), again when hook LoRAs rewrite weights (ON_APPLY_HOOKS), and
  dropped when the model is detached (ON_DETACH): the Lynx LoRA factors on the compute device,
  and with fp8 precision each layer's quantised weight, made after ComfyUI has loaded and
  LoRA-patched it (an fp8 checkpoint's e4m3 weight is taken as stored once a check on three rows
  shows its scale is complete; layers offloaded by lowvram or patched per call, and layers whose
  copy finds no room, quantise per call). The quantised weights are dropped again when the run
  ends (ON_CLEANUP): the next run makes them anew anyway, and the VAE decode and the nodes after
  it get that VRAM back. Made in eager code, so a compiled model only reads them. A model compiled
  with CUDA graphs (reduce-overhead) keeps them, and each run writes them again where they are:
  its graphs read every weight at the address they were recorded with, and a weight that moves
  makes Inductor record the graph again (a capture per run; past 128, no graphs at all). The Lynx
  LoRA factors stay where they were put for the same reason.

ComfyUI is imported only inside functions: importing the pack must not need it.
"""
import contextlib
import inspect
import logging

import torch

from ..kernels import block_ops_availability, log_once
from ..lynx import LynxPlan, LynxRuntime, sampling_step_index
from ..lynx.patching import folded_weight_patches
from ..lynx.fused_blocks import (flux_double_block, flux_single_block, fusable_call, fused_block_kind, qwen_image_block,
                                 rope_table_forward)

log = logging.getLogger("rt_lynx")

ATTACHMENT_KEY = "rt_lynx"
WRAPPER_KEY = "rt_lynx_sampling_step"
CALLBACK_KEY = "rt_lynx_run_state"
LYNX_LORA_SUBFOLDER = "lynx"


_CAST_API = None


def _cast_api():
    """ComfyUI's weight-cast module, whether its cast takes `offloadable` (newer versions, which
    then return an offload stream that must be handed back through uncast_bias_weight), and the
    class of its quantized weights (later releases; None before). Looked up once, in eager code
    (install_plan), so torch.compile only ever reads the stored values."""
    global _CAST_API
    if _CAST_API is None:
        import importlib.util

        import comfy.ops
        quantized = None
        if importlib.util.find_spec("comfy.quant_ops") is not None:
            import comfy.quant_ops
            quantized = getattr(comfy.quant_ops, "QuantizedTensor", None)
        _CAST_API = (comfy.ops, "offloadable" in inspect.signature(comfy.ops.cast_bias_weight).parameters,
                     quantized)
    return _CAST_API


def comfy_per_op_check():
    """ComfyUI's check before each op of its layers (later releases: run_every_op, where Cancel takes
    effect; a no-op under torch.compile), or None where its layers run none."""
    return getattr(_cast_api()[0], "run_every_op", None)


def _is_quantized(weight) -> bool:
    quantized = _cast_api()[2]
    return quantized is not None and isinstance(weight, quantized)


def comfy_linear_weights(module, x):
    """The weight and bias a ComfyUI Linear would compute with for input x (lowvram casting,
    weight functions of LoRA patches, scaled fp8 weights, quantized weights as plain tensors of
    their logical dtype), plus the callback that finishes."""
    ops, offloadable, _ = _cast_api()
    release = None
    if _casts_per_call(module):
        if offloadable:
            weight, bias, stream = ops.cast_bias_weight(module, x, offloadable=True)
            release = lambda: ops.uncast_bias_weight(module, weight, bias, stream)  # noqa: E731
        else:
            weight, bias = ops.cast_bias_weight(module, x)
    else:
        weight, bias = module.weight, module.bias
    if _is_quantized(weight):
        weight = weight.dequantize()
    return _apply_weight_scale(module, weight, x.dtype), bias, release


def _stored_e4m3(module):
    """(e4m3 weight, its scale or None) as the layer stores them, or None: an e4m3 weight (ComfyUI's
    fp8 checkpoints; scale_weight where scaled), or a quantized weight of one e4m3 tensor and one
    scale (later releases' per-tensor fp8 layout, which their scaled fp8 checkpoints load into)."""
    weight = module.weight
    if _is_quantized(weight):
        plain_tensors = getattr(weight.layout_cls, "get_plain_tensors", None)
        if getattr(weight, "storage_dtype", None) != torch.float8_e4m3fn or plain_tensors is None:
            return None
        data, scale = plain_tensors(weight)
        if (not torch.is_tensor(data) or tuple(data.shape) != tuple(weight.shape)
                or (torch.is_tensor(scale) and scale.numel() != 1)):
            return None
        return data, scale
    if weight.dtype == torch.float8_e4m3fn:
        return weight, getattr(module, "scale_weight", None)
    return None


def _apply_weight_scale(module, weight, dtype):
    scale = getattr(module, "scale_weight", None)  # ComfyUI's scaled fp8 checkpoints
    if scale is None:
        return weight
    return weight.to(dtype) * scale.to(device=weight.device, dtype=dtype)


def _weight_in_place(module, device) -> bool:
    """Whether the stored weight is what the layer computes with, on `device`, for the whole run:
    loaded there (not offloaded by lowvram) and not patched per call (LoRA weight functions). ComfyUI
    may still cast it per call (an fp8 checkpoint computed in bf16); the fp8 product does not need that."""
    return (_same_device(module.weight.device, torch.device(device)) and len(module.weight_function) == 0
            and len(module.bias_function) == 0 and getattr(module, "weight_lowvram_function", None) is None
            and getattr(module, "bias_lowvram_function", None) is None)


def _same_device(a: torch.device, b: torch.device) -> bool:
    # "cuda" without an index (a load device made as torch.device("cuda")) is the current GPU, where
    # ComfyUI loads the weights; tensors always report their index.
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _casts_per_call(module) -> bool:
    """Whether ComfyUI casts or patches this layer's weight on every call (lowvram, LoRA weight
    functions), as its own Linear.forward decides."""
    return bool(module.comfy_cast_weights or len(module.weight_function) > 0 or len(module.bias_function) > 0)


def _run_state_callbacks(plan: LynxPlan) -> dict:
    """The callbacks that make and drop the per-run state, by ComfyUI call type."""
    from comfy.patcher_extension import CallbacksMP

    def drop_fp8_weights(*args, **kwargs):
        for forward in plan.installed_forwards.values():
            forward.release_fp8()
        if plan.modulation_batch is not None:
            plan.modulation_batch.release()

    def prepare_fp8_weights(patcher):
        compute_dtype = patcher.model.manual_cast_dtype or patcher.model.get_dtype()
        # Under CUDA graphs the copies of the previous run are written again where they are; otherwise
        # they are replaced, not added to.
        keep = replays_cuda_graphs(patcher)
        if not keep:
            drop_fp8_weights()
        prepared = set()
        # Later ComfyUI releases' dynamic VRAM keeps the weights where they were loaded and casts each
        # into GPU memory it manages per call (LoRA patches applied there): every layer then gets a
        # copy of what its cast gives, made once per run.
        dynamic = bool(getattr(patcher, "is_dynamic", lambda: False)())
        in_place = [f for f in plan.installed_forwards.values()
                    if dynamic or _weight_in_place(f.module, patcher.load_device)]
        if keep:   # the copy of a layer no longer in place goes before the room is measured
            for name in plan.installed_forwards.keys() - {f.name for f in in_place}:
                plan.installed_forwards[name].release_fp8()
        # Stored e4m3 weights whose scale is what ComfyUI applies are used as they are; every other
        # layer needs a copy, and the room is asked for all of those copies at once.
        copies = []
        for forward in in_place:
            module = forward.module
            stored = None if dynamic else _stored_e4m3(module)
            if stored is None:
                copies.append(forward)
                continue
            with _weight_as_computed(module, compute_dtype, patcher.load_device) as (computed, _):
                complete = _stored_scale_is_complete(stored[0], stored[1], computed)
            if complete:
                forward.prepare_fp8(*stored, keep_addresses=keep)
                prepared.add(forward.name)
            else:
                copies.append(forward)

        # Where every modulation linear gets a copy, the copies are one tensor's rows (one product per call).
        modulation = [f for f in copies if f.name in plan.per_image_forwards]
        batch = plan.modulation_batch
        batched = batch is not None and {f.name for f in modulation} == {f.name for f in batch.forwards}
        new_batch = batched and not batch.holds_tensor_on(patcher.load_device)

        def new_bytes(forward):   # a copy written again where it is takes no new room
            if keep and forward.holds_fp8_copy() and not (new_batch and forward.batch is batch):
                return 0
            return _fp8_copy_bytes(forward.module)
        room = _room_for_fp8_copies(patcher.load_device, sum(new_bytes(f) for f in copies))

        def make_copy(forward, keep_addresses=keep):
            module = forward.module
            stored = _stored_e4m3(module)
            prepared.add(forward.name)
            if not dynamic and stored is None and not _is_quantized(module.weight):
                forward.prepare_fp8(module.weight, getattr(module, "scale_weight", None), keep_addresses=keep_addresses)
                return
            # Stored fp8 with a scale kept elsewhere than where it is read, or a weight in another
            # quantized format: quantise what the layer computes with.
            if stored is not None and not dynamic:
                log_once(f"{forward.name}: the stored fp8 weight is not what ComfyUI computes with; requantising it")
            with _weight_as_computed(module, compute_dtype, patcher.load_device) as (computed, bias):
                forward.prepare_fp8(computed, bias=bias, keep_addresses=keep_addresses)
        # A layer without its copy quantises its weight on every call (the same numbers, slower); a
        # modulation linear computes as the original layer instead, so theirs come last and all or none.
        left_out = 0
        for forward in copies:
            if forward.name in plan.per_image_forwards:
                continue
            if new_bytes(forward) > room:
                left_out += 1
                continue
            room -= new_bytes(forward)
            make_copy(forward)
        if left_out:
            log.warning("RT-Lynx: no room in %s memory for the fp8 weights of %d layers; they quantise their "
                        "weight on every call (slower) this run", patcher.load_device, left_out)
        if sum(new_bytes(f) for f in modulation) <= room:
            if batched:
                batch.write(patcher.load_device, compute_dtype, lambda forward: make_copy(forward, keep_addresses=True))
            else:
                for forward in modulation:
                    make_copy(forward)
        elif modulation:
            log.warning("RT-Lynx: no room in %s memory for the e4m3 weights of the %d modulation linears; they "
                        "compute in the model's dtype this run", patcher.load_device, len(modulation))
        for forward in plan.installed_forwards.values():   # kept from a run where the layer had its copy
            if forward.name not in prepared:
                forward.release_fp8()
        if batch is not None and not (batched and batch.ready):
            batch.release()

    def on_pre_run(patcher, *args, **kwargs):
        _refuse_a_copy_of_the_model(patcher, plan)
        compute_dtype = patcher.model.manual_cast_dtype or patcher.model.get_dtype()
        for forward in plan.installed_forwards.values():
            forward.prepare_branches(patcher.load_device, compute_dtype)
        if plan.config.precision == "fp8":
            prepare_fp8_weights(patcher)

    def on_apply_hooks(patcher, *args, **kwargs):
        # Hook LoRAs (scheduled weight patches) rewrite the weights in place during sampling.
        if plan.config.precision == "fp8":
            prepare_fp8_weights(patcher)

    def on_detach(patcher, *args, **kwargs):
        drop_fp8_weights()
        for forward in plan.installed_forwards.values():
            forward.release_branches()

    def on_cleanup(patcher, *args, **kwargs):
        # The next run makes them again; under CUDA graphs it writes them where they are instead.
        if not replays_cuda_graphs(patcher):
            drop_fp8_weights()
    return {CallbacksMP.ON_PRE_RUN: on_pre_run, CallbacksMP.ON_APPLY_HOOKS: on_apply_hooks,
            CallbacksMP.ON_CLEANUP: on_cleanup, CallbacksMP.ON_DETACH: on_detach,
            CallbacksMP.ON_CLONE: _follow_a_copy}


def replays_cuda_graphs(patcher) -> bool:
    """Whether the model runs compiled by Inductor with CUDA graphs (reduce-overhead, max-autotune;
    the compile options ComfyUI's set_torch_compile_wrapper keeps in the model options). Its graphs
    hold the addresses of every weight they read and are recorded again when one moves."""
    kwargs = patcher.model_options.get("torch_compile_kwargs") or {}
    options = kwargs.get("options") or {}
    return (kwargs.get("backend") == "inductor"
            and (kwargs.get("mode") in ("reduce-overhead", "max-autotune") or bool(options.get("triton.cudagraphs"))))


def _refuse_a_copy_of_the_model(patcher, plan: LynxPlan) -> None:
    """A copy of the model that _follow_a_copy did not see (made other than by ModelPatcher.clone):
    the Lynx layers would compute with the original model's modules, not the copy's weights and
    device."""
    if _bound_elsewhere(plan, patcher.get_model_object("diffusion_model")):
        raise RuntimeError("RT-Lynx: ComfyUI is sampling a copy of the patched model made without a clone the "
                           "pack could follow, so the Lynx layers would compute with the original's modules. "
                           "Apply RT-Lynx Sparsify Model after the node that copies the model.")


def _fp8_copy_bytes(module) -> int:
    """The e4m3 weight and its per-channel fp32 scale that prepare_fp8 makes for this layer."""
    return module.weight.numel() + 4 * module.weight.shape[0]


def _room_for_fp8_copies(device, needed: int) -> float:
    """Bytes the fp8 weight copies may take on `device`. ComfyUI loaded the model without knowing
    of them, so it is asked, as it does before loading a model, to unload the models this run does
    not use until they fit beside its minimum inference memory; what is free beyond that is the room."""
    import comfy.model_management as mm
    reserve = mm.minimum_inference_memory()
    if needed > 0 and mm.get_free_memory(device) < needed + reserve:
        in_use = [m for m in mm.current_loaded_models if getattr(m, "currently_used", True)]
        mm.free_memory(needed + reserve, device, keep_loaded=in_use)
    return mm.get_free_memory(device) - reserve


@contextlib.contextmanager
def _weight_as_computed(module, dtype, device):
    """The weight and bias ComfyUI computes this layer with on `device` (its casts, scale and weight
    functions), given back to ComfyUI when the block ends."""
    computed, bias, release = comfy_linear_weights(module, _probe(module, dtype, device))
    try:
        yield computed, bias
    finally:
        if release is not None:
            release()


def _probe(module, dtype, device=None):
    # An input on the compute device: a cast to the CPU (dynamic VRAM's weights stay there) skips
    # the LoRA patches ComfyUI applies on the way to the GPU.
    return torch.zeros(1, module.in_features, dtype=dtype, device=module.weight.device if device is None else device)


def _stored_scale_is_complete(stored: torch.Tensor, scale, computed: torch.Tensor) -> bool:
    """Whether the stored e4m3 weight times `scale` (one value, one per channel, or None for 1) is
    `computed`, the weight ComfyUI's cast gives for the layer, checked on three rows."""
    out_features = stored.shape[0]
    if scale is not None and scale.numel() not in (1, out_features):
        return False
    rows = torch.tensor(sorted({0, out_features // 2, out_features - 1}), device=stored.device)
    factor = 1.0 if scale is None else scale.detach().float().to(stored.device).reshape(-1, 1)
    if torch.is_tensor(factor) and factor.numel() > 1:
        factor = factor[rows]
    expected = stored.detach()[rows].float() * factor
    got = computed.detach()[rows].float()
    tolerance = 1e-2 * expected.abs().amax().clamp_min(1e-30)
    return bool(((got - expected).abs() <= tolerance).all())


def _sampling_step_wrapper(runtime: LynxRuntime):
    """The per-call state of `runtime`, set in eager code around the model call (torch.compile's
    region is inside): whether this step is a dense warm-up step, whether the call carries a
    text attention mask (later ComfyUI releases' Qwen-Image applies it inside its blocks, which
    the fused forwards do not), and no modulation product yet (its blocks make one)."""
    def wrapper(executor, *args, **kwargs):
        # BaseModel.apply_model(x, t, c_concat, c_crossattn, control, transformer_options, ...)
        if runtime.dense_warmup_steps:
            sigma = args[1] if len(args) > 1 else kwargs["t"]
            options = args[5] if len(args) > 5 else kwargs.get("transformer_options", {})
            # sample_sigmas is the schedule of this sampling run: a second KSamplerAdvanced stage
            # counts its steps from 0 again and so runs its own first steps dense.
            step = sampling_step_index(options.get("sample_sigmas"), sigma)
            if step is None:
                log_once("the sampler gave no schedule; dense warm-up steps are ignored")
            runtime.set_step(step)
        runtime.blocks_as_they_are = kwargs.get("attention_mask") is not None
        runtime.modulation_product = None
        try:
            return executor(*args, **kwargs)
        finally:
            runtime.set_step(None)
            runtime.blocks_as_they_are = False
            runtime.modulation_product = None
    return wrapper


def install_plan(model, plan: LynxPlan):
    """A clone of the ModelPatcher `model` that computes with `plan`."""
    from comfy.patcher_extension import WrappersMP

    _cast_api()
    patched = model.clone()
    _add_folded_weight_patches(patched, plan)
    _install_layers(patched, plan)
    patched.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY)
    patched.add_wrapper_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY, _sampling_step_wrapper(plan.runtime))
    return patched


def _install_layers(patched, plan: LynxPlan) -> None:
    """The plan's forwards as object patches of `patched`, the plan as its attachment, and the
    run-state callbacks made for this plan."""
    for name, forward in plan.installed_forwards.items():
        patched.add_object_patch(f"diffusion_model.{name}.forward", forward.bound_to(forward.module))
    patched.set_attachments(ATTACHMENT_KEY, plan)
    callbacks = _run_state_callbacks(plan)
    for call_type in callbacks:
        patched.remove_callbacks_with_key(call_type, CALLBACK_KEY)
    for call_type, callback in callbacks.items():
        patched.add_callback_with_key(call_type, CALLBACK_KEY, callback)


def _follow_a_copy(original, copy) -> None:
    """ON_CLONE: a clone on a new copy of the model (later ComfyUI releases: TorchCompileModel and
    hooked conditioning under dynamic VRAM, multi-GPU work units) gets the plan's forwards and
    fused blocks bound to the copy's own modules; the object patches it carried over held the
    original's."""
    plan = installed_plan(copy)
    if plan is None or copy.model is original.model:
        return
    diffusion_model = copy.get_model_object("diffusion_model")
    _install_layers(copy, plan.rebound(diffusion_model))
    replaced = copy.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    for (patch_name, index), patch in list(replaced.items()):
        where = getattr(patch, "rt_lynx_block", None)
        if where is not None:
            kind, list_name, block_index = where
            block = getattr(diffusion_model, list_name)[block_index]
            copy.set_model_patch_replace(_fused_block_patch(kind, block, plan.runtime, list_name, block_index), "dit",
                                         patch_name, index)


def _bound_elsewhere(plan: LynxPlan, diffusion_model) -> bool:
    for name, forward in plan.installed_forwards.items():
        return diffusion_model.get_submodule(name) is not forward.module   # one layer tells: a copy replaces all
    return False


def _add_folded_weight_patches(patched, plan: LynxPlan) -> None:
    folds = folded_weight_patches(plan)
    if not folds:
        return
    try:
        from comfy.weight_adapter import LoRAAdapter
    except ImportError as error:
        raise RuntimeError(f"a Lynx LoRA with a folded part needs ComfyUI's weight adapters (comfy.weight_adapter): "
                           f"{error}; update ComfyUI or calibrate with folded_rank 0") from error
    diffusion_model = patched.get_model_object("diffusion_model")
    keys = {name: f"diffusion_model.{name}.weight" for name in folds}
    # alpha None: ComfyUI scales up @ down by the patch strength alone (1 here), so the branch's own
    # scale (alpha / rank * strength) goes into up.
    patches = {keys[name]: LoRAAdapter({keys[name]}, (branch.up.float() * branch.scale, branch.down,
                                                      None, None, None, None))
               for name, branch in folds.items()}
    added = patched.add_patches(patches, strength_patch=1.0)
    missing = sorted(set(keys.values()) - set(added))
    if missing:
        raise RuntimeError(f"ComfyUI took no weight patch for {len(missing)} layers: {', '.join(missing[:4])}")
    stored_fp8 = [name for name in folds if _stored_e4m3(diffusion_model.get_submodule(name)) is not None
                  or _is_quantized(diffusion_model.get_submodule(name).weight)
                  or diffusion_model.get_submodule(name).weight.dtype == torch.float8_e5m2]
    if stored_fp8:
        log.warning("RT-Lynx: %d layers with a folded Lynx LoRA part store their weights in fp8 or another "
                    "quantized format: ComfyUI rounds the patched weights to it, which blurs that part (the "
                    "runtime branch stays exact)",
                    len(stored_fp8))


# Per model class (the forward that calls the blocks): its block lists and the names it looks up
# in the "dit" block-replace patches. Other models reusing these block classes (HunyuanVideo uses
# FLUX's, with attention masks and per-frame modulation) keep their blocks.
_BLOCK_LISTS = {
    ("comfy.ldm.flux.model", "Flux"): (("double_blocks", "double_block"), ("single_blocks", "single_block")),
    ("comfy.ldm.qwen_image.model", "QwenImageTransformer2DModel"): (("transformer_blocks", "double_block"),),
}


def install_fused_blocks(patched, diffusion_model, runtime: LynxRuntime | None = None,
                         batched_modulation: bool = False) -> str:
    """Route each FLUX / Qwen-Image block of `diffusion_model` through its fused forward, on the
    ModelPatcher `patched` (a clone: the patches live in its model_options). During the dense
    warm-up steps of `runtime` the blocks run their own forward, so those steps are the original
    model's exactly. Returns a phrase for the summary line, "" when the model has no such blocks;
    `batched_modulation`: the plan has a modulation batch, which the fused blocks read."""
    block_lists = _BLOCK_LISTS.get((type(diffusion_model).__module__, type(diffusion_model).__name__), ())
    taken = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    fused, kept = 0, {}
    for list_name, patch_name in block_lists:
        for index, block in enumerate(getattr(diffusion_model, list_name, None) or []):
            kind, why_not = fused_block_kind(block)
            if kind is not None and (patch_name, index) in taken:
                why_not = "replaced by another node"
            if why_not:
                kept[why_not] = kept.get(why_not, 0) + 1
                continue
            patched.set_model_patch_replace(_fused_block_patch(kind, block, runtime, list_name, index), "dit",
                                            patch_name, index)
            fused += 1
    parts = []
    if fused or kept:
        available, why_not = block_ops_availability(patched.load_device)
        where = "" if available else f" (reference path: {why_not})"
        parts.append(f"{fused} blocks with fused q/k norm + RoPE{where}"
                     + (" (with e4m3 copies of the modulation weights: one modulation product per call)"
                        if fused and batched_modulation else "")
                     + "".join(f", {count} kept as they are ({why})" for why, count in kept.items()))
    rope_tables = install_rope_tables(patched, diffusion_model)
    return ", ".join(parts + ([rope_tables] if rope_tables else []))


def install_rope_tables(patched, diffusion_model) -> str:
    """Compute each of ComfyUI's EmbedND modules in `diffusion_model` (the RoPE table of FLUX,
    Qwen-Image, Lumina 2 / Z-Image, and of other models built on it) through the rope_table op, bit
    for bit its own output, on the clone `patched`; a phrase for the summary line, "" when there is
    none. An embedder another node patches keeps that patch; on devices where ComfyUI computes the
    table on the CPU (MPS, XPU, DirectML) the modules keep their forward."""
    if torch.device(patched.load_device).type not in ("cuda", "cpu"):
        return ""
    installed, kept = 0, []
    for name, module in diffusion_model.named_modules():
        if (type(module).__module__, type(module).__name__) != ("comfy.ldm.flux.layers", "EmbedND"):
            continue
        path = f"diffusion_model.{name}"
        # Another node's object patch of the module, its forward or attributes, or of a module above it.
        patched_by_another = any(key == path or key.startswith(path + ".") or path.startswith(key + ".")
                                 for key in patched.object_patches)
        key = f"{path}.forward"
        forward, why_not = (None, "patched by another node") if patched_by_another else rope_table_forward(module)
        if forward is None:
            kept.append(why_not)
            continue
        patched.add_object_patch(key, forward)
        installed += 1
    if not installed and not kept:
        return ""
    return "RoPE table in one op" if not kept else f"RoPE table kept as it is ({kept[0]})"


def _comfy_attention(kind: str):
    """ComfyUI's attention as each model calls it, looked up per call as the models do (ComfyUI
    picks the implementation at start-up): q, k, v (batch, heads, tokens, head_dim) for FLUX,
    (batch, tokens, heads * head_dim) for Qwen-Image."""
    if kind == "qwen_image":
        import comfy.ldm.qwen_image.model as qwen_image

        def attention(q, k, v, heads, mask, transformer_options):
            return qwen_image.optimized_attention_masked(q, k, v, heads, mask, transformer_options=transformer_options)
    else:
        import comfy.ldm.flux.math as flux_math

        def attention(q, k, v, heads, mask, transformer_options):
            return flux_math.optimized_attention(q, k, v, heads, skip_reshape=True, mask=mask,
                                                 transformer_options=transformer_options)
    return attention


def _patches_attention(transformer_options) -> bool:
    # Later ComfyUI releases run these patches inside the FLUX and Qwen-Image blocks (earlier ones
    # skip them there, so the block's own forward is right either way).
    if transformer_options is None:   # not `or {}`: a dict's truth test makes Dynamo guard on its values
        return False
    patches = transformer_options.get("patches", {})
    return "attn1_patch" in patches or "attn1_output_patch" in patches


def _fused_block_patch(kind: str, block, runtime: LynxRuntime | None, list_name: str, index: int):
    # A plain function: ComfyUI deep-copies model_options when it clones, and copies functions by
    # reference (an object holding the block would have the block deep-copied).
    attention = _comfy_attention(kind)

    def runs_original(args) -> bool:
        # Arguments the fused forwards do not take (a newer caller's attention mask or per-token
        # modulation: a vec with a row per token group, or modulation for the whole model), patches
        # of the attention they would skip, and inputs the model's call sets outside these
        # arguments (a text mask: the sampler-side wrapper sees it) send the call to the block's
        # own forward.
        unknown = set(args) - {"img", "txt", "vec", "pe", "attn_mask", "transformer_options"}
        vec, img = args.get("vec"), args["img"]
        tokens = img.shape[1] + (args["txt"].shape[1] if kind != "single" else 0)
        return ((runtime is not None and (runtime.dense or runtime.blocks_as_they_are)) or bool(unknown)
                or not isinstance(vec, torch.Tensor) or vec.dim() != 2 or vec.shape[0] != img.shape[0]
                or _patches_attention(args.get("transformer_options"))
                or not fusable_call(block, args["pe"], img, tokens))

    def patch(args, extra):
        if runs_original(args):
            return extra["original_block"](args)
        options = args.get("transformer_options")
        if options is None:   # not `or {}`: its truth test makes Dynamo guard on every value (sample_sigmas' length)
            options = {}
        if kind == "double":
            img, txt = flux_double_block(block, args["img"], args["txt"], args["vec"], args["pe"], args.get("attn_mask"),
                                         options, attention)
            return {"img": img, "txt": txt}
        if kind == "single":
            return {"img": flux_single_block(block, args["img"], args["vec"], args["pe"], args.get("attn_mask"),
                                             options, attention)}
        txt, img = qwen_image_block(block, args["img"], args["txt"], args["vec"], args["pe"], options, attention)
        return {"img": img, "txt": txt}
    patch.rt_lynx_block = (kind, list_name, index)   # where the block sits, for a copy of the model
    return patch


def installed_plan(model) -> LynxPlan | None:
    return model.get_attachment(ATTACHMENT_KEY)


def lynx_lora_names() -> list[str]:
    """LoRA files ComfyUI knows, those in loras/lynx first (where the calibration writes)."""
    import folder_paths
    names = folder_paths.get_filename_list("loras")
    prefix = LYNX_LORA_SUBFOLDER + "/"
    return sorted(names, key=lambda n: (not n.replace("\\", "/").startswith(prefix), n))


def lynx_lora_folder() -> str:
    """models/loras/lynx, registered as folder type "lynx_loras" (model file extensions only)."""
    import os

    import folder_paths
    path = os.path.join(folder_paths.get_folder_paths("loras")[0], LYNX_LORA_SUBFOLDER)
    if "lynx_loras" in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path("lynx_loras", path)  # idempotent
    else:
        folder_paths.folder_names_and_paths["lynx_loras"] = ([path], folder_paths.supported_pt_extensions)
    return path
