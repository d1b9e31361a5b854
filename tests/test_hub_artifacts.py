"""hub_artifacts/ as golden files: every published config re-serialises byte for byte, its card is exactly what
`model_card` writes, it fits its model (the default model itself; for other models their `config.json`, kept in
tests/model_configs/, and a small random model of the same cache geometry that generates through the config), the
layout older releases wrote loads as the same config, and the card's usage snippet runs as written against a Hub."""

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

import hf_ratequant
from hf_ratequant import RateQuantConfig
from hf_ratequant.config import CONFIG_NAME, CURVES_FILE_KEY, CURVES_HASH_KEY, CURVES_NAME
from hf_ratequant.hub import CARD_NAME, HEATMAP_NAME, model_card

pytest_plugins = ["tests.hub_server"]

ROOT = Path(__file__).resolve().parent.parent / "hub_artifacts"
MODEL_CONFIGS = Path(__file__).resolve().parent / "model_configs"  # the other base models' config.json
EXPECTED = {f"SmolLM2-135M-Instruct-ratequant-{q}-{b}" for q in ("kivi", "token", "rotated") for b in ("2.5", "3")}
EXPECTED |= {"gemma-3-270m-ratequant-kivi-2.5", "gemma-3-270m-ratequant-kivi-3",
             "Qwen2.5-Coder-0.5B-Instruct-ratequant-kivi-2.5", "Qwen2.5-Coder-0.5B-Instruct-ratequant-kivi-3"}
FOLDERS = sorted(p for p in ROOT.iterdir() if (p / CONFIG_NAME).exists())
DEFAULT_MODEL_FOLDERS = [p for p in FOLDERS if p.name.startswith("SmolLM2-135M-Instruct-")]
OTHER_FOLDERS = [p for p in FOLDERS if p not in DEFAULT_MODEL_FOLDERS]


def _base_config(folder: Path):
    """The base model's transformers config, read from tests/model_configs/<model>.json (no weights needed)."""
    from transformers import AutoConfig

    name = folder.name.split("-ratequant-")[0]
    return AutoConfig.from_pretrained(MODEL_CONFIGS / f"{name}.json")


def test_every_artifact_is_there():
    assert {p.name for p in FOLDERS} == EXPECTED


@pytest.mark.parametrize("folder", FOLDERS, ids=[p.name for p in FOLDERS])
def test_artifact_is_golden(folder, tmp_path, smollm):
    config = RateQuantConfig.from_pretrained(folder)
    config.save_pretrained(tmp_path)
    curves_name = json.loads((folder / CONFIG_NAME).read_text())[CURVES_FILE_KEY]["name"]
    assert sorted(p.name for p in folder.glob("ratequant_*")) == sorted([CONFIG_NAME, curves_name])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, curves_name])
    for name in (CONFIG_NAME, curves_name):
        assert (tmp_path / name).read_bytes() == (folder / name).read_bytes(), f"{name} format drifted"
    evaluation = json.loads((folder / "evaluation.json").read_text())
    card = (folder / CARD_NAME).read_text(encoding="utf-8")
    license = evaluation.get("license", "apache-2.0")  # the base model's licence (Gemma's own for Gemma)
    assert card == model_card(config, evaluation["repo_id"], license=license, evaluation=evaluation["rows"]), \
        "card drifted"
    assert (folder / HEATMAP_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if folder in DEFAULT_MODEL_FOLDERS:
        model, _ = smollm
        config.check_model(model.config)
    else:
        config.check_model(_base_config(folder))
    assert config.average_bits == config.budget and config.quantizer in folder.name
    rows = {r["cache"]: r for r in evaluation["rows"]}
    assert rows["full precision (DynamicCache)"]["kl"] == 0 and len(rows) >= 3


@pytest.mark.parametrize("folder", FOLDERS[:1], ids=[p.name for p in FOLDERS[:1]])
def test_artifact_in_the_older_layout_loads_the_same(folder, tmp_path):
    """As published before the curves file was named by its hash: `ratequant_curves.safetensors`, recorded by its
    sha256 or (older still) by nothing. Both load as the artefact, and saving again gives the artefact's files."""
    settings = json.loads((folder / CONFIG_NAME).read_text())
    ref = settings.pop(CURVES_FILE_KEY)
    settings["version"] = 2
    raw = (folder / ref["name"]).read_bytes()
    expected = RateQuantConfig.from_pretrained(folder)
    for recorded in ({CURVES_HASH_KEY: hashlib.sha256(raw).hexdigest()}, {}):
        old = tmp_path / f"old-{len(recorded)}"
        old.mkdir()
        (old / CURVES_NAME).write_bytes(raw)
        (old / CONFIG_NAME).write_text(json.dumps({**settings, **recorded}, indent=2, sort_keys=True) + "\n")
        loaded = RateQuantConfig.from_pretrained(old)
        assert loaded.to_dict() == expected.to_dict() and loaded.curves.keys() == expected.curves.keys()
        assert all(torch.equal(loaded.curves[k], expected.curves[k]) for k in loaded.curves)
        loaded.save_pretrained(old)
        assert sorted(p.name for p in old.iterdir()) == sorted([CONFIG_NAME, ref["name"]])  # the old file removed
        for name in (CONFIG_NAME, ref["name"]):
            assert (old / name).read_bytes() == (folder / name).read_bytes()


@pytest.mark.parametrize("folder", OTHER_FOLDERS, ids=[p.name for p in OTHER_FOLDERS])
def test_artifact_serves_its_geometry(folder):
    """A random model with the base model's cache geometry (layers, kv-heads, head_dim, layer types, sliding window)
    but a small width and vocabulary generates through the config past the sliding window, and its cache holds what
    `cache_bytes` says."""
    from transformers import AutoModelForCausalLM

    from hf_ratequant import RateQuantCache
    from hf_ratequant.footprint import cache_bytes

    model_config = _base_config(folder)
    config = RateQuantConfig.from_pretrained(folder)
    fp = config.fingerprint
    # Narrow but of the same cache geometry: one query head per kv-head, head_dim as the base model's
    small = dict(hidden_size=fp.num_kv_heads * fp.head_dim, num_attention_heads=fp.num_kv_heads, head_dim=fp.head_dim,
                 intermediate_size=128, vocab_size=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                 max_position_embeddings=2048)
    model_config.update(small)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config).eval()
    cache = RateQuantCache.from_pretrained(folder, model=model)
    window = getattr(model_config, "sliding_window", None) or 256
    prompt = torch.randint(3, 256, (1, window + 160), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(prompt, past_key_values=cache, use_cache=True)
    assert cache.nbytes == cache_bytes(config, config.fingerprint, prompt.shape[1], dtype=torch.float32).total
    cache = RateQuantCache.from_pretrained(folder, model=model)
    out = model.generate(prompt, past_key_values=cache, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape[1] == prompt.shape[1] + 4


def test_card_snippet_runs_as_written(hub, smollm, monkeypatch, capsys):
    folder = ROOT / "SmolLM2-135M-Instruct-ratequant-kivi-2.5"
    repo_id = json.loads((folder / "evaluation.json").read_text())["repo_id"]
    # Published as is (seeded server-side: the card names the project's organisation, not the test user).
    hub.add_files(repo_id, {p.name: p.read_bytes() for p in folder.iterdir()})
    snippet = re.search(r"```python\n(.*?)```", (folder / CARD_NAME).read_text(), re.S).group(1)
    monkeypatch.setattr(hf_ratequant, "load_default_model", lambda: smollm)  # loaded once per session already
    exec(compile(snippet, "card snippet", "exec"), {})
    out = capsys.readouterr().out
    assert "cache:" in out and "in 16-bit" in out
