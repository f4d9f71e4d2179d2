"""Datasets: MNIST and Fashion-MNIST from the original IDX ``.gz`` files.

Where files are looked for, in order: an explicit ``data_dir`` (the CLI's ``--data-dir``),
the ``FFLAB_DATA`` environment variable, the per-user cache (``$XDG_CACHE_HOME/fflab/<name>``,
default ``~/.cache/fflab/<name>``). A file found nowhere is downloaded into the cache from the
canonical mirrors, checked against its MD5, and renamed into place only when complete.

Every file's *uncompressed* content is checked (IDX header, sizes, SHA-256), so a recompressed
copy (Debian's Fashion-MNIST package) is accepted and a truncated or wrong one is rejected
with a message that names the file, what was expected, and how to fix it.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor


class DataError(RuntimeError):
    """A data file is missing, corrupt, or could not be fetched."""


@dataclass(frozen=True)
class IdxFile:
    name: str  # file name, e.g. train-images-idx3-ubyte.gz
    gz_md5: str  # MD5 of the canonical .gz (checked on download)
    sha256: str  # SHA-256 of the uncompressed content (checked on every load)
    shape: tuple[int, ...]


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    mirrors: tuple[str, ...]
    train_images: IdxFile
    train_labels: IdxFile
    test_images: IdxFile
    test_labels: IdxFile

    @property
    def files(self) -> tuple[IdxFile, ...]:
        return (self.train_images, self.train_labels, self.test_images, self.test_labels)


MNIST = DatasetSpec(
    name="mnist",
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    train_images=IdxFile(
        "train-images-idx3-ubyte.gz",
        "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        (60000, 28, 28),
    ),
    train_labels=IdxFile(
        "train-labels-idx1-ubyte.gz",
        "d53e105ee54ea40749a09fcbcd1e9432",
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        (60000,),
    ),
    test_images=IdxFile(
        "t10k-images-idx3-ubyte.gz",
        "9fb629c4189551a2d022fa330f9573f3",
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        (10000, 28, 28),
    ),
    test_labels=IdxFile(
        "t10k-labels-idx1-ubyte.gz",
        "ec29112dd5afa0611ce80d1b7f02629c",
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        (10000,),
    ),
)

# Fashion-MNIST content SHA-256s were measured on Debian's dataset-fashion-mnist package
# (recompressed .gz, same IDX content); the .gz MD5s are those of the original release.
FASHION_MNIST = DatasetSpec(
    name="fashion-mnist",
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    train_images=IdxFile(
        "train-images-idx3-ubyte.gz",
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        (60000, 28, 28),
    ),
    train_labels=IdxFile(
        "train-labels-idx1-ubyte.gz",
        "25c81989df183df01b3e8a0aad5dffbe",
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        (60000,),
    ),
    test_images=IdxFile(
        "t10k-images-idx3-ubyte.gz",
        "bef4ecab320f06d8554ea6380940ec79",
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        (10000, 28, 28),
    ),
    test_labels=IdxFile(
        "t10k-labels-idx1-ubyte.gz",
        "bb300cfdad3c16e7a12a480ee83cd310",
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        (10000,),
    ),
)

DATASETS = {"mnist": MNIST, "fashion-mnist": FASHION_MNIST}
MIRRORS_ENV = "FFLAB_MIRRORS"  # comma-separated base URLs tried before the built-in mirrors


def cache_dir(name: str) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "fflab" / name


def search_dirs(name: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Directories searched for a dataset's files, in order."""
    dirs = []
    if data_dir is not None:
        dirs.append(Path(data_dir))
    if os.environ.get("FFLAB_DATA"):
        dirs.append(Path(os.environ["FFLAB_DATA"]))
    dirs.append(cache_dir(name))
    return dirs


def parse_idx(raw: bytes, f: IdxFile, path: Path) -> np.ndarray:
    """Check and decode uncompressed IDX bytes into a uint8 array of shape ``f.shape``."""
    ndim = len(f.shape)
    fix = f"delete it and run again to re-download, or point --data-dir at a good copy ({path})"
    if len(raw) < 4 + 4 * ndim or raw[:2] != b"\0\0" or raw[2] != 0x08 or raw[3] != ndim:
        raise DataError(f"{path.name}: not an IDX file of {ndim}-d uint8 data; {fix}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if dims != f.shape:
        raise DataError(f"{path.name}: header says shape {dims}, expected {f.shape}; {fix}")
    expected = 4 + 4 * ndim + int(np.prod(f.shape))
    if len(raw) != expected:
        raise DataError(
            f"{path.name}: {len(raw)} bytes uncompressed, expected {expected} (truncated?); {fix}"
        )
    if f.sha256 and hashlib.sha256(raw).hexdigest() != f.sha256:
        raise DataError(f"{path.name}: content checksum differs from the canonical file; {fix}")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(f.shape)


def read_idx(path: Path, f: IdxFile) -> np.ndarray:
    st = path.stat()
    return _read_idx_cached(path.resolve(), st.st_size, st.st_mtime_ns, f)


@functools.lru_cache(maxsize=8)
def _read_idx_cached(path: Path, size: int, mtime_ns: int, f: IdxFile) -> np.ndarray:
    """Decode and check a file once per process (keyed by path, size and mtime)."""
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as e:
        raise DataError(
            f"{path.name}: cannot decompress ({e}); delete {path} and run again to re-download"
        ) from None
    return parse_idx(raw, f, path)


def download(spec: DatasetSpec, f: IdxFile, dest_dir: Path, timeout: float = 60.0) -> Path:
    """Fetch ``f`` from the first mirror that serves it with the right MD5; atomic rename."""
    mirrors = [m for m in os.environ.get(MIRRORS_ENV, "").split(",") if m] + list(spec.mirrors)
    dest_dir.mkdir(parents=True, exist_ok=True)
    errors = []
    for base in mirrors:
        url = base.rstrip("/") + "/" + f.name
        fd, tmp = tempfile.mkstemp(prefix=f".{f.name}.", suffix=".part", dir=dest_dir)
        try:
            md5 = hashlib.md5()
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as r:
                while chunk := r.read(1 << 20):
                    md5.update(chunk)
                    out.write(chunk)
            if md5.hexdigest() != f.gz_md5:
                errors.append(f"{url}: MD5 {md5.hexdigest()} != {f.gz_md5}")
                continue
            final = dest_dir / f.name
            os.replace(tmp, final)
            return final
        except OSError as e:
            errors.append(f"{url}: {e}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise DataError(
        f"{f.name}: not found locally and no mirror served it ({'; '.join(errors)}); "
        f"put the file in {dest_dir} or pass --data-dir"
    )


def locate(
    spec: DatasetSpec, f: IdxFile, data_dir: str | os.PathLike | None, allow_download: bool
) -> Path:
    dirs = search_dirs(spec.name, data_dir)
    for d in dirs:
        if (d / f.name).is_file():
            return d / f.name
    if data_dir is not None and not Path(data_dir).is_dir():
        raise DataError(f"data directory {data_dir} does not exist")
    if not allow_download:
        raise DataError(
            f"{f.name}: not found in {', '.join(map(str, dirs))}; pass --data-dir DIR "
            "holding the four IDX .gz files"
        )
    return download(spec, f, cache_dir(spec.name))


@dataclass(frozen=True)
class Split:
    """Images as float32 in [0, 1], flattened (N, D), and int64 labels (N,)."""

    x: Tensor
    y: Tensor

    def to(self, device: torch.device | str) -> Split:
        return Split(self.x.to(device), self.y.to(device))

    def __len__(self) -> int:
        return self.x.shape[0]


@dataclass(frozen=True)
class Datasets:
    train: Split
    test: Split
    validation: Split | None
    image_shape: tuple[int, ...]  # (H, W) or (C, H, W) of the flattened features; () if none
    num_classes: int

    def to(self, device: torch.device | str) -> Datasets:
        val = self.validation.to(device) if self.validation is not None else None
        return Datasets(
            self.train.to(device), self.test.to(device), val, self.image_shape, self.num_classes
        )


def load(
    name: str = "mnist",
    data_dir: str | os.PathLike | None = None,
    *,
    validation: bool = False,
    allow_download: bool = True,
) -> Datasets:
    """Load a dataset. With ``validation``, the last 10,000 training images are held out
    (for ``digits``, the last 287).

    ``digits`` is scikit-learn's 8 x 8 digits (1,797 images, shipped with scikit-learn, no
    download): pixels scaled to [0, 1], split once by a fixed permutation (seed 0) into 1,437
    training and 360 test images.
    """
    if name == DIGITS:
        return load_digits(validation)
    if name not in DATASETS:
        known = ", ".join([*DATASETS, DIGITS])
        raise DataError(f"unknown dataset {name!r}; choose one of {known}")
    spec = DATASETS[name]
    arrays = [read_idx(locate(spec, f, data_dir, allow_download), f) for f in spec.files]
    xtr, ytr, xte, yte = arrays

    def split(x: np.ndarray, y: np.ndarray) -> Split:
        xt = torch.from_numpy(x.reshape(x.shape[0], -1).astype(np.float32) / 255.0)
        return Split(xt, torch.from_numpy(y.astype(np.int64)))

    train = split(xtr, ytr)
    val = None
    if validation:
        val = Split(train.x[-10000:], train.y[-10000:])
        train = Split(train.x[:-10000], train.y[:-10000])
    return Datasets(train, split(xte, yte), val, (28, 28), 10)


ARRAYS = "arrays"  # DataConfig.dataset of a run on data handed over in memory
DIGITS = "digits"  # scikit-learn's 8 x 8 digits: no download


def load_digits(validation: bool = False) -> Datasets:
    """scikit-learn's digits as :class:`Datasets` (see :func:`load`)."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError:
        raise DataError(
            "the digits dataset comes with scikit-learn: pip install scikit-learn"
        ) from None
    d = sk_digits()
    x = torch.from_numpy((d.data / 16.0).astype(np.float32))
    y = torch.from_numpy(d.target.astype(np.int64))
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(y)))
    x, y = x[order], y[order]
    train, test = Split(x[:1437], y[:1437]), Split(x[1437:], y[1437:])
    val = None
    if validation:
        val = Split(train.x[-287:], train.y[-287:])
        train = Split(train.x[:-287], train.y[:-287])
    return Datasets(train, test, val, (8, 8), 10)


def _as_images(x: Any, name: str) -> Tensor:
    """Features of N samples as float32 (N, D): a numpy array or tensor of any shape (N, ...)."""
    if isinstance(x, Tensor):
        t = x.detach().cpu()
    else:
        try:
            t = torch.from_numpy(np.asarray(x))
        except TypeError as e:  # object arrays, strings
            raise ValueError(f"{name} must be numeric, got {type(x).__name__}") from e
    if t.is_complex():
        raise ValueError(f"{name} must be real numbers, got {t.dtype}")
    if t.dim() < 2 or t.shape[0] < 1:
        raise ValueError(f"{name} must be (samples, features...), got shape {tuple(t.shape)}")
    t = t.reshape(t.shape[0], -1).to(torch.float32)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} holds NaN or infinite values")
    return t.contiguous()


def _as_labels(y: Any, n: int, name: str) -> Tensor:
    """Integer class labels (N,) as int64; integral floats are accepted."""
    t = y.detach().cpu() if isinstance(y, Tensor) else torch.from_numpy(np.asarray(y))
    t = t.reshape(-1)
    if t.shape[0] != n:
        raise ValueError(f"{name} has {t.shape[0]} labels for {n} samples")
    if t.is_floating_point() and not bool((t == t.round()).all()):
        raise ValueError(f"{name} must be integer class labels 0..C-1")
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name} must be integer class labels 0..C-1, got {t.dtype}")
    t = t.to(torch.int64)
    if n and int(t.min()) < 0:
        raise ValueError(f"{name} must be integer class labels 0..C-1, found {int(t.min())}")
    return t


def from_arrays(
    x_train: Any,
    y_train: Any,
    x_test: Any,
    y_test: Any,
    *,
    x_val: Any = None,
    y_val: Any = None,
    image_shape: tuple[int, ...] = (),
    num_classes: int | None = None,
) -> Datasets:
    """Datasets from in-memory data: numpy arrays or tensors, any number of features and classes.

    ``x_*`` (N, ...) are flattened to float32 (N, D) as they are (fflab does not rescale
    them); ``y_*`` (N,) are class labels 0..C-1. ``num_classes`` defaults to the largest label
    plus one; ``image_shape`` ((H, W) or (C, H, W), optional) says how the D features form an
    image, which hybrid negatives and local layers need.
    """
    splits = {}
    for name, x, y in (
        ("train", x_train, y_train),
        ("test", x_test, y_test),
        ("val", x_val, y_val),
    ):
        if x is None and y is None:
            continue
        if x is None or y is None:
            raise ValueError(f"x_{name} and y_{name} go together")
        xt = _as_images(x, f"x_{name}")
        splits[name] = Split(xt, _as_labels(y, xt.shape[0], f"y_{name}"))
    if "train" not in splits or "test" not in splits:
        raise ValueError("x_train, y_train, x_test and y_test are required")
    widths = {s.x.shape[1] for s in splits.values()}
    if len(widths) != 1:
        raise ValueError(f"the splits have different numbers of features: {sorted(widths)}")
    largest = max(int(s.y.max()) for s in splits.values())
    c = largest + 1 if num_classes is None else int(num_classes)
    if c < 2 or largest >= c:
        raise ValueError(f"need at least 2 classes and labels below num_classes={c}")
    shape = tuple(int(v) for v in image_shape)
    if shape and math.prod(shape) != widths.pop():
        raise ValueError(f"image_shape {shape} does not hold {splits['train'].x.shape[1]} features")
    return Datasets(splits["train"], splits["test"], splits.get("val"), shape, c)


def fingerprint(ds: Datasets) -> str:
    """SHA-256 of every split's features and labels (a run checks it on resume)."""
    h = hashlib.sha256()
    for s in (ds.train, ds.test, ds.validation):
        if s is None:
            h.update(b"none")
            continue
        for t in (s.x, s.y):
            t = t.detach().cpu().contiguous()
            h.update(str((tuple(t.shape), str(t.dtype))).encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()


def load_mnist(data_dir: str | os.PathLike | None = None, **kw) -> Datasets:
    return load("mnist", data_dir, **kw)


def binarize(x: Tensor, method: str, generator: torch.Generator | None = None) -> Tensor:
    """Binary images for Boltzmann machines: ``sample`` (Bernoulli, once) or ``threshold``."""
    if method == "threshold":
        return (x > 0.5).to(x.dtype)
    if method == "sample":
        if generator is None:
            raise ValueError("binarize='sample' needs a generator")
        u = torch.rand(x.shape, generator=generator, device=generator.device).to(x.device)
        return (u < x).to(x.dtype)
    raise ValueError(f"binarize must be sample or threshold, got {method!r}")
