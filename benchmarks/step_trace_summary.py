"""What a step trace (LLAMACHAT_STEP_TRACE, engine/step_trace.py) says, per stretch of work:
the bench's concurrency levels are told apart by the device idling between them.

    python benchmarks/step_trace_summary.py TRACE_FILE [--gap-ms 500]

For each stretch: its steps by kind (count, rows, prompt tokens, device and launch ms), the
device's busy share, and its requests' waits on the host (p50 / p90 / max, ms): for a slot
(submitted → admitted), for the first token once admitted, and in all (submitted → first
token, the server's part of a client's time to first token).
"""

from __future__ import annotations

import argparse
import json
import statistics


def quantiles(values: list[float]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    pick = lambda share: ordered[min(int(share * len(ordered)), len(ordered) - 1)]  # noqa: E731
    return f"{pick(0.5):.0f} / {pick(0.9):.0f} / {ordered[-1]:.0f}"


def stretches(steps: list[dict], gap_ms: float) -> list[list[dict]]:
    """Steps split where the device idled longer than gap_ms (host times)."""
    groups: list[list[dict]] = []
    for step in steps:
        if groups and step["host_ms"] - groups[-1][-1]["host_ms"] <= gap_ms:
            groups[-1].append(step)
        else:
            groups.append([step])
    return groups


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("trace")
    parser.add_argument("--gap-ms", type=float, default=500.0)
    args = parser.parse_args()
    with open(args.trace, encoding="utf-8") as lines:
        records = [json.loads(line) for line in lines]
    steps = [r for r in records if r.get("kind") in ("decode", "mixed")]
    requests = [r for r in records if r.get("kind") == "request"]
    for group in stretches(steps, args.gap_ms):
        begin, end = group[0]["host_ms"], group[-1]["host_ms"] + group[-1]["gpu_ms"]
        inside = [r for r in requests if begin - args.gap_ms <= r["submitted_ms"] <= end]
        span = group[-1]["gpu_start_ms"] + group[-1]["gpu_ms"] - group[0]["gpu_start_ms"]
        busy = sum(s["gpu_ms"] for s in group)
        print(f"## {len(inside)} requests, {span / 1000:.2f} s, device busy {busy / span:.0%}")
        print("| steps | count | rows (mean) | prompt tokens (mean) | device ms | launch ms |")
        print("|---|---|---|---|---|---|")
        for kind in ("decode", "mixed"):
            chosen = [s for s in group if s["kind"] == kind]
            if not chosen:
                continue
            row = [
                kind,
                str(len(chosen)),
                f"{statistics.mean(s['rows'] for s in chosen):.1f}",
                f"{statistics.mean(s['prompt'] for s in chosen):.0f}",
                f"{statistics.mean(s['gpu_ms'] for s in chosen):.2f}",
                f"{statistics.mean(s['launch_ms'] for s in chosen):.2f}",
            ]
            print("| " + " | ".join(row) + " |")
        print()
        print("| wait (p50 / p90 / max ms) | for a slot | admitted → first token | in all |")
        print("|---|---|---|---|")
        slot = [r["admitted_ms"] - r["submitted_ms"] for r in inside]
        first = [r["first_token_ms"] - r["admitted_ms"] for r in inside]
        whole = [r["first_token_ms"] - r["submitted_ms"] for r in inside]
        print(f"| requests | {quantiles(slot)} | {quantiles(first)} | {quantiles(whole)} |")
        print()


if __name__ == "__main__":
    main()
