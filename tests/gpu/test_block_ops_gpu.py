"""GPU tests of the fused block kernels (kernels/block_ops.py, csrc/block_elementwise.cu) against
the reference (kernels/reference.py), which is ComfyUI's own FLUX / Qwen-Image math.

Tolerance: the kernel and the reference differ only in the order of the sum of squares and in
rsqrt's last bits, which can move a normalised value across a rounding boundary of the 16-bit
dtype: one unit in the last place of that value, then mixed with its pair by RoPE. A rotation
keeps a pair's norm, so q and k are held to 4 ulp of the dtype at their pair's norm; v is copied
bit for bit. cat_gelu_tanh equals the reference bit for bit (torch's GELU math in its order).
Outputs are allocated over NaN-poisoned memory, so an element the kernel does not write fails.
Skipped without CUDA or on a non-Hopper GPU; on Hopper the kernels must be available.
"""
import pytest
import torch

from rt_lynx_pack.kernels import cat_gelu_tanh, qk_norm_rope
from rt_lynx_pack.kernels.sm90 import fast_gelu
from rt_lynx_pack.kernels.reference import cat_gelu_tanh_reference, qk_norm_rope_reference, qk_norm_rope_split_reference

from kernel_helpers import DTYPES, INPUT_KINDS, assert_gelu_close, make_input, poison_allocator, require_fast_path

ULP = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


@pytest.fixture(scope="module")
def block_ops():
    return require_fast_path("block_ops")


def flux_pe(batch, tokens, head_dim, generator):
    """A RoPE table as FLUX's EmbedND makes it: rotations [[cos, -sin], [sin, cos]] per position and pair."""
    angles = torch.rand(batch, 1, tokens, head_dim // 2, generator=generator, device="cuda") * 1000
    cos, sin = torch.cos(angles), torch.sin(angles)
    return torch.stack([cos, -sin, sin, cos], dim=-1).reshape(batch, 1, tokens, head_dim // 2, 2, 2)


def qkv_input(kind, batch, tokens, width, dtype, generator, pad=0, offset=0):
    """(batch, tokens, width) with rows `pad` elements wider than width, starting `offset` in (a split view)."""
    full = make_input(kind, batch * tokens, width + pad, dtype, generator).reshape(batch, tokens, width + pad)
    return full[..., offset:offset + width]


def check_against_reference(args, op=None, reference=qk_norm_rope_reference, out_numel=None):
    qkv_a, qkv_b = args[0], args[3]
    if out_numel is None:   # q, k and v: a third of the width each
        out_numel = qkv_a.shape[0] * (qkv_a.shape[1] + (0 if qkv_b is None else qkv_b.shape[1])) * qkv_a.shape[2]
    poison_allocator(out_numel * 2)
    got = (op or torch.ops.rt_lynx.qk_norm_rope)(*args)
    want = reference(*args)
    dtype = args[0].dtype
    for name, g, w in zip("qkv", got, want):   # q and k alone from qk_norm_rope_qk
        assert g.shape == w.shape and g.dtype == w.dtype and g.is_contiguous(), name
        assert not g.isnan().any() or w.isnan().any(), f"{name}: unwritten (NaN) elements"
        if name == "v":
            assert torch.equal(g, w), "v is not a copy"
            continue
        error = (g.float() - w.float()).abs()
        pair_norm = w.float().unflatten(-1, (-1, 2)).norm(dim=-1, keepdim=True).expand(*w.shape[:-1], -1, 2)
        bound = 4 * ULP[dtype] * (pair_norm.flatten(-2) + 1e-3)
        assert (error <= bound).all(), f"{name}: max error {error.max():.3g}, {(error > bound).sum()} elements over"


def q_and_k_alone(qkv, q_weight, k_weight, qkv_b, q_weight_b, k_weight_b, pe, heads, eps):
    assert qkv_b is None
    return torch.ops.rt_lynx.qk_norm_rope_qk(qkv, q_weight, k_weight, pe, heads, eps)


def check_one_stream(args):
    """Both ops on one stream; and the dispatch, whose v is then the projection's own memory."""
    check_against_reference(args)
    check_against_reference(args, q_and_k_alone, out_numel=2 * args[0].numel() // 3)
    q, k, v = qk_norm_rope(*args)
    assert v.untyped_storage().data_ptr() == args[0].untyped_storage().data_ptr(), "v was copied"
    assert torch.equal(v, qk_norm_rope_reference(*args)[2])


def weights(dtype, head_dim, generator, count):
    return [torch.randn(head_dim, generator=generator, device="cuda").to(dtype) for _ in range(count)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", INPUT_KINDS)
def test_flux_double_block_shapes(block_ops, generator, dtype, kind):
    # Text (512 tokens) then image (4096) tokens at 1024x1024, 24 heads of 128.
    heads, head_dim = 24, 128
    width = 3 * heads * head_dim
    txt = qkv_input(kind, 1, 512, width, dtype, generator)
    img = qkv_input(kind, 1, 4096, width, dtype, generator)
    w = weights(dtype, head_dim, generator, 4)
    check_against_reference((txt, w[0], w[1], img, w[2], w[3], flux_pe(1, 4608, head_dim, generator), heads, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["randn", "student_t"])
def test_flux_single_block_split_of_linear1(block_ops, generator, dtype, kind):
    # q, k, v are the first 9216 columns of linear1's 21504: rows strided, read in place.
    heads, head_dim = 24, 128
    width = 3 * heads * head_dim
    qkv = qkv_input(kind, 1, 4608, width, dtype, generator, pad=21504 - width)
    w = weights(dtype, head_dim, generator, 2)
    check_one_stream((qkv, w[0], w[1], None, None, None, flux_pe(1, 4608, head_dim, generator), heads, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("batch,pe_batch,tokens_a,tokens_b", [(2, 2, 77, 333), (3, 1, 1, 1), (2, 1, 5, None)])
def test_odd_shapes_batches_and_head_dims(block_ops, generator, dtype, head_dim, batch, pe_batch, tokens_a, tokens_b):
    heads = 3
    width = 3 * heads * head_dim
    a = qkv_input("cubed", batch, tokens_a, width, dtype, generator)
    b = None if tokens_b is None else qkv_input("randn", batch, tokens_b, width, dtype, generator, pad=64, offset=32)
    w = weights(dtype, head_dim, generator, 4)
    tokens = tokens_a + (tokens_b or 0)
    pe = flux_pe(pe_batch, tokens, head_dim, generator)
    args = (a, w[0], w[1], b, w[2] if b is not None else None, w[3] if b is not None else None, pe, heads, 1e-6)
    check_one_stream(args) if b is None else check_against_reference(args)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["randn", "cubed"])
@pytest.mark.parametrize("pe_dtype", ["activations", "fp32"])
@pytest.mark.parametrize("batch,txt_tokens,img_tokens", [(2, 256, 4096), (1, 7, 33)])
def test_qwen_image_split_projections(block_ops, generator, dtype, kind, pe_dtype, batch, txt_tokens, img_tokens):
    # Qwen-Image with CFG: text then image tokens from six separate projections, its RoPE table in
    # the activations' dtype (as the model casts it; RoPE rounded in that dtype) or fp32.
    heads, head_dim = 24, 128
    width = heads * head_dim
    txt = [qkv_input(kind, batch, txt_tokens, width, dtype, generator) for _ in range(3)]
    img = [qkv_input(kind, batch, img_tokens, width, dtype, generator) for _ in range(3)]
    w = weights(dtype, head_dim, generator, 4)
    pe = flux_pe(1, txt_tokens + img_tokens, head_dim, generator).transpose(1, 2)
    pe = pe.to(dtype) if pe_dtype == "activations" else pe.contiguous()
    args = (*txt, w[0], w[1], *img, w[2], w[3], pe, heads, 1e-6)
    check_against_reference(args, torch.ops.rt_lynx.qk_norm_rope_split, qk_norm_rope_split_reference,
                            out_numel=3 * batch * (txt_tokens + img_tokens) * width)


def test_split_projections_with_different_strides_are_copied(block_ops, generator):
    heads, head_dim = 2, 64
    width = heads * head_dim
    q = qkv_input("randn", 2, 9, width, torch.float16, generator, pad=32)       # strided rows
    k = qkv_input("randn", 2, 9, width, torch.float16, generator)
    v = qkv_input("randn", 2, 9, width, torch.float16, generator, pad=8, offset=4)
    w = weights(torch.float16, head_dim, generator, 2)
    pe = flux_pe(2, 9, head_dim, generator).transpose(1, 2).half()
    check_against_reference((q, k, v, w[0], w[1], None, None, None, None, None, pe, heads, 1e-6),
                            torch.ops.rt_lynx.qk_norm_rope_split, qk_norm_rope_split_reference, out_numel=3 * 2 * 9 * width)


def test_misaligned_part_is_copied_not_misread(block_ops, generator):
    # A part starting one element in cannot be read with the vector loads: the op copies it.
    heads, head_dim = 2, 128
    width = 3 * heads * head_dim
    a = qkv_input("randn", 2, 9, width, torch.bfloat16, generator, pad=8, offset=1)
    w = weights(torch.bfloat16, head_dim, generator, 2)
    check_against_reference((a, w[0], w[1], None, None, None, flux_pe(1, 9, head_dim, generator), heads, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
def test_contiguous_part_starting_off_alignment_is_copied(block_ops, generator, dtype):
    # Dense rows, but the whole tensor starts one element into its storage: the vector loads
    # would fault on it, and contiguous() would hand it back as it is.
    heads, head_dim = 2, 128
    width = 3 * heads * head_dim
    storage = make_input("randn", 1, 1 + 2 * 5 * width, dtype, generator).reshape(-1)
    qkv = storage[1:].view(2, 5, width)
    assert qkv.is_contiguous() and qkv.data_ptr() % 8
    w = weights(dtype, head_dim, generator, 2)
    check_against_reference((qkv, w[0], w[1], None, None, None, flux_pe(1, 5, head_dim, generator), heads, 1e-6))
    q, k, v = (storage[1 + i * 2 * 5 * 256: 1 + (i + 1) * 2 * 5 * 256].view(2, 5, 256) for i in range(3))
    pe = flux_pe(1, 5, head_dim, generator).transpose(1, 2).to(dtype)
    check_against_reference((q, k, v, w[0], w[1], None, None, None, None, None, pe, heads, 1e-6),
                            torch.ops.rt_lynx.qk_norm_rope_split, qk_norm_rope_split_reference,
                            out_numel=3 * 2 * 5 * 256)


def test_bad_operands_raise_clear_errors(block_ops, generator):
    w = weights(torch.bfloat16, 128, generator, 2)
    qkv = torch.zeros(1, 4, 3 * 2 * 128, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(RuntimeError, match="pe must be"):
        torch.ops.rt_lynx.qk_norm_rope(qkv, w[0], w[1], None, None, None, torch.zeros(1, 1, 5, 64, 2, 2, device="cuda"),
                                       2, 1e-6)
    with pytest.raises(RuntimeError, match="head_dim must be 64, 128 or 256"):
        torch.ops.rt_lynx.qk_norm_rope(qkv[..., :3 * 4 * 48], w[0][:48], w[1][:48], None, None, None,
                                       torch.zeros(1, 1, 4, 24, 2, 2, device="cuda"), 4, 1e-6)
    with pytest.raises(RuntimeError, match="second qkv part needs its own"):
        torch.ops.rt_lynx.qk_norm_rope(qkv, w[0], w[1], qkv, None, None, torch.zeros(1, 1, 8, 64, 2, 2, device="cuda"),
                                       2, 1e-6)


@pytest.mark.parametrize("two_streams", [True, False])
def test_dispatch_runs_the_kernel_under_torch_compile_without_graph_breaks(block_ops, generator, two_streams):
    heads, head_dim = 4, 128
    width = 3 * heads * head_dim
    a = qkv_input("randn", 1, 64, width, torch.bfloat16, generator, pad=64)
    b = qkv_input("randn", 1, 192, width, torch.bfloat16, generator) if two_streams else None
    w = weights(torch.float32, head_dim, generator, 4)  # cast to qkv's dtype by the dispatch, as ComfyUI does
    pe = flux_pe(1, 256 if two_streams else 64, head_dim, generator)

    def attention_inputs(a, b, pe):
        return qk_norm_rope(a, w[0], w[1], b, w[2], w[3], pe, heads, 1e-6)

    compiled = torch.compile(attention_inputs, fullgraph=True, backend="inductor")
    for g, e in zip(compiled(a, b, pe), attention_inputs(a, b, pe)):
        assert torch.equal(g, e)


def check_cat_gelu(a, b):
    poison_allocator(a.shape[0] * (a.shape[1] + b.shape[1]) * 2)
    got = torch.ops.rt_lynx.cat_gelu_tanh(a, b)
    want = cat_gelu_tanh_reference(a, b)
    assert got.shape == want.shape and got.dtype == want.dtype and got.is_contiguous()
    # Bit for bit: the GELU is torch's CUDA kernel's math in the same order (equal_nan: heavy-tailed
    # fp16 inputs reach inf, whose GELU is NaN in both).
    assert torch.equal(got.isnan(), want.isnan()), "unwritten (NaN) or wrongly NaN elements"
    assert torch.equal(got.nan_to_num(), want.nan_to_num()), f"max diff {(got.float() - want.float()).abs().max()}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", INPUT_KINDS)
@pytest.mark.parametrize("rows,a_cols,b_cols", [(4608, 3072, 12288), (1, 8, 8), (37, 3072, 64), (4097, 24, 40)])
def test_cat_gelu_tanh_equals_the_reference(block_ops, generator, dtype, kind, rows, a_cols, b_cols):
    a = make_input(kind, rows, a_cols, dtype, generator)
    # b as FLUX's single block has it: the MLP part of linear1's output, a strided view.
    b = make_input(kind, rows, 3 * a_cols + b_cols, dtype, generator)[:, 3 * a_cols:]
    check_cat_gelu(a, b)
    check_cat_gelu(a, b.contiguous())


def test_the_kernels_gelu_is_the_fast_one_by_default(block_ops, default_fast_gelu, generator):
    # conftest's fixture puts torch's bits in place for every test; outside tests the fast one runs.
    assert default_fast_gelu is True
    with fast_gelu(True):
        a, b = (make_input("randn", 64, cols, torch.bfloat16, generator) for cols in (32, 4096))
        fast = torch.ops.rt_lynx.cat_gelu_tanh(a, b)
    assert not torch.equal(fast, cat_gelu_tanh_reference(a, b)), "the fast GELU equals torch's on 262k values"
    assert_gelu_close(fast[:, 32:], cat_gelu_tanh_reference(a, b)[:, 32:], b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", INPUT_KINDS)
@pytest.mark.parametrize("rows,a_cols,b_cols", [(4608, 3072, 12288), (37, 3072, 64), (4097, 24, 40)])
def test_cat_gelu_tanh_with_the_fast_gelu_stays_within_an_ulp_of_torch(block_ops, generator, dtype, kind, rows,
                                                                         a_cols, b_cols):
    a = make_input(kind, rows, a_cols, dtype, generator)
    b = make_input(kind, rows, 3 * a_cols + b_cols, dtype, generator)[:, 3 * a_cols:]
    exact = torch.ops.rt_lynx.cat_gelu_tanh(a, b)   # torch's bit for bit (the test above)
    poison_allocator(exact.numel() * 2)
    with fast_gelu(True):
        got = torch.ops.rt_lynx.cat_gelu_tanh(a, b)
    assert torch.equal(got[:, :a_cols].nan_to_num(), a.nan_to_num())
    assert_gelu_close(got[:, a_cols:], exact[:, a_cols:], b)
    if (rows, kind) == (4608, "randn"):   # 57M GELUs: some must come out one ulp off
        assert not torch.equal(got, exact), "the fast GELU switch changed nothing"
    assert torch.equal(torch.ops.rt_lynx.cat_gelu_tanh(a, b).nan_to_num(), exact.nan_to_num()), "switch not restored"


def test_cat_gelu_tanh_copies_misaligned_rows_and_refuses_bad_operands(block_ops, generator):
    a = make_input("randn", 33, 3072 + 8, torch.bfloat16, generator)
    b = make_input("randn", 33, 12288 + 1, torch.bfloat16, generator)
    check_cat_gelu(a[:, 1:1 + 3072], b[:, 1:])   # rows start off 16-byte alignment: copied first
    with pytest.raises(RuntimeError, match="multiples of 8"):
        torch.ops.rt_lynx.cat_gelu_tanh(a[:, :12], b[:, :16])
    with pytest.raises(RuntimeError, match="a's rows, dtype and device"):
        torch.ops.rt_lynx.cat_gelu_tanh(a, b[:, :16].half())


def test_cat_gelu_tanh_dispatch_under_torch_compile(block_ops, generator):
    projected = make_input("randn", 2 * 300, 3 * 512 + 2048, torch.bfloat16, generator).view(2, 300, -1)
    attn = make_input("randn", 2 * 300, 512, torch.bfloat16, generator).view(2, 300, 512)

    def linear2_input(attn, projected):
        mlp = projected[..., 3 * 512:]
        return cat_gelu_tanh(attn, mlp) * 2

    torch._dynamo.reset()
    compiled = torch.compile(linear2_input, fullgraph=True)
    assert torch.equal(compiled(attn, projected), linear2_input(attn, projected))
    assert torch.equal(linear2_input(attn, projected), cat_gelu_tanh_reference(attn, projected[..., 3 * 512:]) * 2)


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")


@pytest.mark.parametrize("theta, axes_dim", [(10000, (16, 56, 56)), (256.0, (32, 48, 48))])
@pytest.mark.parametrize("ids_kind", ["flux_1024", "fractional", "large"])
def test_rope_table_is_comfyuis_table_bit_for_bit_on_the_gpu(cuda, generator, theta, axes_dim, ids_kind):
    # The op is plain PyTorch (no extension): any CUDA GPU. Against the copy of ComfyUI's formula.
    from helpers import comfyui_embed_nd, flux_ids
    from rt_lynx_pack.kernels import rope_table
    if ids_kind == "flux_1024":   # FLUX.1 at 1024²: 512 text tokens, 64 x 64 patches, bf16 ids
        ids = flux_ids(1, 512, 64, 64, device="cuda")
    elif ids_kind == "fractional":
        ids = torch.rand(2, 999, 3, generator=generator, device="cuda") * 128
    else:
        ids = torch.randint(0, 50000, (1, 4096, 3), generator=generator, device="cuda").float() * 0.73
    got = rope_table(ids, theta, axes_dim)
    want = comfyui_embed_nd(ids, theta, axes_dim)
    assert got.shape == want.shape and got.stride() == want.stride() and torch.equal(got, want)
    compiled = torch.compile(lambda i: rope_table(i, theta, axes_dim), fullgraph=True)
    assert torch.equal(compiled(ids), want)
