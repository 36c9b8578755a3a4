"""Weight-only quantisation: the linear layers' weights stored in fewer bytes, activations kept.

At batch 1 a decode step reads every weight once, so its time is the weight bytes over the memory
bandwidth: int8 halves what bf16 reads, int4 nearly quarters it.

- int8: one signed byte per weight and one scale per output channel (row).
- int4: two weights per byte, in groups of GROUP (32) along the input axis, each group with its own
  scale and offset: w = q·scale + offset, q in 0..15 (the shape of GGUF's Q4_1).
- fp8 (GPUs with FP8 tensor cores): E4M3 weights with a float32 scale per output channel,
  each layer's input rounded to E4M3 per row (kernels/cuda/fp8.py): prompts multiply on the FP8
  tensor cores, decode steps read a byte per weight as int8's do.
- f16 (CPU only): half-precision weights multiplied in float32 arithmetic (fbgemm). On a CPU the
  float32 matrix-vector product is bound by arithmetic, not memory; fbgemm's fp16 one is ~4×
  faster on the same core and its weights round at 2⁻¹¹, far below any quantisation error.

The layers hold the weights and pick a kernel per call; the kernels live by device under
kernels/. On CUDA a one-token product runs a Triton kernel that dequantises while it reads
(kernels/cuda/gemv.py; int4 rounds the activation row to int8 in groups of 32 for it). Prompts of
up to PROMPT_KERNEL_ROWS tokens multiply int8 weights in a Triton kernel that converts weight
tiles in registers (kernels/cuda/prefill.py); longer ones, and int4 ones, dequantise the weight
once per call and use cuBLAS. On an x86 CPU with AVX2, int4 runs C kernels with CUDA's layout and
arithmetic (kernels/cpu/); elsewhere on the CPU int8 and int4 use PyTorch's packed kernels, which
take bfloat16 activations.

The LM head is quantised to int8 under int4 too: it is one matrix and it decides every token.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DeviceError
from .kernels.cpu import native

if TYPE_CHECKING:
    from .kernels.cuda.activations import Int8Activations

QUANTIZATIONS = ("int8", "int4", "fp8", "f16")
# int4 weights per scale/offset pair, as in GGUF's Q4_0/Q4_1: divides every LLaMA width (576 …
# 28672), and a model shipped as Q4_1 (the default SmolLM2) re-quantises to its own values.
GROUP = 32
E4M3_MAX = 448.0  # float8_e4m3fn's largest finite value
CHOICES = ("auto", "none", *QUANTIZATIONS)  # what a user may ask for
# Up to this many rows an int8 product runs the Triton prompt kernel, which reads the int8
# weight as it is; more go to cuBLAS through a bf16 copy of the weight times its scales
# (benchmarks/int8_prefill_sweep.py, H200, the 8b matrices, a layer: 512 rows 0.60 ms in the
# kernel against 0.54 through the copy, 4,000 rows 4.30 against 2.39; bf16 itself 0.31 and 2.19).
# The serve step's 384 rows and fewer keep the kernel, whose weight reads do not grow with rows.
PROMPT_KERNEL_ROWS = 384


def resolve_quantization(
    choice: str | None, device: torch.device, dtype: torch.dtype, source_bits: int | None = None
) -> str | None:
    """A choice → the format to load with (None and "none": the weights as they are). `auto`,
    on a CPU computing in float32: int4 for weights that were 4-bit before (`source_bits`, a
    model converted from a Q4 GGUF: int4's groups of 32 give back their own values) where the
    C kernels run (several times f16's speed), else f16 where fbgemm runs (same answers, 2.4×
    float32's speed on SmolLM2); elsewhere none."""
    if choice == "auto":
        if device.type != "cpu" or dtype != torch.float32:
            return None
        if source_bits is not None and source_bits <= 4 and native.enabled():
            return "int4"
        return "f16" if fbgemm_available() else None
    if choice in (None, "none"):
        return None
    check_quantization(choice, device, dtype)
    return choice


def check_quantization(name: str | None, device: torch.device, dtype: torch.dtype) -> None:
    """One clear error for a combination that has no kernel."""
    if name is None:
        return
    if name not in QUANTIZATIONS:
        raise DeviceError(f"unknown quantisation {name!r}: use {', '.join(QUANTIZATIONS)}")
    if name == "fp8":
        if device.type != "cuda":
            raise DeviceError(
                "fp8 weights need an NVIDIA GPU with FP8 tensor cores: on a CPU use int4"
            )
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 9):
            raise DeviceError(
                f"fp8 weights need FP8 tensor cores (compute capability 8.9 or later: Ada, "
                f"Hopper); this GPU is {capability[0]}.{capability[1]}: use int8"
            )
        if dtype != torch.bfloat16:
            raise DeviceError("fp8 weights compute in bfloat16: use --dtype bfloat16 with them")
    if name == "f16":
        if device.type != "cpu":
            raise DeviceError("f16 weights are a CPU mode: on a GPU use bfloat16, int8 or int4")
        if dtype != torch.float32:
            raise DeviceError("f16 weights compute in float32: use --dtype float32 with them")
        if not fbgemm_available():
            raise DeviceError("f16 weights need PyTorch's fbgemm kernels (x86 CPUs)")


def fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


def quantize_linear(weight: torch.Tensor, bias: torch.Tensor | None, name: str) -> nn.Module:
    """A linear layer computing x·weightᵀ + bias with `weight` stored as `name` says."""
    if name == "int8":
        return Int8Linear(weight, bias)
    if name == "int4":
        if weight.shape[1] % GROUP:
            return Int8Linear(weight, bias)  # no whole groups: the next best thing
        return Int4Linear(weight, bias)
    if name == "fp8":
        if weight.shape[0] % 16 or weight.shape[1] % 16:
            return Int8Linear(weight, bias)  # cuBLASLt's FP8 products take multiples of 16
        return Fp8Linear(weight, bias)
    if name == "f16":
        return HalfWeightLinear(weight, bias)
    raise ValueError(name)


def quantizable(module_name: str) -> bool:
    """The projections of every block and the LM head; never the embedding or the norms."""
    return module_name == "output" or module_name.endswith(
        ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")
    )


def head_quantization(name: str) -> str:
    """The LM head's format under `name`: int8 under int4 and fp8, whose activations' rounding
    the head's logits would carry into every token's choice."""
    return "int8" if name in ("int4", "fp8") else name


def quantize_model(model: nn.Module, name: str) -> None:
    """Quantise a loaded model's projections in place (the loader does it while reading)."""
    check_quantization(name, next(model.parameters()).device, next(model.parameters()).dtype)
    for module_name, module in list(model.named_modules()):
        if quantizable(module_name) and isinstance(module, nn.Linear):
            mode = head_quantization(name) if module_name == "output" else name
            model.set_submodule(module_name, quantize_linear(module.weight, module.bias, mode))


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every weight, quantised or not, shared tensors counted once."""
    tensors = {t.data_ptr(): t for t in (*model.parameters(), *model.buffers())}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    halves = (m for m in model.modules() if isinstance(m, HalfWeightLinear))
    return total + sum(2 * m.in_features * m.out_features for m in halves)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (q int8 (N, K), scale float32 (N,)), weight ≈ q · scale."""
    weight = weight.float()
    scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 in groups of GROUP: (q uint8 (N, K) in 0..15, scale, offset (N, K/GROUP)
    float32), weight ≈ q · scale + offset."""
    rows, columns = weight.shape
    groups = weight.float().view(rows, columns // GROUP, GROUP)
    low = groups.amin(dim=-1)
    high = groups.amax(dim=-1)
    scale = ((high - low) / 15).clamp(min=1e-12)
    q = torch.round((groups - low[..., None]) / scale[..., None]).clamp_(0, 15)
    return q.to(torch.uint8).view(rows, columns), scale, low


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values 0..15 → (N, K/2) bytes. Read as int32 words, word w holds columns 8w+b in
    the low nibble of byte b and 8w+4+b in the high one (b = 0..3), so each nibble half of a
    word is four bytes that pair with four consecutive int8 activations (kernels/cuda/gemv.py)."""
    rows, columns = q.shape
    words = q.view(rows, columns // 8, 2, 4)  # (word, half, byte)
    return (words[:, :, 0] | (words[:, :, 1] << 4)).reshape(rows, columns // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    rows = packed.shape[0]
    words = packed.view(rows, -1, 4)
    return torch.stack((words & 15, words >> 4), dim=2).view(rows, -1)


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row E4M3: (q float8_e4m3fn (N, K), scale float32 (N,)), weight ≈ q · scale, each
    row's largest |w| at E4M3's largest value (448)."""
    weight = weight.float()
    scale = weight.abs().amax(dim=1).clamp(min=1e-12) / E4M3_MAX
    return (weight / scale[:, None]).to(torch.float8_e4m3fn), scale


def round_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) rounded to E4M3 per row as the FP8 kernels round it: (q, scale (..., 1))."""
    x = x.float()
    largest = x.abs().amax(dim=-1, keepdim=True)
    # Times 1/448, as PyTorch divides by a number on a GPU, and the row times the scale's
    # reciprocal: what the CUDA kernels compute, bit for bit, without a division per value.
    scale = torch.where(largest > 0, largest * (1 / E4M3_MAX), torch.ones_like(largest))
    return (x * torch.reciprocal(scale)).to(torch.float8_e4m3fn), scale


def fp8_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What the FP8 kernels compute, in float32 on any device: x (..., K) rounded per row times
    the E4M3 weight q (N, K), times both scales."""
    xq, x_scale = round_rows_fp8(x)
    return (xq.float() @ q.float().T) * x_scale * scale.float()


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """x (..., K) as the CUDA int4 kernel multiplies it: each group of GROUP values rounded to
    int8 steps of (its largest |x|)/127. The kernel's product is this times the dequantised
    weight (for tests, and for measuring its quality on a CPU)."""
    groups = x.float().unflatten(-1, (-1, GROUP))
    step = groups.abs().amax(dim=-1, keepdim=True) / 127
    step = torch.where(step > 0, step, torch.ones_like(step))
    return (torch.floor(groups / step + 0.5) * step).flatten(-2)


# LLAMACHAT_INT8_DP4A=0: one-row int8 products on a GPU multiply the activations unrounded, in
# float (the kernel before dp4a; benchmarks/decode_variants.py compares the two).
INT8_DP4A = os.environ.get("LLAMACHAT_INT8_DP4A", "1") == "1"


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        q, scale = quantize_int8(weight)
        # PyTorch's CPU kernel wants the scales in the activations' dtype, bf16 there.
        scale_dtype = torch.bfloat16 if weight.device.type == "cpu" else weight.dtype
        self._hold({"weight": q, "scale": scale.to(scale_dtype)}, bias)

    @classmethod
    def from_stored(cls, stored: dict[str, torch.Tensor], bias: torch.Tensor | None) -> Int8Linear:
        """The layer whose `stored_tensors()` these are, quantised by an earlier load."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._hold(stored, bias)
        return layer

    def _hold(self, stored: dict[str, torch.Tensor], bias: torch.Tensor | None) -> None:
        self.out_features, self.in_features = stored["weight"].shape
        self.register_buffer("weight", stored["weight"])
        self.register_buffer("scale", stored["scale"])
        self.bias = bias

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "scale": self.scale}

    @property
    def rounds_one_row(self) -> bool:
        """Whether one row on a GPU is multiplied rounded to int8 in groups of GROUP, as for
        int4 (kernels/cuda/gemv.py: int8_dp4a_gemv)."""
        return INT8_DP4A and self.in_features % GROUP == 0

    def forward(
        self,
        x: torch.Tensor,
        out_dtype: torch.dtype | None = None,
        activations: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`out_dtype`: the result's dtype where not x's (float32 logits, on a GPU written from
        the kernels' float32 sums). `activations`: one row x already rounded to int8 in groups
        (kernels/cuda/activations.py), where rounds_one_row."""
        flat = x.reshape(-1, self.in_features)
        if x.device.type == "cpu":
            out = torch._weight_int8pack_mm(flat.to(torch.bfloat16), self.weight, self.scale)
            out = out.to(out_dtype or x.dtype)
        elif flat.shape[0] == 1 and self.rounds_one_row:
            from .kernels.cuda.gemv import int8_dp4a_gemv

            out = int8_dp4a_gemv(flat, self.weight, self.scale, out_dtype, activations)
        elif flat.shape[0] == 1:
            from .kernels.cuda.gemv import int8_gemv

            out = int8_gemv(flat, self.weight, self.scale, out_dtype)
        elif flat.shape[0] <= PROMPT_KERNEL_ROWS:
            from .kernels.cuda.prefill import int8_matmul

            out = int8_matmul(flat, self.weight, self.scale, out_dtype)
        else:
            from .kernels.cuda.prefill import int8_dequantize

            weight = int8_dequantize(self.weight, self.scale, x.dtype)
            out = torch.mm(flat, weight.T, out_dtype=out_dtype or x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scale.float()[:, None]


class Int4Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        q, scale, offset = quantize_int4(weight)
        on_cpu = weight.device.type == "cpu"
        # On an x86 CPU with AVX2 the C kernels (kernels/cpu/) read the same layout as CUDA's.
        if on_cpu and native.library() is None:
            # PyTorch's CPU kernel computes (q - 8) · scale + zero with its own packing and the
            # pairs (scale, zero) laid out (K/GROUP, N, 2) in bf16.
            zero = offset + 8 * scale
            pairs = torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous()
            packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
            stored = {"weight": packed, "scale_and_zero": pairs.to(torch.bfloat16)}
        else:
            stored = {
                "weight": pack_int4(q),
                "scale": scale.to(torch.float16),
                "offset": offset.to(torch.float16),
            }
        self._hold(stored, bias, weight.shape)

    @classmethod
    def from_stored(cls, stored: dict[str, torch.Tensor], bias: torch.Tensor | None) -> Int4Linear:
        """The layer whose `stored_tensors()` these are, quantised by an earlier load on a
        machine of the same kind (the C kernels' layout, or PyTorch's packing, as here)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        if "scale_and_zero" in stored:
            groups = stored["scale_and_zero"].shape[0]
            shape = (stored["scale_and_zero"].shape[1], groups * GROUP)
        else:
            shape = (stored["weight"].shape[0], stored["weight"].shape[1] * 2)
        layer._hold(stored, bias, shape)
        return layer

    def _hold(
        self, stored: dict[str, torch.Tensor], bias: torch.Tensor | None, shape: torch.Size
    ) -> None:
        self.out_features, self.in_features = shape
        self.bias = bias
        self.on_cpu = stored["weight"].device.type == "cpu"
        self.native = native.library() if self.on_cpu and "scale" in stored else None
        for name, tensor in stored.items():
            self.register_buffer(name, tensor)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.named_buffers())

    def forward(self, x: torch.Tensor, rounded: Int8Activations | None = None) -> torch.Tensor:
        """`rounded`: on CUDA, a one-row x already rounded to int8 by the kernel that made it."""
        flat = x.reshape(-1, self.in_features)
        if self.native is not None:
            out = native.int4_linear(self.native, flat, self.weight, self.scale, self.offset)
            out = out.to(x.dtype).contiguous()
        elif self.on_cpu:
            out = torch._weight_int4pack_mm_for_cpu(
                flat.to(torch.bfloat16), self.weight, GROUP, self.scale_and_zero
            ).to(x.dtype)
        elif flat.shape[0] == 1:
            from .kernels.cuda.gemv import int4_gemv

            out = int4_gemv(flat, self.weight, self.scale, self.offset, rounded)
        else:
            from .kernels.cuda.prefill import int4_dequantize

            weight = int4_dequantize(self.weight, self.scale, self.offset, x.dtype)
            out = F.linear(flat, weight)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        if self.native is not None:
            return native.int4_dequantize(self.native, self.weight, self.scale, self.offset)
        if self.on_cpu:
            eye = torch.eye(self.in_features, dtype=torch.bfloat16)
            columns = torch._weight_int4pack_mm_for_cpu(
                eye, self.weight, GROUP, self.scale_and_zero
            )
            return columns.float().T.contiguous()
        q = unpack_int4(self.weight).view(self.out_features, -1, GROUP)
        weight = q * self.scale[..., None] + self.offset[..., None]  # (N, K/GROUP, GROUP) fp16
        return weight.view(self.out_features, self.in_features).float()


class Fp8Linear(nn.Module):
    """E4M3 weights, a float32 scale per output row (kernels/cuda/fp8.py); on a CPU (tests,
    quality measurements) the same arithmetic in PyTorch (fp8_reference)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        q, scale = quantize_fp8(weight)
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale.view(1, -1))  # (1, N): cuBLASLt's row-wise form
        self.bias = bias

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if x.device.type == "cuda":
            from .kernels.cuda.fp8 import fp8_linear

            out = fp8_linear(flat, self.weight, self.scale, out_dtype or x.dtype)
        else:
            out = fp8_reference(flat, self.weight, self.scale).to(out_dtype or x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scale.view(-1, 1)


class HalfWeightLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        # fbgemm's packed matrix is an opaque object, not a tensor: it lives outside state_dict.
        self.packed = torch.ops.quantized.linear_prepack_fp16(weight.float(), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = torch.ops.quantized.linear_dynamic_fp16(flat, self.packed)
        return out.view(*x.shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        weight, _ = torch.ops.quantized.linear_unpack_fp16(self.packed)
        return weight.float()
