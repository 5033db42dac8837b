"""Ways to run the engine: the embedded single process (and, in cluster mode, the workers)."""
