"""Performance measurements of the train step (`python -m experiments.benchmark`), and its PyTorch eager peer.

`benchmarks.step` measures the jitted JAX step (compile time, ms per step, throughput, memory, XLA's FLOP count
against the measured rate of the step's own matmuls) and, when PyTorch is installed, `benchmarks.torch_peer`'s
step in the same process, interleaved in rounds so that both see the same machine load. Importing this package
needs neither torch nor the MNIST data (the benchmark draws synthetic digits: the step's cost does not depend on
the pixels).
"""
