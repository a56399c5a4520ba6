"""fastprompt.parallel: training and evaluation over several processes started by torchrun.

data_parallel: the process group, one gradient all-reduce per step, sharded batches, exact evaluation counts,
rank 0 as the only writer (see its docstring; the runner uses it, so `torchrun ... -m fastprompt train` works).
"""

from .data_parallel import GradientMean, PeerFailed, init_from_env, is_main, rank, world_size

__all__ = ["GradientMean", "PeerFailed", "init_from_env", "is_main", "rank", "world_size"]
