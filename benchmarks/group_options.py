"""Does the group-size axis pay per byte? Measured distortion of every (bits, group size) option of every unit.

    python benchmarks/group_options.py                       # SmolLM2-135M, kivi / token / rotated, groups 32/64/128
    python benchmarks/group_options.py --model gemma3-270m --quantizers kivi

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
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import CALIBRATION, LAYOUT, MODEL_HELP, load_benchmark_model, machine, write_results

from hf_ratequant.calibration import calibration_windows, measure_distortions
from hf_ratequant.config import ModelFingerprint
from hf_ratequant.footprint import unit_bits_per_element
from hf_ratequant.operating_points import allocate_rate, integer_rates, lower_hull
from hf_ratequant.quantizers import get_quantizer

BUDGETS = (2.5, 3.0, 3.5, 4.0, 5.0)  # true bits per element, metadata included (the bar of issue [4 bytes])
KINDS = ("key", "value")


class PerKind:
    """One quantizer for keys and another for values (kivi's key groups are tokens, its value groups channels)."""

    def __init__(self, key, value):
        self._q = {"key": key, "value": value}

    def time_block(self, kind: str) -> int:
        return self._q[kind].time_block(kind)

    def roundtrip(self, x, bits, kind):
        return self._q[kind].roundtrip(x, bits, kind)


def _quantizer(design: str, group: int, kind: str, head_dim: int):
    """The design at `group` for `kind`, or None where the group does not fit head_dim."""
    if design == "kivi":
        if kind == "value" and head_dim % group:
            return None
        return get_quantizer("kivi", group)
    if head_dim % group:
        return None
    return type(get_quantizer(design))(row_group=group)


def options(design: str, groups: list[int], bits: list[int], head_dim: int):
    """`[(group, bits)]`, with the quantizer pair per group and the true rate of every option per kind."""
    pairs, rates = {}, {k: [] for k in KINDS}
    opts = [(g, b) for g in groups for b in bits]
    for g in groups:
        q = {k: _quantizer(design, g, k, head_dim) for k in KINDS}
        if any(v is not None for v in q.values()):  # a kind the group does not fit is measured at head_dim, unused
            pair = [q[k] or _quantizer(design, head_dim, k, head_dim) for k in KINDS]
            pairs[g] = (PerKind(*pair), {k: q[k] is not None for k in KINDS})
    for kind in KINDS:
        for g, b in opts:
            ok = g in pairs and pairs[g][1][kind]
            row_group = None if design == "kivi" else g
            rates[kind].append(unit_bits_per_element(design, g if design == "kivi" else LAYOUT.group_size, b, kind,
                                                     head_dim, row_group=row_group) if ok else float("nan"))
    return opts, pairs, rates


def analyse(design, opts, table, rates, n_units_per_kind):
    """Per true budget: the exact allocation over all options vs bits alone at one group vs the best fixed option
    pair; the hull histogram."""
    n_opts = len(opts)
    dist = torch.cat([table[..., 0, :].reshape(-1, n_opts), table[..., 1, :].reshape(-1, n_opts)])  # (units, opts)
    rate_rows = torch.tensor([rates["key"]] * n_units_per_kind + [rates["value"]] * n_units_per_kind,
                             dtype=torch.float64)
    dist = torch.where(torch.isnan(rate_rows), torch.full_like(dist, float("inf")), dist)
    int_rates, scale = integer_rates(torch.nan_to_num(rate_rows, nan=0.0))
    n_units = dist.shape[0]
    hull_counts: dict[str, int] = {}
    for u in range(n_units):
        for o in lower_hull(int_rates[u], dist[u]):
            key = f"{'KV'[u >= n_units_per_kind]} {opts[o][1]}b g{opts[o][0]}"
            hull_counts[key] = hull_counts.get(key, 0) + 1
    rows = []
    for budget in BUDGETS:
        cap = int(round(budget * n_units * scale))
        row = dict(budget=budget)
        try:
            choice = allocate_rate(int_rates, dist, cap)
        except ValueError:
            continue
        row["all_options"] = float(dist.gather(1, choice[:, None]).sum())
        row["all_options_rate"] = float(rate_rows.gather(1, choice[:, None]).mean())
        used: dict[str, int] = {}
        for u, o in enumerate(choice.tolist()):
            key = f"{'KV'[u >= n_units_per_kind]} {opts[o][1]}b g{opts[o][0]}"
            used[key] = used.get(key, 0) + 1
        row["used"] = dict(sorted(used.items()))
        best_single = None
        for g in sorted({g for g, _ in opts}):
            mask = torch.tensor([og == g for og, _ in opts])
            d = torch.where(mask[None], dist, torch.full_like(dist, float("inf")))
            if not bool(torch.isfinite(d).any(1).all()):
                continue
            try:
                c = allocate_rate(int_rates, d, cap)
            except ValueError:
                continue
            total = float(d.gather(1, c[:, None]).sum())
            if best_single is None or total < best_single[1]:
                best_single = (g, total)
        row["bits_only_group"], row["bits_only"] = best_single if best_single else (None, None)
        best_fixed = None
        half = n_units_per_kind
        for ok in range(n_opts):
            for ov in range(n_opts):
                rk, rv = rates["key"][ok], rates["value"][ov]
                if rk != rk or rv != rv or (rk + rv) / 2 > budget + 1e-9:
                    continue
                total = float(dist[:half, ok].sum() + dist[half:, ov].sum())
                if best_fixed is None or total < best_fixed[0]:
                    best_fixed = (total, f"K {opts[ok][1]}b g{opts[ok][0]} / V {opts[ov][1]}b g{opts[ov][0]}",
                                  (rk + rv) / 2)
        row["best_fixed"], row["best_fixed_name"], row["best_fixed_rate"] = best_fixed
        rows.append(row)
    return dict(design=design, hull=dict(sorted(hull_counts.items(), key=lambda kv: -kv[1])), rows=rows)


def markdown(payload) -> str:
    out = [f"# Group-size options: {payload['model']}", "",
           f"Measured on {payload['source']} ({payload['tokens']} tokens, {payload['seconds']:.0f} s for "
           f"{payload['n_designs']} design-group pairs in one pass); calibration's objective (sum of measured "
           "distortions), not quality through the cache.", ""]
    for d in payload["designs"]:
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
        opts, pairs, rates = options(design, args.groups, args.bits, head_dim)
        plan[design] = (opts, pairs, rates)
        designs.update({f"{design}-g{g}": q for g, (q, _) in pairs.items()})
    start = time.perf_counter()
    tables = measure_distortions(model, windows, designs, args.bits, group_size=LAYOUT.group_size,
                                 batch_size=CALIBRATION.batch_size, residual_length=LAYOUT.residual_length,
                                 sink_length=LAYOUT.sink_length)
    seconds = time.perf_counter() - start
    results = []
    for design, (opts, pairs, rates) in plan.items():
        groups = sorted({g for g, _ in opts})
        parts = [tables[f"{design}-g{g}"] if g in pairs else None for g in groups]
        shape = next(t for t in parts if t is not None).shape
        parts = [t if t is not None else torch.full(shape, float("inf"), dtype=torch.float64) for t in parts]
        table = torch.cat(parts, dim=-1)  # (layers, heads, 2, groups * bits), option order = opts
        results.append(analyse(design, opts, table, rates, shape[0] * shape[1]))
    payload = dict(model=name, source=source, tokens=int(windows.numel()), seconds=seconds, head_dim=head_dim,
                   n_designs=len(designs), groups=args.groups, bits=args.bits, designs=results, machine=machine())
    stem = "group_options" + (f"_{args.tag}" if args.tag else "")
    kwargs = {"output_dir": args.output_dir} if args.output_dir else {}
    json_path, _ = write_results(stem, payload, markdown(payload), **kwargs)
    print(markdown(payload))
    print(f"\nwrote {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
