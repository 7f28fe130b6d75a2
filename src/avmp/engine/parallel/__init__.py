"""Tensor parallelism: a rank's place in its group (`TensorParallel`), launching the
ranks, sharded layers, and which part of each full tensor a rank holds.

See docs/design-tp.md for how each family is sharded and what is reduced where.
"""

from __future__ import annotations

from avmp.engine.parallel.group import SINGLE, TensorParallel
from avmp.engine.parallel.launch import (
    check_world_size,
    init_group,
    run_ranks,
    shut_down,
)
from avmp.engine.parallel.shards import Rows, Shard, load_full_state, model_shards, shard_of

__all__ = [
    "SINGLE",
    "Rows",
    "Shard",
    "TensorParallel",
    "check_world_size",
    "init_group",
    "load_full_state",
    "model_shards",
    "run_ranks",
    "shard_of",
    "shut_down",
]
