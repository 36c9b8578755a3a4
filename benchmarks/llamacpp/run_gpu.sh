#!/usr/bin/env bash
# llama.cpp's llama-server against benchmarks/serve_bench.py, in one go on a GPU machine with
# nvcc and cmake and no network: build llama-server (CUDA, sm_90) while the random 8B-shaped F16
# GGUF is written beside it, start the server (flash attention, 64 slots, continuous batching,
# the issue's anchor settings), run the bench streamed and then non-streamed (the anchor's
# mode), stop the server. Everything it reports goes to OUT: summary.md (the two tables and
# the timings), bench.jsonl (one line per level), and the build's, GGUF's and server's logs.
#
#   benchmarks/llamacpp/run_gpu.sh SDIST OUT [--cpu] [--shape 8b|tiny] [--clients "1 8 32 64"]
#       [--requests 3] [--deadline SECONDS]
#
# SDIST: the llama-cpp-python sdist or trim_sdist.sh's copy of it. --deadline (default 540)
# bounds the whole run from its start: no bench request starts after it, less a minute to stop.
# --cpu and --shape tiny check the pipeline on a machine without a GPU.
set -uo pipefail

usage() {
  echo "usage: $0 SDIST OUT [--cpu] [--shape 8b|tiny] [--clients LIST] [--requests N]" \
    "[--deadline S] [--jobs N]" >&2
  exit 2
}
[ $# -ge 2 ] || usage
sdist=$(realpath "$1") out=$(realpath -m "$2"); shift 2
cpu="" shape=8b clients="1 8 32 64" requests=3 deadline=540 jobs=$(nproc)
while [ $# -gt 0 ]; do
  case $1 in
    --cpu) cpu=--cpu ;;
    --shape) shape=$2; shift ;;
    --clients) clients=$2; shift ;;
    --requests) requests=$2; shift ;;
    --deadline) deadline=$2; shift ;;
    --jobs) jobs=$2; shift ;;
    *) usage ;;
  esac
  shift
done
here=$(cd "$(dirname "$0")" && pwd)
work=${LLAMACPP_WORK:-/tmp/llamacpp}
port=${LLAMACPP_PORT:-8080}
python=${PYTHON:-python3}
mkdir -p "$work" "$out"
start=$(date +%s)
elapsed() { echo $(($(date +%s) - start)); }
say() { echo "run_gpu: [$(elapsed) s] $*" | tee -a "$out/summary.md" >&2; }
: >"$out/summary.md"
say "llama-server from $(basename "$sdist"), shape $shape, clients $clients, $requests requests each"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv,noheader | tee -a "$out/summary.md" >&2

# 1. The build, in the background; the GGUF as soon as its source is out of the tarball.
"$here/build_server.sh" "$sdist" "$work" $cpu -j "$jobs" >"$out/build.txt" 2>&1 &
build=$!
for _ in $(seq 600); do [ -d "$work/src" ] && break; kill -0 $build 2>/dev/null || break; sleep 0.1; done
gguf=$work/$shape.gguf
if [ -f "$gguf" ]; then
  say "GGUF $gguf already there"
else
  "$python" "$here/make_gguf.py" --src "$work/src" --shape "$shape" --out "$gguf" >"$out/gguf.txt" 2>&1 \
    || { cat "$out/gguf.txt" >&2; say "error: the GGUF was not written"; kill $build; exit 1; }
  say "GGUF written: $(tail -1 "$out/gguf.txt")"
fi
wait $build || { tail -30 "$out/build.txt" >&2; cp "$work/build.log" "$out/" 2>/dev/null;
  say "error: the build failed"; exit 1; }
say "built: $(tail -1 "$out/build.txt")"

# 2. The server: flash attention, 64 slots (1,024 tokens of context each), continuous batching.
server=("$work/build/bin/llama-server" -m "$gguf" --host 127.0.0.1 --port "$port" -a "$shape"
  -fa on -cb --no-webui)
if [ -z "$cpu" ]; then
  server+=(-ngl 999 -np 64 -c $((64 * 1024)))
else
  server+=(-ngl 0 -np 4 -c $((4 * 1024)) -t "$jobs")
fi
say "server: ${server[*]}"
"${server[@]}" >"$out/server.txt" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null' EXIT

# 3. The bench, streamed then whole replies, each bounded by what is left of the deadline.
for mode in stream no-stream; do
  left=$((deadline - $(elapsed) - 60))
  if [ $left -le 0 ]; then say "$mode: skipped, no time left"; continue; fi
  flags=(--wait 240)
  [ $mode = no-stream ] && flags=(--no-stream --wait 30)
  say "bench ($mode), budget $left s"
  # shellcheck disable=SC2086
  "$python" "$here/../serve_bench.py" --url "http://127.0.0.1:$port/v1" --model "$shape" \
    --clients $clients --requests "$requests" --warmup 1 --budget "$left" --timeout 120 \
    --jsonl "$out/bench.jsonl" --label "llama-server $mode" "${flags[@]}" \
    >"$out/table-$mode.md" 2>>"$out/bench.txt"
  echo "bench rc=$? ($mode)" >>"$out/bench.txt"
  { echo; echo "### llama-server, $mode"; echo; cat "$out/table-$mode.md"; echo; } >>"$out/summary.md"
  kill -0 $pid 2>/dev/null || { say "error: the server died"; tail -30 "$out/server.txt" >&2; break; }
done
rm -f "$out"/table-*.md
kill $pid 2>/dev/null; wait $pid 2>/dev/null
# The server's log holds a line per request: keep its start and its end.
{ head -150 "$out/server.txt"; echo "[…]"; tail -60 "$out/server.txt"; } >"$out/server.log"
rm -f "$out/server.txt"
say "done"
cat "$out/summary.md"
