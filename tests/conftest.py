import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _mnist_dir() -> Path | None:
    for cand in (os.environ.get("FFLAB_TEST_DATA"), REPO.parent / "shared" / "data" / "mnist"):
        if cand and (Path(cand) / "train-images-idx3-ubyte.gz").is_file():
            return Path(cand)
    return None


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    d = _mnist_dir()
    if d is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs MNIST: set FFLAB_TEST_DATA or provide ../shared/data/mnist")
        pytest.skip("MNIST files not available (set FFLAB_TEST_DATA)")
    return d


@pytest.fixture(scope="session")
def mnist(mnist_dir):
    from fflab.data import load_mnist

    return load_mnist(mnist_dir, allow_download=False)


@pytest.fixture
def one_thread():
    """Tiny matrices: one thread avoids OpenMP barrier stalls on a shared 2-core box."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def study_digits():
    """scikit-learn's digits in [0, 1] as a study's data: 1,400 training and 397 test images
    (a seeded permutation), float32, with their image shape."""
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = (d.data / 16.0).astype(np.float32), d.target
    idx = np.random.default_rng(0).permutation(len(y))
    tr, te = idx[:1400], idx[1400:]
    return {"x_train": x[tr], "y_train": y[tr], "x_test": x[te], "y_test": y[te],
            "image_shape": (8, 8)}  # fmt: skip
