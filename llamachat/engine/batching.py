"""Many sequences at once: one forward pass per decode step over every running sequence.

A fixed pool of slots, each a KV cache of the context's length. A new sequence takes a free
slot, preferring the one whose cached tokens are mostly the start of its prompt (a client that
resends its whole conversation, as every OpenAI client does, prefills only the new turn), else
the one used longest ago: what finished sequences leave in their slots is kept until a slot is
needed, least recently used first; slots beyond the running batch only keep such caches.
Prompts are prefilled a chunk at a time between decode steps (on a GPU in half precision,
within them: the chunks' rows join the decoding rows' matrix products), so running streams do
not stall behind a long prompt; a sequence joins the batch once its prompt is in, and leaves it
the step it finishes or is cancelled.

The projections run once for the whole batch (a matrix product instead of one matrix-vector
product per sequence); attention runs per sequence over exactly its own positions, and sampling
per sequence with its own parameters and generator. A greedy answer therefore does not depend
on its neighbours wherever the matrix product gives each row the same bits whatever the number
of rows, which the CPU's default f16 weights do (fbgemm); float32 MKL products can differ in the
last bit between row counts (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .chat_model import ChatModel
from .decode.batch import BatchedCpuStep, BatchedGpuStep, PromptChunk
from .detokenize import StreamDecoder
from .kv_cache import KVCache
from .prompts import Prompt
from .sampling import SampledLogprob, SamplingParams, greedy_rows, sample, sampled_logprob
from .session import PREFILL_CHUNK, GenerationStats, _common_prefix, _random_seed, _whole_buckets
from .step_trace import StepTrace, traced
from .transfer import to_device

MIXED_PREFILL_TOKENS = 1792
GRAPHED_MIXED_ROWS = 512
GRAPHED_STEP_ROWS = 384


@dataclass
class BatchRequest:
    """One sequence to generate. The callbacks run on the scheduler's thread: they must only
    hand the text on (to a queue), never block."""

    prompt: Prompt
    sampling: SamplingParams
    stop: tuple[str, ...]
    on_piece: Callable[[str], None]
    on_end: Callable[[GenerationStats], None]
    cancel: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    # The step failed (out of memory, say): the sequence is over, with this error.
    on_error: Callable[[BaseException], None] | None = None
    # With top_logprobs (0 to 20 alternatives), each token's SampledLogprob goes to
    # on_logprob, before its text goes to on_piece.
    top_logprobs: int | None = None
    on_logprob: Callable[[SampledLogprob], None] | None = None


@dataclass(frozen=True)
class BatchUsage:
    """What the scheduler holds at one moment (for a server's metrics)."""

    running: int  # sequences with a slot: decoding, or their prompt being prefilled
    waiting: int  # submitted, waiting for a slot
    last_batch: int  # sequences the latest decode step ran
    kv_tokens: int  # tokens whose keys and values the slots hold, running or kept for reuse
    kv_capacity: int  # tokens the slots can hold together


@dataclass
class _Running:
    request: BatchRequest
    slot: int
    fed: int  # tokens of the prompt (then of the reply) whose keys the slot's cache holds
    decoder: StreamDecoder
    generator: torch.Generator
    stats: GenerationStats
    context: list[int]  # prompt and reply so far, for the repetition penalty
    next_token: int | None = None  # sampled, not yet fed through the model
    first_token_at: float | None = None
    admitted_at: float = field(default_factory=time.perf_counter)
    done: bool = False  # finished, cancelled or failed: out of the batch

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.request.prompt.token_ids)


@dataclass
class _Launched:
    """A step queued on the device whose tokens are not taken yet: the decoding rows' logits
    (B, V) and, for a mixed step, its prompt chunks with each one's last position's (C, V)."""

    decoding: list[_Running]
    logits: torch.Tensor
    chunks: list[tuple[_Running, list[int]]] = field(default_factory=list)
    chunk_logits: torch.Tensor | None = None


def slot_bytes(model: ChatModel, ctx: int) -> int:
    """The memory one slot's keys and values take: a whole context's worth."""
    config = model.config
    per_token = 2 * config.n_layers * config.n_kv_heads * config.head_dim * model.dtype.itemsize
    return per_token * _whole_buckets(ctx)


class BatchScheduler:
    """Owns the slots and a thread that runs the steps; `submit` from any thread.

    Up to `batch` sequences run at once (all `slots` by default); slots beyond that hold only
    what finished sequences left, for the clients that come back to them."""

    def __init__(
        self,
        model: ChatModel,
        slots: int,
        ctx: int,
        prefill_tokens: int | None = None,
        batch: int | None = None,
        run_ahead: bool | None = None,
    ):
        batch = batch or slots
        if not 1 <= batch <= slots:
            raise ValueError("a batch needs at least one slot, and no more than there are")
        self.model = model
        self.ctx = ctx
        self.batch = batch
        capacity = _whole_buckets(ctx)
        if model.transformer.rope_len < capacity:
            model.transformer.setup_rope(capacity)
        # One pool for every slot, so that a step writes and reads the whole batch's keys with
        # one indexing operation per layer on a GPU; each slot's cache is a view of its share.
        config = model.config
        pooled = slots + (model.device.type == "cuda")
        shape = (config.n_layers, pooled, config.n_kv_heads, capacity, config.head_dim)
        self.k_pool = torch.zeros(shape, device=model.device, dtype=model.dtype)
        self.v_pool = torch.zeros(shape, device=model.device, dtype=model.dtype)
        self.caches = [
            KVCache.over(self.k_pool[:, slot], self.v_pool[:, slot]) for slot in range(slots)
        ]
        self.cpu_step = BatchedCpuStep(model.transformer)
        # On a GPU one more slot takes the rows that pad a batch to the size of its graph.
        self.device_step = (
            BatchedGpuStep(model.transformer, self.k_pool, self.v_pool, scratch=slots)
            if model.device.type == "cuda"
            else None
        )
        # Rows a step feeds (decoding rows and prompt tokens shared out among the prompts being
        # prefilled): more feeds new requests sooner and reads the weights for fewer steps,
        # fewer keeps the running streams' steps short. With CUDA graphs, a mixed step of up
        # to GRAPHED_MIXED_ROWS rows replays its bucket's graph (BatchedGpuStep.as_rows): the
        # prompts are read beside the replies a few hundred rows a step, with no launch cost,
        # instead of in bursts. 384 rows beat eager steps of 1,792 (the flash kernel, launched
        # op by op) on both counts at 64 clients of the 8b shape on an H200: 4,794 against
        # 4,240 tokens/s and a first token in 76 against 527 ms (docs/BENCHMARKS.md); a batch
        # too large to leave room for prompts in 384 rows keeps the eager steps. Elsewhere
        # each chunk is a pass of its own. `llamachat serve --step-tokens` chooses.
        step = self.device_step
        fused = step is not None and step.fused
        graphs = step is not None and step.graphs
        if prefill_tokens is None:
            if graphs and batch <= GRAPHED_STEP_ROWS // 2:
                prefill_tokens = GRAPHED_STEP_ROWS
            else:
                prefill_tokens = MIXED_PREFILL_TOKENS if fused else PREFILL_CHUNK
        self.prefill_tokens = prefill_tokens
        self.graphed_mixed = graphs and self.prefill_tokens <= GRAPHED_MIXED_ROWS
        if step is not None:  # now, not during the first requests
            step.capture(max(batch, self.prefill_tokens) if self.graphed_mixed else batch)
        # Launch each decode step before handing the last one's tokens out (detokenizing, the
        # callbacks), so that a GPU computes while Python does that; where steps run on this
        # thread (the CPU) that would only hold the pieces back a step, so by default only on
        # a GPU.
        self.run_ahead = self.device_step is not None if run_ahead is None else run_ahead
        self._ahead: _Launched | None = None  # a step launched, its tokens not yet taken
        self._trace = StepTrace.from_env(model.device)  # for benchmarks: LLAMACHAT_STEP_TRACE
        self.cached: list[list[int]] = [[] for _ in range(slots)]  # what each slot's cache holds
        self.used_at = [0.0] * slots
        self.prompt_lengths = [0] * slots  # of the latest sequence in each slot
        self.free = set(range(slots))
        self.waiting: deque[BatchRequest] = deque()
        self.running: list[_Running] = []
        self.last_batch = 0
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="llamachat-batch", daemon=True)
        self._thread.start()

    @property
    def slots(self) -> int:
        return len(self.caches)

    def usage(self) -> BatchUsage:
        with self._wake:
            return BatchUsage(
                running=len(self.running),
                waiting=len(self.waiting),
                last_batch=self.last_batch,
                kv_tokens=sum(len(held) for held in self.cached),
                kv_capacity=self.slots * self.ctx,
            )

    def submit(self, request: BatchRequest) -> None:
        with self._wake:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            self.waiting.append(request)
            self._wake.notify()

    def close(self) -> None:
        """Cancel everything and stop the thread."""
        with self._wake:
            self._closed = True
            for request in self.waiting:
                request.cancel.set()
            for running in self.running:
                running.request.cancel.set()
            self._wake.notify()
        self._thread.join(timeout=30)
        if self._trace is not None:
            self._trace.write()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self.waiting and not self.running:
                    self._wake.wait()
                if self._closed and not self.running:
                    for request in self.waiting:
                        prompt_tokens = len(request.prompt.token_ids)
                        request.on_end(
                            GenerationStats(prompt_tokens=prompt_tokens, finish_reason="cancelled")
                        )
                    self.waiting.clear()
                    return
                self._admit()
            try:
                self._step()
            except Exception as error:  # noqa: BLE001 - a batch step: its sequences all end
                self._ahead = None
                self._fail(list(self.running), error)

    def _admit(self) -> None:
        """Give waiting sequences the free slots (called holding the lock)."""
        while self.free and self.waiting and len(self.running) < self.batch:
            request = self.waiting.popleft()
            ids = request.prompt.token_ids
            slot = self._slot_for(ids)
            self.free.remove(slot)
            # At least the last prompt token is computed again: its logits start the reply.
            reuse = min(_common_prefix(self.cached[slot], ids), len(ids) - 1)
            del self.cached[slot][reuse:]
            reuse = self._borrow(slot, ids, reuse)
            self.prompt_lengths[slot] = len(ids)
            stats = GenerationStats(
                prompt_tokens=len(ids), reused_tokens=reuse, prefilled_tokens=len(ids) - reuse
            )
            generator = torch.Generator(self.model.device)
            seed = request.sampling.seed
            generator.manual_seed(seed if seed is not None else _random_seed())
            decoder = StreamDecoder(self.model.decode, request.stop)
            self.running.append(
                _Running(request, slot, reuse, decoder, generator, stats, list(ids))
            )

    def _borrow(self, slot: int, ids: list[int], held: int) -> int:
        """Copy into `slot` the longest start of `ids` that another slot holds beyond the
        `held` tokens `slot` has (a system prompt that several conversations share is computed
        once, whoever runs it); the tokens `slot` holds then."""
        most, donor = held, None
        for other, cached in enumerate(self.cached):
            shared = min(_common_prefix(cached, ids), len(ids) - 1)
            if other != slot and shared > most:
                most, donor = shared, other
        if donor is None:
            return held
        # Queued after every write the donor's record counts (its steps are launched before it
        # records their tokens), and before any later step writes either slot.
        for pool in (self.k_pool, self.v_pool):
            pool[:, slot, :, held:most] = pool[:, donor, :, held:most]
        self.cached[slot].extend(ids[held:most])
        return most

    def _slot_for(self, ids: list[int]) -> int:
        """The free slot for a prompt: the one whose last prompt is all a start of this one
        (the client's own conversation, coming back with its next turn); else the least
        recently used. A conversation that merely shares a start with another (a system
        prompt, a chat template's first tokens) never takes over its slot: it borrows that
        start (_borrow)."""
        returning = [
            s
            for s in self.free
            if 0 < self.prompt_lengths[s] <= _common_prefix(self.cached[s], ids)
        ]
        if returning:
            return max(returning, key=lambda s: self.prompt_lengths[s])
        return min(self.free, key=lambda s: self.used_at[s])

    @torch.inference_mode()
    def _step(self) -> None:
        for running in [r for r in self.running if r.request.cancel.is_set()]:
            self._finish(running, "cancelled")
        if self._ahead is not None:  # a step launched ahead: its tokens first
            launched, self._ahead = self._ahead, None
            self._take_launched(launched)
            return
        decoding = self._decoding() if self._mixes else []
        chunks = self._next_chunks(len(decoding))
        if chunks and self._mixes:
            launched = self._launch_mixed(decoding, chunks)
            if launched is not None:
                self._take_launched(launched)
            return
        for running, chunk in chunks:
            try:
                logits = self._prefill(running, chunk)
                if not running.prefilling:
                    row = logits[0, -1]
                    token = self._draw(running, row)
                    self._take(running, token, self._logprob(running, row, token))
            except Exception as error:  # noqa: BLE001 - this sequence's own: it alone ends
                self._fail([running], error)
        decoding = self._decoding()
        if decoding:
            self._take_launched(_Launched(decoding, self._decode(decoding)))

    @property
    def _mixes(self) -> bool:
        """Whether prompt chunks ride along with the decoding rows (the fused GPU step)."""
        return self.device_step is not None and self.device_step.fused

    def _decoding(self) -> list[_Running]:
        """The sequences whose next token is drawn and waits to be fed through the model."""
        return [r for r in self.running if not r.prefilling and r.next_token is not None]

    def _next_chunks(self, decoding: int = 0) -> list[tuple[_Running, list[int]]]:
        """One step's share of prompt, handed out in arrival order. Beside `decoding` rows (a
        mixed step) the share leaves room for them: a full step then has prefill_tokens rows
        in all, whose matrix products cuBLAS runs at its best (on an H200, 2,048 rows of
        prompt took 43.6 ms and 64 decoding rows more 55.8 ms: benchmarks/mixed_step_probe.py)."""
        chunks: list[tuple[_Running, list[int]]] = []
        budget = max(self.prefill_tokens - decoding, 1)
        for running in [r for r in self.running if r.prefilling]:
            if budget <= 0:
                break
            ids = running.request.prompt.token_ids
            chunks.append((running, ids[running.fed : running.fed + budget]))
            budget -= len(chunks[-1][1])
        return chunks

    def _launch_mixed(
        self,
        decoding: list[_Running],
        chunks: list[tuple[_Running, list[int]]],
        chosen: torch.Tensor | None = None,
    ) -> _Launched | None:
        """Queue the decoding sequences' tokens and the prompt chunks in one pass (the fused
        GPU step): the weights are read once for both. The tokens are the sequences'
        next_token, or `chosen` on the device (their bookkeeping waits for the read-back).
        None when the step failed: its sequences have ended."""
        assert self.device_step is not None
        tokens = chosen if chosen is not None else [r.next_token for r in decoding]
        prompt = sum(len(chunk) for _, chunk in chunks)
        try:
            step = self.device_step
            run = step.as_rows if self.graphed_mixed else step.mixed
            with traced(self._trace, "mixed", len(decoding), prompt):
                token_logits, chunk_logits = run(
                    tokens,  # type: ignore[arg-type]
                    [r.slot for r in decoding],
                    [r.fed for r in decoding],
                    [PromptChunk(r.slot, r.fed, chunk) for r, chunk in chunks],
                )
        except Exception as error:  # noqa: BLE001 - the step's sequences all end
            self._fail(decoding + [r for r, _ in chunks], error)
            return None
        self.last_batch = len(decoding)
        if chosen is None:
            self._fed(decoding)
        for running, chunk in chunks:
            self.cached[running.slot].extend(chunk)
            running.fed += len(chunk)
        return _Launched(decoding, token_logits, chunks, chunk_logits)

    def _take_launched(self, step: _Launched) -> None:
        """The tokens of a step: the decoding rows' next ones, and the first of each prompt
        whose last chunk the step read. Where the next step can take them straight from the
        device, it is launched before they are read back (_take_chained)."""
        finishers = [
            (index, running)
            for index, (running, _) in enumerate(step.chunks)
            if not running.prefilling and not running.done
        ]
        live = [(index, running) for index, running in enumerate(step.decoding) if not running.done]
        if self._chainable(live, finishers):
            self._take_chained(step, live, finishers)
            return
        for index, running in finishers:
            row = step.chunk_logits[index]  # type: ignore[index]
            token = self._draw(running, row)
            self._take(running, token, self._logprob(running, row, token))
        if step.decoding:
            self._take_rows(step.decoding, step.logits)

    def _take_rows(self, decoding: list[_Running], logits: torch.Tensor) -> None:
        """Each sequence's next token from its row of `logits` (B, V); rows that left the
        batch since the step was launched (a step launched ahead) are passed over."""
        tokens = self._tokens(decoding, logits)
        live = [(i, r) for i, r in enumerate(decoding) if not r.done]
        # The logits are the graph's own buffer, which the next step overwrites: what is read
        # of them is read first.
        logprobs = [self._logprob(r, logits[i], tokens[i]) for i, r in live]
        ahead = self._launch_ahead([(r, tokens[i]) for i, r in live])
        for (index, running), logprob in zip(live, logprobs, strict=True):
            self._take(running, tokens[index], logprob, fed=id(running) in ahead)

    def _chainable(
        self, live: list[tuple[int, _Running]], finishers: list[tuple[int, _Running]]
    ) -> bool:
        """Whether the next step can take this one's tokens straight from the device: they
        are all greedy, none asking for logprobs (read from the logits the next step
        overwrites), and every other running sequence is still reading its prompt (none has a
        token drawn that would wait). Without mixed steps, none may be reading its prompt: a
        chain of decode steps would keep it waiting."""
        rows = [r for _, r in live] + [r for _, r in finishers]
        if not self.run_ahead or not rows:
            return False
        if not all(r.request.sampling.greedy and r.request.top_logprobs is None for r in rows):
            return False
        taken = {id(r) for r in rows}
        others = [r for r in self.running if id(r) not in taken]
        return all(r.prefilling for r in others) and (self._mixes or not others)

    def _take_chained(
        self,
        step: _Launched,
        live: list[tuple[int, _Running]],
        finishers: list[tuple[int, _Running]],
    ) -> None:
        """Greedy tokens chosen on the device feed the next step before they are read back:
        the device goes on to that step (with the next prompt chunks, on a GPU) while they
        come over and are handed out. A sequence whose token turns out to end it had a row in
        that step it does not need."""
        # The rows: the decoding ones', then each finished prompt's last position's.
        rows = list(step.decoding) + [r for _, r in finishers]
        logits = step.logits
        if finishers:
            ends = to_device([i for i, _ in finishers], logits.device, torch.long)
            last = step.chunk_logits.index_select(0, ends)  # type: ignore[union-attr]
            logits = torch.cat((logits, last)) if step.decoding else last
        chosen = greedy_rows(
            logits,
            [r.request.sampling for r in rows],
            [r.context for r in rows],
            [len(r.request.prompt.token_ids) for r in rows],
        )
        read = _read_back(chosen)
        row_of = {id(r): k for k, r in enumerate(rows)}
        # In the batch's own order, as a step launched in turn would have them.
        going = [r for r in self.running if id(r) in row_of and not r.done and _goes_on(r)]
        picks = [row_of[id(r)] for r in going]
        tokens = None
        if picks == list(range(len(rows))):  # every row goes on, in order: no pick needed
            tokens = chosen
        elif picks:
            tokens = chosen.index_select(0, to_device(picks, chosen.device, torch.long))
        chunks = self._next_chunks(len(going)) if self._mixes else []
        if chunks:
            self._ahead = self._launch_mixed(going, chunks, tokens)
            going = [r for r in going if not r.done]  # a step that failed ended its rows
        elif going:
            self._ahead = _Launched(going, self._decode(going, tokens))
        values = read()
        self._fed_tokens(going, [values[row_of[id(r)]] for r in going])
        fed = {id(r) for r in going}
        # First tokens first, as a step in turn takes them.
        for running in [r for _, r in finishers] + [r for _, r in live]:
            if not running.done:
                self._take(running, values[row_of[id(running)]], None, fed=id(running) in fed)

    def _tokens(self, decoding: list[_Running], logits: torch.Tensor) -> list[int]:
        """The next token of each row (0 for rows out of the batch)."""
        # Greedy rows, whatever their penalties, in one pass (one wait for the device, not one
        # per row); sampled ones draw from their own generators.
        greedy = [i for i, r in enumerate(decoding) if r.request.sampling.greedy]
        tokens = [0] * len(decoding)
        if greedy:
            # Rows picked by a list of indices would be copied to the device first, a wait for
            # the step holding Python's lock: all rows greedy (the usual batch) need no pick.
            chosen = greedy_rows(
                logits if len(greedy) == len(decoding) else logits[greedy],
                [decoding[i].request.sampling for i in greedy],
                [decoding[i].context for i in greedy],
                [len(decoding[i].request.prompt.token_ids) for i in greedy],
            )
            _await_device(chosen)
            for index, token in zip(greedy, chosen.tolist(), strict=True):
                tokens[index] = token
        for index, running in enumerate(decoding):
            if not running.request.sampling.greedy and not running.done:
                tokens[index] = self._draw(running, logits[index])
        return tokens

    def _launch_ahead(self, taken: list[tuple[_Running, int]]) -> set[int]:
        """Feed these sequences' new tokens through the next step now, before they are handed
        out, if that step would be nothing else: every running sequence is among them (none
        is prefilling or has its token from elsewhere). Those whose token ends them are left
        out; one that a stop string ends turns out to have a row it does not need. The ids of
        the sequences launched."""
        if not self.run_ahead or len(taken) != len(self.running):
            return set()
        going = [
            (r, token)
            for r, token in taken
            if token not in self.model.eos_token_ids and _goes_on(r)
        ]
        if not going:
            return set()
        for running, token in going:
            running.next_token = token
        batch = [running for running, _ in going]
        self._ahead = _Launched(batch, self._decode(batch))
        return {id(running) for running in batch}

    def _prefill(self, running: _Running, chunk: list[int]) -> torch.Tensor:
        device = self.model.device
        start = running.fed
        end = start + len(chunk)
        cache = self.caches[running.slot]
        tokens = torch.tensor([chunk], device=device)
        positions = torch.arange(start, end, device=device)
        attend_len = min(cache.max_len, _whole_buckets(end))
        logits = self.model.transformer(tokens, positions, cache, attend_len)
        self.cached[running.slot].extend(chunk)
        running.fed = end
        return logits

    def _decode(self, batch: list[_Running], chosen: torch.Tensor | None = None) -> torch.Tensor:
        """One token for each sequence of `batch`, in one pass; float32 logits (B, V). The
        tokens are the sequences' next_token, or `chosen` (B,) on the device, whose bookkeeping
        (_fed_tokens) waits until they are read back."""
        positions = [r.fed for r in batch]
        slots = [r.slot for r in batch]
        tokens = chosen if chosen is not None else [r.next_token for r in batch]
        self.last_batch = len(batch)
        if self.device_step is not None:
            with traced(self._trace, "decode", len(batch), 0):
                logits = self.device_step(tokens, slots, positions)  # type: ignore[arg-type]
        else:
            listed = tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens
            logits = self.cpu_step(listed, [self.caches[s] for s in slots], positions)
        if chosen is None:
            self._fed(batch)
        return logits

    def _fail(self, failed: list[_Running], error: Exception) -> None:
        """A step raised: end these sequences with the error, and forget what their slots held
        (the step may have stopped half-way through writing them)."""
        with self._wake:
            for running in failed:
                running.done = True
                self.running.remove(running)
                self.cached[running.slot] = []
                self.free.add(running.slot)
        for running in failed:
            if running.request.on_error is not None:
                running.request.on_error(error)
            else:
                running.stats.finish_reason = None
                running.request.on_end(running.stats)

    def _fed(self, batch: list[_Running]) -> None:
        """The batch's tokens are in the caches now."""
        tokens = [r.next_token for r in batch]
        assert None not in tokens
        for running in batch:
            running.next_token = None
        self._fed_tokens(batch, tokens)  # type: ignore[arg-type]

    def _fed_tokens(self, batch: list[_Running], tokens: list[int]) -> None:
        """These tokens of the batch are in (or on their way to) the caches."""
        for running, token in zip(batch, tokens, strict=True):
            self.cached[running.slot].append(token)
            running.context.append(token)
            running.fed += 1

    def _draw(self, running: _Running, logits: torch.Tensor) -> int:
        """The sequence's next token, from its logits (V,)."""
        sampling = running.request.sampling
        recent = None
        if sampling.repeat_penalty != 1.0:
            window = running.context[-sampling.repeat_last_n :]
            recent = to_device(window, self.model.device)
        produced = None
        if sampling.occurrence_penalised:
            reply = running.context[len(running.request.prompt.token_ids) :]
            produced = to_device(reply, self.model.device, torch.long)
        token = sample(logits, sampling, running.generator, recent, produced)
        _await_device(token)
        return int(token)

    def _logprob(self, running: _Running, logits: torch.Tensor, token: int):
        """The token's SampledLogprob, where its request asks for them."""
        request = running.request
        wanted = request.top_logprobs is not None and request.on_logprob is not None
        if wanted and token not in self.model.eos_token_ids:
            return sampled_logprob(logits, token, request.top_logprobs)
        return None

    def _take(self, running: _Running, token: int, logprob, fed: bool = False) -> None:
        """Pass the sequence's new token on: text, a stop, or the next step's input (unless
        `fed`: a step launched ahead took it already)."""
        request, stats = running.request, running.stats
        if logprob is not None:
            request.on_logprob(logprob)
        now = time.perf_counter()
        if running.first_token_at is None:
            running.first_token_at = now
            stats.time_to_first_token_s = now - request.submitted
            if self._trace is not None:
                self._trace.request(
                    stats.prompt_tokens,
                    stats.reused_tokens,
                    request.submitted,
                    running.admitted_at,
                    now,
                )
        stats.decode_s = now - running.first_token_at
        stats.generated_tokens += 1
        if token in self.model.eos_token_ids:
            self._finish(running, "stop")
            return
        piece = running.decoder.push(token)
        if piece:
            request.on_piece(piece)
        if running.decoder.stopped:
            self._finish(running, "stop")
        elif stats.generated_tokens >= request.prompt.max_new_tokens:
            full = stats.prompt_tokens + stats.generated_tokens >= self.ctx
            self._finish(running, "context" if full else "length")
        elif not fed:
            running.next_token = token

    def _finish(self, running: _Running, reason: str) -> None:
        running.done = True
        running.stats.finish_reason = reason  # type: ignore[assignment]
        piece = running.decoder.finish()
        if piece:
            running.request.on_piece(piece)
        with self._wake:
            self.running.remove(running)
            self.used_at[running.slot] = time.monotonic()
            self.free.add(running.slot)
        running.request.on_end(running.stats)


def _goes_on(running: _Running) -> bool:
    """Whether the sequence needs a step after the token it is about to take, as far as is
    known before that token is read: not at its token limit, not cancelled."""
    return (
        running.stats.generated_tokens + 1 < running.request.prompt.max_new_tokens
        and not running.request.cancel.is_set()
    )


def _read_back(tensor: torch.Tensor):
    """Start copying a device tensor of ints to the host; the returned call waits for it (with
    Python's lock released) and gives the values. Work queued after this call is not waited
    for, as reading the tensor directly would."""
    if not tensor.is_cuda:
        return tensor.tolist
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def values() -> list[int]:
        copied.synchronize()
        return host.tolist()

    return values


def _await_device(tensor: torch.Tensor) -> None:
    """Wait for a GPU to finish the work that makes `tensor` with Python's lock released: a
    step takes milliseconds, in which a server's threads stream the last step's tokens
    (reading the tensor back would wait holding the lock, and stall them all)."""
    if tensor.is_cuda:
        torch.cuda.current_stream(tensor.device).synchronize()
