"""The CPU dequantization kernel: `cpu_kernel.c`, compiled on first use and called through `ctypes`.

Decoding a cache step on the CPU dequantizes the whole quantized past of every layer. PyTorch ops do it in four
passes over memory (unpack, convert, scale, shift); this kernel does it in one, on all of torch's threads (OpenMP,
sharing torch's runtime), writing straight into the tensor that attention reads; for the rotated design it also
applies the inverse rotation, as a fast Walsh-Hadamard transform. For kivi and token its results equal the PyTorch
ops' bit for bit, so it changes speed only; for rotated the transform rounds differently from the ops' matrix
product, within 1e-5 relative (both tested).

It is compiled with the system C compiler (`$CC`, else `cc`; about 0.3 s) into
`$HF_RATEQUANT_CACHE` (default `~/.cache/hf_ratequant`)`/kernels/` (a folder in the temp dir where that is not
writable), one file per source, compiler, flags and CPU, and reused from there. Without a compiler, or if compiling
fails, a warning says so once and dequantization stays on PyTorch ops. `HF_RATEQUANT_CPU_KERNEL=0` turns the kernel
off. Only rows whose head_dim is a multiple of 8 (and whose groups span a multiple of 8 channels, or one) go through
it; anything else uses PyTorch ops. 8-bit scales ([`scales`]) are read as stored: the kernel decodes each row's
scales and zero-points from their bytes and their super-block's numbers, to the values `scales.decode` gives.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import scales

if TYPE_CHECKING:
    from .base import QuantizedBlock

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_suffix(".c")
ENV_SWITCH = "HF_RATEQUANT_CPU_KERNEL"
# Tried in order: the first set that compiles is used (no -march=native on compilers that refuse it; no OpenMP where
# the compiler has none, e.g. Apple clang). -ffp-contract=off keeps products and sums rounded separately.
_FLAG_SETS = (
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-march=native"),
    ("-O3", "-fopenmp"),
    ("-O3",),
)
_COMMON_FLAGS = ("-shared", "-fPIC", "-ffp-contract=off", "-std=c99")

_lock = threading.Lock()
_state: dict[str, object] = {}  # "fn": the loaded function, or None after a failure; "path": the shared library
_Int64x3 = ctypes.c_int64 * 3


def enabled() -> bool:
    """Whether the kernel may be used: `HF_RATEQUANT_CPU_KERNEL` is not set to 0/false/no/off."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    """Where compiled kernels are kept: `$HF_RATEQUANT_CACHE/kernels` (default `~/.cache/hf_ratequant/kernels`), or,
    when that cannot be created or written (a read-only home), a folder of this user's in the temporary directory."""
    root = os.environ.get("HF_RATEQUANT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "hf_ratequant"
    )
    user = getattr(os, "getuid", lambda: os.environ.get("USERNAME", "user"))()
    for folder in (Path(root) / "kernels", Path(tempfile.gettempdir()) / f"hf_ratequant-{user}" / "kernels"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK):
            return folder
    raise RuntimeError(f"no writable folder for the compiled kernel ({Path(root) / 'kernels'} or the temp dir)")


def _compiler() -> list[str] | None:
    for candidate in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc", "clang"):
        if candidate:
            argv = shlex.split(candidate)
            if argv and shutil.which(argv[0]):
                return argv
    return None


def _cpu_signature() -> str:
    """What `-march=native` depends on: the CPU model and its feature flags (Linux), else what platform reports."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _compiler_version(cc: list[str]) -> str:
    try:
        return subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _build(cc: list[str]) -> Path:
    """Compile the kernel (or find it compiled) and return the shared library's path; `RuntimeError` on failure."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([
        source, " ".join(cc).encode(), _compiler_version(cc).encode(), _cpu_signature().encode(),
        platform.machine().encode(), sys.implementation.cache_tag.encode(),
    ])).hexdigest()[:16]
    folder = cache_dir()
    errors = []
    for flags in _FLAG_SETS:
        tag = hashlib.sha256(" ".join(flags).encode()).hexdigest()[:6]
        target = folder / f"dequantize-{key}-{tag}.so"
        if target.is_file():
            return target
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".so", dir=folder)  # concurrent builds: rename wins
        os.close(fd)
        try:
            argv = [*cc, *flags, *_COMMON_FLAGS, "-o", tmp, str(SOURCE)]
            done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
            if done.returncode == 0:
                os.replace(tmp, target)
                return target
            errors.append(f"{' '.join(argv)}: {done.stderr.strip()[-500:]}")
        except (OSError, subprocess.SubprocessError) as e:
            errors.append(f"{' '.join(cc)}: {e}")
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    raise RuntimeError("; ".join(errors))


def _load():
    """The kernel function, compiled and loaded once per process; None when unavailable (warned once)."""
    if "fn" in _state:
        return _state["fn"]
    with _lock:
        if "fn" in _state:
            return _state["fn"]
        fn = None
        cc = _compiler()
        if sys.byteorder != "little":
            logger.warning("The CPU dequantization kernel reads codes little-endian; this machine is big-endian: "
                           "using PyTorch ops.")
        elif cc is None:
            logger.warning("No C compiler found ($CC, cc, gcc or clang): the KV cache dequantizes with PyTorch ops "
                           "on the CPU, which makes a decode step 1.4-1.7x slower at 8k tokens. Install a C "
                           "compiler (e.g. `apt install gcc`), or set %s=0 to silence this.", ENV_SWITCH)
        else:
            start = time.perf_counter()
            try:
                path = _build(cc)
                try:
                    lib = ctypes.CDLL(str(path))
                except OSError:  # a damaged file in the cache (a full disk, an edit): build it again, once
                    path.unlink(missing_ok=True)
                    path = _build(cc)
                    lib = ctypes.CDLL(str(path))
                fn = lib.rq_dequantize
                p = ctypes.c_void_p
                i64 = ctypes.c_int64
                fn.argtypes = [p, p, p, p, p, p, p, p, i64, i64, p, ctypes.c_int, p, p, i64, i64, i64, i64,
                               ctypes.c_int, i64, i64, i64, ctypes.c_int]
                fn.restype = ctypes.c_int
                _state["path"] = path
                logger.info("CPU dequantization kernel ready in %.1f s: %s", time.perf_counter() - start, path)
            except (OSError, RuntimeError) as e:
                fn = None
                logger.warning("Could not compile the CPU dequantization kernel (%s): the KV cache dequantizes with "
                               "PyTorch ops on the CPU, which makes a decode step 1.4-1.7x slower at 8k "
                               "tokens. Set %s=0 to silence this.", e, ENV_SWITCH)
        _state["fn"] = fn
        return fn


def available() -> bool:
    """Whether the kernel is enabled and loads (compiling it on first call)."""
    return enabled() and _load() is not None


_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # RQ_F32, RQ_BF16, RQ_F16 in cpu_kernel.c
MAX_CODED_GROUPS = 1024
"""Groups per row of scales the kernel decodes 8-bit scales for (its stack buffers); more use PyTorch ops."""


def supports(q: QuantizedBlock, out: torch.Tensor) -> bool:
    """Whether [`dequantize_into`] can handle `q` into `out`: float32 output, codes in rows of whole words, groups
    of one channel or of a multiple of 8; 8-bit scales (`q.ranges`) of a float32, bfloat16 or float16 cache."""
    d, ng = q.head_dim, q.scale.shape[-1]
    chunk = d // ng if ng and d % ng == 0 else 0
    return (
        q.codes.device.type == "cpu"
        and out.device.type == "cpu"
        and out.dtype == torch.float32
        and q.codes.dtype == torch.uint8
        and d % 8 == 0
        and (chunk == 1 or (chunk and chunk % 8 == 0))
        and q.codes.dim() == 4
        and tuple(q.codes.shape[:3]) + (d * q.bits // 8,) == tuple(q.codes.shape)
        and tuple(out.shape) == tuple(q.codes.shape[:3]) + (d,)
        and q.scale.shape == q.zero.shape == q.codes.shape[:2] + (q.codes.shape[2] // q.time_block, ng)
        and q.codes.shape[2] % q.time_block == 0
        and q.codes.stride(-1) == 1
        and out.stride(-1) == 1
        and (q.ranges is None or _coded_supported(q, ng))
    )


def _coded_supported(q: QuantizedBlock, ng: int) -> bool:
    r = q.ranges
    return (
        r.dtype in _DTYPE_CODES
        and r.device.type == "cpu"
        and q.scale.dtype == q.zero.dtype == torch.uint8
        and ng <= MAX_CODED_GROUPS
        and tuple(r.shape) in scales.ranges_shapes(tuple(q.scale.shape), q.time_block)
    )


def dequantize_into(q: QuantizedBlock, out: torch.Tensor, hadamard: int = 0) -> bool:
    """Write `codes * scale + zero` of `q` into the float32 tensor `out` `(batch, heads, tokens, head_dim)` (a view
    of a larger tensor is fine); False, with nothing written, when the kernel is off, unavailable, or not made for
    this layout (the caller then uses PyTorch ops). 8-bit scales are decoded inside the kernel, row by row (the
    values `scales.decode` gives, bit for bit).

    Args:
        hadamard (`int`, *optional*): if > 1, a power of two dividing head_dim: every row then also gets the
            unnormalised Sylvester-Hadamard transform of each `hadamard` consecutive channels (`rotated.fwht`'s
            result, bit for bit).
    """
    bad_block = hadamard > 1 and (hadamard & (hadamard - 1) or q.head_dim % hadamard)
    if bad_block or not enabled() or not supports(q, out):
        return False
    fn = _load()
    if fn is None:
        return False
    codes = q.codes
    if q.ranges is None:
        scale, zero = q.scale.float(), q.zero.float()
        ranges, range_strides, rn, rows, steps, dtype = None, _Int64x3(0, 0, 0), 1, 1, None, 0
    else:
        scale, zero = q.scale, q.zero
        ranges = q.ranges.float().contiguous()
        range_strides, rn = _Int64x3(*ranges.stride()[:3]), ranges.shape[3]
        rows, steps = scales.super_rows(q.time_block), scales.steps(codes.device).data_ptr()
        dtype = _DTYPE_CODES[q.ranges.dtype]
    if scale.stride() != zero.stride() or scale.stride(-1) != 1:
        scale, zero = scale.contiguous(), zero.contiguous()
    storage = codes.untyped_storage()
    end = storage.data_ptr() + storage.nbytes()
    b, h, t, _ = codes.shape
    status = fn(
        codes.data_ptr(), end, _Int64x3(*codes.stride()[:3]), scale.data_ptr(), zero.data_ptr(),
        _Int64x3(*scale.stride()[:3]), None if ranges is None else ranges.data_ptr(), range_strides, rn, rows,
        steps, dtype, out.data_ptr(), _Int64x3(*out.stride()[:3]), b, h, t, q.head_dim, q.bits, q.time_block,
        scale.shape[-1], max(hadamard, 0), torch.get_num_threads(),
    )
    return status == 0  # non-zero: a layout the kernel refuses, nothing written


__all__ = ["ENV_SWITCH", "available", "dequantize_into", "enabled", "supports"]
