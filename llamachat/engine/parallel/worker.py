"""`python -m llamachat.engine.parallel.worker ARGUMENTS`: a follower rank (group.py)."""

from __future__ import annotations

import sys

from .group import worker_main

if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1]))
