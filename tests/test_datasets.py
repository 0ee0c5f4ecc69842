"""The built-in datasets on files in their real layouts: MNIST / Fashion-MNIST idx files (torchvision's
layout and Debian's flat one), SVHN .mat files through torchvision's SVHN class, image folders of PNGs,
and the decoded-tensor cache. Real Fashion-MNIST (Debian's dataset-fashion-mnist) where installed."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONF, run_train
from fake_datasets import write_fake_mnist, write_fake_svhn, write_image_folder
from omegaconf import OmegaConf
from PIL import Image
from test_record_truth import tmpfs

import normbench.datasets.idx as nb_mnist
from normbench.data import load_data
from normbench.datasets import fashion_mnist, mnist, svhn
from normbench.datasets.cache import CACHE_DIR_NAME
from normbench.errors import ConfigError, DataNotFoundError

DEBIAN = Path(nb_mnist.DEBIAN_FASHION_MNIST)
needs_fashion_mnist = pytest.mark.skipif(
    not (DEBIAN / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST is not installed in {DEBIAN} (apt-get install dataset-fashion-mnist; "
           "scripts/install.sh --dev installs it)")


def data_cfg(name: str, **over):
    cfg = OmegaConf.load(CONF / "data" / f"{name}.yaml")
    cfg.merge_with(over)
    return cfg


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    """The user cache dir inside the test's temp dir."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    return tmp_path / "xdg-cache" / "normbench"


@pytest.fixture(scope="module")
def real_fashion_mnist():
    if not (DEBIAN / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST is not installed in {DEBIAN} (apt-get install dataset-fashion-mnist)")
    return fashion_mnist(root=str(DEBIAN), download=False)


# ------------------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST


def test_mnist_in_torchvisions_layout_padded_and_gray_or_three_channels(tmp_path):
    arrays = write_fake_mnist(tmp_path / "MNIST" / "raw", n_train=50, n_test=12)
    cfg = data_cfg("mnist", root=str(tmp_path), download=False, val_size=10)
    data = load_data(cfg, "cpu", input_size=32)  # fit: pad -> 28x28 zero-padded into 32x32
    assert (len(data.train), len(data.val), len(data.test)) == (40, 10, 12)
    assert data.image_size == 32 and data.channels == 1 and data.mean == (0.1307,) and data.std == (0.3081,)
    test = data.test.images.numpy()
    assert test.shape == (12, 1, 32, 32) and test.dtype == np.uint8
    assert np.array_equal(test[:, 0, 2:30, 2:30], arrays["t10k-images-idx3-ubyte"])
    assert not test[:, :, :2].any() and not test[:, :, :, 30:].any()
    assert np.array_equal(data.test.labels.numpy(), arrays["t10k-labels-idx1-ubyte"])

    rgb = load_data(data_cfg("mnist", root=str(tmp_path), download=False, val_size=10, channels=3), "cpu")
    assert rgb.image_size == 28 and rgb.test.images.shape == (12, 3, 28, 28)  # no model size given: as is
    assert all(torch.equal(rgb.test.images[:, c], rgb.test.images[:, 0]) for c in (1, 2))
    assert rgb.mean == (0.1307,) * 3 and rgb.std == (0.3081,) * 3
    resized = load_data(data_cfg("mnist", root=str(tmp_path), download=False, val_size=10, fit="resize"),
                        "cpu",
                        input_size=32)
    assert resized.image_size == 28  # the batches are resized on the device instead (BatchStream)
    with pytest.raises(ConfigError, match=r"data.channels=2"):
        mnist(root=str(tmp_path), download=False, channels=2)
    with pytest.raises(ConfigError, match=r"data.fit='pad'.*use data.fit=resize"):
        load_data(cfg, "cpu", input_size=27)
    with pytest.raises(ConfigError, match=r"at most twice the size"):
        load_data(cfg, "cpu", input_size=224)
    with pytest.raises(ConfigError, match=r"data.train_size=41"):
        load_data(data_cfg("mnist", root=str(tmp_path), download=False, val_size=10, train_size=41), "cpu")
    subset = load_data(data_cfg("mnist", root=str(tmp_path), download=False, val_size=10, train_size=15),
                       "cpu")
    assert len(subset.train) == 15 and torch.equal(subset.val.images, load_data(cfg, "cpu").val.images)


def test_fashion_mnist_reads_the_four_gz_files_in_a_flat_folder(tmp_path):
    arrays = write_fake_mnist(tmp_path / "flat", n_train=30, n_test=8, gz=True, seed=3)
    train_x, _train_y, _test_x, test_y = fashion_mnist(root=str(tmp_path / "flat"), download=False)
    assert np.array_equal(train_x[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(test_y.numpy(), arrays["t10k-labels-idx1-ubyte"]) and test_y.dtype == torch.int64
    # torchvision's layout under the root wins over the flat files
    tv = write_fake_mnist(tmp_path / "flat" / "FashionMNIST" / "raw", n_train=20, n_test=4, seed=4)
    assert np.array_equal(fashion_mnist(root=str(tmp_path / "flat"))[2][:, 0].numpy(),
                          tv["t10k-images-idx3-ubyte"])


def test_missing_mnist_is_one_line_naming_the_dir_and_the_fixes(tmp_path, monkeypatch):
    monkeypatch.setattr(nb_mnist, "DEBIAN_FASHION_MNIST", str(tmp_path / "no-debian"))
    for loader, label in ((mnist, "MNIST"), (fashion_mnist, "Fashion-MNIST")):
        with pytest.raises(DataNotFoundError) as info:
            loader(root=str(tmp_path / "empty"), download=False)
        msg = str(info.value)
        assert "\n" not in msg and msg.startswith(f"{label} not found in data.root={tmp_path / 'empty'}")
        assert "data.download=true" in msg and "data=synthetic" in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "fmnist_quick" not in msg  # Fashion-MNIST's own line does not send the user back to it


def test_corrupt_idx_file_is_one_line(tmp_path):
    write_fake_mnist(tmp_path, n_train=20, n_test=5, gz=True)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08 truncated")
    with pytest.raises(DataNotFoundError) as info:
        mnist(root=str(tmp_path), download=False)
    msg = str(info.value)
    assert "\n" not in msg and f"MNIST in {tmp_path} is corrupted or incomplete" in msg


# ------------------------------------------------------------------------------------------------------
# SVHN


def test_svhn_through_torchvisions_class_with_extra(tmp_path, monkeypatch):
    from torchvision.datasets import SVHN

    written = write_fake_svhn(tmp_path, ("train", "test", "extra"), n=40)
    for split, (md5, _, _) in written.items():
        monkeypatch.setitem(SVHN.split_list, split, [*SVHN.split_list[split][:2], md5])
    train_x, train_y, _test_x, test_y = svhn(root=str(tmp_path), download=False)
    assert train_x.shape == (40, 3, 32, 32) and train_x.dtype == torch.uint8
    assert np.array_equal(train_x.numpy(), written["train"][1])
    assert np.array_equal(test_y.numpy(), written["test"][2])
    assert int(train_y.min()) >= 0 and int(train_y.max()) <= 9  # SVHN's 10 is the digit 0
    with_extra = svhn(root=str(tmp_path), download=False, extra=True)
    assert with_extra[0].shape[0] == 80 and np.array_equal(with_extra[1][40:].numpy(), written["extra"][2])
    data = load_data(data_cfg("svhn", root=str(tmp_path), download=False, val_size=8), "cpu")
    assert (len(data.train), len(data.val), len(data.test), data.channels) == (32, 8, 40, 3)


def test_svhn_missing_and_corrupt_are_one_line(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"^SVHN not found in data.root=.*train_32x32.mat is missing"):
        svhn(root=str(tmp_path), download=False)
    write_fake_svhn(tmp_path, n=5)  # md5s differ from the real files'
    with pytest.raises(DataNotFoundError) as info:
        svhn(root=str(tmp_path), download=False)
    assert "\n" not in str(info.value) and "is corrupted or incomplete" in str(info.value)


# ------------------------------------------------------------------------------------------------------
# the decoded-tensor cache


def test_cache_is_reused_and_invalidated_when_a_source_changes(tmp_path, monkeypatch):
    write_fake_mnist(tmp_path, n_train=20, n_test=5)
    decoded = []
    real_read = nb_mnist.read_idx
    monkeypatch.setattr(nb_mnist, "read_idx", lambda path: decoded.append(path) or real_read(path))
    first = mnist(root=str(tmp_path))
    assert len(decoded) == 4
    caches = list((tmp_path / CACHE_DIR_NAME).glob("mnist-*.pt"))
    assert len(caches) == 1
    second = mnist(root=str(tmp_path))
    assert len(decoded) == 4 and all(torch.equal(a, b) for a, b in zip(first, second))  # read from the cache
    # a changed source: decoded again, the stale cache replaced
    changed = write_fake_mnist(tmp_path, n_train=20, n_test=5, seed=9)
    st = os.stat(tmp_path / "t10k-images-idx3-ubyte")
    os.utime(tmp_path / "t10k-images-idx3-ubyte", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = mnist(root=str(tmp_path))
    assert len(decoded) == 8 and np.array_equal(third[2][:, 0].numpy(), changed["t10k-images-idx3-ubyte"])
    now = list((tmp_path / CACHE_DIR_NAME).glob("mnist-*.pt"))
    assert len(now) == 1 and now != caches
    # an unreadable cache file is decoded again and replaced
    now[0].write_bytes(b"not a torch file")
    assert torch.equal(mnist(root=str(tmp_path))[0], third[0]) and len(decoded) == 12


def test_cache_goes_to_the_user_cache_dir_when_the_data_dir_is_not_writable(tmp_path, user_cache):
    write_fake_mnist(tmp_path / "ro", n_train=20, n_test=5)
    (tmp_path / "ro" / CACHE_DIR_NAME).write_text("")  # a file in the way: the cache dir cannot be made
    first = mnist(root=str(tmp_path / "ro"))
    assert len(list(user_cache.glob("mnist-*.pt"))) == 1
    assert all(torch.equal(a, b) for a, b in zip(first, mnist(root=str(tmp_path / "ro"))))


@needs_fashion_mnist
def test_real_fashion_mnist_from_debians_dir_and_a_fast_second_load(real_fashion_mnist):
    train_x, train_y, test_x, test_y = real_fashion_mnist
    assert train_x.shape == (60000, 1, 28, 28) and test_x.shape == (10000, 1, 28, 28)
    assert torch.bincount(train_y).tolist() == [6000] * 10 and torch.bincount(test_y).tolist() == [1000] * 10
    start = time.perf_counter()
    again = fashion_mnist(root=str(DEBIAN), download=False)  # from the cache the first load wrote
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"second load took {elapsed:.2f} s"
    assert torch.equal(again[0], train_x) and torch.equal(again[3], test_y)
    # the data config's mean/std are the training images' statistics
    from normbench.data import channel_stats

    mean, std = channel_stats(train_x)
    cfg = OmegaConf.load(CONF / "data" / "fashion_mnist.yaml")
    assert abs(mean[0] - cfg.mean[0]) < 1e-3 and abs(std[0] - cfg.std[0]) < 1e-3


# ------------------------------------------------------------------------------------------------------
# image folders


def _fmnist_subset(real, per_class: int, split: int, classes=(0, 1, 7)):
    images, labels = (real[0], real[1]) if split == 0 else (real[2], real[3])
    idx = torch.cat([torch.nonzero(labels == c)[:per_class, 0] for c in classes])
    remap = {c: i for i, c in enumerate(classes)}
    return images[idx, 0].numpy(), np.array([remap[int(v)] for v in labels[idx]])


def test_image_folder_of_real_fashion_mnist_pngs(tmp_path, real_fashion_mnist):
    names = ["bag", "shirt", "trouser"]  # sorted: the label order
    train = _fmnist_subset(real_fashion_mnist, 12, 0)
    test = _fmnist_subset(real_fashion_mnist, 4, 1)
    write_image_folder(tmp_path / "imgs", "train", *train, names)
    write_image_folder(tmp_path / "imgs", "test", *test, names)
    (tmp_path / "imgs" / "train" / "bag" / "notes.txt").write_text("not an image")  # ignored
    cfg = data_cfg("imagefolder", root=str(tmp_path / "imgs"), num_classes=3, channels=1, image_size=28,
                   val_size=6)
    data = load_data(cfg, "cpu")
    assert (len(data.train), len(data.val), len(data.test)) == (30, 6, 12)
    order = np.lexsort((np.arange(12), test[1]))  # ImageFolder: by class folder, then file name
    assert np.array_equal(data.test.images[:, 0].numpy(), test[0][order])  # PNG is lossless
    assert np.array_equal(data.test.labels.numpy(), test[1][order])
    # other sizes and RGB: PIL's bilinear resize of the same files
    big = load_data(data_cfg("imagefolder", root=str(tmp_path / "imgs"), num_classes=3, image_size=32,
                             val_size=6),
                    "cpu")
    first = min((tmp_path / "imgs" / "test" / "bag").glob("*.png"))
    expected = np.asarray(Image.open(first).convert("RGB").resize((32, 32), Image.Resampling.BILINEAR))
    assert big.test.images.shape == (12, 3, 32, 32)
    assert np.array_equal(big.test.images[0].permute(1, 2, 0).numpy(), expected)
    with pytest.raises(ConfigError, match=r"data.num_classes=10.*has 3 class folders.*set "
                       r"data.num_classes=3"):
        load_data(data_cfg("imagefolder", root=str(tmp_path / "imgs")), "cpu")
    with pytest.raises(ConfigError, match=r"data.root=None"):
        load_data(data_cfg("imagefolder"), "cpu")
    shutil.rmtree(tmp_path / "imgs" / "test")
    with pytest.raises(DataNotFoundError, match=r"has no usable test/"):
        load_data(cfg, "cpu")


# ------------------------------------------------------------------------------------------------------
# a full disk, damaged cache files, hostile and blank images


def test_a_full_disk_while_the_cache_is_written_falls_back_and_leaves_no_partial_file(tmp_path, user_cache,
                                                                                     capfd, monkeypatch):
    with tmpfs(tmp_path / "disk", "256k") as disk:
        write_fake_mnist(disk / "data", n_train=200, n_test=20)  # ~170 kB: no room left for its cache
        first = mnist(root=str(disk / "data"))
        err = capfd.readouterr().err.splitlines()
        assert len(err) == 1 and str(disk / "data" / CACHE_DIR_NAME / "mnist-") in err[0], err
        assert "[Errno 28] No space left on device" in err[0] and f"trying {user_cache}" in err[0]
        assert list((disk / "data" / CACHE_DIR_NAME).iterdir()) == []  # the partial .tmp is removed
        assert len(list(user_cache.glob("mnist-*.pt"))) == 1
        again = mnist(root=str(disk / "data"))  # from the user cache, silently
        assert capfd.readouterr().err == "" and all(torch.equal(a, b) for a, b in zip(first, again))
        # both places full: one line each, the data still loads, no partial file anywhere
        monkeypatch.setenv("XDG_CACHE_HOME", str(disk / "xdg"))
        third = mnist(root=str(disk / "data"))
        err = capfd.readouterr().err.splitlines()
        assert len(err) == 2 and err[1].endswith("the dataset is not cached") and "[Errno 28]" in err[1], err
        assert [p.name for p in disk.rglob("*") if p.is_file() and not p.name.endswith("ubyte")] == []
        assert all(torch.equal(a, b) for a, b in zip(first, third))


def test_corrupted_cache_bytes_of_the_right_size_are_said_and_decoded_again(tmp_path, capfd, monkeypatch):
    arrays = write_fake_mnist(tmp_path, n_train=20, n_test=5)
    decoded = []
    real_read = nb_mnist.read_idx
    monkeypatch.setattr(nb_mnist, "read_idx", lambda path: decoded.append(path) or real_read(path))
    first = mnist(root=str(tmp_path))
    (cache,) = (tmp_path / CACHE_DIR_NAME).glob("mnist-*.pt")
    raw = bytearray(cache.read_bytes())
    at = raw.find(arrays["train-images-idx3-ubyte"].tobytes()[:64]) + 100  # inside the train images
    raw[at] ^= 0xFF
    cache.write_bytes(bytes(raw))
    second = mnist(root=str(tmp_path))
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert f"the data cache {cache} is damaged: its content does not match its hash" in err[0]
    assert len(decoded) == 8 and all(torch.equal(a, b) for a, b in zip(first, second))
    assert torch.equal(mnist(root=str(tmp_path))[0], first[0]) and len(decoded) == 8  # replaced: reused again


def _bomb_png(path: Path, side: int = 14000) -> None:
    """A real 1-bit PNG of side x side black pixels (a few kB on disk; 196 M pixels decoded)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = b"\0" * (1 + (side + 7) // 8)  # filter byte + packed bits
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_a_decompression_bomb_and_an_undecodable_image_are_one_line_naming_the_file(tmp_path,
                                                                                        monkeypatch):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        write_image_folder(tmp_path, split, rng.integers(0, 256, (4, 8, 8)), np.array([0, 1, 0, 1]),
                           ["a", "b"])
    cfg = data_cfg("imagefolder", root=str(tmp_path), num_classes=2, channels=1, image_size=8, val_size=1)
    bomb = tmp_path / "train" / "a" / "huge.png"
    _bomb_png(bomb)
    with monkeypatch.context() as unlimited:  # a real PNG, opened without PIL's limit
        unlimited.setattr(Image, "MAX_IMAGE_PIXELS", None)
        with Image.open(bomb) as img:
            assert img.size == (14000, 14000) and img.mode == "1" and bomb.stat().st_size < 100_000
    with pytest.raises(DataNotFoundError) as info:
        load_data(cfg, "cpu")
    assert str(info.value).startswith(f"image folder: {bomb} is refused (Image size (196000000 pixels) "
                                      "exceeds")
    assert "decompression bomb" in str(info.value) and "\n" not in str(info.value)
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # a PNG cut short
    with pytest.raises(DataNotFoundError, match=rf"^image folder: {bomb} cannot be read \(.*\); delete"):
        load_data(cfg, "cpu")


@pytest.mark.slow
def test_blank_images_are_one_line_before_any_record(tmp_path):
    for split in ("train", "test"):
        write_image_folder(tmp_path / "blank", split, np.full((6, 8, 8), 128), np.arange(6) % 2, ["a", "b"])
    proc = run_train(["data=imagefolder", f"data.root={tmp_path / 'blank'}", "data.num_classes=2",
                      "data.channels=1", "data.image_size=8", "data.val_size=2", "batch_size=2",
                      "trainer.epochs=1", "model.width=0.125", "hydra.run.dir=run"], tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        ("normbench: bad value data.std=[0.0]: each channel's std must be > 0 (null: computed from the 4 "
         "training images of imagefolder); check the images")]
    assert not (tmp_path / "run" / "summary.json").exists()
