"""The end-to-end benchmark's logic on the CPU: its step profile sorts kernels by kind from their
names (the names below are the ones a FLUX step ran on the H200: torch 2.11, cuDNN attention,
Inductor, our kernels), its options, and its results files; and the config-choice benchmark's
summary of what bounds the Lynx linear."""
import pytest

from helpers import load_bench


# A results file's header fields, as e2e.py's save() writes them.
RESULTS_META = {"date": "2026-12-05 20:00 UTC", "gpu": "NVIDIA H200", "torch": "2.11", "comfyui": "0.3.64",
                "commit": "abc", "dtype": "bf16", "compile_backend": "inductor", "tiny": False, "complete": True,
                "args": {}}


@pytest.fixture(scope="module")
def e2e():
    return load_bench("e2e")


@pytest.mark.parametrize("name, kind", [
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_cga1x1x1_kernel0_0",
     "attention"),
    ("triton_red_fused__fused_rms_norm__scaled_dot_product_cudnn_attention__to_copy_add_mul_permute_27",
     "Inductor fused"),
    ("_ZN7cutlass13device_kernelINS_4gemm6kernel13GemmUniversalIN4cute5tupleIJiiiiEEEN7rt_lynx4sm9023"
     "KExtendedSparseMainloopINS8_19OverlappedSparseMmaINS1_1", "sparse GEMM"),
    ("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN", "dense GEMM"),
    ("void rt_lynx::(anonymous namespace)::qk_norm_rope_kernel<true, 4, false>(rt_lynx::QkNormRopeParams)",
     "RT-Lynx passes"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float, true>", "other"),
])
def test_kernel_kinds(e2e, name, kind):
    assert e2e.kernel_kind(name) == kind
    assert kind in e2e.PROFILE_KINDS


def test_sparsified_linears_kernel_time_counts_the_sparse_gemm_and_the_passes_that_feed_it(e2e):
    per_kernel = {
        "_ZN7cutlass13device_kernelINS_4gemm6kernel13GemmUniversalIN4cute5tupleIJiiiiEEEN7rt_lynx4sm9023"
        "KExtendedSparseMainloopINS8_19OverlappedSparseMmaINS1_1": 20.0,
        "void rt_lynx::(anonymous namespace)::sparsify_staged_kernel<true, 128, 1>(...)": 2.0,
        "void rt_lynx::(anonymous namespace)::sparsify_low_rank_kernel<true, 64, 4, 1>(...)": 1.5,
        "void rt_lynx::(anonymous namespace)::low_rank_extension_kernel<true, 64, 4>(...)": 0.25,
        "void rt_lynx::(anonymous namespace)::row_stats_kernel<true>(...)": 0.125,
        "void rt_lynx::(anonymous namespace)::qk_norm_rope_kernel<true, 4, false>(rt_lynx::QkNormRopeParams)": 3.0,
        "nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN": 10.0,
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128": 30.0,
    }
    assert e2e.lynx_linear_kernels(per_kernel) == {
        "ms": 23.875, "passes": {"sparsify_staged_kernel<true, 128, 1>": 2.0,
                                 "sparsify_low_rank_kernel<true, 64, 4, 1>": 1.5,
                                 "low_rank_extension_kernel<true, 64, 4>": 0.25, "row_stats_kernel<true>": 0.125}}
    with pytest.raises(SystemExit):
        e2e.parse_args(["--calibrate", "--lora-rank", "32"])
    with pytest.raises(SystemExit):
        e2e.parse_args(["--lora-rank", "0"])


def test_lora_cost_table_shows_the_step_and_the_sparsified_linears(e2e):
    cost = {"model": "flux", "resolution": 1024, "source": "random", "widgets": {"rank": 32}, "seconds": 1.5,
            "peak_gb": 30.0, "dense_ms": 180.0, "lynx_ms": 120.0, "lynx_lora_ms": 123.0, "lynx_lora_peak_gb": 31.0,
            "lynx_linear_kernel_ms": 40.0, "lynx_lora_linear_kernel_ms": 42.0}
    text = e2e.markdown(RESULTS_META, [], [], {}, [cost])
    assert ("| flux, random factors, Load Lynx LoRA (rank 32) | 1024 | 1.5 | 30.00 | 180.00 | 120.00 | 123.00 | "
            "+2.5% | 40.00 / 42.00 | +5.0% | 31.00 |") in text
    unprofiled = {k: v for k, v in cost.items() if "linear_kernel" not in k}
    assert "| +2.5% | - | - | 31.00 |" in e2e.markdown(RESULTS_META, [], [], {}, [unprofiled])


def test_modes_choose_the_rows_and_refuse_unknown_ones(e2e):
    assert e2e.parse_args([]).modes == ["eager", "compile"]
    assert e2e.parse_args(["--modes", "compile"]).modes == ["compile"]
    with pytest.raises(SystemExit):
        e2e.parse_args(["--modes", "compiled"])


def test_the_compile_mode_is_an_option_and_named_in_the_results(e2e):
    assert e2e.parse_args([]).compile_mode is None
    assert e2e.parse_args(["--compile-mode", "reduce-overhead"]).compile_mode == "reduce-overhead"
    with pytest.raises(SystemExit):
        e2e.parse_args(["--compile-mode", "cudagraphs"])
    header = "\n".join(e2e.markdown({**RESULTS_META, "args": {"compile_mode": "reduce-overhead"}}, [], [], {})
                       .splitlines()[:3])
    assert "compile backend inductor, mode reduce-overhead" in header
    assert "mode" not in "\n".join(e2e.markdown(RESULTS_META, [], [], {}).splitlines()[:3])


def test_compile_counts_show_a_graph_break_and_are_tabled(e2e):
    import torch

    def broken(x):
        x = x.sin()
        torch._dynamo.graph_break()
        return x.cos()

    torch._dynamo.reset()
    graphs, skips = e2e.compile_counts()
    torch.compile(broken, backend="eager")(torch.ones(3))
    assert e2e.compile_counts() == (graphs + 2, skips)   # no CUDA graphs asked for: nothing skipped
    row = {"model": "flux", "resolution": 1024, "batch": 1, "mode": "compile", "dense_ms": 140.0, "lynx_ms": 85.0,
           "speedup": 1.647, "dense_peak_gb": 22.0, "lynx_peak_gb": 33.0, "lynx_vs_dense_rel_error": 0.28,
           "dense_compiled_graphs": 1, "lynx_compiled_graphs": 3, "dense_cudagraph_skips": 0, "lynx_cudagraph_skips": 1}
    text = e2e.markdown(RESULTS_META, [row], [], {})
    assert "graphs dense 1 / Lynx 3" in text and "CUDA graphs dense 0 / Lynx 1" in text


def test_cudagraph_recordings_are_counted_inside_and_tabled(e2e):
    import torch._dynamo
    from torch._dynamo.callback import CallbackTrigger

    def trigger(kind):   # what torch's CUDA graph trees and Dynamo announce when they start
        with torch._dynamo.callback_handler.install_callbacks(kind, "0/0"):
            pass
    with e2e.counting_cudagraph_recordings() as recorded:
        trigger(CallbackTrigger.CUDAGRAPH_RECORDING)
        trigger(CallbackTrigger.DYNAMO)
        trigger(CallbackTrigger.CUDAGRAPH_RECORDING)
    trigger(CallbackTrigger.CUDAGRAPH_RECORDING)   # after the block: neither counted nor still registered
    assert len(recorded) == 2
    samples = [{"model": "flux", "resolution": 1024, "mode": "compile", "side": side, "steps": 28, "seconds": s,
                "cudagraphs_recorded": n} for side, s, n in (("dense", 4.0, 0), ("lynx", 2.66, 1))]
    assert "| 0 / 1 |" in e2e.markdown(RESULTS_META, [], samples, {})


def test_results_saved_before_the_run_ends_say_they_are_partial(e2e):
    # e2e.py saves after every row, so a device call that runs out of time keeps what it measured.
    assert "(partial" in e2e.markdown({**RESULTS_META, "complete": False}, [], [], {}).splitlines()[0]
    assert "(partial" not in e2e.markdown(RESULTS_META, [], [], {}).splitlines()[0]


def test_switched_lynx_times_are_taken_in_turns_and_tabled(e2e, monkeypatch):
    import contextlib

    import torch
    from rt_lynx_pack.kernels import sm90
    state, calls = {"fast_gelu": True, "programmatic_launch": False}, []

    def switch(name):
        @contextlib.contextmanager
        def entered(enabled):
            previous, state[name] = state[name], enabled
            try:
                yield
            finally:
                state[name] = previous
        return entered

    def fake_time_steps(patcher, arch, resolution, dev, dtype, args, profile=True):
        assert not profile
        turned = ("exact_gelu",) * (not state["fast_gelu"]) + ("programmatic_launch",) * state["programmatic_launch"]
        calls.append(turned)
        ms = 90.0 + 1.0 * (not state["fast_gelu"]) - 0.5 * state["programmatic_launch"]
        return ms, [ms, ms], 0.0, 0.0, 0.0, torch.full((4,), 1.0 + 0.01 * len(turned)), None

    for name in state:
        monkeypatch.setattr(sm90, name, switch(name))
    monkeypatch.setattr(e2e, "time_steps", fake_time_steps)
    args = e2e.parse_args(["--lynx-switches", "exact_gelu,programmatic_launch"])
    switched, off = e2e.time_switched(None, "flux", 1024, None, None, args, torch.ones(4))
    assert calls == [("exact_gelu",), ("programmatic_launch",), ("programmatic_launch",), ("exact_gelu",), ()]
    assert off == [90.0, 90.0]
    assert switched["lynx+exact_gelu"] == ([91.0] * 4, 0.01)
    assert switched["lynx+programmatic_launch"][0] == [89.5] * 4
    assert state == {"fast_gelu": True, "programmatic_launch": False}
    row = {"model": "flux", "resolution": 1024, "batch": 1, "mode": "compile", "dense_ms": 144.0, "lynx_ms": 90.0,
           "speedup": 1.6, "dense_peak_gb": 22.0, "lynx_peak_gb": 30.0, "lynx_vs_dense_rel_error": 0.28,
           "lynx_switches": ["lynx+exact_gelu"], "lynx+exact_gelu_ms": 91.0, "lynx+exact_gelu_vs_lynx_rel_diff": 0.01}
    text = e2e.markdown(RESULTS_META, [row], [], {})
    assert "| flux lynx+exact_gelu | 1024 | compile | 90.00 | 91.00 | 1.0111 | 1.582x | 1.00e-02 |" in text
    with pytest.raises(SystemExit):
        e2e.parse_args(["--lynx-switches", "fast_gelus"])
    with pytest.raises(SystemExit):   # replayed CUDA graphs keep what they recorded
        e2e.parse_args(["--lynx-switches", "exact_gelu", "--compile-mode", "reduce-overhead"])
    assert e2e.parse_args(["--lynx-switches", "exact_gelu", "--compile-mode", "reduce-overhead",
                           "--modes", "eager"]).lynx_switches == ["exact_gelu"]


def test_host_profile_times_a_call_and_names_the_functions_that_take_its_host_time(e2e):
    import time

    class NoDevice:
        def sync(self):
            pass

    def guard_checks():
        time.sleep(0.004)

    def forward():
        guard_checks()
        return sum(range(100))

    host = e2e.host_profile(forward, NoDevice(), iters=3)
    assert host["call_ms"] >= 4
    own, cumulative, where = host["top_functions"][0]
    assert "sleep" in where or "guard_checks" in where, host["top_functions"]
    assert own >= 3.5 and cumulative >= own


def test_guard_kinds_count_one_per_layer_as_one_kind():
    guard_time = load_bench("guard_time")
    listing = "\n".join([
        "| +- LAMBDA_GUARD: L['self']._modules['double_blocks']._modules['0']._modules['img_mlp']._modules['0'] is "
        "L['self']._modules['double_blocks']._modules['0']._modules['img_mlp']._modules['0'].forward.module  # bias",
        "+- LAMBDA_GUARD: L['self']._modules['single_blocks']._modules['7']._modules['linear1'] is "
        "L['self']._modules['single_blocks']._modules['7']._modules['linear1'].forward.module  # bias",
        "+- TENSOR_MATCH: L['img']",
        "+- LAMBDA_GUARD: G['torch'] is G['__import_torch_dot_nn_dot_functional'].torch  # return"])
    kinds = guard_time.python_guard_kinds(listing)
    assert kinds == {"L['self'] is L['self'].forward.module": 2,
                     "G['torch'] is G['__import_torch_dot_nn_dot_functional'].torch": 1}


def test_config_choice_weights_a_flux_step_by_how_often_it_runs_each_shape():
    # Two FLUX shapes: qkv (19 a step) 100 us dense, 40 us GEMM, 10 us pass; linear1 (38 a step)
    # 300 us dense, 100 us GEMM, 20 us pass. Per step: 13.3 ms dense, 4.56 ms GEMMs, 0.95 ms passes.
    config_choice = load_bench("config_choice")
    rows = [dict(model="flux", layer=layer, M=1, K=1, N=1, element="e4m3", weights=2, tuner_pick="a",
                 dense_us=dense, pass_us=pass_us, tuner_us={"a": gemm, "b": gemm + 5},
                 warm_us={"a": gemm, "b": gemm + 5}, model_us={"a": gemm + 2, "b": gemm})
            for layer, dense, gemm, pass_us in (("double img qkv", 100.0, 40.0, 10.0),
                                                ("single linear1", 300.0, 100.0, 20.0))]
    text = config_choice.markdown(rows, "test")
    assert "bf16 F.linear 13.3 ms, fastest GEMMs 4.6 ms (x2.92), passes 0.95 ms (with them x2.41)" in text
    assert "mean over shapes: fastest GEMM alone x2.75, pass + fastest GEMM x2.25" in text
    assert "the tuner's pick is +3.50% slower on average" in text   # the pick: 42 against 40, 102 against 100


def test_config_choice_sets_e4m3_against_the_dense_e4m3_gemm():
    # qkv (19 a step): dense e4m3 60 us + 5 us quantise, ours 40 us (+ 10 us pass), cuSPARSELt 30 us;
    # linear1 (38 a step): 150 + 6, ours 100 (+ 20), no cuSPARSELt time (its path unavailable).
    config_choice = load_bench("config_choice")
    rows = [dict(model="flux", layer=layer, M=1, K=1, N=1, element="e4m3", weights=2, tuner_pick="a",
                 dense_us=2 * fp8_dense, pass_us=pass_us, tuner_us={"a": gemm}, warm_us={"a": gemm},
                 model_us={"a": gemm}, fp8_baselines_us=baselines)
            for layer, fp8_dense, gemm, pass_us, baselines in (
                ("double img qkv", 60.0, 40.0, 10.0,
                 {config_choice.FP8_DENSE: 60.0, config_choice.FP8_QUANTISE: 5.0, config_choice.CUSPARSELT: 30.0}),
                ("single linear1", 150.0, 100.0, 20.0,
                 {config_choice.FP8_DENSE: 150.0, config_choice.FP8_QUANTISE: 6.0}))]
    text = config_choice.markdown(rows, "test")
    assert "| flux double img qkv | 1,1,1 | 60.0 | 5.0 | 40.0 | 30.0 | x1.50 | x2.00 | x1.20 | x1.30 |" in text
    # Means over the two shapes: ours (1.5 + 1.5) / 2; the faster per shape (2.0 + 1.5) / 2; Lynx
    # (1.2 + 1.25) / 2 against the GEMM, (1.3 + 1.3) / 2 against the linear.
    assert ("our fastest sparse GEMM alone x1.50; cuSPARSELt's alone xnan; the faster of the two per shape x1.75; "
            "the Lynx linear (pass + our fastest GEMM) x1.23 against the GEMM, x1.30 against the fp8 dense linear") in text
    # Per step: dense 19*60 + 38*150 = 6840 us (+ 19*5 + 38*6 = 323), ours 19*40 + 38*100 = 4560, the
    # faster 19*30 + 3800 = 4370, Lynx 4560 + 19*10 + 38*20 = 5510.
    assert ("dense e4m3 GEMMs 6.84 ms (with their quantise passes 7.16 ms), our fastest sparse GEMMs 4.56 ms (x1.50), "
            "the faster of ours and cuSPARSELt's per shape 4.37 ms (x1.57), Lynx linears (passes + our GEMMs) 5.51 ms "
            "(x1.24 against the GEMMs, x1.30 against the fp8 dense linears)") in text
    assert "e4m3 against the dense e4m3 GEMM" not in config_choice.markdown(
        [{**row, "fp8_baselines_us": {}} for row in rows], "test")


def test_lora_branch_weights_a_flux_step_by_how_often_it_runs_each_shape():
    # qkv (19 a step) 100 -> 110 us, linear1 (38 a step) 300 -> 303 us: 304 us added to 13.3 ms; a
    # Qwen-Image shape counts for nothing in a FLUX step.
    lora_branch = load_bench("lora_branch")
    rows = [{"shape": shape, "kernel_plain_us": plain, "kernel_in_gemm_fused_down_us": fused}
            for shape, plain, fused in (((4096, 3072, 9216), 100.0, 110.0), ((4608, 3072, 21504), 300.0, 303.0),
                                        ((8192, 3072, 3072), 50.0, 90.0))]
    weighted = lora_branch.step_weighted_overhead(rows, "kernel_in_gemm_fused_down_us")
    assert weighted == pytest.approx(304 / 13300)
    assert lora_branch.step_weighted_overhead(rows[2:], "kernel_in_gemm_fused_down_us") is None
