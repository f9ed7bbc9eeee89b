"""The kernel benchmarks' timing and tables on the CPU: the queued timing against a simulated GPU
stream (host launches, a queue, events), and the LoRA branch benchmark's tables from made-up rows."""
import contextlib
import math
import sys
import types

import pytest

from helpers import load_bench


class SimulatedStream:
    """One CUDA stream: host calls advance the host clock, kernels run in launch order once the GPU
    is free, events take the time the GPU reaches them."""
    CYCLES_PER_S = 1.8e9

    def __init__(self):
        self.host = 0.0
        self.gpu_free = 0.0
        self.captured = None   # the kernel times of a CUDA graph being captured

    def launch(self, seconds, host_seconds=2e-6):
        if self.captured is not None:
            self.captured.append(seconds)
            return
        self.host += host_seconds
        start = max(self.host, self.gpu_free)
        self.gpu_free = start + seconds

    def torch(self):
        stream = self

        class Event:
            def __init__(self, enable_timing=False):
                self.at = None

            def record(self):
                stream.host += 1e-6
                self.at = max(stream.host, stream.gpu_free)

            def synchronize(self):
                stream.host = max(stream.host, self.at)

            def elapsed_time(self, other):
                return (other.at - self.at) * 1e3

        def synchronize():
            stream.host = max(stream.host, stream.gpu_free)

        class CUDAGraph:
            def replay(self):   # one launch of all its kernels, back to back
                stream.launch(sum(self.kernels), host_seconds=0.0)

        @contextlib.contextmanager
        def graph(cuda_graph, stream=None):
            self.captured = []
            try:
                yield
            finally:
                cuda_graph.kernels, self.captured = self.captured, None

        class Stream:
            def wait_stream(self, other):
                pass

        cuda = types.SimpleNamespace(Event=Event, synchronize=synchronize, CUDAGraph=CUDAGraph, graph=graph,
                                     Stream=Stream, current_stream=Stream,
                                     stream=lambda s: contextlib.nullcontext(),
                                     _sleep=lambda cycles: stream.launch(cycles / stream.CYCLES_PER_S))
        return types.SimpleNamespace(cuda=cuda)


@pytest.fixture
def common(monkeypatch):
    module = load_bench("common")
    stream = SimulatedStream()
    monkeypatch.setitem(sys.modules, "torch", stream.torch())
    monkeypatch.setattr(module.time, "perf_counter", lambda: stream.host)
    return module, stream


def test_queued_time_is_the_device_time_of_host_bound_calls(common):
    module, stream = common
    # 50 us of host time a call against 10 us of kernel: wall time says 50, the device needs 10.
    calls = {"host_bound": lambda: stream.launch(10e-6, host_seconds=50e-6),
             "device_bound": lambda: stream.launch(80e-6, host_seconds=5e-6)}
    result = module.interleaved_queued_us(calls, calls=20, repeats=3)
    assert result["host_bound"] == pytest.approx(10, rel=1e-6)
    assert result["device_bound"] == pytest.approx(80, rel=1e-6)


def test_queued_time_retries_behind_a_longer_kernel_when_launches_outlast_it(common):
    module, stream = common
    launches = {"count": 0}

    def slowing_down():   # cheap to launch while warming up, then 40x slower: the first queue is too short
        launches["count"] += 1
        stream.launch(10e-6, host_seconds=5e-6 if launches["count"] <= 23 else 200e-6)
    assert module.interleaved_queued_us({"fn": slowing_down}, calls=20, repeats=1)["fn"] == pytest.approx(10, rel=1e-6)


def test_queued_time_says_so_when_the_host_never_keeps_up(common, monkeypatch):
    module, stream = common
    monkeypatch.setattr(module, "QUEUE_MARGIN", 0.0)   # a queueing kernel of one cycle can never cover the launches
    with pytest.raises(RuntimeError, match="longer than the queueing kernel ran"):
        module.interleaved_queued_us({"fn": lambda: stream.launch(10e-6, host_seconds=50e-6)}, calls=20, repeats=1)


def test_graph_time_of_a_variant_whose_capture_fails_is_nan_and_the_others_are_timed(common):
    module, stream = common
    def breaks_its_capture():
        if stream.captured is not None:
            raise RuntimeError("operation failed due to a previous error during capture")
        stream.launch(30e-6)
    # The broken one first: the variants after it must still be captured and timed.
    result = module.interleaved_kernel_us({"broken": breaks_its_capture,
                                           "fine": lambda: stream.launch(10e-6, host_seconds=50e-6)}, calls=20, repeats=3)
    assert result["fine"] == pytest.approx(10, rel=1e-6)   # kernel time: the host's 50 us do not count
    assert math.isnan(result["broken"])


def test_lora_branch_tables_from_made_up_rows():
    lora_branch = load_bench("lora_branch")
    names = [*lora_branch.BRANCH_VARIANTS, "plain", *(name for name, _ in lora_branch.LAUNCH_MODES)]
    rows = []
    for shape, base in (((4096, 3072, 9216), 233.0), ((512, 3072, 9216), 40.0)):
        row = {"shape": shape, "backend": "sm90", "branch_in_gemm": True, "fused_down_runs": True,
               "k_extension_columns": 64, "kernel_down_us": 9.0, "kernel_down_transposed_us": 11.0}
        for timing in lora_branch.TIMINGS:
            for i, name in enumerate(dict.fromkeys(names)):
                row[f"{timing}_{name}_us"] = base if name == "plain" else base * (1.02 + 0.01 * i)
            for name in lora_branch.BRANCH_VARIANTS:
                row[f"{timing}_{name}_overhead"] = row[f"{timing}_{name}_us"] / row[f"{timing}_plain_us"] - 1
            for name, programmatic in lora_branch.LAUNCH_MODES:
                if not name.startswith("plain"):
                    base_name = "plain_programmatic" if programmatic else "plain"
                    row[f"{timing}_{name}_overhead"] = row[f"{timing}_{name}_us"] / row[f"{timing}_{base_name}_us"] - 1
        rows.append(row)
    text = lora_branch.markdown(rows, 32, "test")
    shape_rows = [line.split(" | ")[1] for line in text.splitlines() if line.startswith("| 4096,3072,9216 | ")]
    assert shape_rows == ["sm90", *lora_branch.TIMINGS]   # the variants' table, then the launch modes' one
    assert text.count("Mean overhead of the branch") == 3 and "queued" in text
    assert text.count("Mean branch overhead, queued time") == 1
