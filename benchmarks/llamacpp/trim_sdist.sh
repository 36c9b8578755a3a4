#!/usr/bin/env bash
# Make a copy of the llama-cpp-python sdist that holds only what build_server.sh and
# make_gguf.py read (vendor/llama.cpp without docs, tests, the web UI's sources and all
# vocabularies but Llama-3's), in the sdist's own layout: the full sdist (73 MiB) is over the
# 64 MiB a GPU-machine call can carry, the trimmed one is about 15 MiB.
#
#   benchmarks/llamacpp/trim_sdist.sh SDIST OUT.tar.gz
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 SDIST OUT.tar.gz" >&2; exit 2; }
mapfile -t excl < <(sed 's/^/--exclude=/' "$(dirname "$0")/trim.exclude")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tar -xzf "$1" -C "$tmp" --wildcards '*/vendor/llama.cpp/*' "${excl[@]}"
tar -czf "$2.tmp" -C "$tmp" "$(ls "$tmp")" && mv "$2.tmp" "$2"
echo "trim_sdist: $2 ($(du -h "$2" | cut -f1))" >&2
