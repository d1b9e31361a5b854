"""Is there a better allocation next to a calibrated one? Finite differences of the real KL, one unit at a time.

Every unit (layer, kv-head, keys or values) of a calibrated config is moved one bit up and one bit down, and each of
these allocations is scored by the KL of the model's next-token distribution to the full-precision one, measured in
one forward pass over calibration windows with every state the cache would hold quantized replaced by its
quantized-then-dequantized copy (`residual_split_mask`: the cache's own flush rule, sinks kept as they are). The
measured changes are compared with what the calibration table predicts (rank correlation), and the (+1, -1) pairs
they say should help are applied 1, 2, 4, ... at a time and scored on *other* windows: if those do not improve, no
local move that helps can be told from window noise with this much text.

    python benchmarks/allocation_neighbourhood.py \
        --config benchmarks/results/ratequant_quality_configs_defaults/token-2.5
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import torch
from _common import CALIBRATION, RESULTS_DIR, machine, write_results
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from hf_ratequant import RateQuantConfig
from hf_ratequant.calibration import calibration_windows, residual_split_mask
from hf_ratequant.config import ModelFingerprint
from hf_ratequant.models import cache_kwargs, load_default_model
from hf_ratequant.quantizers import get_quantizer

logger = logging.getLogger("benchmarks.allocation_neighbourhood")


class _FakeQuantLayer(DynamicLayer):
    """Attention gets `[quantized copy, original]` along the tokens; the split mask picks the copy per query."""

    def __init__(self, fake_keys, fake_values):
        super().__init__()
        self.fake_keys, self.fake_values = fake_keys, fake_values

    def update(self, key_states, value_states, *args, **kwargs):
        keys = key_states if self.fake_keys is None else self.fake_keys(key_states)
        values = value_states if self.fake_values is None else self.fake_values(value_states)
        return torch.cat([keys, key_states], dim=2), torch.cat([values, value_states], dim=2)


class SplitKL:
    """KL(full precision || allocation) per predicted token, over the queries that read quantized tokens."""

    def __init__(self, model, config: RateQuantConfig, windows: torch.LongTensor):
        self.model, self.windows = model, windows
        self.fp = ModelFingerprint.from_model_config(model.config)
        self.quantizer = get_quantizer(config.quantizer, config.group_size)
        self.sink = config.sink_length
        seq_len = windows.shape[1]
        self.mask = residual_split_mask(seq_len, config.residual_length, config.group_size, self.fp, model.dtype,
                                        "cpu", self.sink)
        self.first = min(seq_len - 1, config.residual_length + self.sink + config.group_size)
        self.reference = self._logprobs([(None, None)] * self.fp.num_layers)

    def _fake(self, kind: str, bits_per_head: list[int]):
        q, sink, tb = self.quantizer, self.sink, self.quantizer.time_block(kind)

        def fake(x: torch.Tensor) -> torch.Tensor:
            n = (x.shape[2] - sink) // tb * tb
            out = x.clone()
            for bits in sorted(set(bits_per_head)):
                heads = [h for h, b in enumerate(bits_per_head) if b == bits]
                part = x[:, heads, sink : sink + n]
                out[:, heads, sink : sink + n] = q.dequantize(q.quantize(part, bits, kind), kind)
            return out

        return fake

    @torch.no_grad()
    def _logprobs(self, fakes) -> torch.Tensor:
        cache = DynamicCache()
        cache.layers = [_FakeQuantLayer(fk, fv) for fk, fv in fakes]
        logits = self.model(input_ids=self.windows, **cache_kwargs(self.model, cache), use_cache=True,
                            attention_mask=self.mask).logits
        return logits[:, self.first :].float().log_softmax(-1)

    def __call__(self, bits: torch.Tensor) -> float:
        """`bits`: `(layers, kv_heads, 2)`."""
        logp = self._logprobs([(self._fake("key", bits[i, :, 0].tolist()), self._fake("value", bits[i, :, 1].tolist()))
                               for i in range(self.fp.num_layers)])
        ref = self.reference
        return float((ref.exp() * (ref - logp)).sum(-1).mean())


def _spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a calibrated config folder (with its distortion table)")
    p.add_argument("--calib-data", default=None, help="calibration text (default: calibrate's)")
    p.add_argument("--seq-len", type=int, default=CALIBRATION.seq_len,
                   help=f"calibration window length (default {CALIBRATION.seq_len}, calibrate's)")
    p.add_argument("--samples", type=int, default=CALIBRATION.n_samples,
                   help=f"fit windows to skip (the config's calibration; default {CALIBRATION.n_samples})")
    p.add_argument("--search-windows", type=int, default=2, help="validation windows the differences are taken on")
    p.add_argument("--check-windows", type=int, default=6, help="further validation windows the moves are checked on")
    p.add_argument("--output-dir", default=RESULTS_DIR)
    p.add_argument("--tag", default="")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(os.cpu_count() or 1)

    model, tok = load_default_model()
    config = RateQuantConfig.from_pretrained(args.config)
    table = config.curves["distortion"].double()  # (layers, kv_heads, 2, n_bits)
    grid = config.curves["bit_grid"].tolist()
    n_search, n_check = args.search_windows, args.check_windows
    windows, _, source = calibration_windows(tok, args.calib_data, seq_len=args.seq_len,
                                             n_windows=args.samples + n_search + n_check)
    search = SplitKL(model, config, windows[args.samples : args.samples + n_search])
    check = SplitKL(model, config, windows[args.samples + n_search :])
    start_bits = torch.stack([torch.tensor(config.key_bits), torch.tensor(config.value_bits)], dim=-1)
    lo, hi = min(grid), max(grid)

    t0 = time.perf_counter()
    base = search(start_bits)
    changes = {+1: {}, -1: {}}  # step -> {unit: measured change, predicted change}
    for unit in map(tuple, torch.cartesian_prod(*(torch.arange(n) for n in start_bits.shape)).tolist()):
        b = int(start_bits[unit])
        for step in (+1, -1):
            if not lo <= b + step <= hi:
                continue
            moved = start_bits.clone()
            moved[unit] += step
            predicted = float(table[unit][grid.index(b + step)] - table[unit][grid.index(b)])
            changes[step][unit] = (search(moved) - base, predicted)
        logger.info("unit %s: %.0f s", unit, time.perf_counter() - t0)
    search_s = time.perf_counter() - t0

    ups = sorted(changes[+1].items(), key=lambda kv: kv[1][0])
    downs = sorted(changes[-1].items(), key=lambda kv: kv[1][0])
    pairs, used, i, j = [], set(), 0, 0
    while i < len(ups) and j < len(downs):
        (up, (gain, _)), (down, (cost, _)) = ups[i], downs[j]
        if up in used:
            i += 1
        elif down in used or down == up:
            j += 1
        elif gain + cost >= 0:
            break
        else:
            pairs.append((up, down, gain + cost))
            used |= {up, down}
            i, j = i + 1, j + 1
    checked = [(0, check(start_bits))]
    k = 1
    while k <= len(pairs):
        moved = start_bits.clone()
        for up, down, _ in pairs[:k]:
            moved[up] += 1
            moved[down] -= 1
        checked.append((k, check(moved)))
        k *= 2

    rho = {step: _spearman([c[1] for c in changes[step].values()], [c[0] for c in changes[step].values()])
           for step in changes}
    result = dict(
        config=args.config, quantizer=config.quantizer, budget=config.budget, calib_source=source,
        machine=machine(), search_windows=n_search, check_windows=n_check, seq_len=args.seq_len,
        allocations_scored=1 + sum(len(c) for c in changes.values()), search_s=search_s, base_kl=base,
        spearman_up=rho[+1], spearman_down=rho[-1],
        largest_gain=ups[0][1][0] if ups else None, most_helpful_removal=downs[0][1][0] if downs else None,
        pairs=[[list(u), list(d), g] for u, d, g in pairs], checked=checked,
    )
    lines = [
        f"# Allocations next to a calibrated one: {config.quantizer} {config.budget:g} bits",
        "",
        f"`python benchmarks/allocation_neighbourhood.py --config {args.config}`; {machine()['cpu']}; "
        f"calibration text: {source}.",
        "",
        f"- {result['allocations_scored']} allocations (every unit one bit up and one bit down) scored on "
        f"{n_search} windows of {args.seq_len} tokens in {search_s:.0f} s; KL of the config there: {base:.5f}.",
        f"- Rank correlation of the measured change with the table's prediction: one bit up {rho[+1]:.2f}, "
        f"one bit down {rho[-1]:.2f}.",
        f"- Largest measured gain of one more bit: {result['largest_gain']:.5f}; a bit taken away at best changes "
        f"the KL by {result['most_helpful_removal']:+.5f}.",
        f"- (+1, -1) pairs the measured changes say should help: {len(pairs)}. On the other {n_check} windows:",
        "",
        "| pairs applied | KL |",
        "|---|---|",
        *[f"| {k} | {v:.5f} |" for k, v in checked],
    ]
    name = f"allocation_neighbourhood_{config.quantizer}-{config.budget:g}{'_' + args.tag if args.tag else ''}"
    write_results(name, result, "\n".join(lines) + "\n", args.output_dir)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
