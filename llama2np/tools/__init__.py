"""Tools beside generation: logits comparison, perplexity, logits files."""
