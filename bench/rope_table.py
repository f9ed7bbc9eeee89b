"""ComfyUI's RoPE table (EmbedND) against the pack's rope_table op, eager and under torch.compile.

Under ComfyUI's torch.compile wrapper Inductor fuses EmbedND into one kernel that took 1.3 ms of every
FLUX.1-dev 1024² step on an H200, on both sides of the end-to-end benchmark; RT-Lynx's patched
model computes the same table (bit for bit, checked here) through one op Inductor leaves whole.
Per case: kernel time (CUDA-graph replays) and eager wall time (synchronised back-to-back calls),
the four variants in turns, and the ratios against the compiled EmbedND.

Usage (GPU): COMFYUI_PATH=.comfyui python bench/rope_table.py [--out bench/results]
"""
import datetime
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import (git_commit, interleaved_eager_us, interleaved_kernel_us, timed_gpu_bench_args,  # noqa: E402
                    write_results)
from e2e import import_comfyui  # noqa: E402

# (name, batch, text tokens, latent patches per side): FLUX's ids as Flux._forward builds them.
CASES = [("FLUX 1024²", 1, 512, 64), ("FLUX 1536²", 1, 512, 96), ("batch 2, 256 text tokens, 1024²", 2, 256, 64)]
THETA, AXES_DIM = 10000, (16, 56, 56)   # FLUX.1 and Qwen-Image


def flux_ids(batch, text_tokens, height, width, device="cpu", offset=0.0, dtype=None):
    """Flux._forward's ids (bf16 by default, the latent's dtype): text tokens at 0, image patches at
    (0, row, column) + offset."""
    import torch
    dtype = dtype or torch.bfloat16
    img = torch.zeros(height, width, 3, device=device, dtype=dtype)
    img[:, :, 1] += torch.linspace(offset, height - 1 + offset, steps=height, device=device, dtype=dtype).unsqueeze(1)
    img[:, :, 2] += torch.linspace(offset, width - 1 + offset, steps=width, device=device, dtype=dtype).unsqueeze(0)
    img = img.reshape(1, height * width, 3).expand(batch, -1, -1)
    return torch.cat([torch.zeros(batch, text_tokens, 3, device=device, dtype=dtype), img], dim=1)


def main(argv=None):
    args = timed_gpu_bench_args(__doc__, "rope_table.py", argv, calls=10)
    import torch
    import_comfyui(tiny=False)
    from comfy.ldm.flux.layers import EmbedND
    from rt_lynx_pack.kernels import rope_table

    embed = EmbedND(dim=sum(AXES_DIM), theta=THETA, axes_dim=list(AXES_DIM))
    compiled_embed = torch.compile(embed)
    compiled_op = torch.compile(lambda ids: rope_table(ids, THETA, AXES_DIM))
    gpu = torch.cuda.get_device_name()
    lines = [f"# RoPE table: ComfyUI's EmbedND against rt_lynx::rope_table ({datetime.date.today()}, {gpu})", "",
             f"torch {torch.__version__}, commit {git_commit()}; theta {THETA}, axes {AXES_DIM}; kernel time from "
             f"CUDA-graph replays, eager from synchronised calls ({args.calls} calls x {args.repeats} repeats, "
             f"variants in turns). Ratios: the compiled EmbedND's time over the variant's.", "",
             "| case | variant | kernel us | eager us | x kernel | x eager | same bits as eager EmbedND |",
             "|---|---|---|---|---|---|---|"]
    rows = []
    for name, batch, text_tokens, side in CASES:
        ids = flux_ids(batch, text_tokens, side, side, device="cuda")
        fns = {"EmbedND, eager": lambda: embed(ids), "EmbedND, compiled": lambda: compiled_embed(ids),
               "rope_table op, eager": lambda: rope_table(ids, THETA, AXES_DIM),
               "rope_table op, compiled": lambda: compiled_op(ids)}
        want = embed(ids)
        same = {variant: torch.equal(fn(), want) for variant, fn in fns.items()}
        kernel = interleaved_kernel_us(fns, args.calls, args.repeats)
        eager = interleaved_eager_us(fns, args.calls, args.repeats)
        base_kernel, base_eager = kernel["EmbedND, compiled"], eager["EmbedND, compiled"]
        for variant in fns:
            rows.append({"case": name, "tokens": ids.shape[1], "batch": batch, "variant": variant,
                         "kernel_us": kernel[variant], "eager_us": eager[variant], "same_bits": same[variant]})
            lines.append(f"| {name} ({ids.shape[1]} tokens) | {variant} | {kernel[variant]:.1f} | {eager[variant]:.1f} "
                         f"| {base_kernel / kernel[variant]:.2f} | {base_eager / eager[variant]:.2f} | "
                         f"{'yes' if same[variant] else 'no'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        meta = {"date": str(datetime.date.today()), "gpu": gpu, "torch": torch.__version__, "commit": git_commit()}
        write_results(args.out, "rope-table-{tag}", meta, rows, text)
    if not all(row["same_bits"] for row in rows if row["variant"].startswith("rope_table")):
        sys.exit("the rope_table op gave other bits than ComfyUI's eager EmbedND")


if __name__ == "__main__":
    main()
