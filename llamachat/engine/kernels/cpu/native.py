"""The C kernels for int4 on x86 CPUs (cpu_kernels.c): built with the system C compiler on first
use, kept in a cache folder, loaded with ctypes.

PyTorch's CPU int4 kernel takes bfloat16 activations and costs microseconds per operation; the
C decode step runs a whole token in one call, reading each packed weight once (SmolLM2: ~3× the
tokens/s). It needs AVX2, FMA and F16C and a C compiler; without them, or with
LLAMACHAT_NATIVE=0, int4 on the CPU runs on PyTorch's kernels as before.

The library's file name carries a hash of the source and the flags, so an edited source builds
anew; it is compiled under a temporary name and renamed into place, so a build that is killed,
or two that race, never leave a broken library behind.
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
import threading
import warnings
from pathlib import Path

import torch

SWITCH = "LLAMACHAT_NATIVE"  # "0" turns the C kernels off
CACHE_DIR_VARIABLE = "LLAMACHAT_NATIVE_CACHE_DIR"
SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-shared", "-fPIC")
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
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return all(feature in flags for feature in CPU_FEATURES)
    return False


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
        lib = ctypes.CDLL(str(build()))
    except (BuildError, OSError) as error:
        warnings.warn(
            f"llamachat: int4 on the CPU runs on PyTorch's slower kernels: {error}",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    _declare(lib)
    return lib


def build() -> Path:
    """The compiled library, compiling it if this source and flags have not been yet."""
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(FLAGS).encode()).hexdigest()[:16]
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
        command = [compiler, *FLAGS, "-o", temporary, str(SOURCE), "-lm"]
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
    lib.int4_matmul.argtypes = [_POINTER] * 5 + [_INT, _INT, _INT, _POINTER]
    lib.int4_matmul.restype = _INT
    lib.int4_dequantize.argtypes = [_POINTER] * 4 + [_INT, _INT]
    lib.int4_dequantize.restype = None
    lib.decode_step.argtypes = [
        ctypes.POINTER(Model),
        _POINTER,
        _INT,
        _POINTER,
        _POINTER,
        _INT,
        _POINTER,
        _POINTER,
        _POINTER,
    ]
    lib.decode_step.restype = _INT


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
    """x (T, K) times the int4 matrix's transpose, float32 (T, N).

    Up to ROUNDED_ROWS rows (a decode step, a short follow-up turn) are rounded to int8 in groups
    of 32 (quantize_activations) and multiplied in C, each row exactly as a decode step would,
    each weight row read once for four of them. Longer prompts multiply float32 weights
    dequantised block by block into a reused buffer, as CUDA's prefill does: past ~24-32 rows
    PyTorch's float32 GEMM out-runs the single-threaded int8 kernel (SmolLM2's forward, 8 rows:
    61 ms in C, 167 dequantised; 42 rows: 327 in C, 216 dequantised)."""
    rows, columns = x.shape
    out_features = weight.shape[0]
    x = x.float().contiguous()
    if rows <= ROUNDED_ROWS:
        out = torch.empty(rows, out_features)
        scratch = torch.empty((rows + 1) * (columns // 4 + 2 * (columns // 32)))  # rows + 6 K/32
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
        )
        if status != 0:
            raise MemoryError("the int4 product could not allocate its scratch memory")
        return out
    block = max(1, DEQUANTIZED_FLOATS // columns)  # weight rows per product
    buffer = _dequantized_buffer(min(block, out_features) * columns)
    out = torch.empty(out_features, rows)  # (N, T): each block of weight rows is contiguous
    for start in range(0, out_features, block):
        count = min(block, out_features - start)
        dequantized = buffer[: count * columns].view(count, columns)
        lib.int4_dequantize(
            weight[start].data_ptr(),
            scale[start].data_ptr(),
            offset[start].data_ptr(),
            dequantized.data_ptr(),
            count,
            columns,
        )
        torch.mm(dequantized, x.T, out=out[start : start + count])
    return out.T


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


ROUNDED_ROWS = 24  # rows up to which a product rounds x to int8 and runs in C
# Dequantised weights per product of more rows: all of any SmolLM2 matrix (16 MB), blocks of a
# bigger model's. One buffer per thread, kept: a fresh one per call costs its page faults.
DEQUANTIZED_FLOATS = 1 << 22
_buffers = threading.local()


def _dequantized_buffer(floats: int) -> torch.Tensor:
    buffer = getattr(_buffers, "tensor", None)
    if buffer is None or buffer.numel() < floats:
        buffer = _buffers.tensor = torch.empty(floats)
    return buffer
