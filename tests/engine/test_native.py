"""The C kernels for int4 on x86 CPUs (engine/kernels/cpu/): their arithmetic against PyTorch
references, the decode step against the PyTorch step, the switch and the fallback.

They run wherever the CPU has AVX2, FMA and F16C (CI's does, and has gcc): there a missing
compiler or a failed build fails these tests instead of skipping them."""

from __future__ import annotations

import statistics
import warnings

import pytest
import torch
from torch import nn

from llamachat.engine import ChatModel, KVCache
from llamachat.engine.decode.cpu import CpuDecodeStep
from llamachat.engine.decode.native import NativeDecodeStep
from llamachat.engine.kernels.cpu import native
from llamachat.engine.quantize import (
    GROUP,
    Int4Linear,
    Int8Linear,
    quantize_activations,
    quantize_int4,
)

pytestmark = pytest.mark.skipif(
    not native.cpu_supported(), reason="the C kernels need an x86 CPU with AVX2, FMA and F16C"
)


@pytest.fixture(autouse=True)
def native_on(monkeypatch):
    monkeypatch.delenv(native.SWITCH, raising=False)
    assert native.library() is not None, "the C kernels did not build on a CPU that has AVX2"


@pytest.fixture(params=["native", "portable"])
def build(request, monkeypatch):
    """Each build of the kernels in turn: the one for this CPU (-march=native: AVX-512 VNNI on
    CI's), and the AVX2 one that CPUs without it get; the layers loaded meanwhile use it."""
    if request.param == "portable":
        lib = native.load(native.PORTABLE_FLAGS)
        assert lib.vnni512() == 0
        monkeypatch.setattr(native, "_loaded", lambda: lib)
    return request.param


def reference_dequantized(weight: torch.Tensor) -> torch.Tensor:
    """quantize_int4's weight with its scale and offset stored in float16, as the layer keeps
    them, computed here in float32 by PyTorch."""
    rows, columns = weight.shape
    q, scale, offset = quantize_int4(weight)
    scale, offset = scale.half().float(), offset.half().float()
    groups = q.float().view(rows, -1, GROUP) * scale[..., None] + offset[..., None]
    return groups.view(rows, columns)


KV_HEADS = [pytest.param(8, id="mha"), pytest.param(2, id="gqa"), pytest.param(1, id="mqa")]
TOKENS = torch.randint(0, 384, (40,), generator=torch.Generator().manual_seed(3))


# SmolLM2's shapes (K = 576 and 1536, neither a multiple of 256), fewer groups than the kernel
# takes at once (K = 96), and a remainder after whole blocks of 8 groups (K = 800).
SHAPES = [(1728, 576), (576, 1536), (40, 96), (24, 800)]


@pytest.mark.parametrize(("rows", "columns"), SHAPES)
def test_one_row_product_is_the_int8_rounded_row_times_the_dequantized_weight(rows, columns, build):
    generator = torch.Generator().manual_seed(rows + columns)
    weight = torch.randn(rows, columns, generator=generator) * 0.05
    x = torch.randn(1, columns, generator=generator) * 3
    x[0, :GROUP] = 0  # an all-zero group
    layer = Int4Linear(weight, None)
    assert layer.native is not None
    dequantized = reference_dequantized(weight)
    assert torch.equal(layer.dequantized(), dequantized)
    rounded = quantize_activations(x).double()
    expected = rounded @ dequantized.double().T
    # float32 accumulation in another order: errors of a few ulp of the sum of |terms|.
    magnitude = rounded.abs() @ dequantized.double().abs().T
    error = (layer(x).double() - expected).abs()
    assert (error <= 1e-6 * magnitude).all()


# Rows in blocks of 4 and the rest, and (400) more rows than one pass over the weights takes
# (cpu_kernels.c's BLOCK_BYTES: 160 rows of 800 columns).
@pytest.mark.parametrize("rows", [2, 7, 24, 400])
def test_every_row_is_multiplied_as_a_single_row_would_be(rows, build):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 800, generator=generator) * 0.05
    x = torch.randn(1, rows, 800, generator=generator)
    layer = Int4Linear(weight, None)
    out = layer(x)
    assert out.shape == (1, rows, 96)
    for row in range(rows):
        assert torch.equal(out[0, row], layer(x[:, row]).view(-1))


@pytest.mark.parametrize("kv_heads", KV_HEADS)
def test_a_prompt_read_at_once_or_in_pieces_is_what_decoding_it_token_by_token_gives(
    tiny_model_factory, kv_heads, build
):
    """The C step reads prompts with the decode step's own arithmetic: every row's logits and
    keys and values are bit for bit those of the tokens fed one at a time, however the prompt
    is cut (what makes a served answer the CLI's, and a resumed one a fresh session's)."""
    folder, _ = tiny_model_factory(num_key_value_heads=kv_heads, intermediate_size=384)
    model = ChatModel.load(folder, device="cpu", quantization="int4")
    transformer = model.transformer
    transformer.setup_rope(64)
    tokens = TOKENS[:30]
    one_by_one = KVCache(model.config, 64, model.device, model.dtype)
    pieces = KVCache(model.config, 64, model.device, model.dtype)
    with torch.inference_mode():
        stepped = torch.cat([
            transformer(tokens[None, p : p + 1], torch.tensor([p]), one_by_one, 64)
            for p in range(len(tokens))
        ], dim=1)  # fmt: skip
        read = [
            transformer(tokens[None, a:b], torch.arange(a, b), pieces, 64, last_only=False)
            for a, b in ((0, 7), (7, 8), (8, 30))
        ]
    assert torch.equal(torch.cat(read, dim=1), stepped)
    assert torch.equal(pieces.k, one_by_one.k) and torch.equal(pieces.v, one_by_one.v)


@pytest.mark.parametrize("kv_heads", [pytest.param(2, id="gqa"), pytest.param(1, id="mqa")])
def test_more_threads_give_the_same_logits_bit_for_bit(tiny_model_factory, kv_heads):
    """Each weight row and each query head is computed whole by one thread, in one order, so
    the thread count cannot change a result; 3 threads over 2 kv heads split a group."""
    folder, _ = tiny_model_factory(num_key_value_heads=kv_heads, intermediate_size=384)
    model = ChatModel.load(folder, device="cpu", quantization="int4")
    assert isinstance(model.transformer.decode_step, NativeDecodeStep)
    before = torch.get_num_threads()
    try:
        by_threads = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            by_threads.append(decode_logits(model, TOKENS[:12]))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(by_threads[0], by_threads[1])
    assert torch.equal(by_threads[0], by_threads[2])


class Float32Head(nn.Module):
    """An int8 head's dequantised weight times float32 activations, as the C step computes it
    (PyTorch's CPU int8 kernel would round the activations to bfloat16 first)."""

    def __init__(self, head: Int8Linear):
        super().__init__()
        self.weight = head.dequantized()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() @ self.weight.T


def decode_logits(model: ChatModel, tokens: torch.Tensor, step=None) -> torch.Tensor:
    """Logits of each token (T,) fed one by one from position 0, (T, V)."""
    transformer = model.transformer
    transformer.setup_rope(64)
    cache = KVCache(model.config, 64, model.device, model.dtype)
    rows = []
    with torch.inference_mode():
        for position, token in enumerate(tokens.tolist()):
            token = torch.tensor([[token]])
            if step is None:
                logits = transformer(token, torch.tensor([position]), cache, 64)
            else:
                logits = step(token, position, cache)
            rows.append(logits.view(-1).clone())
    return torch.stack(rows)


def relative_error(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return ((logits - reference).norm(dim=-1) / reference.norm(dim=-1)).max().item()


@pytest.mark.parametrize("kv_heads", KV_HEADS)
def test_native_step_computes_what_the_python_step_computes_on_the_same_weights(
    tiny_model_factory, kv_heads, build
):
    folder, _ = tiny_model_factory(num_key_value_heads=kv_heads, intermediate_size=384)
    model = ChatModel.load(folder, device="cpu", quantization="int4")
    transformer = model.transformer
    native_step = transformer.decode_step
    assert isinstance(native_step, NativeDecodeStep)
    python_step = CpuDecodeStep(transformer)
    # The Python step runs its int4 layers through the same C products; only its head differs,
    # so it gets the head's float32 arithmetic (the C step keeps the int8 head it was built on).
    transformer.output = Float32Head(transformer.output)
    transformer.setup_rope(64)
    cache = KVCache(model.config, 64, model.device, model.dtype)
    logit_errors, cache_errors = [], []
    with torch.inference_mode():
        for position, token in enumerate(TOKENS.tolist()):
            token = torch.tensor([[token]])
            # Both steps start from the same cache, so that a difference cannot carry over.
            own = KVCache(model.config, 64, model.device, model.dtype)
            own.k.copy_(cache.k)
            own.v.copy_(cache.v)
            at = torch.tensor([position])
            native_logits = native_step(token, at, own, 64)
            python_logits = python_step(token, at, cache, 64)
            logit_errors.append(relative_error(native_logits, python_logits))
            written = torch.stack((own.k[:, :, position], own.v[:, :, position]))
            expected = torch.stack((cache.k[:, :, position], cache.v[:, :, position]))
            cache_errors.append(relative_error(written.flatten(), expected.flatten()))
            assert torch.equal(own.k[:, :, :position], cache.k[:, :, :position])
    # Summation order and the vectorised exp: ~3e-7 of the norm. Now and then an activation lands
    # on the other side of an int8 rounding boundary because of them: one step (1/127 of its
    # group's largest value), ~3e-3 of the logits.
    for errors in (logit_errors, cache_errors):
        assert statistics.median(errors) < 1e-5
        assert max(errors) < 1e-2


@pytest.mark.parametrize("kv_heads", KV_HEADS)
def test_native_step_matches_the_pytorch_int4_step(tiny_model_factory, monkeypatch, kv_heads):
    folder, _ = tiny_model_factory(num_key_value_heads=kv_heads, intermediate_size=384)
    native_model = ChatModel.load(folder, device="cpu", quantization="int4")
    monkeypatch.setenv(native.SWITCH, "0")
    pytorch_model = ChatModel.load(folder, device="cpu", quantization="int4")
    full = ChatModel.load(folder, device="cpu")
    native_logits = decode_logits(native_model, TOKENS)
    pytorch_logits = decode_logits(pytorch_model, TOKENS)
    # Both are int4 with the same weights; they round the activations differently (PyTorch to
    # bfloat16 with bfloat16 scales, the C step to int8 per group of 32 with float16 scales):
    # measured 1.2-1.4% of the logits' norm, while either is ~17% from float32 on this random
    # model, so a wrong step (a missed rotation, the wrong kv head) lands far outside.
    assert relative_error(native_logits, pytorch_logits) < 0.04
    reference = decode_logits(full, TOKENS)
    assert relative_error(native_logits, reference) < 1.2 * relative_error(
        pytorch_logits, reference
    )


def test_switch_off_loads_pytorchs_int4_kernels(tiny_model_factory, monkeypatch):
    folder, _ = tiny_model_factory(intermediate_size=384)
    monkeypatch.setenv(native.SWITCH, "0")
    model = ChatModel.load(folder, device="cpu", quantization="int4")
    layer = model.transformer.layers[0].attention.wqkv
    assert isinstance(layer, Int4Linear) and layer.native is None
    assert hasattr(layer, "scale_and_zero")  # PyTorch's own packing
    assert not isinstance(model.transformer.decode_step, NativeDecodeStep)


def test_other_formats_keep_the_pytorch_step(tiny_model_factory):
    folder, _ = tiny_model_factory()
    for quantization in (None, "int8", "f16"):
        model = ChatModel.load(folder, device="cpu", quantization=quantization)
        assert not isinstance(model.transformer.decode_step, NativeDecodeStep)


def test_the_library_is_named_by_its_source_and_built_once(tmp_path, monkeypatch):
    monkeypatch.setenv(native.CACHE_DIR_VARIABLE, str(tmp_path))
    first = native.build()
    modified = first.stat().st_mtime_ns
    assert native.build() == first and first.stat().st_mtime_ns == modified
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary file left
    assert first.name.startswith("cpu_kernels-") and first.suffix == ".so"


def test_a_failed_build_warns_once_and_leaves_pytorchs_kernels(
    tiny_model_factory, tmp_path, monkeypatch
):
    folder, _ = tiny_model_factory(intermediate_size=384)
    monkeypatch.setenv(native.CACHE_DIR_VARIABLE, str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    native._loaded.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = ChatModel.load(folder, device="cpu", quantization="int4")
        assert [str(w.message) for w in caught if w.category is RuntimeWarning] == [
            "llamachat: int4 on the CPU runs on PyTorch's slower kernels: "
            "false could not build its C kernels: no message"
        ]
        assert not isinstance(model.transformer.decode_step, NativeDecodeStep)
        assert model.transformer.layers[0].feed_forward.w2.native is None
        assert list(tmp_path.iterdir()) == []  # nothing half-built left behind
    finally:
        native._loaded.cache_clear()


def test_other_formats_neither_build_the_library_nor_warn(
    tiny_model_factory, tmp_path, monkeypatch
):
    # The CPU default (f16) and plain weights have no use for the C kernels: a machine without a
    # compiler must not hear about one.
    folder, _ = tiny_model_factory()
    monkeypatch.setenv(native.CACHE_DIR_VARIABLE, str(tmp_path))
    monkeypatch.setenv("CC", "false")
    native._loaded.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for quantization in (None, "int8", "f16"):
                ChatModel.load(folder, device="cpu", quantization=quantization)
        assert [w for w in caught if w.category is RuntimeWarning] == []
        assert native._loaded.cache_info().currsize == 0  # never even tried
    finally:
        native._loaded.cache_clear()


SMOLLM2_PROMPTS = [
    "What is the capital of France?",
    "请用三句话介绍一下长城。",
    "Write a haiku about the sea.",
]
# Where greedy decodes part, the PyTorch path's own logits must call it a near-tie: its int8
# head returns bfloat16 logits (steps of 0.125-0.25 at SmolLM2's 16-64), and the two kernels'
# roundings move logits by about that much; a real top-2 gap is usually several logits.
NEAR_TIE = 0.5


@pytest.mark.smollm2
def test_smollm2_int4_greedy_agrees_with_the_pytorch_int4_path_up_to_a_near_tie(
    smollm2_dir, monkeypatch
):
    from llamachat.engine import GREEDY

    native_model = ChatModel.load(smollm2_dir, device="cpu", quantization="int4")
    assert isinstance(native_model.transformer.decode_step, NativeDecodeStep)
    monkeypatch.setenv(native.SWITCH, "0")
    pytorch_model = ChatModel.load(smollm2_dir, device="cpu", quantization="int4")
    for prompt in SMOLLM2_PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        fast = native_model.session().reply(messages, GREEDY, max_new_tokens=48)
        slow = pytorch_model.session().reply(messages, GREEDY, max_new_tokens=48)
        list(fast), list(slow)
        pairs = zip(fast.token_ids, slow.token_ids, strict=False)
        parted = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
        if parted is None:
            assert fast.token_ids == slow.token_ids
            continue
        shared = pytorch_model.prompt_ids(messages) + slow.token_ids[:parted]
        transformer = pytorch_model.transformer
        transformer.setup_rope(len(shared))
        cache = KVCache(
            pytorch_model.config, len(shared), pytorch_model.device, pytorch_model.dtype
        )
        with torch.inference_mode():
            logits = transformer(
                torch.tensor([shared]), torch.arange(len(shared)), cache, len(shared)
            ).view(-1)
        gap = (logits[slow.token_ids[parted]] - logits[fast.token_ids[parted]]).item()
        # abs: this prefill pass rounds otherwise than the decode step that chose, by a hair.
        assert abs(gap) <= NEAR_TIE, (prompt, parted, gap)
