"""One layer's attention over the residual-aware split, computed in two parts (pure tensor math, no hooks, no I/O).

During calibration a layer's attention reads every state twice, `[far copy, near copy]` along the token axis, and
the split mask lets each query read a token from the far copy exactly when the cache would hold it quantized (see
`calibration.residual_split_mask`). The attention-output measure then recomputes the layer's attention once per
quantized version of the far copy: once per key option, and once per value design for the value errors. Only the
far columns change, and each query reads far tokens only up to its quantized boundary, so recomputing the whole
`(queries, 2 * tokens)` score matrix, three quarters of it masked, spends most of its work on columns that cannot
change. [`SplitAttention`] keeps the near part of the softmax (its running maximum, normaliser and weighted sum) once
per layer and recomputes only the far columns each query can read, block by block of queries, merged with the near
part exactly as a streaming softmax merges two blocks. It reproduces softmax attention with any additive or boolean
mask, grouped-query heads and a scaling factor; anything else (logit soft-capping, learned sinks, position biases)
is the caller's to detect (compare [`SplitAttention.base`] with the model's own output).
"""

from __future__ import annotations

import torch

__all__ = ["SplitAttention"]


class SplitAttention:
    """Softmax attention of `query` over `[far, near]` states where only the far part will change.

    Args:
        query (`torch.Tensor`): `(batch, q_heads, queries, head_dim)`.
        keys, values (`torch.Tensor`): `(batch, kv_heads, n_far + n_near, head_dim)`, far copy first.
        mask (`torch.Tensor`): `(batch or 1, q_heads or 1, queries, n_far + n_near)`, boolean (True: readable) or
            additive.
        scaling (`float`): the factor applied to `query @ keys^T`.
        n_far (`int`): how many leading key/value tokens form the far copy.
        block (`int`, *optional*, defaults to 64): queries per block; each block computes only the far columns any of
            its queries can read.

    Attributes:
        base (`torch.Tensor`): float32 `(batch, queries, q_heads, head_dim)`, the attention output with the states
            as given (the layout of transformers' attention functions).

    Calling it, `split(keys, values)`, computes the output over any states (nothing kept), as the model's attention
    function would; [`with_far_keys`] and [`far_output`] reuse the near part.
    """

    def __init__(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                 scaling: float, n_far: int, block: int = 64):
        batch, q_heads, n_queries, head_dim = query.shape
        kv_heads = keys.shape[1]
        if q_heads % kv_heads:
            raise ValueError(f"{q_heads} query heads do not group evenly over {kv_heads} kv-heads.")
        self.shape = (batch, kv_heads, q_heads // kv_heads)
        self.scaling = scaling
        self.n_far = n_far
        self.far_keys, self.far_values = keys[:, :, :n_far], values[:, :, :n_far]
        readable = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        additive = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device) if mask.dtype == torch.bool \
            else mask.float()
        additive = additive.masked_fill(~readable, float("-inf"))
        any_row = readable.flatten(0, 1).any(dim=0)  # (queries, columns): readable by some batch row or head
        self.blocks = []
        for start in range(0, n_queries, block):
            rows = slice(start, start + block)
            q = self._grouped(query[:, :, rows]).flatten(2, 3).contiguous()  # (batch, kv_heads, group * rows, d)
            far_cols = _columns(any_row[rows, :n_far].any(dim=0).nonzero().squeeze(1))
            near_cols = _columns(n_far + any_row[rows, n_far:].any(dim=0).nonzero().squeeze(1))
            far_mask = self._grouped_mask(_take(additive[:, :, rows], far_cols, -1))
            near_mask = self._grouped_mask(_take(additive[:, :, rows], near_cols, -1))
            near = self._near(q, keys, values, near_cols, near_mask)
            self.blocks.append((q, far_cols, far_mask, near_cols, near_mask, near))
        self.base = self.with_far_keys(self.far_keys)

    def __call__(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The attention output over any `keys` and `values` of the recorded shape (nothing kept), float32 `(batch,
        queries, q_heads, channels)`: what the model's own attention function would return."""
        out = []
        for q, far_cols, far_mask, near_cols, near_mask, _ in self.blocks:
            near = self._near(q, keys, values, near_cols, near_mask)
            out.append(self._merge(q, keys[:, :, :self.n_far], values[:, :, :self.n_far], far_cols, far_mask, near))
        return self._layout(out)

    def _near(self, q, keys, values, cols, mask):
        """The near part of a block's softmax: `(row maximum, normaliser, weighted sum of values)`."""
        scores = self._scores(q, _take(keys, cols)) + mask
        top = scores.amax(-1)  # every query reads itself from the near copy: finite
        weights = (scores - top.unsqueeze(-1)).exp_()
        return top, weights.sum(-1), self._weighted(weights, _take(values, cols))

    def _merge(self, q, far_keys, far_values, cols, far_mask, near):
        """A block's output: its far columns merged with its near part."""
        weights, near_weight, total = self._far_weights(q, _take(far_keys, cols), far_mask, near)
        far = self._weighted(weights, _take(far_values, cols))
        return (near[2] * near_weight.unsqueeze(-1) + far) / total.unsqueeze(-1)

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        """`(batch, q_heads, rows, d)` -> `(batch, kv_heads, group, rows, d)`: head h reads kv-head h // group."""
        batch, kv_heads, group = self.shape
        return x.unflatten(1, (kv_heads, group))

    def _grouped_mask(self, m: torch.Tensor) -> torch.Tensor:
        return m.unsqueeze(1) if m.shape[1] == 1 else self._grouped(m)

    def _scores(self, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """`(batch, kv_heads, group, rows, columns)` scaled scores of a block's queries `(batch, kv_heads, group *
        rows, d)` over `keys` `(batch, kv_heads, columns, d)`: one matrix product per kv-head for its whole group."""
        scores = (q.float() @ keys.float().transpose(-1, -2)).mul_(self.scaling)
        return scores.unflatten(2, (self.shape[2], -1))

    def _weighted(self, weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """`weights` `(batch, kv_heads, group, rows, columns)` applied to `values` `(batch, kv_heads, columns, c)`:
        `(batch, kv_heads, group, rows, c)`."""
        return (weights.flatten(2, 3) @ values.float()).unflatten(2, (self.shape[2], -1))

    def _far_weights(self, q, far_keys, far_mask, near):
        """Unnormalised far weights, and the near part rescaled to the merged maximum: `(weights, near_weight,
        normaliser)`."""
        scores = self._scores(q, far_keys) + far_mask
        if not scores.shape[-1]:  # no query of the block reads a far token yet
            return scores, torch.ones_like(near[0]), near[1]
        top = torch.maximum(near[0], scores.amax(-1))
        weights = (scores - top.unsqueeze(-1)).exp_()
        near_weight = (near[0] - top).exp_()
        return weights, near_weight, near[1] * near_weight + weights.sum(-1)

    def _layout(self, out: list[torch.Tensor]) -> torch.Tensor:
        """Blocks of `(batch, kv_heads, group, rows, d)` -> `(batch, queries, q_heads, d)`."""
        return torch.cat(out, dim=3).flatten(1, 2).transpose(1, 2)

    def with_far_keys(self, far_keys: torch.Tensor) -> torch.Tensor:
        """The attention output, float32 `(batch, queries, q_heads, head_dim)`, with the far copy's keys replaced by
        `far_keys` `(batch, kv_heads, n_far, head_dim)` (values and the near copy as given)."""
        return self._layout([self._merge(q, far_keys, self.far_values, cols, far_mask, near)
                             for q, cols, far_mask, _, _, near in self.blocks])

    def far_output(self, far_values: torch.Tensor) -> torch.Tensor:
        """The part of the attention output the far copy's values contribute, with `far_values` `(batch, kv_heads,
        n_far, channels)` in their place (any number of channels; attention is linear in the values): float32
        `(batch, queries, q_heads, channels)`. For value errors, this is the output error."""
        out = []
        for q, cols, far_mask, _, _, near in self.blocks:
            weights, _, total = self._far_weights(q, _take(self.far_keys, cols), far_mask, near)
            out.append(self._weighted(weights, _take(far_values, cols)) / total.unsqueeze(-1))
        return self._layout(out)


def _columns(index: torch.Tensor) -> torch.Tensor | slice:
    """The columns a block reads: a slice where they run contiguously (the usual causal case: a view, no copy),
    else their indices."""
    n = index.numel()
    if n == 0:
        return slice(0, 0)
    first, last = int(index[0]), int(index[-1])
    return slice(first, last + 1) if last - first + 1 == n else index


def _take(x: torch.Tensor, cols: torch.Tensor | slice, dim: int = 2) -> torch.Tensor:
    """`x`'s columns `cols` along `dim` (a view for a slice)."""
    if isinstance(cols, slice):
        return x.narrow(dim, cols.start, cols.stop - cols.start)
    return x.index_select(dim, cols)
