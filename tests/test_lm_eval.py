"""lm-evaluation-harness through the cache (`hf_ratequant.harness`): offline tasks (YAML + local JSON) on a tiny random
Llama with a word-level tokenizer, and on the embedded default model (slow)."""

import json
import random
import subprocess
import sys
import warnings

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from hf_ratequant import RateQuantConfig, harness  # noqa: E402
from hf_ratequant.harness import RateQuantLM, evaluate, load_tasks  # noqa: E402
from hf_ratequant.models import cache_kwargs  # noqa: E402

WORDS = [f"w{i}" for i in range(100)] + [str(i) for i in range(10)] + [".", "?", ":"]
G, R, CHUNK = 8, 16, 16  # the tiny caches' group size, residual window and chunk: contexts of 40-200 tokens


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer over the tiny model's 128 ids: 0 pads, 1 is BOS, 2 is EOS, 3 unknown."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({w: i + 4 for i, w in enumerate(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def _words(rng, lo, hi):
    return " ".join(rng.choice(WORDS[:100]) for _ in range(rng.randint(lo, hi)))


def _uniform(model, bits, sink_length=0):
    return RateQuantConfig.uniform(model.config, bits=bits, group_size=G, residual_length=R, sink_length=sink_length)


def _lm(model, tokenizer, cache, **kwargs):
    kwargs.setdefault("batch_size", 4)
    return RateQuantLM(pretrained=model, tokenizer=tokenizer, cache=cache, chunk=CHUNK, device="cpu", **kwargs)


def _plain(model, tokenizer, **kwargs):
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, device="cpu", **kwargs)


@pytest.fixture(scope="module")
def requests_ll():
    """Loglikelihood requests: 8 contexts of 40-200 words, 3 continuations each (the choices of a question)."""
    rng = random.Random(0)
    reqs = []
    for q in range(8):
        ctx = _words(rng, 40, 200)
        reqs += [Instance("loglikelihood", {}, (ctx, " " + _words(rng, 1, 4)), q * 3 + c) for c in range(3)]
    return reqs


def _scores(lm, reqs):
    return torch.tensor([ll for ll, _ in lm.loglikelihood(reqs, disable_tqdm=True)])


@pytest.fixture(scope="module")
def reference_ll(tiny_llama, tokenizer, requests_ll):
    return _scores(_plain(tiny_llama, tokenizer), requests_ll)


# ---- loglikelihood through the cache ------------------------------------------------------------------------------
def test_16_bits_equal_plain_hflm_and_2_bits_differ(tiny_llama, tokenizer, requests_ll, reference_ll):
    lm16 = _lm(tiny_llama, tokenizer, _uniform(tiny_llama, 16))
    torch.testing.assert_close(_scores(lm16, requests_ll), reference_ll, atol=1e-4, rtol=1e-5)
    assert lm16.cache_stats.quantized_read_tokens > 0  # the 16-bit "quantized" past was read: same numbers
    lm2 = _lm(tiny_llama, tokenizer, _uniform(tiny_llama, 2))
    two = _scores(lm2, requests_ll)
    diff = (two - reference_ll).abs()
    assert diff.max() > 0.05, "2-bit scores equal full precision: the cache was never read"
    stats = lm2.cache_stats.summary()
    assert 0.5 < stats["quantized_read_share"] < 1 and stats["vs_16bit"] < 1
    # full precision through a DynamicCache, fed the same way
    torch.testing.assert_close(_scores(_lm(tiny_llama, tokenizer, "none"), requests_ll), reference_ll,
                               atol=1e-4, rtol=1e-5)


def test_batch_sizes_1_and_4_agree_with_padding_and_prefix_sharing(tiny_llama, tokenizer, requests_ll):
    cfg = _uniform(tiny_llama, 2, sink_length=G)
    one = _scores(_lm(tiny_llama, tokenizer, cfg, batch_size=1), requests_ll)
    four = _scores(_lm(tiny_llama, tokenizer, cfg, batch_size=4, share_prefix=False), requests_ll)
    torch.testing.assert_close(one, four, atol=1e-4, rtol=1e-5)
    # Every question's choices in one batch of 3: the context is fed once, the cache copied to the three rows.
    shared = _lm(tiny_llama, tokenizer, cfg, batch_size=3)
    rows = torch.tensor([ll for q in range(8)
                         for ll, _ in shared.loglikelihood(requests_ll[3 * q : 3 * q + 3], disable_tqdm=True)])
    assert shared.cache_stats.shared_prefix_tokens > 0
    torch.testing.assert_close(rows, one, atol=1e-4, rtol=1e-5)


def test_loglikelihood_rolling_through_the_cache(tiny_llama, tokenizer):
    rng = random.Random(1)
    reqs = [Instance("loglikelihood_rolling", {}, (_words(rng, 60, 150),), i) for i in range(4)]
    ref = torch.tensor(_plain(tiny_llama, tokenizer, max_length=64).loglikelihood_rolling(reqs, disable_tqdm=True))
    lm16 = _lm(tiny_llama, tokenizer, _uniform(tiny_llama, 16), max_length=64)
    torch.testing.assert_close(torch.tensor(lm16.loglikelihood_rolling(reqs, disable_tqdm=True)), ref,
                               atol=1e-3, rtol=1e-5)
    lm2 = _lm(tiny_llama, tokenizer, _uniform(tiny_llama, 2), max_length=64)
    two = torch.tensor(lm2.loglikelihood_rolling(reqs, disable_tqdm=True))
    assert (two - ref).abs().max() > 0.05 and lm2.cache_stats.quantized_read_tokens > 0


# ---- generation ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["past_key_values", "cache"])
def test_a_task_that_brings_its_own_cache_is_refused_naming_it(tiny_llama, tokenizer, name):
    lm = _lm(tiny_llama, tokenizer, _uniform(tiny_llama, 4))
    with pytest.raises(ValueError, match=f"remove {name} from the task's generation_kwargs"):
        lm._model_generate(torch.ones(1, 4, dtype=torch.long), 8, ["."], **{name: object()})


def test_generate_until_passes_a_fresh_cache_per_row(tiny_llama, tokenizer, monkeypatch):
    rng = random.Random(2)
    gen = {"until": ["."], "max_gen_toks": 6, "do_sample": False}
    reqs = [Instance("generate_until", {}, (_words(rng, 20, 60), gen), i) for i in range(5)]
    ref = HFLM(pretrained=tiny_llama, tokenizer=tokenizer, batch_size=1, device="cpu").generate_until(
        reqs, disable_tqdm=True)
    seen = []
    original = tiny_llama.generate

    (name,) = cache_kwargs(tiny_llama, None)  # the keyword the installed transformers takes the cache by

    def spy(*args, **kwargs):
        cache = kwargs[name]  # kept alive in `seen`, so that the ids stay distinct
        seen.append((type(cache).__name__, cache, cache.get_seq_length(), kwargs["input_ids"].shape[0]))
        return original(*args, **kwargs)

    monkeypatch.setattr(tiny_llama, "generate", spy)
    lm16 = _lm(tiny_llama, tokenizer, _uniform(tiny_llama, 16), batch_size=4)
    assert lm16.generate_until(reqs, disable_tqdm=True) == ref
    assert [s[0] for s in seen] == ["RateQuantCache"] * 5 and len({id(s[1]) for s in seen}) == 5
    assert {s[2] for s in seen} == {0} and {s[3] for s in seen} == {1}  # a fresh, empty cache for every row
    lm2 = _lm(tiny_llama, tokenizer, _uniform(tiny_llama, 2), batch_size=4)
    out2 = lm2.generate_until(reqs, disable_tqdm=True)
    assert lm2.cache_stats.generated_rows == 5 and lm2.cache_stats.generated_rows_quantized == 5
    assert _lm(tiny_llama, tokenizer, _uniform(tiny_llama, 2), batch_size=1).generate_until(
        reqs, disable_tqdm=True) == out2


# ---- local lm-eval tasks end to end -------------------------------------------------------------------------------
def _write_tasks(folder, rng):
    """Three tasks in lm-eval's own format: YAML files reading local JSON lines (`dataset_path: json`)."""
    mc, gen, ppl = [], [], []
    for _ in range(6):
        choices = [_words(rng, 1, 3) for _ in range(3)]
        mc.append({"context": _words(rng, 40, 120), "choices": choices, "label": rng.randrange(3)})
        gen.append({"context": _words(rng, 30, 60), "answer": _words(rng, 1, 2)})
        ppl.append({"text": _words(rng, 40, 100)})
    yamls = {
        "tiny_mc": ["output_type: multiple_choice", "doc_to_text: '{{context}}'", "doc_to_choice: '{{choices}}'",
                    "doc_to_target: label", "metric_list:\n  - metric: acc"],
        "tiny_gen": ["output_type: generate_until", "doc_to_text: '{{context}}'", "doc_to_target: '{{answer}}'",
                     "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 4\n  do_sample: false",
                     "metric_list:\n  - metric: exact_match"],
        "tiny_ppl": ["output_type: loglikelihood_rolling", "doc_to_text: '{{text}}'", "doc_to_target: '{{text}}'",
                     "metric_list:\n  - metric: word_perplexity"],
    }
    for name, rows in (("tiny_mc", mc), ("tiny_gen", gen), ("tiny_ppl", ppl)):
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        head = [f"task: {name}", "dataset_path: json", f"dataset_kwargs:\n  data_files:\n    test: {data}",
                "test_split: test"]
        (folder / f"{name}.yaml").write_text("\n".join(head + yamls[name]) + "\n")
    return folder


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return _write_tasks(tmp_path_factory.mktemp("lm_eval_tasks"), random.Random(3))


def _metric(results, task, name):
    return results["results"][task][f"{name},none"]


def test_evaluate_local_tasks_matches_plain_hflm_at_16_bits(tiny_llama, tokenizer, task_dir):
    tasks = ["tiny_mc", "tiny_gen", "tiny_ppl"]
    loaded = load_tasks(tasks, str(task_dir))
    plain = lm_eval.simple_evaluate(model=_plain(tiny_llama, tokenizer), tasks=loaded[1], task_manager=loaded[0],
                                    bootstrap_iters=0)
    res16 = evaluate(tiny_llama, tokenizer, tasks, _uniform(tiny_llama, 16), loaded=loaded, batch_size=4,
                     chunk=CHUNK, bootstrap_iters=0)
    for task, metric in (("tiny_mc", "acc"), ("tiny_gen", "exact_match"), ("tiny_ppl", "word_perplexity")):
        assert _metric(res16, task, metric) == pytest.approx(_metric(plain, task, metric), rel=1e-4)
    assert res16["ratequant"]["average_bits"] == 16 and res16["ratequant"]["stats"]["quantized_read_tokens"] > 0
    res2 = evaluate(tiny_llama, tokenizer, tasks, _uniform(tiny_llama, 2), loaded=loaded, batch_size=4,
                    chunk=CHUNK, bootstrap_iters=0)
    assert _metric(res2, "tiny_ppl", "word_perplexity") != pytest.approx(_metric(plain, "tiny_ppl",
                                                                                  "word_perplexity"), rel=1e-3)


def test_registered_model_name_and_arg_string(tiny_llama, tokenizer, task_dir):
    assert lm_eval.api.registry.get_model("ratequant") is RateQuantLM
    lm = RateQuantLM.create_from_arg_string("cache=kv:3,2,chunk=16,sink_length=32",
                                            {"pretrained": tiny_llama, "tokenizer": tokenizer})
    assert (lm.quant_config.key_bits[0][0], lm.quant_config.value_bits[0][0], lm.chunk) == (3, 2, 16)
    assert lm.quant_config.sink_length == 32
    assert RateQuantLM.create_from_arg_string("cache=none", {"pretrained": tiny_llama,
                                                             "tokenizer": tokenizer}).quant_config is None
    res = lm_eval.simple_evaluate(
        model="ratequant", model_args={"pretrained": tiny_llama, "tokenizer": tokenizer, "cache": "uniform:2"},
        tasks=["tiny_mc"], task_manager=lm_eval.tasks.TaskManager(include_path=str(task_dir), include_defaults=False),
        bootstrap_iters=0, device="cpu",
    )
    assert 0 <= _metric(res, "tiny_mc", "acc") <= 1
    assert res["config"]["ratequant"]["cache"] == "uniform:2"


def test_cli_lm_eval(tiny_llama, tokenizer, task_dir, monkeypatch, capsys, tmp_path):
    from hf_ratequant.cli import main

    monkeypatch.setattr("hf_ratequant.models.load_model", lambda *a, **k: (tiny_llama, tokenizer))
    saved = tmp_path / "tiny-2bit"
    _uniform(tiny_llama, 2).save_pretrained(saved)
    out = tmp_path / "rows.json"
    code = main(["lm-eval", "--model", "tiny", "--tasks", "tiny_mc", str(task_dir / "tiny_ppl.yaml"),
                 "--include-path", str(task_dir), "--cache", "none", str(saved), "--batch-size", "2",
                 "--chunk", "16", "--output", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "tiny_mc" in text and "tiny_ppl" in text and "word_perplexity" in text
    rows = json.loads(out.read_text())
    assert {(r["cache"], r["task"]) for r in rows} >= {("none", "tiny_mc"), (str(saved), "tiny_ppl")}
    assert all(r["bytes_per_row"] > 0 and r["seconds"] > 0 for r in rows)
    assert {r["quantized_read_share"] > 0 for r in rows if r["cache"] == str(saved)} == {True}
    with pytest.raises(SystemExit):  # a bad spec fails before any work
        main(["lm-eval", "--model", "tiny", "--tasks", "tiny_mc", "--include-path", str(task_dir), "--cache", "kv:9"])
    assert "kv:KBITS,VBITS" in capsys.readouterr().err


# ---- bad input ----------------------------------------------------------------------------------------------------
def test_task_that_needs_the_hub_is_refused_offline(tiny_llama, tokenizer, tmp_path):
    (tmp_path / "hub_task.yaml").write_text(
        "task: hub_task\ndataset_path: someone/not-a-local-dataset\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{q}}'\ndoc_to_choice: '{{c}}'\ndoc_to_target: 0\n"
    )
    with pytest.raises(RuntimeError, match="dataset_path: json.*--include-path"):
        load_tasks(["hub_task"], str(tmp_path))
    with pytest.raises(FileNotFoundError, match="No such task file: .*missing.yaml"):
        load_tasks([str(tmp_path / "missing.yaml")], str(tmp_path))


def test_untested_lm_eval_version_is_refused(monkeypatch):
    monkeypatch.setattr("importlib.metadata.version", lambda name: "0.4.2")
    monkeypatch.delenv(harness.UNTESTED_ENV, raising=False)
    with pytest.raises(ImportError, match=r"lm-eval>=0\.4\.\d+,<0\.4\.\d+.*0\.4\.2 is installed.*pip install"):
        harness._check_lm_eval_version()
    monkeypatch.setenv(harness.UNTESTED_ENV, "1")
    with pytest.warns(RuntimeWarning, match="running anyway"):
        assert harness._check_lm_eval_version() == "0.4.2"


def test_cli_without_lm_eval_says_what_to_install():
    code = (
        "import importlib.metadata as m\n"
        "real = m.version\n"
        "def version(name):\n"
        "    if name == 'lm_eval':\n"
        "        raise m.PackageNotFoundError(name)\n"
        "    return real(name)\n"
        "m.version = version\n"
        "from hf_ratequant.cli import main\n"
        "main(['lm-eval', '--tasks', 'anything', '--cache', 'none'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2 and "pip install 'hf-ratequant[lm-eval]'" in proc.stderr, proc.stderr


def test_bad_caches_and_backends_are_refused(tiny_llama, tokenizer):
    with pytest.raises(ValueError, match="kv:KBITS,VBITS"):
        _lm(tiny_llama, tokenizer, "kv:3")
    with pytest.raises(ValueError, match="Unknown cache spec"):
        _lm(tiny_llama, tokenizer, "int4")
    wrong = RateQuantConfig.uniform(tiny_llama.config, bits=2).__class__(
        key_bits=[[2] * 3] * 2, value_bits=[[2] * 3] * 2, quantizer="kivi", group_size=G, residual_length=R)
    with pytest.raises(ValueError):
        _lm(tiny_llama, tokenizer, wrong)  # 3 kv-heads for a 2-kv-head model
    with pytest.raises(ValueError, match="causal"):
        _lm(tiny_llama, tokenizer, "none", backend="seq2seq")
    with pytest.raises(ValueError, match="tokenizer"):
        RateQuantLM(pretrained=tiny_llama, cache="none")
    lm = _lm(tiny_llama, tokenizer, "none")
    with pytest.raises(NotImplementedError, match="decoder-only"):
        lm._model_call(torch.ones(1, 4, dtype=torch.long), attn_mask=torch.ones(1, 4), labels=torch.ones(1, 4))


def test_never_quantized_evaluation_warns(tiny_llama, tokenizer, task_dir):
    big_window = RateQuantConfig.uniform(tiny_llama.config, bits=2, group_size=G, residual_length=248)
    with pytest.warns(RuntimeWarning, match="No token of this evaluation attended to a quantized past"):
        evaluate(tiny_llama, tokenizer, ["tiny_mc"], big_window, include_path=str(task_dir), bootstrap_iters=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        evaluate(tiny_llama, tokenizer, ["tiny_mc"], _uniform(tiny_llama, 2), include_path=str(task_dir),
                 bootstrap_iters=0, chunk=CHUNK)


def test_package_and_cli_import_without_lm_eval():
    code = "import sys, hf_ratequant, hf_ratequant.cli; print('lm_eval' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


# ---- the embedded default model -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_default_model_16_bits_equal_plain_and_shipped_config_differs(smollm):
    from hf_ratequant import default_config_path
    from hf_ratequant.passkey import FILLER

    model, tok = smollm
    ctx = "Remember this: the code word is lantern. " + FILLER * 16 + "\nThe code word is"  # ~400 tokens
    reqs = [Instance("loglikelihood", {}, (ctx, word), i) for i, word in enumerate([" lantern", " river", " 4821"])]
    ref = _scores(HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu"), reqs)
    cfg16 = RateQuantConfig.uniform(model.config, bits=16, sink_length=32)
    lm16 = RateQuantLM(pretrained=model, tokenizer=tok, cache=cfg16, batch_size=4)
    torch.testing.assert_close(_scores(lm16, reqs), ref, atol=2e-3, rtol=1e-4)
    shipped = RateQuantLM(pretrained=model, tokenizer=tok, cache=default_config_path(), batch_size=4)
    scores = _scores(shipped, reqs)
    assert (scores - ref).abs().max() > 1e-3 and shipped.cache_stats.quantized_read_tokens > 0
    assert scores[0] > scores[1:].max()  # still finds the code word through the 2.5-bit cache
