"""Build, check and time the RT-Lynx fast paths against cuBLAS on FLUX.1-dev / Qwen-Image shapes.

For every (M, K, N), bf16, bias on, compensation on:
  dense      F.linear(x, W, b)                      (cuBLAS, bias fused)
  sm90       sm90.sparse_linear_sm90                (stage 2: sparsify pass, CUTLASS sm90 sparse
                                                     GEMM with scale and bias in its epilogue)
  sm90_gemm  torch.ops.rt_lynx.sparse_mm_sm90       (that GEMM alone, epilogue included, input
                                                     pre-compressed, the config sm90 chose)
  sm90_sparsify torch.ops.rt_lynx.sparsify_sm90     (one read of x; vs the memory floor)
  cslt       cusparselt.sparse_linear               (stage 1: scaled sparsify+compress, cuSPARSELt
                                                     GEMM, bias pass)
  cslt_gemm  torch.ops.rt_lynx.sparse_mm            (the cuSPARSELt GEMM alone, no scale or bias)
  cslt_nob   stage 1 without bias (no pass after the GEMM), kernel time only
  reference  reference.sparse_linear_reference      (plain PyTorch, eager only)
The JSON also holds the time of every sm90 GEMM config for the shape (what the tuner saw).
Two clocks: eager wall time (host clock around N back-to-back calls and a sync, median of
repeats) and kernel time (CUDA graph of N calls, replayed, device events, median). The variants
of a shape take turns within every repeat, so a clock drift during the run shifts them alike.
With a previous results JSON (--previous), the table adds the speed-up of the default path over
that file's.

With --fp8 (a separate table, file suffix -fp8), per shape, bf16 x, bias, compensation on:
  dense       F.linear (bf16 cuBLAS)
  fp8d_gemm   torch._scaled_mm, e4m3 x per token + W per channel (rowwise scales), bias, bf16
              out; inputs quantised beforehand (the dense fp8 GEMM alone), accumulating as the
              product does (fp8_dense.FAST_ACCUMULATION)
  fp8d_gemm_promoting  the same with torch's default accumulation (sums moved to fp32 registers
              every few k-steps), kernel time only
  fp8d_linear the same with x's per-token quantisation in the timed call (plain torch ops)
  fp8d_ours   fp8_dense.dense_linear_fp8: our one-read quantise pass + that GEMM (what the layers an
              fp8 model keeps dense run)
  quant8      torch.ops.rt_lynx.quantize_rows_fp8 alone
  lynx8       sm90.sparse_linear_fp8_sm90 (sparsify+quantise pass, CUTLASS e4m3 2:4 GEMM with
              the token scale, channel scale and bias in its epilogue)
  sp8_gemm    that GEMM alone (input compressed)
  sparsify8   torch.ops.rt_lynx.sparsify_sm90 for e4m3
  lynx8_cslt  fp8.sparse_linear_fp8 (stage 1: cuSPARSELt e4m3 GEMM, scales+bias pass)
  lynx16      sm90.sparse_linear_sm90 (the bf16 Lynx path), kernel time only

Usage: python bench/kernels.py [--quick] [--fp8] [--out DIR] [--suffix -v2] [--previous FILE.json]
"""
import argparse
import datetime
import functools
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
from common import (INPUT_SETS, LINEAR_SHAPES as SHAPES, eager_us, git_commit, graph_us,  # noqa: E402
                    interleaved_eager_us, interleaved_kernel_us, rotating, write_results)

load_pack()
from rt_lynx_pack.kernels import cusparselt  # noqa: E402
from rt_lynx_pack.kernels import fp8  # noqa: E402
from rt_lynx_pack.kernels import fp8_dense  # noqa: E402
from rt_lynx_pack.kernels import sm90  # noqa: E402
from rt_lynx_pack.kernels.reference import (dense_linear_fp8_reference, quantize_weight_fp8,  # noqa: E402
                                            sparse_linear_fp8_reference, sparse_linear_reference)


def copy_bandwidth_tbs():
    """Device-to-device copy, bytes read + written per second (the practical memory ceiling)."""
    src = torch.randn(256 * 1024 * 1024, device="cuda", dtype=torch.float16)
    dst = torch.empty_like(src)
    us = graph_us(lambda: dst.copy_(src), 5, 5)
    return 2 * src.numel() * 2 / (us * 1e-6) / 1e12


# The "_chunks" variants run the sm90 sparsify pass that loops over column chunks (the pass before
# the staged one; sm90.staged_sparsify), timed in turns with the default.
CHUNK_PASS_CONTEXTS = {name: (lambda: sm90.staged_sparsify(False))
                       for name in ("sm90_sparsify_chunks", "sm90_chunks", "sparsify8_chunks", "lynx8_chunks")}


def sm90_config_times(x, weight, bias, e4m3, calls, repeats, w_scale=None):
    """Kernel time of every sm90 GEMM config on one compressed input, the configs taking turns
    within every repeat: {config name: us, or why it failed}."""
    dtype = x.dtype
    configs = sm90.config_info(weight.dtype)
    inputs = {block: torch.ops.rt_lynx.sparsify_sm90(x, block, e4m3, True) for _, _, _, block, _, _ in configs}
    fns, failed = {}, {}
    for _, _, _, block, index, name in configs:
        compressed, scale = inputs[block]

        def gemm(compressed=compressed, scale=scale, index=index):
            return torch.ops.rt_lynx.sparse_mm_sm90(compressed, weight, scale, w_scale, bias, x.shape[0], index, dtype)
        try:
            gemm()
            fns[name] = gemm
        except RuntimeError as exc:
            failed[name] = f"failed: {str(exc)[:120]}"
    return {**interleaved_kernel_us(fns, calls, repeats), **failed}


def chosen_sm90_config(M, K, N, element):
    for rows, k, n, name, config, _, k_ext, residual in sm90.plan_info():
        if (rows, k, n, name, k_ext, residual) == (M, K, N, element, 0, False):
            return config
    raise RuntimeError(f"no sm90 plan for {M}x{K}x{N} {element}")


def bench_shape(M, K, N, calls, repeats, bandwidth):
    dtype = torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(M * 7 + K * 3 + N)
    xs = [torch.randn(M, K, generator=g, device="cuda").to(dtype) for _ in range(INPUT_SETS)]
    weight = (torch.randn(N, K, generator=g, device="cuda") / K ** 0.5).to(dtype)
    bias = torch.randn(N, generator=g, device="cuda").to(dtype)
    mp = cusparselt.padded_rows(M)
    compressed = [torch.ops.rt_lynx.sparsify_compress(x, mp)[0] for x in xs]
    next_x, next_c = rotating(xs), rotating(compressed)

    # Correctness of what is timed (fresh inputs, fp32 math on the same sparsified input); the
    # first sm90 call also picks its config.
    want = sparse_linear_reference(xs[0].float(), weight.float(), bias.float(), True)
    errors = {}
    for name, fn in (("sm90", sm90.sparse_linear_sm90), ("cslt", cusparselt.sparse_linear)):
        y = fn(xs[0], weight, bias, True)
        errors[name] = ((y.float() - want).norm() / want.norm()).item()
    config = chosen_sm90_config(M, K, N, "bf16")
    block = sm90.config_info(dtype)[config][3]
    compressed90 = [torch.ops.rt_lynx.sparsify_sm90(x, block, False, True) for x in xs]
    next_c90 = rotating(compressed90)

    def sm90_gemm():
        c, scale = next_c90()
        return torch.ops.rt_lynx.sparse_mm_sm90(c, weight, scale, None, bias, M, config, dtype)

    fns = {
        "dense": lambda: F.linear(next_x(), weight, bias),
        "sm90": lambda: sm90.sparse_linear_sm90(next_x(), weight, bias, True),
        "cslt": lambda: cusparselt.sparse_linear(next_x(), weight, bias, True),
        "reference": lambda: sparse_linear_reference(next_x(), weight, bias, True),
    }
    kernel_only = {
        "sm90_gemm": sm90_gemm,
        "sm90_sparsify": lambda: torch.ops.rt_lynx.sparsify_sm90(next_x(), block, False, True),
        "sm90_sparsify_chunks": lambda: torch.ops.rt_lynx.sparsify_sm90(next_x(), block, False, True),
        "sm90_chunks": lambda: sm90.sparse_linear_sm90(next_x(), weight, bias, True),
        "cslt_gemm": lambda: torch.ops.rt_lynx.sparse_mm(next_c(), weight, mp),
        "cslt_nob": lambda: cusparselt.sparse_linear(next_x(), weight, None, True),
    }
    row = {"M": M, "K": K, "N": N, "rel_error": errors["sm90"], "cslt_rel_error": errors["cslt"],
           "sm90_config": sm90.config_info(dtype)[config][5]}
    reference = fns.pop("reference")
    time_side_by_side(row, fns, kernel_only, calls, repeats, CHUNK_PASS_CONTEXTS)
    row["reference_eager_us"] = eager_us(reference, max(2, calls // 4), repeats)
    row["sm90_configs_us"] = sm90_config_times(xs[0], weight, bias, False, calls, repeats)
    sparsify_bytes = M * K * 2 + mp * K * 9 // 8 + mp * 4   # read x once, write values+metadata+scale
    row["sparsify_floor_us"] = sparsify_bytes / (bandwidth * 1e12) * 1e6
    row["dense_tflops"] = 2 * M * N * K / (row["dense_kernel_us"] * 1e-6) / 1e12
    row["sm90_gemm_tflops"] = 2 * M * N * K / (row["sm90_gemm_kernel_us"] * 1e-6) / 1e12
    return row


def time_side_by_side(row, fns, kernel_only, calls, repeats, contexts=None):
    """row[name_eager_us] for fns and row[name_kernel_us] for fns and kernel_only, the variants
    taking turns within every repeat (bench/common.py), so a clock drift shifts them alike;
    contexts: {kernel-only name: context its graph is captured in}."""
    for name, us in interleaved_eager_us(fns, calls, repeats).items():
        row[f"{name}_eager_us"] = us
    for name, us in interleaved_kernel_us({**fns, **kernel_only}, calls, repeats, contexts).items():
        row[f"{name}_kernel_us"] = us


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
    quantised = [quantize_rows_fp8(x) for x in xs]
    next_x, next_q = rotating(xs), rotating(quantised)

    want_q = sparse_linear_fp8_reference(xs[0].float(), wq, w_scale, bias.float(), True)
    want_32 = sparse_linear_reference(xs[0].float(), weight.float(), bias.float(), True)
    y = sm90.sparse_linear_fp8_sm90(xs[0], wq, w_scale, bias, True)
    y_cslt = fp8.sparse_linear_fp8(xs[0], wq, w_scale, bias, True)
    row = {"M": M, "K": K, "N": N,
           "err_vs_fp8_ref": ((y.float() - want_q).norm() / want_q.norm()).item(),
           "err_vs_fp32": ((y.float() - want_32).norm() / want_32.norm()).item(),
           "cslt_err_vs_fp8_ref": ((y_cslt.float() - want_q).norm() / want_q.norm()).item()}
    want_d = dense_linear_fp8_reference(xs[0].float(), wq, w_scale, bias.float())
    y_d = fp8_dense.dense_linear_fp8(xs[0], wq, w_scale, bias)
    row["fp8d_ours_err_vs_fp8_ref"] = ((y_d.float() - want_d).norm() / want_d.norm()).item()
    config = chosen_sm90_config(M, K, N, "e4m3")
    row["sm90_config"] = sm90.config_info(torch.float8_e4m3fn)[config][5]
    compressed = [torch.ops.rt_lynx.sparsify_sm90(x, 128, True, True) for x in xs]
    next_c = rotating(compressed)

    def scaled_mm(xq, sx, fast_accumulation=fp8_dense.FAST_ACCUMULATION):
        return torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=w_scale_row,
                                bias=bias if row["fp8d_bias"] else None, out_dtype=dtype,
                                use_fast_accum=fast_accumulation)

    try:  # bias fused into the rowwise-scaled GEMM where this torch allows it
        row["fp8d_bias"] = True
        scaled_mm(*quantised[0])
    except RuntimeError as exc:
        print("torch._scaled_mm refuses bias with rowwise scales:", str(exc)[:200])
        row["fp8d_bias"] = False

    def fp8d_gemm():
        xq, sx = next_q()
        return scaled_mm(xq, sx)

    def fp8d_gemm_promoting():
        xq, sx = next_q()
        return scaled_mm(xq, sx, fast_accumulation=False)

    def fp8d_linear():
        return scaled_mm(*quantize_rows_fp8(next_x()))

    def sp8_gemm():
        c, a = next_c()
        return torch.ops.rt_lynx.sparse_mm_sm90(c, wq, a, w_scale, bias, M, config, dtype)

    fns = {
        "dense": lambda: F.linear(next_x(), weight, bias),
        "fp8d_gemm": fp8d_gemm,
        "fp8d_linear": fp8d_linear,
        "fp8d_ours": lambda: fp8_dense.dense_linear_fp8(next_x(), wq, w_scale, bias),
        "lynx8": lambda: sm90.sparse_linear_fp8_sm90(next_x(), wq, w_scale, bias, True),
        "lynx8_cslt": lambda: fp8.sparse_linear_fp8(next_x(), wq, w_scale, bias, True),
    }
    kernel_only = {
        "sp8_gemm": sp8_gemm,
        "fp8d_gemm_promoting": fp8d_gemm_promoting,
        "sparsify8": lambda: torch.ops.rt_lynx.sparsify_sm90(next_x(), 128, True, True),
        "quant8": lambda: torch.ops.rt_lynx.quantize_rows_fp8(next_x()),
        "sparsify8_chunks": lambda: torch.ops.rt_lynx.sparsify_sm90(next_x(), 128, True, True),
        "lynx8_chunks": lambda: sm90.sparse_linear_fp8_sm90(next_x(), wq, w_scale, bias, True),
        "lynx16": lambda: sm90.sparse_linear_sm90(next_x(), weight, bias, True),
    }
    time_side_by_side(row, fns, kernel_only, calls, repeats, CHUNK_PASS_CONTEXTS)
    row["sm90_configs_us"] = sm90_config_times(xs[0], wq, bias, True, calls, repeats, w_scale)
    return row


def markdown_fp8(rows, meta):
    lines = [
        f"# RT-Lynx fp8 (e4m3) kernels, {meta['gpu']}, {meta['date']}",
        "",
        f"torch {meta['torch']}, cuSPARSELt {meta['cusparselt']}, commit {meta['commit']}. "
        "bf16 x, bias, compensation on.",
        f"fp8 path: {meta['availability']}.",
        "Times in us; eager = host clock over back-to-back calls + sync (median), kernel = CUDA "
        "graph replay (median), the variants taking turns within every repeat. dense = bf16 F.linear; fp8d gemm = "
        "torch._scaled_mm rowwise (x per token, W per channel, bias fused) on pre-quantised x, accumulating "
        f"{'in the tensor cores (use_fast_accum)' if meta['fp8d_fast_accumulation'] else 'as torch does by default'}; "
        "promoting = the same with torch's default accumulation (sums moved to fp32 registers every few "
        "k-steps); fp8d lin = "
        "the same with x's quantisation (plain torch ops) in the call; fp8d ours = our one-read quantise pass "
        "(quant8) + that GEMM, what layers an fp8 model keeps dense run; lynx8 = full fp8 Lynx linear "
        "(sparsify+quantise pass, CUTLASS sm90 e4m3 2:4 GEMM with scales and bias in its epilogue); "
        "sp8 gemm = that GEMM alone; lynx8 cslt = the cuSPARSELt fp8 path (scales+bias pass after the "
        "GEMM); lynx16 = the bf16 Lynx linear; sparsify8 = the sparsify+quantise pass, row pairs staged in registers / "
        "the column-chunk loop; lynx8 chunks = lynx8 with the chunk-loop pass. x = other time / lynx8 time (same clock).",
        "",
        "| layer | M | K | N | dense eager | fp8d lin eager | fp8d ours eager | lynx8 eager | x dense eager"
        " | x fp8d lin eager | dense kernel | fp8d gemm kernel | promoting | fp8d ours kernel | quant8 kernel | sp8 gemm kernel | sparsify8 staged / chunks | lynx8 kernel | x dense kernel"
        " | x fp8d gemm kernel | lynx8 chunks kernel | lynx8 cslt kernel | lynx16 kernel | config | err vs fp8 ref"
        " | err vs fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} {r['layer']} | {r['M']} | {r['K']} | {r['N']} | {r['dense_eager_us']:.0f} | "
            f"{r['fp8d_linear_eager_us']:.0f} | {r['fp8d_ours_eager_us']:.0f} | {r['lynx8_eager_us']:.0f} | "
            f"{r['dense_eager_us'] / r['lynx8_eager_us']:.2f} | {r['fp8d_linear_eager_us'] / r['lynx8_eager_us']:.2f} | "
            f"{r['dense_kernel_us']:.0f} | {r['fp8d_gemm_kernel_us']:.0f} | {r['fp8d_gemm_promoting_kernel_us']:.0f} | "
            f"{r['fp8d_ours_kernel_us']:.0f} | "
            f"{r['quant8_kernel_us']:.1f} | {r['sp8_gemm_kernel_us']:.0f} | {r['sparsify8_kernel_us']:.1f} / {r['sparsify8_chunks_kernel_us']:.1f} | "
            f"{r['lynx8_kernel_us']:.0f} | "
            f"{r['dense_kernel_us'] / r['lynx8_kernel_us']:.2f} | {r['fp8d_gemm_kernel_us'] / r['lynx8_kernel_us']:.2f} | "
            f"{r['lynx8_chunks_kernel_us']:.0f} | "
            f"{r['lynx8_cslt_kernel_us']:.0f} | {r['lynx16_kernel_us']:.0f} | {r['sm90_config']} | "
            f"{r['err_vs_fp8_ref']:.1e} | {r['err_vs_fp32']:.1e} |")
    lines.append("")
    for model in sorted({r["model"] for r in rows}):
        sub = [r for r in rows if r["model"] == model]
        mean = functools.partial(mean_ratio, sub)
        lines.append(
            f"- {model}: lynx8 vs bf16 F.linear: eager mean x{mean('dense_eager_us', 'lynx8_eager_us'):.2f}, "
            f"kernel mean x{mean('dense_kernel_us', 'lynx8_kernel_us'):.2f}; vs fp8 dense GEMM alone: kernel mean "
            f"x{mean('fp8d_gemm_kernel_us', 'lynx8_kernel_us'):.2f}; vs fp8 dense linear: eager mean "
            f"x{mean('fp8d_linear_eager_us', 'lynx8_eager_us'):.2f}, kernel mean x{mean('fp8d_linear_kernel_us', 'lynx8_kernel_us'):.2f}; "
            f"sp8 GEMM alone vs fp8 dense GEMM: x{mean('fp8d_gemm_kernel_us', 'sp8_gemm_kernel_us'):.2f}, vs bf16: "
            f"x{mean('dense_kernel_us', 'sp8_gemm_kernel_us'):.2f}; vs the cuSPARSELt fp8 path: kernel mean "
            f"x{mean('lynx8_cslt_kernel_us', 'lynx8_kernel_us'):.2f}; staged pass vs the chunk loop: sparsify8 "
            f"x{mean('sparsify8_chunks_kernel_us', 'sparsify8_kernel_us'):.2f}, lynx8 "
            f"x{mean('lynx8_chunks_kernel_us', 'lynx8_kernel_us'):.2f} (kernel means); fp8 dense linear (ours) vs "
            f"bf16 F.linear: eager x{mean('dense_eager_us', 'fp8d_ours_eager_us'):.2f}, kernel "
            f"x{mean('dense_kernel_us', 'fp8d_ours_kernel_us'):.2f}; vs its quantisation in torch ops: eager "
            f"x{mean('fp8d_linear_eager_us', 'fp8d_ours_eager_us'):.2f}; fp8 dense GEMM, tensor-core accumulation "
            f"vs promoting: x{mean('fp8d_gemm_promoting_kernel_us', 'fp8d_gemm_kernel_us'):.2f} (kernel mean)")
    lines.append(f"- max rel err vs the fp8 reference: {max(r['err_vs_fp8_ref'] for r in rows):.1e} (fp8 dense "
                 f"linear, ours: {max(r['fp8d_ours_err_vs_fp8_ref'] for r in rows):.1e}); "
                 f"vs fp32 math on the unquantised sparsified input: {max(r['err_vs_fp32'] for r in rows):.1e}")
    lines += config_table(rows, "bf16 F.linear")
    return "\n".join(lines) + "\n"


def mean_ratio(rows, numerator, denominator):
    """Mean over rows of row[numerator] / row[denominator] (a speed-up when both are times)."""
    return statistics.mean(r[numerator] / r[denominator] for r in rows)


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
        f"sm90 path: {meta['availability']}.",
        "Times in us. eager = host clock over back-to-back calls + sync (median); kernel = CUDA "
        "graph replay (median). x = F.linear time / this path's time (same clock). sm90 = stage 2 "
        "(sparsify pass, CUTLASS sparse GEMM with scale and bias in its epilogue); sm90 gemm = that GEMM "
        "alone; cslt = stage 1 (scaled sparsify, cuSPARSELt GEMM, bias pass), cslt gemm = its GEMM alone "
        "(no scale, no bias), no bias = stage 1 without the bias pass. sparsify = the sm90 sparsify pass "
        "(one read of x; the row pairs staged in registers / the column-chunk loop) and its memory floor; "
        "chunks kernel = the sm90 linear with the chunk-loop pass. The variants take turns within every repeat, so a clock "
        "drift during the run shifts them alike."
        + (f" vs prev = {previous['name']}'s default-path time / this sm90 time." if previous else ""),
        "",
        "| model | layer | M | K | N | dense eager | sm90 eager | x | cslt eager | x | dense kernel"
        " | sm90 gemm | x | sm90 kernel | x | cslt gemm | x | cslt kernel | x | no bias | vs prev eager"
        " | sparsify staged / chunks (floor) | chunks kernel | config | rel err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    old_rows = {(r["M"], r["K"], r["N"]): r for r in previous["rows"]} if previous else {}

    def old_time(old):  # the default path of the earlier file
        return old.get("sm90_eager_us", old.get("lynx_eager_us"))
    for r in rows:
        old = old_rows.get((r["M"], r["K"], r["N"]))
        vs = f"{old_time(old) / r['sm90_eager_us']:.2f}" if old else "-"
        d_e, d_k = r["dense_eager_us"], r["dense_kernel_us"]
        lines.append(
            f"| {r['model']} | {r['layer']} | {r['M']} | {r['K']} | {r['N']} | "
            f"{d_e:.0f} | {r['sm90_eager_us']:.0f} | {d_e / r['sm90_eager_us']:.2f} | "
            f"{r['cslt_eager_us']:.0f} | {d_e / r['cslt_eager_us']:.2f} | "
            f"{d_k:.0f} | "
            f"{r['sm90_gemm_kernel_us']:.0f} | {d_k / r['sm90_gemm_kernel_us']:.2f} | "
            f"{r['sm90_kernel_us']:.0f} | {d_k / r['sm90_kernel_us']:.2f} | "
            f"{r['cslt_gemm_kernel_us']:.0f} | {d_k / r['cslt_gemm_kernel_us']:.2f} | "
            f"{r['cslt_kernel_us']:.0f} | {d_k / r['cslt_kernel_us']:.2f} | {r['cslt_nob_kernel_us']:.0f} | {vs} | "
            f"{r['sm90_sparsify_kernel_us']:.1f} / {r['sm90_sparsify_chunks_kernel_us']:.1f} "
            f"({r['sparsify_floor_us']:.1f}) | {r['sm90_chunks_kernel_us']:.0f} | {r['sm90_config']} | "
            f"{r['rel_error']:.1e} |")
    lines.append("")
    for model in sorted({r["model"] for r in rows}):
        sub = [r for r in rows if r["model"] == model]
        mean = functools.partial(mean_ratio, sub)
        lines.append(
            f"- {model}: sm90 Lynx linear vs F.linear: eager mean x{mean('dense_eager_us', 'sm90_eager_us'):.2f}"
            f" (geomean x{geometric_mean(r['dense_eager_us'] / r['sm90_eager_us'] for r in sub):.2f}),"
            f" kernel mean x{mean('dense_kernel_us', 'sm90_kernel_us'):.2f}; sm90 GEMM alone: mean"
            f" x{mean('dense_kernel_us', 'sm90_gemm_kernel_us'):.2f}, median"
            f" x{statistics.median(r['dense_kernel_us'] / r['sm90_gemm_kernel_us'] for r in sub):.2f};"
            f" cuSPARSELt path: eager x{mean('dense_eager_us', 'cslt_eager_us'):.2f},"
            f" kernel x{mean('dense_kernel_us', 'cslt_kernel_us'):.2f}, GEMM alone x{mean('dense_kernel_us', 'cslt_gemm_kernel_us'):.2f};"
            f" staged sparsify pass vs the chunk loop: pass x{mean('sm90_sparsify_chunks_kernel_us', 'sm90_sparsify_kernel_us'):.2f},"
            f" Lynx linear x{mean('sm90_chunks_kernel_us', 'sm90_kernel_us'):.2f} (kernel means)")
    lines.append(f"- max rel err vs fp32 math over these shapes: sm90 {max(r['rel_error'] for r in rows):.1e},"
                 f" cuSPARSELt {max(r['cslt_rel_error'] for r in rows):.1e}")
    lines += config_table(rows, "F.linear")
    return "\n".join(lines) + "\n"


def config_table(rows, dense_name):
    """Every sm90 GEMM config's kernel time per shape (us; x = the dense kernel time / it)."""
    names = list(dict.fromkeys(name for r in rows for name in r.get("sm90_configs_us", {})))
    if not names:
        return []
    lines = ["", f"sm90 GEMM alone per config (kernel us, x = {dense_name} kernel / it; configs timed in turns):", "",
             "| layer | M | K | N | " + " | ".join(names) + " |", "|---|---|---|---|" + "---|" * len(names)]
    for r in rows:
        cells = []
        for name in names:
            us = r["sm90_configs_us"].get(name)
            cells.append(f"{us:.0f} (x{r['dense_kernel_us'] / us:.2f})" if isinstance(us, float) else "-")
        lines.append(f"| {r['model']} {r['layer']} | {r['M']} | {r['K']} | {r['N']} | " + " | ".join(cells) + " |")
    return lines


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
    for name, check in (("cuSPARSELt", cusparselt.availability), ("sm90", sm90.availability_sm90)):
        available, reason = check(torch.device("cuda"))
        print(f"{name} path: {available} ({reason}); build+self-test {time.monotonic() - started:.1f} s",
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
              f" sm90 {row['sm90_eager_us']:.0f}/{row['sm90_kernel_us']:.0f} (gemm {row['sm90_gemm_kernel_us']:.0f},"
              f" {row['sm90_config']}), cslt {row['cslt_eager_us']:.0f}/{row['cslt_kernel_us']:.0f}"
              f" (gemm {row['cslt_gemm_kernel_us']:.0f}), sparsify {row['sm90_sparsify_kernel_us']:.1f}"
              f" (chunks {row['sm90_sparsify_chunks_kernel_us']:.1f}, floor {row['sparsify_floor_us']:.1f}), err {row['rel_error']:.1e}; configs {row['sm90_configs_us']}",
              flush=True)
    meta["plans"] = [list(p) for p in cusparselt.plan_info()]
    meta["sm90_plans"] = [list(p) for p in sm90.plan_info()]
    previous = None
    if args.previous and pathlib.Path(args.previous).exists():
        previous = json.loads(pathlib.Path(args.previous).read_text())
        previous["name"] = pathlib.Path(args.previous).name
    text = markdown(rows, meta, previous)
    print(text)
    write_results(args.out, "kernels-{tag}" + args.suffix, meta, rows, text)
    return 0


def main_fp8(args, calls, repeats):
    available, reason = fp8.availability_fp8(torch.device("cuda"))
    print(f"cuSPARSELt fp8 path: {available} ({reason})", flush=True)
    if not available:
        return 1
    available, reason = sm90.availability_sm90(torch.device("cuda"))
    meta = {
        "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cusparselt": ".".join(map(str, cusparselt.extension().cusparselt_versions()[:3])),
        "commit": git_commit(),
        "availability": reason,
        "calls": calls, "repeats": repeats,
        "fp8d_fast_accumulation": fp8_dense.FAST_ACCUMULATION,
    }
    rows = []
    for model, layer, M, K, N in SHAPES:
        row = {"model": model, "layer": layer, **bench_shape_fp8(M, K, N, calls, repeats)}
        rows.append(row)
        print(f"{model} {layer} {M}x{K}x{N}: dense {row['dense_eager_us']:.0f}/{row['dense_kernel_us']:.0f},"
              f" fp8d gemm {row['fp8d_gemm_kernel_us']:.0f} (promoting {row['fp8d_gemm_promoting_kernel_us']:.0f}), sp8 gemm {row['sp8_gemm_kernel_us']:.0f} ({row['sm90_config']}),"
              f" sparsify8 {row['sparsify8_kernel_us']:.1f} (chunks {row['sparsify8_chunks_kernel_us']:.1f}), lynx8 {row['lynx8_eager_us']:.0f}/{row['lynx8_kernel_us']:.0f},"
              f" lynx8 cslt {row['lynx8_cslt_kernel_us']:.0f}, lynx16 {row['lynx16_kernel_us']:.0f},"
              f" err {row['err_vs_fp8_ref']:.1e}/{row['err_vs_fp32']:.1e}; configs {row['sm90_configs_us']}", flush=True)
    meta["plans"] = [list(p) for p in cusparselt.plan_info()]
    meta["sm90_plans"] = [list(p) for p in sm90.plan_info()]
    text = markdown_fp8(rows, meta)
    print(text)
    write_results(args.out, "kernels-{tag}" + (args.suffix or "-fp8"), meta, rows, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
