"""The C kernels for int4 on x86 CPUs (cpu_kernels.c): built with the system C compiler on first
use, kept in a cache folder, loaded with ctypes.

PyTorch's CPU int4 kernel takes bfloat16 activations and costs microseconds per operation; the
C decode step runs a whole token in one call, reading each packed weight once, on as many
threads as PyTorch is given. It needs AVX2, FMA and F16C and a C compiler; without them, or
with LLAMACHAT_NATIVE=0, int4 on the CPU runs on PyTorch's kernels as before.

It is compiled for the CPU it runs on (-march=native: AVX-512 VNNI where there is one). The
library's file name carries a hash of the source, the flags and the CPU's model and features,
so an edited source, or a home folder shared with another machine, builds anew; it is compiled
under a temporary name and renamed into place, so a build that is killed, or two that race,
never leave a broken library behind.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SWITCH = "LLAMACHAT_NATIVE"  # "0" turns the C kernels off
CACHE_DIR_VARIABLE = "LLAMACHAT_NATIVE_CACHE_DIR"
SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ("-O3", "-march=native", "-mavx2", "-mfma", "-mf16c", "-shared", "-fPIC", "-pthread")
# What a CPU with AVX2 but no AVX-512 VNNI gets from FLAGS: the tests build it to check that path.
PORTABLE_FLAGS = tuple(flag for flag in FLAGS if flag != "-march=native")
CPU_FEATURES = ("avx2", "fma", "f16c")


class BuildError(Exception):
    pass


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None where they are off or cannot run here."""
    if os.environ.get(SWITCH, "1") == "0":
        return None
    return _loaded()


def enabled() -> bool:
    return library() is not None


def cpu_supported() -> bool:
    """Whether this CPU has the instructions the kernels use (read from Linux's /proc/cpuinfo;
    elsewhere the answer is no and PyTorch's kernels run)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    flags = set(_cpu_description().get("flags", "").split())
    return all(feature in flags for feature in CPU_FEATURES)


@functools.cache
def _cpu_description() -> dict[str, str]:
    """The first processor's lines of /proc/cpuinfo that say what code runs on it."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    found: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("vendor_id", "model name", "flags") and key not in found:
            found[key] = value.strip()
    return found


def cache_dir() -> Path:
    """LLAMACHAT_NATIVE_CACHE_DIR, else `native` in llamachat's cache folder. The kernels run
    on Linux only (cpu_supported reads /proc/cpuinfo), where that folder is XDG's, as
    platformdirs (which the engine does without) would say."""
    folder = os.environ.get(CACHE_DIR_VARIABLE)
    if folder:
        return Path(folder).expanduser()
    cache = os.environ.get("LLAMACHAT_CACHE_DIR")
    if cache:
        return Path(cache).expanduser() / "native"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llamachat" / "native"


@functools.cache
def _loaded() -> ctypes.CDLL | None:
    """Built and loaded once per process; a failure warns once and leaves PyTorch's kernels."""
    if not cpu_supported():
        return None
    try:
        return load(FLAGS)
    except (BuildError, OSError) as error:
        warnings.warn(
            f"llamachat: int4 on the CPU runs on PyTorch's slower kernels: {error}",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def load(flags: tuple[str, ...]) -> ctypes.CDLL:
    """The library built with `flags`, loaded (a copy of its own, its own threads)."""
    lib = ctypes.CDLL(str(build(flags)))
    _declare(lib)
    return lib


def build(flags: tuple[str, ...] = FLAGS) -> Path:
    """The compiled library, compiling it if this source and flags have not been yet."""
    source = SOURCE.read_bytes()
    machine = " ".join(flags) + repr(sorted(_cpu_description().items()))
    digest = hashlib.sha256(source + machine.encode()).hexdigest()[:16]
    folder = cache_dir()
    target = folder / f"cpu_kernels-{digest}.so"
    if target.exists():
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise BuildError("no C compiler (cc or gcc) to build its C kernels with")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=target.stem, suffix=".tmp", dir=folder)
        os.close(handle)
    except OSError as error:
        raise BuildError(f"cannot write to {folder}: {error}") from None
    try:
        command = [compiler, *flags, "-o", temporary, str(SOURCE), "-lm"]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise BuildError(f"{compiler} failed to run: {error}") from None
        if result.returncode != 0:
            lines = result.stderr.strip().splitlines() or ["no message"]
            raise BuildError(f"{compiler} could not build its C kernels: {lines[-1]}")
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return target


# ---------------------------------------------------------------------------- the C functions

_POINTER = ctypes.c_void_p
_INT = ctypes.c_int


class Int4Matrix(ctypes.Structure):
    _fields_ = [("weight", _POINTER), ("scale", _POINTER), ("offset", _POINTER)]


class Layer(ctypes.Structure):
    _fields_ = [
        ("qkv", Int4Matrix),
        ("wo", Int4Matrix),
        ("w13", Int4Matrix),
        ("w2", Int4Matrix),
        ("attention_norm", _POINTER),
        ("ffn_norm", _POINTER),
    ]


class Model(ctypes.Structure):
    _fields_ = [
        *((name, _INT) for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim")),
        *((name, _INT) for name in ("ffn", "vocab")),
        ("eps", ctypes.c_float),
        ("attention_scale", ctypes.c_float),
        ("layers", ctypes.POINTER(Layer)),
        ("final_norm", _POINTER),
        ("head_weight", _POINTER),
        ("head_scale", _POINTER),
    ]


def _declare(lib: ctypes.CDLL) -> None:
    lib.int4_matmul.argtypes = [_POINTER] * 5 + [_INT, _INT, _INT, _POINTER, _INT]
    lib.int4_matmul.restype = _INT
    lib.int4_dequantize.argtypes = [_POINTER] * 4 + [_INT, _INT]
    lib.int4_dequantize.restype = None
    lib.prompt_step.argtypes = [
        ctypes.POINTER(Model),
        _POINTER,
        _INT,
        _INT,
        _POINTER,
        _POINTER,
        _INT,
        ctypes.c_longlong,
        _POINTER,
        _POINTER,
        _POINTER,
        _INT,
        _INT,
    ]
    lib.prompt_step.restype = _INT
    lib.vnni512.argtypes = []
    lib.vnni512.restype = _INT


def int4_matrix(weight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> Int4Matrix:
    """An int4 matrix as the C code reads it: pack_int4's bytes, float16 scales and offsets."""
    assert weight.dtype == torch.uint8 and scale.dtype == offset.dtype == torch.float16
    assert weight.is_contiguous() and scale.is_contiguous() and offset.is_contiguous()
    return Int4Matrix(weight.data_ptr(), scale.data_ptr(), offset.data_ptr())


def int4_linear(
    lib: ctypes.CDLL,
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
) -> torch.Tensor:
    """x (T, K) times the int4 matrix's transpose, float32 (T, N): each row rounded to int8 in
    groups of 32 (quantize_activations) and multiplied in C on PyTorch's thread count, each
    weight row read once for four of them.

    Every row gets exactly what it would get alone, so a token's keys and values are the same
    whether its prompt was read in one chunk, in several, partly borrowed from another
    conversation's cache, or token by token: a served answer is the CLI's, a resumed one a
    fresh session's. (A float32 GEMM on dequantised weights read long prompts faster on two
    cores, but its sums, and the rounding they skipped, depended on the chunk.)"""
    rows, columns = x.shape
    out_features = weight.shape[0]
    x = x.float().contiguous()
    out = torch.empty(rows, out_features)
    scratch = torch.empty(rows * (columns // 4 + 2 * (columns // 32)))
    status = lib.int4_matmul(
        weight.data_ptr(),
        scale.data_ptr(),
        offset.data_ptr(),
        x.data_ptr(),
        out.data_ptr(),
        rows,
        out_features,
        columns,
        scratch.data_ptr(),
        torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError("the int4 product could not allocate its scratch memory")
    return out


def int4_dequantize(
    lib: ctypes.CDLL, weight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor
) -> torch.Tensor:
    """The float32 (N, K) matrix: q · scale + offset."""
    rows, columns = weight.shape[0], weight.shape[1] * 2
    out = torch.empty(rows, columns)
    lib.int4_dequantize(
        weight.data_ptr(), scale.data_ptr(), offset.data_ptr(), out.data_ptr(), rows, columns
    )
    return out
