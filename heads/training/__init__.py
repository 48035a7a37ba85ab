"""Training utilities both trainers use: batches and prefetching (``data``), guards, optimiser,
schedule, best-epoch tracking and checkpoint files (``common``)."""
