"""Shared test settings: tests run on the CPU, single-threaded XLA per worker, no network."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
