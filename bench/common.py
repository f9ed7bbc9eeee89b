"""What the benchmarks share: timing (eager wall, CUDA-graph kernel time, queued eager device time) and the
commit stamp."""
import contextlib
import math
import os
import pathlib
import statistics
import subprocess
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
INPUT_SETS = 3  # activations the timed calls rotate through, so they do not just re-read L2

# (model, layer, M, K, N). FLUX.1-dev 1024x1024: 4096 image + 512 text tokens, single blocks
# 4608. Qwen-Image 1024x1024 with CFG batch 2: 8192 image tokens; text assumed 256 tokens x 2 =
# 512, whose shapes equal the FLUX text rows below.
LINEAR_SHAPES = [
    ("flux", "double img qkv", 4096, 3072, 9216),
    ("flux", "double img proj", 4096, 3072, 3072),
    ("flux", "double img mlp up", 4096, 3072, 12288),
    ("flux", "double img mlp down", 4096, 12288, 3072),
    ("flux", "double txt qkv", 512, 3072, 9216),
    ("flux", "double txt proj", 512, 3072, 3072),
    ("flux", "double txt mlp up", 512, 3072, 12288),
    ("flux", "double txt mlp down", 512, 12288, 3072),
    ("flux", "single linear1", 4608, 3072, 21504),
    ("flux", "single linear2", 4608, 15360, 3072),
    ("qwen", "img attn q/k/v/out", 8192, 3072, 3072),
    ("qwen", "img mlp up", 8192, 3072, 12288),
    ("qwen", "img mlp down", 8192, 12288, 3072),
]
# How often a FLUX.1-dev step runs each shape among its sparsified linears: 19 double blocks with
# four image and four text linears, 38 single blocks with linear1 (linear2 is kept dense).
FLUX_STEP_COUNTS = {"double img qkv": 19, "double img proj": 19, "double img mlp up": 19, "double img mlp down": 19,
                    "double txt qkv": 19, "double txt proj": 19, "double txt mlp up": 19, "double txt mlp down": 19,
                    "single linear1": 38}


def flux_step_count(m: int, k: int, n: int) -> int:
    """How often a FLUX.1-dev step runs a sparsified linear of this shape (0: none does)."""
    return next((FLUX_STEP_COUNTS.get(layer, 0) for model, layer, *shape in LINEAR_SHAPES
                 if model == "flux" and tuple(shape) == (m, k, n)), 0)


def rotating(tensors):
    """A function returning the next of `tensors` on each call, round and round."""
    state = {"i": 0}

    def next_tensor():
        state["i"] = (state["i"] + 1) % len(tensors)
        return tensors[state["i"]]
    return next_tensor


class OperandRotation:
    """Wraps functions of an operand set into calls that each take the next of `operand_sets`, round
    and round (shared by all the wrapped calls; `index` is the set the last call took)."""

    def __init__(self, operand_sets):
        self.operand_sets, self.index = operand_sets, 0

    def __call__(self, fn):
        def call():
            self.index = (self.index + 1) % len(self.operand_sets)
            return fn(*self.operand_sets[self.index])
        return call


def git_commit() -> str:
    """The commit measured: $RT_LYNX_COMMIT when set (the GPU machine gets the work tree without
    .git), else git's short hash, marked when kernels/ or bench/ differ from it."""
    if os.environ.get("RT_LYNX_COMMIT"):
        return os.environ["RT_LYNX_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "kernels", "bench"], cwd=ROOT, text=True,
                               capture_output=True, timeout=10).stdout.strip()
        return head + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def eager_us(fn, calls, repeats):
    """Median host time per call (us) over back-to-back calls, synchronised: includes CPU overhead."""
    return interleaved_eager_us({"fn": fn}, calls, repeats)["fn"]


def graph_us(fn, calls, repeats):
    """Median device time per call (us) from CUDA-graph replays: kernels only, no launch gaps."""
    return interleaved_kernel_us({"fn": fn}, calls, repeats)["fn"]


def _rotated(names, turn):
    """The variants' order in one round: rotated each round, so none is always first or last."""
    shift = turn % len(names)
    return names[shift:] + names[:shift]


def interleaved_eager_us(fns, calls, repeats, contexts=None):
    """{name: median host time per call (us)} over back-to-back synchronised calls, the variants
    taking turns within every repeat: a clock or temperature drift during the run (the same
    kernel moved by up to 20% over minutes on an H200) shifts all of them alike, so their ratios
    hold. contexts[name], if given, makes a context manager entered around that variant's turns
    (outside the timed span)."""
    import torch
    names, contexts = list(fns), contexts or {}
    for name in names:
        with contexts.get(name, contextlib.nullcontext)():
            for _ in range(3):
                fns[name]()
    torch.cuda.synchronize()
    samples = {name: [] for name in names}
    for turn in range(repeats):
        for name in _rotated(names, turn):
            fn = fns[name]
            with contexts.get(name, contextlib.nullcontext)():
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                torch.cuda.synchronize()
                samples[name].append((time.perf_counter() - start) / calls * 1e6)
    return {name: statistics.median(values) for name, values in samples.items()}


QUEUE_MARGIN = 2.0   # the queueing kernel runs this many times the host's launch time


def interleaved_queued_us(fns, calls, repeats, contexts=None):
    """{name: median device time per call (us)} of eager launches queued behind a long kernel, so
    they run back to back as launched, with no host gap between them: the path eager ComfyUI and
    Inductor's code take (each call's own launches, workspaces and stream state, programmatic
    launch edges between kernels), which CUDA-graph replays (interleaved_kernel_us) capture once.
    The variants take turns as in interleaved_eager_us. A call whose host launches outlast the
    queueing kernel is timed again behind a longer one."""
    import torch
    names, contexts = list(fns), contexts or {}
    launch_s = {}
    for name in names:
        with contexts.get(name, contextlib.nullcontext)():
            for _ in range(3):
                fns[name]()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                fns[name]()
            launch_s[name] = time.perf_counter() - start   # an upper bound: includes any blocking
            torch.cuda.synchronize()
    cycles_per_s = _sleep_cycles_per_second(torch)
    samples = {name: [] for name in names}
    for turn in range(repeats):
        for name in _rotated(names, turn):
            with contexts.get(name, contextlib.nullcontext)():
                samples[name].append(_queued_sample_us(torch, fns[name], calls, launch_s[name], cycles_per_s))
    return {name: statistics.median(values) for name, values in samples.items()}


def _sleep_cycles_per_second(torch):
    queued, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 20_000_000
    queued.record()
    torch.cuda._sleep(cycles)
    done.record()
    done.synchronize()
    return cycles / (queued.elapsed_time(done) * 1e-3)


def _queued_sample_us(torch, fn, calls, launch_s, cycles_per_s, attempts=4):
    for _ in range(attempts):
        torch.cuda.synchronize()
        queued, start, stop = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        host_start = time.perf_counter()   # the queueing kernel starts after this
        queued.record()
        torch.cuda._sleep(int(QUEUE_MARGIN * launch_s * cycles_per_s) + 1)
        start.record()
        for _ in range(calls):
            fn()
        launched = time.perf_counter() - host_start
        stop.record()
        stop.synchronize()
        if launched * 1e3 < queued.elapsed_time(start):   # every call was queued before the first ran
            return start.elapsed_time(stop) * 1e3 / calls
        launch_s = max(launched, 2 * launch_s)
    raise RuntimeError(f"the host took {launched * 1e6:.0f} us to launch {calls} calls, longer than the "
                       "queueing kernel ran: no queued time")


def interleaved_kernel_us(fns, calls, repeats, contexts=None):
    """{name: median device time per call (us)} from CUDA-graph replays (kernels only, no launch
    gaps), each variant's graph replayed in turn within every repeat (see interleaved_eager_us);
    a variant's context is entered around its capture. A variant whose capture fails is NaN (the
    error printed), so the others are still timed."""
    import torch
    names, contexts = list(fns), contexts or {}
    graphs = {}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for name in names:
            with contexts.get(name, contextlib.nullcontext)():
                for _ in range(3):
                    fns[name]()
                graph = torch.cuda.CUDAGraph()
                try:
                    with torch.cuda.graph(graph, stream=stream):
                        for _ in range(calls):
                            fns[name]()
                except RuntimeError as exc:
                    print(f"{name}: no CUDA-graph time, its capture failed: {exc}", flush=True)
                    torch.cuda.synchronize()
                    continue
            graphs[name] = graph
    torch.cuda.current_stream().wait_stream(stream)
    for graph in graphs.values():
        graph.replay()
    torch.cuda.synchronize()
    samples = {name: [] if name in graphs else [math.nan] for name in names}
    for turn in range(repeats):
        for name in _rotated(list(graphs), turn):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graphs[name].replay()
            stop.record()
            stop.synchronize()
            samples[name].append(start.elapsed_time(stop) * 1e3 / calls)
    del graphs
    return {name: statistics.median(values) for name, values in samples.items()}


def timed_gpu_bench_args(doc: str, script: str, argv=None, calls: int = 10):
    """The arguments of a benchmark that times variants in turns on a GPU (--out, --calls, --repeats);
    exits with a message where there is no CUDA device."""
    import argparse
    import sys

    import torch
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--calls", type=int, default=calls)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit(f"bench/{script} needs a CUDA GPU")
    return args


def kernel_names(fn) -> list:
    """The CUDA kernels one call of `fn` launches, in order (after one call to warm it up)."""
    import torch
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def kernel_means(fn, calls: int) -> tuple:
    """({kernel name, 90 characters: mean device us per call}, device span per call in us) over
    `calls` back-to-back calls of `fn` (CUPTI through torch.profiler, after three warm-up calls)."""
    import collections
    import torch
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    totals = collections.defaultdict(float)
    starts, ends = [], []
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name[:90]] += event.time_range.elapsed_us()
            starts.append(event.time_range.start)
            ends.append(event.time_range.end)
    span = (max(ends) - min(starts)) / calls if starts else 0.0
    return {name: us / calls for name, us in totals.items()}, span


def write_markdown(out_dir: str | None, stem: str, text: str) -> None:
    """`text` as <out_dir>/<stem>.md when out_dir is given (benchmarks whose result is one table)."""
    if out_dir:
        out = pathlib.Path(out_dir) / f"{stem}.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")


def write_results(out_dir: str, name: str, meta: dict, rows: list, text: str) -> None:
    """The table (`text`) as <out_dir>/<name>.md and the rows with meta as .json, where `{tag}` in
    `name` becomes the date and the GPU (e.g. "kernels-{tag}-fp8")."""
    import json
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / name.format(tag=f"{meta['date']}-{meta['gpu'].replace(' ', '_').replace('/', '_')}")
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {stem}.md and .json")
