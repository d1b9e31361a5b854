"""Peak memory of `calibrate` against one plain forward+backward pass over one batch of its windows, per model.

    python benchmarks/calibration_memory.py                       # the embedded SmolLM2-135M
    python benchmarks/calibration_memory.py --model gemma3-270m   # a packaged real model (see real_models.py)

Each measurement runs in its own process: load the model, note the resident memory (RSS) with the model loaded
(W), reset the kernel's peak-RSS mark (`/proc/self/clear_refs`), run the work, read the peak (`VmHWM`). The plain
pass is what a user knows: `model(input_ids, labels=input_ids).loss.backward()` with every parameter requiring a
gradient, over `batch_size` windows of `seq_len` tokens of the calibration text. The bar (issue [3 models]):
calibration's peak no more than W plus 1.5x the plain pass's peak above W. CPU only (Linux).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from _common import CALIBRATION, MODEL_HELP, RESULTS_DIR, machine, write_results


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def worker(mode: str, model_spec: str, budget: float, data: str | None) -> dict:
    """One measurement in this process: `mode` is "plain" or "calibrate"."""
    import torch
    from _common import load_benchmark_model, time_fwd_bwd

    from hf_ratequant.calibration import calibrate
    from hf_ratequant.data import load_text, tokenize_windows

    torch.manual_seed(0)
    model, tok, name = load_benchmark_model(model_spec, torch.float32, torch.device("cpu"))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    text, source = load_text(data, split="train")
    loaded = _rss("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    if mode == "plain":
        ids = tokenize_windows(tok, text, seq_len=CALIBRATION.seq_len, n_windows=CALIBRATION.batch_size)
        time_fwd_bwd(model, ids, CALIBRATION.batch_size)
    else:
        calibrate(model, tok, data=data, budget=budget, progress=False)
    return dict(mode=mode, model=name, source=source, weights_bytes=weights, loaded_rss=loaded,
                peak_rss=_rss("VmHWM"), seconds=time.perf_counter() - t0)


def run(mode: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--model", args.model,
           "--budget", str(args.budget)] + (["--data", args.data] if args.data else [])
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"the {mode} measurement failed (rc {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def render(payload: dict) -> str:
    """The report: the table `make_results.py` puts in RESULTS.md, under a title."""
    from make_results import calibration_memory

    return "\n".join(["# Calibration memory", "", *calibration_memory(payload), ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["smollm2"], help=MODEL_HELP)
    p.add_argument("--budget", type=float, default=CALIBRATION.budget,
                   help=f"calibration budget (default {CALIBRATION.budget})")
    p.add_argument("--data", default=None, help="calibration text (default: the library's; offline: pydoc)")
    p.add_argument("--output-dir", default=RESULTS_DIR)
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of other models from the saved results (each row names its machine)")
    p.add_argument("--worker", choices=["plain", "calibrate"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.model[0], args.budget, args.data)))
        return 0
    rows, info = [], machine()
    for spec in args.model:
        one = argparse.Namespace(**{**vars(args), "model": spec})
        plain, calib = run("plain", one), run("calibrate", one)
        rows.append(dict(model=calib["model"], plain=plain, calibrate=calib, machine=info))
    if args.merge:  # keep the other models' rows of the last run (each row names its machine)
        with open(os.path.join(args.output_dir, "calibration_memory.json"), encoding="utf-8") as f:
            old = json.load(f)
        if old["budget"] != args.budget:
            raise SystemExit(f"--merge: the saved rows are at budget {old['budget']}, this run at {args.budget}.")
        new = {r["model"] for r in rows}
        kept = [{**r, "machine": r.get("machine", old["machine"])} for r in old["rows"] if r["model"] not in new]
        rows = kept + rows
    payload = dict(budget=args.budget, rows=rows, machine=info)
    markdown = render(payload)
    write_results("calibration_memory", payload, markdown, args.output_dir)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
