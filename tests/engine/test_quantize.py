"""Weight-only quantisation on the CPU: the formats, their kernels, and the loader using them."""

from __future__ import annotations

import pytest
import torch

from llamachat.engine import ChatModel, DeviceError, KVCache
from llamachat.engine.quantize import (
    E4M3_MAX,
    GROUP,
    Fp8Linear,
    HalfWeightLinear,
    Int4Linear,
    Int8Linear,
    fp8_reference,
    pack_int4,
    quantize_activations,
    quantize_fp8,
    quantize_int4,
    quantize_int8,
    quantize_linear,
    quantize_model,
    round_rows_fp8,
    unpack_int4,
    weight_bytes,
)


def random_weight(rows: int = 96, columns: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed)) * 0.05


def test_int8_rounds_each_weight_to_within_half_a_step_of_its_row():
    weight = random_weight()
    q, scale = quantize_int8(weight)
    error = (q.float() * scale[:, None] - weight).abs()
    assert (error <= scale[:, None] / 2 + 1e-7).all()
    assert q.abs().amax(dim=1).eq(127).all()  # each row's largest weight uses the full range


def test_int4_rounds_each_weight_to_within_half_a_step_of_its_group():
    weight = random_weight()
    q, scale, offset = quantize_int4(weight)
    assert q.max() <= 15
    rebuilt = q.float().view(96, -1, GROUP) * scale[..., None] + offset[..., None]
    error = (rebuilt.view_as(weight) - weight).abs().view(96, -1, GROUP)
    assert (error <= scale[..., None] / 2 + 1e-6).all()


def test_int4_packing_round_trips_and_puts_four_consecutive_columns_in_each_nibble_half():
    generator = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (5, 128), dtype=torch.uint8, generator=generator)
    packed = pack_int4(q)
    assert packed.shape == (5, 64)
    words = packed.view(torch.int32)  # little-endian: byte b of word w is packed[:, 4w + b]
    for w in (0, 1, 9):
        low = [(words[:, w] >> (8 * b)) & 15 for b in range(4)]
        high = [(words[:, w] >> (8 * b + 4)) & 15 for b in range(4)]
        assert torch.equal(torch.stack(low, 1), q[:, 8 * w : 8 * w + 4].int())
        assert torch.equal(torch.stack(high, 1), q[:, 8 * w + 4 : 8 * w + 8].int())
    assert torch.equal(unpack_int4(packed), q)


def test_activations_round_to_within_half_an_int8_step_of_their_group():
    x = torch.randn(3, 4 * GROUP, generator=torch.Generator().manual_seed(2)) * 5
    x[0, :GROUP] = 0  # an all-zero group stays zero
    rounded = quantize_activations(x)
    step = x.view(3, 4, GROUP).abs().amax(-1, keepdim=True) / 127
    error = (rounded - x).view(3, 4, GROUP).abs()
    assert (error <= step / 2 + 1e-6).all()
    assert torch.equal(rounded[0, :GROUP], x[0, :GROUP])
    steps = rounded.view(3, 4, GROUP)[1:] / step[1:]
    assert torch.allclose(steps, steps.round(), atol=1e-3)  # whole multiples of the step


def e4m3_values() -> torch.Tensor:
    """Every finite float8_e4m3fn value, from its 256 bit patterns."""
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    return values[values.isfinite()]


def test_fp8_rounds_each_weight_to_the_nearest_e4m3_step_of_its_row():
    weight = random_weight()
    weight[3, 5] = 0.0
    q, scale = quantize_fp8(weight)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (96,)
    assert q.float().abs().amax(dim=1).eq(E4M3_MAX).all()  # each row's largest at 448
    scaled = weight / scale[:, None]
    # The nearest representable value: no E4M3 value lies closer to w / scale than q does.
    grid = e4m3_values()
    nearest = (scaled[..., None] - grid).abs().amin(-1)
    assert torch.allclose((q.float() - scaled).abs(), nearest, rtol=0, atol=1e-6)
    assert q[3, 5].float() == 0


def test_fp8_rows_round_to_e4m3_each_with_its_own_scale():
    x = torch.randn(4, 192, generator=torch.Generator().manual_seed(3)) * 7
    x[1] = 0  # an all-zero row: scale 1, values 0
    x[2] *= 1000  # rows are scaled alone: one large row changes no other
    q, scale = round_rows_fp8(x)
    assert scale[1].item() == 1.0 and q[1].float().eq(0).all()
    largest = x[[0, 2, 3]].abs().amax(-1)
    # Each row's largest |x| lands on E4M3's largest value; the scale is that times 1/448, as
    # the CUDA kernels compute it (a float32 rounding from the division, at most).
    assert torch.equal(scale[[0, 2, 3], 0], largest * (1 / E4M3_MAX))
    assert torch.allclose(scale[[0, 2, 3], 0], largest / E4M3_MAX, rtol=2**-23, atol=0)
    alone = [round_rows_fp8(x[row : row + 1]) for row in range(4)]
    assert torch.equal(q.float(), torch.cat([a[0].float() for a in alone]))
    relative = (q.float() * scale - x).abs() / x.abs().clamp(min=1e-3)
    assert relative[[0, 2, 3]].median() < 0.04  # E4M3: 3 mantissa bits, ≤ 1/16 off


def test_fp8_product_is_the_rounded_rows_times_the_e4m3_weight_times_both_scales():
    weight, x = random_weight(), torch.randn(5, 256, generator=torch.Generator().manual_seed(4))
    q, scale = quantize_fp8(weight)
    xq, x_scale = round_rows_fp8(x)
    expected = (xq.double() * x_scale.double()) @ (q.double() * scale.double()[:, None]).T
    out = fp8_reference(x, q, scale)
    assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-6)
    exact = x @ weight.T
    assert (out - exact).norm() <= 0.05 * exact.norm()
    layer = Fp8Linear(weight, None)
    assert torch.allclose(layer(x), out, rtol=1e-6, atol=1e-6)


def test_fp8_falls_back_to_int8_where_cublaslt_takes_no_fp8_product():
    assert isinstance(quantize_linear(random_weight(96, 256), None, "fp8"), Fp8Linear)
    assert isinstance(quantize_linear(random_weight(90, 256), None, "fp8"), Int8Linear)
    assert isinstance(quantize_linear(random_weight(96, 200), None, "fp8"), Int8Linear)


@pytest.mark.parametrize("kind", [Int8Linear, Int4Linear, HalfWeightLinear])
@pytest.mark.parametrize("rows", [1, 7])
def test_quantized_linear_multiplies_by_its_dequantized_weight(kind, rows):
    weight, bias = random_weight(), torch.randn(96) * 0.1
    layer = kind(weight, bias if kind is not Int4Linear else None)
    x = torch.randn(1, rows, 256, generator=torch.Generator().manual_seed(2))
    expected = x @ layer.dequantized().T + (bias if kind is not Int4Linear else 0)
    out = layer(x)
    assert out.shape == (1, rows, 96) and out.dtype == torch.float32
    # int8 and int4 take bf16 activations on the CPU: errors of bf16 rounding, not more.
    tolerance = 1e-5 if kind is HalfWeightLinear else 2e-2
    assert (out - expected).abs().max() <= tolerance * expected.abs().max()


def full_logits(model: ChatModel, tokens: torch.Tensor) -> torch.Tensor:
    model.transformer.setup_rope(128)
    cache = KVCache(model.config, 128, model.device, model.dtype)
    with torch.inference_mode():
        positions = torch.arange(tokens.shape[1])
        return model.transformer(tokens, positions, cache, 128, last_only=False)


# Relative error of the logits against fp32 on this random tiny model, bound at about twice what
# was measured: int8 1.3% (bf16 activations included), int4 12% (random weights fill their
# groups evenly, the worst case for 4 bits), f16 weights 0.04%. Real-model figures are in
# docs/BENCHMARKS.md.
BOUNDS = {"int8": 0.03, "int4": 0.25, "f16": 0.001}


@pytest.mark.parametrize("quantization", ["int8", "int4", "f16"])
def test_quantized_model_logits_stay_close_to_float32(tiny_model_factory, quantization):
    folder, _ = tiny_model_factory(intermediate_size=384)
    tokens = torch.randint(0, 384, (1, 64), generator=torch.Generator().manual_seed(0))
    reference = full_logits(ChatModel.load(folder, device="cpu"), tokens)
    quantized = ChatModel.load(folder, device="cpu", quantization=quantization)
    assert quantized.quantization == quantization
    logits = full_logits(quantized, tokens)
    relative = ((logits - reference).norm() / reference.norm()).item()
    assert 0 < relative < BOUNDS[quantization]


def test_loading_quantizes_every_projection_and_the_head_in_int8(tiny_model_factory):
    folder, _ = tiny_model_factory(intermediate_size=384)
    model = ChatModel.load(folder, device="cpu", quantization="int4")
    layer = model.transformer.layers[0]
    assert isinstance(layer.attention.wqkv, Int4Linear)
    assert isinstance(layer.feed_forward.w2, Int4Linear)
    assert isinstance(model.transformer.output, Int8Linear)
    full = ChatModel.load(folder, device="cpu")
    assert weight_bytes(model.transformer) < weight_bytes(full.transformer) / 2


def test_quantizing_while_loading_equals_quantizing_after(tiny_model_factory):
    folder, _ = tiny_model_factory(intermediate_size=384)
    tokens = torch.randint(0, 384, (1, 32), generator=torch.Generator().manual_seed(4))
    while_loading = full_logits(ChatModel.load(folder, device="cpu", quantization="int8"), tokens)
    after = ChatModel.load(folder, device="cpu")
    quantize_model(after.transformer, "int8")
    assert torch.equal(while_loading, full_logits(after, tokens))


def test_a_width_without_whole_int4_groups_falls_back_to_int8(tiny_model_factory):
    folder, _ = tiny_model_factory(intermediate_size=360)  # not a multiple of 32
    model = ChatModel.load(folder, device="cpu", quantization="int4")
    assert isinstance(model.transformer.layers[0].feed_forward.w13, Int4Linear)
    assert isinstance(model.transformer.layers[0].feed_forward.w2, Int8Linear)


@pytest.mark.parametrize(
    ("quantization", "dtype", "message"),
    [
        ("int3", "float32", "unknown quantisation"),
        ("f16", "bfloat16", "float32"),
        ("fp8", "float32", "GPU with FP8 tensor cores"),
    ],
)
def test_an_impossible_quantization_is_refused_clearly(
    tiny_model_factory, quantization, dtype, message
):
    folder, _ = tiny_model_factory()
    with pytest.raises(DeviceError, match=message):
        ChatModel.load(folder, device="cpu", dtype=dtype, quantization=quantization)


@pytest.mark.smollm2
def test_smollm2_greedy_with_f16_weights_is_the_float32_answer(smollm2, smollm2_dir):
    from llamachat.engine import GREEDY

    half = ChatModel.load(smollm2_dir, device="cpu", quantization="f16")
    for question in ("What is the capital of France?", "用一句话介绍长城。"):
        messages = [{"role": "user", "content": question}]
        full = smollm2.session().reply(messages, GREEDY, max_new_tokens=64)
        fast = half.session().reply(messages, GREEDY, max_new_tokens=64)
        assert "".join(fast) == "".join(full)
        assert fast.token_ids == full.token_ids
