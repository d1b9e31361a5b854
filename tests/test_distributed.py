"""Data-parallel calibration: `accelerate launch --num_processes 2` on CPU gives the single-process config."""

import os
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hf_ratequant import RateQuantConfig, calibrate, load_model
from hf_ratequant.distributed import Processes

WORDS = "the a cat dog runs sleeps on under table mat quickly slowly red blue big small and then".split()
SETTINGS = dict(n_samples=4, n_validation=2, seq_len=64, group_size=8, residual_length=8, b_min=2, b_max=4)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama and a word-level tokenizer saved like any Hub model, and a calibration text file."""
    folder = tmp_path_factory.mktemp("tiny")
    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<unk>").save_pretrained(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, architectures=["LlamaForCausalLM"])
    LlamaForCausalLM(cfg).save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    text = " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (3000,), generator=g).tolist())
    (folder / "calib.txt").write_text(text)
    return folder


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_single_process_is_one_process():
    procs = Processes()
    assert (procs.count, procs.index, procs.is_main) == (1, 0, True)
    x = torch.arange(5)
    assert procs.shard(x, "x") is x and procs.sum(x) is x


def test_batching_does_not_change_the_measurement(model_dir):
    model, tok = load_model(str(model_dir))
    one = calibrate(model, tok, str(model_dir / "calib.txt"), batch_size=1, progress=False, **SETTINGS)
    four = calibrate(model, tok, str(model_dir / "calib.txt"), batch_size=4, progress=False, **SETTINGS)
    assert torch.allclose(one.curves["distortion"], four.curves["distortion"], rtol=1e-4)
    assert one.bits_tensor().tolist() == four.bits_tensor().tolist()


def test_two_processes_equal_one(model_dir, tmp_path):
    model, tok = load_model(str(model_dir))
    single = calibrate(model, tok, str(model_dir / "calib.txt"), progress=False, **SETTINGS)
    out = tmp_path / "two"
    # On a machine without GPUs, `--multi_gpu` just starts the processes through torchrun and hf_ratequant forms a
    # CPU (gloo) process group; accelerate's `--cpu` launcher needs MPI to start more than one process.
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
        "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        "-m", "hf_ratequant", "calibrate", "--model", str(model_dir), "--data", str(model_dir / "calib.txt"),
        "--samples", "4", "--validation", "2", "--seq-len", "64", "--group-size", "8", "--residual-length", "8",
        "--b-min", "2", "--b-max", "4", "-o", str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    two = RateQuantConfig.from_pretrained(out)
    assert two.calibration["processes"] == 2 and single.calibration["processes"] == 1
    assert two.bits_tensor().tolist() == single.bits_tensor().tolist()
    for name in ("alpha", "beta"):
        assert torch.allclose(two.curves[name], single.curves[name], rtol=1e-4, atol=0), name
    stopped = single.calibration.get("validation_stopped", [])  # one process stops the hopeless early; two cannot
    assert not two.calibration.get("validation_stopped")
    for name, kl in single.calibration["validation_kl"].items():
        if name in stopped:
            assert kl <= two.calibration["validation_kl"][name] * (1 + 1e-4)
        else:
            assert two.calibration["validation_kl"][name] == pytest.approx(kl, rel=1e-4)
    assert two.method == single.method


def test_processes_that_disagree_fail_on_every_rank(model_dir, tmp_path):
    script = tmp_path / "disagree.py"
    script.write_text(
        "import os, sys\n"
        "from hf_ratequant import calibrate, load_model\n"
        f"model, tok = load_model({str(model_dir)!r})\n"
        "rank = int(os.environ['RANK'])\n"
        f"text = open({str(model_dir / 'calib.txt')!r}).read()\n"
        "data = [text if rank == 0 else text[::-1]]  # rank 1 calibrates on other text\n"
        "try:\n"
        f"    calibrate(model, tok, data, progress=False, **{SETTINGS!r})\n"
        "except ValueError as e:\n"
        "    print(f'rank {rank}: {e}', flush=True)\n"
        "    sys.exit(3)\n"
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(script)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode != 0
    for rank in (0, 1):
        said = f"rank {rank}: The processes disagree on the model, data or settings"
        assert said in run.stdout, run.stdout + run.stderr[-4000:]
