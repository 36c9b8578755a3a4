"""A random-weights Llama-3-shaped F16 GGUF for llama.cpp's llama-server, with Llama-3's own
tokenizer, written with the gguf package vendored in llama.cpp's source (gguf-py):

    python3 benchmarks/llamacpp/make_gguf.py --src LLAMA_CPP_SRC --shape 8b --out /tmp/8b.gguf
    python3 benchmarks/llamacpp/make_gguf.py --src LLAMA_CPP_SRC --shape tiny --out /tmp/tiny.gguf

LLAMA_CPP_SRC is the llama.cpp tree build_server.sh extracted (BUILD_DIR/src). The tokenizer is
the one llama.cpp tests Llama-3 with, models/ggml-vocab-llama-bpe.gguf in that tree: the
128,256-token byte-level BPE of Meta-Llama-3-8B with its merges and the `llama-bpe`
pre-tokenizer, so prompts are tokenized as Llama-3 would (no download). To it are added
Llama-3.1-Instruct's chat template (models/templates in the same tree) and `<|eot_id|>` as the
end of a turn, as in the Instruct GGUFs.

Weights are N(0, 0.02) in float16 (norms at 1, as llamachat.engine.bench makes its shapes):
speed does not depend on their values. To write 16 GB in seconds rather than minutes, every
tensor is a window, at its own offset, into one pool of 2**25 random values (64 MiB) repeated;
the model is no less random for what llama-server does with it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

SHAPES = {
    # Meta-Llama-3-8B: llamachat.engine.bench.SHAPES["8b"].
    "8b": dict(dim=4096, layers=32, heads=32, kv_heads=8, ffn=14336, ctx=8192),
    # For checking the pipeline on a CPU: Llama-3's vocabulary over a model of 2 small layers.
    "tiny": dict(dim=256, layers=2, heads=4, kv_heads=2, ffn=512, ctx=8192),
}
POOL = 1 << 25


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, required=True, help="llama.cpp's source tree")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sys.path.insert(0, str(args.src / "gguf-py"))
    import gguf

    started = time.perf_counter()
    shape = SHAPES[args.shape]
    vocab = gguf.GGUFReader(args.src / "models" / "ggml-vocab-llama-bpe.gguf")
    template = args.src / "models" / "templates" / "meta-llama-Llama-3.1-8B-Instruct.jinja"
    tokens = vocab.fields["tokenizer.ggml.tokens"].contents()
    n_vocab = len(tokens)

    writer = gguf.GGUFWriter(args.out.with_suffix(".tmp"), "llama")
    writer.add_name(f"random-llama-3-{args.shape}")
    writer.add_context_length(shape["ctx"])
    writer.add_embedding_length(shape["dim"])
    writer.add_block_count(shape["layers"])
    writer.add_feed_forward_length(shape["ffn"])
    writer.add_head_count(shape["heads"])
    writer.add_head_count_kv(shape["kv_heads"])
    writer.add_rope_dimension_count(shape["dim"] // shape["heads"])
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for key, field in vocab.fields.items():  # the tokenizer as it is, ids and all
        if key.startswith("tokenizer.") and key != "tokenizer.ggml.eos_token_id":
            kind = field.types[0]
            sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), kind, sub)
    writer.add_eos_token_id(tokens.index("<|eot_id|>"))
    writer.add_chat_template(template.read_text())

    dim, ffn, head = shape["dim"], shape["ffn"], shape["dim"] // shape["heads"]
    kv = shape["kv_heads"] * head
    tensors: list[tuple[str, tuple[int, ...], type]] = [
        ("token_embd.weight", (n_vocab, dim), np.float16)
    ]
    for i in range(shape["layers"]):
        tensors += [
            (f"blk.{i}.attn_norm.weight", (dim,), np.float32),
            (f"blk.{i}.attn_q.weight", (dim, dim), np.float16),
            (f"blk.{i}.attn_k.weight", (kv, dim), np.float16),
            (f"blk.{i}.attn_v.weight", (kv, dim), np.float16),
            (f"blk.{i}.attn_output.weight", (dim, dim), np.float16),
            (f"blk.{i}.ffn_norm.weight", (dim,), np.float32),
            (f"blk.{i}.ffn_gate.weight", (ffn, dim), np.float16),
            (f"blk.{i}.ffn_up.weight", (ffn, dim), np.float16),
            (f"blk.{i}.ffn_down.weight", (dim, ffn), np.float16),
        ]
    tensors += [
        ("output_norm.weight", (dim,), np.float32),
        ("output.weight", (n_vocab, dim), np.float16),
    ]
    for name, dims, dtype in tensors:
        nbytes = int(np.prod(dims)) * np.dtype(dtype).itemsize
        writer.add_tensor_info(name, dims, np.dtype(dtype), nbytes)

    rng = np.random.default_rng(args.seed)
    pool = (rng.standard_normal(POOL, dtype=np.float32) * 0.02).astype(np.float16)
    pool = np.concatenate([pool, pool])  # any window of up to POOL values is one slice
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    total = 0
    for _name, dims, dtype in tensors:
        count = int(np.prod(dims))
        if dtype is np.float32:
            data = np.ones(dims, dtype=np.float32)
        else:
            data = np.empty(count, dtype=np.float16)
            at = int(rng.integers(POOL))
            for start in range(0, count, POOL):
                end = min(count, start + POOL)
                data[start:end] = pool[at : at + end - start]
            data = data.reshape(dims)
        writer.write_tensor_data(data)
        total += data.nbytes
    writer.close()
    args.out.with_suffix(".tmp").replace(args.out)
    print(
        f"make_gguf: {args.out}: {args.shape}, {len(tensors)} tensors, {total / 1e9:.2f} GB,"
        f" vocabulary {n_vocab}, in {time.perf_counter() - started:.1f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
