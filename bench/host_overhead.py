"""What a compiled model's call costs the host per tensor it takes, and whether weights packed into one
buffer per layer reach the kernels without a copy.

A FLUX.1-dev step compiled with `reduce-overhead` spends 6.9 ms (dense) and 9.2 ms (RT-Lynx fp8) of host
time before its CUDA graph replays (bench/e2e.py --profile, 2026-12-06), most of it in the compiled
frame's own bytecode, which gathers every parameter and buffer the graph takes as an input. An fp8 Lynx
layer takes three (e4m3 weight, channel scale, bias) where a dense one takes two.

1. Host time of a call against the number of tensor inputs: a chain of N small matrix products, each
   with its own weight, compiled with `reduce-overhead` (CUDA graphs); the call's host time from a
   synchronised start to its return, and the slope per input.
2. One uint8 buffer holding a layer's e4m3 weight, fp32 scale and bf16 bias, viewed by dtype inside
   the compiled graph and handed to torch._scaled_mm (an extern kernel, as the pack's ops are): the
   kernels the compiled call launches (a copy kernel would mean Inductor materialises the views).

Usage (GPU): python bench/host_overhead.py [--out bench/results]
"""
import argparse
import datetime
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import git_commit, kernel_names, write_markdown  # noqa: E402

INPUT_COUNTS = (250, 1000)


def host_ms(torch, fn, calls=30):
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    torch.cuda.synchronize()
    return statistics.median(times)


class Holder:
    """A tensor on a plain Python object, as the pack's fp8 copies hang off each layer's forward."""
    def __init__(self, weight):
        self.weight = weight


def chain_of_products(torch, inputs, on_python_objects=False, device="cuda", depth=1):
    """N weights, each `depth` modules down (FLUX's are 3-4: double_blocks.0.img_attn.qkv.weight)."""
    class Leaf(torch.nn.Module):
        def __init__(self, weight):
            super().__init__()
            if on_python_objects:
                self.holder = Holder(weight)
            else:
                self.weight = torch.nn.Parameter(weight)

        def forward(self, x):
            return x @ (self.holder.weight if on_python_objects else self.weight)

    def nested(weight, levels):
        return Leaf(weight) if levels <= 1 else torch.nn.Sequential(nested(weight, levels - 1))
    return torch.nn.Sequential(*(nested(torch.eye(16, device=device, dtype=torch.bfloat16), depth)
                                 for _ in range(inputs))).eval()


def packed_layer(torch, n=3072, k=3072, tokens=512):
    """(compiled fn, eager fn) of one fp8 linear whose weight, scale and bias live in one uint8 buffer."""
    weight = (torch.randn(n, k, device="cuda") * 0.05).to(torch.float8_e4m3fn)
    scale = torch.rand(n, device="cuda") + 0.5
    bias = torch.randn(n, device="cuda").to(torch.bfloat16)
    packed = torch.cat([weight.view(torch.uint8).reshape(-1), scale.view(torch.uint8), bias.view(torch.uint8)])
    x8 = (torch.randn(tokens, k, device="cuda")).to(torch.float8_e4m3fn)
    scale_x = torch.rand(tokens, 1, device="cuda") + 0.5

    def linear(x8, scale_x, packed):
        w = packed[:n * k].view(torch.float8_e4m3fn).view(n, k)
        s = packed[n * k:n * k + 4 * n].view(torch.float32).view(1, n)
        b = packed[n * k + 4 * n:].view(torch.bfloat16)
        return torch._scaled_mm(x8, w.t(), scale_a=scale_x, scale_b=s, bias=b, out_dtype=torch.bfloat16)
    compiled = torch.compile(linear)
    return (lambda: compiled(x8, scale_x, packed)), (lambda: linear(x8, scale_x, packed))



def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        sys.exit("bench/host_overhead.py needs a CUDA GPU")
    gpu = torch.cuda.get_device_name()
    lines = [f"# Host time of a compiled call per tensor input ({datetime.date.today()}, {gpu})", "",
             f"torch {torch.__version__}, commit {git_commit()}; a chain of N 16x16 bf16 products, N weights, "
             "torch.compile mode reduce-overhead; host time: synchronised start to return, median of 30 calls.", "",
             "| tensor inputs | weights held by | host ms a call |", "|---|---|---|"]
    x = torch.randn(16, 16, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        for on_python_objects, depth in ((False, 1), (True, 1), (False, 4), (True, 4)):
            holder = (f"{'plain Python objects' if on_python_objects else 'nn.Module parameters'}, "
                      f"{depth} module(s) down")
            points = []
            for inputs in INPUT_COUNTS:
                torch._dynamo.reset()
                compiled = torch.compile(chain_of_products(torch, inputs, on_python_objects, depth=depth),
                                         mode="reduce-overhead")
                for _ in range(3):
                    compiled(x)
                ms = host_ms(torch, lambda: compiled(x))
                points.append((inputs, ms))
                lines.append(f"| {inputs} | {holder} | {ms:.3f} |")
                print(lines[-1], flush=True)
            (n0, t0), (n1, t1) = points[0], points[-1]
            lines.append(f"| slope | {holder} | {(t1 - t0) / (n1 - n0) * 1000:.2f} us per input |")
        compiled, eager = packed_layer(torch)
        same = torch.equal(compiled(), eager())
        names = kernel_names(compiled)
        lines += ["", "One fp8 linear's weight, scale and bias in one uint8 buffer, viewed by dtype in the compiled "
                  f"graph: outputs equal to eager: {same}; kernels launched: " + "; ".join(n[:80] for n in names)]
    text = "\n".join(lines) + "\n"
    print(text)
    write_markdown(args.out, f"host-overhead-{datetime.date.today()}-{gpu.replace(' ', '_')}", text)


if __name__ == "__main__":
    main()
