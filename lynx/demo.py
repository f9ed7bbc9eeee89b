"""The main job on the embedded default: a tiny FLUX-structured DiT, dense vs RT-Lynx.

Prints the layer plan, the relative error of the model output against dense (sparsify only,
and with norm compensation), per-layer output errors, and the time per forward of each.
"""
import argparse
import statistics
import time

import torch

from .linear import LynxConfig
from .patching import installed, plan_model
from .tiny_dit import TinyDiTConfig, TinyFluxDiT, random_inputs


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def time_forward(model, inputs, device, repeats: int) -> float:
    """Median wall time in ms of one forward (synchronised on CUDA)."""
    times = []
    with torch.inference_mode():
        for i in range(repeats + 2):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(*inputs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:  # the first calls build kernels and warm caches
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def layer_errors(model, plan, inputs) -> list[tuple[str, float]]:
    """Relative error of each sparsified layer's output vs its dense output, same layer inputs."""
    errors = []
    hooks = []
    forwards = plan.forwards

    def hook(module, args, output, name):
        dense = torch.nn.functional.linear(args[0], module.weight, module.bias)
        errors.append((name, relative_error(output, dense)))

    modules = dict(model.named_modules())
    for name in forwards:
        hooks.append(modules[name].register_forward_hook(lambda m, a, o, n=name: hook(m, a, o, n)))
    try:
        with torch.inference_mode(), installed(model, plan):
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return errors


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--image-tokens", type=int, default=1024)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--backend", default="auto", choices=["auto", "cuda", "reference"])
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp8"],
                        help="fp8: e4m3 products (sparse layers and the ones kept dense)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.manual_seed(args.seed)
    config = TinyDiTConfig(hidden=args.hidden, heads=max(1, args.hidden // 64))
    model = TinyFluxDiT(config).to(device, dtype).eval()
    inputs = random_inputs(config, 1, args.image_tokens, args.text_tokens,
                           torch.Generator().manual_seed(args.seed + 1), device, dtype)

    plan = plan_model(model, LynxConfig(compensate=True, backend=args.backend, precision=args.precision))
    plan_plain = plan_model(model, LynxConfig(compensate=False, backend=args.backend, precision=args.precision))
    print(f"tiny FLUX-structured DiT: hidden {config.hidden}, {config.double_blocks} double + "
          f"{config.single_blocks} single blocks, {args.image_tokens}+{args.text_tokens} tokens, "
          f"{device.type} {str(dtype).removeprefix('torch.')}, seed {args.seed}")
    print(plan.summary(device))

    with torch.inference_mode():
        dense_out = model(*inputs)
        with installed(model, plan_plain):
            plain_out = model(*inputs)
        with installed(model, plan):
            lynx_out = model(*inputs)
    print(f"relative error of the model output vs dense: sparsify only {relative_error(plain_out, dense_out):.4f}, "
          f"with norm compensation {relative_error(lynx_out, dense_out):.4f} "
          f"(random weights; bench/quality.py measures a trained model)")

    errors = layer_errors(model, plan, inputs)
    worst = max(errors, key=lambda e: e[1])
    print(f"per-layer relative output error: mean {statistics.mean(e for _, e in errors):.4f}, "
          f"worst {worst[1]:.4f} ({worst[0]})")

    dense_ms = time_forward(model, inputs, device, args.repeats)
    with installed(model, plan):
        lynx_ms = time_forward(model, inputs, device, args.repeats)
    print(f"time per forward: dense {dense_ms:.2f} ms, RT-Lynx {lynx_ms:.2f} ms "
          f"({dense_ms / lynx_ms:.2f}x)"
          + ("" if device.type == "cuda" else
             " [CPU runs the reference path: it checks the math, it is not the fast kernel]"))
