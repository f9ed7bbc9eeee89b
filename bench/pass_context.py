"""The linear2 input pass of FLUX's single blocks, alone and after what precedes it in a step.

That pass (the attention output and the GELU of the MLP hidden state, quantised to e4m3 for the
dense fp8 `linear2`) takes 86 us timed alone (bench/passes.py) but 103 us a call in a compiled
FLUX.1-dev 1024² step's profile. This times its kernel (CUPTI through torch.profiler, mean over
back-to-back repeats of each case) alone, with rotating operands, and right after each kernel that
precedes it in a block (linear1's GEMM, which writes the MLP hidden state; attention with its layout
copy, which writes the other input), and after an unrelated compute-heavy GEMM: to tell the
context's cost (the previous kernel's L2 lines, clocks under tensor-core load) from the pass's own.
Results: bench/results/pass-context-<date>-<gpu>.md.

Usage: python bench/pass_context.py [--out DIR]
"""
import argparse
import datetime
import pathlib
import sys

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import git_commit, kernel_means, rotating, write_markdown  # noqa: E402
from standalone import load_pack  # noqa: E402

TOKENS, HIDDEN, MLP, HEADS = 4096 + 512, 3072, 12288, 24   # FLUX.1-dev single block at 1024²
CALLS = 20
PASS_KERNEL = "quantize_rows"


def sm_clock_mhz():
    try:
        return torch.cuda.clock_rate()
    except Exception:  # NVML missing: the column stays empty
        return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    load_pack()
    from rt_lynx_pack.kernels import fp8_dense
    ok, info = fp8_dense.availability_fp8_dense(torch.device("cuda"))
    if not ok:
        sys.exit(f"fp8 dense: {info}")
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda").to(torch.bfloat16)

    block_input = randn(TOKENS, HIDDEN)
    linear1_weight = randn(3 * HIDDEN + MLP, HIDDEN) * 0.02
    linear1_out = [randn(TOKENS, 3 * HIDDEN + MLP) for _ in range(2)]
    attention_out = [randn(TOKENS, HIDDEN) for _ in range(2)]
    q, k, v = (randn(1, HEADS, TOKENS, HIDDEN // HEADS) for _ in range(3))
    square = [randn(8192, 8192) for _ in range(2)]
    quantize = torch.ops.rt_lynx.quantize_rows_fp8

    def mlp_hidden(i=0):
        return linear1_out[i][:, 3 * HIDDEN:]

    def linear1():
        torch.matmul(block_input, linear1_weight.t(), out=linear1_out[0])

    def attention():
        # ComfyUI's attention: SDPA, then heads back into the features (a copy).
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(TOKENS, HIDDEN)

    operands = rotating([(attention_out[i], mlp_hidden(i)) for i in range(2)])
    cases = {
        "alone, the same operands": lambda: quantize(attention_out[0], mlp_hidden()),
        "alone, two operand sets in turn": lambda: quantize(*operands()),
        "after linear1's GEMM (writes the MLP hidden state)": lambda: (linear1(),
                                                                       quantize(attention_out[0], mlp_hidden())),
        "after attention (writes the attention output)": lambda: quantize(attention(), mlp_hidden()),
        "block order: linear1, attention, the pass": lambda: (linear1(), quantize(attention(), mlp_hidden())),
        "after an unrelated 8192³ GEMM": lambda: (torch.matmul(square[0], square[1]),
                                                 quantize(attention_out[0], mlp_hidden())),
    }
    lines = [f"# The linear2 input pass in context, {torch.cuda.get_device_name()}, {datetime.date.today()}", "",
             f"torch {torch.__version__}, commit {git_commit()}. `quantize_rows_fp8(attention, mlp_hidden)` "
             f"({TOKENS} tokens, {HIDDEN} + {MLP} columns, GELU tail, the default fast GELU); mean device us per "
             f"call over {CALLS} back-to-back calls of each case (CUPTI); SM clock read after each case (NVML).", "",
             "| case | pass us | other kernels (us per call) | SM MHz after |", "|---|---|---|---|"]
    for case, fn in cases.items():
        means, _ = kernel_means(fn, CALLS)
        pass_us = sum(us for name, us in means.items() if PASS_KERNEL in name)
        others = ", ".join(f"`{name[:40]}` {us:.1f}" for name, us in sorted(means.items(), key=lambda kv: -kv[1])
                           if PASS_KERNEL not in name)
        clock = sm_clock_mhz()
        lines.append(f"| {case} | {pass_us:.1f} | {others or '-'} | {clock if clock is not None else ''} |")
        print(lines[-1], flush=True)
    write_markdown(args.out, f"pass-context-{datetime.date.today()}-{torch.cuda.get_device_name().replace(' ', '_')}",
                   "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
