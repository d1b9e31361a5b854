"""RateQuantConfig: construction, validation, JSON + safetensors round trip, model checks, saves that are all or
nothing."""

import dataclasses
import hashlib
import json
import shutil

import pytest
import torch
from transformers import LlamaConfig

from hf_ratequant import RateQuantCache, RateQuantConfig
from hf_ratequant.config import (
    BACKUP_NAME,
    CONFIG_NAME,
    CURVES_FILE_KEY,
    CURVES_HASH_KEY,
    CURVES_NAME,
    SCHEMA_VERSION,
    ModelFingerprint,
)

pytest_plugins = ["tests.hub_server"]

@pytest.fixture
def llama_config():
    return LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, architectures=["LlamaForCausalLM"],
    )


def test_uniform_and_split(llama_config):
    cfg = RateQuantConfig.uniform(llama_config, bits=4)
    assert cfg.key_bits == [[4, 4]] * 3 and cfg.value_bits == [[4, 4]] * 3
    assert cfg.average_bits == 4 and cfg.method == "uniform"
    split = RateQuantConfig.uniform(llama_config, key_bits=3, value_bits=2, quantizer="rotated")
    assert split.average_bits == 2.5 and split.method == "kv-split" and split.quantizer == "rotated"
    assert split.bits_tensor().shape == (3, 2, 2)
    assert split.fingerprint.geometry() == (3, 2, 32)


@pytest.mark.parametrize("bits", [0, 9, 17, 2.5, "4", True])
def test_bad_bits_name_value_and_allowed(llama_config, bits):
    with pytest.raises(ValueError, match=r"not a valid bit-width.*1\.\.8.*16"):
        RateQuantConfig.uniform(llama_config, bits=bits)


def test_bad_tables():
    with pytest.raises(ValueError, match="different lengths"):
        RateQuantConfig(key_bits=[[4, 4], [4]], value_bits=[[4, 4], [4, 4]])
    with pytest.raises(ValueError, match=r"key_bits\[1\]\[0\]=0"):
        RateQuantConfig(key_bits=[[4, 4], [0, 4]], value_bits=[[4, 4], [4, 4]])
    with pytest.raises(ValueError, match="both must be num_layers x num_kv_heads"):
        RateQuantConfig(key_bits=[[4, 4]], value_bits=[[4, 4], [4, 4]])
    with pytest.raises(ValueError, match="Unknown quantizer 'hqq'.*kivi"):
        RateQuantConfig(key_bits=[[4]], value_bits=[[4]], quantizer="hqq")
    with pytest.raises(ValueError, match="multiple of group_size"):
        RateQuantConfig(key_bits=[[4]], value_bits=[[4]], group_size=32, residual_length=100)


def test_mismatched_model_refused_naming_both(llama_config):
    cfg = RateQuantConfig.uniform(llama_config, bits=4)
    other = LlamaConfig(num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=4, hidden_size=64)
    with pytest.raises(ValueError, match=r"3 layers x 2 kv-heads.*llama: 5 layers x 4 kv-heads"):
        RateQuantCache(config=other, quant_config=cfg)


def test_fingerprint_mismatch_with_same_geometry_refused(llama_config, caplog):
    from transformers import MistralConfig

    cfg = RateQuantConfig.uniform(llama_config, bits=4)
    geometry = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=32)
    mistral = MistralConfig(**geometry, sliding_window=64)
    with pytest.raises(ValueError, match=r"calibrated for LlamaForCausalLM.*but the model is mistral.*"
                                         r"model_type llama vs mistral.*sliding_window None vs 64"):
        RateQuantCache.from_pretrained(cfg, model_config=mistral)
    # A fine-tune (same architecture and geometry, another name) is used, with a warning.
    tuned_other = LlamaConfig(**geometry, architectures=["LlamaForCausalLM"])
    object.__setattr__(cfg, "fingerprint", dataclasses.replace(cfg.fingerprint, name_or_path="org/base"))
    tuned_other._name_or_path = "org/fine-tune"
    with caplog.at_level("WARNING", logger="hf_ratequant.config"):
        RateQuantCache.from_pretrained(cfg, model_config=tuned_other)
    assert "calibrated on org/base; the model is org/fine-tune" in caplog.text


def test_the_same_model_under_its_label_or_in_a_local_folder_is_not_called_another(llama_config, caplog, tmp_path):
    """A config records where its model came from, e.g. "google/gemma-3-270m (GGUF Q4_K_M, package)": the Hub id
    itself, or the model saved in a local folder of any name, is not "another model"."""
    cfg = RateQuantConfig.uniform(llama_config, bits=4)
    object.__setattr__(cfg, "fingerprint", dataclasses.replace(
        cfg.fingerprint, name_or_path="Org/Model-1B (GGUF Q4_K_M, some-package)"))
    for source in ("org/model-1b", str(tmp_path)):
        llama_config._name_or_path = source
        with caplog.at_level("WARNING", logger="hf_ratequant.config"):
            RateQuantCache.from_pretrained(cfg, model_config=llama_config)
    assert "calibrated on" not in caplog.text
    llama_config._name_or_path = "org/model-8b"
    with caplog.at_level("WARNING", logger="hf_ratequant.config"):
        RateQuantCache.from_pretrained(cfg, model_config=llama_config)
    assert "calibrated on Org/Model-1B (GGUF Q4_K_M, some-package); the model is org/model-8b" in caplog.text


def test_unsupported_layer_type_named(llama_config):
    llama_config.layer_types = ["full_attention", "linear_attention", "full_attention"]
    cfg = RateQuantConfig(key_bits=[[4, 4]] * 3, value_bits=[[4, 4]] * 3)
    with pytest.raises(ValueError, match=r"linear_attention.*cannot serve.*supported layer types"):
        RateQuantCache(config=llama_config, quant_config=cfg)


def test_save_load_roundtrip(tmp_path, llama_config):
    cfg = RateQuantConfig.uniform(llama_config, key_bits=3, value_bits=2)
    cfg.key_bits[0][1] = 16
    cfg.curves = {"alpha": torch.rand(3, 2, 2), "beta": torch.tensor(4.6)}
    cfg.calibration = {"tokens": 4096, "source": "pydoc"}
    cfg.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, _curves_name(tmp_path)]
    assert _curves_name(tmp_path) == f"ratequant_curves-{_curves_sha256(tmp_path)[:16]}.safetensors"
    back = RateQuantConfig.from_pretrained(tmp_path)
    assert back.to_dict() == cfg.to_dict()
    assert back.fingerprint == cfg.fingerprint
    for k, v in cfg.curves.items():
        assert torch.equal(back.curves[k], v)
    cache = RateQuantCache.from_pretrained(tmp_path, model_config=llama_config)
    assert cache.layers[0].key_bits == [3, 16]


def test_unknown_keys_tolerated_newer_version_refused(tmp_path, llama_config):
    RateQuantConfig.uniform(llama_config, bits=4).save_pretrained(tmp_path)
    path = tmp_path / CONFIG_NAME
    data = json.loads(path.read_text())
    data["from_the_future"] = {"x": 1}
    data["fingerprint"]["also_new"] = 3
    path.write_text(json.dumps(data))
    assert RateQuantConfig.from_pretrained(tmp_path).average_bits == 4
    data["version"] = SCHEMA_VERSION + 1
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"newer than the {SCHEMA_VERSION}.*upgrade"):
        RateQuantConfig.from_pretrained(tmp_path)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        RateQuantConfig.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        RateQuantConfig.from_pretrained(tmp_path)


def test_failed_save_keeps_previous_artefact(tmp_path, llama_config, monkeypatch):
    good = RateQuantConfig.uniform(llama_config, bits=4)
    good.save_pretrained(tmp_path)
    before = (tmp_path / CONFIG_NAME).read_bytes()
    bad = RateQuantConfig.uniform(llama_config, bits=2)
    monkeypatch.setattr(RateQuantConfig, "to_dict", lambda self: {"x": object()})  # not JSON-serialisable
    with pytest.raises(TypeError):
        bad.save_pretrained(tmp_path)
    assert (tmp_path / CONFIG_NAME).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [CONFIG_NAME]


def test_fingerprint_reads_sliding_and_gqa():
    from transformers import MistralConfig

    fp = ModelFingerprint.from_model_config(
        MistralConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, hidden_size=64,
                      sliding_window=16)
    )
    assert fp.num_kv_heads == 1 and fp.head_dim == 16
    assert set(fp.layer_types) == {"sliding_attention"} and fp.sliding_window == 16


# ---- saving replaces the two files as a pair ----------------------------------------------------------------------
def _pair_configs(model_config):
    """Three configs that differ in settings and curves: with curves, with other curves, without curves."""
    a = RateQuantConfig.uniform(model_config, key_bits=3, value_bits=2)
    a.curves = {"alpha": torch.rand(3, 2, 2, generator=torch.Generator().manual_seed(1)), "beta": torch.tensor(4.6)}
    b = RateQuantConfig.uniform(model_config, bits=4, quantizer="rotated")
    b.key_bits[2][1] = 16
    b.curves = {"alpha": torch.rand(3, 2, 2, generator=torch.Generator().manual_seed(2)),
                "bit_grid": torch.tensor([2, 3, 4])}
    c = RateQuantConfig.uniform(model_config, bits=2)
    return [a, b, c]


def _same(x: RateQuantConfig, y: RateQuantConfig) -> bool:
    """Bit-exact equality of settings and curves (names, dtypes, shapes and values)."""
    return x.to_dict() == y.to_dict() and x.curves.keys() == y.curves.keys() and all(
        x.curves[k].dtype == y.curves[k].dtype and torch.equal(x.curves[k], y.curves[k]) for k in x.curves
    )


def _which(folder, candidates) -> int:
    loaded = RateQuantConfig.from_pretrained(folder)
    matches = [i for i, c in enumerate(candidates) if _same(loaded, c)]
    assert matches, f"the folder loads as none of the saved configs: {loaded.to_dict()}"
    return matches[0]


def _curves_name(folder) -> str | None:
    """The curves file the folder's JSON names (None: none)."""
    ref = json.loads((folder / CONFIG_NAME).read_text()).get(CURVES_FILE_KEY)
    return ref and ref["name"]


def _curves_sha256(folder) -> str:
    return json.loads((folder / CONFIG_NAME).read_text())[CURVES_FILE_KEY]["sha256"]


def _unnamed_curves(folder) -> list[str]:
    """The curves files in the folder that its JSON does not name (left by an interrupted save)."""
    return [p.name for p in folder.iterdir() if p.name.startswith(("ratequant_curves", BACKUP_NAME))
            and p.name != _curves_name(folder)]


def _write_old_layout(folder, config, *, hashed: bool):
    """`config` as older releases saved it: `CURVES_NAME` recorded by its sha256 in the JSON, or (`hashed=False`,
    the first Hub artefacts) by nothing."""
    config.save_pretrained(folder)
    path = folder / CONFIG_NAME
    data = json.loads(path.read_text())
    ref = data.pop(CURVES_FILE_KEY, None)
    data.pop(CURVES_HASH_KEY, None)
    data["version"] = config.version
    if ref:
        (folder / ref["name"]).rename(folder / CURVES_NAME)
    if hashed:
        data[CURVES_HASH_KEY] = ref and ref["sha256"]
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_legacy(folder, config):
    """`config` as saved before the JSON recorded its curves' hash (the first Hub artefacts)."""
    _write_old_layout(folder, config, hashed=False)


def _write_interrupted_old_save(folder, old, new):
    """What an older release left when killed saving `new` over `old`: `old`'s JSON, `new`'s curves in place and
    `old`'s kept in the backup (empty: it had none)."""
    _write_old_layout(folder / "new", new, hashed=True)
    _write_old_layout(folder, old, hashed=True)
    backup = (folder / CURVES_NAME).read_bytes() if (folder / CURVES_NAME).exists() else b""
    (folder / BACKUP_NAME).write_bytes(backup)
    if (folder / "new" / CURVES_NAME).exists():
        shutil.copy(folder / "new" / CURVES_NAME, folder / CURVES_NAME)
    shutil.rmtree(folder / "new")


def test_folders_of_older_releases_still_load(tmp_path, llama_config):
    a, b, c = _pair_configs(llama_config)
    for i, (old, new) in enumerate(((a, b), (c, b), (a, c), (b, a))):
        for hashed in (True, False):
            _write_old_layout(tmp_path / f"plain-{i}-{hashed}", old, hashed=hashed)
            assert _same(RateQuantConfig.from_pretrained(tmp_path / f"plain-{i}-{hashed}"), old)
        folder = tmp_path / f"killed-{i}"
        folder.mkdir()
        _write_interrupted_old_save(folder, old, new)
        assert (folder / BACKUP_NAME).exists() and _same(RateQuantConfig.from_pretrained(folder), old)
        new.save_pretrained(folder)  # the old files are removed, the new layout loads
        assert sorted(p.name for p in folder.iterdir()) == sorted(n for n in (CONFIG_NAME, _curves_name(folder)) if n)
        assert _same(RateQuantConfig.from_pretrained(folder), new)


def test_config_without_curves_hash_still_loads(tmp_path, llama_config):
    a, _, c = _pair_configs(llama_config)
    for config in (a, c):
        _write_legacy(tmp_path, config)
        assert CURVES_HASH_KEY not in json.loads((tmp_path / CONFIG_NAME).read_text())
        assert _same(RateQuantConfig.from_pretrained(tmp_path), config)


class _Killed(BaseException):
    """Stands for a SIGKILL at one step of a save: nothing after it runs but `finally` blocks (which only remove
    temporary files, which loading ignores anyway)."""


def _crash_at(monkeypatch, step: int):
    """Make the `step`-th rename, removal or link of the next save raise `_Killed` (0: count them, never crash)."""
    import os

    calls = []
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # durability is not what this test is about; speed is
    for name in ("replace", "remove", "link"):
        real = getattr(os, name)

        def fake(*args, _real=real, **kwargs):
            calls.append(args)
            if len(calls) == step:
                raise _Killed
            return _real(*args, **kwargs)

        monkeypatch.setattr(os, name, fake)
    return calls


def _steps_of_a_save(monkeypatch, folder, prepare, config) -> list[tuple]:
    """The renames, removals and links (their arguments) that saving `config` over `prepare(folder)` makes."""
    prepare(folder)
    with monkeypatch.context() as mp:
        calls = _crash_at(mp, 0)
        config.save_pretrained(folder)
    return calls


def _save_killed_at(monkeypatch, folder, config, step: int) -> bool:
    """Save `config` into `folder`, killed at `step`; True if the save finished before that step."""
    with monkeypatch.context() as mp:
        _crash_at(mp, step)
        try:
            config.save_pretrained(folder)
        except _Killed:
            return False
    return True


def _interrupted_old_save_of_1_over_0(folder, configs):
    folder.mkdir()
    _write_interrupted_old_save(folder, configs[0], configs[1])


@pytest.mark.parametrize("start", ["with curves", "other curves", "no curves", "older format", "older format killed",
                                   "empty folder"])
def test_a_save_killed_at_any_step_leaves_old_or_new(tmp_path, llama_config, monkeypatch, start):
    """Every step of every kind of save, interrupted, then every step of a second save over what is left.

    A save renames the curves file into place, then the JSON (the commit), then removes the curves files the JSON no
    longer names: killed before the JSON's rename, the old config loads; after it, the new one; never a mix."""
    configs = _pair_configs(llama_config)
    first = {"with curves": 0, "other curves": 1, "no curves": 2, "older format": 0, "older format killed": 0,
             "empty folder": None}[start]
    prepare = {"older format": lambda f: _write_legacy(f, configs[0]), "empty folder": lambda f: f.mkdir(),
               "older format killed": lambda f: _interrupted_old_save_of_1_over_0(f, configs)}.get(
        start, lambda f: configs[first].save_pretrained(f))
    interrupted_states = 0
    for target in range(3):
        steps = len(_steps_of_a_save(monkeypatch, tmp_path / f"count-{target}", prepare, configs[target]))
        for step in range(1, steps + 1):
            folder = tmp_path / f"{target}-{step}"
            prepare(folder)
            assert not _save_killed_at(monkeypatch, folder, configs[target], step)
            if first is None and not (folder / CONFIG_NAME).exists():
                continue  # killed before the first config was committed: nothing to load, as before
            state = _which(folder, configs)
            assert state in (first, target)
            interrupted_states += bool(_unnamed_curves(folder)) and start != "older format killed"
            # A second save over the interrupted one, killed at each step too: what loads is the state above or it.
            for second in range(3):
                for step2 in range(1, steps + 3):
                    again = tmp_path / f"{target}-{step}-{second}-{step2}"
                    shutil.copytree(folder, again)
                    finished = _save_killed_at(monkeypatch, again, configs[second], step2)
                    assert _which(again, configs) in ((second,) if finished else (state, second))
                    if finished:
                        assert not [p.name for p in again.iterdir() if p.name.startswith(".")]
                        assert not _unnamed_curves(again)
                        break
    assert interrupted_states >= 2 or first is None or start == "older format killed"  # kills did land between
    # the two renames (an empty folder has no config to keep; an older release's backup is always unnamed)


def test_save_keeps_unrelated_files(tmp_path, llama_config):
    a, b, c = _pair_configs(llama_config)
    (tmp_path / "README.md").write_text("my card\n")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "n.txt").write_text("x")
    for config in (a, b, c, a):
        config.save_pretrained(tmp_path)
        assert _same(RateQuantConfig.from_pretrained(tmp_path), config)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, "README.md", "notes",
                                                                 _curves_name(tmp_path)])
    assert (tmp_path / "README.md").read_text() == "my card\n" and (tmp_path / "notes" / "n.txt").read_text() == "x"


@pytest.mark.parametrize("step", range(1, 5))
def test_save_that_raises_midway_leaves_the_previous_files(tmp_path, llama_config, monkeypatch, step):
    import os

    a, b, _ = _pair_configs(llama_config)
    a.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real, calls = os.replace, []

    def failing(*args):
        calls.append(args)
        if len(calls) == step:
            raise OSError(28, "No space left on device")
        return real(*args)

    monkeypatch.setattr(os, "replace", failing)
    try:
        b.save_pretrained(tmp_path)
    except OSError as e:
        assert "No space left" in str(e)
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no new curves, no temporary file
        assert _same(RateQuantConfig.from_pretrained(tmp_path), a)
    else:
        assert _same(RateQuantConfig.from_pretrained(tmp_path), b) and step > len(calls)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_sigkill_at_random_moments_leaves_exactly_one_saved_config(tmp_path, llama_config):
    """A process saves the three configs in turn over one folder and is SIGKILLed at random moments; every time, the
    folder loads as exactly one of them, and the unrelated files in it are untouched."""
    import os
    import random
    import signal
    import time

    configs = _pair_configs(llama_config)
    configs[0].save_pretrained(tmp_path)
    (tmp_path / "README.md").write_text("my card\n")
    rng = random.Random(0)
    seen = set()
    for trial in range(25):
        pid = os.fork()
        if pid == 0:  # the child saves until killed, and never returns into pytest
            try:
                for i in range(10**6):
                    configs[(trial + i) % 3].save_pretrained(tmp_path)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.005, 0.04))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status), "the saving process ended by itself: it failed"
        seen.add(_which(tmp_path, configs))
    assert len(seen) >= 2, "the kills all landed on the same config: the saves did not run"
    assert (tmp_path / "README.md").read_text() == "my card\n"
    configs[1].save_pretrained(tmp_path)
    assert _same(RateQuantConfig.from_pretrained(tmp_path), configs[1])
    assert not _unnamed_curves(tmp_path)


def test_push_sends_the_committed_files_and_no_stray_or_temporary_file(hub, tmp_path, llama_config, monkeypatch):
    from hf_ratequant.hub import push_folder

    a, b, _ = _pair_configs(llama_config)
    calls = _steps_of_a_save(monkeypatch, tmp_path / "count", a.save_pretrained, b)
    commit = 1 + [str(args[-1]).endswith(CONFIG_NAME) for args in calls].index(True)
    folder = tmp_path / "cfg"
    a.save_pretrained(folder)
    assert not _save_killed_at(monkeypatch, folder, b, commit)  # b's curves written, a's settings still committed
    (folder / ".tmp-0123-ratequant_config.json").write_text("{}")
    (b_curves,) = _unnamed_curves(folder)
    assert hashlib.sha256((folder / _curves_name(folder)).read_bytes()).hexdigest() == _curves_sha256(folder)
    assert _same(RateQuantConfig.from_pretrained(folder), a)
    push_folder(folder, "local-user/interrupted")
    repo = hub.repos[("model", "local-user/interrupted")]
    uploaded = repo.commits[repo.branches["main"]]
    assert sorted(uploaded) == sorted([".gitattributes", CONFIG_NAME, _curves_name(folder), "README.md",
                                       "allocation.png"])
    assert _same(RateQuantConfig.from_pretrained("local-user/interrupted"), a)
