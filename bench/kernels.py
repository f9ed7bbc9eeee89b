"""Build, check and time the RT-Lynx fast path against cuBLAS on FLUX.1-dev / Qwen-Image shapes.

For every (M, K, N), bf16, bias on, compensation on:
  dense      F.linear(x, W, b)                      (cuBLAS, bias fused)
  gemm       torch.ops.rt_lynx.sparse_mm            (our cuSPARSELt binding, input pre-compressed)
  lynx       cusparselt.sparse_linear               (scaled sparsify+compress, GEMM, bias pass;
                                                     the orientation the self-test chose)
  lynx_other the same with the other operand (A <-> B), kernel time only
  lynx_nob   the same without bias (no pass after the GEMM), kernel time only
  reference  reference.sparse_linear_reference      (plain PyTorch, eager only)
  sparsify   torch.ops.rt_lynx.sparsify_compress_scaled  (auto split, vs the memory floor)
  sparsify1  the same with one warp per row pair (the v1 grid), kernel time only
Two clocks: eager wall time (host clock around N back-to-back calls and a sync, median of
repeats) and kernel time (CUDA graph of N calls, replayed, device events, median).
With a previous results JSON (--previous), the table adds lynx eager/kernel speed-ups over it.

With --fp8 (a separate table, file suffix -fp8), per shape, bf16 x, bias, compensation on:
  dense       F.linear (bf16 cuBLAS)
  fp8d_gemm   torch._scaled_mm, e4m3 x per token + W per channel (rowwise scales), bias, bf16
              out; inputs quantised beforehand (the dense fp8 GEMM alone)
  fp8d_linear the same with x's per-token quantisation in the timed call (plain torch ops)
  sp8_gemm    torch.ops.rt_lynx.sparse_mm_fp8 (our cuSPARSELt e4m3 2:4 GEMM, input compressed)
  sparsify8   torch.ops.rt_lynx.sparsify_fp8
  lynx8       fp8.sparse_linear_fp8 (sparsify+quantise, e4m3 2:4 GEMM, scales+bias epilogue)
  lynx16      cusparselt.sparse_linear (the bf16 Lynx path), kernel time only

Usage: python bench/kernels.py [--quick] [--fp8] [--out DIR] [--suffix -v2] [--previous FILE.json]
"""
import argparse
import datetime
import json
import logging
import pathlib
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from standalone import load_pack  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from common import eager_us, git_commit, graph_us  # noqa: E402

load_pack()
from rt_lynx_pack.kernels import cusparselt  # noqa: E402
from rt_lynx_pack.kernels import fp8  # noqa: E402
from rt_lynx_pack.kernels.reference import (quantize_weight_fp8, sparse_linear_fp8_reference,  # noqa: E402
                                            sparse_linear_reference)

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

    # Correctness of what is timed (fresh inputs, fp32 math on the same sparsified input).
    y = cusparselt.sparse_linear(xs[0], weight, bias, True)
    want = sparse_linear_reference(xs[0].float(), weight.float(), bias.float(), True)
    error = ((y.float() - want).norm() / want.norm()).item()

    fns = {
        "dense": lambda: F.linear(next_x(), weight, bias),
        "gemm": lambda: torch.ops.rt_lynx.sparse_mm(next_c(), weight, mp),
        "lynx": lambda: cusparselt.sparse_linear(next_x(), weight, bias, True),
        "reference": lambda: sparse_linear_reference(next_x(), weight, bias, True),
        "sparsify": lambda: torch.ops.rt_lynx.sparsify_compress_scaled(next_x(), mp, 0),
    }
    kernel_only = {
        "sparsify1": lambda: torch.ops.rt_lynx.sparsify_compress_scaled(next_x(), mp, 1),
        "lynx_nob": lambda: cusparselt.sparse_linear(next_x(), weight, None, True),
    }
    row = {"M": M, "K": K, "N": N, "rel_error": error,
           "split": cusparselt.extension().sparsify_split_for(mp, K),
           "operand": cusparselt.sparse_operand()}
    for name, fn in fns.items():
        n_calls = max(2, calls // 4) if name == "reference" else calls
        row[f"{name}_eager_us"] = eager_us(fn, n_calls, repeats)
        if name != "reference":
            row[f"{name}_kernel_us"] = graph_us(fn, n_calls, repeats)
    for name, fn in kernel_only.items():
        row[f"{name}_kernel_us"] = graph_us(fn, calls, repeats)
    other = "A" if row["operand"] == "B" else "B"  # the other orientation, for comparison
    cusparselt.set_sparse_operand(other)
    try:
        row["lynx_other_kernel_us"] = graph_us(
            lambda: cusparselt.sparse_linear(next_x(), weight, bias, True), calls, repeats)
    finally:
        cusparselt.set_sparse_operand(row["operand"])
    sparsify_bytes = M * K * 2 + mp * K * 9 // 8 + mp * 4
    row["sparsify_floor_us"] = sparsify_bytes / (bandwidth * 1e12) * 1e6
    row["dense_tflops"] = 2 * M * N * K / (row["dense_kernel_us"] * 1e-6) / 1e12
    row["gemm_tflops"] = 2 * M * N * K / (row["gemm_kernel_us"] * 1e-6) / 1e12
    return row


def quantize_rows_fp8(x):
    """Per-token e4m3 quantisation for the dense fp8 baseline: (xq, scale (M x 1) fp32)."""
    amax = x.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12)
    return (x.float() * (448.0 / amax)).to(torch.float8_e4m3fn), amax / 448.0


def bench_shape_fp8(M, K, N, calls, repeats):
    dtype = torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(M * 7 + K * 3 + N)
    xs = [torch.randn(M, K, generator=g, device="cuda").to(dtype) for _ in range(INPUT_SETS)]
    weight = (torch.randn(N, K, generator=g, device="cuda") / K ** 0.5).to(dtype)
    bias = torch.randn(N, generator=g, device="cuda").to(dtype)
    wq, w_scale = quantize_weight_fp8(weight)  # once per weight, as a caller caches it
    w_scale_row = w_scale[None, :].contiguous()
    mp = cusparselt.padded_rows(M)
    compressed = [torch.ops.rt_lynx.sparsify_fp8(x, mp, True, 0)[0] for x in xs]
    quantised = [quantize_rows_fp8(x) for x in xs]
    next_x, next_c, next_q = rotating(xs), rotating(compressed), rotating(quantised)

    y = fp8.sparse_linear_fp8(xs[0], wq, w_scale, bias, True)
    want_q = sparse_linear_fp8_reference(xs[0].float(), wq, w_scale, bias.float(), True)
    want_32 = sparse_linear_reference(xs[0].float(), weight.float(), bias.float(), True)
    row = {"M": M, "K": K, "N": N,
           "err_vs_fp8_ref": ((y.float() - want_q).norm() / want_q.norm()).item(),
           "err_vs_fp32": ((y.float() - want_32).norm() / want_32.norm()).item(),
           "split": cusparselt.extension().sparsify_fp8_split_for(mp, K),
           "operand": fp8.fp8_operand()}

    def scaled_mm(xq, sx):
        return torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=w_scale_row,
                                bias=bias if row["fp8d_bias"] else None, out_dtype=dtype)

    try:  # bias fused into the rowwise-scaled GEMM where this torch allows it
        row["fp8d_bias"] = True
        scaled_mm(*quantised[0])
    except RuntimeError as exc:
        print("torch._scaled_mm refuses bias with rowwise scales:", str(exc)[:200])
        row["fp8d_bias"] = False

    def fp8d_gemm():
        xq, sx = next_q()
        return scaled_mm(xq, sx)

    def fp8d_linear():
        return scaled_mm(*quantize_rows_fp8(next_x()))

    fns = {
        "dense": lambda: F.linear(next_x(), weight, bias),
        "fp8d_gemm": fp8d_gemm,
        "fp8d_linear": fp8d_linear,
        "lynx8": lambda: fp8.sparse_linear_fp8(next_x(), wq, w_scale, bias, True),
    }
    kernel_only = {
        "sp8_gemm": lambda: torch.ops.rt_lynx.sparse_mm_fp8(next_c(), wq, mp),
        "sparsify8": lambda: torch.ops.rt_lynx.sparsify_fp8(next_x(), mp, True, 0),
        "lynx16": lambda: cusparselt.sparse_linear(next_x(), weight, bias, True),
    }
    for name, fn in fns.items():
        row[f"{name}_eager_us"] = eager_us(fn, calls, repeats)
        row[f"{name}_kernel_us"] = graph_us(fn, calls, repeats)
    for name, fn in kernel_only.items():
        row[f"{name}_kernel_us"] = graph_us(fn, calls, repeats)
    # Order effect check (NOTES): dense timed again last.
    row["dense_again_kernel_us"] = graph_us(fns["dense"], calls, repeats)
    return row


def markdown_fp8(rows, meta):
    lines = [
        f"# RT-Lynx fp8 (e4m3) kernels, {meta['gpu']}, {meta['date']}",
        "",
        f"torch {meta['torch']}, cuSPARSELt {meta['cusparselt']}, commit {meta['commit']}. "
        "bf16 x, bias, compensation on.",
        f"fp8 path: {meta['availability']}.",
        "Times in us; eager = host clock over back-to-back calls + sync (median), kernel = CUDA "
        "graph replay (median). dense = bf16 F.linear; fp8d gemm = torch._scaled_mm rowwise "
        "(x per token, W per channel, bias fused) on pre-quantised x; fp8d lin = the same with "
        "x's quantisation (plain torch ops) in the call; sp8 gemm = our e4m3 2:4 cuSPARSELt GEMM "
        "alone; lynx8 = full fp8 Lynx linear (sparsify+quantise, GEMM, scale+bias epilogue); "
        "lynx16 = the bf16 Lynx linear. x = other time / lynx8 time (same clock).",
        "",
        "| layer | M | K | N | dense eager | fp8d lin eager | lynx8 eager | x dense eager | x fp8d lin eager"
        " | dense kernel | fp8d gemm kernel | fp8d lin kernel | sp8 gemm kernel | sparsify8 | lynx8 kernel"
        " | lynx16 kernel | x dense kernel | x fp8d gemm kernel | x fp8d lin kernel | err vs fp8 ref | err vs fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} {r['layer']} | {r['M']} | {r['K']} | {r['N']} | {r['dense_eager_us']:.0f} | "
            f"{r['fp8d_linear_eager_us']:.0f} | {r['lynx8_eager_us']:.0f} | "
            f"{r['dense_eager_us'] / r['lynx8_eager_us']:.2f} | {r['fp8d_linear_eager_us'] / r['lynx8_eager_us']:.2f} | "
            f"{r['dense_kernel_us']:.0f} ({r['dense_again_kernel_us']:.0f}) | {r['fp8d_gemm_kernel_us']:.0f} | "
            f"{r['fp8d_linear_kernel_us']:.0f} | {r['sp8_gemm_kernel_us']:.0f} | {r['sparsify8_kernel_us']:.1f} | "
            f"{r['lynx8_kernel_us']:.0f} | {r['lynx16_kernel_us']:.0f} | "
            f"{r['dense_kernel_us'] / r['lynx8_kernel_us']:.2f} | {r['fp8d_gemm_kernel_us'] / r['lynx8_kernel_us']:.2f} | "
            f"{r['fp8d_linear_kernel_us'] / r['lynx8_kernel_us']:.2f} | {r['err_vs_fp8_ref']:.1e} | {r['err_vs_fp32']:.1e} |")
    lines.append("")
    for model in sorted({r["model"] for r in rows}):
        sub = [r for r in rows if r["model"] == model]

        def mean(key_a, key_b):
            return statistics.mean(r[key_a] / r[key_b] for r in sub)
        lines.append(
            f"- {model}: lynx8 vs bf16 F.linear: eager mean x{mean('dense_eager_us', 'lynx8_eager_us'):.2f}, "
            f"kernel mean x{mean('dense_kernel_us', 'lynx8_kernel_us'):.2f}; vs fp8 dense GEMM alone: kernel mean "
            f"x{mean('fp8d_gemm_kernel_us', 'lynx8_kernel_us'):.2f}; vs fp8 dense linear: eager mean "
            f"x{mean('fp8d_linear_eager_us', 'lynx8_eager_us'):.2f}, kernel mean x{mean('fp8d_linear_kernel_us', 'lynx8_kernel_us'):.2f}; "
            f"sp8 GEMM alone vs fp8 dense GEMM: x{mean('fp8d_gemm_kernel_us', 'sp8_gemm_kernel_us'):.2f}, vs bf16: "
            f"x{mean('dense_kernel_us', 'sp8_gemm_kernel_us'):.2f}")
    lines.append(f"- max rel err vs the fp8 reference: {max(r['err_vs_fp8_ref'] for r in rows):.1e}; "
                 f"vs fp32 math on the unquantised sparsified input: {max(r['err_vs_fp32'] for r in rows):.1e}")
    return "\n".join(lines) + "\n"


def geometric_mean(values):
    values = list(values)
    product = 1.0
    for v in values:
        product *= v
    return product ** (1 / len(values)) if values else float("nan")


def markdown(rows, meta, previous):
    lines = [
        f"# RT-Lynx kernels, {meta['gpu']}, {meta['date']}",
        "",
        f"torch {meta['torch']}, cuSPARSELt {meta['cusparselt']}, commit {meta['commit']}, "
        f"copy bandwidth {meta['copy_tbs']:.2f} TB/s (read+write). bf16, bias, compensation on.",
        f"Fast path: {meta['availability']}.",
        "Times in us. eager = host clock over back-to-back calls + sync (median); kernel = CUDA "
        "graph replay (median). x = F.linear time / this path's time. lynx = scale folded into "
        "the sparsify pass, bias in a pass over Y; other op = the same with the other structured operand; no bias = "
        "lynx without bias (sparsify + GEMM only). sparsify: auto split (warps per row pair) vs one warp per row "
        "pair (split 1) vs the memory floor."
        + (f" vs v1 = v1 lynx time / this lynx time ({previous['name']})." if previous else ""),
        "",
        "| model | layer | M | K | N | dense eager | lynx eager | x eager | dense kernel | gemm kernel"
        " | x gemm | lynx kernel | x lynx | other op kernel | no bias kernel | vs v1 eager | vs v1 kernel | ref eager"
        " | sparsify split: us (split 1) (floor) | rel err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    old_rows = {(r["M"], r["K"], r["N"]): r for r in previous["rows"]} if previous else {}
    for r in rows:
        old = old_rows.get((r["M"], r["K"], r["N"]))
        vs_eager = f"{old['lynx_eager_us'] / r['lynx_eager_us']:.2f}" if old else "-"
        vs_kernel = f"{old['lynx_kernel_us'] / r['lynx_kernel_us']:.2f}" if old else "-"
        lynx_a = f"{r['lynx_other_kernel_us']:.0f} ({'A' if r['operand'] == 'B' else 'B'})"
        lines.append(
            f"| {r['model']} | {r['layer']} | {r['M']} | {r['K']} | {r['N']} | "
            f"{r['dense_eager_us']:.0f} | {r['lynx_eager_us']:.0f} | "
            f"{r['dense_eager_us'] / r['lynx_eager_us']:.2f} | {r['dense_kernel_us']:.0f} | "
            f"{r['gemm_kernel_us']:.0f} | {r['dense_kernel_us'] / r['gemm_kernel_us']:.2f} | "
            f"{r['lynx_kernel_us']:.0f} | {r['dense_kernel_us'] / r['lynx_kernel_us']:.2f} | "
            f"{lynx_a} | {r['lynx_nob_kernel_us']:.0f} | {vs_eager} | {vs_kernel} | "
            f"{r['reference_eager_us']:.0f} | {r['split']}: {r['sparsify_kernel_us']:.1f} "
            f"({r['sparsify1_kernel_us']:.1f}) ({r['sparsify_floor_us']:.1f}) | "
            f"{r['rel_error']:.1e} |")
    lines.append("")
    for model in sorted({r["model"] for r in rows}):
        sub = [r for r in rows if r["model"] == model]
        line = (
            f"- {model}: lynx vs F.linear, eager: mean x{statistics.mean(r['dense_eager_us'] / r['lynx_eager_us'] for r in sub):.2f}"
            f" (geomean x{geometric_mean(r['dense_eager_us'] / r['lynx_eager_us'] for r in sub):.2f});"
            f" kernel: mean x{statistics.mean(r['dense_kernel_us'] / r['lynx_kernel_us'] for r in sub):.2f};"
            f" GEMM alone kernel: mean x{statistics.mean(r['dense_kernel_us'] / r['gemm_kernel_us'] for r in sub):.2f}")
        matched = [(r, old_rows[(r["M"], r["K"], r["N"])]) for r in sub
                   if (r["M"], r["K"], r["N"]) in old_rows]
        if matched:
            line += (f"; vs v1: eager mean x{statistics.mean(o['lynx_eager_us'] / r['lynx_eager_us'] for r, o in matched):.2f},"
                     f" kernel mean x{statistics.mean(o['lynx_kernel_us'] / r['lynx_kernel_us'] for r, o in matched):.2f}")
        lines.append(line)
    lines.append(f"- max rel err vs fp32 math over these shapes: {max(r['rel_error'] for r in rows):.1e}")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls and repeats")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--suffix", default="", help="appended to the results file names")
    parser.add_argument("--previous", default="", help="results JSON of an earlier version")
    parser.add_argument("--fp8", action="store_true", help="the fp8 table instead of the bf16 one")
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
    if args.fp8:
        return main_fp8(args, calls, repeats)
    bandwidth = copy_bandwidth_tbs()
    ext_versions = cusparselt.extension().cusparselt_versions()
    meta = {
        "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cusparselt": ".".join(map(str, ext_versions[:3])),
        "commit": git_commit(),
        "copy_tbs": bandwidth,
        "availability": reason,
        "calls": calls, "repeats": repeats,
    }
    rows = []
    for model, layer, M, K, N in SHAPES:
        row = {"model": model, "layer": layer, **bench_shape(M, K, N, calls, repeats, bandwidth)}
        rows.append(row)
        print(f"{model} {layer} {M}x{K}x{N}: dense {row['dense_eager_us']:.0f}/{row['dense_kernel_us']:.0f} us,"
              f" gemm {row['gemm_kernel_us']:.0f}, lynx {row['lynx_eager_us']:.0f}/{row['lynx_kernel_us']:.0f},"
              f" sparsify {row['sparsify_kernel_us']:.1f} (split 1: {row['sparsify1_kernel_us']:.1f},"
              f" floor {row['sparsify_floor_us']:.1f}), err {row['rel_error']:.1e}", flush=True)
    meta["plans"] = [list(p) for p in cusparselt.plan_info()]
    previous = None
    if args.previous and pathlib.Path(args.previous).exists():
        previous = json.loads(pathlib.Path(args.previous).read_text())
        previous["name"] = pathlib.Path(args.previous).name
    text = markdown(rows, meta, previous)
    print(text)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu_tag = meta["gpu"].replace(" ", "_").replace("/", "_")
    stem = out / f"kernels-{meta['date']}-{gpu_tag}{args.suffix}"
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {stem}.md and .json")
    return 0


def main_fp8(args, calls, repeats):
    available, reason = fp8.availability_fp8(torch.device("cuda"))
    print(f"fp8 path: {available} ({reason})", flush=True)
    if not available:
        return 1
    meta = {
        "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cusparselt": ".".join(map(str, cusparselt.extension().cusparselt_versions()[:3])),
        "commit": git_commit(),
        "availability": reason,
        "calls": calls, "repeats": repeats,
    }
    rows = []
    for model, layer, M, K, N in SHAPES:
        row = {"model": model, "layer": layer, **bench_shape_fp8(M, K, N, calls, repeats)}
        rows.append(row)
        print(f"{model} {layer} {M}x{K}x{N}: dense {row['dense_eager_us']:.0f}/{row['dense_kernel_us']:.0f},"
              f" fp8d gemm {row['fp8d_gemm_kernel_us']:.0f}, sp8 gemm {row['sp8_gemm_kernel_us']:.0f},"
              f" sparsify8 {row['sparsify8_kernel_us']:.1f}, lynx8 {row['lynx8_eager_us']:.0f}/{row['lynx8_kernel_us']:.0f},"
              f" lynx16 {row['lynx16_kernel_us']:.0f}, err {row['err_vs_fp8_ref']:.1e}/{row['err_vs_fp32']:.1e}",
              flush=True)
    meta["plans"] = [list(p) for p in cusparselt.plan_info()]
    text = markdown_fp8(rows, meta)
    print(text)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu_tag = meta["gpu"].replace(" ", "_").replace("/", "_")
    stem = out / f"kernels-{meta['date']}-{gpu_tag}{args.suffix or '-fp8'}"
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
