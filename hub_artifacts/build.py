"""Build the calibrated configs and model cards of `hub_artifacts/`, ready to publish with `hf-ratequant push`.

For every quantizer and budget: `hf_ratequant.calibrate` (default settings: WikiText-2 train, or the local fallback
text offline), then held-out quality through the real cache (`hf_ratequant.evaluation.evaluate_quality`: the
full-precision cache, every fixed keys/values split of the budget, uniform bits where the budget is an integer, and
the calibrated config), then one folder per config:

    <out>/<model-name>-ratequant-<quantizer>-<budget>/
        ratequant_config.json, ratequant_curves-<hash>.safetensors   the config (what `from_pretrained` reads)
        evaluation.json                                      the held-out rows shown in the card
        README.md, allocation.png                            the model card and the allocation heatmap

The tests treat these folders as golden files: the config must re-serialise byte for byte and the card must be
exactly what `hf_ratequant.hub.model_card` writes for it, so neither format drifts silently.

    python hub_artifacts/build.py                                    # the embedded default model, CPU (~15 min)
    python hub_artifacts/build.py --configs-from benchmarks/results/ratequant_quality_configs_defaults  # reuse
    python hub_artifacts/build.py --model gemma3-270m --quantizers kivi  # packaged (benchmarks/real_models.py)
    python hub_artifacts/build.py --model Qwen/Qwen3-8B --dtype bfloat16 --device-map auto --out qwen3-8b
    python hub_artifacts/build.py --model meta-llama/Llama-3.1-8B --dtype bfloat16 --device-map auto --out llama-3.1-8b
    python hub_artifacts/build.py --resave        # the folders' config files in the current layout, cards again
    python hub_artifacts/build.py --resave hf_ratequant/pretrained/SmolLM2-135M-Instruct-kivi-2.5
    hf-ratequant push hub_artifacts/SmolLM2-135M-Instruct-ratequant-kivi-2.5 \
        <your-org>/SmolLM2-135M-Instruct-ratequant-kivi-2.5

The 8B runs need a GPU with about 24 GB (bf16 weights + calibration activations) and internet for the model and
WikiText-2; they cannot run on the CPU machine this project is built on.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "benchmarks"))
import real_models  # noqa: E402  (the packaged real models: `--model gemma3-270m`)

LICENSES = {"gemma3-270m": "gemma"}  # the base model's licence, which the card repeats (default apache-2.0)
ORG = "hf-ratequant"  # the Hub organisation the cards name in their usage snippet


def artifact_name(model_name: str, quantizer: str, budget: float) -> str:
    return f"{model_name.rsplit('/', 1)[-1]}-ratequant-{quantizer}-{budget:g}"


def evaluation_rows(model, windows, config, reference, chunk: int) -> list[dict]:
    """Held-out perplexity and KL of the full-precision cache, every fixed split of the budget and `config`."""
    from hf_ratequant import RateQuantConfig
    from hf_ratequant.allocation import fixed_allocations
    from hf_ratequant.evaluation import evaluate_quality

    fp = config.fingerprint
    n = fp.num_layers * fp.num_kv_heads
    caches = [("full precision (DynamicCache)", None)]
    for k, v in fixed_allocations(n, n, config.budget, config.b_min, config.b_max):
        name = f"uniform {k}-bit" if k == v else f"keys {k} / values {v} bits"
        caches.append((name, RateQuantConfig.uniform(model.config, key_bits=k, value_bits=v,
                                                     quantizer=config.quantizer, group_size=config.group_size,
                                                     residual_length=config.residual_length,
                                                     sink_length=config.sink_length)))
    caches.append((f"**this config** ({config.method})", config))
    rows = []
    for name, cfg in caches:
        res = evaluate_quality(model, windows, cfg, chunk=chunk, progress=False, reference=reference)
        rows.append(dict(cache=name, avg_bits=16.0 if cfg is None else cfg.average_bits,
                         perplexity=round(res.perplexity, 4), kl=round(res.kl or 0.0, 6), tokens=res.tokens))
        logging.info("%-40s ppl %.3f KL %.5f", name, res.perplexity, res.kl or 0.0)
    return rows


def base_name(model: str) -> str:
    """The Hub id the artifacts are named after: the embedded default's, a packaged model's checkpoint, or `model`."""
    if model == "smollm2":
        return "HuggingFaceTB/SmolLM2-135M-Instruct"
    if model in real_models.MODELS:
        return real_models.MODELS[model].label.split(" (", 1)[0]
    return model


def write_artifact(folder: str, config, evaluation: list[dict], repo_id: str, license: str = "apache-2.0") -> None:
    from hf_ratequant.hub import CARD_NAME, HEATMAP_NAME, model_card
    from hf_ratequant.plots import plot_allocation

    config.save_pretrained(folder)
    with open(os.path.join(folder, "evaluation.json"), "w", encoding="utf-8") as f:
        json.dump({"repo_id": repo_id, **({} if license == "apache-2.0" else {"license": license}),
                   "rows": evaluation}, f, indent=1)
        f.write("\n")
    with open(os.path.join(folder, CARD_NAME), "w", encoding="utf-8") as f:
        f.write(model_card(config, repo_id, license=license, evaluation=evaluation))
    plot_allocation(config, os.path.join(folder, HEATMAP_NAME))


def resave(folders: list[str]) -> None:
    """Load every config folder and save it again, in the file layout of this hf-ratequant, with its card written
    again from its `evaluation.json` (the card names the files). Nothing is calibrated or evaluated again."""
    from hf_ratequant import RateQuantConfig
    from hf_ratequant.hub import CARD_NAME, model_card

    for folder in folders:
        config = RateQuantConfig.from_pretrained(folder)
        config.save_pretrained(folder)  # the curves files the new JSON does not name are removed
        evaluation_path = os.path.join(folder, "evaluation.json")
        if os.path.isfile(evaluation_path):
            with open(evaluation_path, encoding="utf-8") as f:
                evaluation = json.load(f)
            with open(os.path.join(folder, CARD_NAME), "w", encoding="utf-8") as f:
                f.write(model_card(config, evaluation["repo_id"], license=evaluation.get("license", "apache-2.0"),
                                   evaluation=evaluation["rows"]))
        logging.info("%s saved again", folder)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="Hub id, model folder or GGUF file, 'smollm2' (the embedded "
                   f"default model) or a packaged model ({', '.join(real_models.MODELS)})")
    p.add_argument("--license", default=None, help="the licence the cards state (default: the base model's, "
                   "apache-2.0 unless listed in LICENSES)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device-map", default=None, help="e.g. 'auto' to place/shard the model with accelerate")
    p.add_argument("--quantizers", nargs="+", default=["kivi", "token", "rotated"])
    p.add_argument("--budgets", nargs="+", type=float, default=[2.5, 3.0])
    p.add_argument("--calib-data", default=None, help="default: WikiText-2 train (local text offline)")
    p.add_argument("--eval-data", default=None, help="default: WikiText-2 test (local text offline)")
    p.add_argument("--sink-length", type=int, default=None,
                   help="attention sinks of the calibrated configs (default: calibrate's, 32 tokens)")
    p.add_argument("--windows", type=int, default=4, help="held-out windows of --window tokens for the card")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--configs-from", help="folder of <quantizer>-<budget>/ configs to publish instead of calibrating "
                   "(e.g. benchmarks/results/ratequant_quality_configs_defaults, by ratequant_quality.py)")
    p.add_argument("--org", default=ORG, help="organisation named in the cards' usage snippet")
    p.add_argument("--out", default=HERE, help="parent folder of the artifact folders (default: hub_artifacts/)")
    p.add_argument("--resave", nargs="*", metavar="FOLDER",
                   help="only save these config folders again (default: every artifact folder in --out), see resave()")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args.resave is not None:
        resave(args.resave or sorted(os.path.join(args.out, name) for name in os.listdir(args.out)
                                     if os.path.isfile(os.path.join(args.out, name, "ratequant_config.json"))))
        return 0

    from hf_ratequant import RateQuantConfig, calibrate, load_model
    from hf_ratequant.evaluation import evaluation_windows, reference_logprobs

    path = real_models.prepare(args.model) if args.model in real_models.MODELS else args.model
    model, tokenizer = load_model(path, dtype=getattr(torch, args.dtype), device_map=args.device_map)
    if (label := real_models.label_of(path) if os.path.isdir(path) else None) is not None:
        model.config._name_or_path = label  # what the config's fingerprint and the card name
    windows = evaluation_windows(tokenizer, args.eval_data, window=args.window, max_windows=args.windows)
    reference = reference_logprobs(model, windows)
    base, license = base_name(args.model), args.license or LICENSES.get(args.model, "apache-2.0")
    for quantizer in args.quantizers:
        for budget in args.budgets:
            start = time.perf_counter()
            if args.configs_from:  # reuse configs calibrated by benchmarks/ratequant_quality.py
                config = RateQuantConfig.from_pretrained(os.path.join(args.configs_from, f"{quantizer}-{budget:g}"))
            else:
                config = calibrate(model, tokenizer, args.calib_data, quantizer=quantizer, budget=budget,
                                   sink_length=args.sink_length)
            rows = evaluation_rows(model, windows, config, reference, args.chunk)
            name = artifact_name(base, quantizer, budget)
            write_artifact(os.path.join(args.out, name), config, rows, f"{args.org}/{name}", license)
            logging.info("%s: %s won, %.0f s", name, config.method, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
