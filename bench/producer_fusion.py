"""Time the producer fusion: the elementwise work that makes a linear's input, inside the Lynx sparsify pass.

For every FLUX.1-dev / Qwen-Image linear whose input comes from a LayerNorm + modulation ("norm":
the block's residual stream x, its shift and 1 + scale) or from the MLP's GELU ("gelu": the up
projection's output x), at 1024², bf16, bias and compensation on:
  dense        F.linear(prologue(x))      (prologue: addcmul(shift, layer_norm(x), scale1p), or
                                           gelu(x, approximate="tanh"); what ComfyUI runs, eager)
  lynx         the same prologue, then sm90.sparse_linear_sm90
  lynx_ind     the prologue as Inductor compiles it (one Triton kernel), then
               sm90.sparse_linear_sm90: what a torch.compile'd model without the fusion runs
  lynx_fused   sm90.sparse_linear_modulated_sm90 / sparse_linear_gelu_sm90 (the prologue in the
               sparsify pass)
  lynx_fast    (GELU rows) lynx_fused with the kernels' fast GELU (their default, sm90.fast_gelu:
               x / (1 + exp(-2u)) on the hardware exp2 and a fast division); every other variant
               computes torch's tanhf GELU bit for bit
and with --fp8 the same Lynx variants on the e4m3 product (lynx8, lynx8_ind, lynx8_fused, lynx8_fast).
FLUX's single-block linear2 ("cat gelu") is kept dense: its input is cat((attention output,
gelu(MLP part of linear1's output))), and its "lynx" columns are the layer as the precision runs
it, F.linear in bf16 (fused: kernels' cat_gelu_tanh, then F.linear) and the e4m3 dense product
in fp8 (fused: the GELU and the concatenation inside its quantise pass).
With --lora R (bf16) two more variants carry a rank-R Lynx LoRA branch of the prepared input:
  lora_ind     Inductor's prologue, then sm90.sparse_linear_lora_sm90 (branch in the GEMM, its down
               projection in the sparsify pass)
  lora_fused   the prologue inside that same fused down pass (sparse_linear_modulated_sm90 /
               sparse_linear_gelu_sm90 with down and up_ext; a LayerNorm's row statistics first)
Qwen-Image's q, k and v take one modulated input: its row times the three linears together
(the unfused variants normalise and modulate once). Two clocks as in bench/kernels.py (eager
wall time and CUDA-graph kernel time), the variants taking turns within every repeat. The last
row adds the shapes up over one FLUX 1024² step (19 double blocks, 38 single blocks).

Usage: python bench/producer_fusion.py [--quick] [--fp8 | --lora R] [--out DIR] [--suffix S]
"""
import argparse
import datetime
import pathlib
import sys
import time

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from standalone import load_pack  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from common import (INPUT_SETS, git_commit, interleaved_eager_us, interleaved_kernel_us, rotating,  # noqa: E402
                    write_results)

load_pack()
from rt_lynx_pack.kernels import fp8_dense, sm90  # noqa: E402
from rt_lynx_pack.kernels.reference import quantize_weight_fp8  # noqa: E402

EPS = 1e-6
FLUX_HIDDEN = 3072   # the attention output's width in the single block's linear2 input
# (model, layer, prologue, images, tokens, K, N, linears sharing the input, uses per FLUX 1024² step)
SHAPES = [
    ("flux", "double img qkv", "norm", 1, 4096, 3072, 9216, 1, 19),
    ("flux", "double img mlp up", "norm", 1, 4096, 3072, 12288, 1, 19),
    ("flux", "double img mlp down", "gelu", 1, 4096, 12288, 3072, 1, 19),
    ("flux", "double txt qkv", "norm", 1, 512, 3072, 9216, 1, 19),
    ("flux", "double txt mlp up", "norm", 1, 512, 3072, 12288, 1, 19),
    ("flux", "double txt mlp down", "gelu", 1, 512, 12288, 3072, 1, 19),
    ("flux", "single linear1", "norm", 1, 4608, 3072, 21504, 1, 38),
    ("flux", "single linear2", "cat gelu", 1, 4608, 15360, 3072, 1, 38),
    ("qwen", "img q, k, v (CFG 2)", "norm", 2, 4096, 3072, 3072, 3, 0),
    ("qwen", "img mlp up (CFG 2)", "norm", 2, 4096, 3072, 12288, 1, 0),
    ("qwen", "img mlp down (CFG 2)", "gelu", 2, 4096, 12288, 3072, 1, 0),
]


def bench_shape(prologue_kind, images, tokens, k, n, linears, fp8, calls, repeats, lora_rank=0):
    dtype = torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(images * tokens + k + n)
    rows = images * tokens
    # The linear2 case reads linear1's whole output (q, k, v and the MLP part) and the attention output.
    width = 3 * FLUX_HIDDEN + (k - FLUX_HIDDEN) if prologue_kind == "cat gelu" else k
    xs = [(torch.randn(rows, width, generator=g, device="cuda") * 2 + 0.5).to(dtype) for _ in range(INPUT_SETS)]
    attn = torch.randn(rows, FLUX_HIDDEN, generator=g, device="cuda").to(dtype)
    shift = torch.randn(images, k, generator=g, device="cuda").to(dtype)
    scale1p = (1 + torch.randn(images, k, generator=g, device="cuda") / 4).to(dtype)
    weights = [(torch.randn(n, k, generator=g, device="cuda") / k ** 0.5).to(dtype) for _ in range(linears)]
    bias = torch.randn(n, generator=g, device="cuda").to(dtype)
    # (weight, w_scale) of each linear: e4m3 per channel for fp8, else the bf16 weight
    operands = [quantize_weight_fp8(w) for w in weights] if fp8 else [(w, None) for w in weights]
    next_x = rotating(xs)

    def eager_prologue(x):
        if prologue_kind == "gelu":
            return F.gelu(x, approximate="tanh")
        if prologue_kind == "cat gelu":
            return torch.cat((attn, F.gelu(x[:, 3 * FLUX_HIDDEN:], approximate="tanh")), -1)
        return torch.addcmul(shift[:, None], F.layer_norm(x.view(images, tokens, k), (k,), eps=EPS),
                             scale1p[:, None]).view(rows, k)
    inductor_prologue = torch.compile(eager_prologue, dynamic=False)

    def product(x):
        if prologue_kind == "cat gelu":   # a dense layer
            if fp8:
                return [fp8_dense.dense_linear_fp8(x, wq, w_scale, bias) for wq, w_scale in operands]
            return [F.linear(x, w, bias) for w in weights]
        if fp8:
            return [sm90.sparse_linear_fp8_sm90(x, wq, w_scale, bias, True) for wq, w_scale in operands]
        return [sm90.sparse_linear_sm90(x, w, bias, True) for w, _ in operands]

    def fused(x):
        if prologue_kind == "cat gelu":
            mlp = x[:, 3 * FLUX_HIDDEN:]
            if fp8:
                return [fp8_dense.dense_linear_fp8(attn, wq, w_scale, bias, mlp) for wq, w_scale in operands]
            return [F.linear(torch.ops.rt_lynx.cat_gelu_tanh(attn, mlp), w, bias) for w in weights]
        if prologue_kind == "gelu":
            return [sm90.sparse_linear_gelu_sm90(x, w, w_scale, bias, True) for w, w_scale in operands]
        return [sm90.sparse_linear_modulated_sm90(x, shift, scale1p, tokens, EPS, w, w_scale, bias, True)
                for w, w_scale in operands]

    prefix = "lynx8" if fp8 else "lynx"
    fns = {
        prefix: lambda: product(eager_prologue(next_x())),
        f"{prefix}_ind": lambda: product(inductor_prologue(next_x())),
        f"{prefix}_fused": lambda: fused(next_x()),
    }
    contexts = {}
    if prologue_kind != "norm":   # the switch around the variant's turns (a captured graph keeps it)
        fns[f"{prefix}_fast"] = lambda: fused(next_x())
        contexts[f"{prefix}_fast"] = lambda: sm90.fast_gelu(True)
    if not fp8:
        fns = {"dense": lambda: [F.linear(eager_prologue(next_x()), w, bias) for w in weights], **fns}
    if lora_rank and prologue_kind != "cat gelu":
        down = (torch.randn(lora_rank, k, generator=g, device="cuda") / k ** 0.5).to(dtype)
        up_ext = sm90.k_extension_up(torch.randn(n, lora_rank, generator=g, device="cuda").to(dtype), 0.5)

        def lora_fused(x):
            if prologue_kind == "gelu":
                return [sm90.sparse_linear_gelu_sm90(x, w, None, bias, True, down, up_ext) for w in weights]
            return [sm90.sparse_linear_modulated_sm90(x, shift, scale1p, tokens, EPS, w, None, bias, True, down, up_ext)
                    for w in weights]
        fns["lora_ind"] = lambda: [sm90.sparse_linear_lora_sm90(inductor_prologue(next_x()), w, bias, True, down, up_ext)
                                   for w in weights]
        fns["lora_fused"] = lambda: lora_fused(next_x())
    def fused_vs_unfused_error():   # worst linear, relative norm, on the first input set
        return max(((a.float() - b.float()).norm() / b.float().norm()).item()
                   for a, b in zip(fused(xs[0]), product(eager_prologue(xs[0]))))
    row = {"rows": rows, "k": k, "n": n, "linears": linears, "fused_vs_unfused_error": fused_vs_unfused_error()}
    if f"{prefix}_fast" in fns:
        with sm90.fast_gelu(True):
            row["fast_vs_unfused_error"] = fused_vs_unfused_error()
    for name, us in interleaved_eager_us(fns, calls, repeats, contexts).items():
        row[f"{name}_eager_us"] = us
    for name, us in interleaved_kernel_us(fns, calls, repeats, contexts).items():
        row[f"{name}_kernel_us"] = us
    return row


def markdown(rows, meta, fp8):
    prefix = "lynx8" if fp8 else "lynx"
    lora = any("lora_fused_kernel_us" in r for r in rows)
    lines = [f"# Producer fusion: LayerNorm + modulation or GELU in the Lynx sparsify pass{' (fp8)' if fp8 else ''}",
             "",
             "single linear2 is kept dense: its columns are F.linear (bf16) or the e4m3 dense product (fp8) "
             "of cat((attention output, gelu(MLP hidden))); fused: that input made in one pass (bf16) or "
             "inside the quantise pass (fp8).",
             "",
             f"{meta['date']}, {meta['gpu']}, torch {meta['torch']}, commit {meta['commit']}; "
             f"{meta['calls']} calls x {meta['repeats']} repeats, variants in turns. Times in us per call "
             f"(eager wall / CUDA-graph kernel).", ""]
    fast = [r for r in rows if f"{prefix}_fast_kernel_us" in r]
    head = (["dense"] if not fp8 else []) + [prefix, f"{prefix}_ind", f"{prefix}_fused"] + \
        ([f"{prefix}_fast"] if fast else []) + (["lora_ind", "lora_fused"] if lora else [])
    lines.append("| model | layer | prologue | M x K x N (x linears) | " + " | ".join(head)
                 + " | fused vs unfused eager | fused vs Inductor's prologue, kernel | rel. diff |")
    lines.append("|" + "---|" * (len(head) + 7))
    for r in rows:
        cells = [f"{r[f'{v}_eager_us']:.0f} / {r[f'{v}_kernel_us']:.0f}" if f"{v}_eager_us" in r else "-"
                 for v in head]
        lines.append(f"| {r['model']} | {r['layer']} | {r['prologue']} | {r['rows']}x{r['k']}x{r['n']} (x{r['linears']}) | "
                     + " | ".join(cells)
                     + f" | {r[f'{prefix}_eager_us'] / r[f'{prefix}_fused_eager_us']:.3f}x"
                     f" | {r[f'{prefix}_ind_kernel_us'] / r[f'{prefix}_fused_kernel_us']:.3f}x"
                     f" | {r['fused_vs_unfused_error']:.1e} |")
    flux = [r for r in rows if r["per_flux_step"]]
    eager = sum(r["per_flux_step"] * (r[f"{prefix}_eager_us"] - r[f"{prefix}_fused_eager_us"]) for r in flux) / 1e3
    kernel = sum(r["per_flux_step"] * (r[f"{prefix}_ind_kernel_us"] - r[f"{prefix}_fused_kernel_us"])
                 for r in flux) / 1e3
    lines += ["", f"Over one FLUX.1-dev 1024² step (the FLUX rows times their uses): the fusion saves "
              f"{eager:.2f} ms of eager wall time against the eager prologues, and {kernel:.2f} ms of "
              f"kernel time against Inductor's compiled prologues (what a compiled step saves).", ""]
    if fast:
        ratios = [r[f"{prefix}_fused_kernel_us"] / r[f"{prefix}_fast_kernel_us"] for r in fast]
        saved = sum(r["per_flux_step"] * (r[f"{prefix}_fused_kernel_us"] - r[f"{prefix}_fast_kernel_us"])
                    for r in fast) / 1e3
        lines += [f"The kernels' fast GELU ({prefix}_fast) against torch's tanhf in the same passes: kernel time "
                  f"x{min(ratios):.3f}-{max(ratios):.3f} on the GELU rows, {saved:.2f} ms over one FLUX.1-dev 1024² "
                  f"step; output against the unfused layer {max(r['fast_vs_unfused_error'] for r in fast):.1e} "
                  f"(rel. diff, worst row; the exact GELU's: "
                  f"{max(r['fused_vs_unfused_error'] for r in fast):.1e}).", ""]
    if lora:
        with_branch = [r for r in rows if "lora_fused_kernel_us" in r]
        ratios = [r["lora_ind_kernel_us"] / r["lora_fused_kernel_us"] for r in with_branch]
        overhead = [r["lora_fused_kernel_us"] / r[f"{prefix}_fused_kernel_us"] - 1 for r in with_branch]
        lines += [f"With a rank-{meta['lora']} Lynx LoRA: the prologue in the fused down pass against Inductor's "
                  f"prologue + the same branch, kernel time x{sum(ratios) / len(ratios):.3f} (mean; "
                  f"{min(ratios):.3f}-{max(ratios):.3f}); the branch adds {100 * sum(overhead) / len(overhead):+.1f}% "
                  f"to the fused product without it (mean kernel time).", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls and repeats")
    parser.add_argument("--fp8", action="store_true", help="the e4m3 product instead of bf16")
    parser.add_argument("--lora", type=int, default=0, metavar="R", help="also time a rank-R Lynx LoRA (bf16)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--suffix", default="")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark")
        return 1
    started = time.monotonic()
    for name, availability in (("sm90", sm90.availability_sm90), ("fp8 dense", fp8_dense.availability_fp8_dense)):
        available, reason = availability(torch.device("cuda"))
        print(f"{name} path: {available} ({reason}); {time.monotonic() - started:.1f} s", flush=True)
        if not available:
            return 1
    calls, repeats = (10, 3) if args.quick else (20, 5)
    meta = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__, "commit": git_commit(), "calls": calls, "repeats": repeats,
            "lora": 0 if args.fp8 else args.lora}
    rows = []
    for model, layer, prologue, images, tokens, k, n, linears, per_step in SHAPES:
        with sm90.fast_gelu(False):   # the fused passes compute torch's GELU bits; {prefix}_fast the default one
            measured = bench_shape(prologue, images, tokens, k, n, linears, args.fp8, calls, repeats, meta["lora"])
        row = {"model": model, "layer": layer, "prologue": prologue, "per_flux_step": per_step, **measured}
        rows.append(row)
        print(model, layer, {key: round(value, 1) for key, value in row.items() if key.endswith("_us")},
              f"error {row['fused_vs_unfused_error']:.1e}", flush=True)
    text = markdown(rows, meta, args.fp8)
    print(text)
    variant = "-fp8" if args.fp8 else f"-lora{meta['lora']}" if meta["lora"] else ""
    write_results(args.out, "producer-fusion-{tag}" + variant + args.suffix, meta, rows, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
