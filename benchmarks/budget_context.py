"""Where a budget in bytes puts the bits of a sliding-window model, by the context the bytes are counted at.

On a model whose sliding-window layers hold at most their window (Gemma 3: 15 of 18 layers slide over 512 tokens),
a budget in true bits per element weighs each layer's elements by the tokens it holds (`footprint.layer_weights`);
how much a global layer outweighs a sliding one depends on the context: about 10 to 1 at 4096 tokens, 85 to 1 at
32768. `CalibrationSettings.budget_context` (`--budget-context`) says which context calibration counts at. This
script takes a calibrated config's measured distortion table (`config.curves["distortion"]`, every unit at every
bit-width) and gives, per true budget and context, the exact allocation by bytes there (what `calibrate(...,
budget_unit="true", budget_context=...)` enters as `ratequant-options`), and what the allocation made for 4096 tokens
holds at that context. Pure arithmetic on the stored table: no model is loaded, nothing is validated through the
cache.

    python benchmarks/budget_context.py      # Gemma 3 270M's published kivi 3-bit config's table
    python benchmarks/budget_context.py --config hub_artifacts/gemma-3-270m-ratequant-kivi-2.5 --budgets 3.5
"""

from __future__ import annotations

import argparse
import os

from _common import RESULTS_DIR, write_report

from hf_ratequant import RateQuantConfig
from hf_ratequant.footprint import REPORT_TOKENS, cache_bytes, layer_weights, true_bits_per_element
from hf_ratequant.options import OptionGrid, option_candidates, option_table, window_costs

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(HERE, "..", "hub_artifacts", "gemma-3-270m-ratequant-kivi-3")


def allocation(config: RateQuantConfig, budget: float, context: int) -> RateQuantConfig:
    """The exact allocation of `budget` true bits per element held at `context` tokens over the config's measured
    table (bits only, at the config's own groups), as calibration's `ratequant-options` candidate."""
    fp, bit_grid = config.fingerprint, config.curves["bit_grid"].tolist()
    grid = OptionGrid.build(config, (), bit_grid, fp.head_dim)
    table = option_table({f"g{g}": config.curves["distortion"].double() for g in grid.groups}, grid)
    weights = layer_weights(config, fp, context)
    chosen = option_candidates(table, grid, budget, (1.0,), window_costs(grid, config, fp, context), weights)[0]
    return RateQuantConfig.from_bits(chosen.bits, config, fingerprint=fp, method=chosen.name)


def describe(config: RateQuantConfig, context: int) -> dict:
    """Bits of the global layers, mean bits of the sliding ones, bits per element held and MiB at `context`."""
    fp = config.fingerprint
    bits = config.bits_tensor().float()
    sliding = [i for i, kind in enumerate(fp.layer_types) if fp.window(kind)]
    full = [i for i in range(fp.num_layers) if i not in sliding]
    return dict(
        full_layers={i: "K{:g}V{:g}".format(*bits[i].mean(0).tolist()) for i in full},
        sliding_mean={"key": float(bits[sliding, :, 0].mean()), "value": float(bits[sliding, :, 1].mean())},
        held=true_bits_per_element(config, fp.head_dim, fingerprint=fp, tokens=context),
        mib=cache_bytes(config, fp, context).total / 2**20,
    )


def markdown(payload: dict) -> str:
    out = [f"# Budgets in bytes by context: {payload['model']} ({os.path.basename(payload['config'])})", "",
           f"Measured table of `{payload['config']}` ({payload['source']}); the exact allocation by bytes at each "
           "context (calibration's `ratequant-options` candidate), next to the allocation made for "
           f"{REPORT_TOKENS} tokens held at that context. Bits per element held and MiB of a bf16 cache at the "
           "context, window and sinks included. Arithmetic on the stored table: no model run, nothing validated.",
           "", "| true bits | context | weights sliding : global | global layers | sliding layers, mean K / V | "
           "held bits | MiB | the 4096-token allocation there: held bits / MiB |",
           "|---|---:|---|---|---|---:|---:|---|"]
    for r in payload["rows"]:
        a, ref = r["allocation"], r["allocation_4096"]
        full = ", ".join(f"{i}: {b}" for i, b in a["full_layers"].items())
        out.append(f"| {r['budget']:g} | {r['context']} | {r['weights'][0]} : {r['weights'][1]} | {full} | "
                   f"{a['sliding_mean']['key']:.2f} / {a['sliding_mean']['value']:.2f} | {a['held']:.3f} | "
                   f"{a['mib']:.2f} | {ref['held']:.3f} / {ref['mib']:.2f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="a calibrated config folder (default: Gemma 3 270M's "
                   "published kivi 3-bit config)")
    p.add_argument("--budgets", nargs="+", type=float, default=[3.0, 3.5], help="true bits per element held")
    p.add_argument("--contexts", nargs="+", type=int, default=[4096, 8192, 32768])
    p.add_argument("--tag", default="", help="suffix of the output names: budget_context_<tag>")
    p.add_argument("--output-dir", default=RESULTS_DIR)
    args = p.parse_args(argv)
    config = RateQuantConfig.from_pretrained(args.config)
    fp = config.fingerprint
    if config.curves is None or "distortion" not in config.curves or not fp.layer_types:
        raise SystemExit(f"{args.config}: needs a calibrated config (its measured distortion table) of a model whose "
                         "layer types are recorded.")
    rows = []
    for budget in args.budgets:
        at_4096 = allocation(config, budget, REPORT_TOKENS)
        for context in args.contexts:
            weights = layer_weights(config, fp, context)
            rows.append(dict(budget=budget, context=context, weights=[min(weights), max(weights)],
                             allocation=describe(allocation(config, budget, context), context),
                             allocation_4096=describe(at_4096, context)))
    payload = dict(model=fp.model_type, config=os.path.relpath(args.config, os.path.join(HERE, "..")),
                   source=(config.calibration or {}).get("source", "?"), rows=rows)
    write_report("budget_context", args.tag, payload, markdown(payload), args.output_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
