"""A piped one-shot's start on a CPU: process start → first byte of the answer on stdout, and →
exit, for `echo QUESTION | llamachat --max-tokens 1 --temperature 0`:

- `quantising`: the model's kept quantised layers removed before each run (a first load);
- `kept`: read from the model's quantized/ (every later load);
- `server`: a `llamachat serve --background` holding the model answers (ollama's way).

Beside them, what any start pays: `python -c pass` and `python -c "import torch"`.

    LLAMACHAT_HOME=... python benchmarks/oneshot_start.py --model smollm2 --runs 5

Runs alternate between the modes so that a busy moment falls on all of them alike; medians and
ranges are printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

QUESTION = b"Say hello."


def timed(command: list[str], stdin: bytes = b"") -> tuple[float, float]:
    """Seconds from spawning `command` to its first byte on stdout, and to its exit."""
    started = time.perf_counter()
    process = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(stdin)
    process.stdin.close()
    process.stdout.read(1)
    first = time.perf_counter() - started
    process.stdout.read()
    if process.wait() != 0:
        raise SystemExit(f"{' '.join(command)} failed (exit {process.returncode})")
    return first, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    home = os.environ.get("LLAMACHAT_HOME")
    if not home:
        raise SystemExit("set LLAMACHAT_HOME to the llamachat home holding --model")
    kept = Path(home) / "models" / args.model / "quantized"
    llamachat = [sys.executable, "-m", "llamachat"]
    oneshot = [*llamachat, "-m", args.model, "--max-tokens", "1", "--temperature", "0"]
    python = [sys.executable, "-c"]

    def quantising() -> tuple[float, float]:
        shutil.rmtree(kept, ignore_errors=True)
        return timed(oneshot, QUESTION)

    modes = {
        "python -c pass": lambda: timed([*python, "pass"]),
        'python -c "import torch"': lambda: timed([*python, "import torch; print()"]),
        "one-shot, quantising": quantising,
        "one-shot, kept layers": lambda: timed(oneshot, QUESTION),
    }
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in modes}
    timed(oneshot, QUESTION)  # files into the page cache, the C kernels built, layers kept
    for _ in range(args.runs):
        for name, run in modes.items():
            results[name].append(run())
    started = subprocess.run(
        [*llamachat, "serve", "--background", "-m", args.model], capture_output=True
    )
    if started.returncode != 0:
        raise SystemExit(started.stderr.decode().strip())
    try:
        name = "one-shot, `serve --background` running"
        results[name] = [timed(oneshot, QUESTION) for _ in range(args.runs)]
    finally:
        subprocess.run([*llamachat, "stop"], capture_output=True)
    print("| start | first byte (s), median [range] | exit (s), median |")
    print("|---|---|---|")
    for name, times in results.items():
        firsts = [first for first, _ in times]
        exits = [end for _, end in times]
        print(
            f"| {name} | {statistics.median(firsts):.2f} [{min(firsts):.2f}–{max(firsts):.2f}]"
            f" | {statistics.median(exits):.2f} |"
        )


if __name__ == "__main__":
    main()
