"""Does the group-size axis pay per byte? Measured distortion of every (bits, group size) option of every unit.

    python benchmarks/group_options.py                       # SmolLM2-135M, kivi / token / rotated, groups 32/64/128
    python benchmarks/group_options.py --model gemma3-270m --quantizers kivi
    python benchmarks/group_options.py --scale-bits 16 8 --tag scale-bits  # scales and zero-points in 8 bits too

For each design and group size, calibration's attention-output measure (the same captured states, one forward and
backward pass per batch for every option) on the calibration half of the text; every option's true rate in bits per
element (code bits plus its 16-bit scales and zero-points, counted from the packer: kivi keys group tokens, kivi
values and the per-token designs group channels); then, per design and true budget, the exact allocation over every
option ([`operating_points.allocate_rate`]) against the best allocation of bits alone at one group size and the best
fixed configuration (one bits-and-group option for all keys, one for all values) of no more bytes.

What this measures is calibration's objective, the sum of the units' measured distortions, not quality through the
cache. It says which options lie on the units' lower convex hulls and how much of the objective the group axis
could save; quality through the cache, with the groups calibration chooses per unit and stores, is
`ratequant_quality.py --budget-unit true --groups ...`.

`--scale-bits 16 8` adds, for every group size, the same option with its scale and zero-point coded in 8 bits each
relative to three 16-bit numbers per super-block of 32 tokens (`hf_ratequant.quantizers.scales`, the super-block idea
of llama.cpp's k-quants; `CacheLayout(scale_bits=8)` in the cache), the rates counted from what the quantizer
stores.
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import CALIBRATION, LAYOUT, MODEL_HELP, load_benchmark_model, machine, write_report

from hf_ratequant.calibration import calibration_windows, measure_distortions
from hf_ratequant.config import ModelFingerprint
from hf_ratequant.footprint import option_bits_per_element
from hf_ratequant.operating_points import allocate_rate, integer_rates, lower_hull
from hf_ratequant.quantizers import get_quantizer

BUDGETS = (2.5, 3.0, 3.5, 4.0, 5.0)  # true bits per element, metadata included (the bar of issue [4 bytes])
KINDS = ("key", "value")


class PerKind:
    """One quantizer for keys and another for values (kivi's key groups are tokens, its value groups channels)."""

    def __init__(self, key, value):
        self._q = {"key": key, "value": value}

    def token_block(self, kind: str) -> int:
        return self._q[kind].token_block(kind)

    def roundtrip(self, x, bits, kind):
        return self._q[kind].roundtrip(x, bits, kind)


def _quantizer(design: str, group: int, kind: str, head_dim: int, scale_bits: int = 16):
    """The design at `group` for `kind` with `scale_bits` scales, or None where the group does not fit head_dim."""
    if design == "kivi":
        if kind == "value" and head_dim % group:
            return None
        return get_quantizer("kivi", group, scale_bits)
    if head_dim % group:
        return None
    return get_quantizer(design, LAYOUT.group_size, scale_bits).regrouped(group)


def label(group: int, scale_bits: int) -> str:
    """How an option's group (and scale precision, where not 16 bits) is written: `64`, `64s8`."""
    return f"{group}" if scale_bits == 16 else f"{group}s{scale_bits}"


def options(design: str, groups: list[int], bits: list[int], head_dim: int, scale_bits: tuple[int, ...] = (16,)):
    """`[(label, bits)]`, with the quantizer pair per label and the true rate of every option per kind (labels:
    [`label`], one per group size and scale precision)."""
    pairs, rates = {}, {k: [] for k in KINDS}
    variants = [(g, s) for s in sorted(scale_bits, reverse=True) for g in groups]
    opts = [(label(g, s), b) for g, s in variants for b in bits]
    for g, s in variants:
        q = {k: _quantizer(design, g, k, head_dim, s) for k in KINDS}
        if any(v is not None for v in q.values()):  # a kind the group does not fit is measured at head_dim, unused
            pair = [q[k] or _quantizer(design, head_dim, k, head_dim, s) for k in KINDS]
            pairs[label(g, s)] = (PerKind(*pair), {k: q[k] is not None for k in KINDS})
    for kind in KINDS:
        for g, s in variants:
            for b in bits:
                ok = label(g, s) in pairs and pairs[label(g, s)][1][kind]
                rates[kind].append(option_bits_per_element(design, b, g, kind, head_dim, scale_bits=s)
                                   if ok else float("nan"))
    return opts, pairs, rates


def _name(kind: str, opt: tuple[str, int]) -> str:
    return f"{kind} {opt[1]}b g{opt[0]}"


def _exact(dist: torch.Tensor, int_rates: torch.Tensor, cap: int, mask: torch.Tensor) -> torch.Tensor | None:
    """The exact allocation over the options in `mask`, or None where they cannot meet the budget."""
    d = torch.where(mask[None], dist, torch.full_like(dist, float("inf")))
    if not bool(torch.isfinite(d).any(1).all()):
        return None
    try:
        return allocate_rate(int_rates, d, cap)
    except ValueError:
        return None


def _best_fixed(dist, opts, rates, budget, half, mask):
    """(objective, name, rate) of the best option pair (one for all keys, one for all values) in `mask` within
    `budget`."""
    best = None
    for ok in range(len(opts)):
        for ov in range(len(opts)):
            rk, rv = rates["key"][ok], rates["value"][ov]
            if not (mask[ok] and mask[ov]) or rk != rk or rv != rv or (rk + rv) / 2 > budget + 1e-9:
                continue
            total = float(dist[:half, ok].sum() + dist[half:, ov].sum())
            if best is None or total < best[0]:
                best = (total, f"{_name('K', opts[ok])} / {_name('V', opts[ov])}", (rk + rv) / 2)
    return best


def analyse(design, opts, table, rates, n_units_per_kind):
    """Per true budget: the exact allocation over all options vs bits alone at one group vs the best fixed option
    pair; the hull histogram. Where some options code their scales in 8 bits (labels `...s8`), the exact allocation
    and the best fixed pair over the 16-bit options alone too (`*_16`: what the coded scales add), and the exact
    allocation over the 8-bit options alone (`all_options_8`: one precision for the whole cache, as
    `CacheLayout(scale_bits=8)` stores it; against `all_options`, what a scale precision per unit would add)."""
    n_opts = len(opts)
    dist = torch.cat([table[..., 0, :].reshape(-1, n_opts), table[..., 1, :].reshape(-1, n_opts)])  # (units, opts)
    rate_rows = torch.tensor([rates["key"]] * n_units_per_kind + [rates["value"]] * n_units_per_kind,
                             dtype=torch.float64)
    dist = torch.where(torch.isnan(rate_rows), torch.full_like(dist, float("inf")), dist)
    int_rates, scale = integer_rates(torch.nan_to_num(rate_rows, nan=0.0))
    n_units, half = dist.shape[0], n_units_per_kind
    every = torch.ones(n_opts, dtype=torch.bool)
    sixteen = torch.tensor(["s" not in g for g, _ in opts])
    coded = not bool(sixteen.all())
    hull_counts: dict[str, int] = {}
    for u in range(n_units):
        for o in lower_hull(int_rates[u], dist[u]):
            key = _name("KV"[u >= half], opts[o])
            hull_counts[key] = hull_counts.get(key, 0) + 1
    rows = []
    for budget in BUDGETS:
        cap = int(round(budget * n_units * scale))
        row = dict(budget=budget)
        choice = _exact(dist, int_rates, cap, every)
        if choice is None:
            continue
        row["all_options"] = float(dist.gather(1, choice[:, None]).sum())
        row["all_options_rate"] = float(rate_rows.gather(1, choice[:, None]).mean())
        used: dict[str, int] = {}
        for u, o in enumerate(choice.tolist()):
            key = _name("KV"[u >= half], opts[o])
            used[key] = used.get(key, 0) + 1
        row["used"] = dict(sorted(used.items()))
        best_single = None
        for g in dict.fromkeys(g for g, _ in opts):
            c = _exact(dist, int_rates, cap, torch.tensor([og == g for og, _ in opts]))
            if c is None:
                continue
            total = float(dist.gather(1, c[:, None]).sum())
            if best_single is None or total < best_single[1]:
                best_single = (g, total)
        row["bits_only_group"], row["bits_only"] = best_single if best_single else (None, None)
        row["best_fixed"], row["best_fixed_name"], row["best_fixed_rate"] = _best_fixed(
            dist, opts, rates, budget, half, every)
        if coded:
            c = _exact(dist, int_rates, cap, sixteen)
            row["all_options_16"] = float(dist.gather(1, c[:, None]).sum()) if c is not None else None
            fixed16 = _best_fixed(dist, opts, rates, budget, half, sixteen)
            row["best_fixed_16"], row["best_fixed_16_name"] = fixed16[:2] if fixed16 else (None, None)
            c = _exact(dist, int_rates, cap, ~sixteen)
            row["all_options_8"] = float(dist.gather(1, c[:, None]).sum()) if c is not None else None
        rows.append(row)
    return dict(design=design, hull=dict(sorted(hull_counts.items(), key=lambda kv: -kv[1])), rows=rows)


def _ratio(x: float | None, ref: float) -> str:
    return "-" if x is None else f"{x / ref:.3f}"


def markdown(payload) -> str:
    coded = any("all_options_16" in r for d in payload["designs"] for r in d["rows"])
    what = "design-group pairs" if not coded else "design-group-scale variants"
    out = [f"# Group-size options: {payload['model']}", "",
           f"Measured on {payload['source']} ({payload['tokens']} tokens, {payload['seconds']:.0f} s for "
           f"{payload['n_designs']} {what} in one pass); calibration's objective (sum of measured "
           "distortions), not quality through the cache.", ""]
    for d in payload["designs"]:
        if coded:
            out += [f"## {d['design']}", "",
                    "| true bits/elem | all options, 16-bit scales | all options, 8-bit scales | all options, 16- or "
                    "8-bit scales | best fixed pair, 16-bit scales | best fixed pair, 16- or 8-bit | options used "
                    "(units), 16- or 8-bit |",
                    "|---|---|---|---|---|---|---|"]
            for r in d["rows"]:
                ref = r["best_fixed_16"] if r["best_fixed_16"] is not None else r["best_fixed"]
                used = ", ".join(f"{k}: {v}" for k, v in r["used"].items())
                fixed16 = f"1 ({r['best_fixed_16_name']})" if r["best_fixed_16"] is not None else "none fits"
                out.append(f"| {r['budget']:g} | {_ratio(r['all_options_16'], ref)} | "
                           f"{_ratio(r.get('all_options_8'), ref)} | **{r['all_options'] / ref:.3f}**"
                           f" | {fixed16} | {r['best_fixed'] / ref:.3f} ({r['best_fixed_name']}) | {used} |")
        else:
            out += [f"## {d['design']}", "",
                    "| true bits/elem | all options (bits x group) | rate used | bits only, best single group | "
                    "best fixed option pair | options used (units) |", "|---|---|---|---|---|---|"]
            for r in d["rows"]:
                fixed = r["best_fixed"]
                bits_only = (f"{r['bits_only'] / fixed:.3f} (g{r['bits_only_group']})"
                             if r["bits_only"] is not None else "-")
                used = ", ".join(f"{k}: {v}" for k, v in r["used"].items())
                out.append(f"| {r['budget']:g} | **{r['all_options'] / fixed:.3f}** | {r['all_options_rate']:.3f} | "
                           f"{bits_only} | 1 ({r['best_fixed_name']}, {r['best_fixed_rate']:g}) | {used} |")
        hull = ", ".join(f"{k}: {v}" for k, v in list(d["hull"].items())[:12])
        out += ["", f"Options on the units' lower convex hulls (units): {hull}", ""]
    if coded:
        out += ["Distortions relative to the best fixed option pair with 16-bit scales of no more bytes (1 = as "
                "good; lower is better). `g64s8`: groups of 64 with 8-bit scales and zero-points, and three 16-bit "
                "numbers per super-block (one group position of one head over 32 tokens; kivi keys: one block of "
                "tokens, every channel), counted in the rate (`CacheLayout(scale_bits=8)` stores them). \"8-bit "
                "scales\": every unit's scales in 8 bits, as the cache stores them (one precision per cache); "
                "\"16- or 8-bit\": each unit picks its scales' precision too (the cache does not store that)."]
    else:
        out += ["Distortions relative to the best fixed option pair of no more bytes (1 = as good; lower is better)."]
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2", help=MODEL_HELP)
    p.add_argument("--quantizers", nargs="+", default=["kivi", "token", "rotated"])
    p.add_argument("--groups", nargs="+", type=int, default=[32, 64, 128])
    p.add_argument("--bits", nargs="+", type=int, default=list(range(1, 7)))
    p.add_argument("--data", default="pydoc", help="calibration text (default: the calibration half of pydoc)")
    p.add_argument("--samples", type=int, default=CALIBRATION.n_samples)
    p.add_argument("--seq-len", type=int, default=CALIBRATION.seq_len)
    p.add_argument("--scale-bits", nargs="+", type=int, choices=[16, 8], default=[16],
                   help="precisions of the scales and zero-points to measure (default 16; 16 8 adds coded scales)")
    p.add_argument("--tag", default="", help="suffix of the output names: group_options_<tag>")
    p.add_argument("--output-dir", default=None)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    torch.manual_seed(0)
    model, tokenizer, name = load_benchmark_model(args.model, torch.float32, torch.device("cpu"))
    windows, _, source = calibration_windows(tokenizer, args.data, seq_len=args.seq_len, n_windows=args.samples)
    head_dim = ModelFingerprint.from_model_config(model.config).head_dim
    designs, plan = {}, {}
    for design in args.quantizers:
        opts, pairs, rates = options(design, args.groups, args.bits, head_dim, tuple(args.scale_bits))
        plan[design] = (opts, pairs, rates)
        designs.update({f"{design}-g{g}": q for g, (q, _) in pairs.items()})
    start = time.perf_counter()
    tables = measure_distortions(model, windows, designs, args.bits, group_size=LAYOUT.group_size,
                                 batch_size=CALIBRATION.batch_size, residual_length=LAYOUT.residual_length,
                                 sink_length=LAYOUT.sink_length)
    seconds = time.perf_counter() - start
    results = []
    for design, (opts, pairs, rates) in plan.items():
        groups = list(dict.fromkeys(g for g, _ in opts))  # option order
        parts = [tables[f"{design}-g{g}"] if g in pairs else None for g in groups]
        shape = next(t for t in parts if t is not None).shape
        parts = [t if t is not None else torch.full(shape, float("inf"), dtype=torch.float64) for t in parts]
        table = torch.cat(parts, dim=-1)  # (layers, heads, 2, groups * bits), option order = opts
        results.append(analyse(design, opts, table, rates, shape[0] * shape[1]))
    payload = dict(model=name, source=source, tokens=int(windows.numel()), seconds=seconds, head_dim=head_dim,
                   n_designs=len(designs), groups=args.groups, bits=args.bits, scale_bits=args.scale_bits,
                   designs=results, machine=machine())
    write_report("group_options", args.tag, payload, markdown(payload), args.output_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
