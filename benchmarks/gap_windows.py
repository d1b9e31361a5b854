"""The perplexity gap a calibrated cache recovers, measured again on more held-out windows.

A quality run (`ratequant_quality.py`) scores every cache of a cell on 8 windows of 1024 tokens. Where the gap
between the best fixed configuration and full precision is small, the share of it that RateQuant recovers carries a
standard error of tens of points (SmolLM2, token at 3 true bits with 8-bit scales: 28% of a gap of 0.0125 in
log-perplexity, with a paired standard error of 0.0031). This script evaluates the caches that decide a cell again,
on `--eval-windows` windows of the same held-out text (all of it by default): full precision, the calibrated config the
run chose, and the fixed configurations that were best there by perplexity and by KL, rebuilt as the run built them.
The first windows are the run's own: full precision's figures there must equal the run's, window by window (to
1e-4 in NLL and KL: float32 on another CPU), or the script stops; each quantized cache's largest difference from the
run's figures is reported (a quantized cache is far more sensitive: a few groups whose scale code moves by one step
change a window's KL by up to 10%). Reported per cell, on the run's windows and on all: perplexity and KL of each
cache, and the shares of the perplexity gap and of the KL that the calibrated cache recovers against each fixed one,
with standard errors over windows (delta method; the perplexity share on log-perplexity, which equals the ratio of
perplexity differences to within a point at these gaps).

Selecting the best fixed configuration on the run's 8 windows and measuring it again on more is the less biased
reading: the best of many on the same windows is also the luckiest on them.

With `--candidates`, every other allocation the run's calibration validated (its record's RateQuant candidates,
rebuilt from their bit and group tables) is measured too, beside the validation KL it had on the calibration text:
whether validation picked the candidate that is best on held-out text, or the candidates themselves fall short.

    python benchmarks/gap_windows.py --run benchmarks/results/ratequant_quality_bytes_token-3-s8.json \\
        --run benchmarks/results/ratequant_quality_bytes_rotated-3-s8.json --tag bytes-3-s8
    python benchmarks/gap_windows.py --run benchmarks/results/ratequant_quality_bytes_token-3-s8.json \\
        --candidates --eval-windows 16 --tag token-3-s8-candidates
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import time

import torch
from _common import RESULTS_DIR, layout_from_args, load_benchmark_model, machine, window_difference, write_report
from table_transfer import model_of, text_of

logger = logging.getLogger("benchmarks.gap_windows")
HERE = os.path.dirname(os.path.abspath(__file__))
FULL_TOLERANCE = 1e-4
"""How far full precision's per-window NLL and KL may be from the quality run's (float32 on another CPU: 1e-5)."""
SAME_PROTOCOL = ("model", "eval_data", "window", "chunk", "eval_batch_size")
"""Settings every `--run` must share: they are evaluated on one set of windows against one reference."""


# ---- pure arithmetic -------------------------------------------------------------------------------------------
def share_recovered(full: list[float], fixed: list[float], chosen: list[float], tokens: list[int]
                    ) -> tuple[float, float | None]:
    """`(share, standard error)`: the part of `fixed`'s excess over `full` that `chosen` removes, per-window means
    weighted by `tokens`: sum t (fixed - chosen) / sum t (fixed - full); the standard error by the delta method
    over windows (None for one window). `full` all zeros gives the share of `fixed`'s KL removed."""
    a = [t * (f - c) for f, c, t in zip(fixed, chosen, tokens)]
    b = [t * (f - u) for f, u, t in zip(fixed, full, tokens)]
    n, total = len(a), sum(b)
    share = sum(a) / total
    if n < 2:
        return share, None
    resid = [x - share * y for x, y in zip(a, b)]
    return share, math.sqrt(n / (n - 1) * sum(r * r for r in resid)) / abs(total)


def pooled(values: list[float], tokens: list[int]) -> float:
    return sum(v * t for v, t in zip(values, tokens)) / sum(tokens)


def compare(caches: dict[str, dict], chosen: str, fixed: list[str], windows: int | None = None) -> list[dict]:
    """Per fixed cache: the perplexity-gap and KL shares `chosen` recovers over the first `windows` windows (all)."""
    sl = slice(None, windows)
    full, ours = caches["full precision"], caches[chosen]
    tokens = full["window_tokens"][sl]
    out = []
    for name in fixed:
        other = caches[name]
        ppl, ppl_se = share_recovered(full["window_nll"][sl], other["window_nll"][sl], ours["window_nll"][sl], tokens)
        zeros = [0.0] * len(tokens)
        kl, kl_se = share_recovered(zeros, other["window_kl"][sl], ours["window_kl"][sl], tokens)
        out.append(dict(fixed=name, windows=len(tokens), ppl_share=ppl, ppl_share_se=ppl_se, kl_share=kl,
                        kl_share_se=kl_se))
    return out


def summary_of(caches: dict[str, dict], windows: int | None = None) -> dict[str, dict]:
    """Perplexity and KL of every cache over its first `windows` windows (all)."""
    sl = slice(None, windows)
    return {name: dict(perplexity=math.exp(pooled(c["window_nll"][sl], c["window_tokens"][sl])),
                       kl=pooled(c["window_kl"][sl], c["window_tokens"][sl])) for name, c in caches.items()}


# ---- the runs ----------------------------------------------------------------------------------------------------
def load_run(path: str) -> dict:
    """What one `--run` needs, before any model work: its settings (this script's evaluation and the fixed
    configurations' construction), and per calibrated cell the chosen config and the run's rows of the caches to
    measure again."""
    try:
        with open(path, encoding="utf-8") as f:
            run = json.load(f)
        settings, full = run["settings"], run["full"]
        cells = []
        for block in run["blocks"]:
            s, rows = block["summary"], {r["cache"]: r for r in block["rows"]}
            chosen = f"chosen ({s['winner']})"
            fixed = list(dict.fromkeys(n for n in (s.get("best_fixed"), s.get("best_fixed_by_kl")) if n))
            if not fixed or "key_bits" not in (block.get("config") or {}):  # uncalibrated or without its config
                continue
            record = block.get("calibration") or block["config"].get("calibration") or {}
            families, groups = record.get("families") or {}, record.get("candidate_groups") or {}
            candidates = {f"candidate {n}": dict(bits=bits, groups=groups.get(n),
                                                 validation_kl=record["validation_kl"][n],
                                                 stopped=n in (record.get("validation_stopped") or ()))
                          for n, bits in (record.get("candidates") or {}).items()
                          if families.get(n) == "ratequant" and n != s["winner"]}
            cells.append(dict(quantizer=s["quantizer"], budget=float(s["budget"]), config=block["config"],
                              chosen=chosen, fixed=fixed, rows={n: rows[n] for n in [chosen, *fixed]},
                              candidates=candidates,
                              chosen_validation_kl=(record.get("validation_kl") or {}).get(s["winner"])))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"--run {path}: not a ratequant_quality result with its configs ({type(err).__name__}: "
                         f"{err}).") from err
    if not cells:
        raise SystemExit(f"--run {path}: no calibrated cell with a fixed configuration beside it.")
    if settings.get("eval_batch_size", 1) != 1:
        raise SystemExit(f"--run {path}: evaluated {settings['eval_batch_size']} windows at a time; its figures are "
                         "per group of windows, not per window (run it with --eval-batch-size 1).")
    return dict(file=os.path.relpath(path, os.path.join(HERE, "..")), settings=settings, full=full, cells=cells,
                model=model_of(run), eval_data=text_of(run, "eval_data"), eval_source=run.get("eval_source"))


def run_options(settings: dict) -> argparse.Namespace:
    """A quality run's options as `ratequant_quality`'s argument namespace (a setting an older file lacks: today's
    default), from which its fixed configurations are rebuilt."""
    from ratequant_quality import parse_args

    return argparse.Namespace(**{**vars(parse_args([])), **settings})


def rebuild(name: str, cell: dict, options: argparse.Namespace, model_config):
    """The config of cache `name` of a cell, as the quality run built it."""
    from ratequant_quality import fixed_configs

    from hf_ratequant import RateQuantConfig

    if name == cell["chosen"]:
        return RateQuantConfig.from_dict(cell["config"])
    layout = layout_from_args(options, quantizer=cell["quantizer"])
    if name in cell.get("candidates", {}):  # as calibration built it: its tables, the chosen budget and bounds
        from hf_ratequant.config import ModelFingerprint

        cand, chosen = cell["candidates"][name], cell["config"]
        return RateQuantConfig.from_bits(
            torch.tensor(cand["bits"]), layout, fingerprint=ModelFingerprint.from_model_config(model_config),
            method="candidate", budget=chosen["budget"], b_min=chosen["b_min"], b_max=chosen["b_max"],
            groups=None if cand["groups"] is None else torch.tensor(cand["groups"]))
    base = name.removesuffix(" s16")
    if base != name:
        layout = dataclasses.replace(layout, scale_bits=16)
    built = dict(fixed_configs(options, model_config, cell["quantizer"], cell["budget"], layout))
    if base not in built:
        raise SystemExit(f"{name}: not a fixed configuration of {cell['quantizer']} {cell['budget']:g} with the "
                         "run's settings (the run was made by another version of ratequant_quality).")
    return built[base]


def check_against_run(name: str, ours: dict, theirs: dict, tol: float = math.inf) -> float:
    """The largest difference, window by window over the run's windows, between this evaluation and the run's; a
    `SystemExit` above `tol`."""
    n = len(theirs["window_nll"])
    diff = window_difference(ours["window_nll"][:n], ours["window_kl"][:n], theirs["window_nll"], theirs["window_kl"])
    if diff > tol:
        raise SystemExit(f"{name} measures {diff:.2e} away from the quality run's figures on its {n} windows: not "
                         "the same cache or protocol.")
    return diff


def _pct(x: float, se: float | None) -> str:
    return f"{x:.0%}" + ("" if se is None else f" ± {se:.0%}")


def markdown(payload: dict) -> str:
    out = ["# The perplexity gap recovered, on more held-out windows", "",
           f"Machine: {payload['machine']['cpu']}, {payload['machine']['cores']} cores. Model: {payload['model']}. "
           f"Held-out text: {payload['eval_source']}: {payload['windows']} windows of {payload['window']} tokens, "
           f"the first {payload['run_windows']} those of the quality runs (full precision's figures there equal the "
           f"runs' to {payload['differences']['full precision']:.0e} per window; each quantized cache's, pooled, "
           "beside those the run recorded). Shares ± one standard error over windows (delta method); the perplexity "
           "share on log-perplexity.", ""]
    out += ["| run | cell | cache | ppl / KL as the run recorded them | ppl / KL, run's windows | ppl / KL, all "
            "windows |", "| --- | --- | --- | ---: | ---: | ---: |"]
    for c in payload["cells"]:
        for name in [c["chosen"], *c["fixed"]]:
            r, a, b = c["summary_recorded"][name], c["summary_run"][name], c["summary_all"][name]
            out.append(f"| `{c['file']}` | {c['quantizer']} {c['budget']:g} | {name} | {r['perplexity']:.3f} / "
                       f"{r['kl']:.4f} | {a['perplexity']:.3f} / {a['kl']:.4f} | {b['perplexity']:.3f} / "
                       f"{b['kl']:.4f} |")
    f = payload["full"]
    out += [f"| | | full precision | | {f['run']['perplexity']:.3f} / 0 | {f['all']['perplexity']:.3f} / 0 |", ""]
    out += ["| cell | against | ppl gap recovered: run's windows | all windows | KL removed: run's windows | all "
            "windows |",
            "| --- | --- | ---: | ---: | ---: | ---: |"]
    for c in payload["cells"]:
        for r, a in zip(c["shares_run"], c["shares_all"]):
            out.append(f"| {c['quantizer']} {c['budget']:g} | {r['fixed']} | "
                       f"{_pct(r['ppl_share'], r['ppl_share_se'])} | {_pct(a['ppl_share'], a['ppl_share_se'])} | "
                       f"{_pct(r['kl_share'], r['kl_share_se'])} | "
                       f"{_pct(a['kl_share'], a['kl_share_se'])} |")
    for c in payload["cells"]:
        if not c.get("candidate_summary"):
            continue
        out += ["", f"Validation's candidates, {c['quantizer']} {c['budget']:g} (`{c['file']}`): the validation KL "
                "each had on the calibration text (> where the race stopped it early: a lower bound) against its "
                "figures on the held-out windows.", "",
                "| candidate | validation KL | ppl / KL, run's windows | ppl / KL, all windows |",
                "| --- | ---: | ---: | ---: |"]
        for name, r in sorted(c["candidate_summary"].items(), key=lambda kv: kv[1]["all"]["kl"]):
            val = "" if r["validation_kl"] is None else (">" if r["stopped"] else "") + f"{r['validation_kl']:.5f}"
            out.append(f"| {name} | {val} | {r['run']['perplexity']:.3f} / {r['run']['kl']:.4f} | "
                       f"{r['all']['perplexity']:.3f} / {r['all']['kl']:.4f} |")
    out += ["", f"Command: `{payload['command']}` ({payload['total_s'] / 60:.0f} min)."]
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--run", action="append", required=True, metavar="RUN.json",
                   help="a ratequant_quality result (repeat: runs of one model and held-out text)")
    p.add_argument("--eval-windows", type=int, default=None,
                   help="held-out windows (default: all the text holds)")
    p.add_argument("--candidates", action="store_true",
                   help="also measure every other allocation the run's calibration validated")
    p.add_argument("--tag", default="", help="suffix of the output names: gap_windows_<tag>")
    p.add_argument("--output-dir", default=RESULTS_DIR)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from ratequant_quality import evaluate

    from hf_ratequant.evaluation import evaluation_windows, reference_logprobs

    runs = [load_run(p) for p in args.run]
    first = runs[0]
    for r in runs[1:]:
        differs = [k for k in SAME_PROTOCOL if r["settings"].get(k) != first["settings"].get(k)]
        if differs or r["eval_data"] != first["eval_data"]:
            raise SystemExit(f"--run {r['file']} differs from {first['file']} in {', '.join(differs) or 'eval_data'}"
                             ": pass runs of one model, held-out text and evaluation protocol.")
    n_run = len(first["full"]["window_nll"])
    if args.eval_windows is not None and args.eval_windows <= n_run:
        raise SystemExit(f"--eval-windows {args.eval_windows}: no more than the runs' {n_run}; pass more.")
    start = time.perf_counter()
    info = machine()
    model, tok, label = load_benchmark_model(first["model"], torch.float32, torch.device("cpu"))
    settings = first["settings"]
    windows = evaluation_windows(tok, first["eval_data"], window=settings["window"], max_windows=args.eval_windows)
    if windows.shape[0] <= n_run:
        raise SystemExit(f"the held-out text holds {windows.shape[0]} windows, no more than the runs' {n_run}.")
    refs = reference_logprobs(model, windows, batch_size=1)
    parts = [(windows[:n_run], refs[:n_run]), (windows[n_run:], refs[n_run:])]  # the runs' windows, then the rest
    diffs: dict[str, float] = {}

    def measure(label: str, cfg, theirs: dict) -> dict:
        """`cfg` on every window; compared with the run's figures before the windows it did not measure (full
        precision must equal them: 1e-4, float32 on another CPU)."""
        head = evaluate(model, *parts[0], 1, cfg, settings["chunk"])
        if theirs is not None:  # None: a cache the run did not measure
            diffs[label] = check_against_run(label, head, theirs, FULL_TOLERANCE if cfg is None else math.inf)
        tail = evaluate(model, *parts[1], 1, cfg, settings["chunk"])
        out = {k: head[k] + tail[k] for k in ("window_nll", "window_kl", "window_tokens", "seconds")}
        out.update(summary_of({label: out})[label])
        return out

    full = measure("full precision", None, first["full"])
    logger.info("full precision: ppl %.3f on %d windows", full["perplexity"], windows.shape[0])
    cells = []
    for r in runs:
        options = run_options(r["settings"])
        for cell in r["cells"]:
            caches = {"full precision": full}
            for name in [cell["chosen"], *cell["fixed"]]:
                cfg = rebuild(name, cell, options, model.config)
                caches[name] = measure(f"{cell['quantizer']} {cell['budget']:g} {name}", cfg, cell["rows"][name])
                logger.info("%s %g %s: ppl %.3f, KL %.5f (%.0f s)", cell["quantizer"], cell["budget"], name,
                            caches[name]["perplexity"], caches[name]["kl"], caches[name]["seconds"])
            validated = {}  # name: (validation KL, stopped early), the chosen one beside the others
            for name, cand in (cell["candidates"] if args.candidates else {}).items():
                caches[name] = measure(f"{cell['quantizer']} {cell['budget']:g} {name}",
                                       rebuild(name, cell, options, model.config), None)
                logger.info("%s: ppl %.3f, KL %.5f", name, caches[name]["perplexity"], caches[name]["kl"])
                validated[name] = cand["validation_kl"], cand["stopped"]
            if validated:
                validated[cell["chosen"]] = cell["chosen_validation_kl"], False
            on_run, on_all = summary_of(caches, n_run), summary_of(caches)
            cells.append(dict(file=r["file"], quantizer=cell["quantizer"], budget=cell["budget"],
                              chosen=cell["chosen"], fixed=cell["fixed"],
                              candidate_summary={n: dict(validation_kl=v, stopped=stop, run=on_run[n], all=on_all[n])
                                                 for n, (v, stop) in validated.items()},
                              caches={k: v for k, v in caches.items() if k != "full precision"},
                              summary_run=on_run, summary_all=on_all,
                              summary_recorded=summary_of(cell["rows"]),
                              shares_run=compare(caches, cell["chosen"], cell["fixed"], n_run),
                              shares_all=compare(caches, cell["chosen"], cell["fixed"])))
    command = "python benchmarks/gap_windows.py " + " ".join(f"--run {r['file']}" for r in runs)
    command += " --candidates" if args.candidates else ""
    command += f" --eval-windows {args.eval_windows}" if args.eval_windows else ""
    command += f" --tag {args.tag}" if args.tag else ""
    full_summary = summary_of({"full": full}, n_run)["full"], summary_of({"full": full})["full"]
    payload = dict(machine=info, model=label, eval_source=first["eval_source"] or first["eval_data"],
                   window=settings["window"],
                   windows=int(windows.shape[0]), run_windows=n_run, differences=diffs,
                   full=dict(run=full_summary[0], all=full_summary[1], caches=full), cells=cells, command=command,
                   total_s=time.perf_counter() - start)
    write_report("gap_windows", args.tag, payload, markdown(payload), args.output_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
