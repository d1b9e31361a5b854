"""Calibrate a RateQuant allocation, save it, and compare it with fixed allocations on held-out text.

    python examples/calibrate_and_evaluate.py --quantizer kivi --budget 2.5 --output smollm2-ratequant-kivi-2.5

Calibration text is WikiText-2 train and evaluation text WikiText-2 test; offline, two disjoint halves of Python's
own documentation are used instead (a warning says so).
"""

import argparse

from hf_ratequant import RateQuantConfig, calibrate, load_model
from hf_ratequant.allocation import fixed_allocations
from hf_ratequant.evaluation import evaluate_quality, evaluation_windows, reference_logprobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--quantizer", default="kivi")
    parser.add_argument("--budget", type=float, default=2.5)
    parser.add_argument("--sink-length", type=int, default=32, help="first tokens kept in full precision")
    parser.add_argument("--samples", type=int, default=16, help="calibration windows for the fit")
    parser.add_argument("--validation", type=int, default=8, help="held-back calibration windows")
    parser.add_argument("--windows", type=int, default=4, help="1024-token evaluation windows")
    parser.add_argument("--output", default="ratequant-config")
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    config = calibrate(model, tokenizer, quantizer=args.quantizer, budget=args.budget, sink_length=args.sink_length,
                       n_samples=args.samples, n_validation=args.validation)
    config.save_pretrained(args.output)
    print(f"calibration chose {config.method}; saved to {args.output}")

    windows = evaluation_windows(tokenizer, window=1024, max_windows=args.windows)
    reference = reference_logprobs(model, windows)
    caches = {"full precision": None, f"RateQuant ({config.method})": config}
    n_units = config.num_layers * config.num_kv_heads
    for k, v in fixed_allocations(n_units, n_units, args.budget, config.b_min, config.b_max):
        caches[f"keys {k} / values {v}"] = RateQuantConfig.uniform(model.config, key_bits=k, value_bits=v,
                                                                   quantizer=args.quantizer,
                                                                   sink_length=args.sink_length)
    print(f"{'cache':<32}{'perplexity':>12}{'KL':>10}")
    for name, cfg in caches.items():
        res = evaluate_quality(model, windows, cfg, reference=reference)
        print(f"{name:<32}{res.perplexity:>12.3f}{res.kl:>10.5f}")


if __name__ == "__main__":
    main()
