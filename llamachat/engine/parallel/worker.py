"""`python -m llamachat.engine.parallel.worker ARGUMENTS`: a follower rank (group.py)."""

from __future__ import annotations

import json
import os
import sys

import torch.distributed as dist

from .group import IDLE, Launch, exit_with_parent, follow, join, launch_parent
from .load import load_part


def worker_main(arguments: str) -> int:
    """`python -m llamachat.engine.parallel.worker ARGUMENTS`: load rank r's part, follow."""
    values = json.loads(arguments)
    rank, port = values.pop("rank"), values.pop("port")
    launch = Launch(**values)
    exit_with_parent()
    store = dist.TCPStore("127.0.0.1", port, launch.world, is_master=False, timeout=IDLE)
    try:
        transformer = load_part(launch, rank)
        store.set(f"loaded/{rank}", "1")
        control = join(launch, rank, store)
        follow(transformer, launch, rank, control)
    except Exception as error:  # one line from a follower, not a traceback
        if os.getppid() == launch_parent():  # rank 0 lives: say what went wrong here
            print(f"llamachat: tensor-parallel rank {rank}: {error}", file=sys.stderr)
        return 1  # else rank 0 is gone (its connections closed): nothing to add
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1]))
