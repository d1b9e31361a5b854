"""Calibration wall time with 1 and with N data-parallel processes (accelerate), same samples, same config.

Each run is the real command (`hf-ratequant calibrate`, under `accelerate launch` for N > 1) in a fresh process, so
the time includes loading the model; the calibration itself (`config.calibration["seconds"]`) is reported apart.
The configs of both runs are compared (same bits expected).

    python benchmarks/calibration_scaling.py                      # default model, 1 vs 2 processes on CPU
    python benchmarks/calibration_scaling.py --processes 8 --model Qwen/Qwen3-8B   # a multi-GPU node
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from _common import CALIBRATION, LAYOUT, RESULTS_DIR, machine, write_results

from hf_ratequant.quantizers import available_quantizers


def run(processes: int, args, out: str, threads: int) -> dict:
    calib = ["-m", "hf_ratequant", "calibrate", "--model", args.model, "--quantizer", args.quantizer, "--budget",
             str(args.budget), "--samples", str(args.samples), "--validation", str(args.validation), "-o", out]
    if args.data:
        calib += ["--data", args.data]
    if processes == 1:
        cmd = [sys.executable, *calib]
    else:
        # --multi_gpu starts the processes through torchrun; without GPUs hf_ratequant forms a CPU (gloo) group.
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *calib]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    with open(os.path.join(out, "ratequant_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    return dict(processes=processes, threads_per_process=threads, wall_s=wall,
                calibration_s=config["calibration"]["seconds"], bits=[config["key_bits"], config["value_bits"]])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--quantizer", default=LAYOUT.quantizer, choices=available_quantizers(),
                   help=f"default {LAYOUT.quantizer}, calibrate's")
    p.add_argument("--budget", type=float, default=CALIBRATION.budget, help=f"default {CALIBRATION.budget:g}")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--validation", type=int, default=4)
    p.add_argument("--data", default=None)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--output-dir", default=RESULTS_DIR, help="where calibration_scaling.md/.json go")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        one = run(1, args, os.path.join(tmp, "one"), threads=cores)
        many = run(args.processes, args, os.path.join(tmp, "many"), threads=max(1, cores // args.processes))
    rows = [one, many]
    info = machine()
    lines = [
        f"# Calibration time, 1 vs {args.processes} processes ({args.model}, {args.quantizer} {args.budget:g} bits, "
        f"{args.samples} + {args.validation} windows)", "",
        f"Machine: {json.dumps(info)}", "",
        "| processes | threads each | wall s (incl. model load) | measure s | validate s | calibration s | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r["calibration_s"]
        lines.append(f"| {r['processes']} | {r['threads_per_process']} | {r['wall_s']:.1f} | {s['measure']:.1f} | "
                     f"{s['validate']:.1f} | {s['total']:.1f} | {one['calibration_s']['total'] / s['total']:.2f}x |")
    lines += ["", f"Same allocation from both runs: {one['bits'] == many['bits']}.", ""]
    text = "\n".join(lines)
    print(text)
    payload = dict(machine=info, args=vars(args), rows=rows, same_allocation=one["bits"] == many["bits"])
    write_results("calibration_scaling", payload, text, args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
