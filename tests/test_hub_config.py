"""RateQuantConfig from the Hub: the real huggingface_hub client against the local stand-in server."""

import json

import pytest
import torch
from huggingface_hub import hf_hub_download
from transformers import LlamaConfig

from hf_ratequant import RateQuantCache, RateQuantConfig
from hf_ratequant.config import CONFIG_NAME, CURVES_FILE_KEY, CURVES_HASH_KEY, CURVES_NAME

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


def _tiny_model():
    from transformers import LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _calibrated_like(model_config):
    cfg = RateQuantConfig.uniform(model_config, key_bits=3, value_bits=2, residual_length=8, group_size=8)
    cfg.key_bits[1][0], cfg.value_bits[0][1] = 5, 4
    cfg.method, cfg.budget = "ratequant-measured", 2.75
    cfg.curves = {"alpha": torch.rand(2, 2, 2), "beta": torch.full((2, 2, 2), 4.4)}
    cfg.calibration = {"source": "test text", "winner": "ratequant-measured", "fit_tokens": 128,
                       "validation_kl": {"ratequant-measured": 0.01, "K3V2": 0.02}, "measure": "fisher",
                       "beta_median": {"key": 4.4, "value": 4.4}, "fit_r2_median": 0.99}
    return cfg


def test_push_pull_round_trip_is_bit_exact(hub, tmp_path):
    model = _tiny_model()
    local = _calibrated_like(model.config)
    info = local.push_to_hub(REPO)
    assert info.oid
    pulled = RateQuantConfig.from_pretrained(REPO)
    assert pulled.to_dict() == local.to_dict()
    assert all(torch.equal(pulled.curves[k], v) for k, v in local.curves.items())
    ids = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(0))

    def generate(cache):
        return model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=24,
                              do_sample=False)

    from_hub = generate(RateQuantCache.from_pretrained(REPO, model=model))
    assert torch.equal(from_hub, generate(RateQuantCache.from_pretrained(local, model=model)))
    files = {path.rsplit("/", 1)[-1] for _m, path in hub.requests if "/resolve/" in path}
    with open(hf_hub_download(REPO, CONFIG_NAME), encoding="utf-8") as f:
        assert files == {CONFIG_NAME, json.load(f)[CURVES_FILE_KEY]["name"]}
    card = open(hf_hub_download(REPO, "README.md"), encoding="utf-8").read()
    assert card.startswith("---\n") and "library_name: hf-ratequant" in card and "- kv-cache" in card
    assert "license: apache-2.0" in card and "![bits per layer and kv-head](allocation.png)" in card
    assert "| ratequant-measured (this config) | 0.01000 |" in card
    assert f'RateQuantCache.from_pretrained("{REPO}", model=model)' in card
    png = hf_hub_download(REPO, "allocation.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_save_pretrained_push_and_cli_push(hub, tmp_path, capsys):
    from hf_ratequant.cli import main

    model_config = _tiny_model().config
    folder = tmp_path / "cfg"
    _calibrated_like(model_config).save_pretrained(folder, push_to_hub=True, repo_id=REPO)
    assert RateQuantConfig.from_pretrained(REPO).budget == 2.75
    (folder / "README.md").write_text("---\nlicense: mit\n---\nmy own card\n")
    assert main(["push", str(folder), "local-user/second", "--message", "v1"]) == 0
    assert open(hf_hub_download("local-user/second", "README.md")).read().endswith("my own card\n")
    assert "pushed" in capsys.readouterr().out


def test_failed_push_leaves_the_folder_intact(hub, tmp_path):
    from huggingface_hub.errors import HfHubHTTPError

    from hf_ratequant.hub import push_folder

    folder = tmp_path / "cfg"
    _calibrated_like(_tiny_model().config).save_pretrained(folder)
    before = _files(folder)
    with pytest.raises(HfHubHTTPError):
        push_folder(folder, REPO, token="hf_wrong")
    assert _files(folder) == before
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        push_folder(tmp_path, REPO)  # not a config folder: refused before anything is sent


def test_repo_in_the_older_layout_loads(hub, tmp_path):
    """A repo pushed by an older release: `ratequant_curves.safetensors`, recorded by its sha256 or by nothing."""
    folder = tmp_path / "cfg"
    local = _calibrated_like(_tiny_model().config)
    local.save_pretrained(folder)
    files = _files(folder)
    settings = json.loads(files.pop(CONFIG_NAME))
    ref = settings.pop(CURVES_FILE_KEY)
    settings["version"] = local.version
    for repo, recorded in (("local-user/old-hashed", {CURVES_HASH_KEY: ref["sha256"]}), ("local-user/oldest", {})):
        hub.add_files(repo, {CONFIG_NAME: json.dumps({**settings, **recorded}).encode(),
                             CURVES_NAME: files[ref["name"]]})
        pulled = RateQuantConfig.from_pretrained(repo)
        assert pulled.to_dict() == local.to_dict()
        assert all(torch.equal(pulled.curves[k], v) for k, v in local.curves.items())


def test_truncated_curves_named_and_other_models_refused(hub, tmp_path):
    from transformers import MistralConfig

    folder = tmp_path / "cfg"
    _calibrated_like(_tiny_model().config).save_pretrained(folder)
    files = _files(folder)
    name = json.loads(files[CONFIG_NAME])[CURVES_FILE_KEY]["name"]
    files[name] = files[name][: len(files[name]) // 2]
    hub.add_files(REPO, files)
    with pytest.raises(ValueError, match=rf"{name} is not a readable safetensors file.*truncated"):
        RateQuantConfig.from_pretrained(REPO)
    good = _files(folder)
    hub.add_files("local-user/good", good)
    other = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=16)
    with pytest.raises(ValueError, match="calibrated for .*but the model is mistral"):
        RateQuantCache.from_pretrained("local-user/good", model_config=other)


def test_network_failure_mid_download(hub, tmp_path):
    import os

    from huggingface_hub import constants

    folder = tmp_path / "cfg"
    _calibrated_like(_tiny_model().config).save_pretrained(folder)
    hub.add_files(REPO, _files(folder))
    hub.cut_downloads = 100  # every download attempt (the client retries) is cut
    with pytest.raises(OSError, match=rf"{CONFIG_NAME} of .{REPO}. failed.*dropped"):
        RateQuantConfig.from_pretrained(REPO)
    cached = [f for _d, _s, files in os.walk(constants.HF_HUB_CACHE) for f in files]
    assert not any(f == CONFIG_NAME or f.endswith(".json") and "snapshots" in f for f in cached)
    hub.cut_downloads = 0  # the network is back: nothing half-written in the cache gets in the way
    assert RateQuantConfig.from_pretrained(REPO).to_dict() == RateQuantConfig.from_pretrained(folder).to_dict()


def test_card_says_how_many_windows_each_candidate_was_scored_on():
    from hf_ratequant.hub import model_card

    config = _calibrated_like(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=32))
    # Successive halving: K3V2 lost on the first 2 windows with a lower KL than the winner has over all 8.
    config.calibration["validation_kl"] = {"ratequant-measured": 0.01, "K3V2": 0.005, "ratequant": 0.02}
    config.calibration["validation_windows"] = {"ratequant-measured": 8, "K3V2": 2, "ratequant": 4}
    card = model_card(config, REPO)
    rows = [line for line in card.splitlines() if line.startswith("| ") and "windows" not in line]
    assert rows[-3:] == ["| ratequant-measured (this config) | 0.01000 | 8 |", "| ratequant | 0.02000 | 4 |",
                         "| K3V2 | 0.00500 | 2 |"]
    assert "scored on the first 2 windows" in card and "scored on all 8" in card and "lower bound" not in card

    config.calibration["validation_stopped"] = ["ratequant"]  # stopped early: its KL is a lower bound
    card = model_card(config, REPO)
    assert "| ratequant | > 0.02000 | 4 |" in card and "A KL marked > is a lower bound" in card

    del config.calibration["validation_stopped"]
    del config.calibration["validation_windows"]  # a config calibrated before successive halving
    card = model_card(config, REPO)
    assert "| K3V2 | 0.00500 |\n| ratequant-measured (this config) | 0.01000 |" in card and "halving" not in card


def test_card_states_code_bits_true_bits_and_bytes_at_4k_tokens():
    from hf_ratequant.footprint import cache_bytes
    from hf_ratequant.hub import model_card

    model_config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    config = RateQuantConfig.uniform(model_config, key_bits=3, value_bits=2)
    f = cache_bytes(config, config.fingerprint, 4096)
    card = model_card(config, REPO)
    assert (f"Storage: 2.5 average code bits, 3.5 bits per stored element with the 16-bit scales and zero-points; "
            f"at 4096 tokens a bf16/fp16 model's cache holds {f.total / 2**20:.2f} MiB against "
            f"{f.bytes_16bit / 2**20:.2f} MiB at 16 bits ({f.vs_16bit:.3f}x") in card
    config.fingerprint = None  # a config saved before fingerprints: nothing to compute the bytes from
    assert "Storage:" not in model_card(config, REPO)
