"""Start time on a GPU: a fresh Python process → model on the GPU → first token (and second,
which captures the first CUDA graph), for a model folder whose files are in the page cache.

    python benchmarks/start_bench.py --shape 8b --tokenizer TOKENIZER_DIR --folder /tmp/start-8b

With --shape the folder is made first: random weights of that shape saved as safetensors shards
plus the tokenizer files given (no download). The first run uses an empty Triton cache (the
first start ever on a machine), the next ones the cache it filled.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, threading, time
started = time.time()
from llamachat.engine import GREEDY, ChatModel, GenerationStats
imported = time.time()
model = ChatModel.load(sys.argv[1], quantization=sys.argv[2])
loaded = time.time()
session = model.session()
prompt = session.fit([{"role": "user", "content": "Hello"}], 2)
times = []
for _ in session.generate(prompt.token_ids, GREEDY, 2, threading.Event(), GenerationStats()):
    times.append(time.time())
print(json.dumps({"python_start": started, "imported": imported, "loaded": loaded,
                  "tokens": times}), flush=True)
"""


def make_folder(shape: str, folder: Path, tokenizer: Path) -> None:
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT))
    from llamachat.engine.bench import SHAPES

    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **SHAPES[shape]}
    config |= {"bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}
    folder.mkdir(parents=True, exist_ok=True)
    d, inter, layers = (
        config["hidden_size"],
        config["intermediate_size"],
        config["num_hidden_layers"],
    )
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = d // heads
    generator = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape_: int) -> torch.Tensor:
        return (torch.randn(*shape_, device="cuda", generator=generator) * 0.02).bfloat16().cpu()

    shard: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rand(config["vocab_size"], d)}
    index: dict[str, str] = {}
    for layer in range(layers):
        p = f"model.layers.{layer}."
        shard |= {
            p + "self_attn.q_proj.weight": rand(heads * hd, d),
            p + "self_attn.k_proj.weight": rand(kv * hd, d),
            p + "self_attn.v_proj.weight": rand(kv * hd, d),
            p + "self_attn.o_proj.weight": rand(d, heads * hd),
            p + "mlp.gate_proj.weight": rand(inter, d),
            p + "mlp.up_proj.weight": rand(inter, d),
            p + "mlp.down_proj.weight": rand(d, inter),
            p + "input_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
        }
        if layer % 8 == 7 or layer == layers - 1:
            if layer == layers - 1:
                shard["model.norm.weight"] = torch.ones(d, dtype=torch.bfloat16)
                shard["lm_head.weight"] = rand(config["vocab_size"], d)
            name = f"model-{layer // 8:05d}.safetensors"
            save_file(shard, folder / name, metadata={"format": "pt"})
            index |= dict.fromkeys(shard, name)
            shard = {}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    (folder / "config.json").write_text(json.dumps(config))
    for file in tokenizer.iterdir():
        shutil.copy(file, folder / file.name)


def run_once(folder: Path, quantization: str, triton_cache: Path) -> dict[str, float]:
    env = dict(os.environ, TRITON_CACHE_DIR=str(triton_cache), PYTHONPATH=str(ROOT))
    spawned = time.time()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), quantization],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    marks = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "import_s": marks["imported"] - spawned,
        "load_s": marks["loaded"] - marks["imported"],
        "first_token_s": marks["tokens"][0] - spawned,
        "second_token_s": marks["tokens"][1] - spawned,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--shape", help="make the folder with random weights of this shape")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer files for a made folder")
    parser.add_argument("--quantize", default="none")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if args.shape and not (args.folder / "config.json").exists():
        started = time.time()
        make_folder(args.shape, args.folder, args.tokenizer)
        print(f"made {args.folder} in {time.time() - started:.0f} s", flush=True)
    # Read the files once so they are in the page cache, as the target states.
    for file in args.folder.glob("*.safetensors"):
        with open(file, "rb") as handle:
            while handle.read(1 << 26):
                pass
    triton_cache = Path(tempfile.mkdtemp(prefix="triton-cache-"))
    for run in range(args.runs):
        result = run_once(args.folder, args.quantize, triton_cache)
        label = "first start (empty Triton cache)" if run == 0 else "with cached kernels"
        print(
            json.dumps({"run": run, "label": label, "quantize": args.quantize, **result}),
            flush=True,
        )


if __name__ == "__main__":
    main()
