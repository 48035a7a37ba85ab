"""The torch-free leaf every other package may import: errors, small file helpers, metrics, the split
protocol. It imports nothing of ours (enforced by ``tests/test_layers.py``)."""
