"""`SplitAttention`: softmax attention over `[far, near]` states, recomputing only the far columns, against dense
masked attention."""

import pytest
import torch

from hf_ratequant.split_attention import SplitAttention


def dense(query, keys, values, mask, scaling):
    """Reference: grouped-query softmax attention under a boolean or additive mask, `(batch, queries, heads, d)`."""
    group = query.shape[1] // keys.shape[1]
    k, v = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    scores = query @ k.transpose(-1, -2) * scaling
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return (scores.softmax(-1) @ v).transpose(1, 2)


def split_mask(tokens, n_quantized, window=None):
    """The residual-aware split over `[far, near]`: query i reads key j < n_quantized(i) from the far copy."""
    i, j = torch.arange(tokens)[:, None], torch.arange(tokens)[None, :]
    allowed = j <= i if window is None else (j <= i) & (i - j < window)
    far = j < n_quantized(i)
    return torch.cat([allowed & far, allowed & ~far], dim=1)[None, None]


@pytest.mark.parametrize("additive", [False, True])
@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize("block", [7, 64])
def test_outputs_equal_dense_masked_attention(additive, window, block):
    g = torch.Generator().manual_seed(0)
    batch, q_heads, kv_heads, tokens, d = 2, 6, 2, 48, 16
    query = torch.randn(batch, q_heads, tokens, d, generator=g)
    keys = torch.randn(batch, kv_heads, 2 * tokens, d, generator=g) * 2
    keys[:, :, tokens:] = keys[:, :, :tokens]  # the near copy holds the same states
    values = torch.randn(batch, kv_heads, 2 * tokens, d, generator=g)
    values[:, :, tokens:] = values[:, :, :tokens]
    mask = split_mask(tokens, lambda i: ((i - 8).clamp_min(0) // 4) * 4, window)
    if additive:
        mask = torch.zeros(mask.shape).masked_fill_(~mask, torch.finfo(torch.float32).min)
    split = SplitAttention(query, keys, values, mask, 0.3, tokens, block)
    torch.testing.assert_close(split.base, dense(query, keys, values, mask, 0.3), rtol=1e-5, atol=1e-6)

    changed = keys.clone()
    changed[:, :, :tokens] += torch.randn(batch, kv_heads, tokens, d, generator=g)
    torch.testing.assert_close(split.with_far_keys(changed[:, :, :tokens]), dense(query, changed, values, mask, 0.3),
                               rtol=1e-5, atol=1e-6)

    other_keys, other_values = torch.randn_like(keys, generator=g), torch.randn(batch, kv_heads, 2 * tokens, 5)
    torch.testing.assert_close(split(other_keys, other_values), dense(query, other_keys, other_values, mask, 0.3),
                               rtol=1e-5, atol=1e-6)

    errors = torch.randn(batch, kv_heads, tokens, 3 * d, generator=g)  # three value errors along the channels
    padded = torch.cat([errors, torch.zeros(batch, kv_heads, tokens, 3 * d)], dim=2)
    torch.testing.assert_close(split.far_output(errors), dense(query, keys, padded, mask, 0.3), rtol=1e-5,
                               atol=1e-6)


def test_a_query_that_reads_no_far_token_gets_the_near_part_alone():
    """Early queries read nothing from the far copy: their far scores are all masked, the output is exact."""
    g = torch.Generator().manual_seed(1)
    query = torch.randn(1, 2, 10, 8, generator=g)
    states = torch.randn(1, 1, 10, 8, generator=g)
    keys, values = torch.cat([states, states], 2), torch.cat([states, states], 2)
    mask = split_mask(10, lambda i: torch.zeros_like(i))  # nothing quantized yet
    split = SplitAttention(query, keys, values, mask, 1.0, 10, block=4)
    assert torch.isfinite(split.base).all()
    torch.testing.assert_close(split.with_far_keys(torch.randn(1, 1, 10, 8, generator=g)), split.base)
    assert split.far_output(torch.randn(1, 1, 10, 8, generator=g)).abs().max() == 0


def test_query_heads_must_group_over_kv_heads():
    with pytest.raises(ValueError, match="5 query heads"):
        SplitAttention(torch.zeros(1, 5, 4, 8), torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8, 8),
                       torch.ones(1, 1, 4, 8, dtype=torch.bool), 1.0, 4)
