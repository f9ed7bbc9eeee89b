"""Attention's v read where the projection wrote it, against v copied into the heads-major layout.

The fused q/k norm + RoPE pass writes q, k and v as (batch, heads, tokens, head_dim). v needs no
norm and no rotation: in FLUX's single blocks it could be a view of linear1's output (tokens x
21504 rows, v at columns 6144-9216), transposed to heads-major, if attention reads it there as fast.
At FLUX.1-dev 1024² single-block shapes (4608 tokens, 24 heads of 128, bf16): torch's
scaled_dot_product_attention with the copied v and with the strided view, eager and compiled
(Inductor may copy a strided input itself), the kernels each variant launches (torch.profiler),
and the copy the pass spends on v (read and write 28 MB).

Usage (GPU): python bench/attention_layout.py [--out bench/results]
"""
import datetime
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import (INPUT_SETS, OperandRotation, git_commit, interleaved_eager_us,  # noqa: E402
                    interleaved_kernel_us, kernel_names, timed_gpu_bench_args, write_markdown)

TOKENS, HEADS, HEAD_DIM, LINEAR1_OUT = 4608, 24, 128, 21504
WIDTH = HEADS * HEAD_DIM


def heads_major(t):
    return t.view(1, TOKENS, HEADS, HEAD_DIM).transpose(1, 2)



def main(argv=None):
    args = timed_gpu_bench_args(__doc__, "attention_layout.py", argv, calls=10)
    import torch
    import torch.nn.functional as F
    gen = torch.Generator(device="cuda").manual_seed(0)
    sets = []
    for _ in range(INPUT_SETS):
        projected = torch.randn(1, TOKENS, LINEAR1_OUT, generator=gen, device="cuda").to(torch.bfloat16)
        q = heads_major(projected[..., :WIDTH]).contiguous()
        k = heads_major(projected[..., WIDTH:2 * WIDTH]).contiguous()
        sets.append((q, k, projected))
    rotating = OperandRotation(sets)

    def v_view(projected):
        return heads_major(projected[..., 2 * WIDTH:3 * WIDTH])

    def copied(q, k, projected):
        return F.scaled_dot_product_attention(q, k, v_view(projected).contiguous())

    def attention_on_copy(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    def strided(q, k, projected):
        return F.scaled_dot_product_attention(q, k, v_view(projected))

    def copy_only(q, k, projected):
        return v_view(projected).contiguous()

    copies = [v_view(projected).contiguous() for _, _, projected in sets]
    fns = {"attention, v copied (copy excluded)": rotating(lambda q, k, projected: attention_on_copy(
               q, k, copies[rotating.index])),
           "attention, v strided view": rotating(strided),
           "v copy alone": rotating(copy_only),
           "compiled: copy + attention": rotating(torch.compile(copied)),
           "compiled: attention on the view": rotating(torch.compile(strided))}
    q0, k0, projected0 = sets[0]
    same = torch.equal(attention_on_copy(q0, k0, copies[0]), strided(q0, k0, projected0))
    kernels = {name: kernel_names(fn) for name, fn in fns.items()}
    kernel = interleaved_kernel_us(fns, args.calls, args.repeats)
    eager = interleaved_eager_us(fns, args.calls, args.repeats)
    gpu = torch.cuda.get_device_name()
    lines = [f"# Attention's v layout ({datetime.date.today()}, {gpu})", "",
             f"torch {torch.__version__}, commit {git_commit()}; FLUX.1-dev 1024² single block: {TOKENS} tokens, "
             f"{HEADS} heads x {HEAD_DIM}, bf16, v a heads-major view of linear1's {LINEAR1_OUT}-column output or a "
             f"contiguous copy of it. Kernel time: CUDA-graph replays; eager: synchronised wall time; "
             f"{args.calls} calls x {args.repeats} repeats, in turns. Outputs bit-equal (eager): {same}.", "",
             "| variant | kernel us | eager us | kernels launched |", "|---|---|---|---|"]
    for name in fns:
        launched = "; ".join(n[:70] for n in kernels[name])
        lines.append(f"| {name} | {kernel[name]:.1f} | {eager[name]:.1f} | {launched} |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_markdown(args.out, f"attention-layout-{datetime.date.today()}-{gpu.replace(' ', '_')}", text)


if __name__ == "__main__":
    main()
