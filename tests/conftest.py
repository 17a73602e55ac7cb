import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


import pytest  # noqa: E402


def _in_a_worker(config) -> bool:
    """True in a pytest-xdist worker process (the suite runs in parallel workers, see scripts/test.sh)."""
    return hasattr(config, "workerinput")


@pytest.fixture(autouse=True)
def _remove_leaked_deepspeed_shm_buffers(request):
    """Jobs started through launchers leave DeepSpeed's /dev/shm buffers behind too: remove the new ones. With
    parallel workers another worker's job may be using a new buffer, so they go once every worker is done
    (pytest_sessionfinish below)."""
    if _in_a_worker(request.config):
        yield
        return
    from ds_tutel.launch.shm import deepspeed_shm_buffers
    before = set(deepspeed_shm_buffers())
    yield
    _remove(set(deepspeed_shm_buffers()) - before)


def _remove(paths) -> None:
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def pytest_collection_modifyitems(session, config, items):
    """Test files that spawn ranks go first: the parallel workers take files in this order, and the long ones
    started last would leave one worker running alone at the end."""
    heavy = {item.module.__name__ for item in items if item.get_closest_marker("multirank")}
    items.sort(key=lambda item: item.module.__name__ not in heavy)  # stable: file order kept within each part


def pytest_sessionfinish(session):
    if _in_a_worker(session.config) or not hasattr(session.config, "_shm_buffers_before"):
        return
    from ds_tutel.launch.shm import deepspeed_shm_buffers
    _remove(set(deepspeed_shm_buffers()) - session.config._shm_buffers_before)


def pytest_sessionstart(session):
    """Builds the compiled CPU dispatch loops and DeepSpeed's CPU communication op once, before any test (and
    before the parallel workers start): spawned ranks and launched jobs then load the cached builds instead of
    compiling, or waiting on another compile's lock, under their timeouts. DS_TUTEL_CPU_KERNELS=1 (set here unless
    the caller chose) makes a failed build fail the suite rather than fall back unnoticed."""
    os.environ.setdefault("DS_TUTEL_CPU_KERNELS", "1")
    if not _in_a_worker(session.config):
        from ds_tutel.launch.shm import deepspeed_shm_buffers
        session.config._shm_buffers_before = set(deepspeed_shm_buffers())
        from deepspeed.comm.torch import build_shm_op
        build_shm_op()
    from ds_tutel import kernels
    if kernels.provider_loaded("cpu"):  # absent where a test runs the suite without the CPU provider
        from ds_tutel.kernels.cpu import build as cpu_kernels
        cpu_kernels.load()
