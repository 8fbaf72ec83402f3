"""Generation: the decode loop, sampling and logits processors, speculative drafting, the prefix cache, chat format."""
