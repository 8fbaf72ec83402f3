"""Tensor parallelism: shards of a checkpoint, the memory plan, and the Ray actors that run them."""
