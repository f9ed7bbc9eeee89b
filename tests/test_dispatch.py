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


def test_modulation_product_with_an_e4m3_weight_on_the_cpu_is_the_reference_and_its_fake_has_the_cuda_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from rt_lynx_pack.kernels import fp8_dense, linear_e4m3_weight_reference, linear_fp8_weight, quantize_weight_fp8
    g = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(2, 256, generator=g), torch.randn(96, 256, generator=g), torch.randn(96, generator=g)
    wq, w_scale = quantize_weight_fp8(weight)
    want = linear_e4m3_weight_reference(x, wq, w_scale, bias)
    # The reference: x times the dequantised weight, x itself not quantised.
    torch.testing.assert_close(want, x @ (wq.float() * w_scale[:, None]).t() + bias, rtol=1e-6, atol=1e-5)
    assert torch.equal(linear_fp8_weight(x, wq, w_scale, bias), want)
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run"):
        linear_fp8_weight(x, wq, w_scale, bias, "cuda")
    with FakeTensorMode():
        y = torch.ops.rt_lynx.linear_e4m3_weight(torch.empty(2, 3072, dtype=torch.bfloat16),
                                                 torch.empty(18432, 3072, dtype=torch.float8_e4m3fn),
                                                 torch.empty(18432), None)
    assert y.shape == (2, 18432) and y.dtype == torch.bfloat16

    bf16 = x.to(torch.bfloat16)
    assert fp8_dense.supports_linear_e4m3_weight(bf16, wq) == (True, "")
    assert fp8_dense.supports_linear_e4m3_weight(bf16[:1].expand(20, -1), wq) == (True, "")   # launches of 8 rows
    misaligned = torch.zeros(96 * 256 + 1, dtype=torch.uint8)[1:].view(torch.float8_e4m3fn).view(96, 256)
    for x2d, w8, why in ((x, wq, "dtype"), (bf16, weight, "e4m3"), (bf16, misaligned, "16-byte aligned"),
                         (bf16[:, :248], wq[:, :248].contiguous(), "multiple of 16"),
                         (torch.zeros(1, 32768, dtype=torch.bfloat16), torch.zeros(8, 32768).to(torch.float8_e4m3fn),
                          "up to 24576"), (bf16[0], wq, "2-D")):
        supported, reason = fp8_dense.supports_linear_e4m3_weight(x2d, w8)
        assert not supported and why in reason, reason


def test_modulation_rows_beyond_one_launch_go_in_launches_of_what_shared_memory_holds():
    from rt_lynx_pack.kernels import fp8_dense, linear_e4m3_weight_reference, quantize_weight_fp8
    launches = []

    def kernel(x, wq, w_scale, bias):   # the CUDA op's contract, on the CPU
        assert 1 <= x.shape[0] <= fp8_dense.GEMV_MAX_ROWS
        assert x.shape[0] * x.shape[1] * 2 <= fp8_dense.GEMV_MAX_SHARED_BYTES
        launches.append(x.shape[0])
        return linear_e4m3_weight_reference(x, wq, w_scale, bias)
    g = torch.Generator().manual_seed(1)
    with torch.library._scoped_library("rt_lynx", "IMPL") as lib:
        lib.impl("linear_e4m3_weight", kernel, "CPU")
        for rows, k, expected in ((20, 3072, [8, 8, 4]), (13, 4096, [6, 6, 1]), (3, 256, [3])):
            x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
            wq, w_scale = quantize_weight_fp8(torch.randn(48, k, generator=g))
            bias = torch.randn(48, generator=g)
            launches.clear()
            got = fp8_dense.linear_e4m3_weight(x, wq, w_scale, bias)
            assert launches == expected
            assert torch.equal(got, linear_e4m3_weight_reference(x, wq, w_scale, bias.to(torch.bfloat16)))


def test_weight_quantisation_on_the_cpu_is_the_reference_and_checks_the_backend():
    from rt_lynx_pack.kernels import quantize_weight_fp8, reference
    weight = torch.randn(40, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    wq, w_scale = quantize_weight_fp8(weight)
    want_q, want_scale = reference.quantize_weight_fp8(weight)
    assert torch.equal(wq.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(w_scale, want_scale)
    with pytest.raises(ValueError, match="unknown backend 'triton'"):
        quantize_weight_fp8(weight, "triton")


def test_quantise_pass_input_check_names_what_it_cannot_read():
    from rt_lynx_pack.kernels import fp8_dense
    rows = torch.zeros(4, 64, dtype=torch.bfloat16)
    assert fp8_dense.supports_quantize_rows(rows) == (True, "")
    misaligned = torch.zeros(4 * 64 + 1, dtype=torch.bfloat16)[1:].view(4, 64)
    for x, why in ((rows.float(), "bfloat16/float16"), (rows[:, :8].contiguous(), "multiple of 16"),
                   (torch.zeros(1, 40000, dtype=torch.bfloat16), "at most 32768"), (rows[0], "2-D"),
                   (torch.zeros(4, 32, dtype=torch.bfloat16)[:, :16], "contiguous"), (misaligned, "16-byte aligned")):
        supported, reason = fp8_dense.supports_quantize_rows(x)
        assert not supported and why in reason, reason
