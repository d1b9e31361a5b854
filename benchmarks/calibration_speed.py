"""Calibration wall time against one plain forward + backward pass over the same calibration tokens.

The issue's bar: calibration (measure, fit, allocation and validation) costs at most 3x one forward + backward pass
over its fit tokens. Both are timed in one run, on the same model, device and batch size; the median of `--repeats`
runs of each is reported.

    python benchmarks/calibration_speed.py                                   # default model, CPU, float32
    python benchmarks/calibration_speed.py --budget 3 --budget-unit true --groups 64 128 --tag kivi-3-true-groups
    python benchmarks/calibration_speed.py --quantizer token --budget 3 --budget-unit true --groups 16 32 \\
        --scale-bits 8 --tag token-3-true-groups-s8
    python benchmarks/calibration_speed.py --device cuda --dtype bfloat16 --model Qwen/Qwen3-8B
    python benchmarks/calibration_speed.py --device cuda --dtype bfloat16 --model random:qwen3-8b \\
        --tokenizer PATH    # timing only, without downloading the weights (any tokenizer folder will do)
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time

import torch
from _common import (
    CALIBRATION,
    LAYOUT,
    MODEL_HELP,
    RESULTS_DIR,
    add_sink_length,
    load_benchmark_model,
    machine,
    resolve_layout,
    time_fwd_bwd,
    write_results,
)

from hf_ratequant.quantizers import available_quantizers
from hf_ratequant.settings import BUDGET_UNITS

logger = logging.getLogger("benchmarks.calibration_speed")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2", help=MODEL_HELP + " (default smollm2)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or Hub id (default: the model's own)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--quantizer", default=LAYOUT.quantizer, choices=available_quantizers(),
                   help=f"default {LAYOUT.quantizer}")
    p.add_argument("--budget", type=float, default=CALIBRATION.budget, help=f"default {CALIBRATION.budget:g}")
    p.add_argument("--samples", type=int, default=CALIBRATION.n_samples,
                   help=f"fit windows (default {CALIBRATION.n_samples})")
    p.add_argument("--validation", type=int, default=CALIBRATION.n_validation,
                   help=f"validation windows (default {CALIBRATION.n_validation})")
    p.add_argument("--seq-len", type=int, default=CALIBRATION.seq_len, help=f"default {CALIBRATION.seq_len}")
    add_sink_length(p, "of the cache calibrated")
    p.add_argument("--batch-size", type=int, default=CALIBRATION.batch_size,
                   help=f"default {CALIBRATION.batch_size}")
    p.add_argument("--budget-unit", default="code", choices=BUDGET_UNITS,
                   help="what --budget counts: code bits, or true bits per element (metadata included)")
    p.add_argument("--groups", type=int, nargs="*", default=None,
                   help="group sizes each unit may choose besides the layout's (needs --budget-unit true)")
    p.add_argument("--scale-bits", type=int, choices=[16, 8], default=LAYOUT.scale_bits,
                   help=f"scales and zero-points in 16 or 8 bits (default {LAYOUT.scale_bits}; 8 needs --budget-unit "
                   "true)")
    p.add_argument("--data", default=None, help="calibration text (default: hf_ratequant's default)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output-dir", default=RESULTS_DIR)
    p.add_argument("--tag", default="")
    return resolve_layout(p, p.parse_args(argv))


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    from transformers import AutoTokenizer

    from hf_ratequant import calibrate
    from hf_ratequant.data import load_text, tokenize_windows

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    info = machine(device)
    model, tokenizer, model_name = load_benchmark_model(args.model, dtype, device)
    if args.tokenizer is not None:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, trust_remote_code=False)
    if tokenizer is None:
        raise SystemExit(f"{args.model} has no tokenizer: name one with --tokenizer.")
    text, source = load_text(args.data, split="train")
    ids = tokenize_windows(tokenizer, text, seq_len=args.seq_len, n_windows=args.samples).to(device)

    fwd_bwd, calib, parts, winners = [], [], [], []
    for _ in range(args.repeats):
        _sync(device)
        fwd_bwd.append(time_fwd_bwd(model, ids, args.batch_size)["wall_s"])
        _sync(device)
        start = time.perf_counter()
        config = calibrate(model, tokenizer, data=args.data, quantizer=args.quantizer, budget=args.budget,
                           n_samples=args.samples, n_validation=args.validation, seq_len=args.seq_len,
                           sink_length=args.sink_length, batch_size=args.batch_size, progress=False,
                           budget_unit=args.budget_unit, groups=tuple(args.groups) if args.groups else None,
                           scale_bits=args.scale_bits)
        _sync(device)
        calib.append(time.perf_counter() - start)
        parts.append(config.calibration["seconds"])
        winners.append(dict(winner=config.calibration["winner"],
                            stopped=len(config.calibration.get("validation_stopped", [])),
                            validated=len(config.calibration["validation_kl"])))
        logger.info("fwd+bwd %.2f s, calibration %.2f s (%s), %s", fwd_bwd[-1], calib[-1], parts[-1], winners[-1])
    fb, cal = statistics.median(fwd_bwd), statistics.median(calib)
    ratio = cal / fb
    gpu = f", {info['gpu']}" if "gpu" in info else ""
    lines = [
        "# Calibration time against one forward + backward pass",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, device {info['device']}{gpu}; torch {info['torch']}, "
        f"transformers {info.get('transformers')}. Model: {model_name}, in {args.dtype}. Text: {source}. "
        f"{args.quantizer} at {args.budget} {args.budget_unit} bits"
        + (f", groups {sorted(set(args.groups) | {LAYOUT.group_size})} per unit" if args.groups else "")
        + (f", {args.scale_bits}-bit scales" if args.scale_bits != 16 else "")
        + f", {args.samples} fit + {args.validation} validation windows of "
        f"{args.seq_len} tokens, sinks {args.sink_length}, batch {args.batch_size}; median of {args.repeats} runs.",
        "",
        "| fwd+bwd s (fit tokens) | calibration s | of which measure s | validate s | ratio (goal <= 3x) |",
        "|---|---|---|---|---|",
        f"| {fb:.2f} | {cal:.2f} | {statistics.median(p['measure'] for p in parts):.2f} "
        f"| {statistics.median(p['validate'] for p in parts):.2f} | {ratio:.2f}x {'PASS' if ratio <= 3 else 'FAIL'} |",
        "",
    ]
    report = "\n".join(lines)
    print(report)
    suffix = f"_{args.tag}" if args.tag else ""
    payload = dict(machine=info, args=vars(args), model=model_name, fwd_bwd_s=fwd_bwd, calibration_s=calib,
                   parts=parts, winners=winners, ratio=ratio)
    write_results(f"calibration_speed{suffix}", payload, report, args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
