"""Expert parallelism: the all-to-all collectives (flat, 2DH), the capacity-buffer exchange with its overlap
schedule, the kept-row exchange, and the node topology they read. Collectives run on DeepSpeed's process groups."""
