"""For the 2-process test workers (tests/test_train_fsdp.py, tests/test_train_deepspeed.py), which
torchrun restarts once after killing them: the gloo process group of this attempt.

The restarted ranks reuse torchrun's store, where the dead ranks' gloo addresses are still
published: a prefix per attempt keeps them apart. The Trainer (and deepspeed.comm) then use this
initialised group."""

import os

import torch.distributed as dist


def init_process_group_for_this_attempt() -> int:
    """Start the gloo group of this torchrun attempt -> the attempt number (0 first, 1 after a restart)."""
    attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    dist.init_process_group("gloo", store=dist.PrefixStore(f"attempt-{attempt}", store),
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    return attempt
