"""RateQuantConfig from the Hub: the real huggingface_hub client against the local stand-in server."""

import json

import pytest
import torch
from transformers import LlamaConfig

from hf_ratequant import RateQuantCache, RateQuantConfig
from hf_ratequant.config import CONFIG_NAME, CURVES_NAME

pytest_plugins = ["tests.hub_server"]

REPO = "local-user/tiny-ratequant"


@pytest.fixture
def llama_config():
    return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32)


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_load_from_hub_at_revision(hub, tmp_path, llama_config):
    first = tmp_path / "v1"
    RateQuantConfig.uniform(llama_config, key_bits=3, value_bits=2).save_pretrained(first)
    old_commit = hub.add_files(REPO, _files(first))
    second = tmp_path / "v2"
    cfg = RateQuantConfig.uniform(llama_config, bits=4)
    cfg.curves = {"beta": torch.full((2, 2, 2), 4.5)}
    cfg.save_pretrained(second)
    hub.add_files(REPO, _files(second))

    latest = RateQuantConfig.from_pretrained(REPO)
    assert latest.average_bits == 4 and float(latest.curves["beta"].mean()) == 4.5
    pinned = RateQuantConfig.from_pretrained(REPO, revision=old_commit)
    assert (pinned.key_bits[0][0], pinned.value_bits[0][0]) == (3, 2) and not pinned.curves
    cache = RateQuantCache.from_pretrained(REPO, model_config=llama_config, revision=old_commit)
    assert cache.layers[1].key_bits == [3, 3]


def test_hub_errors_say_what_to_do(hub, tmp_path, llama_config):
    with pytest.raises(OSError, match="No Hub repo 'local-user/missing'"):
        RateQuantConfig.from_pretrained("local-user/missing")
    hub.add_files(REPO, {"README.md": b"not a config"})
    with pytest.raises(OSError, match=f"has no {CONFIG_NAME}"):
        RateQuantConfig.from_pretrained(REPO)
    with pytest.raises(OSError, match="no revision 'v9'"):
        RateQuantConfig.from_pretrained(REPO, revision="v9")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        RateQuantConfig.from_pretrained("./no/such/folder")


def test_offline_uses_the_cache_and_fails_clearly_without_it(hub, tmp_path, llama_config):
    from tests.hub_server import offline_mode

    folder = tmp_path / "cfg"
    RateQuantConfig.uniform(llama_config, bits=2).save_pretrained(folder)
    hub.add_files(REPO, _files(folder))
    RateQuantConfig.from_pretrained(REPO)  # fills the cache
    with offline_mode():
        assert RateQuantConfig.from_pretrained(REPO).average_bits == 2
        with pytest.raises(OSError, match="not in the local Hub cache"):
            RateQuantConfig.from_pretrained("local-user/never-downloaded")


def test_only_json_and_safetensors_are_read(hub, tmp_path, llama_config):
    folder = tmp_path / "cfg"
    RateQuantConfig.uniform(llama_config, bits=2).save_pretrained(folder)
    files = _files(folder)
    files["pytorch_model.bin"] = b"\x80\x04not to be unpickled"
    hub.add_files(REPO, files)
    RateQuantConfig.from_pretrained(REPO)
    fetched = [path for _method, path in hub.requests if "/resolve/" in path]
    assert fetched and all(r.endswith((CONFIG_NAME, CURVES_NAME)) for r in fetched)
    assert json.loads(files[CONFIG_NAME])["quantizer"] == "kivi"
