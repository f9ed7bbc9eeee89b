"""Cost of the Lynx LoRA branch at run time: the Lynx linear with and without a rank-r branch on
the FLUX.1-dev shapes at 1024² (H100 target: the branch adds at most 5% at rank 32).

Side by side in one run: the plain Lynx linear, the branch inside the sparse GEMM (sm90 K
extension) with down(x) by cuBLAS before the sparsify pass, the same with down(x) computed inside
the sparsify pass on tensor cores (sm90.low_rank_fusion; the default for ranks up to 32), and the
branch added after as two small products (the path of the other backends); and, for what each gives,
the plain and fused-down linears with programmatic dependent launch (sm90.programmatic_launch).
Eager wall time per call (median over repeats, synchronised), CUDA-graph kernel time, and the device
time of eager launches queued behind a long kernel (what eager ComfyUI runs, without host gaps), the
variants taking turns within every repeat so a clock drift shifts them alike. Results go to
bench/results/lora-branch-<date>-<gpu>.md.
"""
import argparse
import contextlib
import datetime
import pathlib
import statistics
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import (INPUT_SETS, flux_step_count, git_commit, interleaved_eager_us,  # noqa: E402
                    interleaved_kernel_us, interleaved_queued_us, rotating)

CALLS, REPEATS = 20, 5
BRANCH_VARIANTS = ("in_gemm", "in_gemm_fused_down", "added_after")
TIMINGS = ("kernel", "queued", "eager")   # CUDA-graph replays, eager launches queued on the GPU, eager wall

SHAPES = [(4096, 3072, 9216), (4096, 3072, 3072), (4096, 3072, 12288), (4096, 12288, 3072),
          (4608, 3072, 21504), (512, 3072, 9216)]


# (variant, programmatic launch); "plain" and "in_gemm_fused_down" are the defaults' variants above.
LAUNCH_MODES = [("plain", False), ("plain_programmatic", True),
                ("in_gemm_fused_down", False), ("fused_down_programmatic", True)]
LAUNCH_LABELS = {"plain": "Lynx us", "plain_programmatic": "Lynx, programmatic",
                 "in_gemm_fused_down": "fused down", "fused_down_programmatic": "fused down, programmatic"}


@contextlib.contextmanager
def _modes(sm90, programmatic):
    with sm90.programmatic_launch(programmatic), sm90.low_rank_fusion(True):
        yield


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--suffix", default="", help="appended to the results file name")
    args = parser.parse_args()
    import torch
    from standalone import load_pack
    load_pack()
    from rt_lynx_pack.kernels import LowRankOperands, prepare_low_rank, select_backend, sm90, sparse_linear

    rows = []
    for m, k, n in SHAPES:
        xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(INPUT_SETS)]
        next_x = rotating(xs)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
        b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        in_gemm = prepare_low_rank(torch.randn(args.rank, k) / k ** 0.5, torch.randn(n, args.rank) / args.rank ** 0.5,
                                   1.0, xs[0].device, xs[0].dtype)
        added_after = LowRankOperands(in_gemm.down, in_gemm.up, in_gemm.scale)
        backend = select_backend(xs[0], w, "auto", 2, 4).name
        down = in_gemm.down
        variants = {"plain": lambda: sparse_linear(next_x(), w, b, True),
                    "in_gemm": lambda: sparse_linear(next_x(), w, b, True, low_rank=in_gemm),
                    "in_gemm_fused_down": lambda: sparse_linear(next_x(), w, b, True, low_rank=in_gemm),
                    "added_after": lambda: sparse_linear(next_x(), w, b, True, low_rank=added_after)}
        # Where the in-GEMM overhead goes: the down projection (a skinny cuBLAS product that reads
        # x again), in both orientations cuBLAS offers; kernel time only.
        parts = {"down": lambda: torch.nn.functional.linear(next_x(), down),
                 "down_transposed": lambda: torch.mm(down, next_x().t())}
        contexts = {"in_gemm": lambda: sm90.low_rank_fusion(False),
                    "in_gemm_fused_down": lambda: sm90.low_rank_fusion(True)}
        # Launch modes: the switch of LAUNCH_MODES around its variant's turns.
        for name, programmatic in LAUNCH_MODES:
            if name in variants:
                continue   # a default's own variant
            variants[name] = variants["plain" if name.startswith("plain") else "in_gemm_fused_down"]
            contexts[name] = lambda programmatic=programmatic: _modes(sm90, programmatic)
        with sm90.low_rank_fusion(True):
            fusable = backend == "sm90" and sm90.low_rank_fused(args.rank)
        row = {"shape": (m, k, n), "backend": backend, "branch_in_gemm": in_gemm.up_k_extension is not None,
               "fused_down_runs": fusable}
        for name, us in interleaved_eager_us(variants, CALLS, REPEATS, contexts).items():
            row[f"eager_{name}_us"] = us
        for name, us in interleaved_kernel_us({**variants, **parts}, CALLS, REPEATS, contexts).items():
            row[f"kernel_{name}_us"] = us
        for name, us in interleaved_queued_us(variants, CALLS, REPEATS, contexts).items():
            row[f"queued_{name}_us"] = us
        row["k_extension_columns"] = next((p[6] for p in sm90.plan_info() if p[:4] == (m, k, n, "bf16") and p[6] > 0), 0)
        for timing in TIMINGS:
            for name in BRANCH_VARIANTS:
                row[f"{timing}_{name}_overhead"] = row[f"{timing}_{name}_us"] / row[f"{timing}_plain_us"] - 1
            for name, programmatic in LAUNCH_MODES:
                if not name.startswith("plain"):
                    base = "plain_programmatic" if programmatic else "plain"
                    row[f"{timing}_{name}_overhead"] = row[f"{timing}_{name}_us"] / row[f"{timing}_{base}_us"] - 1
        rows.append(row)
        print(row, flush=True)

    gpu = torch.cuda.get_device_name()
    text = markdown(rows, args.rank, f"{datetime.date.today()}, {gpu}, torch {torch.__version__}, commit {git_commit()}")
    print(text)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"lora-branch-{datetime.date.today()}-{gpu.replace(' ', '_')}{args.suffix}.md").write_text(text)


def step_weighted_overhead(rows, column):
    """The branch's added time over the Lynx linear's, each shape counted as often as a FLUX.1-dev step
    runs it (None: no FLUX shape among the rows)."""
    counted = [(flux_step_count(*r["shape"]), r) for r in rows]
    base = sum(count * r["kernel_plain_us"] for count, r in counted)
    if base == 0:
        return None
    return sum(count * (r[column] - r["kernel_plain_us"]) for count, r in counted) / base


def markdown(rows, rank, about):
    lines = [f"# Lynx LoRA branch cost, rank {rank} ({about})", "",
             "In GEMM: the branch in the sparse GEMM, down(x) by cuBLAS before the sparsify pass; "
             "fused down (the default): the same with down(x) inside the sparsify pass (column 'fused runs': the "
             "rank allows it); K ext: the logical columns the branch adds to the sparse GEMM (one k-tile of the "
             "chosen config); "
             "after: two products added after the Lynx linear.", "",
             "| M,K,N | backend | fused runs | K ext | Lynx kernel us | in GEMM | overhead | fused down | overhead | "
             "after | overhead | Lynx eager us | in GEMM | overhead | fused down | overhead | after | overhead | "
             "down(x) kernel us | down x^T kernel us |",
             "|" + "---|" * 20]
    for r in rows:
        cells = [",".join(map(str, r["shape"])), r["backend"] + ("" if r["branch_in_gemm"] else " (branch after)"),
                 "yes" if r["fused_down_runs"] else "no", str(r["k_extension_columns"])]
        for timing in ("kernel", "eager"):
            cells.append(f"{r[f'{timing}_plain_us']:.0f}")
            for name in BRANCH_VARIANTS:
                cells += [f"{r[f'{timing}_{name}_us']:.0f}", f"{r[f'{timing}_{name}_overhead']:+.1%}"]
        cells += [f"{r['kernel_down_us']:.0f}", f"{r['kernel_down_transposed_us']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    for name, label in (("in_gemm", "inside the sparse GEMM (K extension), down(x) by cuBLAS"),
                        ("in_gemm_fused_down", "inside the sparse GEMM, down(x) in the sparsify pass (the default)"),
                        ("added_after", "as two products added after")):
        kernel, queued, eager = (statistics.mean(r[f"{timing}_{name}_overhead"] for r in rows) for timing in TIMINGS)
        lines.append(f"\nMean overhead of the branch {label}: {kernel:+.1%} kernel time, {queued:+.1%} queued, "
                     f"{eager:+.1%} eager (target: at most +5% at rank 32).")
    weighted = step_weighted_overhead(rows, "kernel_in_gemm_fused_down_us")
    if weighted is not None:
        lines.append(f"\nOverhead of the branch with down(x) in the sparsify pass over a FLUX.1-dev step (each shape's "
                     f"kernel time times how often a step runs it; the shapes above only): {weighted:+.1%} kernel time.")
    modes = [name for name, _ in LAUNCH_MODES]
    lines += ["", "Launch modes, timed in the same turns: programmatic = programmatic dependent launch "
              "(sm90.programmatic_launch). Overheads against the Lynx linear without a branch in the same launch "
              "mode. Timing: kernel = CUDA-graph replays, queued = eager launches "
              "queued behind a long kernel (device time, no host gaps), eager = wall time.", "",
              "| M,K,N | timing | " + " | ".join(LAUNCH_LABELS[name] for name in modes) + " |",
              "|" + "---|" * (2 + len(modes))]
    for r in rows:
        for timing in TIMINGS:
            cells = [",".join(map(str, r["shape"])), timing]
            for name in modes:
                overhead = r.get(f"{timing}_{name}_overhead")
                cells.append(f"{r[f'{timing}_{name}_us']:.1f}" + ("" if overhead is None else f" ({overhead:+.1%})"))
            lines.append("| " + " | ".join(cells) + " |")
    for timing in TIMINGS:
        means = [f"{LAUNCH_LABELS[name]} {statistics.mean(r[f'{timing}_{name}_overhead'] for r in rows):+.1%}"
                 for name in modes if not name.startswith("plain")]
        speedup = statistics.mean(r[f"{timing}_plain_us"] / r[f"{timing}_plain_programmatic_us"] for r in rows)
        lines.append(f"\nMean branch overhead, {timing} time: {'; '.join(means)}. Lynx linear without a branch, "
                     f"plain launch over programmatic: x{speedup:.3f}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
