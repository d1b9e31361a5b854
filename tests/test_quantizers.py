"""Bit packing, the three quantizer designs and their registry (one parametrized matrix over every design)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_ratequant.quantizers import (
    QuantizedBlock,
    Quantizer,
    available_quantizers,
    get_quantizer,
    pack,
    packed_size,
    register_quantizer,
    unpack,
)
from hf_ratequant.quantizers.rotated import hadamard

QUANTIZERS = available_quantizers()
KINDS = ("key", "value")


def test_registry_has_the_three_designs():
    assert {"kivi", "token", "rotated"} <= set(QUANTIZERS)


def test_unknown_quantizer_lists_registered():
    with pytest.raises(ValueError, match=r"Unknown quantizer 'nope'.*kivi.*rotated.*token"):
        get_quantizer("nope")


def test_duplicate_registration_refused():
    with pytest.raises(ValueError, match="already registered"):

        @register_quantizer("kivi")
        class Again(Quantizer):
            pass


@settings(max_examples=200, deadline=None)
@given(
    bits=st.integers(1, 8),
    n=st.integers(1, 70),
    rows=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_roundtrip_is_exact_and_tight(bits, n, rows, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, 2, n), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (rows, 2, math.ceil(n * bits / 8)) == (rows, 2, packed_size(n, bits))
    assert torch.equal(unpack(packed, bits, n), codes)


@pytest.mark.parametrize("lookup", [True, False], ids=["table-lookup", "shifts"])
@pytest.mark.parametrize("bits", range(1, 9))
def test_both_unpack_paths_agree_on_odd_layouts(bits, lookup, monkeypatch):
    """The CPU table-lookup path and the shift path (used elsewhere) give the same codes, also for non-contiguous
    input, one row, and a row length that is not a multiple of 8."""
    from hf_ratequant.quantizers import packing

    monkeypatch.setattr(packing, "_use_lookup", lambda packed, b: lookup and b != 4)
    g = torch.Generator().manual_seed(bits)
    for n in (1, 7, 8, 13, 64, 67):
        codes = torch.randint(0, 2**bits, (3, 5, n), generator=g, dtype=torch.int64).to(torch.uint8)
        packed = pack(codes, bits)
        assert torch.equal(unpack(packed, bits, n), codes)
        assert torch.equal(unpack(packed[:, 1:4], bits, n), codes[:, 1:4])
        assert torch.equal(unpack(packed[2, 3], bits, n), codes[2, 3])


@pytest.mark.parametrize("name", QUANTIZERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
def test_broadcast_dequantization_matches_the_group_layout(name, dtype, kind):
    """Designs with `chunked_groups` dequantize by broadcasting scales over the codes as they lie; the result equals
    the generic path through `_to_groups` (up to the rounding of a fused multiply-add in float32, and of the order
    of the sums of the inverse rotation), also when written into a strided view of a larger tensor."""
    q = get_quantizer(name, 32)
    x = (torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    for bits in (1, 2, 3, 4, 8):
        block = q.quantize(x, bits, kind)
        fast = q.dequantize(block, kind)
        big = torch.full((2, 5, 70, 64), float("nan"), dtype=dtype)
        q.dequantize(block, kind, out=big[:, 1:4, 3:67])
        assert torch.equal(big[:, 1:4, 3:67], fast)
        assert big[:, [0, 4]].isnan().all() and big[:, :, :3].isnan().all() and big[:, :, 67:].isnan().all()
        generic = type(q)(group_size=32)
        generic.chunked_groups = False
        slow = generic.dequantize(block, kind)
        assert fast.dtype == slow.dtype == dtype and fast.shape == x.shape
        # rotated: the CPU kernel's inverse Hadamard passes round differently from the matrix product
        rtol = 1e-5 if q.rotates and dtype == torch.float32 else 0
        torch.testing.assert_close(fast.float(), slow.float(), rtol=rtol, atol=1e-5 if dtype == torch.float32 else 0)


@pytest.mark.parametrize("name", QUANTIZERS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_work_dtype_rounds_once_and_does_not_overflow(name, dtype, monkeypatch):
    """Off the CPU dequantization computes in the model's dtype; forced here on CPU: code * scale + zero is rounded
    once (no double rounding, no float16 overflow of code * scale near 65504), equal to the float32 path."""
    from hf_ratequant.quantizers import base

    q = get_quantizer(name, 32)
    x = torch.linspace(-60000, 60000, 64).to(dtype).view(1, 1, 1, 64).repeat(1, 2, 32, 1)
    x = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    for kind in KINDS:
        for bits in (2, 8):
            block = q.quantize(x, bits, kind)
            reference = q.dequantize(block, kind)  # float32 work on CPU
            monkeypatch.setattr(base, "_work_dtype", lambda device, dt: dt)
            got = q.dequantize(block, kind)
            monkeypatch.undo()
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got.float(), reference.float(), rtol=2 ** -7 if name == "rotated" else 0,
                                       atol=0 if name != "rotated" else 64)


@pytest.mark.parametrize("name", QUANTIZERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("kernel", ["1", "0"])
def test_roundtrip_is_what_the_cache_reconstructs(name, dtype, kind, kernel, monkeypatch):
    """`roundtrip` (calibration's measure: no packing) gives the values `dequantize(quantize(x))` gives, bit for bit
    (rotated: within the rounding of the CPU kernel's inverse Hadamard passes), from 1 to 8 bits, at two
    group sizes, with or without the CPU kernel; the same checks on bad input."""
    from hf_ratequant.quantizers import cpu_kernel

    monkeypatch.setenv(cpu_kernel.ENV_SWITCH, kernel)
    x = (torch.randn(1, 2, 128, 64, generator=torch.Generator().manual_seed(2)) * 3).to(dtype)
    x[0, 1, :, 5] += 40  # an outlier channel
    for group in (32, 64):
        q = get_quantizer(name, group) if name == "kivi" else get_quantizer(name).regrouped(group)
        for bits in (1, 2, 3, 5, 8):
            packed = q.dequantize(q.quantize(x, bits, kind), kind)
            fast = q.roundtrip(x, bits, kind)
            assert fast.dtype == dtype and fast.shape == x.shape
            if q.rotates and kernel == "1":  # a last-bit difference can move a 16-bit rounding by one step
                eps = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
                torch.testing.assert_close(fast.float(), packed.float(), rtol=eps, atol=eps * 100)
            else:
                assert torch.equal(fast, packed), (group, bits)
    with pytest.raises(ValueError, match="valid bit-width"):
        q.roundtrip(x, 9, kind)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="inf or NaN"):
        q.roundtrip(bad, 2, kind)


@pytest.mark.parametrize("bits", [0, 9, 16])
def test_pack_rejects_bad_bits(bits):
    with pytest.raises(ValueError, match="allowed bit-widths"):
        pack(torch.zeros(8, dtype=torch.uint8), bits)


def test_unpack_rejects_wrong_length():
    with pytest.raises(ValueError, match="must have 3 bytes"):
        unpack(torch.zeros(4, dtype=torch.uint8), 3, 8)


def _group_scale_per_element(q: Quantizer, block: QuantizedBlock, kind: str, shape) -> torch.Tensor:
    """Broadcast each group's scale back to the elements of the group, in the quantizer's (rotated) space."""
    groups = q._to_groups(torch.empty(shape), kind)
    scale = block.scale.float().unsqueeze(-1).expand_as(groups)
    return q._from_groups(scale.contiguous(), kind, shape)


@pytest.mark.parametrize("name", QUANTIZERS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits", range(1, 9))
def test_error_within_half_a_step(name, kind, bits):
    q = get_quantizer(name, group_size=16)
    x = torch.randn(2, 3, 32, 64, generator=torch.Generator().manual_seed(bits)) * 3
    x[..., 5] += 20  # an outlier channel
    block = q.quantize(x, bits, kind)
    y = q.dequantize(block, kind)
    assert y.shape == x.shape and y.dtype == x.dtype
    half_step = _group_scale_per_element(q, block, kind, x.shape) / 2
    err = q._rotate(y) - q._rotate(x)  # rotation is orthonormal: compare where the rounding happened
    assert (err.abs() <= half_step + 1e-5 * (1 + x.abs().max())).all()


@pytest.mark.parametrize("name", QUANTIZERS)
@pytest.mark.parametrize("bits", range(1, 9))
def test_storage_is_packed_and_in_model_dtype(name, bits):
    q = get_quantizer(name, group_size=32)
    x = torch.randn(1, 2, 64, 64, dtype=torch.bfloat16)
    for kind in KINDS:
        block = q.quantize(x, bits, kind)
        assert block.codes.dtype == torch.uint8
        assert block.codes.shape == (1, 2, 64, math.ceil(64 * bits / 8))
        assert block.scale.dtype == block.zero.dtype == torch.bfloat16
        n_groups = block.scale.numel()
        assert block.nbytes == 2 * 64 * math.ceil(64 * bits / 8) + 2 * 2 * n_groups
        deq = q.dequantize(block, kind)
        assert deq.dtype == torch.bfloat16
        out = torch.full((1, 3, 70, 64), float("nan"), dtype=torch.bfloat16)
        q.dequantize(block, kind, out=out[:, 1:, 3:67])  # a strided view, as the cache passes it
        assert torch.equal(out[:, 1:, 3:67], deq) and out[:, 0].isnan().all()


@pytest.mark.parametrize("name", QUANTIZERS)
@pytest.mark.parametrize("kind", KINDS)
def test_constant_groups_reconstruct_exactly(name, kind):
    q = get_quantizer(name, group_size=8)
    x = torch.full((1, 2, 16, 32), 1.25)
    x[:, 1] = -3.0
    for bits in (1, 2, 8):
        y = q.dequantize(q.quantize(x, bits, kind), kind)
        assert not torch.isnan(y).any()
        if name == "rotated":  # the rotation of a constant row is not constant; still finite and close
            torch.testing.assert_close(y, x, atol=1e-5, rtol=0)
        else:
            assert torch.equal(y, x)


@pytest.mark.parametrize("name", QUANTIZERS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_raises(name, bad):
    q = get_quantizer(name, group_size=8)
    x = torch.randn(1, 1, 8, 32)
    x[0, 0, 3, 4] = bad
    with pytest.raises(ValueError, match="inf or NaN"):
        q.quantize(x, 4, "key")


def test_kivi_rejects_group_not_dividing_head_dim():
    with pytest.raises(ValueError, match="does not divide head_dim=48.*16"):
        get_quantizer("kivi", group_size=32).quantize(torch.randn(1, 1, 32, 48), 4, "value")


def test_kivi_keys_need_whole_token_groups():
    with pytest.raises(ValueError, match="blocks of 32 tokens"):
        get_quantizer("kivi").quantize(torch.randn(1, 1, 20, 64), 4, "key")


@pytest.mark.parametrize("bits", [0, 9, 16, 2.5, True])
def test_quantize_rejects_bad_bits(bits):
    with pytest.raises(ValueError):
        get_quantizer("token").quantize(torch.randn(1, 1, 4, 32), bits, "key")


def test_kivi_keys_are_per_channel_values_per_token():
    q = get_quantizer("kivi", group_size=8)
    x = torch.randn(1, 1, 16, 32)
    assert q.quantize(x, 2, "key").scale.shape == (1, 1, 2, 32)  # one scale per channel per 8 tokens
    assert q.quantize(x, 2, "value").scale.shape == (1, 1, 16, 4)  # one scale per token per 8 channels


@pytest.mark.parametrize("d", [32, 64, 96, 128])
def test_hadamard_is_orthonormal(d):
    h = hadamard(d)
    torch.testing.assert_close(h @ h.T, torch.eye(d, dtype=h.dtype))


def test_rotation_helps_outlier_channels():
    x = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    x[..., 3] *= 30
    errs = {}
    for name in ("token", "rotated"):
        q = get_quantizer(name)
        errs[name] = (q.dequantize(q.quantize(x, 3, "key"), "key") - x).pow(2).mean()
    assert errs["rotated"] < errs["token"]


def test_block_slicing_and_concatenation():
    q = get_quantizer("kivi", group_size=8)
    x = torch.randn(2, 2, 32, 16)
    whole = q.quantize(x, 3, "key")
    parts = QuantizedBlock.cat([q.quantize(x[:, :, :16], 3, "key"), q.quantize(x[:, :, 16:], 3, "key")])
    assert torch.equal(q.dequantize(whole, "key"), q.dequantize(parts, "key"))
    torch.testing.assert_close(q.dequantize(whole.tokens(8, 24), "key"), q.dequantize(whole, "key")[:, :, 8:24])
    with pytest.raises(ValueError, match="not aligned"):
        whole.tokens(3, 16)


@pytest.mark.parametrize("name", QUANTIZERS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dequantize_into_strided_view(name, kind, bits):
    q = get_quantizer(name, group_size=8)
    block = q.quantize(torch.randn(2, 2, 16, 32), bits, kind)
    out = torch.full((2, 4, 20, 32), float("nan"))
    q.dequantize(block, kind, out=out[:, 1:3, 2:18])
    assert torch.equal(out[:, 1:3, 2:18], q.dequantize(block, kind))
    assert out[:, 0].isnan().all() and out[:, :, :2].isnan().all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", QUANTIZERS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_quantizes_and_dequantizes_like_the_cpu(name, kind, dtype):
    """On a GPU the codes are unpacked with shifts (not the CPU's tables) and 16-bit dequantization computes in the
    model's dtype. CUDA divides by a scalar through its reciprocal, so a scale may differ from the CPU's in its last
    bit and, in 16-bit dtypes, a code sitting on a rounding boundary by one (seen on an H100: at most 88 of 36864
    codes); everything else is the same: unpacked on either device the codes agree, and dequantizing the CPU's
    codes on the GPU agrees with the CPU within the rounding of one 16-bit multiply-add."""
    q = get_quantizer(name, 32)
    x = (torch.randn(2, 3, 96, 64, generator=torch.Generator().manual_seed(1)) * 2).to(dtype)
    for bits in range(1, 9):
        cpu = q.quantize(x, bits, kind)
        gpu = q.quantize(x.cuda(), bits, kind)
        torch.testing.assert_close(gpu.zero.cpu(), cpu.zero, rtol=torch.finfo(dtype).eps, atol=0)
        torch.testing.assert_close(gpu.scale.cpu(), cpu.scale, rtol=torch.finfo(dtype).eps, atol=0)
        cpu_codes = unpack(cpu.codes, bits, x.shape[-1]).int()
        assert torch.equal(unpack(gpu.codes, bits, x.shape[-1]).cpu().int(), unpack(gpu.codes.cpu(), bits, 64).int())
        moved = (unpack(gpu.codes.cpu(), bits, x.shape[-1]).int() - cpu_codes).abs()
        assert moved.max() <= 1 and moved.sum() <= 0.01 * moved.numel(), (bits, int(moved.sum()))
        on_gpu = q.dequantize(cpu.map(lambda t: t.cuda()), kind)
        assert on_gpu.device.type == "cuda" and on_gpu.dtype == dtype
        reference = q.dequantize(cpu, kind).float()
        tol = 2 * torch.finfo(dtype).eps
        torch.testing.assert_close(on_gpu.float().cpu(), reference, rtol=tol, atol=tol * reference.abs().max())


@pytest.mark.parametrize("name", ["token", "rotated"])
def test_row_groups_of_the_per_token_designs(name, monkeypatch):
    """`row_group` channels per group: a whole row is today's layout bit for bit; smaller groups store one scale and
    zero-point per group (32 / g more bits per element at 16 bits), fit closer, and the CPU kernel dequantizes them
    as PyTorch ops do."""
    from hf_ratequant.footprint import unit_bits_per_element
    from hf_ratequant.quantizers import cpu_kernel

    cls = type(get_quantizer(name))
    used, real = [], cpu_kernel.dequantize_into
    monkeypatch.setattr(cpu_kernel, "dequantize_into", lambda q, o, **kw: used.append(real(q, o, **kw)) or used[-1])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 40, 64, generator=gen) * torch.linspace(0.2, 3.0, 64)  # channels of different ranges
    whole, row = cls(), cls(row_group=64)
    for bits in (2, 4):
        a, b = whole.quantize(x, bits, "key"), row.quantize(x, bits, "key")
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
    errors = []
    for g in (64, 32, 16):
        q = cls(row_group=g)
        block = q.quantize(x.half(), 3, "value")
        assert block.scale.shape == (2, 3, 40, 64 // g)
        assert block.nbytes * 8 / x.numel() == 3 + 32 / g
        assert unit_bits_per_element(name, 32, 3, "value", 64, row_group=g) == 3 + 32 / g
        used.clear()
        got = q.dequantize(block, "value")
        assert used == [True] or not cpu_kernel.available()
        with monkeypatch.context() as m:
            m.setenv(cpu_kernel.ENV_SWITCH, "0")
            reference = q.dequantize(block, "value")
        if q.rotates:
            torch.testing.assert_close(got.float(), reference.float(), rtol=1e-3,
                                       atol=1e-5 * reference.float().abs().max().item())
        else:
            assert torch.equal(got, reference)
        errors.append(float((got.float() - x).pow(2).mean()))
    assert errors[0] > errors[1] > errors[2]


def test_row_group_must_divide_head_dim():
    with pytest.raises(ValueError, match=r"groups 48 channels, which does not divide head_dim=64.*\[8, 16, 32, 64\]"):
        get_quantizer("token").__class__(row_group=48).quantize(torch.randn(1, 1, 4, 64), 3, "key")
    with pytest.raises(ValueError, match="row_group=0 must be a positive integer"):
        get_quantizer("rotated").__class__(row_group=0)
