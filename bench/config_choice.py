"""Which sm90 GEMM config the tuner picks, against which config is fastest where the GEMM runs in
a model. Per shape (FLUX.1-dev / Qwen-Image at 1024², bf16 and e4m3), configs timed in turns:
  tuner     the pick and the candidate times of the tuner (sm90.plan_info: tuned on the first
            call's data, as in use)
  warm      CUDA-graph replays of one GEMM on the same input and weight (bench/kernels.py's
            per-config table): the weight partly stays in the L2 between calls
  in model  a CUDA graph of one GEMM per weight over distinct weights holding at least twice the
            L2, all on one compressed input (kept in the L2 where it fits, as a layer's input just
            written by its sparsify pass is): each weight comes from memory, as each layer's does
            in a model step
and, in the model setting and the same turns, bf16 F.linear over the same weights (the dense
baseline) and the sparsify pass alone (for the pick's metadata layout), which bound the Lynx
linear's speed-up over bf16 with these kernels (pass + fastest GEMM). For e4m3 also the dense
e4m3 GEMM (torch._scaled_mm row-wise), its quantise pass and cuSPARSELt's sparse e4m3 GEMM alone
over the same weights in the same turns: what any sparse e4m3 GEMM on this GPU gains over the dense
one. Prints per shape the config each setting finds fastest and what the tuner's pick loses in the
model setting; means per model both over shapes and weighted by how often a FLUX.1-dev step runs
each shape. Results go to bench/results/config-choice-<date>-<gpu>.md.
"""
import argparse
import datetime
import pathlib
import statistics
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import FLUX_STEP_COUNTS, LINEAR_SHAPES, git_commit, interleaved_kernel_us, write_markdown  # noqa: E402
from standalone import load_pack  # noqa: E402

CALLS, REPEATS = 10, 5
ELEMENTS = ("e4m3", "bf16")
FP8_DENSE, FP8_QUANTISE, CUSPARSELT = "dense e4m3 GEMM", "e4m3 quantise pass", "cuSPARSELt e4m3 GEMM"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--elements", default=",".join(ELEMENTS), help=f"comma-separated, of {ELEMENTS}")
    parser.add_argument("--suffix", default="", help="appended to the results file name")
    args = parser.parse_args()
    elements = args.elements.split(",")
    if not set(elements) <= set(ELEMENTS):
        parser.error(f"--elements: choose from {ELEMENTS}")
    import torch
    load_pack()
    from rt_lynx_pack.kernels import fp8, sm90
    from rt_lynx_pack.kernels.reference import quantize_weight_fp8

    l2_bytes = torch.cuda.get_device_properties(0).L2_cache_size
    cusparselt_fp8, why = fp8.availability_fp8(torch.device("cuda")) if "e4m3" in elements else (False, "")
    if "e4m3" in elements and not cusparselt_fp8:
        print(f"cuSPARSELt e4m3 GEMM left out: {why}", flush=True)
    rows = []
    for element in elements:
        e4m3 = element == "e4m3"
        for model, layer, m, k, n in LINEAR_SHAPES:
            g = torch.Generator(device="cuda").manual_seed(m + 3 * k + 7 * n)
            x = torch.randn(m, k, generator=g, device="cuda").to(torch.bfloat16)
            bias = torch.randn(n, generator=g, device="cuda").to(torch.bfloat16)
            weight_bytes = n * k * (1 if e4m3 else 2)
            count = max(2, min(24, -(-2 * l2_bytes // weight_bytes)))
            dense_weights, weights = [], []
            for _ in range(count):
                w = (torch.randn(n, k, generator=g, device="cuda") / k ** 0.5).to(torch.bfloat16)
                dense_weights.append(w)
                weights.append(quantize_weight_fp8(w) if e4m3 else (w, None))
            first_w, first_scale = weights[0]
            sm90.clear_plans()
            if e4m3:
                sm90.sparse_linear_fp8_sm90(x, first_w, first_scale, bias, True)
            else:
                sm90.sparse_linear_sm90(x, first_w, bias, True)
            # The only plan of this shape: the plans were cleared before the call.
            plan = next(p for p in sm90.plan_info() if p[:3] == (m, k, n) and p[6] == 0 and not p[7])
            configs = sm90.config_info(first_w.dtype)
            names = {index: name for *_, index, name in configs}
            inputs = {block: torch.ops.rt_lynx.sparsify_sm90(x, block, e4m3, True) for _, _, _, block, _, _ in configs}

            def gemm(index, block, w, w_scale):
                compressed, scale = inputs[block]
                return torch.ops.rt_lynx.sparse_mm_sm90(compressed, w, scale, w_scale, bias, m, index, torch.bfloat16)

            warm, in_model = {}, {}
            for _, _, _, block, index, name in configs:
                try:
                    gemm(index, block, first_w, first_scale)
                except RuntimeError as exc:
                    print(f"{layer} {element} {name}: {str(exc)[:120]}", flush=True)
                    continue
                warm[name] = lambda i=index, b=block: gemm(i, b, first_w, first_scale)
                in_model[name] = lambda i=index, b=block: [gemm(i, b, w, s) for w, s in weights]
            warm_us = interleaved_kernel_us(warm, CALLS, REPEATS)
            # The dense bf16 linear over the same weights and the pick's sparsify pass, in the same turns:
            # what bounds the Lynx linear's speed-up with these kernels (pass + fastest GEMM).
            pick_block = next(block for _, _, _, block, index, _ in configs if index == plan[4])
            others = {"dense": lambda: [torch.nn.functional.linear(x, w, bias) for w in dense_weights],
                      "pass": lambda: [torch.ops.rt_lynx.sparsify_sm90(x, pick_block, e4m3, True) for _ in weights]}
            if e4m3:
                others.update(fp8_baselines(x, bias, weights, cusparselt_fp8))
            model_us = {name: us / count
                        for name, us in interleaved_kernel_us({**in_model, **others}, 1, REPEATS).items()}
            baseline_us = {name: model_us.pop(name) for name in others}
            row = {"model": model, "layer": layer, "M": m, "K": k, "N": n, "element": element, "weights": count,
                   "tuner_pick": names[plan[4]], "dense_us": baseline_us.pop("dense"),
                   "pass_us": baseline_us.pop("pass"), "fp8_baselines_us": baseline_us,
                   "tuner_us": {names[i]: us for i, us in enumerate(plan[5])},
                   "warm_us": warm_us, "model_us": model_us}
            rows.append(row)
            print(row, flush=True)
            del weights, dense_weights, inputs, warm, in_model, others
            torch.cuda.empty_cache()

    gpu = torch.cuda.get_device_name()
    about = f"{datetime.date.today()}, {gpu}, torch {torch.__version__}, commit {git_commit()}"
    text = markdown(rows, about)
    print(text)
    write_markdown(args.out, f"config-choice-{datetime.date.today()}-{gpu.replace(' ', '_')}{args.suffix}", text)


def fp8_baselines(x, bias, weights, with_cusparselt):
    """The e4m3 baselines in the model setting, over the same weights: the dense e4m3 GEMM
    (torch._scaled_mm row-wise, x quantised beforehand, bias fused), the dense path's quantise pass,
    and, where its e4m3 path passed its self-test, cuSPARSELt's sparse e4m3 GEMM alone (no scales,
    no bias: a lower bound for a sparse e4m3 GEMM from that library)."""
    import torch
    from rt_lynx_pack.kernels import fp8_dense
    q, a = torch.ops.rt_lynx.quantize_rows_fp8(x)
    fast = fp8_dense.FAST_ACCUMULATION and x.shape[0] >= fp8_dense.FAST_ACCUMULATION_MIN_ROWS

    def dense_gemms():
        return [torch._scaled_mm(q, w.t(), scale_a=a, scale_b=w_scale.view(1, -1), bias=bias,
                                 out_dtype=torch.bfloat16, use_fast_accum=fast) for w, w_scale in weights]
    fns = {FP8_DENSE: dense_gemms, FP8_QUANTISE: lambda: [torch.ops.rt_lynx.quantize_rows_fp8(x) for _ in weights]}
    if with_cusparselt:
        m_padded = -(-x.shape[0] // 64) * 64
        compressed, _ = torch.ops.rt_lynx.sparsify_fp8(x, m_padded, True, 0)
        torch.ops.rt_lynx.sparse_mm_fp8(compressed, weights[0][0], m_padded)  # its plan search, before timing
        fns[CUSPARSELT] = lambda: [torch.ops.rt_lynx.sparse_mm_fp8(compressed, w, m_padded) for w, _ in weights]
    return fns


# The e4m3 rows' measures, us per call: the dense e4m3 GEMM, that GEMM with its quantise pass, our
# fastest sparse GEMM, cuSPARSELt's (nan where it did not run), the faster of the two, the Lynx linear.
def dense_e4m3_us(r):
    return r["fp8_baselines_us"][FP8_DENSE]


def dense_e4m3_linear_us(r):
    return dense_e4m3_us(r) + r["fp8_baselines_us"][FP8_QUANTISE]


def ours_us(r):
    return best_us(r["model_us"])


def cusparselt_us(r):
    return r["fp8_baselines_us"].get(CUSPARSELT, float("nan"))


def faster_sparse_us(r):
    return min(ours_us(r), r["fp8_baselines_us"].get(CUSPARSELT, float("inf")))


def lynx_us(r):
    return r["pass_us"] + ours_us(r)


def flux_step_total(rows, us):
    """us(r) summed over the rows' FLUX.1-dev shapes, each as often as a step runs it (None: no such row)."""
    step = [r for r in rows if r["model"] == "flux" and r["layer"] in FLUX_STEP_COUNTS]
    return sum(FLUX_STEP_COUNTS[r["layer"]] * us(r) for r in step) if step else None


def fp8_bound_lines(rows):
    """The e4m3 rows against the dense e4m3 GEMM: what the fastest sparse e4m3 GEMM (ours or
    cuSPARSELt's) gains alone, and what the Lynx linear (pass + our fastest GEMM) can gain."""
    rows = [r for r in rows if r.get("fp8_baselines_us")]
    if not rows:
        return []
    lines = ["", "e4m3 against the dense e4m3 GEMM (torch._scaled_mm row-wise, bias fused, x quantised beforehand) "
             "over the same weights in the same turns; fp8 dense linear = our quantise pass + that GEMM; cuSPARSELt = "
             "its sparse e4m3 GEMM alone (no scales or bias, which it cannot apply on this GPU). Times in us per call.", "",
             "| layer | M,K,N | dense e4m3 GEMM | quantise pass | our sparse GEMM | cuSPARSELt GEMM | "
             "x ours vs dense e4m3 | x cuSPARSELt vs dense e4m3 | x Lynx (pass + GEMM) vs dense e4m3 GEMM | "
             "x Lynx vs fp8 dense linear |", "|" + "---|" * 10]
    for r in rows:
        dense = dense_e4m3_us(r)
        lines.append(f"| {r['model']} {r['layer']} | {r['M']},{r['K']},{r['N']} | {dense:.1f} | "
                     f"{r['fp8_baselines_us'][FP8_QUANTISE]:.1f} | {ours_us(r):.1f} | {cusparselt_us(r):.1f} | "
                     f"x{dense / ours_us(r):.2f} | x{dense / cusparselt_us(r):.2f} | x{dense / lynx_us(r):.2f} | "
                     f"x{dense_e4m3_linear_us(r) / lynx_us(r):.2f} |")
    for model in dict.fromkeys(r["model"] for r in rows):
        sub = [r for r in rows if r["model"] == model]

        def mean_speedup(baseline, sparse):
            return statistics.mean(baseline(r) / sparse(r) for r in sub)
        lines.append(
            f"\ne4m3, {model} shapes, mean over shapes against the dense e4m3 GEMM: our fastest sparse GEMM alone "
            f"x{mean_speedup(dense_e4m3_us, ours_us):.2f}; cuSPARSELt's alone "
            f"x{mean_speedup(dense_e4m3_us, cusparselt_us):.2f}; the faster of the two per shape "
            f"x{mean_speedup(dense_e4m3_us, faster_sparse_us):.2f}; the Lynx linear (pass + our fastest GEMM) "
            f"x{mean_speedup(dense_e4m3_us, lynx_us):.2f} against the GEMM, "
            f"x{mean_speedup(dense_e4m3_linear_us, lynx_us):.2f} against the fp8 dense linear.")
        dense = flux_step_total(sub, dense_e4m3_us)
        if dense is not None:
            dense_linears = flux_step_total(sub, dense_e4m3_linear_us)
            ours, faster, lynx = (flux_step_total(sub, us) for us in (ours_us, faster_sparse_us, lynx_us))
            lines.append(f"Over a FLUX.1-dev step's sparsified linears: dense e4m3 GEMMs {dense / 1000:.2f} ms (with their "
                         f"quantise passes {dense_linears / 1000:.2f} ms), our fastest sparse GEMMs {ours / 1000:.2f} ms "
                         f"(x{dense / ours:.2f}), the faster of ours and cuSPARSELt's per shape {faster / 1000:.2f} ms "
                         f"(x{dense / faster:.2f}), Lynx linears (passes + our GEMMs) {lynx / 1000:.2f} ms "
                         f"(x{dense / lynx:.2f} against the GEMMs, x{dense_linears / lynx:.2f} against the fp8 dense "
                         f"linears).")
    return lines


def fastest(times):
    finite = {name: us for name, us in times.items() if us == us and us != float("inf")}
    return min(finite, key=finite.get)


def best_us(times):
    return times[fastest(times)]


def markdown(rows, about):
    lines = [f"# sm90 GEMM config choice ({about})", "",
             "Per shape: the tuner's pick; the fastest config when warm (one weight replayed) and in the model "
             "setting (distinct weights from memory, one input); the pick's time in the model setting against the "
             "fastest there; bf16 F.linear over the same weights and the sparsify pass (for the pick's metadata "
             "layout) in the same turns, and the speed-up over bf16 of the fastest GEMM alone and of the pass plus "
             "it. Times in us per call.", "",
             "| element | layer | M,K,N | tuner pick | fastest warm | fastest in model | pick in model | "
             "best in model | pick loses | dense bf16 | pass | x dense, best GEMM | x dense, pass + best GEMM |",
             "|" + "---|" * 13]
    losses = {}
    for r in rows:
        model_us = r["model_us"]
        best = fastest(model_us)
        pick_us = model_us.get(r["tuner_pick"], float("nan"))
        loss = pick_us / model_us[best] - 1
        losses.setdefault(r["element"], []).append(loss)
        lines.append(f"| {r['element']} | {r['model']} {r['layer']} | {r['M']},{r['K']},{r['N']} | {r['tuner_pick']} | "
                     f"{fastest(r['warm_us'])} | {best} | {pick_us:.1f} | {model_us[best]:.1f} | {loss:+.1%} | "
                     f"{r['dense_us']:.1f} | {r['pass_us']:.1f} | x{r['dense_us'] / model_us[best]:.2f} | "
                     f"x{r['dense_us'] / (r['pass_us'] + model_us[best]):.2f} |")
    for element, values in losses.items():
        lines.append(f"\n{element}: the tuner's pick is {statistics.mean(values):+.2%} slower on average than the "
                     f"fastest config in the model setting (worst {max(values):+.1%}).")
    for element in dict.fromkeys(r["element"] for r in rows):
        for model in dict.fromkeys(r["model"] for r in rows):
            sub = [r for r in rows if (r["element"], r["model"]) == (element, model)]
            gemm = [r["dense_us"] / ours_us(r) for r in sub]
            linear = [r["dense_us"] / lynx_us(r) for r in sub]
            lines.append(f"\n{element}, {model} shapes, speed-up over bf16 F.linear in the model setting, mean over "
                         f"shapes: fastest GEMM alone x{statistics.mean(gemm):.2f}, pass + fastest GEMM "
                         f"x{statistics.mean(linear):.2f}.")
            dense = flux_step_total(sub, lambda r: r["dense_us"])
            if dense is not None:
                gemm_sum = flux_step_total(sub, ours_us)
                pass_sum = flux_step_total(sub, lambda r: r["pass_us"])
                lines.append(f"Over a FLUX.1-dev step's sparsified linears (each shape as often as a step runs it, "
                             f"linear2 kept dense): bf16 F.linear {dense / 1000:.1f} ms, fastest GEMMs "
                             f"{gemm_sum / 1000:.1f} ms (x{dense / gemm_sum:.2f}), passes {pass_sum / 1000:.2f} ms "
                             f"(with them x{dense / (gemm_sum + pass_sum):.2f}).")
    lines += fp8_bound_lines(rows)
    lines += ["", "Every config, us per GEMM (tuner / warm / in model):", ""]
    names = list(dict.fromkeys(name for r in rows for name in r["model_us"]))
    lines += ["| element | layer | " + " | ".join(names) + " |", "|" + "---|" * (2 + len(names))]
    for r in rows:
        cells = []
        for name in names:
            values = [r[key].get(name, float("nan")) for key in ("tuner_us", "warm_us", "model_us")]
            cells.append(" / ".join(f"{v:.1f}" for v in values))
        lines.append(f"| {r['element']} | {r['model']} {r['layer']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
