"""Dequantizing the cached past, per layer and decode step: the CPU kernel against PyTorch ops and `torch.cat`.

Every decode step dequantizes a layer's whole quantized past (keys and values) into the tensor attention reads;
`DynamicCache` instead concatenates the new token to its full-precision past, one copy of the same size. This times,
for the default model's shapes (3 kv-heads, head_dim 64, float32), one dequantization of `tokens` tokens at each
bit-width with the compiled kernel (`hf_ratequant.quantizers.cpu_kernel`) and with the PyTorch ops it replaces
(`HF_RATEQUANT_CPU_KERNEL=0`), and the `torch.cat` of `DynamicCache`, in one run: medians of `--repeats` calls.

    python benchmarks/dequantize_kernel.py                       # kivi keys and values, 1k to 8k tokens
    python benchmarks/dequantize_kernel.py --quantizer token --bits 2 3 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from _common import LAYOUT, RESULTS_DIR, machine, write_results

from hf_ratequant.quantizers import available_quantizers, cpu_kernel, get_quantizer


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (first call compiles or allocates)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def with_kernel(enabled: bool, fn):
    def run():
        before = os.environ.get(cpu_kernel.ENV_SWITCH)
        os.environ[cpu_kernel.ENV_SWITCH] = "1" if enabled else "0"
        try:
            fn()
        finally:
            if before is None:
                del os.environ[cpu_kernel.ENV_SWITCH]
            else:
                os.environ[cpu_kernel.ENV_SWITCH] = before

    return run


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quantizer", default=LAYOUT.quantizer, choices=available_quantizers(),
                   help=f"default {LAYOUT.quantizer}")
    p.add_argument("--group-size", type=int, default=LAYOUT.group_size, help=f"G (default {LAYOUT.group_size})")
    p.add_argument("--bits", type=int, nargs="+", default=[1, 2, 3, 4, 8])
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--tag", default="")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not cpu_kernel.available():
        raise SystemExit("The CPU kernel is not available here (see the warning above): nothing to compare.")
    quantizer = get_quantizer(args.quantizer, group_size=args.group_size)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for tokens in args.tokens:
        past = torch.randn(1, args.heads, tokens, args.head_dim, generator=gen)
        new = torch.randn(1, args.heads, 1, args.head_dim, generator=gen)
        cat_ms = median_ms(lambda: torch.cat([past, new], dim=-2), args.repeats)
        for kind in ("key", "value"):
            for bits in args.bits:
                q = quantizer.quantize(past, bits, kind)
                out = torch.empty_like(past)
                kernel = median_ms(with_kernel(True, lambda: quantizer.dequantize(q, kind, out=out)), args.repeats)
                ops = median_ms(with_kernel(False, lambda: quantizer.dequantize(q, kind, out=out)), args.repeats)
                rows.append(dict(tokens=tokens, kind=kind, bits=bits, kernel_ms=kernel, torch_ops_ms=ops,
                                 cat_ms=cat_ms))
                print(f"{tokens:5d} {kind:5s} {bits} bits: kernel {kernel:.3f} ms, PyTorch ops {ops:.3f} ms "
                      f"({ops / kernel:.2f}x), torch.cat {cat_ms:.3f} ms", flush=True)
    info = machine()
    lines = [
        f"# Dequantizing one layer's past: CPU kernel vs PyTorch ops vs `torch.cat` ({args.quantizer}, "
        f"{args.heads} kv-heads x head_dim {args.head_dim}, float32)", "",
        f"Machine: {info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads); "
        f"torch {info['torch']}; load average at the start {info['load_average_start']}. "
        f"Median of {args.repeats} calls each, one process.",
        "`torch.cat` is what `DynamicCache` does with the same past at every step (a copy of the fp32 tensor).", "",
        "| tokens | K/V | bits | kernel ms | PyTorch ops ms | ops / kernel | kernel / `torch.cat` |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['tokens']} | {r['kind']} | {r['bits']} | {r['kernel_ms']:.3f} | {r['torch_ops_ms']:.3f} | "
                     f"{r['torch_ops_ms'] / r['kernel_ms']:.2f}x | {r['kernel_ms'] / r['cat_ms']:.2f}x |")
    ratios = [r["torch_ops_ms"] / r["kernel_ms"] for r in rows]
    lines += ["", f"Kernel speed-up over PyTorch ops: median {statistics.median(ratios):.2f}x "
              f"(range {min(ratios):.2f}-{max(ratios):.2f}x).", ""]
    text = "\n".join(lines)
    print(text)
    stem = "dequantize_kernel" + (f"_{args.tag}" if args.tag else "")
    write_results(stem, dict(machine=info, args=vars(args), rows=rows), text, RESULTS_DIR)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
