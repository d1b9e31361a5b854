"""Importing the package stays lean: datasets, matplotlib, gguf and triton load only when used. (transformers itself
imports quanto and hqq at import time when they are installed; that is not ours to change.)"""

import subprocess
import sys


def test_import_does_not_pull_heavy_optional_modules():
    """Only what transformers itself already imported may be there (it imports triton through hqq, when installed)."""
    code = (
        "import sys; heavy = ('datasets', 'matplotlib', 'gguf', 'triton'); "
        "import transformers, transformers.cache_utils; "
        "before = {m for m in heavy if m in sys.modules}; import hf_ratequant; "
        "print(','.join(m for m in heavy if m in sys.modules and m not in before))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_public_names():
    import hf_ratequant

    for name in hf_ratequant.__all__:
        assert hasattr(hf_ratequant, name), name
    assert {"RateQuantCache", "RateQuantConfig", "calibrate", "load_default_model"} <= set(hf_ratequant.__all__)
