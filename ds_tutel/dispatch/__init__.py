"""Dispatch and combine, torch reference path: capacity buffers [E, C, M] (capacity.py) and exact rows grouped by
expert (grouped.py). Backends register faster versions in ds_tutel.kernels."""
