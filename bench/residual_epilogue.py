"""A DiT block's gated residual in the sparse GEMM's epilogue against the same residual added after.

At FLUX.1-dev 1024² double-block shapes (4096 image / 512 text tokens; the attention output
projection 3072 -> 3072 and the MLP's down projection 12288 -> 3072 with its GELU in the sparsify
pass), bf16 and fp8: the Lynx linear, then torch.addcmul(residual, gate, y) (what the blocks ran
before), against the same op given the residual and the gate (one write of the result, no pass
over y). In fp8 also the single block's linear2, kept dense (4608 tokens, the attention output and
the GELU of the MLP's 12288 columns -> 3072): torch._scaled_mm then the addcmul, against cuBLASLt's
GEMM with the residual as C. Kernel time from CUDA-graph replays and eager wall time, the variants in turns in one
run; and each variant's error against fp32 math on the same sparsified (and quantised) input.

Usage (GPU): python bench/residual_epilogue.py [--out bench/results]
"""
import datetime
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from standalone import load_pack  # noqa: E402

load_pack()
sys.path.insert(0, str(ROOT / "bench"))
from common import (INPUT_SETS, OperandRotation, git_commit, interleaved_eager_us,  # noqa: E402
                    interleaved_kernel_us, timed_gpu_bench_args)

HIDDEN, MLP = 3072, 12288
SHAPES = [("img attn proj", 4096, HIDDEN, False), ("img mlp down", 4096, MLP, True),
          ("txt attn proj", 512, HIDDEN, False), ("txt mlp down", 512, MLP, True)]


def rotated_pair(operand_sets, unfused, fused):
    """(unfused fn, fused fn) that each call theirs on the next operand set, and what each gives for
    the first set."""
    rotating = OperandRotation(operand_sets)
    return rotating(unfused), rotating(fused), unfused(*operand_sets[0]), fused(*operand_sets[0])


def random_bf16(torch, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return lambda *shape, scale=1.0: (torch.randn(*shape, generator=gen, device="cuda") * scale).to(torch.bfloat16)


def cases(torch, precision, tokens, k, gelu):
    """(unfused fn, fused fn, fp32 want, the two outputs on the first operand set) for one shape."""
    from rt_lynx_pack.kernels import quantize_weight_fp8, reference, sm90
    randn = random_bf16(torch, tokens + k)
    sets = [(randn(tokens, k), randn(tokens, HIDDEN), randn(HIDDEN, scale=0.3)) for _ in range(INPUT_SETS)]
    weight = randn(HIDDEN, k, scale=k ** -0.5)
    bias = randn(HIDDEN, scale=0.1)
    if precision == "fp8":
        wq, w_scale = quantize_weight_fp8(weight)
        product = (wq, w_scale, bias, True)
        op = sm90.sparse_linear_gelu_sm90 if gelu else sm90.sparse_linear_fp8_sm90
    else:
        product = (weight, None, bias, True) if gelu else (weight, bias, True)
        op = sm90.sparse_linear_gelu_sm90 if gelu else sm90.sparse_linear_sm90
    unfused, fused, got_unfused, got_fused = rotated_pair(
        sets, lambda x, residual, gate: torch.addcmul(residual, gate, op(x, *product)),
        lambda x, residual, gate: op(x, *product, residual=residual, gate=gate))
    x0, residual0, gate0 = sets[0]
    x0 = reference.gelu_tanh_reference(x0) if gelu else x0
    if precision == "fp8":
        y = reference.sparse_linear_fp8_reference(x0.float(), wq, w_scale, bias.float(), True)
    else:
        y = reference.sparse_linear_reference(x0.float(), weight.float(), bias.float(), True)
    return unfused, fused, residual0.float() + gate0.float() * y, got_unfused, got_fused


def dense_linear2_case(torch):
    """cases() for the single block's linear2 in fp8 (a dense e4m3 GEMM after the quantise pass)."""
    from rt_lynx_pack.kernels import fp8_dense, quantize_weight_fp8, reference
    randn = random_bf16(torch, 7)
    tokens, k = 4608, HIDDEN + MLP
    sets = [(randn(tokens, HIDDEN), randn(tokens, MLP), randn(tokens, HIDDEN), randn(HIDDEN, scale=0.3))
            for _ in range(INPUT_SETS)]
    wq, w_scale = quantize_weight_fp8(randn(HIDDEN, k, scale=k ** -0.5))
    bias = randn(HIDDEN, scale=0.1)
    unfused, fused, got_unfused, got_fused = rotated_pair(
        sets, lambda head, tail, residual, gate: torch.addcmul(
            residual, gate, fp8_dense.dense_linear_fp8(head, wq, w_scale, bias, tail)),
        lambda head, tail, residual, gate: fp8_dense.dense_linear_fp8(head, wq, w_scale, bias, tail,
                                                                       residual=residual, gate=gate))
    head0, tail0, residual0, gate0 = sets[0]
    y = reference.dense_linear_fp8_reference(reference.cat_gelu_tanh_reference(head0, tail0).float(), wq, w_scale,
                                             bias.float())
    return unfused, fused, residual0.float() + gate0.float() * y, got_unfused, got_fused


def relative_error(got, want):
    return ((got.float() - want).norm() / want.norm()).item()


def main(argv=None):
    args = timed_gpu_bench_args(__doc__, "residual_epilogue.py", argv, calls=20)
    import torch
    from rt_lynx_pack.kernels import sm90
    available, info = sm90.availability_sm90(torch.device("cuda"))
    if not available:
        sys.exit(f"sm90 path unavailable: {info}")
    gpu = torch.cuda.get_device_name()
    lines = [f"# Gated residual in the GEMM's epilogue ({datetime.date.today()}, {gpu})", "",
             f"torch {torch.__version__}, commit {git_commit()}; FLUX.1-dev 1024² double-block shapes and the "
             f"single block's dense linear2, bf16 activations; unfused = the linear, then "
             f"torch.addcmul(residual, gate, y); fused = the op with residual and gate (one write). Kernel time: "
             f"CUDA-graph replays; eager: synchronised wall time; "
             f"{args.calls} calls x {args.repeats} repeats, the two in turns. Errors against fp32 math on the same "
             f"sparsified (fp8: and quantised) input.", "",
             "| precision | layer | M x K -> N | unfused kernel us | fused kernel us | x kernel | unfused eager us "
             "| fused eager us | x eager | err unfused | err fused |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = [("fp8", name, tokens, k, lambda tokens=tokens, k=k, gelu=gelu: cases(torch, "fp8", tokens, k, gelu))
            for name, tokens, k, gelu in SHAPES]
    rows.append(("fp8", "single linear2 (dense)", 4608, HIDDEN + MLP, lambda: dense_linear2_case(torch)))
    rows += [("bf16", name, tokens, k, lambda tokens=tokens, k=k, gelu=gelu: cases(torch, "bf16", tokens, k, gelu))
             for name, tokens, k, gelu in SHAPES]
    for precision, name, tokens, k, make in rows:
        unfused, fused, want, got_unfused, got_fused = make()
        fns = {"unfused": unfused, "fused": fused}
        kernel = interleaved_kernel_us(fns, args.calls, args.repeats)
        eager = interleaved_eager_us(fns, args.calls, args.repeats)
        row = (f"| {precision} | {name} | {tokens} x {k} -> {HIDDEN} | {kernel['unfused']:.1f} | "
               f"{kernel['fused']:.1f} | {kernel['unfused'] / kernel['fused']:.3f} | {eager['unfused']:.1f} | "
               f"{eager['fused']:.1f} | {eager['unfused'] / eager['fused']:.3f} | "
               f"{relative_error(got_unfused, want):.2e} | {relative_error(got_fused, want):.2e} |")
        print(row, flush=True)
        lines.append(row)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        slug = "".join(c if c.isalnum() else "_" for c in gpu)
        path = pathlib.Path(args.out) / f"residual-epilogue-{datetime.date.today()}-{slug}.md"
        path.write_text(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
