"""Does calibration's measure carry across texts? The distortion table measured on two texts, against the real cache.

Calibration measures every unit's distortion at every bit-width on its text (`config.curves["distortion"]`) and
validates the allocations it derives through the real cache on more of the same text. A cache calibrated on one text
and served on another can lose in two ways: the units' importance differs between the texts (the tables disagree),
or the measure, on the other text, predicts gains that the cache does not deliver (the tables agree, the real KL does
not follow them). This script tells the two apart for a calibrated cell: it measures the table on each text
(`calibrate(..., validate=False)`, the same fit windows calibration measures), compares them unit by unit (rank
correlation, how far each unit's distortion moves between the texts), and scores the calibrated winner, the fixed
split it is compared with and each table's own optimum on both tables, next to the real held-out KL of the winner
against that split on both texts (from the in-domain and cross-domain quality runs, which must hold the same
allocation).

    python benchmarks/table_transfer.py \\
        --run smollm2 benchmarks/results/ratequant_quality_shared-prefix.json \\
              benchmarks/results/ratequant_quality_grid_pydoc-to-bbc.json \\
        --run gemma3-270m benchmarks/results/ratequant_quality_gemma3-270m.json \\
              benchmarks/results/ratequant_quality_gemma3-270m_pydoc-to-bbc.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import torch
from _common import CALIBRATION, LAYOUT, RESULTS_DIR, bits_table, load_benchmark_model, write_report

from hf_ratequant.allocation import allocate_from_table, fixed_candidates
from hf_ratequant.calibration import calibrate

logger = logging.getLogger("benchmarks.table_transfer")
HERE = os.path.dirname(os.path.abspath(__file__))


# ---- pure arithmetic on two tables -------------------------------------------------------------------------------
def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two 1-D tensors (no ties expected: measured distortions)."""
    ra, rb = (x.argsort().argsort().double() for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def entries(table: torch.Tensor, bits: torch.Tensor, bit_grid: list[int]) -> torch.Tensor:
    """Per unit `table[u, bits[u] - bit_grid[0]]`: each unit's predicted distortion in an allocation."""
    return table.gather(1, (bits - bit_grid[0]).long()[:, None]).squeeze(1)


def total(table: torch.Tensor, bits: torch.Tensor, bit_grid: list[int]) -> float:
    """Sum over units of `table[u, bits[u] - bit_grid[0]]`: the measure's prediction for an allocation."""
    return float(entries(table, bits, bit_grid).sum())


def split_bits(name: str, n_layers: int, n_heads: int, budget: float, b_min: int | None = None,
               b_max: int | None = None) -> torch.Tensor:
    """The unit bits `(layers * heads * 2,)`, keys then values per (layer, head), of the fixed split `name` of
    `budget` bits, as calibration names and builds them (`fixed_candidates`: "K3V2", "uniform-3")."""
    b_min = CALIBRATION.b_min if b_min is None else b_min
    b_max = CALIBRATION.b_max if b_max is None else b_max
    for candidate in fixed_candidates(n_layers, n_heads, budget, b_min, b_max):
        if candidate.name == name:
            return candidate.bits.reshape(-1)
    raise ValueError(f"{name!r} is not a fixed split of {budget:g} bits in [{b_min}, {b_max}].")


def unit_bits(key_bits: list[list[int]], value_bits: list[list[int]]) -> torch.Tensor:
    """A config's `key_bits` / `value_bits` (layers x heads) as unit bits in the tables' order."""
    return bits_table(key_bits, value_bits).reshape(-1)


def compare(tables: dict[str, torch.Tensor], bit_grid: list[int], budget: float, winner: torch.Tensor,
            fixed: torch.Tensor) -> dict:
    """The two texts' tables `(units, n_bits)` compared: rank correlation of the units' distortion at the fixed
    split's bits, the spread of the per-unit ratio between the texts, and each allocation's predicted distortion
    relative to the fixed split on each table (the winner, and each table's own optimum)."""
    (a_name, a), (b_name, b) = tables.items()
    at_fixed = torch.stack([t.gather(1, (fixed - bit_grid[0])[:, None]).squeeze(1) for t in (a, b)])
    ratio = (at_fixed[1] / at_fixed[0]).log()
    optima = {name: allocate_from_table(t, torch.tensor(bit_grid), budget) for name, t in tables.items()}
    allocations = {"winner": winner, **{f"{name} optimum": bits for name, bits in optima.items()}}
    predicted = {name: {alloc: total(t, bits, bit_grid) / total(t, fixed, bit_grid) - 1
                        for alloc, bits in allocations.items()} for name, t in tables.items()}
    return dict(rank_correlation=rank_correlation(at_fixed[0], at_fixed[1]),
                ratio_median=float(ratio.quantile(0.5).exp()), ratio_spread=float(ratio.std().exp()),
                ratio_range=[float(ratio.min().exp()), float(ratio.max().exp())],
                predicted_vs_fixed=predicted,
                optima={name: bits.tolist() for name, bits in optima.items()}, texts=[a_name, b_name])


# ---- the quality runs the cell comes from ------------------------------------------------------------------------
def cell(path: str, quantizer: str, budget: float) -> tuple[dict, dict]:
    """A quality run and its block of the cell (`summary`, `config` when calibrated, `rows`)."""
    with open(path, encoding="utf-8") as f:
        run = json.load(f)
    for block in run.get("blocks", []):
        if block["summary"]["quantizer"] == quantizer and block["summary"]["budget"] == budget:
            return run, block
    raise SystemExit(f"{path}: no {quantizer} {budget:g} cell; pass a ratequant_quality run that holds it.")


def model_of(run: dict) -> str:
    """The `--model` of a quality run; runs from before that option are of the embedded default."""
    return run["settings"].get("model") or "smollm2"


def text_of(run: dict, key: str) -> str:
    """The text spec (`--calib-data` / `--eval-data`) a run used; files from before these options record none, and
    ran on the offline default, Python's docs text (their recorded source says so)."""
    spec = run["settings"].get(key)
    source = run.get({"calib_data": "calib_source", "eval_data": "eval_source"}[key], "")
    if spec is None and source.startswith("pydoc_data"):
        return "pydoc"
    if spec is None:
        raise SystemExit(f"a run records no {key} and its text is {source!r}: not one this script can measure on.")
    return spec


RUN_SETTINGS = {"samples": "n_samples", "seq_len": "seq_len", "b_min": "b_min", "b_max": "b_max",
                "group_size": "group_size", "residual_length": "residual_length", "sink_length": "sink_length",
                "batch_size": "batch_size", "measure": "measure"}
"""The quality run's settings (its options) the tables are measured with, as `calibrate`'s keywords."""


def calibration_settings(given: dict) -> dict:
    """A quality run's `settings` as `calibrate`'s keywords (`RUN_SETTINGS`; a setting an older file lacks is None:
    calibrate's default)."""
    settings = {name: given.get(key) for key, name in RUN_SETTINGS.items()}
    settings["residual_aware"] = None if given.get("plain_measure") is None else not given["plain_measure"]
    return settings


def real_cell(in_domain: str, cross: str, quantizer: str, budget: float) -> dict:
    """The winner and its lowest-KL fixed split from the in-domain run, their real held-out KL on both texts, and
    the run's calibration settings; a `SystemExit` unless both runs evaluated the same allocation calibrated on the
    same text."""
    (run_a, block_a), (run_b, block_b) = cell(in_domain, quantizer, budget), cell(cross, quantizer, budget)
    sa, config, sb, config_b = block_a["summary"], block_a.get("config"), block_b["summary"], block_b.get("config")
    if config is None or config_b is None or (config["key_bits"], config["value_bits"]) != (
            config_b["key_bits"], config_b["value_bits"]):
        raise SystemExit(f"{in_domain} and {cross} do not hold the same {quantizer} {budget:g} allocation: the "
                         "cross-domain run must evaluate the in-domain run's configs (--configs-from).")
    calib = text_of(run_a, "calib_data")
    if calib != text_of(run_b, "calib_data") or calib != text_of(run_a, "eval_data") or not sa.get("best_fixed_by_kl"):
        raise SystemExit(f"{in_domain}, {cross}: not calibrated on one text and evaluated in-domain by the first, or "
                         "no fixed split to compare with.")
    kl = {calib: sa["chosen_kl"] / sa["best_fixed_kl_min"] - 1,
          text_of(run_b, "eval_data"): sb["chosen_kl"] / sb["best_fixed_kl_min"] - 1}
    if len(kl) != 2:
        raise SystemExit(f"{cross}: evaluated on the calibration text; pass the run on the other text.")
    given = run_a["settings"]
    return dict(model=model_of(run_a), winner=sa["winner"], fixed=sa["best_fixed_by_kl"],
                fixed_cross=sb["best_fixed_by_kl"],
                calib_data=calib, texts=list(kl), real_kl_vs_fixed=kl, settings=calibration_settings(given),
                key_bits=config["key_bits"], value_bits=config["value_bits"],
                files=[os.path.relpath(p, os.path.join(HERE, "..")) for p in (in_domain, cross)])


def markdown(payload: dict) -> str:
    a, b = payload["texts"]
    out = [f"# Does the measure carry across texts? ({payload['quantizer']} at {payload['budget']:g} code bits)", "",
           f"Each model's distortion table measured on the calibration half of {a} and of {b} (the fit windows "
           "calibration measures, library defaults); the winner calibrated on the first text and its lowest-KL "
           "fixed split scored by each table (predicted) and through the real cache on each held-out half "
           "(real KL, from the quality runs; pydoc: Python's docs text, bbc: BBC News). Rank correlation: Spearman "
           "over units of the distortion at the fixed split's bits; ratio: per unit, the second table's distortion "
           "over the first's (median, geometric spread, range).", "",
           f"| model | winner vs fixed | rank corr. | ratio {b}/{a}: median, spread (range) | predicted on {a} | "
           f"real on {a} | predicted on {b} | real on {b} | {a} optimum predicted on {b} | {b} optimum on {b} |",
           "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in payload["rows"]:
        c, real = r["compare"], r["real"]["real_kl_vs_fixed"]
        p = c["predicted_vs_fixed"]
        winner = r["real"]["winner"].removeprefix("ratequant-")
        out.append(
            f"| {r['model'].split(' (')[0]} | {winner} vs {r['real']['fixed']} | "
            f"{c['rank_correlation']:.2f} | {c['ratio_median']:.2f}, x{c['ratio_spread']:.2f} "
            f"({c['ratio_range'][0]:.2f}-{c['ratio_range'][1]:.2f}) | {p[a]['winner']:+.0%} | {real[a]:+.0%} | "
            f"{p[b]['winner']:+.0%} | {real[b]:+.0%} | {p[b][f'{a} optimum']:+.0%} | {p[b][f'{b} optimum']:+.0%} |")
    out += ["", "Wall time of the two measures (a record, not a speed figure): "
            + "; ".join(f"{r['model'].split(' (')[0]} {r['seconds']:.0f} s" for r in payload["rows"]) + "."]
    return "\n".join(out) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--run", nargs=3, action="append", required=True, metavar=("MODEL", "IN_DOMAIN", "CROSS"),
                   help="a model (as --model of ratequant_quality) and its in-domain and cross-domain quality runs "
                   "of the cell (the cross run evaluated the in-domain run's configs)")
    p.add_argument("--quantizer", default=LAYOUT.quantizer, help=f"default {LAYOUT.quantizer}")
    p.add_argument("--budget", type=float, default=CALIBRATION.budget,
                   help=f"average code bits (default {CALIBRATION.budget:g})")
    p.add_argument("--tag", default="", help="suffix of the output names: table_transfer_<tag>")
    p.add_argument("--output-dir", default=RESULTS_DIR)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cells = [(model, real_cell(a, b, args.quantizer, args.budget)) for model, a, b in args.run]  # before any model
    for model, real in cells:
        if real["model"] != model:
            raise SystemExit(f"--run {model}: its quality runs are of --model {real['model']}.")
    texts = cells[0][1]["texts"]
    if any(c["texts"] != texts for _, c in cells):
        raise SystemExit(f"every --run must evaluate on the same two texts, {texts}.")
    rows = []
    for model_name, real in cells:
        model, tok, label = load_benchmark_model(model_name, torch.float32, torch.device("cpu"))
        start, tables, bit_grid = time.perf_counter(), {}, None
        for text in texts:
            config = calibrate(model, tok, text, args.quantizer, args.budget, validate=False, progress=False,
                               **real["settings"])
            bit_grid = config.curves["bit_grid"].tolist()
            tables[text] = config.curves["distortion"].double().reshape(-1, len(bit_grid))
            logger.info("%s: table measured on %s", label, config.calibration["source"])
        seconds = time.perf_counter() - start
        n_layers, n_heads = len(real["key_bits"]), len(real["key_bits"][0])
        winner = unit_bits(real["key_bits"], real["value_bits"])
        fixed = split_bits(real["fixed"], n_layers, n_heads, args.budget, real["settings"]["b_min"],
                           real["settings"]["b_max"])
        rows.append(dict(model=label, real=real, seconds=seconds,
                         compare=compare(tables, bit_grid, args.budget, winner, fixed)))
        del model
    payload = dict(quantizer=args.quantizer, budget=args.budget, texts=texts, rows=rows)
    write_report("table_transfer", args.tag, payload, markdown(payload), args.output_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
