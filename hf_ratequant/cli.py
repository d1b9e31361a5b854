"""The `hf-ratequant` command: thin argparse subcommands over the library functions."""

from __future__ import annotations

import argparse
import logging
import time

import torch

from .models import DEFAULT_MODEL
from .quantizers import ALLOWED_BITS, available_quantizers

logger = logging.getLogger("hf_ratequant")


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def _generate(model, inputs, cache, max_new_tokens: int):
    start = time.perf_counter()
    out = model.generate(
        **inputs, past_key_values=cache, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
        do_sample=False,
    )
    return out, time.perf_counter() - start


def cmd_demo(args: argparse.Namespace) -> int:
    """Build a cache, generate text after a long context, print bytes against the 16-bit cache and the speed."""
    from transformers import DynamicCache

    from .cache import RateQuantCache
    from .config import RateQuantConfig
    from .data import load_text
    from .models import load_model

    model, tokenizer = load_model(args.model)
    if args.config:
        cache_config = RateQuantConfig.from_pretrained(args.config)
    else:
        cache_config = RateQuantConfig.uniform(
            model.config, bits=args.bits, quantizer=args.quantizer, group_size=args.group_size,
            residual_length=args.residual_length,
        )
    text, source = load_text("pydoc", split="test")
    context_ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[:, : args.context_tokens]
    question = tokenizer("\n\nIn one sentence, the text above explains", return_tensors="pt").input_ids
    input_ids = torch.cat([context_ids, question], dim=1)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    with torch.inference_mode():
        cache = RateQuantCache(config=model.config, quant_config=cache_config)
        out, seconds = _generate(model, inputs, cache, args.max_new_tokens)
        ref_cache = DynamicCache(config=model.config)
        ref_out, ref_seconds = _generate(model, inputs, ref_cache, args.max_new_tokens)

    n_new = out.shape[1] - input_ids.shape[1]
    print(f"model: {model.config._name_or_path}  context: {input_ids.shape[1]} tokens of {source}")
    print(f"cache: {cache_config.quantizer}, {cache_config.average_bits:g} average bits "
          f"(G={cache_config.group_size}, R={cache_config.residual_length})")
    print("\n--- RateQuantCache output ---")
    print(tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True).strip())
    same = int((out[0, -n_new:] == ref_out[0, -n_new:]).sum()) if ref_out.shape == out.shape else "n/a"
    print(f"(tokens equal to the full-precision cache's output: {same}/{n_new})\n")
    held, ref16 = cache.nbytes, cache.nbytes_16bit()
    print(f"{'cache':<28}{'bytes held':>14}{'vs 16-bit':>11}{'tok/s incl. prefill':>22}")
    print(f"{'DynamicCache, 16-bit':<28}{_human(ref16):>14}{1.0:>10.2f}x{'':>22}")
    ref_bytes = sum(k.numel() * k.element_size() * 2 for k, _v, _ in ref_cache)
    print(f"{'DynamicCache, ' + str(model.dtype).replace('torch.', ''):<28}{_human(ref_bytes):>14}"
          f"{ref_bytes / ref16:>10.2f}x{n_new / ref_seconds:>22.1f}")
    print(f"{'RateQuantCache':<28}{_human(held):>14}{held / ref16:>10.2f}x{n_new / seconds:>22.1f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-ratequant", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="generate with a RateQuantCache and compare bytes and speed")
    demo.add_argument("--model", default=DEFAULT_MODEL, help="Hub id, local folder, or 'smollm2' (embedded)")
    demo.add_argument("--config", help="a saved RateQuantConfig folder (default: uniform --bits)")
    demo.add_argument("--bits", type=int, default=4, choices=ALLOWED_BITS)
    demo.add_argument("--quantizer", default="kivi", choices=available_quantizers())
    demo.add_argument("--group-size", type=int, default=32)
    demo.add_argument("--residual-length", type=int, default=128)
    demo.add_argument("--context-tokens", type=int, default=1024)
    demo.add_argument("--max-new-tokens", type=int, default=48)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError, OSError) as e:
        parser.exit(2, f"hf-ratequant {args.command}: error: {e}\n")
