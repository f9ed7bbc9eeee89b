"""Where a Lynx linear's time goes, kernel by kernel (CUPTI through torch.profiler).

For each shape: dense F.linear (cuBLAS), the full sm90 Lynx linear (plain and with a rank-r LoRA), the same two kernels
launched as two ops from Python, its GEMM alone on a pre-compressed input and its sparsify pass
alone, each run back to back; per kernel name the mean device duration per call, and per case
the device span per call (first kernel start to last kernel end, so idle time between kernels
counts), the CUDA-graph kernel time and the eager wall time (bench/common.py clocks). The kernel
table of bench/kernels.py times these as wholes; this says where a gap between "full linear"
and "GEMM + sparsify" sits.
Results: bench/results/profile-linear-<date>-<gpu>.md.

Usage: python bench/profile_linear.py [--out DIR] [--rank 32] [--shapes 0,2]
  --single-calls: one call per case and shape, no timing, between cudaProfilerStart/Stop (for
  `ncu --profile-from-start off --clock-control none` to wrap; bench/run_device.sh ncu does).
"""
import argparse
import datetime
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import eager_us, git_commit, graph_us, kernel_means, write_markdown  # noqa: E402
from standalone import load_pack  # noqa: E402

load_pack()
from rt_lynx_pack.kernels import prepare_low_rank, sm90, sparse_linear  # noqa: E402
from rt_lynx_pack.kernels.sm90 import low_rank_fusion  # noqa: E402

SHAPES = [("flux double img qkv", 4096, 3072, 9216), ("flux double img mlp down", 4096, 12288, 3072),
          ("flux single linear1", 4608, 3072, 21504), ("flux single linear2", 4608, 15360, 3072),
          ("qwen img mlp down", 8192, 12288, 3072), ("flux double img proj", 4096, 3072, 3072),
          ("flux double txt qkv", 512, 3072, 9216)]
CALLS = 20
INPUT_SETS = 3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--shapes", default="", help="indices into SHAPES (default: all)")
    parser.add_argument("--single-calls", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    shapes = [SHAPES[int(i)] for i in args.shapes.split(",")] if args.shapes else SHAPES
    lines = [f"# Lynx linear, kernel by kernel, {torch.cuda.get_device_name()}, {datetime.date.today()}", "",
             f"torch {torch.__version__}, commit {git_commit()}. Mean device us per call over {CALLS} calls "
             "(torch.profiler/CUPTI); bf16, bias, compensation on; rank "
             f"{args.rank} for the LoRA rows.", ""]
    for layer, m, k, n in shapes:
        g = torch.Generator(device="cuda").manual_seed(m + k + n)
        xs = [torch.randn(m, k, generator=g, device="cuda").to(torch.bfloat16) for _ in range(INPUT_SETS)]
        w = (torch.randn(n, k, generator=g, device="cuda") / k ** 0.5).to(torch.bfloat16)
        b = torch.randn(n, generator=g, device="cuda").to(torch.bfloat16)
        low_rank = prepare_low_rank(torch.randn(args.rank, k) / k ** 0.5,
                                    torch.randn(n, args.rank) / args.rank ** 0.5, 1.0, xs[0].device, xs[0].dtype)
        sparse_linear(xs[0], w, b, True)  # tunes the config
        config = next(p[4] for p in sm90.plan_info() if p[:4] == (m, k, n, "bf16") and p[6] == 0)
        block = sm90.config_info(torch.bfloat16)[config][3]
        compressed = [torch.ops.rt_lynx.sparsify_sm90(x, block, False, True) for x in xs]
        state = {"i": 0}

        def step():
            state["i"] = (state["i"] + 1) % INPUT_SETS
            return state["i"]

        def lora(x, fused_down):
            with low_rank_fusion(fused_down):
                return sparse_linear(x, w, b, True, low_rank=low_rank)

        def gemm_alone(compressed_and_scale):
            values, scale = compressed_and_scale
            return torch.ops.rt_lynx.sparse_mm_sm90(values, w, scale, None, b, m, config, torch.bfloat16)

        cases = {
            "dense F.linear": lambda: torch.nn.functional.linear(xs[step()], w, b),
            "full linear": lambda: sparse_linear(xs[step()], w, b, True),
            "two ops": lambda: gemm_alone(torch.ops.rt_lynx.sparsify_sm90(xs[step()], block, False, True)),
            "GEMM alone": lambda: gemm_alone(compressed[step()]),
            "sparsify alone": lambda: torch.ops.rt_lynx.sparsify_sm90(xs[step()], block, False, True),
            f"full linear + LoRA r{args.rank}, down by cuBLAS": lambda: lora(xs[step()], False),
            f"full linear + LoRA r{args.rank}, down in the sparsify pass": lambda: lora(xs[step()], True),
        }
        if args.single_calls:
            for fn in cases.values():     # first calls tune their plans: not profiled
                fn()
            torch.cuda.synchronize()
            torch.cuda.profiler.start()   # what `ncu --profile-from-start off` sees
            for fn in cases.values():
                fn()
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
            continue
        lines += [f"## {layer} {m}x{k}x{n} (config {sm90.config_info(torch.bfloat16)[config][5]})", "",
                  "| case | kernel | us/call |", "|---|---|---|"]
        for case, fn in cases.items():
            means, span = kernel_means(fn, CALLS)
            for name, us in sorted(means.items(), key=lambda item: -item[1]):
                lines.append(f"| {case} | `{name}` | {us:.1f} |")
            lines.append(f"| {case} | **sum** / span / graph / eager | **{sum(means.values()):.1f}** / {span:.1f} / "
                         f"{graph_us(fn, CALLS, 5):.1f} / {eager_us(fn, CALLS, 5):.1f} |")
        lines.append("")
        print("\n".join(lines[-12:]), flush=True)
    if args.single_calls:
        return 0
    text = "\n".join(lines) + "\n"
    print(text)
    write_markdown(args.out, f"profile-linear-{datetime.date.today()}-{torch.cuda.get_device_name().replace(' ', '_')}",
                   text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
