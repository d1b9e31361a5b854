"""The `hf-ratequant` command: thin argparse subcommands over the library functions."""

from __future__ import annotations

import argparse
import logging
import time

import torch

from .models import DEFAULT_MODEL, default_config_path
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

    uniform_only = {"--quantizer": args.quantizer, "--group-size": args.group_size,
                    "--residual-length": args.residual_length}
    config_path = args.config
    if config_path is None and args.bits is None:
        if args.model != DEFAULT_MODEL:
            raise ValueError(f"No calibrated config ships for {args.model!r}: pass --config (a folder made with "
                             "`hf-ratequant calibrate`, or a Hub repo id) or --bits for a uniform cache.")
        config_path = default_config_path()  # the shipped calibration of the embedded model
    if config_path is not None:
        given = [flag for flag, value in uniform_only.items() if value is not None]
        if args.bits is not None or given:
            raise ValueError(f"{' and '.join((['--bits'] if args.bits is not None else []) + given)} only apply "
                             f"to a uniform cache, not to the calibrated config {config_path!r}: drop them, or "
                             "pass --bits for a uniform cache.")
    model, tokenizer = load_model(args.model)
    if config_path is not None:
        cache_config = _saved_config(config_path, args.sink_length)
        kind = f"calibrated per head ({cache_config.method})"
    else:
        cache_config = RateQuantConfig.uniform(
            model.config, bits=args.bits, quantizer=args.quantizer or "kivi", group_size=args.group_size or 32,
            residual_length=args.residual_length or 128, sink_length=args.sink_length,
        )
        kind = "uniform"
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
    print(f"cache: {cache_config.quantizer}, {cache_config.average_bits:g} average bits, {kind} "
          f"(G={cache_config.group_size}, R={cache_config.residual_length}, S={cache_config.sink_length})")
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


def _parse_cache_spec(spec: str, model, sink_length: int = 0):
    """`none`/`fp16`, `uniform:BITS`, `kv:KBITS,VBITS` (with `sink_length` sink tokens), or a saved config folder."""
    from .config import RateQuantConfig

    if spec in ("none", "full", "fp16", "dynamic"):
        return None
    if spec.startswith("uniform:"):
        return RateQuantConfig.uniform(model.config, bits=_int_bits(spec, spec[8:]), sink_length=sink_length)
    if spec.startswith("kv:"):
        parts = spec[3:].split(",")
        if len(parts) != 2:
            raise ValueError(f"Cache spec {spec!r}: write kv:KBITS,VBITS, e.g. kv:3,2.")
        return RateQuantConfig.uniform(model.config, key_bits=_int_bits(spec, parts[0]),
                                       value_bits=_int_bits(spec, parts[1]), sink_length=sink_length)
    import os

    from .hub import looks_local

    if os.path.isdir(spec) or (":" not in spec and not looks_local(spec) and "/" in spec):
        return _saved_config(spec, sink_length)  # a saved folder or a Hub repo id
    if ":" not in spec and looks_local(spec):
        raise FileNotFoundError(f"Cache spec {spec!r}: no such folder. Pass a folder saved with "
                                "RateQuantConfig.save_pretrained, a Hub repo id ('user/name'), 'none', "
                                "'uniform:BITS' or 'kv:KBITS,VBITS'.")
    raise ValueError(
        f"Unknown cache spec {spec!r}: accepted are 'none' (full precision), 'uniform:BITS', 'kv:KBITS,VBITS', a "
        "folder saved with RateQuantConfig.save_pretrained, or a Hub repo id ('user/name')."
    )


def _saved_config(spec: str, sink_length: int):
    """A saved config; `--sink-length` cannot change it (its allocation was calibrated with its own sinks)."""
    from .config import RateQuantConfig

    config = RateQuantConfig.from_pretrained(spec)
    if sink_length and sink_length != config.sink_length:
        raise ValueError(
            f"--sink-length {sink_length} does not apply to the saved config {spec!r}, which keeps "
            f"{config.sink_length} sink tokens (its allocation was calibrated with them): drop --sink-length, or "
            f"calibrate a config with `hf-ratequant calibrate --sink-length {sink_length}`."
        )
    return config


def _int_bits(spec: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"Cache spec {spec!r}: {text!r} is not an integer bit-width (1..8 or 16).") from None


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Calibrate, print the validation table, save the config (nothing is written if anything fails)."""
    from .calibration import calibrate
    from .models import load_model

    model, tokenizer = load_model(args.model)
    config = calibrate(
        model, tokenizer, args.data, quantizer=args.quantizer, budget=args.budget, n_samples=args.samples,
        seq_len=args.seq_len, n_validation=args.validation, group_size=args.group_size,
        residual_length=args.residual_length, sink_length=args.sink_length, b_min=args.b_min, b_max=args.b_max,
        data_column=args.data_column, measure=args.measure,
    )
    from .distributed import Processes

    if not Processes().is_main:  # under `accelerate launch`: every process holds the same config; one writes it
        return 0
    info = config.calibration
    print(f"{'candidate':<22}{'validation KL':>14}")
    for name, kl in sorted(info["validation_kl"].items(), key=lambda kv: kv[1]):
        print(f"{name:<22}{kl:>14.5f}{'  <- chosen' if name == info['winner'] else ''}")
    print(f"beta median: keys {info['beta_median']['key']:.2f}, values {info['beta_median']['value']:.2f}; "
          f"fit R^2 median {info['fit_r2_median']:.3f}; {info['seconds']['total']:.1f} s")
    config.save_pretrained(args.output)
    print(f"saved to {args.output}")
    if args.push_to_hub:
        from .hub import push_folder

        info = push_folder(args.output, args.push_to_hub, private=args.private or None)
        print(f"pushed to {info.commit_url if hasattr(info, 'commit_url') else args.push_to_hub}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    """Push a saved config folder (with a generated model card and heatmap unless it has its own)."""
    from .hub import push_folder

    info = push_folder(args.folder, args.repo_id, private=args.private or None, revision=args.revision,
                       commit_message=args.message)
    print(f"pushed {args.folder} to {args.repo_id}: {getattr(info, 'commit_url', '')}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Perplexity, KL and (with --passkey) passkey retrieval of several caches on the same text."""
    import json

    from .evaluation import evaluate_quality, evaluation_windows
    from .models import load_model
    from .passkey import passkey_trials, run_passkey

    model, tokenizer = load_model(args.model)
    # bad specs fail before any work
    configs = {spec: _parse_cache_spec(spec, model, args.sink_length) for spec in args.cache}
    trials = (passkey_trials(tokenizer, args.passkey, args.passkey_depths,
                             max_positions=getattr(model.config, "max_position_embeddings", None))
              if args.passkey else [])
    windows = evaluation_windows(tokenizer, args.data, window=args.window, max_windows=args.windows)
    rows = []
    for spec, cfg in configs.items():
        res = evaluate_quality(model, windows, cfg, chunk=args.chunk)
        bits = cfg.average_bits if cfg is not None else 16.0
        rows.append({"cache": spec, "avg_bits": bits, "perplexity": res.perplexity, "kl": res.kl,
                     "tokens": res.tokens})
    if trials:
        for row, res in zip(rows, run_passkey(model, tokenizer, trials, configs).values()):
            row.update(passkey=res.accuracy, passkey_by_length=res.by_length, passkey_trials=res.records)
    header = f"{'cache':<30}{'avg bits':>9}{'perplexity':>12}{'KL':>10}" + (f"{'passkey':>9}" if trials else "")
    print(header)
    for r in rows:
        line = f"{r['cache']:<30}{r['avg_bits']:>9.3g}{r['perplexity']:>12.3f}{r['kl']:>10.5f}"
        print(line + (f"{r['passkey']:>9.0%}" if trials else ""))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
    return 0


def cmd_lm_eval(args: argparse.Namespace) -> int:
    """lm-evaluation-harness tasks scored through each cache (see `hf_ratequant.harness`), one table row per cache,
    task and metric, with the bytes the caches held and the wall time."""
    import json

    from .harness import RateQuantLM, evaluate, load_tasks  # needs lm-eval: an ImportError says what to install
    from .models import load_model

    specs = args.cache
    if not specs:
        if args.model != DEFAULT_MODEL:
            raise ValueError(f"Pass --cache for {args.model!r} (e.g. --cache none kv:3,2 path/to/config): no "
                             "calibrated config ships for it.")
        specs = ["none", default_config_path()]
    model, tokenizer = load_model(args.model)
    for spec in specs:  # bad specs fail before any work
        _parse_cache_spec(spec, model, args.sink_length)
    manager, objects = load_tasks(args.tasks, args.include_path)
    lm = RateQuantLM(pretrained=model, tokenizer=tokenizer, cache=None, chunk=args.chunk, batch_size=args.batch_size,
                     max_length=args.max_length, device=str(model.device))
    rows = []
    for spec in specs:
        for task in objects:
            start = time.perf_counter()
            res = evaluate(model, tokenizer, [], spec, loaded=(manager, [task]), lm=lm, batch_size=args.batch_size,
                           limit=args.limit, num_fewshot=args.num_fewshot, chunk=args.chunk,
                           sink_length=args.sink_length, bootstrap_iters=args.bootstrap_iters,
                           gen_kwargs=args.gen_kwargs, apply_chat_template=args.apply_chat_template)
            seconds = time.perf_counter() - start
            info, stats = res["ratequant"], res["ratequant"]["stats"]
            for task_name, metrics in res["results"].items():
                for key, value in metrics.items():
                    metric, _, flt = key.partition(",")
                    if metric == "alias" or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                        continue
                    stderr = metrics.get(f"{metric}_stderr,{flt}")
                    rows.append({
                        "cache": spec, "avg_bits": info["average_bits"], "task": task_name, "metric": metric,
                        "filter": flt, "value": value, "stderr": stderr if isinstance(stderr, (int, float)) else None,
                        "samples": res.get("n-samples", {}).get(task_name, {}).get("effective"),
                        "bytes_per_row": stats["mean_bytes_per_row"], "vs_16bit": stats["vs_16bit"],
                        "quantized_read_share": stats["quantized_read_share"], "seconds": seconds,
                    })
    print(f"{'cache':<28}{'bits':>6}  {'task':<20}{'metric':<18}{'value':>9}{'stderr':>9}"
          f"{'KiB/row':>10}{'vs 16-bit':>10}{'s':>8}")
    for r in rows:
        cache = r["cache"] if len(r["cache"]) <= 27 else "..." + r["cache"][-24:]
        stderr = f"{r['stderr']:>9.4f}" if r["stderr"] is not None else f"{'':>9}"
        ratio = f"{r['vs_16bit']:>10.3f}" if r["vs_16bit"] is not None else f"{'':>10}"
        print(f"{cache:<28}{r['avg_bits']:>6.3g}  {r['task']:<20}{r['metric']:<18}{r['value']:>9.4f}{stderr}"
              f"{r['bytes_per_row'] / 1024:>10.1f}{ratio}{r['seconds']:>8.1f}")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    """Fit every quantizer's curves on one model, print the beta table, allocate for each design with every
    design's curves, evaluate on held-out text, write the tables and PNG plots."""
    import json
    import os

    from .analysis import beta_table, fit_quantizer_curves, mismatch_study
    from .config import ModelFingerprint, RateQuantConfig
    from .evaluation import evaluation_windows
    from .models import load_model
    from .plots import plot_allocation, plot_distortion_curves

    model, tokenizer = load_model(args.model)
    quantizers = args.quantizers or available_quantizers()
    curves = fit_quantizer_curves(
        model, tokenizer, args.data, quantizers, n_samples=args.samples, seq_len=args.seq_len,
        group_size=args.group_size, residual_length=args.residual_length, b_min=args.b_min, b_max=args.b_max,
    )
    betas = beta_table(curves)
    print(f"\n{'quantizer':<11}{'kind':<7}{'beta median':>12}{'beta range':>16}{'fit R^2':>9}")
    for r in betas:
        print(f"{r['quantizer']:<11}{r['kind']:<7}{r['beta_median']:>12.2f}"
              f"{r['beta_min']:>8.2f} - {r['beta_max']:<5.2f}{r['r2_median']:>9.3f}")
    os.makedirs(args.output_dir, exist_ok=True)
    written = [plot_distortion_curves(curves, os.path.join(args.output_dir, "distortion_curves.png"))]
    fp = ModelFingerprint.from_model_config(model.config)
    for name, c in curves.items():
        bits = c.allocation(args.budget)
        cfg = RateQuantConfig(key_bits=bits[..., 0].tolist(), value_bits=bits[..., 1].tolist(), quantizer=name,
                              group_size=args.group_size, residual_length=args.residual_length, budget=args.budget,
                              method="ratequant", fingerprint=fp)
        written.append(plot_allocation(cfg, os.path.join(args.output_dir, f"allocation_{name}.png")))

    rows = []
    if args.windows > 0:
        windows = evaluation_windows(tokenizer, args.eval_data, window=args.window, max_windows=args.windows)
        rows = mismatch_study(model, windows, curves, args.budget, group_size=args.group_size,
                              residual_length=args.residual_length, chunk=args.chunk)
        print(f"\n{args.budget:g} average bits, {windows.numel()} held-out tokens, through each real cache")
        print(f"{'quantizer':<11}{'allocation':<20}{'perplexity':>11}{'KL':>10}{'key bits':>9}{'units moved':>12}"
              f"{'rank corr':>10}")
        for r in rows:
            corr = "" if r["rank_agreement"] is None else f"{r['rank_agreement']:.2f}"
            print(f"{r['quantizer']:<11}{r['allocation']:<20}{r['perplexity']:>11.3f}{r['kl']:>10.5f}"
                  f"{r['key_bits']:>9.2f}{r['units_changed']:>12}{corr:>10}")
    path = os.path.join(args.output_dir, "analysis.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"model": fp.describe(), "budget": args.budget, "betas": betas, "mismatch": rows}, f, indent=1)
    print("\nwrote " + ", ".join(written + [path]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-ratequant", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="generate with a RateQuantCache and compare bytes and speed")
    demo.add_argument("--model", default=DEFAULT_MODEL, help="Hub id, local folder, or 'smollm2' (embedded)")
    demo.add_argument("--config", help="a saved RateQuantConfig folder or Hub repo id (default, for the embedded "
                      "model: the calibrated kivi 2.5-bit config shipped with the package)")
    demo.add_argument("--bits", type=int, default=None, choices=ALLOWED_BITS,
                      help="a uniform cache of these bits instead of a calibrated config")
    demo.add_argument("--quantizer", default=None, choices=available_quantizers(),
                      help="quantizer of the uniform cache (default kivi)")
    demo.add_argument("--group-size", type=int, default=None, help="G of the uniform cache (default 32)")
    demo.add_argument("--residual-length", type=int, default=None, help="R of the uniform cache (default 128)")
    demo.add_argument("--sink-length", type=int, default=0,
                      help="first tokens kept in full precision (attention sinks; a multiple of G, e.g. 32)")
    demo.add_argument("--context-tokens", type=int, default=1024)
    demo.add_argument("--max-new-tokens", type=int, default=48)
    demo.set_defaults(func=cmd_demo)

    cal = sub.add_parser("calibrate", help="calibrate a RateQuant allocation and save it")
    cal.add_argument("--model", default=DEFAULT_MODEL)
    cal.add_argument("--data", default=None, help="datasets name[:config], text file (default: WikiText-2 train)")
    cal.add_argument("--data-column", default=None, help="text column of a datasets dataset (default: text)")
    cal.add_argument("--quantizer", default="kivi", choices=available_quantizers())
    cal.add_argument("--budget", type=float, default=2.5, help="average bits over all units")
    cal.add_argument("--samples", type=int, default=16, help="calibration windows for the fit")
    cal.add_argument("--validation", type=int, default=8, help="held-back windows to validate candidates on")
    cal.add_argument("--seq-len", type=int, default=512)
    cal.add_argument("--group-size", type=int, default=32)
    cal.add_argument("--residual-length", type=int, default=128)
    cal.add_argument("--sink-length", type=int, default=None,
                     help="first tokens kept in full precision (attention sinks; a multiple of G; default: 32, in "
                     "whole groups; 0 for none)")
    cal.add_argument("--b-min", type=int, default=1)
    cal.add_argument("--b-max", type=int, default=6)
    cal.add_argument("--measure", choices=["output", "state"], default="output",
                     help="what a unit's error is weighed on: the attention output (default) or the states")
    cal.add_argument("--output", "-o", required=True, help="folder to save the config to")
    cal.add_argument("--push-to-hub", metavar="REPO", help="also push the saved config to this Hub repo")
    cal.add_argument("--private", action="store_true", help="create the Hub repo private")
    cal.set_defaults(func=cmd_calibrate)

    push = sub.add_parser("push", help="push a saved config folder to the Hub with a model card")
    push.add_argument("folder", help="a folder saved with RateQuantConfig.save_pretrained")
    push.add_argument("repo_id", help="Hub repo id, e.g. me/smollm2-ratequant-kivi-2.5")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--revision", help="branch to push to (default: main)")
    push.add_argument("--message", help="commit message")
    push.set_defaults(func=cmd_push)

    ev = sub.add_parser("eval", help="perplexity and KL of caches through the real cache")
    ev.add_argument("--model", default=DEFAULT_MODEL)
    ev.add_argument("--cache", nargs="+", default=["none", "uniform:4", "uniform:3", "kv:3,2"],
                    help="'none', 'uniform:BITS', 'kv:KBITS,VBITS' or a config folder")
    ev.add_argument("--data", default=None, help="datasets name, text file (default: WikiText-2 test)")
    ev.add_argument("--window", type=int, default=1024)
    ev.add_argument("--windows", type=int, default=8)
    ev.add_argument("--chunk", type=int, default=64)
    ev.add_argument("--sink-length", type=int, default=0, help="sink tokens of the 'uniform:' and 'kv:' caches "
                    "(first tokens kept in full precision; a multiple of 32)")
    ev.add_argument("--passkey", type=int, nargs="+", metavar="TOKENS",
                    help="also score passkey retrieval at these context lengths, e.g. 1024 2048 4096 6144")
    ev.add_argument("--passkey-depths", type=float, nargs="+", default=[0.1, 0.5, 0.9],
                    help="where the key sits in the filler, as fractions (default 0.1 0.5 0.9)")
    ev.add_argument("--json", help="also write the rows as JSON to this path")
    ev.set_defaults(func=cmd_eval)

    le = sub.add_parser("lm-eval", help="lm-evaluation-harness tasks scored through each cache (needs lm-eval)")
    le.add_argument("--model", default=DEFAULT_MODEL)
    le.add_argument("--tasks", nargs="+", required=True,
                    help="lm-eval task names, task YAML files, or tasks found under --include-path")
    le.add_argument("--include-path", default=None, help="a folder of task YAMLs (local tasks; offline, tasks must "
                    "read local files: dataset_path: json with dataset_kwargs.data_files)")
    le.add_argument("--cache", nargs="+", default=None, help="'none', 'uniform:BITS', 'kv:KBITS,VBITS', a config "
                    "folder or Hub repo id (default, for the embedded model: none and the shipped kivi 2.5 config)")
    le.add_argument("--sink-length", type=int, default=0, help="sink tokens of the 'uniform:' and 'kv:' caches "
                    "(first tokens kept in full precision; a multiple of 32)")
    le.add_argument("--batch-size", type=int, default=1)
    le.add_argument("--chunk", type=int, default=64, help="tokens per forward pass when scoring loglikelihoods")
    le.add_argument("--limit", type=float, default=None, help="examples per task (a fraction if below 1)")
    le.add_argument("--num-fewshot", type=int, default=None)
    le.add_argument("--max-length", type=int, default=None, help="context limit in tokens (default: the model's)")
    le.add_argument("--gen-kwargs", default=None, help="generation arguments for generate_until tasks, as lm-eval "
                    "takes them, e.g. 'max_gen_toks=32'")
    le.add_argument("--apply-chat-template", action="store_true")
    le.add_argument("--bootstrap-iters", type=int, default=1000, help="for the stderr of non-mean metrics")
    le.add_argument("--output", "-o", help="also write the rows as JSON to this path")
    le.set_defaults(func=cmd_lm_eval)

    an = sub.add_parser("analyze", help="fit every quantizer's curves; show what the wrong curves cost")
    an.add_argument("--model", default=DEFAULT_MODEL)
    an.add_argument("--quantizers", nargs="+", choices=available_quantizers(), help="default: all registered")
    an.add_argument("--budget", type=float, default=2.5)
    an.add_argument("--data", default=None, help="calibration text (default: WikiText-2 train)")
    an.add_argument("--eval-data", default=None, help="held-out text (default: WikiText-2 test)")
    an.add_argument("--samples", type=int, default=8)
    an.add_argument("--seq-len", type=int, default=512)
    an.add_argument("--window", type=int, default=1024)
    an.add_argument("--windows", type=int, default=4, help="held-out windows (0: curves and plots only)")
    an.add_argument("--chunk", type=int, default=64)
    an.add_argument("--group-size", type=int, default=32)
    an.add_argument("--residual-length", type=int, default=128)
    an.add_argument("--b-min", type=int, default=2)
    an.add_argument("--b-max", type=int, default=6)
    an.add_argument("--output-dir", "-o", default="ratequant-analysis", help="where the JSON and PNGs go")
    an.set_defaults(func=cmd_analyze)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError, OSError) as e:
        parser.exit(2, f"hf-ratequant {args.command}: error: {e}\n")
