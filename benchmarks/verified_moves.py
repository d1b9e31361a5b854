"""Verified moves: a calibrated allocation's moves re-chosen by their real effect, measured on calibration text only.

`allocation_path` found that on Gemma 3 calibration's measure misjudges single units (taking a bit from layer 2's
keys: +1% predicted, +15-25% real), while the units' real one-unit changes nearly add up. This script tries the rule
that finding suggests, on a calibrated cell of a quality run: every move of the winner away from its lowest-KL fixed
split (one unit, from the split's bits to the winner's) is scored alone through the real cache on the calibration
text's *validation* windows (held back from the fit, as calibration's own validation; never the evaluation text),
or with `--score-on fit` on its fit windows (those the measure saw, leaving the validation windows to judge);
then the moves are re-chosen to minimise the sum of those real changes at no more bits than the split (exactly:
`operating_points.allocate_rate`, each move a unit with two options). The re-chosen allocation is evaluated on the
held-out text of the quality run, and of a cross-domain run of the same configs if given, against the split and the
winner as those runs measured them (the same windows and evaluation).

    python benchmarks/verified_moves.py --run gemma3-270m benchmarks/results/ratequant_quality_gemma3-270m.json \\
        --cross benchmarks/results/ratequant_quality_gemma3-270m_pydoc-to-bbc.json
"""

from __future__ import annotations

import argparse
import logging
import math
import time

import torch
from _common import CALIBRATION, LAYOUT, RESULTS_DIR, load_benchmark_model, machine, write_report
from allocation_path import unit_name
from table_transfer import cell, model_of, split_bits, text_of, unit_bits

from hf_ratequant.operating_points import allocate_rate

logger = logging.getLogger("benchmarks.verified_moves")


CHECK_TOLERANCE = 0.01
"""How far the split's KL on the first held-out window may be from the quality run's own figure there (relative): the
library's numerics move a little between versions (up to 0.4% seen), the effects studied are tens of percent."""


# ---- pure arithmetic -------------------------------------------------------------------------------------------
def rechoose(fixed: torch.Tensor, winner: torch.Tensor, change: dict[int, float]) -> torch.Tensor:
    """The split with the subset of the winner's moves (units where they differ, each with its measured `change`)
    whose changes sum least among those using no more bits than the split; of equal sums, the fewest bits."""
    moves = (fixed != winner).nonzero().flatten().tolist()
    if sorted(moves) != sorted(change):
        raise ValueError(f"a measured change for each move is needed: moves {moves}, changes for {sorted(change)}.")
    out = fixed.clone()
    if not moves:
        return out
    low = torch.minimum(fixed[moves], winner[moves])
    rates = torch.stack([fixed[moves] - low, winner[moves] - low], dim=1)
    shift = [min(0.0, change[u]) for u in moves]  # non-negative distortions: the same optimum
    distortion = torch.tensor([[0.0 - s, change[u] - s] for u, s in zip(moves, shift)], dtype=torch.float64)
    choice = allocate_rate(rates, distortion, int(rates[:, 0].sum()))
    for u, c in zip(moves, choice.tolist()):
        if c:
            out[u] = winner[u]
    return out


SCORED_ON = ("validation", "fit")


def scored_on(payload: dict) -> str:
    """Which calibration windows a run scored the moves on (runs before `--score-on`: the validation windows)."""
    return payload.get("scored_on", SCORED_ON[0])


def against(row: dict, fixed: dict, full_ppl: float) -> dict:
    """`row`'s KL change against the split's and the share of the split's perplexity gap to full precision it
    recovers."""
    gap = math.log(fixed["perplexity"]) - math.log(full_ppl)
    return dict(perplexity=row["perplexity"], kl=row["kl"], kl_vs_fixed=row["kl"] / fixed["kl"] - 1,
                gap_recovered=(math.log(fixed["perplexity"]) - math.log(row["perplexity"])) / gap if gap > 0 else None)


def markdown(payload: dict) -> str:
    r = payload
    out = [f"# Verified moves ({r['model']}, {r['quantizer']} at {r['budget']:g} code bits)", "",
           f"`{r['command']}`", "",
           f"The winner {r['winner']}'s {len(r['moves'])} moves away from {r['fixed']}, each scored alone through the "
           f"real cache on {r['validation_windows']} {scored_on(r)} windows of the calibration text "
           f"({r['singles_s']:.0f} s); the moves re-chosen to minimise the sum of those changes at no more bits than "
           "the split.", "",
           f"| unit | bits (split -> winner) | real change alone, {scored_on(r)} windows | kept |",
           "| --- | --- | ---: | --- |"]
    for m in sorted(r["moves"], key=lambda m: m["change"]):
        out.append(f"| {unit_name(m['unit'], r['heads'])} | {m['bits'][0]} -> {m['bits'][1]} | {m['change']:+.1%} | "
                   f"{'yes' if m['kept'] else 'no'} |")
    checks = "; ".join(f"{t['eval_data']} {t['fixed_first_window_kl']:.5f} against {t['fixed_window_kl_run']:.5f}"
                       for t in r["texts"])
    out += ["", "Held-out evaluation (the split's and the winner's figures are the quality runs'; the split's KL on "
            f"the first window re-evaluated here against the run's: {checks}):", "",
            "| text | full precision ppl | split ppl / KL | winner ppl / KL (KL vs split, gap) | verified ppl / KL "
            "(KL vs split, gap) |", "| --- | ---: | ---: | ---: | ---: |"]
    for t in r["texts"]:
        w, v = t["winner"], t["verified"]
        gap = lambda x: "n/a" if x["gap_recovered"] is None else f"{x['gap_recovered']:.0%}"  # noqa: E731
        f_ = t["fixed"]
        out.append(f"| {t['eval_data']} | {t['full_ppl']:.3f} | {f_['perplexity']:.3f} / {f_['kl']:.4f}"
                   f" | {w['perplexity']:.3f} / {w['kl']:.4f} ({w['kl_vs_fixed']:+.0%}, {gap(w)}) | "
                   f"{v['perplexity']:.3f} / {v['kl']:.4f} ({v['kl_vs_fixed']:+.0%}, {gap(v)}) |")
    return "\n".join(out) + "\n"


# ---- the run ---------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--run", nargs=2, required=True, metavar=("MODEL", "RUN"),
                   help="a model (as --model of ratequant_quality) and a quality run of it that calibrated the cell")
    p.add_argument("--cross", default=None, metavar="RUN",
                   help="a run that evaluated the same configs on another text (--configs-from, or calibrated alike)")
    p.add_argument("--quantizer", default=LAYOUT.quantizer, help=f"default {LAYOUT.quantizer}")
    p.add_argument("--budget", type=float, default=CALIBRATION.budget,
                   help=f"average code bits (default {CALIBRATION.budget:g})")
    p.add_argument("--validation-windows", type=int, default=4,
                   help="calibration windows the moves are scored on (default 4)")
    p.add_argument("--score-on", choices=SCORED_ON, default=SCORED_ON[0],
                   help="which of calibration's windows the moves are scored on: the first of its validation windows "
                   "(held back from the measure) or of its fit windows (those the measure saw; what calibrate could "
                   "use without touching the windows its race is judged on)")
    p.add_argument("--tag", default="", help="suffix of the output names: verified_moves_<tag>")
    p.add_argument("--output-dir", default=RESULTS_DIR)
    return p


def held_out(path: str, quantizer: str, budget: float, key_bits=None, value_bits=None,
             fixed_name: str | None = None) -> dict:
    """A quality run's held-out figures of the cell: its text, windows, full precision, its calibrated allocation and
    the rows of the winner and of the split `fixed_name` (default: the run's lowest-KL split); a `SystemExit` unless
    it holds a calibrated allocation (the allocation `key_bits` / `value_bits` when given) and that split."""
    run, block = cell(path, quantizer, budget)
    summary, config = block["summary"], block.get("config")
    if config is None:
        raise SystemExit(f"{path}: no calibrated {quantizer} {budget:g} config.")
    if key_bits is not None and (config["key_bits"], config["value_bits"]) != (key_bits, value_bits):
        raise SystemExit(f"{path}: it does not hold the same {quantizer} {budget:g} allocation as --run.")
    fixed_name = fixed_name or summary.get("best_fixed_by_kl")
    rows = {r["cache"]: r for r in block["rows"]}
    if fixed_name not in rows:
        raise SystemExit(f"{path}: no fixed split {fixed_name or ''} of {budget:g} bits to compare with.")
    given = run["settings"]
    return dict(eval_data=text_of(run, "eval_data"), calib_data=text_of(run, "calib_data"), settings=given,
                windows=run["eval_windows"], full_ppl=run["full"]["perplexity"],
                fixed_name=fixed_name, fixed=rows[fixed_name], winner=rows[f"chosen ({summary['winner']})"],
                winner_name=summary["winner"], model=model_of(run), key_bits=config["key_bits"],
                value_bits=config["value_bits"])


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    model_name, path = args.run
    first = held_out(path, args.quantizer, args.budget)
    texts = [first] + ([held_out(args.cross, args.quantizer, args.budget, first["key_bits"], first["value_bits"],
                                 first["fixed_name"])] if args.cross else [])  # against the split the moves leave
    if any(t["model"] != model_name for t in texts) or any(t["calib_data"] != first["calib_data"] for t in texts):
        raise SystemExit(f"--run {model_name}: every run must be of --model {model_name} and calibrated on one text.")
    if first["calib_data"] != first["eval_data"]:
        raise SystemExit(f"{path}: not evaluated on its calibration text; pass the in-domain run as --run.")

    from ratequant_quality import evaluate

    from hf_ratequant import RateQuantConfig
    from hf_ratequant.calibration import calibration_windows
    from hf_ratequant.config import ModelFingerprint
    from hf_ratequant.evaluation import evaluation_windows, reference_logprobs
    from hf_ratequant.settings import layout_with

    s = first["settings"]
    layout = layout_with(None, quantizer=args.quantizer, group_size=s.get("group_size"),
                         residual_length=s.get("residual_length"), sink_length=s.get("sink_length"))
    b_min, b_max = s.get("b_min", CALIBRATION.b_min), s.get("b_max", CALIBRATION.b_max)
    chunk = s.get("chunk", 64)
    model, tok, label = load_benchmark_model(model_name, torch.float32, torch.device("cpu"))
    fp = ModelFingerprint.from_model_config(model.config)
    n_layers, n_heads = fp.num_layers, fp.num_kv_heads

    def make(bits: torch.Tensor, name: str) -> RateQuantConfig:
        return RateQuantConfig.from_bits(bits.reshape(n_layers, n_heads, 2), layout, fingerprint=fp, method=name,
                                         budget=args.budget, b_min=b_min, b_max=b_max)

    winner = unit_bits(first["key_bits"], first["value_bits"])
    fixed = split_bits(first["fixed_name"], n_layers, n_heads, args.budget, b_min, b_max)
    n_fit = s.get("samples", CALIBRATION.n_samples)
    windows, _, _ = calibration_windows(tok, first["calib_data"], seq_len=s.get("seq_len", CALIBRATION.seq_len),
                                        n_windows=n_fit + args.validation_windows)
    k = args.validation_windows
    scored = windows[n_fit:] if args.score_on == "validation" else windows[:k]
    held = []  # each text's windows and reference, checked first: the split's KL on its first window as the run's
    for t in texts:
        ew = evaluation_windows(tok, t["eval_data"], window=t["settings"].get("window", 1024),
                                max_windows=t["windows"])
        refs = reference_logprobs(model, ew, batch_size=1)
        kl = evaluate(model, ew[:1], refs[:1], 1, make(fixed, "fixed"), t["settings"].get("chunk", 64))["kl"]
        if not math.isclose(kl, t["fixed"]["window_kl"][0], rel_tol=CHECK_TOLERANCE):
            raise SystemExit(f"{t['eval_data']}: the split's KL on the first held-out window is {kl:.6f} here and "
                             f"{t['fixed']['window_kl'][0]:.6f} in the quality run: not the same evaluation.")
        held.append((ew, refs, kl))
    start = time.perf_counter()
    refs = reference_logprobs(model, scored, batch_size=1)
    base = evaluate(model, scored, refs, 1, make(fixed, "fixed"), chunk)["kl"]
    change = {}
    for u in (fixed != winner).nonzero().flatten().tolist():
        moved = fixed.clone()
        moved[u] = winner[u]
        change[u] = evaluate(model, scored, refs, 1, make(moved, f"+{u}"), chunk)["kl"] / base - 1
        logger.info("%s %s %d -> %d: %+.1f%%", label, unit_name(u, n_heads), fixed[u], winner[u], 100 * change[u])
    singles_s = time.perf_counter() - start
    verified = rechoose(fixed, winner, change)

    rows = []
    for t, (ew, refs, check) in zip(texts, held):
        result = evaluate(model, ew, refs, 1, make(verified, "verified"), t["settings"].get("chunk", 64))
        logger.info("%s verified on %s: ppl %.3f KL %.5f", label, t["eval_data"], result["perplexity"], result["kl"])
        rows.append(dict(eval_data=t["eval_data"], full_ppl=t["full_ppl"], fixed_first_window_kl=check,
                         fixed_window_kl_run=t["fixed"]["window_kl"][0],
                         fixed=dict(perplexity=t["fixed"]["perplexity"], kl=t["fixed"]["kl"]),
                         winner=against(t["winner"], t["fixed"], t["full_ppl"]),
                         verified=against(result, t["fixed"], t["full_ppl"])))
    command = f"python benchmarks/verified_moves.py --run {model_name} {path}" + (
        f" --cross {args.cross}" if args.cross else "")
    if args.quantizer != LAYOUT.quantizer or args.budget != CALIBRATION.budget:
        command += f" --quantizer {args.quantizer} --budget {args.budget:g}"
    if args.validation_windows != build_parser().get_default("validation_windows"):
        command += f" --validation-windows {args.validation_windows}"
    if args.score_on != SCORED_ON[0]:
        command += f" --score-on {args.score_on}"
    payload = dict(model=label, machine=machine(), command=command, quantizer=args.quantizer, budget=args.budget,
                   heads=n_heads,
                   fixed=first["fixed_name"], winner=first["winner_name"].removeprefix("ratequant-"),
                   validation_windows=args.validation_windows, scored_on=args.score_on, singles_s=singles_s,
                   validation_kl_fixed=base,
                   moves=[dict(unit=u, bits=[int(fixed[u]), int(winner[u])], change=c, kept=bool(verified[u] ==
                                                                                               winner[u]))
                          for u, c in change.items()],
                   verified_key_bits=verified.reshape(n_layers, n_heads, 2)[..., 0].tolist(),
                   verified_value_bits=verified.reshape(n_layers, n_heads, 2)[..., 1].tolist(), texts=rows)
    write_report("verified_moves", args.tag, payload, markdown(payload), args.output_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
