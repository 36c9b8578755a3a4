"""Tensor parallelism: one model over the GPUs of one host, a process per GPU (`--gpus N`).

shards.py says which part of each weight a rank keeps, layers.py adds the collectives to a
rank's part, group.py starts the ranks and keeps them in step, load.py loads a model over them.
On CPUs the same runs over gloo, which is how the tests check it against one process.
"""
