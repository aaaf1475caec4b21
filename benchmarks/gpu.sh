#!/usr/bin/env bash
# The GPU benchmarks of BENCHMARKS.md ("GPU") in one command, for a machine with one GPU and JAX with CUDA:
#
#     bash benchmarks/gpu.sh OUT_DIR
#
# 1. `benchmarks.runs` up to R = 64 runs in one program (B = 32), against R single-run steps in the same process;
# 2. `experiments.benchmark` for B = 32, 256 and 2048 (the JAX step alone: the PyTorch peer is CPU-only); its cold
#    compile is two fresh processes per batch size (`benchmarks.coldcompile`), hence its longer time limit.
# Each stage has its own time limit and a failure in one does not stop the other. Writes OUT_DIR/runs_gpu.{json,md},
# OUT_DIR/step_gpu.{json,md} and OUT_DIR/log.txt. Run it from the repository root (PYTHONPATH is set to it); wheels
# of missing pure-Python dependencies in .whl/ are installed to a temporary directory first.
set -u
out=${1:?usage: bash benchmarks/gpu.sh OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/wsram_site \
    .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/wsram_site"
fi
{
  nvidia-smi -L
  python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', \
optax.__version__, jax.devices())"
  echo "== benchmarks.runs"
  timeout 300 python3 -m benchmarks.runs --run_counts=1,2,4,8,16,32,64 --steps=40 --rounds=4 \
    --out="$out/runs_gpu" || echo "benchmarks.runs exited with $?"
  echo "== experiments.benchmark"
  timeout 420 python3 -m experiments.benchmark --batch_sizes=32,256,2048 --steps=30 --rounds=3 --notorch \
    --data_parallel=1 --out="$out/step_gpu" || echo "experiments.benchmark exited with $?"
} 2>&1 | tee "$out/log.txt"
