"""The compiled CPU dequantization kernel: the same bits as PyTorch ops everywhere it applies, a clean fallback
everywhere it does not (no compiler, a failing compiler, switched off, a layout it is not made for)."""

import logging
import shutil
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_ratequant.quantizers import available_quantizers, cpu_kernel, get_quantizer, unpack
from hf_ratequant.quantizers.rotated import fwht, hadamard

HAS_CC = cpu_kernel._compiler() is not None


@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """A kernel state of its own (loaded again on first use, into a temporary cache folder), restored afterwards."""
    monkeypatch.setenv("HF_RATEQUANT_CACHE", str(tmp_path / "rq_cache"))
    monkeypatch.setattr(cpu_kernel, "_state", {})
    return tmp_path / "rq_cache" / "kernels"


def _rotated_reference(q, dtype):
    """What the kernel computes for the rotated design, in PyTorch: dequantize, then the Hadamard passes."""
    codes = unpack(q.codes, q.bits, q.head_dim).float()
    scale = q.scale.float().repeat_interleave(q.time_block, 2).repeat_interleave(q.head_dim // q.scale.shape[-1], 3)
    zero = q.zero.float().repeat_interleave(q.time_block, 2).repeat_interleave(q.head_dim // q.scale.shape[-1], 3)
    x = fwht(codes * scale + zero, q.head_dim & -q.head_dim)
    if dtype == torch.float16:
        x = x.clamp(-65504, 65504)
    return x.to(dtype)


def _reference(quantizer, q, kind, monkeypatch):
    with monkeypatch.context() as m:
        m.setenv(cpu_kernel.ENV_SWITCH, "0")
        return quantizer.dequantize(q, kind)


@pytest.mark.skipif(not HAS_CC or sys.byteorder != "little", reason="needs a C compiler on a little-endian CPU")
def test_kernel_builds_where_a_compiler_exists():
    assert cpu_kernel.available()
    assert cpu_kernel._state["path"].is_file()


@pytest.mark.skipif(not HAS_CC, reason="needs a C compiler")
@pytest.mark.parametrize("name", available_quantizers())
@pytest.mark.parametrize("kind", ["key", "value"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_equals_pytorch_ops_bit_for_bit(name, kind, dtype, monkeypatch):
    quantizer = get_quantizer(name, group_size=16)
    used = []
    real = cpu_kernel.dequantize_into
    monkeypatch.setattr(cpu_kernel, "dequantize_into", lambda q, o, **kw: used.append(real(q, o, **kw)) or used[-1])
    gen = torch.Generator().manual_seed(0)
    for bits in range(1, 9):
        x = (torch.randn(2, 3, 48, 64, generator=gen) * 4).to(dtype)
        x[:, 1, :, 5] *= 40  # an outlier channel
        q = quantizer.quantize(x, bits, kind)
        used.clear()
        got = quantizer.dequantize(q, kind)
        assert used == [True], f"{bits} bits: the kernel was not used"
        reference = _reference(quantizer, q, kind, monkeypatch)
        if quantizer.rotates:  # the kernel's Hadamard passes round differently from the ops' matrix product
            assert torch.equal(got, _rotated_reference(q, dtype)), f"{bits} bits"
            one_ulp = torch.finfo(dtype).eps  # a 1e-7 difference can round a 16-bit value the other way
            torch.testing.assert_close(got.float(), reference.float(), rtol=max(one_ulp, 1e-5),
                                       atol=1e-5 * reference.float().abs().max().item(), msg=f"{bits} bits")
        else:
            assert torch.equal(got, reference), f"{bits} bits"


@pytest.mark.skipif(not HAS_CC, reason="needs a C compiler")
def test_kernel_writes_head_slices_into_a_view(monkeypatch):
    """The cache dequantizes runs of heads (strided views of the packed past) into slices of a larger tensor."""
    quantizer = get_quantizer("kivi", group_size=8)
    x = torch.randn(2, 5, 32, 32)
    for bits, kind in [(3, "key"), (2, "value")]:
        q = quantizer.quantize(x, bits, kind)
        part = q.map(lambda t: t[:, 1:4])  # heads 1..3: not contiguous
        out = torch.full((2, 7, 40, 32), 7.0)
        quantizer.dequantize(part, kind, out=out[:, 2:5, 4:36])
        expected = _reference(quantizer, q, kind, monkeypatch)[:, 1:4]
        assert torch.equal(out[:, 2:5, 4:36], expected)
        untouched = torch.ones_like(out, dtype=torch.bool)
        untouched[:, 2:5, 4:36] = False
        assert (out[untouched] == 7.0).all()


# What the random-shape tests draw besides their own sizes: design, kind, bit-width, batch and heads.
LAYOUTS = dict(name=st.sampled_from(available_quantizers()), kind=st.sampled_from(["key", "value"]),
               bits=st.integers(1, 8), batch=st.integers(1, 3), heads=st.integers(1, 4))


@pytest.mark.skipif(not HAS_CC, reason="needs a C compiler")
@settings(max_examples=40, deadline=None)
@given(
    **LAYOUTS,
    blocks=st.integers(0, 5),
    head_dim=st.sampled_from([8, 16, 24, 64, 128]),
    threads=st.sampled_from([1, 2]),
    hadamard_log2=st.integers(0, 7),
)
def test_kernel_equals_pytorch_ops_on_random_shapes(
    name, kind, bits, batch, heads, blocks, head_dim, threads, hadamard_log2
):
    group = 8
    quantizer = get_quantizer(name, group_size=group)
    x = torch.randn(batch, heads, blocks * group, head_dim) * 3
    q = quantizer.quantize(x if blocks else torch.randn(batch, heads, group, head_dim), bits, kind)
    q = q.tokens(0, blocks * group)  # zero tokens: what cropping can leave
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = torch.empty_like(x)
        block = min(1 << hadamard_log2, head_dim & -head_dim)  # a power of two dividing head_dim
        assert cpu_kernel.dequantize_into(q, got, hadamard=block)  # every head_dim and group here: multiples of 8
    finally:
        torch.set_num_threads(previous)
    codes = unpack(q.codes, q.bits, q.head_dim)
    tb, ng = q.time_block, q.scale.shape[-1]
    scale = q.scale.repeat_interleave(tb, 2).repeat_interleave(head_dim // ng, 3)
    zero = q.zero.repeat_interleave(tb, 2).repeat_interleave(head_dim // ng, 3)
    assert torch.equal(got, fwht(codes.float() * scale + zero, block))


@pytest.mark.parametrize("head_dim", [8, 64, 96, 128])
def test_fwht_is_the_hadamard_product(head_dim):
    """The kernel's inverse rotation (passes of sums and differences) is the product by the +-1 block-diagonal
    Hadamard matrix, which the rotated design's PyTorch path multiplies by, to float rounding."""
    x = torch.randn(3, 5, head_dim, dtype=torch.float64)
    block = head_dim & -head_dim
    matrix = hadamard(head_dim) * block**0.5
    assert torch.allclose(fwht(x, block), x @ matrix, rtol=0, atol=1e-12)
    quantizer = get_quantizer("rotated")
    assert quantizer.kernel_hadamard(head_dim) == block
    y = x.float()
    torch.testing.assert_close(fwht(y, block), quantizer._unrotate(y), rtol=1e-5, atol=1e-5)


def test_kernel_refuses_a_bad_hadamard_block():
    q = get_quantizer("token").quantize(torch.randn(1, 1, 4, 64), 2, "key")
    for block in (3, 48, 128):  # not a power of two; not dividing head_dim
        assert cpu_kernel.dequantize_into(q, torch.empty(1, 1, 4, 64), hadamard=block) is False


def test_layouts_the_kernel_is_not_made_for_fall_back(monkeypatch):
    """head_dim not a multiple of 8, or value groups of a number of channels that is not: PyTorch ops, same values."""
    cases = [(get_quantizer("token"), (1, 2, 4, 12)), (get_quantizer("kivi", group_size=4), (1, 2, 4, 16))]
    for quantizer, shape in cases:
        q = quantizer.quantize(torch.randn(shape), 3, "value")
        out = torch.empty(shape)
        assert not cpu_kernel.supports(q, out)
        assert cpu_kernel.dequantize_into(q, out) is False
        assert torch.equal(quantizer.dequantize(q, "value"), _reference(quantizer, q, "value", monkeypatch))


def test_switched_off_by_the_environment(monkeypatch):
    q = get_quantizer("kivi").quantize(torch.randn(1, 1, 32, 64), 2, "value")
    monkeypatch.setenv(cpu_kernel.ENV_SWITCH, "0")
    assert not cpu_kernel.enabled() and not cpu_kernel.available()
    assert cpu_kernel.dequantize_into(q, torch.empty(1, 1, 32, 64)) is False


def test_no_compiler_warns_once_and_falls_back(fresh_kernel, monkeypatch, caplog):
    monkeypatch.setattr(cpu_kernel, "_compiler", lambda: None)
    quantizer = get_quantizer("kivi")
    q = quantizer.quantize(torch.randn(1, 2, 64, 64), 2, "key")
    with caplog.at_level(logging.WARNING, logger=cpu_kernel.__name__):
        first = quantizer.dequantize(q, "key")
        second = quantizer.dequantize(q, "key")
    warnings = [r for r in caplog.records if "No C compiler found" in r.getMessage()]
    assert len(warnings) == 1 and cpu_kernel.ENV_SWITCH in warnings[0].getMessage()
    assert not cpu_kernel.available()
    assert torch.equal(first, second) and torch.equal(first, _reference(quantizer, q, "key", monkeypatch))


@pytest.mark.skipif(shutil.which("false") is None, reason="needs the `false` command")
def test_a_failing_compiler_warns_and_falls_back(fresh_kernel, monkeypatch, caplog):
    monkeypatch.setenv("CC", "false")
    with caplog.at_level(logging.WARNING, logger=cpu_kernel.__name__):
        assert not cpu_kernel.available()
    assert any("Could not compile the CPU dequantization kernel" in r.getMessage() for r in caplog.records)
    assert not fresh_kernel.exists() or not list(fresh_kernel.iterdir())  # no half-written library left


@pytest.mark.skipif(not HAS_CC, reason="needs a C compiler")
def test_compiled_once_then_reused(fresh_kernel, monkeypatch):
    assert cpu_kernel.available()
    built = sorted(fresh_kernel.glob("*.so"))
    assert len(built) == 1
    monkeypatch.setattr(cpu_kernel, "_state", {})

    def no_compiling(*args, **kwargs):
        if "--version" not in args[0]:
            raise AssertionError("compiled again")
        return __import__("subprocess").CompletedProcess(args[0], 0, stdout="", stderr="")

    real_version = cpu_kernel._compiler_version(cpu_kernel._compiler())
    monkeypatch.setattr(cpu_kernel, "_compiler_version", lambda cc: real_version)
    monkeypatch.setattr(cpu_kernel.subprocess, "run", no_compiling)
    assert cpu_kernel.available()
    assert sorted(fresh_kernel.glob("*.so")) == built


@pytest.mark.skipif(not HAS_CC, reason="needs a C compiler")
def test_generation_is_the_same_with_and_without_the_kernel(tiny_llama, cache_factory, monkeypatch):
    """Greedy decoding through a mixed-precision cache: identical tokens and logits either way."""
    key_bits = [[2, 3], [4, 1]]
    value_bits = [[3, 2], [8, 2]]
    ids = torch.randint(2, 128, (2, 40), generator=torch.Generator().manual_seed(3))

    def run():
        cache = cache_factory(tiny_llama, key_bits=key_bits, value_bits=value_bits, residual_length=8, group_size=8)
        return tiny_llama.generate(ids, past_key_values=cache, max_new_tokens=24, do_sample=False,
                                   output_logits=True, return_dict_in_generate=True)

    with_kernel = run()
    monkeypatch.setenv(cpu_kernel.ENV_SWITCH, "0")
    without = run()
    assert torch.equal(with_kernel.sequences, without.sequences)
    assert all(torch.equal(a, b) for a, b in zip(with_kernel.logits, without.logits))


@pytest.mark.skipif(not HAS_CC, reason="needs a C compiler")
@pytest.mark.parametrize("bits", [2, 8])
def test_zero_tokens(bits):
    """A block cropped to nothing (8-bit codes need no packing, so such a block also comes out of `quantize`)."""
    quantizer = get_quantizer("kivi", group_size=8)
    q = quantizer.quantize(torch.randn(1, 2, 8, 16), bits, "value").tokens(0, 0)
    out = torch.empty(1, 2, 0, 16)
    assert cpu_kernel.dequantize_into(q, out)
    assert quantizer.dequantize(q, "value").shape == (1, 2, 0, 16)


@pytest.mark.skipif(not HAS_CC, reason="needs a C compiler")
def test_a_damaged_cached_library_is_rebuilt(fresh_kernel, monkeypatch):
    built = cpu_kernel._build(cpu_kernel._compiler())  # compiled, not loaded (never overwrite a mapped library)
    built.write_bytes(b"not a shared library")
    assert cpu_kernel.available()
    assert built.read_bytes()[:4] == b"\x7fELF" or sys.platform != "linux"


@pytest.mark.skipif(not HAS_CC, reason="needs a C compiler")
def test_rotated_generation_with_and_without_the_kernel(tiny_llama, cache_factory, monkeypatch):
    """The rotated design: the kernel's Hadamard passes and the matrix product differ only by float rounding."""
    ids = torch.randint(2, 128, (2, 40), generator=torch.Generator().manual_seed(4))

    def run():
        cache = cache_factory(tiny_llama, bits=4, quantizer="rotated", residual_length=8, group_size=8)
        return tiny_llama(ids, past_key_values=cache).logits, cache

    with_kernel, cache = run()
    monkeypatch.setenv(cpu_kernel.ENV_SWITCH, "0")
    without, _ = run()
    assert cache.layers[0].past_keys.num_tokens == 32  # the past really went through the quantizer
    torch.testing.assert_close(with_kernel, without, rtol=0, atol=1e-4)


@pytest.mark.skipif(not HAS_CC, reason="needs a C compiler")
def test_an_unusable_cache_folder_falls_back_to_the_temp_dir(monkeypatch, tmp_path):
    """`HF_RATEQUANT_CACHE` pointing below a file (as a read-only or broken home would): built in the temp dir."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("HF_RATEQUANT_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(cpu_kernel.tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setattr(cpu_kernel, "_state", {})
    assert cpu_kernel.available()
    assert cpu_kernel._state["path"].parent.parent.parent == tmp_path / "tmp"


@pytest.mark.skipif(not HAS_CC, reason="needs a C compiler")
@pytest.mark.parametrize("name", available_quantizers())
@pytest.mark.parametrize("kind", ["key", "value"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_reads_8_bit_scales_as_pytorch_decodes_them(name, kind, dtype, monkeypatch):
    """With 8-bit scales the kernel decodes each row of scale and zero-point bytes itself (the cache no longer
    expands them in PyTorch every step): the same values as `scales.decode` then the 16-bit path, bit for bit."""
    quantizer = get_quantizer(name, group_size=16, scale_bits=8)
    used = []
    real = cpu_kernel.dequantize_into
    monkeypatch.setattr(cpu_kernel, "dequantize_into",
                        lambda q, o, **kw: used.append((q.ranges is not None, real(q, o, **kw))) or used[-1][1])
    gen = torch.Generator().manual_seed(1)
    for bits in (1, 2, 3, 4, 8):
        x = (torch.randn(2, 3, 96, 64, generator=gen) * 4).to(dtype)
        x[:, 1, :, 5] *= 40  # an outlier channel
        q = quantizer.quantize(x, bits, kind)
        used.clear()
        got = quantizer.dequantize(q, kind)
        assert used == [(True, True)], f"{bits} bits: the kernel did not read the coded scales"
        assert torch.equal(got, quantizer.dequantize(q.expanded(), kind)), f"{bits} bits"
        if not quantizer.rotates:
            assert torch.equal(got, _reference(quantizer, q, kind, monkeypatch)), f"{bits} bits"


@pytest.mark.skipif(not HAS_CC, reason="needs a C compiler")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_channel", [False, True])
def test_kernel_decodes_every_scale_code_and_extreme_range(dtype, per_channel):
    """Every byte of both codes, against super-block numbers from float16 subnormals to float16's largest value
    (the decoded products then round to subnormals, to 65504 and past it): the kernel's rounding to the cache's
    dtype equals PyTorch's."""
    from hf_ratequant.quantizers import QuantizedBlock
    from hf_ratequant.quantizers.scales import decode

    gen = torch.Generator().manual_seed(2)
    b, h, rows, d = 1, 4, 256, 64
    ng, tb = (d, 2) if per_channel else (4, 1)  # kivi keys (a scale per channel, rows of 2 tokens) or 4 groups
    sr = 32 // tb
    e = torch.randint(0, 256, (b, h, rows, ng), generator=gen, dtype=torch.uint8)
    z = torch.randint(0, 256, (b, h, rows, ng), generator=gen, dtype=torch.uint8)
    e[0, 0, :, 0], z[0, 0, :, 0] = torch.arange(256, dtype=torch.uint8), torch.arange(256, dtype=torch.uint8)
    magnitude = torch.tensor([1e-7, 3e-6, 6.1e-5, 1.0, 3e4, 65504.0, 65519.0])
    pick = torch.randint(0, len(magnitude), (b, h, rows // sr, 1 if per_channel else ng, 3), generator=gen)
    signs = torch.where(torch.rand(pick.shape, generator=gen) < 0.3, -1.0, 1.0)
    ranges = magnitude[pick] * (1 + torch.rand(pick.shape, generator=gen) * 1e-3) * signs
    ranges[..., 0] = ranges[..., 0].abs()  # top >= 0
    ranges = ranges.to(dtype)
    tokens = rows * tb
    codes = torch.randint(0, 256, (b, h, tokens, d * 2 // 8), generator=gen, dtype=torch.uint8)
    block = QuantizedBlock(codes, e, z, 2, d, tb, ranges)
    got = torch.empty(b, h, tokens, d)
    assert cpu_kernel.dequantize_into(block, got)
    scale, zero = decode(e, z, ranges, sr)
    want = torch.empty_like(got)
    assert cpu_kernel.dequantize_into(QuantizedBlock(codes, scale, zero, 2, d, tb), want)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)  # inf - inf where a range overflowed
    if dtype == torch.float16:  # the products did reach float16's subnormals and its largest values
        assert ((scale > 0) & (scale < 6.1e-5)).any() and (zero.abs() >= 65504).any()


@pytest.mark.skipif(not HAS_CC, reason="needs a C compiler")
@settings(max_examples=30, deadline=None)
@given(
    **LAYOUTS,
    blocks=st.integers(0, 3),
    head_dim=st.sampled_from([16, 64, 128]),
    group=st.sampled_from([8, 16, 32, 64]),
    threads=st.sampled_from([1, 2]),
)
def test_kernel_reads_8_bit_scales_on_random_shapes(name, kind, bits, batch, heads, blocks, head_dim, group, threads):
    """Threads split rows anywhere inside a row of scales or a super-block: every split decodes the same."""
    quantizer = get_quantizer(name, group_size=min(group, head_dim), scale_bits=8)
    tokens = quantizer.token_block(kind)
    x = torch.randn(batch, heads, max(blocks, 1) * tokens, head_dim) * 3
    q = quantizer.quantize(x, bits, kind).tokens(0, blocks * tokens)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got, want = torch.empty(batch, heads, blocks * tokens, head_dim), torch.empty(batch, heads, blocks * tokens,
                                                                                      head_dim)
        assert cpu_kernel.dequantize_into(q, got)
        assert cpu_kernel.dequantize_into(q.expanded(), want)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(got, want)
