"""What the benchmarks share: timing (eager wall and CUDA-graph kernel time) and the commit stamp."""
import os
import pathlib
import statistics
import subprocess
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


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
    import torch
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def graph_us(fn, calls, repeats):
    """Median device time per call (us) from CUDA-graph replays: kernels only, no launch gaps."""
    import torch
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(calls):
                fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop) * 1e3 / calls)
    del graph
    return statistics.median(samples)
