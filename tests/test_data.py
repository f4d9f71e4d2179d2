"""The data layer: real MNIST, clear errors for bad files, verified atomic downloads."""

import gzip
import http.server
import shutil
import threading
from functools import partial

import pytest
import torch

from fflab import data
from fflab.data import MNIST, DataError


def test_real_mnist_content(mnist):
    assert mnist.train.x.shape == (60000, 784) and mnist.test.x.shape == (10000, 784)
    assert (
        mnist.train.x.dtype == torch.float32 and 0 <= mnist.train.x.min() < mnist.train.x.max() <= 1
    )
    assert mnist.train.y[:5].tolist() == [5, 0, 4, 1, 9]
    assert mnist.test.y[:5].tolist() == [7, 2, 1, 0, 4]
    assert torch.bincount(mnist.test.y).tolist() == [
        980,
        1135,
        1032,
        1010,
        982,
        892,
        958,
        1028,
        974,
        1009,
    ]
    assert mnist.train.x.mean().item() * 255 == pytest.approx(33.318, abs=1e-2)
    # the label overlay relies on MNIST's first 10 pixels being black
    assert mnist.train.x[:, :10].abs().max() == 0


def test_validation_split_is_last_10000(mnist_dir, mnist):
    ds = data.load_mnist(mnist_dir, validation=True, allow_download=False)
    assert len(ds.train) == 50000 and len(ds.validation) == 10000
    assert torch.equal(ds.validation.x, mnist.train.x[-10000:])


@pytest.fixture
def data_copy(tmp_path, mnist_dir):
    for f in MNIST.files:
        shutil.copy(mnist_dir / f.name, tmp_path / f.name)
    return tmp_path


def test_truncated_file_is_named(data_copy):
    p = data_copy / MNIST.test_labels.name
    raw = gzip.decompress(p.read_bytes())
    p.write_bytes(gzip.compress(raw[:-7]))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: 10001 bytes .*expected 10008"):
        data.load_mnist(data_copy, allow_download=False)


def test_corrupt_content_fails_checksum(data_copy):
    p = data_copy / MNIST.test_labels.name
    raw = bytearray(gzip.decompress(p.read_bytes()))
    raw[100] = (raw[100] + 1) % 10
    p.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match="checksum differs"):
        data.load_mnist(data_copy, allow_download=False)


def test_not_gzip_is_named(data_copy):
    (data_copy / MNIST.train_labels.name).write_bytes(b"<html>not found</html>")
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz: cannot decompress"):
        data.load_mnist(data_copy, allow_download=False)


def test_missing_file_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("FFLAB_DATA", raising=False)
    with pytest.raises(DataError, match="not found in .*--data-dir"):
        data.load_mnist(tmp_path, allow_download=False)


def test_fashion_mnist_if_installed():
    d = "/usr/share/datasets/fashion-mnist"
    try:
        ds = data.load("fashion-mnist", d, allow_download=False)
    except DataError as e:
        pytest.skip(f"Fashion-MNIST not installed ({e})")
    assert ds.train.x.shape == (60000, 784) and torch.bincount(ds.test.y).tolist() == [1000] * 10


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


@pytest.fixture
def mirror(tmp_path, mnist_dir):
    """Two local mirrors on loopback: one serving garbage, one the real files."""
    bad, good = tmp_path / "bad", tmp_path / "good"
    bad.mkdir()
    good.mkdir()
    for f in MNIST.files:
        shutil.copy(mnist_dir / f.name, good / f.name)
        (bad / f.name).write_bytes(b"garbage")
    servers = []
    for root in (bad, good):
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=root))
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
    yield [f"http://127.0.0.1:{s.server_address[1]}/" for s in servers]
    for s in servers:
        s.shutdown()
        s.server_close()


def test_download_verifies_md5_and_writes_atomically(tmp_path, mirror, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.delenv("FFLAB_DATA", raising=False)
    monkeypatch.setenv(data.MIRRORS_ENV, mirror[0])  # only the bad mirror, then public ones
    spec = data.DatasetSpec("mnist", (), *MNIST.files)
    with pytest.raises(DataError, match="no mirror served it.*MD5"):
        data.download(spec, MNIST.test_labels, cache / "mnist")
    assert list((cache / "mnist").iterdir()) == []  # no partial file left behind
    monkeypatch.setenv(data.MIRRORS_ENV, ",".join(mirror))
    path = data.download(spec, MNIST.test_labels, cache / "mnist")
    assert path.read_bytes() == (tmp_path / "good" / MNIST.test_labels.name).read_bytes()
    assert sorted(p.name for p in (cache / "mnist").iterdir()) == [MNIST.test_labels.name]


def test_load_downloads_into_cache(tmp_path, mirror, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("FFLAB_DATA", raising=False)
    monkeypatch.setenv(data.MIRRORS_ENV, mirror[1])
    ds = data.load("mnist")
    assert len(ds.train) == 60000
    assert (tmp_path / "cache" / "fflab" / "mnist" / MNIST.train_images.name).is_file()


def test_binarize():
    x = torch.tensor([[0.0, 0.2, 0.6, 1.0]])
    assert data.binarize(x, "threshold").tolist() == [[0, 0, 1, 1]]
    g = torch.Generator().manual_seed(0)
    xs = torch.full((20000, 1), 0.3)
    b = data.binarize(xs, "sample", g)
    assert set(b.unique().tolist()) <= {0.0, 1.0}
    assert abs(b.mean().item() - 0.3) < 5 * (0.3 * 0.7 / 20000) ** 0.5


def test_digits_dataset_needs_no_download_and_is_split_once():
    from sklearn.datasets import load_digits as sk

    from fflab import data

    ds = data.load("digits")
    assert ds.train.x.shape == (1437, 64) and ds.test.x.shape == (360, 64)
    assert ds.image_shape == (8, 8) and ds.num_classes == 10
    assert float(ds.train.x.min()) == 0.0 and float(ds.train.x.max()) == 1.0
    # every image exactly once across the two splits, the same split on every call
    raw = torch.from_numpy(sk().data / 16.0).float()
    both = torch.cat([ds.train.x, ds.test.x])
    assert torch.equal(both.sum(0), raw.sum(0))
    assert torch.equal(data.load("digits").test.x, ds.test.x)
    val = data.load("digits", validation=True)
    assert len(val.train) == 1150 and torch.equal(val.validation.x, ds.train.x[-287:])
