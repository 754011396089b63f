"""Suite-wide test settings.

One intra-op thread per process: the suite runs many small models on a 2-core machine, and
PyTorch's and BLAS's thread pools competing with data-loader workers and subprocesses made
steps 3-20x slower.  Set before torch is imported, so subprocesses inherit it too.
"""

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")


def pytest_configure(config):
    import torch

    torch.set_num_threads(1)


def _rel_err(a, b) -> float:
    """``||a - b|| / ||b||`` (Frobenius, in float64): how far two results of different kernels are.

    Results computed by different kernels (NHWC vs NCHW, another batch size, another token
    count) agree only up to rounding whose size depends on the CPU (oneDNN/BLAS pick AVX2,
    AVX-512 or AMX code on Intel and AMD machines), so compare them by a relative norm rather
    than an absolute elementwise tolerance tuned on one CPU.
    """
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


import pytest  # noqa: E402


@pytest.fixture
def rel_err():
    """See :func:`_rel_err`."""
    return _rel_err


@pytest.fixture(scope="session")
def load_benchmark():
    """``load_benchmark("gpu")`` -> the module of ``benchmarks/gpu.py`` (benchmarks are scripts, not a
    package), loaded once per session."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "benchmarks"
    loaded = {}

    def load(name: str):
        if name not in loaded:
            spec = importlib.util.spec_from_file_location(f"radpretrain_bench_{name}", root / f"{name}.py")
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            loaded[name] = mod
        return loaded[name]

    return load
