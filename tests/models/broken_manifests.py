"""Ways a model's manifest.json can be broken, each made from a good manifest's data: the store
tests read them all, the command-line tests a few."""

from __future__ import annotations

import json

BROKEN_MANIFESTS = {
    "garbage": lambda good: b"\x00\x17garbage{",
    "empty object": lambda good: b"{}",
    "a list": lambda good: b"[1, 2]",
    "files not a list": lambda good: json.dumps({**good, "files": "model.safetensors"}).encode(),
    "a file record of wrong types": lambda good: json.dumps(
        {**good, "files": [{"path": 3, "size": "big", "sha256": None}]}
    ).encode(),
    "a file path that climbs out": lambda good: json.dumps(
        {**good, "files": [{**good["files"][0], "path": "../../victim"}]}
    ).encode(),
    "a size that is a boolean": lambda good: json.dumps(
        {**good, "files": [{**good["files"][0], "size": True}]}
    ).encode(),
    "no name": lambda good: json.dumps({**good, "name": None}).encode(),
    "nested too deep": lambda good: b"[" * 100_000 + b"]" * 100_000,
    "parameters not a number": lambda good: json.dumps({**good, "parameters": "many"}).encode(),
    "not UTF-8": lambda good: json.dumps(good).encode().replace(b'"name": "', b'"name": "\xff', 1),
}
