"""A model ready to chat: weights on the device, tokenizer, chat format and end-of-turn tokens."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from .chat_format import ChatFormat, ChatMessage, chat_format_for, render
from .config import ModelConfig
from .decode import choose_decode_step, choose_logits
from .errors import EngineError, ModelLoadError
from .loading import AdjustWeight, load_transformer, resolve_device, resolve_dtype
from .model import Transformer
from .quantize import resolve_quantization
from .session import ChatSession
from .threads import AutoThreads, cpu_threads
from .tokenizer import Tokenizer, load_tokenizer

# Without an explicit ctx a session gets the model's whole window up to this many tokens, so a
# 128k-token model does not reserve 16 GiB of cache for a short chat (ollama and llama.cpp also
# default to a few thousand).
DEFAULT_CONTEXT = 8192


class ChatModel:
    def __init__(
        self,
        folder: Path,
        config: ModelConfig,
        transformer: Transformer,
        tokenizer: Tokenizer,
        chat_format: ChatFormat,
        eos_token_ids: frozenset[int],
        quantization: str | None = None,
        threads: int | AutoThreads | None = None,
    ):
        self.folder = folder
        self.config = config
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.chat_format = chat_format
        self.eos_token_ids = eos_token_ids
        self.quantization = quantization  # the weights' format; None: as stored
        # PyTorch's CPU threads: a count fixed by the caller, the default kept up to date
        # (AutoThreads: first measured over the making of the model, now done), or None on a GPU.
        self._threads = threads
        self.retune_threads()

    @classmethod
    def load(
        cls,
        folder: str | Path,
        device: str = "auto",
        dtype: str | None = None,
        chat_format: str | None = None,
        quantization: str | None = None,
        threads: int | None = None,
        weights_folder: str | Path | None = None,
        adjust: AdjustWeight | None = None,
        source_bits: int | None = None,
        quantized_cache: str | Path | None = None,
        gpus: int = 1,
    ) -> ChatModel:
        """Load a Hugging Face model folder (config.json, tokenizer, safetensors weights).
        `quantization` stores the projections' weights as int8, int4, (GPU) fp8 or (CPU) f16,
        "auto" picks (see quantize.resolve_quantization); None keeps the checkpoint's precision.
        On a CPU, `threads` sets PyTorch's thread count for the whole process; None: the cores
        other processes leave idle, measured while loading and again before each reply (threads.py).
        `weights_folder`: the safetensors' folder, when not `folder` (a model whose adapters
        apply on loading over its base's weights), `adjust` as for load_transformer.
        `source_bits`: the bits per weight the checkpoint was quantised to before it was
        converted (a GGUF's), which "auto" takes into account. `quantized_cache`: a folder
        where the quantised layers are kept for the next load (quantized_cache.py).
        `gpus`: run the model over that many GPUs with tensor parallelism, a process each
        (parallel/); on a CPU, that many processes."""
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise ModelLoadError(f"{folder} is not a folder")
        config = ModelConfig.from_file(folder / "config.json")
        target_device = resolve_device(device)
        target_dtype = resolve_dtype(dtype, target_device)
        quantization = resolve_quantization(quantization, target_device, target_dtype, source_bits)
        threads_used = cpu_threads(target_device, threads)
        tokenizer = load_tokenizer(folder)
        weights = Path(weights_folder).expanduser() if weights_folder is not None else folder
        if quantized_cache is not None:
            quantized_cache = Path(quantized_cache).expanduser()
        if gpus != 1:
            transformer = _load_parallel(
                folder, weights, target_device, target_dtype, quantization, adjust, gpus
            )
        else:
            transformer = load_transformer(
                weights, config, target_device, target_dtype, quantization, adjust, quantized_cache
            )
            transformer.decode_step = choose_decode_step(transformer)
            transformer.logits = choose_logits(transformer)
        chosen_format = chat_format_for(tokenizer, chat_format)
        eos = _eos_token_ids(folder, config, tokenizer) | _special_token_ids(
            tokenizer, chosen_format.stop
        )
        return cls(
            folder, config, transformer, tokenizer, chosen_format, eos, quantization, threads_used
        )

    @property
    def gpus(self) -> int:
        """The ranks the model runs over (1: one device)."""
        leader = self.transformer.leader
        return 1 if leader is None else leader.world

    def close(self) -> None:
        """Stop a tensor-parallel model's other ranks (they stop at exit too)."""
        if self.transformer.leader is not None:
            self.transformer.leader.close()

    @property
    def threads(self) -> int | None:
        """PyTorch's CPU thread count now; None on a GPU."""
        return self._threads.count if isinstance(self._threads, AutoThreads) else self._threads

    def retune_threads(self) -> None:
        """With the default thread count, fit it to the cores other processes leave idle."""
        if isinstance(self._threads, AutoThreads):
            self._threads.retune()

    @property
    def device(self) -> torch.device:
        return self.transformer.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.tok_embeddings.weight.dtype

    @property
    def context_length(self) -> int:
        return self.config.max_position_embeddings

    @property
    def kv_bytes_per_token(self) -> int:
        """The KV cache a token takes here: on each GPU of a split model, that GPU's kv heads."""
        return self.transformer.config.kv_bytes_per_token(self.dtype.itemsize)

    def kv_bytes(self, ctx: int) -> int:
        """The KV cache a session of `ctx` tokens allocates."""
        return ctx * self.kv_bytes_per_token

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids)

    def prompt_ids(
        self, messages: Sequence[ChatMessage], continue_reply: bool = False
    ) -> list[int]:
        """The prompt's ids; `continue_reply`: the last message, an assistant's, left open."""
        return self.encode(render(self.tokenizer, self.chat_format, messages, continue_reply))

    def session(self, ctx: int | None = None, cuda_graphs: bool | None = None) -> ChatSession:
        """A chat session with its own KV cache of `ctx` tokens. On a GPU its decode steps
        replay CUDA graphs unless cuda_graphs=False."""
        return ChatSession(self, self.window(ctx), cuda_graphs)

    def window(self, ctx: int | None = None) -> int:
        """The context window a cache of `ctx` tokens gives (None: the default); raises
        EngineError outside 16 to the model's context length."""
        if ctx is None:
            ctx = min(self.context_length, DEFAULT_CONTEXT)
        if not 16 <= ctx <= self.context_length:
            raise EngineError(
                f"ctx must be between 16 and the model's context length {self.context_length}"
            )
        return ctx


def _load_parallel(
    folder: Path,
    weights: Path,
    device: torch.device,
    dtype: torch.dtype,
    quantization: str | None,
    adjust: AdjustWeight | None,
    gpus: int,
) -> Transformer:
    from .parallel.group import Launch
    from .parallel.load import check_gpus, load_parallel

    check_gpus(device, gpus)
    if adjust is not None:
        raise EngineError(
            "a model whose adapters apply on loading cannot run over several GPUs yet: "
            "merge them into its weights first"
        )
    launch = Launch(
        folder=str(folder.resolve()),
        weights_folder=str(weights.resolve()),
        device=device.type,
        dtype=str(dtype).removeprefix("torch."),
        quantization=quantization,
        world=gpus,
    )
    transformer, _ = load_parallel(launch)
    return transformer


def _eos_token_ids(folder: Path, config: ModelConfig, tokenizer: Tokenizer) -> frozenset[int]:
    """Every id that ends a reply: generation_config.json's list (Llama-3 has several: end of
    text, end of turn, end of message), config.json's, and the tokenizer's."""
    ids = set(config.eos_token_ids)
    generation_config = folder / "generation_config.json"
    if generation_config.exists():
        try:
            value = json.loads(generation_config.read_text(encoding="utf-8")).get("eos_token_id")
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"cannot read {generation_config}: {error}") from None
        ids.update(value if isinstance(value, list) else [] if value is None else [value])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if not ids:
        raise ModelLoadError(f"{folder} names no end-of-sequence token")
    return frozenset(int(i) for i in ids)


def _special_token_ids(tokenizer: Tokenizer, strings: Sequence[str]) -> frozenset[int]:
    """Stop strings that are special tokens (ChatML's <|im_end|>) never show in decoded text, so
    they must end the reply as token ids."""
    special = tokenizer.special_tokens()
    ids = (tokenizer.token_id(s) for s in strings if s in special)
    return frozenset(i for i in ids if i is not None)
