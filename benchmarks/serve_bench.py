"""Closed-loop clients against any OpenAI-compatible server, over HTTP: `llamachat serve`,
llama.cpp's `llama-server`, vLLM… The end-to-end figure of issue 12.

    python benchmarks/serve_bench.py --url http://127.0.0.1:8000/v1 --model 8b --clients 1 8 32 64
    python benchmarks/serve_bench.py --url http://127.0.0.1:8080/v1 --model x --no-stream

For each --clients level, that many clients each send --warmup requests, wait for the others,
then send --requests more, one after another (a client sends its next request when its reply
has ended). Every request is a chat completion with one user message of --prompt-words random
English words, its own (seeded by level, client and request), so no two requests share more
than the chat template's prefix; the words are long and rare ones, about 5.8 tokens each
with Llama-3's tokenizer, so 100 words are about 600 prompt tokens (the prompt tokens printed
are the server's own count, from `usage`). Replies are --max-tokens long: `ignore_eos: true`
is sent (llama.cpp honours it; servers that do not know it ignore it, and llamachat's random
weights rarely stop early) and the generated tokens counted are the server's `usage`, never
assumed.

Streamed (the default: SSE with stream_options.include_usage), each request gives its time to
the first content chunk (TTFT) and the gaps between content chunks (inter-token latency);
--no-stream gives whole replies (what the issue's llama.cpp anchor measured) and latency only.

Printed per level (a Markdown table on stdout, progress on stderr; with --jsonl FILE one JSON
line per level too): generated tok/s = the measured requests' completion tokens over the wall
time from the level's start to its last reply; TTFT and inter-token p50/p99; whole-request
latency p50/p99; mean prompt and completion tokens per request; errors (non-200 answers,
broken streams, timeouts, replies without usage), with the first few error texts on stderr.
Bounded: each request has --timeout seconds in all, and with --budget S no request starts
after S seconds of the run (later levels are reported as skipped).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field

import httpx

# Long, rare English words (medical, chemical and learned ones): with Llama-3's tokenizer, a
# leading space each as in a prompt, every one is 5 tokens or more and their mean is 5.80
# (Llama-3-8B's vocabulary and merges, from llama.cpp's models/ggml-vocab-llama-bpe.gguf).
WORDS = tuple(
    """
acetylcholinesterase acetylsalicylic adenocarcinoma alemtuzumab alprazolam aminotransferase
amitriptyline anacoluthon anadiplosis antidisestablishmentarianism arachibutyrophobia
aripiprazole atezolizumab atherosclerotic benralizumab betamethasone bevacizumab blepharospasm
borborygmus brexpiprazole butyrylcholinesterase cabazitaxel capecitabine certolizumab
chemiluminescence chlordiazepoxide chlorofluorocarbons cholangiocarcinoma chondrosarcoma
clomipramine craniopharyngioma cyclophosphamide dacryocystitis daunorubicin decarboxylase
deoxyribonuclease deoxyribonucleotide desvenlafaxine dexamethasone
dichlorodiphenyltrichloroethane diethylstilbestrol dihydroxyphenylalanine dodecahedron
electroencephalographically electroluminescence elotuzumab encephalomyelitis enzalutamide
epanalepsis erythropoiesis esophagogastroduodenoscopy eszopiclone ethylenediaminetetraacetic
floccinaucinihilipilification fludarabine fludrocortisone gesamtkunstwerk glomerulonephritis
glycosaminoglycan glycosyltransferase gonadotropin guselkumab hemidemisemiquaver
hepatosplenomegaly hermeneutically hexakosioihexekontahexaphobia
hippopotomonstrosesquippedaliophobia hyaluronidase hydrochlorofluorocarbon hydrochlorothiazide
hydroxychloroquine hydroxytryptamine hypercholesterolemia hyperparathyroidism icosahedron
idiosyncratically inextinguishable interdisciplinarity ixekizumab keratoconjunctivitis
laparoscopically laryngotracheitis lebrikizumab leiomyosarcoma levetiracetam
lymphangioleiomyomatosis magnetohydrodynamics medulloblastoma mepolizumab
methylenedioxymethamphetamine methylprednisolone microcrystalline mirtazapine mitoxantrone
mucopolysaccharidosis myelomeningocele neurofibromatosis nonproliferation norepinephrine
nortriptyline obinutuzumab oligodendroglioma onomatopoeia otorhinolaryngologist overenthusiastic
oxcarbazepine paclitaxel paleoanthropologist panitumumab paraganglioma paraskevidekatriaphobia
pembrolizumab peptidyltransferase phantasmagorical phenylethylamine phenylketonuria
pheochromocytoma phosphatidylethanolamine phosphoenolpyruvate phosphofructokinase
pneumonoultramicroscopicsilicovolcanoconiosis polycrystalline polytetrafluoroethylene
polyvinylpyrrolidone prosopagnosia prosopopoeia pseudohypoparathyroidism
pseudopseudohypoparathyroidism psychoneuroimmunology pulchritudinous quasicrystalline raloxifene
reslizumab retinoblastoma rhabdomyosarcoma rhombicuboctahedron ribonucleoprotein risankizumab
secukinumab sesquicentennial somatostatinoma somatotropin spectrophotometrically
sphygmomanometer spironolactone stroboscopically supercalifragilisticexpialidocious
tetrahydrocannabinol tetrakaidecahedron thrombocytopenia tildrakizumab tracheobronchitis
tralokinumab trastuzumab trinitrotoluene triskaidekaphobia ultracentrifugation unostentatiously
ustekinumab venlafaxine weltanschauung xenotransplantation xerophthalmia
""".split()
)


@dataclass
class Outcome:
    """One request: its error (None when it ended well), the server's token counts, times."""

    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency: float = 0.0
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)


def prompt_text(seed: int, words: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


def percentile(values: list[float], share: float) -> float | None:
    """Linear interpolation between the closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    at = share * (len(ordered) - 1)
    low = int(at)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


def request_body(args: argparse.Namespace, text: str) -> dict:
    body: dict = {
        "model": args.model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "stream": args.stream,
    }
    if args.stream:
        body["stream_options"] = {"include_usage": True}
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.seed is not None:
        body["seed"] = args.seed
    return body


async def one_request(client: httpx.AsyncClient, args: argparse.Namespace, text: str) -> Outcome:
    outcome = Outcome()
    started = time.perf_counter()
    try:
        async with asyncio.timeout(args.timeout):
            await (_streamed if args.stream else _whole)(client, args, text, started, outcome)
    except TimeoutError:
        outcome.error = f"timed out after {args.timeout:g} s"
    except httpx.HTTPError as error:
        outcome.error = f"{type(error).__name__}: {error}"
    except (ValueError, KeyError, TypeError, IndexError) as error:  # a malformed answer
        outcome.error = f"bad answer: {type(error).__name__}: {error}"
    outcome.latency = time.perf_counter() - started
    if outcome.error is None and outcome.completion_tokens <= 0:
        outcome.error = "no completion tokens in usage"
    return outcome


def _usage(outcome: Outcome, usage: dict | None) -> None:
    if not usage:
        raise ValueError("no usage in the reply")
    outcome.prompt_tokens = int(usage["prompt_tokens"])
    outcome.completion_tokens = int(usage["completion_tokens"])


async def _whole(client, args, text, started, outcome) -> None:
    response = await client.post("/chat/completions", json=request_body(args, text))
    if response.status_code != 200:
        outcome.error = f"HTTP {response.status_code}: {response.text[:200]}"
        return
    _usage(outcome, response.json().get("usage"))


async def _streamed(client, args, text, started, outcome) -> None:
    times: list[float] = []
    usage = None
    done = False
    async with client.stream(
        "POST", "/chat/completions", json=request_body(args, text)
    ) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            outcome.error = f"HTTP {response.status_code}: {text[:200]}"
            return
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, comments, event: lines
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                outcome.error = f"error in stream: {str(chunk['error'])[:200]}"
                return
            for choice in chunk.get("choices") or ():
                if (choice.get("delta") or {}).get("content"):
                    times.append(time.perf_counter())
                    break
            if chunk.get("usage"):
                usage = chunk["usage"]
    if not done:
        raise ValueError("the stream ended without data: [DONE]")
    _usage(outcome, usage)
    if times:
        outcome.ttft = times[0] - started
        outcome.gaps = [b - a for a, b in zip(times, times[1:], strict=False)]


async def level(args: argparse.Namespace, clients: int, deadline: float | None) -> dict:
    """One concurrency level: warm-up, a barrier, then the measured requests."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    measured: list[Outcome] = []
    warmup_errors: list[str] = []
    ready = asyncio.Barrier(clients + 1)
    skipped = [0]

    async def client_loop(client: httpx.AsyncClient, index: int) -> None:
        for number in range(args.warmup):
            text = prompt_text(seed(clients, index, -1 - number), args.prompt_words)
            if (error := (await one_request(client, args, text)).error) is not None:
                warmup_errors.append(error)
        await ready.wait()
        for number in range(args.requests):
            if deadline is not None and time.monotonic() > deadline:
                skipped[0] += args.requests - number
                return
            text = prompt_text(seed(clients, index, number), args.prompt_words)
            measured.append(await one_request(client, args, text))

    async with httpx.AsyncClient(
        base_url=args.url.rstrip("/"), headers=headers, limits=limits, timeout=args.timeout
    ) as client:
        tasks = [asyncio.create_task(client_loop(client, i)) for i in range(clients)]
        await ready.wait()
        began = time.perf_counter()
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - began
    return {**summary(clients, measured, wall, skipped[0]), "warmup_errors": len(warmup_errors)}


def seed(clients: int, index: int, number: int) -> int:
    """Each request's own prompt: warm-up requests have negative numbers."""
    return (clients * 100_003 + index) * 1_000_003 + number


def summary(clients: int, outcomes: list[Outcome], wall: float, skipped: int) -> dict:
    good = [o for o in outcomes if o.error is None]
    errors = [o.error for o in outcomes if o.error is not None]
    ttft = [o.ttft for o in good if o.ttft is not None]
    gaps = [g for o in good for g in o.gaps]
    latency = [o.latency for o in good]
    completion = sum(o.completion_tokens for o in good)

    def ms(value: float | None) -> float | None:
        return None if value is None else round(1000 * value, 2)

    return {
        "clients": clients,
        "requests": len(outcomes),
        "errors": len(errors),
        "skipped": skipped,
        "wall_s": round(wall, 3),
        "completion_tokens": completion,
        "generated_tok_per_s": round(completion / wall, 1) if wall > 0 else None,
        "prompt_tokens_mean": round(sum(o.prompt_tokens for o in good) / len(good), 1)
        if good
        else None,
        "completion_tokens_mean": round(completion / len(good), 1) if good else None,
        "ttft_p50_ms": ms(percentile(ttft, 0.5)),
        "ttft_p99_ms": ms(percentile(ttft, 0.99)),
        "itl_p50_ms": ms(percentile(gaps, 0.5)),
        "itl_p99_ms": ms(percentile(gaps, 0.99)),
        "latency_p50_s": round(percentile(latency, 0.5), 3) if latency else None,
        "latency_p99_s": round(percentile(latency, 0.99), 3) if latency else None,
        "first_errors": errors[:3],
    }


def table(rows: list[dict]) -> str:
    def cell(value, digits: int = 0) -> str:
        if value is None:
            return "—"
        return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"

    lines = [
        "| clients | requests | errors | generated tok/s | TTFT p50 / p99 (ms) |"
        " inter-token p50 / p99 (ms) | latency p50 / p99 (s) | prompt / generated tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("skipped_level"):
            lines.append(f"| {r['clients']} | skipped: over --budget | | | | | | |")
            continue
        rate = r["generated_tok_per_s"]
        lines.append(
            f"| {r['clients']} | {r['requests']} | {r['errors']} |"
            f" {cell(rate, 0 if (rate or 0) >= 100 else 1)} |"
            f" {cell(r['ttft_p50_ms'])} / {cell(r['ttft_p99_ms'])} |"
            f" {cell(r['itl_p50_ms'], 1)} / {cell(r['itl_p99_ms'], 1)} |"
            f" {cell(r['latency_p50_s'], 2)} / {cell(r['latency_p99_s'], 2)} |"
            f" {cell(r['prompt_tokens_mean'])} / {cell(r['completion_tokens_mean'])} |"
        )
    return "\n".join(lines)


async def wait_ready(args: argparse.Namespace) -> str | None:
    """Send one-token requests until one succeeds (a server loading its model answers 503 or
    refuses connections); the last error if none did within --wait seconds."""
    deadline = time.monotonic() + args.wait
    probe = argparse.Namespace(**{**vars(args), "max_tokens": 1, "stream": False})
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=args.url.rstrip("/"), headers=headers) as client:
        while True:
            probe.timeout = max(1.0, min(args.timeout, deadline - time.monotonic()))
            error = (await one_request(client, probe, "Hello")).error
            if error is None or time.monotonic() > deadline:
                return error
            await asyncio.sleep(0.5)


async def run(args: argparse.Namespace) -> list[dict]:
    if args.wait:
        print(f"serve_bench: waiting up to {args.wait:g} s for {args.url}…", file=sys.stderr)
        if (error := await wait_ready(args)) is not None:
            raise SystemExit(f"serve_bench: error: the server did not answer: {error}")
    deadline = time.monotonic() + args.budget if args.budget else None
    rows = []
    for clients in args.clients:
        if deadline is not None and time.monotonic() > deadline:
            rows.append({"clients": clients, "skipped_level": True})
            continue
        print(f"serve_bench: {clients} client(s)…", file=sys.stderr, flush=True)
        row = await level(args, clients, deadline)
        for text in row["first_errors"]:
            print(f"serve_bench: error at {clients} clients: {text}", file=sys.stderr)
        rows.append(row)
        print(f"serve_bench: {json.dumps(row)}", file=sys.stderr, flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as file:
                file.write(json.dumps({**settings(args), **row}) + "\n")
    return rows


def settings(args: argparse.Namespace) -> dict:
    return {
        "url": args.url,
        "model": args.model,
        "stream": args.stream,
        "prompt_words": args.prompt_words,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "warmup": args.warmup,
        "requests_per_client": args.requests,
        "label": args.label,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1", help="the API's base URL")
    parser.add_argument("--model", required=True, help="the model id to ask for")
    parser.add_argument("--api-key", help="sent as Authorization: Bearer KEY")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--requests", type=int, default=3, help="measured requests per client")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured requests per client")
    parser.add_argument("--prompt-words", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, help="sent as the request's seed")
    parser.add_argument("--no-stream", dest="stream", action="store_false", help="whole replies")
    parser.add_argument(
        "--no-ignore-eos", dest="ignore_eos", action="store_false", help="do not send ignore_eos"
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request, all in")
    parser.add_argument("--budget", type=float, help="no request starts after this many seconds")
    parser.add_argument(
        "--wait", type=float, default=0, help="first wait up to this many seconds for the server"
    )
    parser.add_argument("--jsonl", help="append one JSON line per level to this file")
    parser.add_argument("--label", help="a name for this run, in the JSON lines")
    args = parser.parse_args()
    bad = [n for n in args.clients if n < 1] + ([args.requests] if args.requests < 1 else [])
    if bad or args.warmup < 0 or args.prompt_words < 1 or args.max_tokens < 1 or args.timeout <= 0:
        parser.error(
            "--clients, --requests, --prompt-words, --max-tokens and --timeout must be positive"
        )
    try:
        import uvloop  # on the GPU machine's image: an event loop with less overhead of its own
    except ImportError:
        uvloop = None
    rows = getattr(uvloop, "run", asyncio.run)(run(args))
    print(table(rows))
    failed = sum(r.get("errors", 0) for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
