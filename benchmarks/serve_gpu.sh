#!/usr/bin/env bash
# `llamachat serve` against benchmarks/serve_bench.py on a GPU machine: random weights of a shape
# (default 8b, bf16) with the tokenizer of TOKENIZER (a model folder; llama.cpp's Llama-3
# vocabulary, made into one, gives the prompts llama-server gets in benchmarks/llamacpp/), up to
# 64 replies at once with 1,024 tokens of context each (llama-server's anchor settings), the
# bench streamed and then non-streamed. Output to OUT: summary.md, bench.jsonl, server.log.
#
#   benchmarks/serve_gpu.sh OUT TOKENIZER [--shape 8b] [--clients "1 8 32 64"] [--requests 3]
#       [--deadline SECONDS] [--modes "stream no-stream"] [--serve-flags "--step-tokens 512"]
set -uo pipefail

[ $# -ge 2 ] || { echo "usage: $0 OUT TOKENIZER [--shape S] [--clients LIST]" \
  "[--requests N] [--deadline S]" >&2; exit 2; }
out=$(realpath -m "$1") tokenizer=$(realpath "$2"); shift 2
shape=8b clients="1 8 32 64" requests=3 deadline=300 modes="stream no-stream" serve_flags=""
while [ $# -gt 0 ]; do
  case $1 in
    --shape) shape=$2; shift ;;
    --clients) clients=$2; shift ;;
    --requests) requests=$2; shift ;;
    --deadline) deadline=$2; shift ;;
    --modes) modes=$2; shift ;;
    --serve-flags) serve_flags=$2; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
port=${LLAMACHAT_PORT:-8000}
mkdir -p "$out"
start=$(date +%s)
elapsed() { echo $(($(date +%s) - start)); }
say() { echo "serve_gpu: [$(elapsed) s] $*" | tee -a "$out/summary.md" >&2; }
: >"$out/summary.md"
say "llamachat serve --shape $shape $serve_flags, clients $clients, $requests requests each"

home=$(mktemp -d)
# shellcheck disable=SC2086  # the extra flags are words
LLAMACHAT_HOME=$home "$python" -m llamachat serve --shape "$shape" --tokenizer "$tokenizer" \
  --port "$port" --max-batch 64 --max-queue 256 --ctx 1024 $serve_flags >"$out/server.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null' EXIT
for _ in $(seq 240); do  # the model is made and its graphs captured before the port opens
  curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
  kill -0 $pid 2>/dev/null || { say "error: the server did not start"; cat "$out/server.log" >&2; exit 1; }
  sleep 1
done
say "server up"

for mode in $modes; do
  left=$((deadline - $(elapsed) - 20))
  if [ $left -le 0 ]; then say "$mode: skipped, no time left"; continue; fi
  flags=(--wait 180)
  [ $mode = no-stream ] && flags=(--no-stream --wait 30)
  say "bench ($mode), budget $left s"
  # shellcheck disable=SC2086
  "$python" "$here/serve_bench.py" --url "http://127.0.0.1:$port/v1" --model "$shape" \
    --clients $clients --requests "$requests" --warmup 1 --budget "$left" --timeout 120 \
    --jsonl "$out/bench.jsonl" --label "llamachat serve $mode" "${flags[@]}" \
    >"$out/table-$mode.md" 2>>"$out/bench.txt"
  echo "bench rc=$? ($mode)" >>"$out/bench.txt"
  { echo; echo "### llamachat serve, $mode"; echo; cat "$out/table-$mode.md"; echo; } \
    >>"$out/summary.md"
  kill -0 $pid 2>/dev/null || { say "error: the server died"; tail -30 "$out/server.log" >&2; break; }
done
rm -f "$out"/table-*.md
curl -s "http://127.0.0.1:$port/metrics" | grep -E "^llamachat_(kv|batch)" >>"$out/summary.md"
kill -INT $pid 2>/dev/null; wait $pid 2>/dev/null
say "done"
cat "$out/summary.md"
