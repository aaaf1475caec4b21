"""Performance measurements of the train step (`python -m experiments.benchmark`, ``make bench``), and its PyTorch
peers.

* `benchmarks.step`: the jitted JAX step (ms per step, throughput, memory, XLA's FLOP count against the measured
  rate of the step's own matmuls) and, when PyTorch is installed, `benchmarks.torch_peer`'s step, eager and
  under ``torch.compile`` (`benchmarks.torch_timing`), in the same process, interleaved in rounds so that all see
  the same machine load;
* `benchmarks.coldcompile`: the one definition of cold compile time, which `benchmarks.step` and
  `benchmarks.compile` (XLA:CPU's two fusion emitters) use;
* `benchmarks.hlo` (the compiled step's dots), `benchmarks.procfs` (memory, CPU, load), `benchmarks.report`
  (markdown and the results' files), `benchmarks.common` (the config, synthetic digits, timing a call);
* `benchmarks.runs` (R runs as one program), `benchmarks.profile` (where the step's time goes).

Nothing here imports the `experiments` package (the config is read from its file), and importing this package
needs neither torch nor the MNIST data (synthetic digits: the step's cost does not depend on the pixels).
"""
