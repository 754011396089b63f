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
