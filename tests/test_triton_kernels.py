"""The Triton kernels of `hf_ratequant.triton_kernels` against PyTorch references, on the pasts the quantizers really
produce. Without a GPU they run under Triton's interpreter (which has no bfloat16: float32 and float16 here); with
one, on it.

Dequantization must equal `Quantizer.dequantize` bit for bit (kivi, token; rotated within float rounding), and
attention must match `scaled_dot_product_attention` over those dequantized states (repeated for grouped-query heads).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported

import pytest  # noqa: E402

triton = pytest.importorskip("triton")
tl = triton.language

from hf_ratequant import triton_kernels  # noqa: E402
from hf_ratequant.ops import PastPart  # noqa: E402
from hf_ratequant.quantizers import KEEP_BITS, get_quantizer, packed_size  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def states(shape, dtype, seed):
    """Random states with a few outlier channels (as real keys have), on DEVICE."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    x[..., :: max(1, shape[-1] // 4)] *= 6.0
    return x.to(dtype).to(DEVICE)


def build_part(quantizer, kind, x, head_bits, sink, quantized, strided=False):
    """`(PastPart, reference)`: the first `sink` tokens of `x` `(B, H, T, D)` as the sink, the next `quantized`
    quantized per bit class as the cache stores them, and the reference `[sink | Quantizer.dequantize(...)]`.
    `strided`: every class is a slice along tokens (and the sink along heads) of a bigger tensor."""
    b, h, _, d = x.shape
    tb = quantizer.time_block(kind)
    extra_tokens = quantizer.token_block(kind)  # what a strided class quantizes beyond its tokens
    past = x[:, :, sink : sink + quantized]
    ref = torch.empty(b, h, sink + quantized, d, dtype=x.dtype, device=x.device)
    ref[:, :, :sink] = x[:, :, :sink]
    sink_t = x[:, :, :sink]
    if strided:
        sink_t = torch.cat([x[:, :, :sink], x[:, :, :sink]], dim=1)[:, :h]  # a view into a bigger tensor
    data, scale, zero, ranges = [], [], [], []
    for bits in sorted(set(head_bits)):
        heads = [i for i, hb in enumerate(head_bits) if hb == bits]
        part = past[:, heads]
        extra = extra_tokens if strided else 0
        if extra:  # quantize more tokens than used, then slice: strided class tensors
            part = torch.cat([part, states((b, len(heads), extra, d), x.dtype, seed=99)], dim=2)
        if bits == KEEP_BITS:
            data.append(part[:, :, :quantized])
            scale.append(x.new_empty(0))
            zero.append(x.new_empty(0))
            ranges.append(x.new_empty(0))
            ref[:, heads, sink:] = part[:, :, :quantized]
            continue
        if part.shape[2] == 0:  # nothing quantized yet: empty tensors, as the cache passes them
            data.append(torch.empty(b, len(heads), 0, packed_size(d, bits), dtype=torch.uint8, device=x.device))
            scale.append(x.new_empty(b, len(heads), 0, 1))
            zero.append(x.new_empty(b, len(heads), 0, 1))
            ranges.append(x.new_empty(0))
            continue
        block = quantizer.quantize(part, bits, kind).tokens(0, quantized)
        data.append(block.codes)
        scale.append(block.scale)
        zero.append(block.zero)
        ranges.append(block.ranges if block.ranges is not None else x.new_empty(0))
        ref[:, heads, sink:] = quantizer.dequantize(block, kind)
    groups = [quantizer.unit_group(kind, d)] * h
    return PastPart.from_args(sink_t, data, scale, zero, list(head_bits), groups, ranges, tb), ref


def make_layer(name, dtype, key_bits, value_bits, batch=1, head_dim=32, sink=3, quantized=32, window=5,
               group_size=16, strided=False, seed=0, scale_bits=16):
    """`(quantizer, k, v, k_window, v_window, keys, values)`: the parts and the full reference keys and values."""
    q = get_quantizer(name, group_size, scale_bits)
    h = len(key_bits)
    out = []
    for kind, bits, s in (("key", key_bits, seed), ("value", value_bits, seed + 1)):
        x = states((batch, h, sink + quantized + window, head_dim), dtype, s)
        part, ref = build_part(q, kind, x, bits, sink, quantized, strided)
        win = x[:, :, sink + quantized :]
        if strided:  # the window as a slice of a preallocated buffer
            buf = torch.zeros(batch, h, window + 7, head_dim, dtype=dtype, device=DEVICE)
            buf[:, :, :window] = win
            win = buf[:, :, :window]
        out.append((part, win, torch.cat([ref, win], dim=2)))
    (k, kw, keys), (v, vw, values) = out
    return q, k, v, kw, vw, keys, values


def rel_err(got, want):
    got, want = got.double(), want.double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


# ---- dequantize_layer --------------------------------------------------------------------------------------------
DEQUANT_CASES = [
    # name, dtype, key_bits, value_bits, batch, head_dim, sink, quantized, window, strided
    ("kivi", torch.float32, [2, 3, 16, 2], [4, 2, 2, 8], 2, 64, 3, 32, 5, False),
    ("kivi", torch.float16, [1, 5, 6, 7], [16, 3, 1, 2], 1, 32, 0, 32, 0, True),
    ("token", torch.float32, [1, 2, 3, 4, 5, 6, 7, 8, 16], [16, 8, 7, 6, 5, 4, 3, 2, 1], 1, 16, 2, 7, 3, False),
    ("token", torch.float16, [2, 3, 16, 2], [4, 2, 2, 8], 2, 128, 5, 9, 0, True),
    ("kivi", torch.float32, [3, 4], [2, 16], 1, 256, 1, 16, 3, False),
    ("token", torch.float32, [2, 16], [16, 4], 1, 64, 4, 0, 6, False),  # nothing quantized yet
    ("kivi", torch.float16, [8, 4, 2], [3, 3, 16], 1, 64, 0, 0, 0, False),  # an empty layer
]


@pytest.mark.parametrize("name,dtype,key_bits,value_bits,batch,head_dim,sink,quantized,window,strided",
                         DEQUANT_CASES)
def test_triton_dequantize_layer_is_bit_exact(name, dtype, key_bits, value_bits, batch, head_dim, sink, quantized,
                                              window, strided):
    _, k, v, kw, vw, keys, values = make_layer(name, dtype, key_bits, value_bits, batch, head_dim, sink, quantized,
                                               window, strided=strided)
    got_k, got_v = triton_kernels.dequantize_layer(k, v, kw, vw, rotated=False)
    assert got_k.dtype == dtype and got_k.shape == keys.shape and got_v.shape == values.shape
    assert torch.equal(got_k, keys)
    assert torch.equal(got_v, values)


SCALE_CASES = [
    # name, dtype, key_bits, value_bits, head_dim, group_size, quantized, strided: 8-bit scales
    ("kivi", torch.float32, [2, 3, 16, 2], [4, 2, 2, 8], 64, 32, 64, False),  # per-channel keys, one triple
    ("kivi", torch.float16, [1, 5, 4], [16, 3, 2], 32, 16, 32, True),
    ("token", torch.float32, [1, 2, 3, 16], [8, 4, 16, 2], 64, 16, 64, False),  # 4 groups, a triple each
    ("token", torch.float16, [2, 3], [4, 2], 128, 32, 32, True),
    ("token", torch.float32, [3, 2], [2, 3], 32, 32, 0, False),  # nothing quantized yet
]


@pytest.mark.parametrize("name,dtype,key_bits,value_bits,head_dim,group_size,quantized,strided", SCALE_CASES)
def test_triton_kernels_read_8_bit_scales_bit_exact(name, dtype, key_bits, value_bits, head_dim, group_size,
                                                     quantized, strided):
    """With 8-bit scales the kernels read the byte codes and the super-blocks' numbers and decode them as
    `scales.decode` does: dequantization equal to `Quantizer.dequantize` bit for bit, attention to sdpa over it."""
    q, k, v, kw, vw, keys, values = make_layer(name, dtype, key_bits, value_bits, 2, head_dim, 2, quantized, 3,
                                               group_size=group_size, strided=strided, scale_bits=8)
    coded = [r.numel() > 0 for r in k.ranges + v.ranges]
    assert any(coded) == (quantized > 0)
    got_k, got_v = triton_kernels.dequantize_layer(k, v, kw, vw, rotated=False)
    assert torch.equal(got_k, keys) and torch.equal(got_v, values)
    query = states((2, len(key_bits) * 2, 1, head_dim), dtype, seed=7)
    got = triton_kernels.decode_attention(query, None, k, v, kw, vw, head_dim**-0.5, rotated=False, num_splits=2)
    want = reference_attention(query, None, keys, values, head_dim**-0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert rel_err(got, want) < tol


@pytest.mark.parametrize("dtype,head_dim,strided", [(torch.float32, 64, False), (torch.float32, 16, True),
                                                    (torch.float16, 32, False)])
def test_triton_dequantize_layer_rotated(dtype, head_dim, strided):
    _, k, v, kw, vw, keys, values = make_layer("rotated", dtype, [2, 16, 4, 2], [3, 8, 16, 1], batch=2,
                                               head_dim=head_dim, sink=2, quantized=35, window=3, strided=strided)
    got_k, got_v = triton_kernels.dequantize_layer(k, v, kw, vw, rotated=True)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert rel_err(got_k, keys) < tol and rel_err(got_v, values) < tol
    s, w = 2, 3  # sinks and windows are copied
    assert torch.equal(got_k[:, :, :s], keys[:, :, :s]) and torch.equal(got_v[:, :, -w:], values[:, :, -w:])


def test_triton_dequantize_copies_16_bit_states_as_they_are():
    """Sinks, windows and 16-bit heads are copied bit for bit: infinities included (only dequantized codes
    saturate at the float16 limit)."""
    _, k, v, kw, vw, keys, values = make_layer("token", torch.float16, [16, 2], [2, 16], 1, 16, 2, 4, 3)
    kw[0, 0, 1, 3] = float("inf")
    k.data[1][0, 0, 2, 5] = -float("inf")  # keys: class 1 holds the 16-bit head 0
    k.sink[0, 1, 0, 0] = float("inf")
    got_k, _ = triton_kernels.dequantize_layer(k, v, kw, vw, rotated=False)
    assert got_k[0, 0, 7, 3] == float("inf") and got_k[0, 0, 4, 5] == -float("inf")
    assert got_k[0, 1, 0, 0] == float("inf")


def test_triton_alignment_of_strided_tensors():
    x = torch.zeros(2, 4, 8, 32, dtype=torch.float16, device=DEVICE)
    assert triton_kernels._alignment([x]) == 16
    assert triton_kernels._alignment([x[:, :, 1:]]) == 16  # 64-byte rows
    assert triton_kernels._alignment([x[..., 1:17]]) == 2  # rows start 2 bytes in
    assert triton_kernels._alignment([x[:1, :1, :1, :4].contiguous(), x.view(torch.uint8)[..., 3:]]) == 1


def test_triton_hadamard_is_the_libraries():
    from hf_ratequant.quantizers.rotated import hadamard

    for d in (16, 64, 256):
        assert torch.equal(triton_kernels._hadamard(d, torch.device("cpu")), hadamard(d) * d**0.5)


# ---- decode_attention --------------------------------------------------------------------------------------------
def reference_attention(query, mask, keys, values, scaling):
    """sdpa in float64 over the dequantized states, kv-heads repeated (what transformers' sdpa path computes)."""
    n_rep = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(n_rep, 1).double(), values.repeat_interleave(n_rep, 1).double()
    lq, tk = query.shape[2], keys.shape[2]
    if mask is None and lq > 1:
        mask = torch.ones(lq, tk, dtype=torch.bool, device=query.device).tril(tk - lq)
    return torch.nn.functional.scaled_dot_product_attention(query.double(), keys, values, attn_mask=mask,
                                                            scale=scaling)


ATTENTION_CASES = [
    # name, dtype, n_rep, q_len, masked, key_bits, value_bits, head_dim, sink, quantized, window, num_splits
    ("kivi", torch.float32, 4, 1, False, [2, 3, 16, 2], [4, 2, 2, 8], 64, 3, 64, 5, 1),
    ("kivi", torch.float32, 4, 1, False, [2, 3, 16, 2], [4, 2, 2, 8], 64, 3, 64, 5, 5),
    ("token", torch.float32, 1, 4, False, [1, 5, 16], [7, 16, 6], 32, 0, 48, 7, 2),
    ("token", torch.float32, 8, 1, True, [3, 2], [2, 16], 128, 4, 40, 0, None),
    ("kivi", torch.float16, 8, 4, True, [2, 4], [3, 16], 64, 0, 32, 9, 3),
    ("token", torch.float16, 1, 1, False, [8, 16, 1, 4], [2, 5, 16, 3], 32, 2, 20, 3, 1),
    ("rotated", torch.float32, 4, 1, True, [2, 16, 4], [3, 8, 16], 64, 3, 70, 5, 4),
    ("rotated", torch.float32, 1, 4, False, [4, 2], [2, 4], 32, 0, 33, 4, 1),
    ("rotated", torch.float16, 4, 1, False, [2, 3], [16, 2], 64, 2, 40, 3, 2),
    ("kivi", torch.float32, 4, 1, False, [2, 16], [3, 2], 256, 2, 16, 3, 2),
    ("kivi", torch.float16, 4, 1, True, [1, 8], [6, 16], 16, 1, 48, 2, 3),
    ("token", torch.float32, 4, 4, False, [2, 16], [16, 3], 32, 5, 0, 6, 2),  # nothing quantized yet
]


@pytest.mark.parametrize(
    "name,dtype,n_rep,q_len,masked,key_bits,value_bits,head_dim,sink,quantized,window,num_splits", ATTENTION_CASES
)
def test_triton_decode_attention_matches_sdpa(name, dtype, n_rep, q_len, masked, key_bits, value_bits, head_dim,
                                              sink, quantized, window, num_splits):
    batch = 2
    q, k, v, kw, vw, keys, values = make_layer(name, dtype, key_bits, value_bits, batch, head_dim, sink, quantized,
                                               window, strided=quantized > 0 and q_len == 1, seed=3)
    h, tk = len(key_bits), keys.shape[2]
    query = states((batch, h * n_rep, q_len, head_dim), dtype, seed=7)
    mask = None
    if masked:  # left padding: row 0's first 5 tokens are masked; broadcast over heads
        mask = torch.ones(batch, 1, q_len, tk, dtype=torch.bool, device=DEVICE).tril(tk - q_len)
        mask[0, :, :, :5] = False
    scaling = head_dim**-0.5
    got = triton_kernels.decode_attention(query, mask, k, v, kw, vw, scaling, rotated=q.rotates,
                                          num_splits=num_splits)
    assert got.dtype == dtype and got.shape == query.shape
    # float16: both sides round the keys to float16, rotated designs in different bases (measured 1.8e-3)
    tol = 1e-5 if dtype == torch.float32 else 4e-3 if q.rotates else 2e-3
    want = reference_attention(query, mask, keys, values, scaling)
    assert rel_err(got, want) < tol


def test_triton_decode_attention_does_not_depend_on_splits():
    q, k, v, kw, vw, keys, values = make_layer("kivi", torch.float32, [2, 4], [3, 16], 1, 32, 3, 192, 5, seed=5)
    query = states((1, 4, 1, 32), torch.float32, seed=8)
    outs = [triton_kernels.decode_attention(query, None, k, v, kw, vw, 0.2, rotated=False, num_splits=n)
            for n in (1, 2, 4, 100)]
    for out in outs[1:]:
        assert rel_err(out, outs[0]) < 1e-6


def test_triton_decode_attention_fully_masked_rows_are_zero():
    q, k, v, kw, vw, keys, values = make_layer("token", torch.float32, [2, 16], [4, 2], 2, 32, 2, 16, 3, seed=6)
    query = states((2, 4, 1, 32), torch.float32, seed=9)
    mask = torch.ones(2, 4, 1, keys.shape[2], dtype=torch.bool, device=DEVICE)
    mask[1] = False  # every key of batch row 1 is masked
    mask[0, 1, :, :-1] = False  # head 1 of row 0 sees only the last window token
    out = triton_kernels.decode_attention(query, mask, k, v, kw, vw, 0.3, rotated=False, num_splits=3)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out[0, 1, 0], values[0, 0, -1], rtol=1e-6, atol=1e-6)  # query head 1: kv-head 0
    assert rel_err(out[0], reference_attention(query[:1], mask[:1], keys[:1], values[:1], 0.3)) < 1e-5


# ---- constraints and errors --------------------------------------------------------------------------------------
def test_triton_unsupported_reason():
    window = torch.zeros(1, 2, 3, 64, device=DEVICE)
    assert triton_kernels.unsupported_reason(window) is None
    assert triton_kernels.unsupported_reason(64, torch.float16) is None  # the (head_dim, dtype) form
    assert "head_dim" in triton_kernels.unsupported_reason(window, 48, torch.float32)
    assert "head_dim" in triton_kernels.unsupported_reason(512, torch.float32)
    assert "dtype" in triton_kernels.unsupported_reason(window, 64, torch.float64)
    if triton_kernels._interpreted():
        assert "bfloat16" in triton_kernels.unsupported_reason(window.bfloat16())


def test_triton_wrappers_raise_value_errors():
    q, k, v, kw, vw, keys, _ = make_layer("token", torch.float32, [2, 4], [3, 16], 1, 32, 2, 8, 3)
    query = states((1, 4, 1, 32), torch.float32, seed=1)
    with pytest.raises(ValueError, match="boolean"):
        triton_kernels.decode_attention(query, torch.zeros(1, 1, 1, keys.shape[2]), k, v, kw, vw, 1.0, False)
    with pytest.raises(ValueError, match="broadcast"):
        triton_kernels.decode_attention(query, torch.ones(3, 1, 1, 1, dtype=torch.bool), k, v, kw, vw, 1.0, False)
    with pytest.raises(ValueError, match="multiple"):
        triton_kernels.decode_attention(query[:, :3], None, k, v, kw, vw, 1.0, False)
    with pytest.raises(ValueError, match="dtype"):
        triton_kernels.dequantize_layer(k, v, kw.double(), vw.double(), rotated=False)
    with pytest.raises(ValueError, match="head_dim"):
        triton_kernels.dequantize_layer(k, v, kw[..., :24], vw[..., :24], rotated=False)


def test_a_triton_kernel_error_raises(monkeypatch):
    """A failing kernel propagates its error (the ops' fallback decides what to do with it, not the kernels)."""

    @triton.jit
    def broken(tab, acc_ptr, ml_ptr, out_ptr, H, n_rep, Lq, n_q_items, n_items, ROWS, D: tl.constexpr,
               BLOCK_M: tl.constexpr, BC: tl.constexpr, ROTATED: tl.constexpr):
        tl.store(out_ptr + tl.arange(0, 3), 0.0)  # a range of 3: compiling (or interpreting) it fails

    monkeypatch.setattr(triton_kernels, "_combine_kernel", broken)
    q, k, v, kw, vw, *_ = make_layer("token", torch.float32, [2], [3], 1, 16, 0, 4, 2)
    with pytest.raises(Exception):
        triton_kernels.decode_attention(states((1, 1, 1, 16), torch.float32, 1), None, k, v, kw, vw, 1.0, False)
