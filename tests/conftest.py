import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _remove_leaked_deepspeed_shm_buffers():
    """Jobs started through launchers leave DeepSpeed's /dev/shm buffers behind too: remove the new ones."""
    from ds_tutel.shm import deepspeed_shm_buffers
    before = set(deepspeed_shm_buffers())
    yield
    for path in set(deepspeed_shm_buffers()) - before:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
