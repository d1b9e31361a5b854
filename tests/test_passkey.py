"""Passkey retrieval through the cache, and `hf-ratequant eval` with it, on the embedded default model."""

import importlib.util
import json
import re

import pytest
import torch
from transformers import QuantizedCache

from hf_ratequant import RateQuantCache, RateQuantConfig
from hf_ratequant.cli import main
from hf_ratequant.evaluation import evaluate_quality
from hf_ratequant.passkey import evaluate_passkey, passkey_trials, run_passkey


def test_trials_have_the_exact_length_and_the_key_at_its_depth(smollm):
    _, tok = smollm
    trials = passkey_trials(tok, (300, 600), (0.0, 0.5, 1.0), seed=3)
    assert [t.length for t in trials] == [300] * 3 + [600] * 3
    assert [t.context_ids.shape for t in trials] == [torch.Size([1, 300])] * 3 + [torch.Size([1, 600])] * 3
    positions = []
    for t in trials:
        text = tok.decode(t.context_ids[0])
        assert f"The pass key is {t.passkey}. Remember it. {t.passkey} is the pass key." in text
        assert text.count(t.passkey) == 2
        positions.append(text.index(t.passkey) / len(text))
    for block in (positions[:3], positions[3:]):
        assert block[0] < 0.2 < block[1] < 0.8 < block[2], block
    assert len({t.passkey for t in trials}) == 6
    again = passkey_trials(tok, (300, 600), (0.0, 0.5, 1.0), seed=3)
    assert [t.passkey for t in again] == [t.passkey for t in trials]
    assert all(torch.equal(a.context_ids, b.context_ids) for a, b in zip(again, trials))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lengths=(512,), depths=(1.5,)), r"depths must lie in \[0, 1\]"),
        (dict(lengths=(20,), depths=(0.5,)), "too short.*at least"),
        (dict(lengths=(9000,), depths=(0.5,), max_positions=8192), "exceeds the model's 8192 positions"),
        (dict(lengths=(), depths=(0.5,)), "at least one length"),
    ],
)
def test_bad_trial_arguments_are_named(smollm, kwargs, match):
    with pytest.raises(ValueError, match=match):
        passkey_trials(smollm[1], **kwargs)


def test_full_precision_finds_the_key(smollm):
    model, tok = smollm
    res = evaluate_passkey(model, tok, None, lengths=(512,), depths=(0.2, 0.8), progress=False)
    assert res.accuracy == 1.0 and res.trials == 2 and res.by_length == {512: 1.0}
    assert all(r["passkey"] in r["answer"] for r in res.records)


def test_shared_prefill_equals_a_prefill_forward_through_each_cache(smollm):
    """run_passkey stores the context once and replays the states into every cache: the answers must be exactly
    those of a prefill forward through each cache on its own (the unshared path)."""
    model, tok = smollm
    trials = passkey_trials(tok, (400,), (0.3,), seed=1)
    caches = {
        "2-bit": RateQuantConfig.uniform(model.config, bits=2, residual_length=32),
        "mixed": RateQuantConfig.uniform(model.config, key_bits=3, value_bits=2, quantizer="token",
                                         residual_length=32),
        "factory": lambda: RateQuantCache(config=model.config, quant_config=RateQuantConfig.uniform(
            model.config, bits=3, quantizer="rotated", residual_length=32)),
    }
    if importlib.util.find_spec("optimum") and importlib.util.find_spec("optimum.quanto"):  # the baselines extra
        caches["quanto"] = lambda: QuantizedCache(backend="quanto", config=model.config, nbits=2, residual_length=32)
    shared = run_passkey(model, tok, trials, caches, max_new_tokens=6, progress=False)
    for name, cache in caches.items():
        alone = run_passkey(model, tok, trials, {name: cache}, max_new_tokens=6, progress=False)[name]
        assert alone.records == shared[name].records, name


def test_evaluate_quality_measures_any_cache_factory(smollm):
    model, tok = smollm
    ids = tok("\n".join(["The quick brown fox jumps over the lazy dog."] * 40), return_tensors="pt")["input_ids"]
    windows = ids[:, :192]
    two_bits = RateQuantConfig.uniform(model.config, bits=2, residual_length=32)
    by_config = evaluate_quality(model, windows, two_bits, chunk=64, progress=False)
    by_factory = evaluate_quality(model, windows, lambda: RateQuantCache(config=model.config, quant_config=two_bits),
                                  chunk=64, progress=False)
    assert by_factory == by_config
    ours = evaluate_quality(model, windows, RateQuantConfig.uniform(model.config, bits=8, residual_length=32),
                            chunk=64, progress=False)
    assert by_config.kl > 10 * ours.kl > 0
    if importlib.util.find_spec("optimum") and importlib.util.find_spec("optimum.quanto"):  # the baselines extra
        quanto = evaluate_quality(model, windows, lambda: QuantizedCache(backend="quanto", config=model.config,
                                                                         nbits=2, residual_length=32),
                                  chunk=64, progress=False)
        assert quanto.kl > 10 * ours.kl
    with pytest.raises(TypeError, match="not a transformers Cache"):
        evaluate_quality(model, windows, lambda: "a cache", chunk=64, progress=False)
    with pytest.raises(TypeError, match="cache_config must be"):
        evaluate_quality(model, windows, 4, chunk=64, progress=False)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("\n\n".join(f"Paragraph {i}: the cache keeps every past key and value." for i in range(200)))
    return path


def test_cli_eval_with_passkey_writes_the_table_and_json(smollm_cli, text_file, tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert main(["eval", "--cache", "none", "uniform:8", "kv:3,2", "--data", str(text_file), "--window", "384",
                 "--windows", "1", "--passkey", "300", "--passkey-depths", "0.5", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "passkey" in table and "kv:3,2" in table
    report = json.loads(out.read_text())
    assert report["machine"]["device"] == "cpu" and report["settings"]["passkey"] == [300]
    assert report["tokens"] == 384 and report["seconds"] > 0
    rows = report["rows"]
    assert [r["cache"] for r in rows] == ["none", "uniform:8", "kv:3,2"]
    assert rows[0]["kl"] == 0.0 and rows[1]["kl"] < rows[2]["kl"]
    assert rows[0]["passkey"] == 1.0 and rows[1]["passkey"] == 1.0
    assert all(len(r["passkey_trials"]) == 1 for r in rows)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--cache", "uniform:x"], "'x' is not an integer bit-width"),
        (["--cache", "uniform:9"], "bits"),
        (["--cache", "kv:3"], "kv:KBITS,VBITS"),
        (["--cache", "fancy"], "Unknown cache spec 'fancy': accepted are"),
        (["--cache", "./no/such/config"], "no such folder"),
        (["--cache", "nobody/no-such-ratequant-config"], "nobody/no-such-ratequant-config"),
        (["--data", "./missing.txt"], "missing.txt"),
        (["--window", "100000"], "token"),
        (["--passkey", "20"], "too short"),
        (["--passkey", "9000"], "max_position_embeddings"),
    ],
)
def test_cli_eval_bad_input_is_named(smollm_cli, text_file, capsys, argv, match):
    from tests.hub_server import offline_mode

    base = ["eval", "--cache", "none", "--data", str(text_file), "--window", "128", "--windows", "1"]
    with offline_mode(), pytest.raises(SystemExit) as exit_info:
        main(base + argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "hf-ratequant eval: error:" in err
    assert re.search(match, err), err
