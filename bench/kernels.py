"""Build, check and time the RT-Lynx fast path against cuBLAS on FLUX.1-dev / Qwen-Image shapes.

For every (M, K, N), bf16, bias on, compensation on:
  dense      F.linear(x, W, b)                      (cuBLAS, bias fused)
  gemm       torch.ops.rt_lynx.sparse_mm            (our cuSPARSELt binding, input pre-compressed)
  lynx       cusparselt.sparse_linear               (sparsify+compress, GEMM, scale+bias epilogue)
  reference  reference.sparse_linear_reference      (plain PyTorch)
  sparsify   torch.ops.rt_lynx.sparsify_compress    (vs the memory floor)
  epilogue   torch.ops.rt_lynx.scale_bias_epilogue  (vs the memory floor)
Two clocks: eager wall time (host clock around N back-to-back calls and a sync, median of
repeats) and kernel time (CUDA graph of N calls, replayed, device events, median).

Usage: python bench/kernels.py [--quick] [--out DIR]
"""
import argparse
import datetime
import json
import logging
import pathlib
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from standalone import load_pack  # noqa: E402

load_pack()
from rt_lynx_pack.kernels import cusparselt  # noqa: E402
from rt_lynx_pack.kernels.reference import sparse_linear_reference  # noqa: E402

# (model, layer, M, K, N). FLUX.1-dev 1024x1024: 4096 image + 512 text tokens, single blocks
# 4608. Qwen-Image 1024x1024 with CFG batch 2: 8192 image tokens; text assumed 256 tokens x 2 =
# 512, whose shapes equal the FLUX text rows below.
SHAPES = [
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
INPUT_SETS = 3  # rotate activations so repeated calls do not just re-read L2


def eager_us(fn, calls, repeats):
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


def copy_bandwidth_tbs():
    """Device-to-device copy, bytes read + written per second (the practical memory ceiling)."""
    src = torch.randn(256 * 1024 * 1024, device="cuda", dtype=torch.float16)
    dst = torch.empty_like(src)
    us = graph_us(lambda: dst.copy_(src), 5, 5)
    return 2 * src.numel() * 2 / (us * 1e-6) / 1e12


def rotating(tensors):
    state = {"i": 0}

    def next_tensor():
        state["i"] = (state["i"] + 1) % len(tensors)
        return tensors[state["i"]]
    return next_tensor


def bench_shape(M, K, N, calls, repeats, bandwidth):
    dtype = torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(M * 7 + K * 3 + N)
    xs = [torch.randn(M, K, generator=g, device="cuda").to(dtype) for _ in range(INPUT_SETS)]
    weight = (torch.randn(N, K, generator=g, device="cuda") / K ** 0.5).to(dtype)
    bias = torch.randn(N, generator=g, device="cuda").to(dtype)
    mp = cusparselt.padded_rows(M)
    compressed = [torch.ops.rt_lynx.sparsify_compress(x, mp)[0] for x in xs]
    next_x, next_c = rotating(xs), rotating(compressed)
    gemm_out = torch.ops.rt_lynx.sparse_mm(compressed[0], weight, mp)
    scale = torch.rand(mp, generator=g, device="cuda") + 0.5

    # Correctness of what is timed (fresh inputs, fp32 math on the same sparsified input).
    y = cusparselt.sparse_linear(xs[0], weight, bias, True)
    want = sparse_linear_reference(xs[0].float(), weight.float(), bias.float(), True)
    error = ((y.float() - want).norm() / want.norm()).item()

    fns = {
        "dense": lambda: F.linear(next_x(), weight, bias),
        "gemm": lambda: torch.ops.rt_lynx.sparse_mm(next_c(), weight, mp),
        "lynx": lambda: cusparselt.sparse_linear(next_x(), weight, bias, True),
        "reference": lambda: sparse_linear_reference(next_x(), weight, bias, True),
        "sparsify": lambda: torch.ops.rt_lynx.sparsify_compress(next_x(), mp),
        "epilogue": lambda: torch.ops.rt_lynx.scale_bias_epilogue(gemm_out, scale, bias, M),
    }
    row = {"M": M, "K": K, "N": N, "rel_error": error}
    for name, fn in fns.items():
        n_calls = max(2, calls // 4) if name == "reference" else calls
        row[f"{name}_eager_us"] = eager_us(fn, n_calls, repeats)
        row[f"{name}_kernel_us"] = graph_us(fn, n_calls, repeats)
    sparsify_bytes = M * K * 2 + mp * K * 9 // 8 + mp * 4
    epilogue_bytes = 2 * M * N * 2
    row["sparsify_floor_us"] = sparsify_bytes / (bandwidth * 1e12) * 1e6
    row["epilogue_floor_us"] = epilogue_bytes / (bandwidth * 1e12) * 1e6
    row["dense_tflops"] = 2 * M * N * K / (row["dense_kernel_us"] * 1e-6) / 1e12
    row["gemm_tflops"] = 2 * M * N * K / (row["gemm_kernel_us"] * 1e-6) / 1e12
    return row


def git_commit():
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "kernels", "bench"],
                               cwd=ROOT, text=True, capture_output=True).stdout.strip()
        return head + ("+uncommitted" if dirty else "")
    except Exception:
        return "uncommitted"


def geometric_mean(values):
    values = list(values)
    product = 1.0
    for v in values:
        product *= v
    return product ** (1 / len(values)) if values else float("nan")


def markdown(rows, meta):
    lines = [
        f"# RT-Lynx kernels, {meta['gpu']}, {meta['date']}",
        "",
        f"torch {meta['torch']}, cuSPARSELt {meta['cusparselt']}, commit {meta['commit']}, "
        f"copy bandwidth {meta['copy_tbs']:.2f} TB/s (read+write). bf16, bias, compensation on.",
        "Times in us. eager = host clock over back-to-back calls + sync (median); kernel = CUDA "
        "graph replay (median). x = F.linear time / this path's time.",
        "",
        "| model | layer | M | K | N | dense eager | lynx eager | x eager | dense kernel | gemm kernel"
        " | x gemm | lynx kernel | x lynx | ref eager | sparsify (floor) | epilogue (floor) | rel err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['layer']} | {r['M']} | {r['K']} | {r['N']} | "
            f"{r['dense_eager_us']:.0f} | {r['lynx_eager_us']:.0f} | "
            f"{r['dense_eager_us'] / r['lynx_eager_us']:.2f} | {r['dense_kernel_us']:.0f} | "
            f"{r['gemm_kernel_us']:.0f} | {r['dense_kernel_us'] / r['gemm_kernel_us']:.2f} | "
            f"{r['lynx_kernel_us']:.0f} | {r['dense_kernel_us'] / r['lynx_kernel_us']:.2f} | "
            f"{r['reference_eager_us']:.0f} | {r['sparsify_kernel_us']:.1f} "
            f"({r['sparsify_floor_us']:.1f}) | {r['epilogue_kernel_us']:.1f} "
            f"({r['epilogue_floor_us']:.1f}) | {r['rel_error']:.1e} |")
    lines.append("")
    for model in sorted({r["model"] for r in rows}):
        sub = [r for r in rows if r["model"] == model]
        lines.append(
            f"- {model}: lynx vs F.linear, eager: mean x{statistics.mean(r['dense_eager_us'] / r['lynx_eager_us'] for r in sub):.2f}"
            f" (geomean x{geometric_mean(r['dense_eager_us'] / r['lynx_eager_us'] for r in sub):.2f});"
            f" kernel: mean x{statistics.mean(r['dense_kernel_us'] / r['lynx_kernel_us'] for r in sub):.2f};"
            f" GEMM alone kernel: mean x{statistics.mean(r['dense_kernel_us'] / r['gemm_kernel_us'] for r in sub):.2f}")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls and repeats")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark")
        return 1
    started = time.monotonic()
    available, reason = cusparselt.availability(torch.device("cuda"))
    print(f"fast path: {available} ({reason}); build+self-test {time.monotonic() - started:.1f} s",
          flush=True)
    if not available:
        return 1
    calls, repeats = (10, 3) if args.quick else (20, 5)
    bandwidth = copy_bandwidth_tbs()
    ext_versions = cusparselt.extension().cusparselt_versions()
    meta = {
        "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cusparselt": ".".join(map(str, ext_versions[:3])),
        "commit": git_commit(),
        "copy_tbs": bandwidth,
        "calls": calls, "repeats": repeats,
    }
    rows = []
    for model, layer, M, K, N in SHAPES:
        row = {"model": model, "layer": layer, **bench_shape(M, K, N, calls, repeats, bandwidth)}
        rows.append(row)
        print(f"{model} {layer} {M}x{K}x{N}: dense {row['dense_eager_us']:.0f}/{row['dense_kernel_us']:.0f} us,"
              f" gemm {row['gemm_kernel_us']:.0f}, lynx {row['lynx_eager_us']:.0f}/{row['lynx_kernel_us']:.0f},"
              f" sparsify {row['sparsify_kernel_us']:.1f} (floor {row['sparsify_floor_us']:.1f}),"
              f" epilogue {row['epilogue_kernel_us']:.1f}, err {row['rel_error']:.1e}", flush=True)
    meta["plans"] = [list(p) for p in cusparselt.plan_info()]
    text = markdown(rows, meta)
    print(text)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu_tag = meta["gpu"].replace(" ", "_").replace("/", "_")
    stem = out / f"kernels-{meta['date']}-{gpu_tag}"
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
