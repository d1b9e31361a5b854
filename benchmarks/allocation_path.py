"""Does the measure add up? From a fixed split to a calibrated allocation one unit at a time, through the real cache.

Calibration predicts an allocation's distortion as the sum of its units' entries in the distortion table. Where that
prediction promises more than the cache delivers (`table_transfer`: on Gemma 3 by 23-34 points), either the measure
misjudges single units, or single units are judged well and their effects do not add up (moves interact across
layers). This script tells the two apart for one calibrated cell. For every unit where the winner and its lowest-KL
fixed split differ, the real KL through the cache (the quality run's evaluation: held-out windows, chunked decoding,
the shared reference) of

- the fixed split with that unit alone moved to the winner's bits, and
- the winner with that unit alone moved back to the split's bits,

next to the table's prediction for the same move (the table measured as calibration measures it, with the run's
settings). If the one-unit moves add up to the winner's real change, the units do not interact and the measure
misjudges units; if they add up to the prediction and the winner falls short, the units interact. The fixed split's
and the winner's KL on the first windows are checked against the quality run's own figures for those windows.

    python benchmarks/allocation_path.py --run gemma3-270m benchmarks/results/ratequant_quality_gemma3-270m.json
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import torch
from _common import CALIBRATION, LAYOUT, RESULTS_DIR, load_benchmark_model, write_report
from table_transfer import (
    calibration_settings,
    cell,
    entries,
    model_of,
    rank_correlation,
    split_bits,
    text_of,
    unit_bits,
)

logger = logging.getLogger("benchmarks.allocation_path")
HERE = os.path.dirname(os.path.abspath(__file__))


# ---- pure arithmetic -------------------------------------------------------------------------------------------
def unit_name(u: int, n_heads: int) -> str:
    """Unit `u` of the tables' order (keys then values per layer and head) as `L5 K` (`L5h1 V` with several heads)."""
    layer, head, kind = u // (2 * n_heads), (u // 2) % n_heads, "KV"[u % 2]
    return f"L{layer}{f'h{head}' if n_heads > 1 else ''} {kind}"


def path_allocations(fixed: torch.Tensor, winner: torch.Tensor) -> dict[str, torch.Tensor]:
    """The allocations to score: `fixed`, `winner`, and for each unit `u` where they differ `+u` (the split with `u`
    at the winner's bits) and `-u` (the winner with `u` back at the split's bits)."""
    out = {"fixed": fixed.clone(), "winner": winner.clone()}
    for u in (fixed != winner).nonzero().flatten().tolist():
        out[f"+{u}"] = fixed.clone()
        out[f"+{u}"][u] = winner[u]
        out[f"-{u}"] = winner.clone()
        out[f"-{u}"][u] = fixed[u]
    return out


def decompose(table: torch.Tensor, bit_grid: list[int], fixed: torch.Tensor, winner: torch.Tensor,
              kl: dict[str, float]) -> dict:
    """Predicted and real changes, each relative to the fixed split (the table's total for it; its real KL).

    Per differing unit: `predicted` (its table entry at the winner's bits minus at the split's), `from_fixed` (the
    real change of moving it alone from the split) and `at_winner` (the real change it makes at the winner: the winner
    minus the winner with it moved back). Totals: `predicted` (the winner's predicted change, the sum of the units'),
    `real` (the winner's real change), and the sums of the two kinds of one-unit real changes."""
    d_fixed, d_winner = entries(table, fixed, bit_grid), entries(table, winner, bit_grid)
    base_pred, base_kl = float(d_fixed.sum()), kl["fixed"]
    units = []
    for u in (fixed != winner).nonzero().flatten().tolist():
        units.append(dict(unit=u, bits=[int(fixed[u]), int(winner[u])],
                          predicted=float(d_winner[u] - d_fixed[u]) / base_pred,
                          from_fixed=(kl[f"+{u}"] - base_kl) / base_kl,
                          at_winner=(kl["winner"] - kl[f"-{u}"]) / base_kl))
    totals = dict(predicted=float(d_winner.sum()) / base_pred - 1, real=kl["winner"] / base_kl - 1,
                  sum_from_fixed=sum(x["from_fixed"] for x in units),
                  sum_at_winner=sum(x["at_winner"] for x in units))
    rho = None
    if len(units) > 2:
        rho = {key: rank_correlation(torch.tensor([x["predicted"] for x in units]),
                                     torch.tensor([x[key] for x in units])) for key in ("from_fixed", "at_winner")}
    return dict(units=units, totals=totals, rank_correlation=rho)


def run_figures(block: dict, names: dict[str, str], windows: int) -> dict[str, float]:
    """The quality run's own KL of `names` (`{"fixed": "K3V2", "winner": "chosen (...)"}`: row caches) over its
    first `windows` windows (token-weighted, as `evaluate` weighs them), to check this run's evaluation against."""
    rows = {r["cache"]: r for r in block["rows"]}
    out = {}
    for key, cache in names.items():
        r = rows[cache]
        kls, toks = r["window_kl"][:windows], r["window_tokens"][:windows]
        out[key] = sum(k * t for k, t in zip(kls, toks)) / sum(toks)
    return out


def markdown(payload: dict) -> str:
    out = [f"# Does the measure add up? ({payload['quantizer']} at {payload['budget']:g} code bits)", "",
           "For each unit where the winner and its lowest-KL fixed split differ: the table's predicted change of "
           "moving it to the winner's bits, and the real KL change through the cache of moving it alone from the "
           "split, and of moving it alone back at the winner; all relative to the split (its predicted distortion; "
           "its real KL). Real KL on the first held-out windows of the quality run's evaluation text.", ""]
    for r in payload["rows"]:
        t, rho = r["decomposition"]["totals"], r["decomposition"]["rank_correlation"]
        out += [f"## {r['model']}: {r['winner']} against {r['fixed']}, evaluated on {r['eval_source']}", "",
                f"`{r['command']}`; {r['windows']} held-out windows; KL of the split "
                f"{r['kl']['fixed']:.5f}, of the winner {r['kl']['winner']:.5f} (the quality run on the same windows: "
                f"{r['run_kl']['fixed']:.5f}, {r['run_kl']['winner']:.5f}).", "",
                f"- The winner against the split: predicted {t['predicted']:+.1%}, real {t['real']:+.1%}.",
                f"- Sum of the one-unit moves from the split: {t['sum_from_fixed']:+.1%}; of the one-unit moves back "
                f"at the winner: {t['sum_at_winner']:+.1%}.",
                "- Rank correlation of predicted and real one-unit changes: "
                + ("n/a (two units or fewer)" if rho is None else
                   f"from the split {rho['from_fixed']:.2f}, at the winner {rho['at_winner']:.2f}") + ".", "",
                "| unit | bits (split -> winner) | predicted | real, alone from the split | real, alone at the winner "
                "|",
                "| --- | --- | ---: | ---: | ---: |"]
        for x in sorted(r["decomposition"]["units"], key=lambda x: x["predicted"]):
            out.append(f"| {unit_name(x['unit'], r['heads'])} | {x['bits'][0]} -> {x['bits'][1]} | "
                       f"{x['predicted']:+.1%} | {x['from_fixed']:+.1%} | {x['at_winner']:+.1%} |")
        out.append("")
    return "\n".join(out)


# ---- the run ---------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--run", nargs=2, action="append", required=True, metavar=("MODEL", "RUN"),
                   help="a model (as --model of ratequant_quality) and a quality run of it that holds the cell")
    p.add_argument("--quantizer", default=LAYOUT.quantizer, help=f"default {LAYOUT.quantizer}")
    p.add_argument("--budget", type=float, default=CALIBRATION.budget,
                   help=f"average code bits (default {CALIBRATION.budget:g})")
    p.add_argument("--score-windows", type=int, default=4,
                   help="how many of the quality run's evaluation windows (the first) the allocations are scored on\n"
                   "(default 4)")
    p.add_argument("--tag", default="", help="suffix of the output names: allocation_path_<tag>")
    p.add_argument("--output-dir", default=RESULTS_DIR)
    return p


def load_cell(model: str, path: str, quantizer: str, budget: float, windows: int) -> dict:
    """What a `--run` needs from its quality run, before any model work; a `SystemExit` unless the run is of `model`,
    holds the cell with a fixed split to compare with, and evaluated at least `windows` windows one by one."""
    run, block = cell(path, quantizer, budget)
    summary, config, given = block["summary"], block.get("config"), run["settings"]
    if model_of(run) != model:
        raise SystemExit(f"--run {model} {path}: that run is of --model {model_of(run)}.")
    if config is None or not summary.get("best_fixed_by_kl"):
        raise SystemExit(f"{path}: no calibrated {quantizer} {budget:g} config with a fixed split beside it.")
    names = {"fixed": summary["best_fixed_by_kl"], "winner": f"chosen ({summary['winner']})"}
    rows = {r["cache"]: r for r in block["rows"]}
    if any(c not in rows or len(rows[c]["window_kl"]) < windows for c in names.values()) or \
            given.get("eval_batch_size", 1) != 1:
        raise SystemExit(f"{path}: its rows do not hold {windows} per-window KLs of {', '.join(names.values())}.")
    return dict(settings=calibration_settings(given), calib_data=text_of(run, "calib_data"),
                eval_data=text_of(run, "eval_data"), window=given.get("window", 1024), chunk=given.get("chunk", 64),
                fixed=summary["best_fixed_by_kl"], winner=summary["winner"], key_bits=config["key_bits"],
                value_bits=config["value_bits"], run_kl=run_figures(block, names, windows),
                file=os.path.relpath(path, os.path.join(HERE, "..")))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from ratequant_quality import bits_config, evaluate

    from hf_ratequant.calibration import calibrate
    from hf_ratequant.evaluation import evaluation_windows, reference_logprobs

    n = args.score_windows
    cells = [(model, load_cell(model, path, args.quantizer, args.budget, n)) for model, path in args.run]
    rows = []
    for model_name, c in cells:
        model, tok, label = load_benchmark_model(model_name, torch.float32, torch.device("cpu"))
        start = time.perf_counter()
        template = calibrate(model, tok, c["calib_data"], args.quantizer, args.budget, validate=False,
                             progress=False, **c["settings"])
        bit_grid = template.curves["bit_grid"].tolist()
        table = template.curves["distortion"].double().reshape(-1, len(bit_grid))
        n_layers, n_heads = len(c["key_bits"]), len(c["key_bits"][0])
        winner = unit_bits(c["key_bits"], c["value_bits"])
        fixed = split_bits(c["fixed"], n_layers, n_heads, args.budget, c["settings"]["b_min"], c["settings"]["b_max"])
        windows = evaluation_windows(tok, c["eval_data"], window=c["window"], max_windows=args.score_windows)
        refs = reference_logprobs(model, windows, batch_size=1)
        kl = {}
        for name, bits in path_allocations(fixed, winner).items():
            cfg = bits_config(bits.reshape(n_layers, n_heads, 2), template, name)
            kl[name] = evaluate(model, windows, refs, 1, cfg, c["chunk"])["kl"]
            logger.info("%s %s: KL %.5f", label, name, kl[name])
        command = f"python benchmarks/allocation_path.py --run {model_name} {c['file']}"
        if args.quantizer != LAYOUT.quantizer or args.budget != CALIBRATION.budget:
            command += f" --quantizer {args.quantizer} --budget {args.budget:g}"
        if args.score_windows != build_parser().get_default("score_windows"):
            command += f" --score-windows {args.score_windows}"
        rows.append(dict(model=label, command=command, heads=n_heads, fixed=c["fixed"],
                         winner=c["winner"].removeprefix("ratequant-"), windows=args.score_windows,
                         eval_source=c["eval_data"], kl=kl, run_kl=c["run_kl"], seconds=time.perf_counter() - start,
                         decomposition=decompose(table, bit_grid, fixed, winner, kl)))
        del model
    payload = dict(quantizer=args.quantizer, budget=args.budget, rows=rows)
    write_report("allocation_path", args.tag, payload, markdown(payload), args.output_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
