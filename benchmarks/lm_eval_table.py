"""lm-evaluation-harness on the default model, through each cache: two local long-context tasks, one table.

Two tasks in lm-eval's own format (a YAML file reading a local JSON-lines file, `dataset_path: json`), written by
this script into `--task-dir` (nothing is downloaded):

- `passkey_local` (generate_until, exact match of the first number generated): a five-digit pass key hidden at a
  depth of 1-3k tokens of filler (`hf_ratequant.passkey`'s haystacks), asked for at the end. lm-eval generates the
  answer with `generate(past_key_values=<fresh cache>)`: the prompt is prefilled in one pass, every answer token
  reads the key from the quantized past.
- `pydoc_recall` (multiple_choice, accuracy): a passage of ~0.7-1.2k tokens of Python's own documentation
  (`pydoc_data.topics`, the held-out half), then "Here is a sentence copied from the text above:" and the first
  words of a sentence from the first 40% of the passage (hundreds of tokens before the end, far outside the
  full-precision window); the choices are the next words of that sentence and of three other sentences of the same
  passage. Scored by `RateQuantLM`: context and choice fed in chunks through the cache (the choices of a question
  share the context, fed once).

Caches: full precision (a `DynamicCache` fed the same way), fixed K3V2 (`kv:3,2`), and the calibrated RateQuant kivi
configs of the default model at 2.5 bits (shipped, `default_config_path()`) and 3 bits (`hub_artifacts/`); every
RateQuant cache with the shipped config's sinks, window and groups (S = 32, R = 128, G = 32). Reported per task and
cache: the metric with its standard error, how many examples changed their answer against full precision, the mean
bytes the cache held per sequence at its end (and against a 16-bit cache of the same tokens), the share of scored
tokens that attended to a quantized past, and the wall time.

    python benchmarks/lm_eval_table.py                      # 23 min recorded on 2 shared CPU cores
    python benchmarks/lm_eval_table.py --recall 4 --passkey-lengths 512 --depths 2 --tag smoke   # a quick check
"""

from __future__ import annotations

import os

# The CPU is shared: OpenMP threads that busy-wait (libgomp's default) made single runs up to 10x slower whenever
# another job ran, so they sleep instead (set before torch, and the CPU kernel's OpenMP, start).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's progress bars

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from _common import EVALUATION, RESULTS_DIR, machine, write_results  # noqa: E402

from hf_ratequant import RateQuantCache, RateQuantConfig, default_config_path, load_default_model  # noqa: E402
from hf_ratequant.cache_spec import parse_cache_spec  # noqa: E402
from hf_ratequant.data import local_text  # noqa: E402
from hf_ratequant.models import cache_kwargs  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
THREE_BIT = os.path.join(HERE, "..", "hub_artifacts", "SmolLM2-135M-Instruct-ratequant-kivi-3")
RECALL_PROMPT = "\n\nHere is a sentence copied from the text above:\n"
PREFIX_WORDS, CHOICE_WORDS = 6, 8

logger = logging.getLogger("benchmarks.lm_eval_table")


# ---- the local tasks ------------------------------------------------------------------------------------------------
def passkey_docs(tokenizer, lengths, n_depths: int, seed: int) -> list[dict]:
    from hf_ratequant.passkey import QUESTION, passkey_trials

    depths = [round((i + 0.5) / n_depths, 3) for i in range(n_depths)]
    trials = passkey_trials(tokenizer, lengths, depths, seed=seed)
    return [{"context": tokenizer.decode(t.context_ids[0], skip_special_tokens=True) + QUESTION,
             "answer": t.passkey, "length": t.length, "depth": t.depth} for t in trials]


def recall_docs(tokenizer, n: int, base: int, step: int, seed: int) -> list[dict]:
    """`n` questions over consecutive passages of the held-out docs, question q's passage `base + step * q` tokens
    (distinct lengths keep each question's choices together in lm-eval's length-sorted batches)."""
    rng = random.Random(seed)
    # whitespace collapsed, so that the words to be copied are exactly those of the passage
    ids = tokenizer(" ".join(local_text("test").split()), add_special_tokens=False).input_ids
    docs, pos, q = [], 0, 0
    while len(docs) < n:
        length = base + step * q
        if pos + length > len(ids):
            raise SystemExit(f"The held-out docs hold only {len(docs)} passages of these lengths: lower --recall.")
        passage = tokenizer.decode(ids[pos : pos + length]).strip()
        pos += length
        spans = [(m.start(), m.group().split()) for m in re.finditer(r"[^.!?]+[.!?]?", passage)]
        sentences = [(start, w) for start, w in spans if len(w) >= PREFIX_WORDS + CHOICE_WORDS]
        cut = slice(PREFIX_WORDS, PREFIX_WORDS + CHOICE_WORDS)
        # choices of ordinary words (not a long identifier or code run): at most 2 tokens a word
        sentences = [(start, w) for start, w in sentences
                     if len(tokenizer(" " + " ".join(w[cut]), add_special_tokens=False).input_ids) <= 2 * CHOICE_WORDS]
        early = [w for start, w in sentences if start < 0.4 * len(passage)]
        if not early or len(sentences) < 4:
            continue
        target = rng.choice(early)
        others = [w for _, w in sentences if w[:PREFIX_WORDS] != target[:PREFIX_WORDS] and w[cut] != target[cut]]
        if len(others) < 3:
            continue
        choices = [" ".join(w[cut]) for w in [target] + rng.sample(others, 3)]
        if len(set(choices)) < 4:
            continue
        order = list(range(4))
        rng.shuffle(order)
        docs.append({"context": passage + RECALL_PROMPT + " ".join(target[:PREFIX_WORDS]),
                     "choices": [choices[i] for i in order], "label": order.index(0), "tokens": length})
        q += 1
    return docs


def write_tasks(folder: str, passkey: list[dict], recall: list[dict]) -> None:
    os.makedirs(folder, exist_ok=True)
    tasks = {
        "passkey_local": (passkey, [
            "output_type: generate_until", "doc_to_text: '{{context}}'", "doc_to_target: '{{answer}}'",
            "generation_kwargs:\n  until: ['\\n', '.']\n  max_gen_toks: 8\n  do_sample: false",
            "filter_list:\n  - name: first-number\n    filter:\n      - function: regex\n"
            "        regex_pattern: '(\\d+)'\n      - function: take_first",
            "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true",
        ]),
        "pydoc_recall": (recall, [
            "output_type: multiple_choice", "doc_to_text: '{{context}}'", "doc_to_choice: '{{choices}}'",
            "doc_to_target: label",
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true",
        ]),
    }
    for name, (docs, body) in tasks.items():
        data = os.path.join(folder, f"{name}.jsonl")
        with open(data, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(d) + "\n" for d in docs)
        head = [f"task: {name}", "dataset_path: json", f"dataset_kwargs:\n  data_files:\n    test: {data}",
                "test_split: test"]
        with open(os.path.join(folder, f"{name}.yaml"), "w", encoding="utf-8") as f:
            f.write("\n".join(head + body) + "\n")


# ---- per-example answers, to count the ones a cache changed ------------------------------------------------------
def answers(samples: list[dict], task: str) -> dict[int, tuple]:
    out = {}
    for s in samples:
        if task == "pydoc_recall":
            lls = [float(r[0]) for r in s["filtered_resps"]]
            out[s["doc_id"]] = (max(range(len(lls)), key=lls.__getitem__), lls[s["target"]])
        else:
            resp = s["filtered_resps"]
            out[s["doc_id"]] = (resp[0] if isinstance(resp, list) else resp, None)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--passkey-lengths", type=int, nargs="+", default=[1024, 1536, 2048, 3072])
    p.add_argument("--depths", type=int, default=5, help="key depths per length, evenly spread")
    p.add_argument("--recall", type=int, default=20, help="pydoc_recall questions")
    p.add_argument("--recall-base", type=int, default=700, help="tokens of the first passage")
    p.add_argument("--recall-step", type=int, default=24, help="extra tokens per further passage")
    p.add_argument("--batch-size", type=int, default=4, help="4: the choices of a question in one batch")
    p.add_argument("--chunk", type=int, default=EVALUATION.chunk, help="tokens per forward pass through the cache "
                   f"(default {EVALUATION.chunk})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task-dir", default=None, help="where the task YAML/JSON go (default: a temporary folder)")
    p.add_argument("--tag", default=None, help="suffix of the result files")
    p.add_argument("--output-dir", default=RESULTS_DIR)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("lm_eval", "lm-eval", "lm_eval.models.huggingface", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    from hf_ratequant.harness import LM_EVAL_VERSION, RateQuantLM, evaluate, load_tasks

    info = machine("cpu", packages=("lm_eval", "datasets"))
    t0 = time.perf_counter()
    model, tokenizer = load_default_model()
    load_s = time.perf_counter() - t0
    shipped = RateQuantConfig.from_pretrained(default_config_path())
    three = RateQuantConfig.from_pretrained(THREE_BIT)
    k3v2 = parse_cache_spec("kv:3,2").build(model.config, shipped.layout)  # the shipped config's S, R, G
    caches = [("full precision", "none", None), ("fixed K3V2", "kv:3,2", k3v2),
              ("RateQuant 2.5", "shipped kivi-2.5", shipped), ("RateQuant 3", "hub_artifacts kivi-3", three)]
    window = {(c.sink_length, c.residual_length, c.group_size) for _, _, c in caches if c is not None}
    assert len(window) == 1, f"caches with different sinks/windows/groups: {window}"

    with torch.inference_mode():  # warm-up: the CPU kernel is compiled (or loaded) on first use
        for _, _, cfg in caches[1:]:
            cache = RateQuantCache(config=model.config, quant_config=cfg)
            for start in range(0, 512, args.chunk):
                model(input_ids=torch.arange(start, start + args.chunk)[None] + 1000, **cache_kwargs(model, cache))
    folder = args.task_dir or tempfile.mkdtemp(prefix="lm_eval_tasks_")
    passkey = passkey_docs(tokenizer, args.passkey_lengths, args.depths, args.seed)
    recall = recall_docs(tokenizer, args.recall, args.recall_base, args.recall_step, args.seed)
    write_tasks(folder, passkey, recall)
    manager, objects = load_tasks(["passkey_local", "pydoc_recall"], folder)
    lm = RateQuantLM(pretrained=model, tokenizer=tokenizer, cache=None, chunk=args.chunk, batch_size=args.batch_size,
                     device="cpu")
    rows, per_example = [], {}
    for label, spec, cfg in caches:
        for task in objects:
            name = task.config.task
            start = time.perf_counter()
            res = evaluate(model, tokenizer, [], cfg, loaded=(manager, [task]), lm=lm, batch_size=args.batch_size,
                           chunk=args.chunk, bootstrap_iters=1000, log_samples=True, random_seed=args.seed)
            seconds = time.perf_counter() - start
            metric = "acc,none" if name == "pydoc_recall" else "exact_match,first-number"
            stats = res["ratequant"]["stats"]
            per_example[(label, name)] = answers(res["samples"][name], name)
            rows.append({
                "cache": label, "spec": spec, "avg_bits": res["ratequant"]["average_bits"], "task": name,
                "metric": metric.split(",")[0], "value": res["results"][name][metric],
                "stderr": res["results"][name].get(metric.replace(",", "_stderr,")),
                "n": len(res["samples"][name]), "bytes_per_row": stats["mean_bytes_per_row"],
                "vs_16bit": stats["vs_16bit"], "quantized_read_share": stats["quantized_read_share"],
                "generated_rows_quantized": stats["generated_rows_quantized"], "seconds": seconds,
                "forward_seconds": stats["seconds"], "shared_prefix_tokens": stats["shared_prefix_tokens"],
                "tokens": stats["tokens"],
            })
            logger.info("%s %s: %s = %.3f (%.0f s)", label, name, metric, rows[-1]["value"], seconds)
    for r in rows:
        ref, mine = per_example[("full precision", r["task"])], per_example[(r["cache"], r["task"])]
        r["changed_vs_full"] = sum(mine[d][0] != ref[d][0] for d in ref)
        if r["task"] == "pydoc_recall":
            r["mean_abs_dlogp_gold"] = sum(abs(mine[d][1] - ref[d][1]) for d in ref) / len(ref)

    stem = "lm_eval_table" + (f"_{args.tag}" if args.tag else "")
    s, r_, g = window.pop()
    meta = {
        "machine": info, "lm_eval": LM_EVAL_VERSION, "model": model.config._name_or_path, "dtype": str(model.dtype),
        "model_load_s": load_s, "total_s": time.perf_counter() - t0, "batch_size": args.batch_size,
        "chunk": args.chunk, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "sink_length": s,
        "residual_length": r_, "group_size": g, "seed": args.seed,
        "passkey": {"lengths": args.passkey_lengths, "depths": args.depths, "n": len(passkey)},
        "pydoc_recall": {"n": len(recall), "passage_tokens": [d["tokens"] for d in recall],
                         "prefix_words": PREFIX_WORDS, "choice_words": CHOICE_WORDS},
        "command": " ".join(["python", "benchmarks/lm_eval_table.py"] + (argv if argv is not None else sys.argv[1:])),
    }
    md = render(meta, rows)
    # the machine is recorded in meta (make_results and render read it there)
    write_results(stem, {"meta": meta, "rows": rows}, md, args.output_dir, add_machine=False)
    print(md)
    return 0


def render(meta: dict, rows: list[dict]) -> str:
    m = meta["machine"]
    lines = [
        "# lm-evaluation-harness through the cache: two local long-context tasks",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), shared; torch {m['torch']}, "
        f"transformers {m['transformers']}, lm-eval {meta['lm_eval']}; load average at the start "
        f"{m['load_average_start']}; OMP_WAIT_POLICY={meta['omp_wait_policy']}. Model {meta['model']} in "
        f"{meta['dtype'].replace('torch.', '')}. "
        f"Command: `{meta['command']}` ({meta['total_s'] / 60:.1f} min in all).",
        "",
        f"Every RateQuant cache: kivi, S = {meta['sink_length']} sink tokens, R = {meta['residual_length']}, "
        f"G = {meta['group_size']}. `passkey_local`: generate_until, {meta['passkey']['n']} haystacks of "
        f"{', '.join(map(str, meta['passkey']['lengths']))} tokens x {meta['passkey']['depths']} depths; the answer "
        "is generated with `generate(past_key_values=<fresh cache>)` and scored by exact match of its first number. "
        f"`pydoc_recall`: multiple_choice (4 choices), {meta['pydoc_recall']['n']} passages of "
        f"{min(meta['pydoc_recall']['passage_tokens'])}-{max(meta['pydoc_recall']['passage_tokens'])} tokens of the "
        "held-out Python docs, the first words of a sentence from the passage's first 40% to be continued; context "
        f"and choice fed in chunks of {meta['chunk']} tokens through the cache (batch size {meta['batch_size']}, the "
        "choices of a question share their context).",
        "",
        "'changed' counts the examples whose answer differs from full precision's (the chosen option, or the number "
        "generated); 'KiB/seq' is what one sequence's cache held at its end (mean; a loglikelihood batch holds its "
        "longest row), 'vs 16-bit' against a 16-bit DynamicCache of the same tokens (the full-precision cache holds "
        "float32, the model's dtype, hence 2.0); 'read quantized' the share of scored tokens (loglikelihood) or "
        "of generations that attended to a quantized past; 's' the wall time of the task.",
        "",
        "| task | cache | bits | metric | value | stderr | changed | KiB/seq | vs 16-bit | read quantized | s |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: r["task"]):
        if r["task"] == "pydoc_recall":
            read = f"{r['quantized_read_share']:.0%}" if r["quantized_read_share"] is not None else ""
        else:
            read = f"{r['generated_rows_quantized']}/{r['n']}"
        read = read if r["avg_bits"] < 16 else "-"
        extra = f" (mean abs. d logp gold {r['mean_abs_dlogp_gold']:.3f})" if r.get("mean_abs_dlogp_gold") else ""
        lines.append(
            f"| {r['task']} | {r['cache']} | {r['avg_bits']:g} | {r['metric']} | {r['value']:.3f} | "
            f"{r['stderr']:.3f} | {r['changed_vs_full']}/{r['n']}{extra} | {r['bytes_per_row'] / 1024:,.0f} | "
            f"{r['vs_16bit']:.3f} | {read} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    torch.manual_seed(0)
    sys.exit(main())
