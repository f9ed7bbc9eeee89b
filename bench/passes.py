"""RT-Lynx's memory-bound passes at FLUX.1-dev 1024² shapes against their memory time.

Each pass's kernel time (CUDA-graph replays, the variants in turns), the bandwidth that makes of
its bytes (read once + written once), and how far that is from the GPU's HBM bandwidth (its data
sheet's figure; a device-to-device copy of 1 GiB in the same run shows what torch's copy reaches,
2.77 TB/s read + write on an H200, below what these passes reach). The GELU passes run with
the fast GELU (the default) and with torch's tanhf one (sm90.fast_gelu(False)); those whose output
is e4m3 also with the packed GELU (sm90.packed_e4m3_gelu(True)). The blocks'
modulation linears (one or two rows: a read of the weight) run as bf16 F.linear and with the
e4m3 weight of fp8 models.

Usage (GPU): python bench/passes.py [--out bench/results]
             python bench/passes.py --single-calls   (each pass once, for `ncu --profile-from-start off`;
                                                     bench/run_device.sh ncu-passes)
"""
import argparse
import datetime
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from standalone import load_pack  # noqa: E402

load_pack()
sys.path.insert(0, str(ROOT / "bench"))
from common import git_commit, interleaved_kernel_us  # noqa: E402

IMG, TXT, HIDDEN, MLP = 4096, 512, 3072, 12288   # FLUX.1-dev at 1024²: image and text tokens, widths
HEADS, HEAD_DIM = 24, 128
# Data-sheet HBM bandwidth by the part of torch.cuda.get_device_name() that tells the boards apart.
HBM_TB_PER_S = {"H100 80GB HBM3": 3.35, "H100 PCIe": 2.0, "H100 NVL": 3.9, "H200": 4.8}


def passes(torch, dev="cuda"):
    """{name: (fn, bytes moved, its GELU's output: None, "16-bit" or "e4m3")}: each pass with inputs
    made once."""
    from rt_lynx_pack.kernels import block_ops, fp8_dense  # noqa: F401  (defines the ops)
    bf16 = torch.bfloat16
    for name, check in (("fp8 dense", fp8_dense.availability_fp8_dense), ("block ops", block_ops.availability_block_ops)):
        ok, info = check(torch.device(dev))   # loads the extension, whose kernels the ops run
        if not ok:
            sys.exit(f"{name}: {info}")
    tokens = IMG + TXT
    gen = torch.Generator(device=dev).manual_seed(0)

    def randn(*shape, dtype=bf16):
        return torch.randn(*shape, generator=gen, device=dev, dtype=torch.float32).to(dtype)

    # Single block: linear1's output (q, k, v | MLP hidden) and the attention output.
    linear1_out = randn(tokens, 3 * HIDDEN + MLP)
    mlp_hidden = linear1_out[:, 3 * HIDDEN:]
    attention = randn(tokens, HIDDEN)
    linear2_in = randn(tokens, HIDDEN + MLP)
    # Double block: the image MLP's up projection output, the input of its down projection.
    mlp_up_out = randn(IMG, MLP)
    # Double block: img and txt qkv projections, their q/k norm weights, and the RoPE table.
    qkv_img, qkv_txt = randn(1, IMG, 3 * HIDDEN), randn(1, TXT, 3 * HIDDEN)
    norm_w = [randn(HEAD_DIM).abs() for _ in range(4)]
    angles = torch.rand(1, 1, tokens, HEAD_DIM // 2, generator=gen, device=dev) * 1000
    pe = torch.stack([angles.cos(), -angles.sin(), angles.sin(), angles.cos()], -1).reshape(
        1, 1, tokens, HEAD_DIM // 2, 2, 2)

    elems = tokens * (HIDDEN + MLP)
    input_bytes = elems * 2                               # attention + MLP hidden (or linear2_in), 16-bit
    rope_bytes = 2 * tokens * 3 * HIDDEN * 2 + pe.numel() * 4
    ops = torch.ops.rt_lynx
    # The blocks' modulation linears (one row per image): a read of the weight, bf16 or e4m3 (fp8 models).
    from rt_lynx_pack.kernels import quantize_weight_fp8
    modulation = {}
    for out_features in (6 * HIDDEN, 3 * HIDDEN):   # double-block img/txt_mod, single-block modulation
        w16 = randn(out_features, HIDDEN) * 0.02
        wq, w_scale = quantize_weight_fp8(w16)
        bias = randn(out_features)
        for rows in (1, 2):
            vec = randn(rows, HIDDEN)
            shape = f"{rows} x {HIDDEN} -> {out_features}"
            modulation[f"modulation {shape}, bf16 F.linear"] = (
                lambda vec=vec, w16=w16, bias=bias: torch.nn.functional.linear(vec, w16, bias),
                2 * out_features * HIDDEN, None)
            modulation[f"modulation {shape}, e4m3 weight"] = (
                lambda vec=vec, wq=wq, w_scale=w_scale, bias=bias: ops.linear_e4m3_weight(vec, wq, w_scale, bias),
                out_features * HIDDEN + 4 * out_features, None)
    # An fp8 model's weights are quantised at the start of every sampling run: the largest, linear1's.
    from rt_lynx_pack.kernels import reference
    linear1_weight = randn(3 * HIDDEN + MLP, HIDDEN) * 0.02
    weight_bytes = linear1_weight.numel() * 3 + linear1_weight.shape[0] * 4   # 16-bit in, e4m3 + a scale out
    weight_shape = f"single linear1 ({linear1_weight.shape[0]} x {HIDDEN})"
    table = {
        f"weight quantisation, {weight_shape}, torch ops": (
            lambda: reference.quantize_weight_fp8(linear1_weight), weight_bytes, None),
        f"weight quantisation, {weight_shape}, quantise pass": (
            lambda: quantize_weight_fp8(linear1_weight), weight_bytes, None),
        "quantise fp8, GELU tail (single linear2)": (lambda: ops.quantize_rows_fp8(attention, mlp_hidden),
                                                     input_bytes + elems + tokens * 4, "e4m3"),
        # 2:4 values in e4m3 (half the columns, a byte each), metadata of K/8 bytes a row, a scale a row.
        "sparsify fp8, GELU prologue (double img mlp down)": (
            lambda: ops.sparsify_sm90(mlp_up_out, 128, True, True, gelu=True),
            IMG * MLP * 2 + IMG * MLP // 2 + IMG * MLP // 8 + IMG * 4, "e4m3"),
        "quantise fp8, no GELU (15360 columns)": (lambda: ops.quantize_rows_fp8(linear2_in),
                                                  input_bytes + elems + tokens * 4, None),
        "cat + GELU (single linear2 input, bf16)": (lambda: ops.cat_gelu_tanh(attention, mlp_hidden),
                                                    2 * input_bytes, "16-bit"),
        "q/k norm + RoPE (double block)": (lambda: ops.qk_norm_rope(qkv_txt, norm_w[0], norm_w[1], qkv_img, norm_w[2],
                                                                    norm_w[3], pe, HEADS, 1e-6), rope_bytes, None),
        **modulation,
    }
    return table


def gelu_variants(name, gelu, sm90):
    """(label, context) of the variants a pass with this GELU is also timed in."""
    variants = [(name + " (exact GELU)", lambda: sm90.fast_gelu(False))] if gelu else []
    if gelu == "e4m3":
        variants.append((name + " (packed GELU)", lambda: sm90.packed_e4m3_gelu(True)))
    return variants


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--single-calls", action="store_true", help="each pass once (the default, fast GELU), for Nsight Compute")
    args = p.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        sys.exit("bench/passes.py needs a CUDA GPU")
    from rt_lynx_pack.kernels import sm90
    table = passes(torch)
    if args.single_calls:
        for fn, _, _ in table.values():
            fn()   # warm: the profiled calls find everything loaded
        torch.cuda.synchronize()
        torch.cuda.profiler.start()   # what `ncu --profile-from-start off` sees
        for fn, _, _ in table.values():
            fn()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        return
    copy_src = torch.empty(2**29, dtype=torch.float16, device="cuda")
    copy_dst = torch.empty_like(copy_src)
    fns = {"copy 1 GiB": lambda: copy_dst.copy_(copy_src)}
    contexts = {}
    for name, (fn, _, gelu) in table.items():
        fns[name] = fn
        for label, context in gelu_variants(name, gelu, sm90):
            fns[label], contexts[label] = fn, context
    us = interleaved_kernel_us(fns, args.calls, args.repeats, contexts)
    copy_tb = 2 * copy_src.numel() * 2 / (us["copy 1 GiB"] * 1e-6) / 1e12   # read + written
    gpu = torch.cuda.get_device_name()
    hbm = next((tb for word, tb in HBM_TB_PER_S.items() if word in gpu), None)
    lines = [f"# RT-Lynx passes against their memory time ({datetime.date.today()}, {gpu})", "",
             f"torch {torch.__version__}, commit {git_commit()}; FLUX.1-dev 1024² shapes ({IMG} + {TXT} tokens); "
             f"kernel time from CUDA-graph replays, {args.calls} calls x {args.repeats} repeats, variants in turns. "
             f"HBM {hbm or '?'} TB/s (data sheet); torch's 1 GiB copy reached {copy_tb:.2f} TB/s (read + write).", "",
             "| pass | MB moved | us | TB/s | x HBM time |", "|---|---|---|---|---|"]
    for name, (_, moved, gelu) in table.items():
        for label in [name] + [label for label, _ in gelu_variants(name, gelu, sm90)]:
            tb = moved / (us[label] * 1e-6) / 1e12
            versus = f"{hbm / tb:.2f}" if hbm else "-"
            lines.append(f"| {label} | {moved / 1e6:.0f} | {us[label]:.1f} | {tb:.2f} | {versus} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        path = pathlib.Path(args.out) / f"passes-{datetime.date.today()}-{gpu.replace(' ', '_')}.md"
        path.write_text(text)
        print("wrote", path)


if __name__ == "__main__":
    main()
