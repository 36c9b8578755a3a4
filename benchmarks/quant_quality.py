"""What quantisation costs in quality, on SmolLM2-135M-Instruct (CPU, one run).

For each prompt the reference model (bf16 weights and activations) answers greedily; each
quantised model then answers the same prompt (greedy agreement: how many leading tokens are the
reference's) and reads the reference's whole text teacher-forced (logit error, top-1 agreement
and KL divergence at every position). f16 weights are compared with float32 the same way.

"int4-cuda" is the CUDA int4 path's arithmetic emulated in float32 on the CPU: int4 weights (fp16
scales and offsets, as on the GPU) times activations rounded to int8 in groups of 32
(quantize.quantize_activations), the LM head int8; "int8-cuda" the CUDA int8 path's one-row
products the same way (int8 weights, bf16 row scales, times activations rounded to int8 in
groups of 32, the head too; prompts on the GPU multiply the activations unrounded, so this
is the decode steps' arithmetic at every position). "fp8" is the GPU's fp8 path the same way:
E4M3 weights with a scale per row times each activation row rounded to E4M3
(quantize.fp8_reference, what Fp8Linear runs on a CPU), the LM head int8; "fp8-weights" the same
weights times the activations unrounded.

    python benchmarks/quant_quality.py MODEL_FOLDER [--tokens 256] [--pairs int8,fp8,f16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch import nn  # noqa: E402

from llamachat.engine import GREEDY, ChatModel, KVCache  # noqa: E402
from llamachat.engine.quantize import (  # noqa: E402
    GROUP,
    Fp8Linear,
    Int8Linear,
    quantizable,
    quantize_activations,
    quantize_int4,
)

PROMPTS = [
    "Write a long story about a dragon who learns to read.",
    "Explain how a hash table works, with a short Python example.",
    "用三段话介绍长城的历史。",
    "List ten facts about the planet Mars.",
]
PAIRS = {
    "int8": ("bfloat16", "int8"),
    "int4": ("bfloat16", "int4"),
    "int8-cuda": ("bfloat16", "int8-cuda"),
    "int4-cuda": ("bfloat16", "int4-cuda"),
    "fp8": ("bfloat16", "fp8"),
    "fp8-weights": ("bfloat16", "fp8-weights"),
    "f16": ("float32", "f16"),
}


class CudaInt4Emulation(nn.Module):
    """What gemv.int4_gemv computes, in float32: int8-rounded activations times the dequantised
    int4 weight."""

    def __init__(self, weight: torch.Tensor, bias: None = None):
        super().__init__()
        rows = weight.shape[0]
        q, scale, offset = quantize_int4(weight)
        scale, offset = scale.half().float(), offset.half().float()
        dequantized = q.float().view(rows, -1, GROUP) * scale[..., None] + offset[..., None]
        self.weight = dequantized.view(rows, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (quantize_activations(x) @ self.weight.T).to(x.dtype)


class CudaInt8Emulation(nn.Module):
    """What gemv.int8_dp4a_gemv computes for one row, in float32: int8-rounded activations
    times the int8 weight and its bf16 row scales (the head too)."""

    def __init__(self, weight: torch.Tensor, bias: None = None):
        super().__init__()
        self.weight = Int8Linear(weight, None).dequantized()  # its scales bf16 on a CPU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (quantize_activations(x) @ self.weight.T).to(x.dtype)


class Fp8WeightsOnly(nn.Module):
    """E4M3 weights (fp8's) times the activations as they are: what fp8 would cost without
    rounding each layer's input, to tell the two roundings' shares apart."""

    def __init__(self, weight: torch.Tensor, bias: None = None):
        super().__init__()
        self.weight = Fp8Linear(weight, None).dequantized()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() @ self.weight.T).to(x.dtype)


# GPU paths, emulated on the CPU
EMULATED = {
    "int8-cuda": CudaInt8Emulation, "int4-cuda": CudaInt4Emulation, "fp8": Fp8Linear,
    "fp8-weights": Fp8WeightsOnly,
}  # fmt: skip


def load(folder: Path, dtype: str, quantization: str) -> ChatModel:
    if quantization not in EMULATED:
        return ChatModel.load(folder, device="cpu", dtype=dtype, quantization=quantization)
    model = ChatModel.load(folder, device="cpu", dtype=dtype)
    for name, module in list(model.transformer.named_modules()):
        if quantizable(name) and isinstance(module, nn.Linear):
            head = name == "output" and quantization != "int8-cuda"
            layer = Int8Linear if head else EMULATED[quantization]
            model.transformer.set_submodule(name, layer(module.weight, None))
    return model


def answer(model: ChatModel, prompt: str, tokens: int) -> tuple[list[int], list[int]]:
    messages = [{"role": "user", "content": prompt}]
    reply = model.session(ctx=1024).reply(messages, GREEDY, max_new_tokens=tokens, stop=())
    list(reply)
    return model.prompt_ids(messages), reply.token_ids


def all_logits(model: ChatModel, ids: list[int]) -> torch.Tensor:
    transformer = model.transformer
    transformer.setup_rope(1024)
    cache = KVCache(model.config, 1024, model.device, model.dtype)
    tokens = torch.tensor([ids])
    with torch.inference_mode():
        logits = transformer(tokens, torch.arange(len(ids)), cache, 1024, last_only=False)
    return logits[0].float()


def leading_agreement(a: list[int], b: list[int]) -> int:
    count = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--pairs", default=",".join(PAIRS))
    args = parser.parse_args()
    print(
        "| weights | vs | greedy tokens agreeing (per prompt) | top-1 agreement (teacher-forced) "
        "| mean KL (nats) | relative logit error |"
    )
    print("|---|---|---|---|---|---|")
    for dtype, quantization in (PAIRS[name] for name in args.pairs.split(",")):
        reference = ChatModel.load(args.folder, device="cpu", dtype=dtype)
        quantized = load(args.folder, dtype, quantization)
        agreements, top1, kls, errors = [], [], [], []
        for prompt in PROMPTS:
            prompt_ids, expected = answer(reference, prompt, args.tokens)
            _, got = answer(quantized, prompt, args.tokens)
            agreements.append(f"{leading_agreement(expected, got)}/{len(expected)}")
            ids = prompt_ids + expected
            ref_logits = all_logits(reference, ids)[len(prompt_ids) - 1 : -1]
            q_logits = all_logits(quantized, ids)[len(prompt_ids) - 1 : -1]
            top1.append((ref_logits.argmax(-1) == q_logits.argmax(-1)).float().mean().item())
            ref_log_probs = ref_logits.log_softmax(-1)
            kl = (ref_log_probs.exp() * (ref_log_probs - q_logits.log_softmax(-1))).sum(-1)
            kls.append(kl.mean().item())
            errors.append(((q_logits - ref_logits).norm() / ref_logits.norm()).item())
        base = "float32" if dtype == "float32" else "bf16"
        print(
            f"| {quantization} | {base} | {', '.join(agreements)} "
            f"| {100 * statistics.mean(top1):.1f}% | {statistics.mean(kls):.4f} "
            f"| {100 * statistics.mean(errors):.2f}% |",
            flush=True,
        )


if __name__ == "__main__":
    main()
