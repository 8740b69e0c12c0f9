"""nps convert: round trips against independent readers (torchvision), malformed input, overwrite and verify."""
from __future__ import annotations

import gzip
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from nps.datasets.betonfile import read_raw_array, read_raw_images
from nps.datasets.convert import convert_dataset, verify_dataset
from nps.datasets.errors import DatasetError
from nps.pipeline.cli import main

FMNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte"]
needs_fmnist = pytest.mark.fmnist  # conftest: skipped without the Debian files, failed under CI


def cli(capsys, *args):
    code = main(["convert", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def leftovers(out_dir: Path):
    """Every file a failed conversion must not leave behind."""
    if not out_dir.exists():
        return []
    return sorted(p.name for p in out_dir.iterdir() if p.suffix in (".beton", ".tmp", ".json") or p.name.startswith("."))


def stored(out_dir: Path, split: str):
    return read_raw_array(out_dir / f"{split}.beton")


# ------------------------------------------------------------------------------------------------- Fashion-MNIST

@pytest.fixture(scope="module")
def torchvision_fmnist_root(tmp_path_factory, fmnist_source):
    """torchvision wants ROOT/FashionMNIST/raw/<uncompressed files>: gunzip Debian's copies there."""
    root = tmp_path_factory.mktemp("tv")
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in FMNIST_FILES:
        (raw / name).write_bytes(gzip.decompress((fmnist_source / f"{name}.gz").read_bytes()))
    return root


@needs_fmnist
@pytest.mark.parametrize("limit", [pytest.param(None, marks=pytest.mark.slow, id="all-70000"),
                                   pytest.param(4000, id="first-4000")])
def test_fashion_mnist_raw_round_trip_matches_torchvision(tmp_path, torchvision_fmnist_root, capsys, limit):
    from torchvision.datasets import FashionMNIST

    out = tmp_path / "fmnist"
    code, stdout, _ = cli(capsys, "fashion-mnist", "--out", out, "--workers", 2, *(["--limit", limit] if limit else []))
    assert code == 0
    counts = {"train": limit or 60000, "val": limit or 10000}
    assert f"convert train: {counts['train']}/{counts['train']}" in stdout  # plain line log: stdout is no tty
    assert "wrote" in stdout
    meta = json.loads((out / "meta.json").read_text())
    assert meta["counts"] == counts
    if limit is None:
        assert meta["label_histogram"]["train"] == [6000] * 10 and meta["label_histogram"]["val"] == [1000] * 10
    assert meta["image_shape"] == [28, 28] and meta["grayscale_replicated"] and meta["write_mode"] == "raw"
    assert meta["classes"][0] == "T-shirt/top" and len(meta["fingerprint"]) == 64
    for split, train in (("train", True), ("val", False)):
        reference = FashionMNIST(str(torchvision_fmnist_root), train=train, download=False)
        images, labels = stored(out, split)
        assert images.shape == (counts[split], 28, 28, 3)
        for c in range(3):  # grayscale stored as three equal channels
            assert np.array_equal(images[..., c], reference.data.numpy()[:counts[split]])
        assert np.array_equal(labels, reference.targets.numpy()[:counts[split]])
        histogram = np.bincount(reference.targets.numpy()[:counts[split]], minlength=10).tolist()
        assert meta["label_histogram"][split] == histogram
    assert leftovers(out) == ["meta.json", "train.beton", "val.beton"]


@needs_fmnist
def test_fingerprint_is_reproducible_and_ignores_compression_and_workers(tmp_path, torchvision_fmnist_root):
    raw_src = torchvision_fmnist_root / "FashionMNIST" / "raw"  # the same files, uncompressed
    a = convert_dataset("fashion-mnist", tmp_path / "a", limit=300, workers=1)
    b = convert_dataset("idx", tmp_path / "b", src=raw_src, limit=300, workers=2)
    assert a["fingerprint"] == b["fingerprint"]
    assert b["classes"] == [str(i) for i in range(10)]
    assert verify_dataset(tmp_path / "b")["ok"]


# ------------------------------------------------------------------------------------------------- CIFAR pickles

def write_cifar(folder: Path, kind: str = "cifar10", rows=(3, 5, 0, 2, 4), test_rows: int = 6, seed: int = 0):
    """CIFAR-format pickles with the given numbers of rows per batch; returns (train x, train y, val x, val y)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    classes, label_key = (10, "labels") if kind == "cifar10" else (100, "fine_labels")
    names = ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]) if kind == "cifar10" else (["train"], ["test"])
    if kind != "cifar10":
        rows = (sum(rows),)
    out = []
    for files, counts in ((names[0], rows), (names[1], (test_rows,))):
        xs, ys = [], []
        for name, n in zip(files, counts):
            x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            y = rng.integers(0, classes, n).tolist()
            with open(folder / name, "wb") as handle:
                pickle.dump({"batch_label": name, "data": x, label_key: y}, handle, protocol=2)
            xs.append(x)
            ys.extend(y)
        out += [np.concatenate(xs).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.array(ys)]
    meta_name, key = ("batches.meta", "label_names") if kind == "cifar10" else ("meta", "fine_label_names")
    with open(folder / meta_name, "wb") as handle:
        pickle.dump({key: [f"class{i}" for i in range(classes)]}, handle, protocol=2)
    return out


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_round_trip_matches_torchvision(tmp_path, kind):
    import torchvision.datasets as tvd

    base = tvd.CIFAR10 if kind == "cifar10" else tvd.CIFAR100

    class LocalCIFAR(base):  # the real class checks the md5 sums of the official files
        train_list = [[name, None] for name, _ in base.train_list]
        test_list = [[name, None] for name, _ in base.test_list]
        meta = {**base.meta, "md5": None}

    folder_name = base.base_folder
    write_cifar(tmp_path / "src" / folder_name, kind)
    meta = convert_dataset(kind, tmp_path / "out", src=tmp_path / "src", workers=2)  # finds the sub-folder
    assert meta["counts"] == {"train": 14, "val": 6} and meta["classes"][3] == "class3"
    assert meta["image_shape"] == [32, 32] and not meta["grayscale_replicated"]
    for split, train in (("train", True), ("val", False)):
        reference = LocalCIFAR(str(tmp_path / "src"), train=train)
        images, labels = stored(tmp_path / "out", split)
        assert np.array_equal(images, reference.data)
        assert np.array_equal(labels, np.array(reference.targets))


# ------------------------------------------------------------------------------------------------- ImageFolder

def write_image_tree(root: Path, sizes=((20, 30), (17, 11), (40, 40)), per_class=3, seed=0, ext=".png"):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c, name in enumerate(["b_dog", "a_cat", "c_fox"]):
            folder = root / split / name
            (folder / "nested").mkdir(parents=True)
            (folder / "notes.txt").write_text("not an image")
            for i in range(per_class):
                h, w = sizes[(c + i) % len(sizes)]
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                image = Image.fromarray(pixels) if i != 1 else Image.fromarray(pixels[..., 0], mode="L")
                target = folder / ("nested" if i == 2 else "") / f"img{i}{ext.upper() if i == 0 else ext}"
                image.save(target)


def test_imagefolder_round_trip_matches_torchvision(tmp_path):
    from torchvision.datasets import ImageFolder

    write_image_tree(tmp_path / "tree")
    meta = convert_dataset("imagefolder", tmp_path / "out", src=tmp_path / "tree", workers=2)
    assert meta["classes"] == ["a_cat", "b_dog", "c_fox"]  # sorted by name
    assert meta["image_shape"] is None and meta["max_size"] == [40, 40]
    for split in ("train", "val"):
        reference = ImageFolder(str(tmp_path / "tree" / split))
        images, labels = read_raw_images(tmp_path / "out" / f"{split}.beton")
        assert len(images) == len(reference) == 9
        for (image, target), mine, label in zip(reference, images, labels):
            assert np.array_equal(np.asarray(image), mine)
            assert target == label


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {"x_train": rng.integers(0, 256, (7, 9, 10), dtype=np.uint8), "y_train": np.arange(7) % 4,
              "x_test": rng.integers(0, 256, (3, 9, 10), dtype=np.uint8), "y_test": np.array([3, 0, 1])}
    np.savez(tmp_path / "d.npz", **arrays)
    meta = convert_dataset("npz", tmp_path / "out", src=tmp_path / "d.npz", workers=1)
    assert meta["num_classes"] == 4 and meta["image_shape"] == [9, 10]
    images, labels = stored(tmp_path / "out", "val")
    assert np.array_equal(images[..., 1], arrays["x_test"]) and np.array_equal(labels, arrays["y_test"])


# ------------------------------------------------------------------------------------------------- bad input

def _idx(path: Path, array: np.ndarray, *, magic: bytes = None, gz: bool = True, cut: int = 0):
    header = magic or bytes([0, 0, 8, array.ndim])
    data = header + np.asarray(array.shape, dtype=">u4").tobytes() + array.astype(np.uint8).tobytes()
    data = data[:len(data) - cut]
    path = path.with_name(path.name + ".gz") if gz else path
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def _idx_tree(folder: Path, *, n=20, val_labels=None, **bad):
    """Four small IDX files; ``bad`` maps a role to keyword arguments of _idx for that file."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n, 28, 28)),
              "train-labels-idx1-ubyte": np.arange(n) % 10,
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n, 28, 28)),
              "t10k-labels-idx1-ubyte": np.arange(n) % 10 if val_labels is None else val_labels}
    for name, array in arrays.items():
        if bad.get(name) != "missing":
            _idx(folder / name, array, **bad.get(name, {}))
    return folder


def _cifar_bad(folder: Path, *, batch: str = "data_batch_2", content=None, **entries):
    write_cifar(folder)
    if content is not None:
        (folder / batch).write_bytes(content)
    elif entries:
        with open(folder / batch, "rb") as handle:
            data = pickle.load(handle)
        data.update(entries)
        with open(folder / batch, "wb") as handle:
            pickle.dump(data, handle)
    return folder


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


BAD_SOURCES = {
    "idx missing file": ("idx", lambda d: _idx_tree(d, **{"t10k-images-idx3-ubyte": "missing"}),
                         "missing t10k-images-idx3-ubyte"),
    "idx wrong magic": ("idx", lambda d: _idx_tree(d, **{"train-images-idx3-ubyte": {"magic": b"\x08\x00\x00\x03"}}),
                        "train-images-idx3-ubyte.gz: wrong IDX magic"),
    "idx wrong dimensions": ("idx", lambda d: _idx_tree(d, **{"train-labels-idx1-ubyte": {"magic": b"\0\0\x08\x03"}}),
                             "train-labels-idx1-ubyte.gz: IDX file has 3 dimensions, expected 1"),
    "idx truncated pixels": ("idx", lambda d: _idx_tree(d, **{"t10k-images-idx3-ubyte": {"cut": 100, "gz": False}}),
                             "t10k-images-idx3-ubyte: truncated"),
    "idx truncated gzip": ("idx", lambda d: _truncate_gzip(_idx_tree(d) / "train-labels-idx1-ubyte.gz"),
                           "train-labels-idx1-ubyte.gz: truncated or corrupt gzip"),
    "idx count mismatch": ("idx", lambda d: _idx_tree(d, val_labels=np.arange(19) % 10),
                           "t10k-labels-idx1-ubyte.gz: count mismatch: 19 labels for 20 images"),
    "fashion-mnist label out of range": ("fashion-mnist", lambda d: _idx_tree(d, val_labels=np.arange(20) % 11),
                                         "label 10 at index 10 is outside the class range 0..9"),
    "cifar missing batch": ("cifar10", lambda d: (_cifar_bad(d), (d / "data_batch_4").unlink()),
                            "data_batch_4: missing cifar10 batch"),
    "cifar bad pickle": ("cifar10", lambda d: _cifar_bad(d, content=b"\x80\x02garbage"), "data_batch_2: bad pickle"),
    "cifar hostile pickle": ("cifar10", lambda d: _cifar_bad(d, content=pickle.dumps({"data": _Evil()})),
                             "refusing to load global"),
    "cifar count mismatch": ("cifar10", lambda d: _cifar_bad(d, labels=[1, 2]),
                             "data_batch_2: count mismatch: 2 labels for 5 images"),
    "cifar wrong row size": ("cifar10", lambda d: _cifar_bad(d, data=np.zeros((5, 100), np.uint8)),
                             "data_batch_2: 'data' must be an N x 3072 uint8 array"),
    "cifar label out of range": ("cifar10", lambda d: _cifar_bad(d, labels=[0, 1, 2, 10, 3]),
                                 "data_batch_2: label 10 is outside the class range 0..9"),
    "imagefolder unreadable train image": ("imagefolder", lambda d: _bad_image(d, "train"), "bad.jpg: unreadable image"),
    "imagefolder unreadable val image": ("imagefolder", lambda d: _bad_image(d, "val"), "bad.jpg: unreadable image"),
    "imagefolder truncated image": ("imagefolder", lambda d: _truncated_image(d), "cut.png: unreadable image"),
    "imagefolder class not in train": ("imagefolder", lambda d: _extra_val_class(d),
                                       "class 'zebra' is not a class of train/"),
    "imagefolder missing val": ("imagefolder", lambda d: (write_image_tree(d), shutil.rmtree(d / "val")),
                                "val: missing split directory"),
    "npz missing array": ("npz", lambda d: _npz(d, drop="y_test"), "missing array(s) y_test"),
    "npz float images": ("npz", lambda d: _npz(d, x_train=np.zeros((4, 5, 5), np.float32)), "x_train must be"),
    "npz count mismatch": ("npz", lambda d: _npz(d, y_train=np.zeros(3, np.int64)),
                           "count mismatch: 3 labels in y_train for 4 images in x_train"),
    "npz negative label": ("npz", lambda d: _npz(d, y_test=np.array([0, -1])), "label -1 at index 1 is outside"),
    "npz not an archive": ("npz", lambda d: (d.mkdir(), (d / "d.npz").write_bytes(b"PK\x03\x04junk")),
                           "d.npz: not a readable .npz archive"),
}


def _truncate_gzip(path: Path):
    path.write_bytes(path.read_bytes()[:-20])


def _bad_image(root: Path, split: str):
    write_image_tree(root)
    (root / split / "b_dog" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")


def _truncated_image(root: Path):
    write_image_tree(root, sizes=((64, 64),))
    good = root / "train" / "a_cat" / "img0.PNG"
    (root / "train" / "a_cat" / "cut.png").write_bytes(good.read_bytes()[:300])


def _extra_val_class(root: Path):
    write_image_tree(root)
    shutil.copytree(root / "val" / "a_cat", root / "val" / "zebra")


def _npz(folder: Path, drop=None, **override):
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"x_train": np.zeros((4, 5, 5), np.uint8), "y_train": np.arange(4), "x_test": np.zeros((2, 5, 5), np.uint8),
              "y_test": np.array([0, 1]), **override}
    arrays.pop(drop, None)
    np.savez(folder / "d.npz", **arrays)


@pytest.mark.parametrize("case", sorted(BAD_SOURCES))
def test_malformed_source_stops_with_one_line_error_and_no_output(tmp_path, capsys, case):
    kind, build, expected = BAD_SOURCES[case]
    build(tmp_path / "src")
    src = tmp_path / "src" / "d.npz" if kind == "npz" else tmp_path / "src"
    out = tmp_path / "out"
    code, stdout, stderr = cli(capsys, kind, "--src", src, "--out", out, "--workers", 2)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nps convert: error: ")
    assert expected in lines[0], lines[0]
    assert "Traceback" not in stderr
    assert leftovers(out) == []


def test_refuses_to_overwrite_without_force(tmp_path, capsys):
    write_cifar(tmp_path / "src")
    assert cli(capsys, "cifar10", "--src", tmp_path / "src", "--out", tmp_path / "out")[0] == 0
    before = (tmp_path / "out" / "meta.json").read_text()
    code, _, stderr = cli(capsys, "cifar10", "--src", tmp_path / "src", "--out", tmp_path / "out")
    assert code == 2 and "train.beton: already exists (use --force to overwrite)" in stderr
    assert (tmp_path / "out" / "meta.json").read_text() == before
    write_cifar(tmp_path / "src", seed=5)  # different content: the forced conversion must replace everything
    code, _, _ = cli(capsys, "cifar10", "--src", tmp_path / "src", "--out", tmp_path / "out", "--force")
    assert code == 0
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["fingerprint"] != json.loads(before)["fingerprint"]
    assert leftovers(tmp_path / "out") == ["meta.json", "train.beton", "val.beton"]


def test_failed_forced_conversion_keeps_the_old_files(tmp_path, capsys):
    write_image_tree(tmp_path / "tree")
    convert_dataset("imagefolder", tmp_path / "out", src=tmp_path / "tree", workers=1)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    (tmp_path / "tree" / "val" / "c_fox" / "zz.png").write_bytes(b"broken")
    code, _, stderr = cli(capsys, "imagefolder", "--src", tmp_path / "tree", "--out", tmp_path / "out", "--force")
    assert code == 2 and "zz.png: unreadable image" in stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_limit_write_modes_and_options(tmp_path):
    write_image_tree(tmp_path / "tree", sizes=((128, 96),), per_class=2)
    meta = convert_dataset("imagefolder", tmp_path / "j", src=tmp_path / "tree", write_mode="jpg", jpeg_quality=80,
                           max_resolution=64, limit=4, workers=1)
    assert meta["counts"] == {"train": 4, "val": 4} and meta["stored_modes"]["train"] == {"raw": 0, "jpg": 4}
    assert meta["max_size"] == [64, 48] and meta["jpeg_quality"] == 80 and meta["limit"] == 4
    smart = convert_dataset("imagefolder", tmp_path / "s", src=tmp_path / "tree", write_mode="smart", workers=1)
    assert smart["stored_modes"]["train"] == {"raw": 0, "jpg": 6}  # 128x96x3 > 32 KiB -> JPEG
    with pytest.raises(DatasetError, match="--write-mode png"):
        convert_dataset("imagefolder", tmp_path / "x", src=tmp_path / "tree", write_mode="png")
    with pytest.raises(DatasetError, match="--limit 0"):
        convert_dataset("imagefolder", tmp_path / "x", src=tmp_path / "tree", limit=0)


def test_verify_detects_changed_files(tmp_path, capsys):
    write_cifar(tmp_path / "src")
    convert_dataset("cifar10", tmp_path / "out", src=tmp_path / "src", workers=1)
    code, stdout, _ = cli(capsys, "--verify", tmp_path / "out")
    assert code == 0 and "ok (train 14, val 6 images" in stdout

    beton = tmp_path / "out" / "val.beton"
    images, _ = read_raw_images(beton)
    data = bytearray(beton.read_bytes())
    position = bytes(data).find(images[2].tobytes())  # one pixel of a stored image
    data[position] ^= 0xFF
    beton.write_bytes(bytes(data))
    code, _, stderr = cli(capsys, "--verify", tmp_path / "out")
    assert code == 2 and "fingerprint" in stderr and "differs from meta.json" in stderr

    meta_path = tmp_path / "out" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["counts"]["train"] = 15
    meta_path.write_text(json.dumps(meta))
    code, _, stderr = cli(capsys, "--verify", tmp_path / "out")
    assert code == 2 and "train.beton: holds 14 images, meta.json says 15" in stderr

    (tmp_path / "out" / "train.beton").write_bytes(b"\0" * 10)
    code, _, stderr = cli(capsys, "--verify", tmp_path / "out")
    assert code == 2 and "train.beton: not a readable .beton" in stderr
    code, _, stderr = cli(capsys, "--verify", tmp_path / "nothing")
    assert code == 2 and "meta.json: missing" in stderr


def test_cli_usage_errors(tmp_path, capsys):
    assert cli(capsys, "--out", tmp_path)[2].strip().endswith("KIND is required (or --verify DIR)")
    assert "--out DIR is required" in cli(capsys, "cifar10", "--src", tmp_path)[2]
    assert "--src is required" in cli(capsys, "cifar10", "--out", tmp_path / "o")[2]
