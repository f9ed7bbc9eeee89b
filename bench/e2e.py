"""End-to-end benchmark inside ComfyUI: FLUX.1-dev and Qwen-Image at full size (random bf16 weights
built on the GPU), dense vs RT-Lynx, eager and under ComfyUI's torch.compile wrapper; `--models
z_image`: Z-Image's sizes on ComfyUI's NextDiT (bench/comfy_models.py says what differs on a
ComfyUI without Z-Image's detection).

Measures, per model/resolution/mode and for both sides in the same process:
- time per denoising step: median of several synchronised diffusion-model forwards through
  ComfyUI's BaseModel.apply_model (its wrappers included, so the compile wrapper applies);
- peak GPU memory around those forwards (torch.cuda.max_memory_allocated);
- for FLUX at 1024 only: a whole sample (KSampler's comfy.sample call, euler, --steps steps, after
  an untimed 2-step one), its peak and the memory allocated before and after it;
- with --profile: where each side's GPU time per step goes (torch.profiler over a few more calls:
  kernel time by kind, sparse and dense GEMM, attention, the pack's own passes, Inductor's fused
  kernels, other), and how much of the step the GPU is busy at all;
- with --lynx-switches: the Lynx step again with each kernel switch turned from its default
  (torch's exact GELU, programmatic launch, the packed GELU of e4m3 passes), in turns with the
  defaults on the same compiled model, so a change of a millisecond is not lost in the drift
  between runs;
- with --calibrate: the "RT-Lynx Calibrate LoRA" node with its defaults on the full-size model
  (wall time, peak memory), then the step time with the calibrated Lynx LoRA attached, next to
  dense and Lynx without the LoRA (the three in turns); with --lora-rank R the same for a LoRA of
  runtime rank R with random factors loaded by "Load Lynx LoRA" (its cost, not its quality); with
  --profile also the kernel time per step of the sparsified linears with and without it.

Usage (GPU): COMFYUI_PATH=.comfyui python bench/e2e.py [--models flux,qwen_image,z_image] [--resolutions 1024,768,1536]
             [--no-compile | --modes compile] [--steps 28] [--out bench/results]
CPU check of the logic: COMFYUI_PATH=... python bench/e2e.py --tiny
The results (e2e-<start time>-<gpu>-<models>.md and .json) are written again after every row, so a
run stopped early keeps what it measured (marked partial).
"""
import argparse
import contextlib
import datetime
import json
import os
import pathlib
import platform
import re
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import git_commit  # noqa: E402
# Text tokens per prompt: FLUX's T5 context is padded to 512 in ComfyUI; a long Qwen-Image prompt.
CONTEXT_TOKENS = {"flux": 512, "qwen_image": 256, "z_image": 256}
# Qwen-Image runs with CFG: cond and uncond in one batch; Z-Image (Turbo) samples at CFG 1.
BATCH = {"flux": 1, "qwen_image": 2, "z_image": 1}
SAMPLE_RESOLUTION = ("flux", 1024)    # whole-sample timing only here, to bound the run time
# sm90's process-wide switches (read at each launch) as --lynx-switches names them: (switch, setting
# other than its default).
KERNEL_SWITCHES = {"exact_gelu": ("fast_gelu", False), "programmatic_launch": ("programmatic_launch", True),
                   "packed_e4m3_gelu": ("packed_e4m3_gelu", True)}


def kernel_switch(name: str):
    """The context in which KERNEL_SWITCHES[name] is turned from its default."""
    from rt_lynx_pack.kernels import sm90
    switch, setting = KERNEL_SWITCHES[name]
    return getattr(sm90, switch)(setting)


def log(*parts):
    print(*parts, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="flux,qwen_image")
    p.add_argument("--resolutions", default="1024,768,1536", help="FLUX resolutions (Qwen-Image: 1024 only)")
    p.add_argument("--compile-resolutions", default="1024", help="resolutions also measured under torch.compile")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--modes", default="eager,compile",
                   help="eager and/or compile (compile only: the compiled rows without the eager rounds, to save time)")
    p.add_argument("--compile-backend", default=None, help="inductor (default; aot_eager with --tiny)")
    p.add_argument("--compile-mode", default=None, choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                   help="torch.compile's mode for both sides, as ComfyUI's set_torch_compile_wrapper takes it "
                        "(reduce-overhead: Inductor replays CUDA graphs); none: torch's default")
    p.add_argument("--steps", type=int, default=28, help="steps of the whole-sample timing (0: skip it)")
    p.add_argument("--sample-modes", default="eager,compile", help="modes that also time a whole sample")
    p.add_argument("--iters", type=int, default=7, help="timed forwards per measurement")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="eager: rounds in which dense and Lynx take turns")
    p.add_argument("--compile-rounds", type=int, default=1,
                   help="compiled: rounds in which dense and Lynx take turns, each turn compiling its side again "
                        "(about a minute a turn for FLUX 1024²); 2 or more when the two sides' GPU state may differ")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp8"], help="RT-Lynx Sparsify Model precision")
    p.add_argument("--weights", default="bf16", choices=["bf16", "fp8_e4m3fn"],
                   help="stored weight dtype (UNETLoader's weight_dtype); fp8 weights compute in bf16 (ComfyUI casts)")
    p.add_argument("--no-fp8-dense-layers", action="store_true",
                   help="with --precision fp8: the layers kept dense stay in bf16 (the node's fp8_dense_layers off)")
    p.add_argument("--no-default-dense-layers", action="store_true",
                   help="sparsify the layers the architecture keeps dense for quality too (FLUX: linear2; the "
                        "node's default_dense_layers off)")
    p.add_argument("--exact-gelu", action="store_true",
                   help="the kernels' GELU as torch computes it, bit for bit (sm90.fast_gelu(False)), not the fast "
                        "x / (1 + exp(-2u)) on the hardware exp2")
    p.add_argument("--programmatic-launch", action="store_true",
                   help="launch the sparse GEMM, the sparsify passes and the pack's other kernels with programmatic "
                        "dependent launch (sm90.programmatic_launch)")
    p.add_argument("--packed-e4m3-gelu", action="store_true",
                   help="the GELU of the passes whose output is e4m3 in packed 16-bit math with the hardware's "
                        "packed tanh (sm90.packed_e4m3_gelu)")
    p.add_argument("--unfused-residual", action="store_true",
                   help="the blocks' gated residuals added by torch after the GEMM (sparse, or the dense e4m3 "
                        "linear2), not in its epilogue (dispatch.residual_epilogue(False); read when the model compiles)")
    p.add_argument("--lynx-switches", default="",
                   help=f"comma list of kernel switches ({', '.join(KERNEL_SWITCHES)}): each also times the Lynx "
                        "side with that switch turned from its default, in turns with the defaults on the same "
                        "(compiled) model")
    p.add_argument("--dense-rope-op", action="store_true",
                   help="the dense side computes its RoPE table through the pack's op too (as the Lynx side does), "
                        "so a compiled speed-up leaves out what that op saves")
    p.add_argument("--attribution", action="store_true",
                   help="eager also: dense with fused blocks only, and Lynx without fused blocks (where the speed-up comes from)")
    p.add_argument("--profile", action="store_true",
                   help="also each side's kernel time per step by kind (torch.profiler over --profile-iters calls)")
    p.add_argument("--profile-iters", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="1 double + 1 single block (Qwen: 1 block), small latent")
    p.add_argument("--calibrate", action="store_true",
                   help="only the calibration node's cost and the step with its LoRA (first resolution, eager)")
    p.add_argument("--calibrate-folded-rank", type=int, default=None,
                   help="with --calibrate: the node's folded_rank instead of its default (a folded part first)")
    p.add_argument("--lora-rank", type=int, default=None,
                   help="only the step with a Lynx LoRA of this runtime rank, random factors (its cost, not its "
                        "quality), loaded by Load Lynx LoRA, next to dense and Lynx (first resolution, eager)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    if args.calibrate and args.lora_rank is not None:
        p.error("--calibrate and --lora-rank each make the LoRA: choose one")
    if args.lora_rank is not None and args.lora_rank < 1:
        p.error("--lora-rank: at least 1")
    args.models = [m for m in args.models.split(",") if m]
    args.sample_modes = [m for m in args.sample_modes.split(",") if m]
    args.modes = [m for m in args.modes.split(",") if m]
    args.lynx_switches = [m for m in args.lynx_switches.split(",") if m]
    if set(args.lynx_switches) - set(KERNEL_SWITCHES):
        p.error(f"--lynx-switches takes {', '.join(KERNEL_SWITCHES)}, not {','.join(args.lynx_switches)}")
    if not args.modes or set(args.modes) - {"eager", "compile"}:
        p.error(f"--modes takes eager and/or compile, not {','.join(args.modes) or 'nothing'}")
    if args.rounds < 1 or args.compile_rounds < 1:
        p.error("--rounds and --compile-rounds take 1 or more")
    if args.lynx_switches and args.compile_mode == "reduce-overhead" and "compile" in args.modes:
        # A replayed CUDA graph keeps the launches it recorded: a switch turned later changes nothing.
        p.error("--lynx-switches cannot time switches under --compile-mode reduce-overhead (the CUDA graphs keep "
                "the kernels recorded with the defaults); use the switch's own flag (--packed-e4m3-gelu, ...) "
                "for a run of its own")
    args.resolutions = [int(r) for r in args.resolutions.split(",") if r]
    args.compile_resolutions = [int(r) for r in args.compile_resolutions.split(",") if r]
    if args.tiny:
        args.resolutions = args.compile_resolutions = [128]
        args.steps = min(args.steps, 2)
        args.iters, args.warmup = min(args.iters, 3), 1
    args.compile_backend = args.compile_backend or ("aot_eager" if args.tiny else "inductor")
    return args


def import_comfyui(tiny: bool):
    import torch
    path = os.environ.get("COMFYUI_PATH")
    if not path or not os.path.isfile(os.path.join(path, "comfy", "model_patcher.py")):
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout (bench/pack_comfyui.sh makes .comfyui/)")
    sys.path.insert(0, os.path.abspath(path))
    # Appended, not prepended: the pack's nodes/ must not shadow ComfyUI's nodes.py.
    sys.path.append(str(ROOT / "bench"))
    from comfy.cli_args import args as comfy_args
    if not torch.cuda.is_available():
        comfy_args.cpu = True
    elif not tiny:
        # Weights are built on the GPU and must stay there: no offload, no partial (lowvram) load.
        comfy_args.highvram = True
    import comfy.model_management  # noqa: F401  (reads the args above)
    import comfy.utils
    stand_in_for_missing_pyav()
    comfy.utils.PROGRESS_BAR_ENABLED = False
    import importlib.util
    spec = importlib.util.spec_from_file_location("rt_lynx_standalone", ROOT / "standalone.py")
    standalone = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(standalone)
    standalone.load_pack()


def stand_in_for_missing_pyav():
    """ComfyUI's nodes.py (which the Calibrate node samples through) imports comfy_api, whose video
    types import PyAV at module level. The GPU machine has no PyAV and this benchmark reads or writes
    no video, so where it is missing, empty modules take its names (any attribute is a placeholder
    class); a real install is left as it is."""
    import importlib.abc
    import importlib.machinery
    import importlib.util
    import types
    if importlib.util.find_spec("av") is not None:
        return

    class Placeholder:
        pass

    class EmptyModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path=None, target=None):
            if name == "av" or name.startswith("av."):
                return importlib.machinery.ModuleSpec(name, self, is_package=True)
            return None

        def create_module(self, spec):
            module = types.ModuleType(spec.name)
            module.__path__ = []
            def placeholder(attribute):
                if attribute.startswith("__"):   # module dunders (__file__, __all__, ...) stay missing
                    raise AttributeError(attribute)
                return Placeholder
            module.__getattr__ = placeholder
            return module

        def exec_module(self, module):
            pass
    sys.meta_path.append(EmptyModules())
    log("no PyAV here: empty modules stand in for it (ComfyUI's video types; nothing here uses them)")


class Device:
    def __init__(self, torch):
        self.torch = torch
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.name = torch.cuda.get_device_name() if self.cuda else platform.processor() or "cpu"

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_peak(self):
        if self.cuda:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()

    def peak_gb(self):
        return self.torch.cuda.max_memory_allocated() / 2**30 if self.cuda else float("nan")

    def allocated_gb(self):
        return self.torch.cuda.memory_allocated() / 2**30 if self.cuda else float("nan")


def step_inputs(arch, resolution, dev, dtype):
    """One denoiser call's arguments, as ComfyUI's sampler passes them to BaseModel.apply_model."""
    import torch
    from comfy_models import conditioning, empty_latent
    batch, latent = BATCH[arch], resolution // 8
    shape = empty_latent(arch, batch, latent, latent, device="meta").shape
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dev.device)  # same input on both sides
    ctx, extra = conditioning(arch, CONTEXT_TOKENS[arch] if resolution > 128 else 40, batch=batch,
                              device=dev.device, dtype=dtype)[0]
    kwargs = {}
    if arch == "flux":
        kwargs = {"y": extra["pooled_output"], "guidance": torch.full((batch,), 3.5, device=dev.device)}
    elif arch == "z_image":
        kwargs = {"num_tokens": ctx.shape[1]}   # what Lumina2.extra_conds makes of a full attention mask
    sigma = torch.full((batch,), 0.6, device=dev.device)
    return x, sigma, ctx, kwargs


def time_steps(patcher, arch, resolution, dev, dtype, args, profile=True):
    """(median ms, all ms, first-call s, peak GB over the warm-up calls, peak GB over the timed
    calls, output, profile_steps' result or None) of apply_model forwards."""
    import comfy.model_management
    import torch
    comfy.model_management.load_models_gpu([patcher])  # applies this clone's object patches
    x, sigma, ctx, kwargs = step_inputs(arch, resolution, dev, dtype)
    # What the sampler hands apply_model: the model's transformer_options (block-replace patches
    # among them) and the patcher's wrappers (the compile wrapper).
    options = {**patcher.model_options.get("transformer_options", {}), "wrappers": patcher.wrappers}
    model = patcher.model

    def forward():
        return model.apply_model(x, sigma, c_crossattn=ctx, transformer_options=options, **kwargs)

    dev.reset_peak()
    with torch.inference_mode(), run_state(patcher):
        start = time.perf_counter()
        out = forward()
        dev.sync()
        first = time.perf_counter() - start
        for _ in range(args.warmup - 1):
            forward()
        first_peak = dev.peak_gb()  # one-time work (kernel config search, compilation) included
        dev.reset_peak()
        times = []
        for _ in range(args.iters):
            dev.sync()
            start = time.perf_counter()
            forward()
            dev.sync()
            times.append((time.perf_counter() - start) * 1000)
        peak = dev.peak_gb()
        profiled = profile_steps(forward, dev, args.profile_iters) if args.profile and profile and dev.cuda else None
    assert torch.isfinite(out).all(), "non-finite denoiser output"
    return statistics.median(times), times, first, first_peak, peak, out.float().cpu(), profiled


def compile_counts() -> tuple[int, int]:
    """(graphs Dynamo compiled, of those the ones Inductor will not capture as CUDA graphs) so far:
    torch's own counters, which torch._dynamo.reset() keeps, so a side's are the difference around its
    calls. A graph break shows as more than one graph; a skip, under reduce-overhead, as a graph that
    runs its kernels one launch at a time (torch logs why only with TORCH_LOGS=cudagraphs)."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"], counters["inductor"]["cudagraph_skips"]


def time_switched(patcher, arch, resolution, dev, dtype, args, lynx_out):
    """({"lynx+<name>": (ms with that switch turned, rel. diff of its output to lynx_out)}, ms with
    the defaults) on the same patcher (compiled graphs are kept: the switches are read at launch), in
    turns: each switch turned, then in reverse order again, then none, so a clock drift shifts both alike."""
    on = {f"lynx+{name}": [] for name in args.lynx_switches}
    diffs = {}
    for name in args.lynx_switches + args.lynx_switches[::-1]:
        with kernel_switch(name):
            _, times, _, _, _, out, _ = time_steps(patcher, arch, resolution, dev, dtype, args, profile=False)
        on[f"lynx+{name}"] += times
        diffs[f"lynx+{name}"] = round(((out - lynx_out).norm() / lynx_out.norm()).item(), 6)
        log(f"[{arch} {resolution}px lynx+{name}] {statistics.median(times):.2f} ms/step")
    _, off, _, _, _, _, _ = time_steps(patcher, arch, resolution, dev, dtype, args, profile=False)
    log(f"[{arch} {resolution}px lynx, switches at their defaults again] {statistics.median(off):.2f} ms/step")
    return {name: (times, diffs[name]) for name, times in on.items()}, off


@contextlib.contextmanager
def run_state(patcher):
    """What the sampler does around its steps: pre_run (fp8 weights are made here), cleanup."""
    patcher.pre_run()
    try:
        yield
    finally:
        patcher.cleanup()


# Kernel kinds, first match wins: Inductor names its kernels after the ops they fuse (one beside
# attention can carry "attention"), attention kernels can carry "cutlass" or "gemm".
KERNEL_KINDS = (("Inductor fused", ("triton_",)),
                ("attention", ("flash", "fmha", "attention", "sdpa", "attn")),
                ("sparse GEMM", ("sparse",)),
                ("dense GEMM", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_", "scaled_mm")),
                ("RT-Lynx passes", ("rt_lynx",)))
PROFILE_KINDS = ("attention", "sparse GEMM", "dense GEMM", "RT-Lynx passes", "Inductor fused", "other")


def kernel_kind(name: str) -> str:
    lower = name.lower()
    return next((kind for kind, marks in KERNEL_KINDS if any(mark in lower for mark in marks)), "other")


def profile_steps(forward, dev, iters):
    """({kind: kernel ms per step}, busy ms per step, wall ms per step, [(ms per step, kernel name)] of the
    largest kernels, host_profile's result, lynx_linear_kernels' result) over `iters` calls after the timed
    ones (same inputs, already warm)."""
    from torch.profiler import ProfilerActivity, profile
    dev.sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(iters):
            forward()
        dev.sync()
        wall = (time.perf_counter() - start) * 1000 / iters
    per_kind, per_kernel, intervals = dict.fromkeys(PROFILE_KINDS, 0.0), {}, []
    for event in prof.events():
        if event.device_type.name != "CUDA" or "memcpy" in event.name.lower() or "memset" in event.name.lower():
            continue
        ms = event.time_range.elapsed_us() / 1000 / iters
        per_kind[kernel_kind(event.name)] += ms
        per_kernel[event.name] = per_kernel.get(event.name, 0.0) + ms
        intervals.append((event.time_range.start, event.time_range.end))
    busy, reach = 0.0, float("-inf")   # union of kernel intervals: overlapping streams counted once
    for begin, end in sorted(intervals):
        busy += max(0.0, end - max(begin, reach))
        reach = max(reach, end)
    top = sorted(((ms, name) for name, ms in per_kernel.items()), reverse=True)[:12]
    return ({k: round(v, 3) for k, v in per_kind.items()}, round(busy / 1000 / iters, 3), round(wall, 3), top,
            host_profile(forward, dev, iters), lynx_linear_kernels(per_kernel))


def host_profile(forward, dev, iters, functions=12):
    """What the host does in a call while the GPU waits for it: the call's host time (from a synchronised
    start to its return; under CUDA graphs the replay is queued, not waited for) and, under cProfile, the
    Python functions that take the most of it, own time first: [own ms, cumulative ms, where] per call."""
    import cProfile
    import pstats
    launch = []
    for _ in range(iters):
        dev.sync()
        start = time.perf_counter()
        forward()
        launch.append((time.perf_counter() - start) * 1000)
        dev.sync()
    profiler = cProfile.Profile()
    for _ in range(iters):
        dev.sync()
        profiler.enable()
        forward()
        profiler.disable()
        dev.sync()
    entries = pstats.Stats(profiler).stats.items()   # {(file, line, name): (calls, primitive, own s, cumulative s, ...)}
    top = sorted(entries, key=lambda kv: kv[1][2], reverse=True)[:functions]
    return {"call_ms": round(statistics.median(launch), 3),
            "top_functions": [[round(v[2] * 1000 / iters, 3), round(v[3] * 1000 / iters, 3),
                               f"{pathlib.Path(k[0]).name}:{k[1]}({k[2]})"] for k, v in top]}


@contextlib.contextmanager
def counting_cudagraph_recordings():
    """Yields a list whose length, on exit, is how many CUDA graphs Inductor recorded inside (torch's
    compilation callbacks). Under reduce-overhead a run that records again has paid for a capture: a
    static input (a weight) moved since the last recording."""
    import torch._dynamo
    from torch._dynamo.callback import CallbackTrigger
    recorded = []

    def on_start(args):
        if args.callback_trigger == CallbackTrigger.CUDAGRAPH_RECORDING:
            recorded.append(args.compile_id)
    torch._dynamo.callback_handler.register_start_callback(on_start)
    try:
        yield recorded
    finally:
        torch._dynamo.callback_handler.remove_start_callback(on_start)


def between_prompts():
    """What ComfyUI's prompt worker does after a prompt (main.py): collect garbage and give the
    allocator's cached blocks back to the driver, so the next run's fp8 weights (made afresh in
    ON_PRE_RUN) may land elsewhere, as they would for a user's next queue."""
    import gc

    import comfy.model_management
    gc.collect()
    comfy.model_management.soft_empty_cache()


def time_sample(patcher, arch, resolution, dev, dtype, steps) -> dict:
    """The whole sample's seconds, peak GB, GB allocated before it and after it returns, the seconds
    of a run's preparation alone and the CUDA graphs recorded during it. The allocations show whether
    what a run makes for itself (fp8 weight copies) is given back; the preparation (ComfyUI's
    ON_PRE_RUN callbacks: an fp8 model quantises its weights there) is part of every sample's time;
    a recording in a second run is a capture a user pays on every queue."""
    import comfy.model_management
    import comfy.sample
    import comfy.utils
    import torch
    from comfy_models import conditioning, empty_latent
    comfy.model_management.load_models_gpu([patcher])
    latent = empty_latent(arch, 1, resolution // 8, resolution // 8)  # FLUX: CFG 1, batch 1
    tokens = CONTEXT_TOKENS[arch] if resolution > 128 else 40
    # KSampler's own call (nodes.common_ksampler without the preview callback): importing ComfyUI's
    # nodes module needs its video dependency, which the GPU machine lacks.
    noise = comfy.sample.prepare_noise(latent, 0)

    def sample(steps):
        return comfy.sample.sample(patcher, noise, steps, 1.0, "euler", "simple", conditioning(arch, tokens),
                                   conditioning(arch, tokens, seed=1), latent, seed=0,
                                   disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED)

    with torch.inference_mode():
        # A short sample first: the sampler's calls differ from time_steps' (a compiled model compiles
        # them again, 25-30 s for FLUX), and a user's second run does not pay that either.
        start = time.perf_counter()
        sample(2)
        dev.sync()
        log(f"    untimed 2-step sample first: {time.perf_counter() - start:.1f} s")
        between_prompts()
        start = time.perf_counter()
        with run_state(patcher):
            dev.sync()
            preparation = time.perf_counter() - start
        between_prompts()
        dev.reset_peak()
        before = dev.allocated_gb()
        start = time.perf_counter()
        with counting_cudagraph_recordings() as recorded:
            out = sample(steps)
            dev.sync()
        seconds = time.perf_counter() - start
    assert torch.isfinite(out).all(), "non-finite sample"
    del out
    return {"seconds": round(seconds, 3), "peak_gb": round(dev.peak_gb(), 3), "allocated_before_gb": round(before, 3),
            "allocated_after_gb": round(dev.allocated_gb(), 3), "run_preparation_s": round(preparation, 4),
            "cudagraphs_recorded": len(recorded)}


def lynx_clone(patcher, precision: str, fp8_dense_layers: bool = True, fused_blocks: bool = True,
               default_dense_layers: bool = True):
    from rt_lynx_pack.nodes import RTLynxSparsifyModel
    spec = RTLynxSparsifyModel.INPUT_TYPES()["required"]
    defaults = {name: (v[1]["default"]) for name, v in spec.items() if name != "model"}
    options = {"precision": precision, "fp8_dense_layers": fp8_dense_layers, "fused_blocks": fused_blocks,
               "default_dense_layers": default_dense_layers}
    (patched,) = RTLynxSparsifyModel().patch(patcher, **(defaults | options))
    return patched


def run_model(arch, args, dev, rows, samples, notes, save):
    import comfy.model_management
    import torch
    from comfy_models import TINY_BLOCKS, build_model
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from rt_lynx_pack.nodes.comfy_glue import installed_plan

    dtype = torch.bfloat16 if dev.cuda else torch.float32
    weight_dtype = torch.float8_e4m3fn if args.weights == "fp8_e4m3fn" else dtype
    start = time.perf_counter()
    dense = build_model(arch, blocks=TINY_BLOCKS[arch] if args.tiny else None, device=dev.device, dtype=weight_dtype)
    params = sum(p.numel() for p in dense.model.diffusion_model.parameters())
    log(f"[{arch}] built {params / 1e9:.2f} B params ({weight_dtype}) in {time.perf_counter() - start:.1f} s, "
        f"allocated {dev.allocated_gb():.1f} GB")
    layers = {"fp8_dense_layers": not args.no_fp8_dense_layers, "default_dense_layers": not args.no_default_dense_layers}
    lynx = lynx_clone(dense, args.precision, **layers)
    notes[arch] = installed_plan(lynx).summary(dev.device)
    if args.dense_rope_op:
        from rt_lynx_pack.nodes.comfy_glue import install_rope_tables
        dense = dense.clone()
        notes[arch] += f"; dense side: {install_rope_tables(dense, dense.get_model_object('diffusion_model'))}"
    log(f"[{arch}] {notes[arch]}")
    attribution = {}
    if args.attribution:
        from rt_lynx_pack.nodes.comfy_glue import install_fused_blocks
        fused_dense = dense.clone()
        if install_fused_blocks(fused_dense, dense.get_model_object("diffusion_model")):
            attribution = {"fused": fused_dense,
                           "sparse": lynx_clone(dense, args.precision, fused_blocks=False, **layers)}
    resolutions = args.resolutions if arch == "flux" else [args.resolutions[0] if args.tiny else 1024]
    for resolution in resolutions:
        modes = [m for m in ("eager", "compile") if m in args.modes and (
            m == "eager" or not args.no_compile and resolution in args.compile_resolutions)]
        for mode in modes:
            result = {"model": arch, "resolution": resolution, "batch": BATCH[arch], "mode": mode}
            # The sides take turns over several rounds (dense, Lynx, Lynx, dense, ...), so a clock drift
            # during the run shifts both alike. Compiled: --compile-rounds (default one; each turn
            # compiles its side again, since the two share the module).
            rounds = args.rounds if mode == "eager" else args.compile_rounds
            order = (("dense", dense), ("lynx", lynx)) + (tuple(attribution.items()) if mode == "eager" else ())
            outputs, all_times = {}, {side: [] for side, _ in order}
            for round_index in range(rounds):
                for side, base in order if round_index % 2 == 0 else order[::-1]:
                    patcher = base.clone()
                    if mode == "compile":
                        torch._dynamo.reset()  # dense and Lynx share the module: compile each from scratch
                        set_torch_compile_wrapper(patcher, backend=args.compile_backend, mode=args.compile_mode)
                    counts_before = compile_counts()
                    median, times, first, first_peak, peak, out, profiled = time_steps(
                        patcher, arch, resolution, dev, dtype, args, profile=round_index == 0)
                    all_times[side] += times
                    if mode == "compile":   # every round compiles its side again: each round's counts
                        graphs, skips = (after - before for after, before in zip(compile_counts(), counts_before))
                        if round_index == 0:
                            result.update({f"{side}_compiled_graphs": graphs, f"{side}_cudagraph_skips": skips})
                        result.setdefault(f"{side}_compiled_graphs_per_round", []).append(graphs)
                        log(f"[{arch} {resolution}px compile {side} round {round_index + 1}] {graphs} graph(s) "
                            f"compiled, {skips} of them not captured as CUDA graphs")
                    if side == "lynx" and args.lynx_switches and dev.cuda:
                        switched, times_off = time_switched(patcher, arch, resolution, dev, dtype, args, out)
                        for name, (times_on, diff) in switched.items():
                            all_times.setdefault(name, []).extend(times_on)
                            result[f"{name}_vs_lynx_rel_diff"] = diff
                        all_times["lynx"] += times_off
                    log(f"[{arch} {resolution}px {mode} {side} round {round_index + 1}/{rounds}] {median:.2f} ms/step "
                        f"(first call {first:.1f} s), peak {peak:.2f} GB (warm-up {first_peak:.2f} GB)")
                    if profiled is not None and round_index == 0:
                        kinds, busy, wall, top, host, linears = profiled
                        result[f"{side}_profile"] = {"kernel_ms": kinds, "busy_ms": busy, "wall_ms": wall,
                                                     "top_kernels": [[round(ms, 3), name[:160]] for ms, name in top],
                                                     "host": host, "linear_kernel_ms": linears["ms"]}
                        log(f"[{arch} {resolution}px {mode} {side} profile] GPU busy {busy:.1f} of {wall:.1f} ms: "
                            + ", ".join(f"{k} {v:.1f}" for k, v in kinds.items()))
                        for ms, name in top:
                            log(f"    {ms:8.3f} ms  {name[:150]}")
                        log(f"    host: {host['call_ms']:.2f} ms a call before it returns; own / cumulative ms:")
                        for own, cumulative, where in host["top_functions"]:
                            log(f"    {own:8.3f} {cumulative:8.3f}  {where}")
                    if round_index == 0:
                        outputs[side] = out
                        result.update({f"{side}_first_call_s": round(first, 2), f"{side}_peak_gb": round(peak, 3),
                                       f"{side}_warmup_peak_gb": round(first_peak, 3)})
                        if (((arch, resolution) == SAMPLE_RESOLUTION or args.tiny and arch == "flux")
                                and mode in args.sample_modes and args.steps > 0 and side in ("dense", "lynx")):
                            sample = time_sample(patcher, arch, resolution, dev, dtype, args.steps)
                            samples.append({"model": arch, "resolution": resolution, "mode": mode, "side": side,
                                            "steps": args.steps} | sample)
                            log(f"[{arch} {resolution}px {mode} {side}] {args.steps}-step sample {sample['seconds']:.2f}"
                                f" s, peak {sample['peak_gb']:.2f} GB, allocated {sample['allocated_before_gb']:.2f} GB "
                                f"before, {sample['allocated_after_gb']:.2f} GB after, a run's preparation alone "
                                f"{sample['run_preparation_s']:.3f} s, CUDA graphs recorded "
                                f"{sample['cudagraphs_recorded']}")
                    del patcher
                    comfy.model_management.unload_all_models()
            for side, times in all_times.items():
                result.update({f"{side}_ms": round(statistics.median(times), 3),
                               f"{side}_ms_all": [round(t, 3) for t in times]})
            result["rounds"] = rounds
            dense_out = outputs["dense"]
            result["lynx_vs_dense_rel_error"] = round(((outputs["lynx"] - dense_out).norm() / dense_out.norm()).item(), 4)
            result["speedup"] = round(result["dense_ms"] / result["lynx_ms"], 3)
            result["lynx_switches"] = [f"lynx+{name}" for name in args.lynx_switches if dev.cuda]
            if "fused" in outputs:
                result["fused_vs_dense_rel_error"] = round(
                    ((outputs["fused"] - dense_out).norm() / dense_out.norm()).item(), 4)
            rows.append(result)
            save()   # a call that runs out of time keeps the rows measured so far
    del dense, lynx, attribution
    comfy.model_management.unload_all_models()
    comfy.model_management.soft_empty_cache()


def run_lora_cost(arch, args, dev, lora_costs, notes, save):
    """The step with a Lynx LoRA next to dense and Lynx (eager, first resolution, the three in turns
    over --rounds): with --calibrate the LoRA the Calibrate LoRA node makes as a user runs it (its
    defaults; its wall time and peak memory recorded), with --lora-rank one of that runtime rank with
    random factors (its cost, not its quality) written as a Lynx LoRA file and loaded by Load Lynx LoRA."""
    import comfy.model_management
    import torch
    from comfy_models import TINY_BLOCKS, build_model
    from rt_lynx_pack.nodes.comfy_glue import installed_plan

    dtype = torch.bfloat16 if dev.cuda else torch.float32
    dense = build_model(arch, blocks=TINY_BLOCKS[arch] if args.tiny else None, device=dev.device, dtype=dtype)
    lynx = lynx_clone(dense, "bf16")
    resolution = args.resolutions[0]
    make = calibrated_lora if args.calibrate else random_lora
    dev.reset_peak()
    start = time.perf_counter()
    with_lora, result = make(arch, lynx, resolution, args, dev)
    dev.sync()
    result.update({"model": arch, "resolution": resolution, "seconds": round(time.perf_counter() - start, 1),
                   "peak_gb": round(dev.peak_gb(), 2)})
    log(f"[{arch} {resolution}px] {result['source']} LoRA ({result['widgets']}) {result['seconds']:.1f} s, "
        f"peak {result['peak_gb']:.2f} GB")
    notes[arch + " + LoRA"] = installed_plan(with_lora).summary(dev.device)
    order = (("dense", dense), ("lynx", lynx), ("lynx_lora", with_lora))
    all_times, peaks = {side: [] for side, _ in order}, {}
    for round_index in range(args.rounds):
        for side, base in order if round_index % 2 == 0 else order[::-1]:
            patcher = base.clone()
            _, times, _, _, peak, _, profiled = time_steps(patcher, arch, resolution, dev, dtype, args,
                                                           profile=round_index == 0)
            all_times[side] += times
            peaks[side] = max(peaks.get(side, 0.0), peak)
            if profiled is not None:
                kinds, _, _, _, _, linears = profiled
                result[f"{side}_kernel_ms"] = kinds
                result[f"{side}_linear_kernel_ms"], result[f"{side}_linear_passes_ms"] = linears["ms"], linears["passes"]
            del patcher
            comfy.model_management.unload_all_models()
    for side, times in all_times.items():
        result[f"{side}_ms"], result[f"{side}_peak_gb"] = round(statistics.median(times), 3), round(peaks[side], 3)
        log(f"[{arch} {resolution}px eager {side}] {result[f'{side}_ms']:.2f} ms/step, peak {peaks[side]:.2f} GB")
    lora_costs.append(result)
    save()
    del dense, lynx, with_lora
    comfy.model_management.unload_all_models()
    comfy.model_management.soft_empty_cache()


def calibrated_lora(arch, lynx, resolution, args, dev):
    """(model with the LoRA, result fields): the Calibrate LoRA node with its defaults; the file it
    writes is removed again."""
    from comfy_models import conditioning, empty_latent
    from rt_lynx_pack.nodes import RTLynxCalibrateLoRA
    from rt_lynx_pack.nodes.comfy_glue import lynx_lora_folder

    spec = RTLynxCalibrateLoRA.INPUT_TYPES()["required"]
    widgets = {name: v[1]["default"] for name, v in spec.items() if len(v) > 1 and "default" in v[1]}
    tokens = CONTEXT_TOKENS[arch] if resolution > 128 else 40
    latent = {"samples": empty_latent(arch, 1, resolution // 8, resolution // 8)}
    widgets["filename"] = "rt_lynx_e2e_calibration"
    if args.calibrate_folded_rank is not None:
        widgets["folded_rank"] = args.calibrate_folded_rank
    with_lora, lora_name = RTLynxCalibrateLoRA().calibrate(lynx, positive=conditioning(arch, tokens),
                                                           latent_image=latent, **widgets)
    os.remove(os.path.join(lynx_lora_folder(), os.path.basename(lora_name)))  # the run leaves no file behind
    return with_lora, {"source": "calibrated", "widgets": {k: v for k, v in widgets.items() if k != "filename"}}


def random_lora(arch, lynx, resolution, args, dev):
    """(model with the LoRA, result fields): a Lynx LoRA file of runtime rank --lora-rank for every
    sparsified layer, random factors, loaded by the Load Lynx LoRA node (the time counted includes
    writing the file); the file is removed again."""
    import torch
    from rt_lynx_pack.lynx import LynxLoRA, save_lynx_lora
    from rt_lynx_pack.nodes import RTLynxLoadLoRA
    from rt_lynx_pack.nodes.comfy_glue import LYNX_LORA_SUBFOLDER, installed_plan, lynx_lora_folder

    plan = installed_plan(lynx)
    rank = args.lora_rank
    generator = torch.Generator().manual_seed(0)
    layers = {name: (torch.randn(rank, k, generator=generator) / k ** 0.5,
                     torch.randn(n, rank, generator=generator) * (0.01 / rank ** 0.5))
              for name, (k, n) in plan.sparse_layer_shapes.items()}
    lora = LynxLoRA(architecture=plan.policy.name, rank=rank, alpha=float(rank), pattern=plan.config.pattern,
                    compensation=plan.config.compensate, layers=layers)
    file_name = "rt_lynx_e2e_random.safetensors"
    os.makedirs(lynx_lora_folder(), exist_ok=True)
    path = os.path.join(lynx_lora_folder(), file_name)
    save_lynx_lora(lora, path)
    try:
        (with_lora,) = RTLynxLoadLoRA().load(lynx, f"{LYNX_LORA_SUBFOLDER}/{file_name}", 1.0)
    finally:
        os.remove(path)
    return with_lora, {"source": "random", "widgets": {"rank": rank}}


# The kernels of the sparsified linears themselves: the sparse GEMM, the sparsify passes (with the
# producer's work they fuse), a LoRA's down pass and slice sum, a LayerNorm's row statistics for it,
# and the cuSPARSELt path's epilogue.
LYNX_LINEAR_KERNEL_MARKS = ("sparsify", "low_rank", "row_stats", "scale_bias_epilogue", "fp8_epilogue")


def lynx_linear_kernels(per_kernel):
    """The sparsified linears' kernels in {kernel name: ms}: {"ms": their total, "passes": {short name:
    ms} of those other than the sparse GEMM}, the GEMMs being the kind "sparse GEMM" and the passes the
    kernels whose name marks them as a linear's."""
    passes = {}
    for name, ms in per_kernel.items():
        if kernel_kind(name) != "sparse GEMM" and any(mark in name for mark in LYNX_LINEAR_KERNEL_MARKS):
            short = re.sub(r"^void |\(.*$", "", name.replace("rt_lynx::(anonymous namespace)::", ""))
            passes[short] = round(passes.get(short, 0.0) + ms, 3)
    gemms = sum(ms for name, ms in per_kernel.items() if kernel_kind(name) == "sparse GEMM")
    return {"ms": round(gemms + sum(passes.values()), 3), "passes": passes}


def markdown(meta, rows, samples, notes, lora_costs=()):
    partial = "" if meta.get("complete", True) else " (partial: the rows done when the run stopped)"
    lines = [f"# RT-Lynx end to end in ComfyUI ({meta['date']}, {meta['gpu']}){partial}", "",
             f"torch {meta['torch']}, ComfyUI {meta['comfyui']}, commit {meta['commit']}, weights {meta['dtype']} "
             f"(random), compile backend {meta['compile_backend']}"
             f"{', mode ' + meta['args']['compile_mode'] if meta['args'].get('compile_mode') else ''}"
             f"{', TINY models' if meta['tiny'] else ''}"
             f"{', exact GELU in the kernels' if meta['args'].get('exact_gelu') else ''}"
             f"{', programmatic dependent launch' if meta['args'].get('programmatic_launch') else ''}"
             f"{', packed GELU in the e4m3 passes' if meta['args'].get('packed_e4m3_gelu') else ''}",
             ""]
    lines += [f"- {arch}: {text}" for arch, text in notes.items()]
    if rows:
        lines += ["", "| model | res | batch | mode | dense ms/step | Lynx ms/step | speed-up | dense peak GB | "
                  "Lynx peak GB | Lynx/dense mem | warm-up peak dense / Lynx GB | rel. diff |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mem = r["lynx_peak_gb"] / r["dense_peak_gb"] if r["dense_peak_gb"] == r["dense_peak_gb"] else float("nan")
        warmup = (f"{r['dense_warmup_peak_gb']:.2f} / {r['lynx_warmup_peak_gb']:.2f}"
                  if "lynx_warmup_peak_gb" in r else "-")
        lines.append(f"| {r['model']} | {r['resolution']} | {r['batch']} | {r['mode']} | {r['dense_ms']:.2f} | "
                     f"{r['lynx_ms']:.2f} | {r['speedup']:.3f}x | {r['dense_peak_gb']:.2f} | {r['lynx_peak_gb']:.2f} | "
                     f"{mem:.3f} | {warmup} | {r['lynx_vs_dense_rel_error']:.4f} |")
    counted = [r for r in rows if "lynx_compiled_graphs" in r]
    if counted:
        lines += [""] + [f"Compiled ({r['model']} {r['resolution']}): graphs dense {r['dense_compiled_graphs']} / "
                         f"Lynx {r['lynx_compiled_graphs']} (more than one: a graph break or a recompilation), of "
                         f"them not captured as CUDA graphs dense {r['dense_cudagraph_skips']} / Lynx "
                         f"{r['lynx_cudagraph_skips']} (first round)"
                         + (f"; graphs per round dense {r['dense_compiled_graphs_per_round']} / Lynx "
                            f"{r['lynx_compiled_graphs_per_round']}" if r.get("rounds", 1) > 1 else "") + "."
                         for r in counted]
    attributed = [r for r in rows if "fused_ms" in r]
    if attributed:
        lines += ["", "| where the speed-up comes from | res | mode | dense | fused blocks, dense GEMMs | "
                  "sparse, unfused blocks | Lynx (both) | fused vs dense rel. diff |", "|---|---|---|---|---|---|---|---|"]
        for r in attributed:
            cells = [f"{r[f'{side}_ms']:.2f} ms ({r['dense_ms'] / r[f'{side}_ms']:.3f}x)" for side in ("fused", "sparse", "lynx")]
            lines.append(f"| {r['model']} | {r['resolution']} | {r['mode']} | {r['dense_ms']:.2f} ms | {' | '.join(cells)} | "
                         f"{r['fused_vs_dense_rel_error']:.4f} |")
    switched = [(r, side) for r in rows for side in r.get("lynx_switches", ()) if f"{side}_ms" in r]
    if switched:
        lines += ["", "| kernel switch turned from its default (same run, in turns on the same model) | res | mode | "
                  "Lynx ms/step | turned ms/step | turned / default | speed-up over dense | output rel. diff to Lynx |",
                  "|---|---|---|---|---|---|---|---|"]
        for r, side in switched:
            lines.append(f"| {r['model']} {side} | {r['resolution']} | {r['mode']} | {r['lynx_ms']:.2f} | "
                         f"{r[f'{side}_ms']:.2f} | {r[f'{side}_ms'] / r['lynx_ms']:.4f} | "
                         f"{r['dense_ms'] / r[f'{side}_ms']:.3f}x | {r[f'{side}_vs_lynx_rel_diff']:.2e} |")
    profiled = [(r, side) for r in rows for side in ("dense", "lynx", "fused", "sparse") if f"{side}_profile" in r]
    if profiled:
        lines += ["", "| GPU time per step (ms) | res | mode | side | wall | GPU busy | "
                  + " | ".join(PROFILE_KINDS) + " | host time of a call |", "|---" * (7 + len(PROFILE_KINDS)) + "|"]
        for r, side in profiled:
            prof = r[f"{side}_profile"]
            host = prof.get("host", {}).get("call_ms", float("nan"))
            lines.append(f"| {r['model']} | {r['resolution']} | {r['mode']} | {side} | {prof['wall_ms']:.1f} | "
                         f"{prof['busy_ms']:.1f} | " + " | ".join(f"{prof['kernel_ms'][k]:.1f}" for k in PROFILE_KINDS)
                         + f" | {host:.2f} |")
        for r, side in profiled:
            functions = r[f"{side}_profile"].get("host", {}).get("top_functions", ())
            if functions:
                lines += ["", f"Host functions of a {r['model']} {r['resolution']} {r['mode']} {side} call "
                          "(cProfile; own ms / cumulative ms): "
                          + "; ".join(f"{where} {own:.2f} / {cumulative:.2f}" for own, cumulative, where in functions)]
    if samples:
        lines += ["", "| whole sample | res | mode | steps | dense s | Lynx s | speed-up | dense peak GB | Lynx peak GB "
                  "| Lynx allocated before / after GB | run preparation dense / Lynx s "
                  "| CUDA graphs recorded dense / Lynx |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        keyed = {(s["model"], s["resolution"], s["mode"], s["side"]): s for s in samples}
        for (model, res, mode, side), s in keyed.items():
            if side == "dense" and (model, res, mode, "lynx") in keyed:
                lynx = keyed[(model, res, mode, "lynx")]
                lines.append(f"| {model} | {res} | {mode} | {s['steps']} | {s['seconds']:.2f} | {lynx['seconds']:.2f} | "
                             f"{s['seconds'] / lynx['seconds']:.3f}x | {s.get('peak_gb', float('nan')):.2f} | "
                             f"{lynx.get('peak_gb', float('nan')):.2f} | {lynx.get('allocated_before_gb', float('nan')):.2f}"
                             f" / {lynx.get('allocated_after_gb', float('nan')):.2f} | "
                             f"{s.get('run_preparation_s', float('nan')):.3f} / "
                             f"{lynx.get('run_preparation_s', float('nan')):.3f} | "
                             f"{s.get('cudagraphs_recorded', '-')} / {lynx.get('cudagraphs_recorded', '-')} |")
    if lora_costs:
        lines += ["", "| Lynx LoRA | res | seconds to make it | peak GB | dense ms/step | Lynx ms/step | "
                  "Lynx + LoRA ms/step | LoRA cost, step | sparsified linears' kernels, Lynx / + LoRA ms | "
                  "LoRA cost, those kernels | Lynx + LoRA peak GB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in lora_costs:
            what = {"calibrated": "Calibrate LoRA node", "random": "random factors, Load Lynx LoRA"}[
                c.get("source", "calibrated")]
            plain, with_lora = c.get("lynx_linear_kernel_ms"), c.get("lynx_lora_linear_kernel_ms")
            linears = (f"{plain:.2f} / {with_lora:.2f} | {with_lora / plain - 1:+.1%}" if plain and with_lora
                       else "- | -")
            lines.append(f"| {c['model']}, {what} ({', '.join(f'{k} {v}' for k, v in c['widgets'].items())}) "
                         f"| {c['resolution']} | {c['seconds']:.1f} | {c['peak_gb']:.2f} | {c['dense_ms']:.2f} | "
                         f"{c['lynx_ms']:.2f} | {c['lynx_lora_ms']:.2f} | {c['lynx_lora_ms'] / c['lynx_ms'] - 1:+.1%} | "
                         f"{linears} | {c['lynx_lora_peak_gb']:.2f} |")
        lines += ["", "Sparsified linears' kernels: kernel time per step (--profile, first round) of the sparse "
                  "GEMMs and of the passes that feed them (the sparsify passes with the work they fuse, a LoRA's "
                  "down pass, slice sum and row statistics): what a LoRA adds to the Lynx linears in a step."]
    lines += ["", "ms/step: median of synchronised BaseModel.apply_model calls (first calls, incl. compilation, "
              "excluded); eager, and compiled with --compile-rounds above 1: over rounds in which dense and Lynx take "
              "turns, a compiled side compiled again at each turn (column rounds in the JSON). "
              "Peak: torch.cuda.max_memory_allocated during those calls, weights included; warm-up peak: "
              "the same over the first calls (one-time kernel config search, compilation)."]
    if profiled:
        lines += ["", "GPU time per step: torch.profiler over a few calls after the timed ones; kernel time by kind "
                  "(the kernel's name decides), GPU busy: the union of kernel intervals, wall: the profiled calls' "
                  "own time (profiling adds host overhead); host time of a call: from a synchronised start until "
                  "apply_model returns, while the GPU waits for its first launch (under CUDA graphs the replay is "
                  "queued, not waited for)."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    import torch
    import_comfyui(args.tiny)
    import comfyui_version
    dev = Device(torch)
    if not dev.cuda and not args.tiny:
        sys.exit("no CUDA GPU: full-size models need one (use --tiny to check the script on the CPU)")
    log(f"device {dev.name}, torch {torch.__version__}, models {args.models}, resolutions {args.resolutions}, "
        f"compile {'off' if args.no_compile else args.compile_backend + ' at ' + str(args.compile_resolutions)}")
    rows, samples, notes, lora_costs = [], [], {}, []
    switches = contextlib.ExitStack()   # process-wide; the dense side runs none of these kernels
    whole_run = [name for name in KERNEL_SWITCHES if getattr(args, name)]   # --exact-gelu, --packed-e4m3-gelu, ...
    if dev.cuda:
        for name in whole_run:
            switches.enter_context(kernel_switch(name))
    if args.unfused_residual:
        from rt_lynx_pack.kernels import dispatch
        switches.enter_context(dispatch.residual_epilogue(False))
    if not dev.cuda and (whole_run or args.lynx_switches):
        log("--exact-gelu / --programmatic-launch / --packed-e4m3-gelu / --lynx-switches ignored: no CUDA device, "
            "the reference path has no kernels")
    started = datetime.datetime.now(datetime.timezone.utc)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = "".join(c if c.isalnum() else "-" for c in dev.name).strip("-").lower()
    # The models in the name: two runs in one minute (one model each) must not overwrite each other.
    stem = out / f"e2e-{started.strftime('%Y%m%d-%H%M')}-{gpu}-{'-'.join(args.models)}{'-tiny' if args.tiny else ''}"

    def save(complete=False):
        """The results so far as <stem>.md and .json; the markdown text."""
        meta = {"date": started.strftime("%Y-%m-%d %H:%M UTC"), "gpu": dev.name, "torch": torch.__version__,
                "cuda": torch.version.cuda, "comfyui": comfyui_version.__version__, "commit": git_commit(),
                "dtype": args.weights if dev.cuda else "fp32", "compile_backend": args.compile_backend,
                "tiny": args.tiny, "complete": complete, "args": {k: v for k, v in vars(args).items() if k != "out"}}
        text = markdown(meta, rows, samples, notes, lora_costs)
        stem.with_suffix(".md").write_text(text)
        stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "steps": rows, "samples": samples,
                                                         "lora_costs": lora_costs, "lynx_plans": notes},
                                                        indent=1) + "\n")
        return text

    with switches:
        for arch in args.models:
            if args.calibrate or args.lora_rank:
                run_lora_cost(arch, args, dev, lora_costs, notes, save)
            else:
                run_model(arch, args, dev, rows, samples, notes, save)
    log("\n" + save(complete=True))
    log(f"wrote {stem}.md and .json")


if __name__ == "__main__":
    main()
