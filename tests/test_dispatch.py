import logging

import pytest

import torch

from rt_lynx_pack.kernels import dispatch, fast_path_availability, select_backend, sparse_linear, sparse_linear_reference


def test_cpu_and_unsupported_patterns_use_the_reference_with_a_reason():
    x, w = torch.randn(64, 128), torch.randn(32, 128)
    choice = select_backend(x, w, "auto", 2, 4)
    assert choice.name == "reference" and "CUDA" in choice.reason
    assert select_backend(x, w, "auto", 1, 4).reason.startswith("1:4 has no sparse tensor core kernel")
    with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run \(64, 128\) x \(32, 128\) float32: cpu device"):
        select_backend(x, w, "cuda", 2, 4)
    assert select_backend(x, w, "reference", 2, 4).reason == "reference backend requested"
    available, reason = fast_path_availability(torch.device("cpu"))
    assert not available and "CUDA" in reason


def test_dispatch_logs_each_reason_once(caplog):
    x, w, b = torch.randn(64, 128), torch.randn(32, 128), torch.randn(32)
    dispatch._logged_messages.clear()
    dispatch._reported.clear()
    with caplog.at_level(logging.INFO, logger="rt_lynx"):
        for _ in range(3):
            y = sparse_linear(x, w, b, True, "auto")
    assert torch.equal(y, sparse_linear_reference(x, w, b, True))
    assert sum("reference PyTorch path" in r.message for r in caplog.records) == 1


def test_the_best_backends_failure_is_logged_when_the_next_one_takes_over(monkeypatch, caplog):
    # A self-test failure of the sm90 GEMM would otherwise show only as a slower product.
    def availability(device, precision, backend):
        return (False, "sm90 sparse GEMM unavailable: self-test differs") if backend == "sm90" else (True, "ok")
    monkeypatch.setattr(dispatch, "backend_availability", availability)
    monkeypatch.setattr(dispatch, "fast_backends", lambda: ("sm90", "cusparselt"))
    monkeypatch.setattr(dispatch, "_fast", type("Fast", (), {"supports": staticmethod(lambda x, w: (True, ""))}))
    monkeypatch.setattr(dispatch, "_logged_messages", set())
    x, w = torch.randn(64, 128), torch.randn(32, 128)
    with caplog.at_level(logging.INFO, logger="rt_lynx"):
        assert dispatch._choose(x, w, "auto", 2, 4, "bf16").name == "cusparselt"
    assert "self-test differs" in caplog.text
