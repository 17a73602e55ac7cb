"""Launching ranks on real machines: hardware description (machine.py), per-rank CPU/GPU/NIC binding and the rank
start-up (binding.py), per-machine fabric settings (fabric.py), the launcher CLI (cli.py, `python -m
ds_tutel.launch`), and the clean-up of DeepSpeed's CPU shared-memory buffers (shm.py).

Everything here uses the standard library only: it runs before torch is imported, so that a rank is bound to its
CPUs before any thread pool starts.
"""
