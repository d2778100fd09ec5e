"""Real tiny checkpoints for tests, benchmarks and the demo (built in under a second on CPU)."""
