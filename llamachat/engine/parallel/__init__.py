"""Tensor parallelism: one model over the GPUs of one host, a process per GPU (`--gpus N`).

engine/shards.py says which part of each weight a rank keeps and engine/shard_layers.py adds the
collectives to a rank's part (both below decode/ and loading.py, which use them); here group.py
starts the ranks and keeps them in step, load.py loads a model over them, worker.py is a
follower's entry.
On CPUs the same runs over gloo, which is how the tests check it against one process.
"""
