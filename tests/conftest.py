import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _remove_leaked_deepspeed_shm_buffers():
    """Jobs started through launchers leave DeepSpeed's /dev/shm buffers behind too: remove the new ones."""
    from ds_tutel.launch.shm import deepspeed_shm_buffers
    before = set(deepspeed_shm_buffers())
    yield
    for path in set(deepspeed_shm_buffers()) - before:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def pytest_sessionstart(session):
    """Builds the compiled CPU dispatch loops once, before any test: spawned ranks and launched jobs then load
    the cached build instead of compiling under their timeouts. DS_TUTEL_CPU_KERNELS=1 (set here unless the
    caller chose) makes a failed build fail the suite rather than fall back unnoticed."""
    os.environ.setdefault("DS_TUTEL_CPU_KERNELS", "1")
    from ds_tutel import kernels
    if kernels.provider_loaded("cpu"):  # absent where a test runs the suite without the CPU provider
        from ds_tutel.kernels.cpu import build as cpu_kernels
        cpu_kernels.load()
