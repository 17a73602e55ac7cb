"""Removal of the shared-memory buffers that DeepSpeed's CPU communication leaves behind.

DeepSpeed's CPU accelerator creates one ~66 MB file per rank in /dev/shm at every `init_distributed`
(deepspeed_allreduce_buffer_<i>_<master addr>_<master port>_<rank>) and never removes it, so repeated local jobs
fill the machine's memory. Whoever starts local ranks removes its job's files once the ranks have ended.
"""
from __future__ import annotations

import glob
import os

SHM_DIR = "/dev/shm"


def deepspeed_shm_buffers(master_addr: str = "*", master_port: str = "*") -> list:
    """The DeepSpeed buffer files of one job (or of all jobs with the default wildcards)."""
    return glob.glob(os.path.join(SHM_DIR, f"deepspeed_allreduce_buffer_*_{master_addr}_{master_port}_*"))


def remove_deepspeed_shm_buffers(master_addr: str, master_port: int) -> int:
    """Removes one finished job's buffer files; returns how many were removed."""
    removed = 0
    for path in deepspeed_shm_buffers(master_addr, str(master_port)):
        try:
            os.remove(path)
            removed += 1
        except FileNotFoundError:
            pass
    return removed
