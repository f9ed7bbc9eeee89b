"""Host time torch.compile's guards take on each call of a compiled model, dense against RT-Lynx (CPU).

A compiled FLUX.1-dev step with RT-Lynx fp8 spends 2.3 ms more host time per call than the dense one
before its CUDA graph replays (bench/e2e.py --profile, H100, 2026-12-06), and ComfyUI's samplers wait
for each step, so that time adds to every step. Part of it is the guards Dynamo evaluates on every call:
one per Python value the trace read. This compiles the pack's FLUX-structured DiT with FLUX.1-dev's
block count (19 double, 38 single; small width: guards do not depend on it), dense and with a Lynx plan
installed (bf16 and fp8, the reference path), and times the compiled frame's guard check alone, with
how many guards there are and how many of them Python evaluates (LAMBDA_GUARD), by kind. Then, on a
stack of linears, the same for ways a replaced forward can reach its state: guards on nn.Modules are
skipped while the modules' dicts are unchanged, guards on other Python objects are evaluated each call.

Usage (no GPU needed): python bench/guard_time.py [--out bench/results]
"""
import argparse
import collections
import datetime
import pathlib
import re
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from standalone import load_pack  # noqa: E402

load_pack()
sys.path.insert(0, str(ROOT / "bench"))
from common import git_commit, write_markdown  # noqa: E402


def guard_check_ms(torch, model, inputs, checks, argument_names=("img", "txt", "timesteps")):
    """(median ms of the compiled frame's guard check, guard listing) for `model` compiled afresh."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    torch._dynamo.reset()

    def backend(graph, example_inputs):   # compiles nothing: only the guards matter here
        return graph.forward
    torch.compile(model, backend=backend)(*inputs)
    (entry,) = _debug_get_cache_entry_list(type(model).forward.__code__)
    frame_locals = dict(zip(("self", *argument_names), (model, *inputs)))
    if not entry.guard_manager.check(frame_locals):
        raise RuntimeError("the guards fail on the inputs they were made for")
    times = []
    for _ in range(checks):
        start = time.perf_counter()
        entry.guard_manager.check(frame_locals)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), str(entry.guard_manager)


def python_guard_kinds(listing: str) -> collections.Counter:
    """LAMBDA_GUARD lines with module paths and indices collapsed, so one per layer counts as one kind."""
    kinds = collections.Counter()
    for line in listing.splitlines():
        if "LAMBDA_GUARD" in line:
            text = re.sub(r"\._modules\['[^']*'\]|\[\d+\]", "", line.split("LAMBDA_GUARD:")[1].split("#")[0]).strip()
            kinds[text] += 1
    return kinds


# How a layer's replaced forward reaches its state: a stack of linears, each forward replaced.
class _SharedSetting:
    scale = 2.0


class _ForwardHoldingItsModule:   # as the pack installs its layers today
    def __init__(self, module, setting):
        self.module, self.setting = module, setting

    def __call__(self, x):
        return x @ self.module.weight.t() * self.setting.scale


class _StateObject:
    def __init__(self, setting):
        self.setting = setting


def _bound_state_object(module, x):
    return x @ module.weight.t() * module.rt_state.setting.scale


def _bound_module_attributes(module, x):
    y = x @ module.weight.t()
    return y if module.rt_dense else y * module.rt_scale


def _bound_state_module(module, x):
    y = x @ module.weight.t()
    return y if module.rt_state.dense else y * module.rt_state.scale


def _bound_state_module_shared(module, x):
    y = x @ module.weight.t()
    return y if module.rt_state.runtime.dense else y * module.rt_state.setting.scale


def forward_installations(torch, layers=200):
    """{name: a stack of `layers` 8 x 8 linears with its forward replaced that way}."""
    import types

    class StateModule(torch.nn.Module):
        def __init__(self, setting=None, runtime=None):
            super().__init__()
            self.dense, self.scale = False, 2.0
            self.setting, self.runtime = setting, runtime

    class Runtime:
        dense = False
    runtime = Runtime()

    class Stack(torch.nn.Module):
        def __init__(self, linears):
            super().__init__()
            self.linears = linears

        def forward(self, x):
            for linear in self.linears:
                x = linear(x)
            return x

    def stack(install):
        linears = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(layers))
        setting = _SharedSetting()
        for linear in linears:
            install(linear, setting)
        return Stack(linears)

    def holding(linear, setting):
        linear.forward = _ForwardHoldingItsModule(linear, setting)

    def bound(function, state):
        def install(linear, setting):
            state(linear, setting)
            linear.forward = types.MethodType(function, linear)
        return install
    return {
        "Linear's own forward": stack(lambda linear, setting: None),
        "an object holding its module and a shared setting (the pack's layers until 2026-12-06)": stack(holding),
        "a method bound to the module, state in a plain object": stack(bound(
            _bound_state_object, lambda linear, setting: setattr(linear, "rt_state", _StateObject(setting)))),
        "a method bound to the module, state in the module's attributes": stack(bound(
            _bound_module_attributes, lambda linear, setting: linear.__dict__.update(rt_dense=False, rt_scale=2.0))),
        "a method bound to the module, state in a child nn.Module": stack(bound(
            _bound_state_module, lambda linear, setting: setattr(linear, "rt_state", StateModule()))),
        "the same, the child reading a setting and a runtime object all layers share": stack(bound(
            _bound_state_module_shared,
            lambda linear, setting: setattr(linear, "rt_state", StateModule(setting, runtime)))),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--checks", type=int, default=300)
    args = p.parse_args(argv)
    import torch
    from rt_lynx_pack.lynx import LynxConfig, installed, plan_model
    from rt_lynx_pack.lynx.tiny_dit import TinyDiTConfig, TinyFluxDiT, random_inputs
    config = TinyDiTConfig(hidden=256, heads=2, double_blocks=19, single_blocks=38)
    model = TinyFluxDiT(config).eval()
    inputs = random_inputs(config, 1, 64, 16, torch.Generator().manual_seed(0))
    lines = [f"# Guard time of a compiled call ({datetime.date.today()}, CPU)", "",
             f"torch {torch.__version__}, commit {git_commit()}; the pack's FLUX-structured DiT with 19 double and "
             f"38 single blocks (width {config.hidden}), compiled without a backend's work; the compiled frame's "
             f"guard check alone, median of {args.checks}.", "",
             "| model | guard check ms | guards (lines) | evaluated in Python | layers patched |", "|---|---|---|---|---|"]
    listings = {}
    with torch.inference_mode():
        variants = [("dense", None), ("Lynx bf16", LynxConfig(backend="reference", min_tokens=1)),
                    ("Lynx fp8", LynxConfig(backend="reference", min_tokens=1, precision="fp8"))]
        for name, lynx in variants:
            if lynx is None:
                ms, listing = guard_check_ms(torch, model, inputs, args.checks)
                layers = 0
            else:
                plan = plan_model(model, lynx)
                with installed(model, plan):
                    ms, listing = guard_check_ms(torch, model, inputs, args.checks)
                layers = len(plan.installed_forwards)
            listings[name] = listing
            lines.append(f"| {name} | {ms:.3f} | {len(listing.splitlines())} | {listing.count('LAMBDA_GUARD')} | "
                         f"{layers} |")
            print(lines[-1], flush=True)
    lines += ["", "Guards evaluated in Python, Lynx fp8, by kind (count):", ""]
    lines += [f"- {count} x `{kind}`" for kind, count in python_guard_kinds(listings["Lynx fp8"]).most_common(6)]
    lines += ["", "How a replaced forward reaches its state, 200 linears (8 x 8) in a stack:", "",
              "| forward | guard check ms | guards (lines) | evaluated in Python |", "|---|---|---|---|"]
    x = torch.randn(2, 8)
    with torch.inference_mode():
        for name, stack in forward_installations(torch).items():
            ms, listing = guard_check_ms(torch, stack, (x,), args.checks, argument_names=("x",))
            lines.append(f"| {name} | {ms:.4f} | {len(listing.splitlines())} | {listing.count('LAMBDA_GUARD')} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    write_markdown(args.out, f"guard-time-{datetime.date.today()}-cpu", text)


if __name__ == "__main__":
    main()
