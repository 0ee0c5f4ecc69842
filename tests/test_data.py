"""Tests for normbench.data: loading, splits, on-device augmentation (checked against torchvision),
batching."""

from __future__ import annotations

import functools
import pickle
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar as tv_cifar
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from fake_cifar import write_fake_cifar
from omegaconf import OmegaConf
from PIL import Image

from normbench.data import (
    BatchStream,
    DataBundle,
    Split,
    _split_indices,
    augment_batch,
    eval_batches,
    load_data,
)
from normbench.datasets import make_synthetic
from normbench.errors import ConfigError, DataNotFoundError

torch.set_num_threads(1)

PAD = 4
SIZE = 32
CONF = Path(__file__).resolve().parents[1] / "conf"
CIFAR10_MEAN = tuple(OmegaConf.load(CONF / "data" / "cifar10.yaml").mean)
CIFAR10_STD = tuple(OmegaConf.load(CONF / "data" / "cifar10.yaml").std)


def synthetic_cfg(**over):
    syn = {"num_train": 600, "num_test": 100, "image_size": 32, "num_classes": 10, "generator_seed": 0,
           "noise": 0.25}
    syn.update(over.pop("synthetic", {}))
    cfg = {
        "_target_": "normbench.datasets.synthetic",
        "channels": 3,
        "mean": None,
        "std": None,
        "val_size": 100,
        "split_seed": 0,
        "augment": True,
        "crop_padding": 4,
        "flip": True,
        **syn,
    }
    cfg.update(over)
    return OmegaConf.create(cfg)


def cifar_cfg(name: str, root, download: bool, val_size: int, split_seed: int = 0):
    """conf/data/<name>.yaml with the given root, download flag and split."""
    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "data" / f"{name}.yaml")
    cfg.merge_with({"root": str(root), "download": download, "val_size": val_size, "split_seed": split_seed})
    return cfg


@pytest.fixture(scope="module")
def bundle() -> DataBundle:
    return load_data(synthetic_cfg(), torch.device("cpu"))


# ---------------------------------------------------------------------------------------------------------
# loading: synthetic


def test_synthetic_bundle_shapes_dtypes_devices(bundle):
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (500, 100, 100)
    for split in (bundle.train, bundle.val, bundle.test):
        assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
        assert split.images.shape[1:] == (3, 32, 32) and split.labels.shape == (len(split),)
        assert split.images.device.type == "cpu" and split.labels.device.type == "cpu"
        assert split.images.is_contiguous()
        assert 0 <= int(split.labels.min()) and int(split.labels.max()) < 10
    assert bundle.num_classes == 10 and bundle.image_size == 32 and bundle.name == "synthetic"
    assert len(bundle.mean) == 3 and len(bundle.std) == 3
    assert all(isinstance(v, float) for v in bundle.mean + bundle.std)
    # synthetic statistics are those of its own training split
    x = bundle.train.images.double() / 255
    assert np.allclose(bundle.mean, x.mean(dim=(0, 2, 3)).tolist(), atol=1e-6)
    assert np.allclose(bundle.std, x.std(dim=(0, 2, 3)).tolist(), atol=1e-6)


def test_synthetic_determined_by_seed():
    a = load_data(synthetic_cfg(), "cpu")
    c = load_data(synthetic_cfg(synthetic={"generator_seed": 1}), "cpu")
    b = load_data(synthetic_cfg(), "cpu")  # generated again: the process keeps the last dataset only
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.train.labels, b.train.labels)
    assert torch.equal(a.test.images, b.test.images) and torch.equal(a.val.labels, b.val.labels)
    assert not torch.equal(a.train.images, c.train.images)
    # classes are balanced over all generated images
    counts = torch.cat([a.train.labels, a.val.labels, a.test.labels]).bincount(minlength=10)
    assert counts.tolist() == [70] * 10


def user_dataset(**_):
    USER_CALLS.append(1)
    return (*make_synthetic(60), *make_synthetic(10, seed=1))


USER_CALLS: list = []


def test_consecutive_jobs_reuse_a_builtin_dataset_not_a_users(monkeypatch):
    """The jobs of a sweep share a process: a builtin dataset that the job before loaded with the same
    config is not generated (or read and hashed) again, and gives the same splits; another config is
    loaded anew; a user's dataset is called every time (it may read files that changed)."""
    from normbench import datasets

    calls, generate = [], datasets.synthetic

    @functools.wraps(generate)  # the same module and name: still a trusted target
    def counted(**kwargs):
        calls.append(kwargs)
        return generate(**kwargs)

    monkeypatch.setattr(datasets, "synthetic", counted)
    first = load_data(synthetic_cfg(synthetic={"generator_seed": 7}), "cpu")
    again = load_data(synthetic_cfg(synthetic={"generator_seed": 7}), "cpu")
    assert len(calls) == 1
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(first, split).images, getattr(again, split).images)
    load_data(synthetic_cfg(synthetic={"generator_seed": 8}), "cpu")
    load_data(synthetic_cfg(synthetic={"generator_seed": 7}, split_seed=3), "cpu")
    assert len(calls) == 3
    user = OmegaConf.create({**OmegaConf.to_container(synthetic_cfg()), "_target_": "test_data.user_dataset",
                             "val_size": 10})
    USER_CALLS.clear()
    for _ in range(2):
        load_data(user, "cpu", allowed_targets=("normbench.datasets.*", "test_data.*"))
    assert len(USER_CALLS) == 2


def test_synthetic_is_fast():
    make_synthetic(1000)  # warm-up
    best = min(_timed(lambda: make_synthetic(10_000)) for _ in range(2))
    assert best < 5.0, f"10k synthetic images took {best:.2f}s"  # ~0.4 s on an idle core; CI boxes are busy


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def test_synthetic_is_learnable_by_a_small_cnn():
    torch.manual_seed(0)
    data = load_data(synthetic_cfg(synthetic={"num_train": 3000, "num_test": 10}, val_size=500), "cpu")
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(4),
        torch.nn.Conv2d(16, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(32, 10),
    )
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    stream = BatchStream(data.train, 64, data.mean, data.std, generator=torch.Generator().manual_seed(0))
    for x, y in stream:  # 39 steps
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        correct = sum(
            int((net(x).argmax(1) == y).sum()) for x, y in eval_batches(data.val, 250, data.mean, data.std)
        )
    assert correct / len(data.val) > 0.35  # chance is 0.10


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "synthetic"])
def test_data_config_files(name, monkeypatch, tmp_path):
    from hydra import compose, initialize_config_dir

    monkeypatch.setenv("NORMBENCH_DATA", str(tmp_path))
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf")):
        cfg = compose(config_name="config", overrides=[f"data={name}"]).data  # with the schema's defaults
    assert cfg._target_ == f"normbench.datasets.{name}"
    if name != "synthetic":  # the generated dataset has no files
        assert cfg.root == str(tmp_path) and "download" in cfg
    for key in ("num_classes", "channels", "image_size", "mean", "std", "val_size", "split_seed", "augment",
                "crop_padding", "flip"):
        assert key in cfg, key
    assert (cfg.augment, cfg.crop_padding, cfg.flip) == (True, 4, True)
    if name == "synthetic":
        cfg.num_train, cfg.num_test, cfg.val_size = 300, 50, 30
        data = load_data(cfg, "cpu")
        assert (len(data.train), len(data.val), len(data.test)) == (270, 30, 50)
    else:
        cfg.download = False
        with pytest.raises(DataNotFoundError, match=str(tmp_path)):
            load_data(cfg, "cpu")


def test_config_errors():
    with pytest.raises(ConfigError, match="data._target_"):
        load_data(synthetic_cfg(_target_="normbench.datasets.imagenet"), "cpu")
    with pytest.raises(ConfigError, match=r"data.val_size=600.*\[0, 599\]"):
        load_data(synthetic_cfg(val_size=600), "cpu")
    with pytest.raises(ConfigError, match="batch_size"):
        BatchStream(
            Split(torch.zeros(10, 3, 8, 8, dtype=torch.uint8), torch.zeros(10, dtype=torch.long)),
            11,
            (0.5,) * 3,
            (0.5,) * 3,
        )


# ---------------------------------------------------------------------------------------------------------
# validation split


def test_val_split_disjoint_covering_and_fixed_by_split_seed():
    train, val = _split_indices(1000, 100, split_seed=3)
    assert len(val) == 100 and len(train) == 900
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(1000))
    train2, val2 = _split_indices(1000, 100, split_seed=3)
    assert torch.equal(val, val2) and torch.equal(train, train2)
    _, val3 = _split_indices(1000, 100, split_seed=4)
    assert not torch.equal(val, val3)


def test_split_seed_changes_only_the_split():
    a = load_data(synthetic_cfg(split_seed=0), "cpu")
    b = load_data(synthetic_cfg(split_seed=1), "cpu")
    assert torch.equal(a.test.images, b.test.images)
    assert not torch.equal(a.val.images, b.val.images)
    # same pool of training images, partitioned differently
    pool_a = torch.cat([a.train.images, a.val.images]).flatten(1)
    pool_b = torch.cat([b.train.images, b.val.images]).flatten(1)
    assert sorted(map(bytes, pool_a.numpy())) == sorted(map(bytes, pool_b.numpy()))


# ---------------------------------------------------------------------------------------------------------
# loading: CIFAR through torchvision's own classes, from fake files in the real on-disk format


def _trust_fake_md5s(monkeypatch, cls, md5s):
    """Point torchvision's md5 table at the fake files: its integrity check still runs, on these files."""
    monkeypatch.setattr(cls, "train_list", [[f, md5s[f]] for f, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[f, md5s[f]] for f, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5s[cls.meta["filename"]]})


def _raw_batches(folder, names, label_key):
    data, labels = [], []
    for name in names:
        with open(folder / name, "rb") as fh:
            entry = pickle.load(fh, encoding="latin1")
        data.append(entry["data"])
        labels += entry[label_key]
    return np.concatenate(data).reshape(-1, 3, 32, 32), np.asarray(labels)


def test_load_fake_cifar10_with_torchvision(tmp_path, monkeypatch):
    md5s = write_fake_cifar(tmp_path, "cifar10", n_train=120, n_test=30, seed=1)
    _trust_fake_md5s(monkeypatch, tv_cifar.CIFAR10, md5s)
    cfg = cifar_cfg("cifar10", str(tmp_path), False, 20, 5)
    data = load_data(cfg, "cpu")
    assert (len(data.train), len(data.val), len(data.test)) == (100, 20, 30)
    assert data.num_classes == 10 and data.image_size == 32 and data.name == "cifar10"
    assert data.mean == CIFAR10_MEAN and data.std == CIFAR10_STD
    folder = tmp_path / "cifar-10-batches-py"
    raw_x, raw_y = _raw_batches(folder, [f"data_batch_{i}" for i in range(1, 6)], "labels")
    train_idx, val_idx = _split_indices(120, 20, split_seed=5)
    assert np.array_equal(data.train.images.numpy(), raw_x[train_idx.numpy()])  # CHW layout preserved
    assert np.array_equal(data.val.images.numpy(), raw_x[val_idx.numpy()])
    assert np.array_equal(data.train.labels.numpy(), raw_y[train_idx.numpy()])
    test_x, test_y = _raw_batches(folder, ["test_batch"], "labels")
    assert np.array_equal(data.test.images.numpy(), test_x) and np.array_equal(
        data.test.labels.numpy(), test_y
    )
    assert data.train.images.dtype == torch.uint8 and data.train.labels.dtype == torch.int64


def test_load_fake_cifar100_with_torchvision(tmp_path, monkeypatch):
    md5s = write_fake_cifar(tmp_path, "cifar100", n_train=60, n_test=10)
    _trust_fake_md5s(monkeypatch, tv_cifar.CIFAR100, md5s)
    data = load_data(cifar_cfg("cifar100", str(tmp_path), False, 10, 0), "cpu")
    assert (len(data.train), len(data.val), len(data.test)) == (50, 10, 10)
    assert data.num_classes == 100
    raw_x, raw_y = _raw_batches(tmp_path / "cifar-100-python", ["test"], "fine_labels")
    assert np.array_equal(data.test.images.numpy(), raw_x) and np.array_equal(data.test.labels.numpy(), raw_y)


def test_missing_cifar_without_download_names_dir_and_fix(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("must not try to download with data.download=false")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", no_network)
    root = tmp_path / "data"
    with pytest.raises(DataNotFoundError) as info:
        load_data(cifar_cfg("cifar10", str(root), False, 5000, 0), "cpu")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"CIFAR-10 not found in data.root={root}")
    assert "cifar-10-batches-py" in msg and "data.download=true" in msg and "data=synthetic" in msg
    # the offline route on real data first: Debian's Fashion-MNIST and the README's quick comparison
    assert "apt-get install dataset-fashion-mnist" in msg and "data=fashion_mnist" in msg
    assert "+experiment=fmnist_quick" in msg


def test_missing_cifar_when_download_fails(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    with pytest.raises(DataNotFoundError) as info:
        load_data(cifar_cfg("cifar100", str(tmp_path), True, 10, 0), "cpu")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(
        f"CIFAR-100 not found in data.root={tmp_path} and it could not be downloaded (URLError"
    )
    assert "data.download=true" in msg and "cifar-100-python/" in msg and "data=synthetic" in msg


def test_download_true_uses_present_files_and_downloads_missing_ones(tmp_path, monkeypatch):
    md5s = write_fake_cifar(tmp_path / "stage", "cifar10", n_train=40, n_test=10)
    _trust_fake_md5s(monkeypatch, tv_cifar.CIFAR10, md5s)
    calls = []

    def fake_download(url, download_root, filename=None, md5=None, **kwargs):  # "extracts" the fake files
        calls.append(url)
        (tmp_path / "stage" / "cifar-10-batches-py").rename(tmp_path / "data" / "cifar-10-batches-py")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", fake_download)
    cfg = cifar_cfg("cifar10", str(tmp_path / "data"), True, 10, 0)
    assert len(load_data(cfg, "cpu").train) == 30 and len(calls) == 1
    assert len(load_data(cfg, "cpu").train) == 30 and len(calls) == 1  # present now: no second download


def test_corrupted_cifar_files_are_reported(tmp_path):
    write_fake_cifar(tmp_path, "cifar10", n_train=20, n_test=5)  # md5s differ from the real files
    with pytest.raises(DataNotFoundError, match="corrupted"):
        load_data(cifar_cfg("cifar10", str(tmp_path), False, 5, 0), "cpu")


# ---------------------------------------------------------------------------------------------------------
# augmentation: same distribution (and same pixels) as torchvision RandomCrop(32, padding=4) + flip


def _marker_image() -> np.ndarray:
    """HWC uint8: red = row + 1, green = col + 1, blue = 255, so zero padding is recognisable."""
    rows, cols = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
    return np.stack([rows + 1, cols + 1, np.full_like(rows, 255)], axis=-1).astype(np.uint8)


def _recover(out: np.ndarray):
    """(N, 3, H, W) crops of the marker image -> (dy, dx, flipped) in padded coordinates, checked exact."""
    out = out.astype(np.int64)
    valid = out[:, 2] == 255
    i = np.arange(SIZE)[None, :, None]
    j = np.arange(SIZE)[None, None, :]
    dy_map = out[:, 0] - 1 + PAD - i
    dx_plain = out[:, 1] - 1 + PAD - j
    dx_flip = out[:, 1] - 1 + PAD - (SIZE - 1 - j)

    def constant(m):
        hi = np.where(valid, m, -(10**6)).max(axis=(1, 2))
        lo = np.where(valid, m, 10**6).min(axis=(1, 2))
        return hi, hi == lo

    dy, dy_ok = constant(dy_map)
    dxp, plain_ok = constant(dx_plain)
    dxf, flip_ok = constant(dx_flip)
    assert dy_ok.all() and (plain_ok ^ flip_ok).all(), "output is not a (flipped) crop of the padded input"
    flipped = flip_ok
    dx = np.where(flipped, dxf, dxp)
    # padding pixels are exactly where the crop leaves the image, and are zero
    rr = dy[:, None, None] + i - PAD
    cc = np.where(flipped[:, None, None], dx[:, None, None] + SIZE - 1 - j, dx[:, None, None] + j) - PAD
    inside = (rr >= 0) & (rr < SIZE) & (cc >= 0) & (cc < SIZE)
    assert np.array_equal(valid, inside)
    assert (np.where(~inside[:, None], out, 0) == 0).all()
    return dy, dx, flipped.astype(np.int64)


def _torchvision_params(n: int, seed: int):
    torch.manual_seed(seed)
    tf = T.Compose([T.RandomCrop(SIZE, padding=PAD), T.RandomHorizontalFlip()])
    img = Image.fromarray(_marker_image())
    out = np.stack([np.asarray(tf(img)).transpose(2, 0, 1) for _ in range(n)])
    return _recover(out)


def _our_params(n: int, seed: int, **kw):
    batch = torch.from_numpy(_marker_image()).permute(2, 0, 1).contiguous().expand(n, 3, SIZE, SIZE)
    out = augment_batch(
        batch.contiguous(),
        crop_padding=kw.get("crop_padding", PAD),
        flip=kw.get("flip", True),
        generator=torch.Generator().manual_seed(seed),
    )
    assert out.dtype == torch.uint8 and out.shape == (n, 3, SIZE, SIZE)
    return _recover(out.numpy())


def _cells(params) -> np.ndarray:
    dy, dx, flipped = params
    return np.bincount((dy * (2 * PAD + 1) + dx) * 2 + flipped, minlength=(2 * PAD + 1) ** 2 * 2)


def _homogeneity_p(a: np.ndarray, b: np.ndarray) -> float:
    """Chi-square test that two count vectors come from one distribution (2 x K contingency table)."""
    keep = (a + b) > 0
    a, b = a[keep].astype(float), b[keep].astype(float)
    na, nb = a.sum(), b.sum()
    tot = a + b
    ea, eb = tot * na / (na + nb), tot * nb / (na + nb)
    stat = ((a - ea) ** 2 / ea).sum() + ((b - eb) ** 2 / eb).sum()
    return _chi2_sf(stat, len(a) - 1)


def _uniform_p(a: np.ndarray) -> float:
    e = a.sum() / len(a)
    return _chi2_sf(((a - e) ** 2 / e).sum(), len(a) - 1)


def _chi2_sf(stat: float, df: int) -> float:
    return float(
        torch.special.gammaincc(
            torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)
        )
    )


@pytest.fixture(scope="module")
def crop_params():
    n = 3000
    return _our_params(n, seed=123), _torchvision_params(n, seed=321)


def test_augmentation_matches_torchvision_distribution(crop_params):
    ours, theirs = crop_params
    for k, name in enumerate(("dy", "dx", "flip")):
        levels = 2 if name == "flip" else 2 * PAD + 1
        a = np.bincount(ours[k], minlength=levels)
        b = np.bincount(theirs[k], minlength=levels)
        assert len(a) == len(b) == levels, f"{name}: values outside the torchvision range"
        assert _homogeneity_p(a, b) > 1e-3, f"{name}: {a} vs torchvision {b}"
        assert _uniform_p(a) > 1e-3 and _uniform_p(b) > 1e-3
    joint_ours, joint_tv = _cells(ours), _cells(theirs)  # 81 offsets x 2 flips
    assert (joint_ours > 0).all() and (joint_tv > 0).all()
    assert _homogeneity_p(joint_ours, joint_tv) > 1e-3


def test_distribution_check_has_power(crop_params):
    """The comparison above rejects an off-by-one offset range and a pipeline that never flips."""
    ours, theirs = crop_params
    off_by_one = (np.minimum(ours[0], 2 * PAD - 1), ours[1], ours[2])  # offsets 0..7
    assert _homogeneity_p(_cells(off_by_one), _cells(theirs)) < 1e-6
    shifted = (ours[0], np.where(ours[1] == 0, 1, ours[1]), ours[2])  # offsets 1..8
    assert _homogeneity_p(_cells(shifted), _cells(theirs)) < 1e-6
    no_flip = _our_params(3000, seed=5, flip=False)
    assert no_flip[2].sum() == 0
    assert _homogeneity_p(_cells(no_flip), _cells(theirs)) < 1e-6


def test_augmentation_pixels_equal_torchvision_functional_ops():
    n = 64
    gen = torch.Generator().manual_seed(7)
    state = gen.get_state()
    images = torch.randint(
        0, 256, (n, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    out = augment_batch(images, crop_padding=PAD, flip=True, generator=gen)
    gen.set_state(state)  # replay the same random parameters on the marker image to read them off
    marker = (
        torch.from_numpy(_marker_image()).permute(2, 0, 1).contiguous().expand(n, -1, -1, -1).contiguous()
    )
    dy, dx, flipped = _recover(augment_batch(marker, crop_padding=PAD, flip=True, generator=gen).numpy())
    assert 0 < flipped.sum() < n
    for k in range(n):
        ref = TF.crop(TF.pad(images[k], [PAD]), int(dy[k]), int(dx[k]), SIZE, SIZE)
        if flipped[k]:
            ref = TF.hflip(ref)
        assert torch.equal(out[k], ref), k


def test_augmentation_switches():
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    assert augment_batch(x, crop_padding=0, flip=False) is x
    flip_only = augment_batch(x, crop_padding=0, flip=True, generator=torch.Generator().manual_seed(0))
    for k in range(16):
        assert torch.equal(flip_only[k], x[k]) or torch.equal(flip_only[k], x[k].flip(-1))
    crop_only = augment_batch(x, crop_padding=2, flip=False, generator=torch.Generator().manual_seed(0))
    assert crop_only.shape == x.shape and crop_only.dtype == torch.uint8
    with pytest.raises(ValueError):
        augment_batch(x[0], crop_padding=4, flip=True)


# ---------------------------------------------------------------------------------------------------------
# batching


def _id_split(n: int = 100, size: int = 8) -> Split:
    """Images whose pixels all equal the sample's id (mod 256) and labels = ids."""
    ids = torch.arange(n)
    images = (ids % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, size, size).contiguous()
    return Split(images, ids.clone())


def test_batch_stream_covers_each_image_once_per_epoch_in_a_new_order():
    split = _id_split(100, size=16)
    stream = BatchStream(
        split, 32, (0.5,) * 3, (0.25,) * 3, drop_last=False, generator=torch.Generator().manual_seed(0)
    )
    assert len(stream) == 4
    epochs = []
    for _ in range(3):
        batches = list(stream)
        assert [len(y) for _, y in batches] == [32, 32, 32, 4]
        order = torch.cat([y for _, y in batches])
        assert sorted(order.tolist()) == list(range(100))
        for x, y in batches:  # images travel with their labels
            centre = x[:, :, 8, 8] * 0.25 + 0.5  # undo normalisation; this pixel is never padding
            assert torch.allclose(centre * 255, y.float()[:, None].expand(-1, 3), atol=1e-3)
        epochs.append(order.tolist())
    assert epochs[0] != epochs[1] != epochs[2]


def test_batch_stream_drop_last_and_determinism(bundle):
    def run(seed):
        s = BatchStream(
            bundle.train, 64, bundle.mean, bundle.std, generator=torch.Generator().manual_seed(seed)
        )
        return list(s)

    a, b, c = run(0), run(0), run(1)
    assert len(a) == 500 // 64 and all(x.shape == (64, 3, 32, 32) for x, _ in a)
    assert all(x.dtype == torch.float32 and y.dtype == torch.int64 for x, y in a)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not torch.equal(a[0][1], c[0][1])


def test_batch_stream_uses_global_rng_when_no_generator(bundle):
    torch.manual_seed(3)
    a = [y for _, y in BatchStream(bundle.train, 100, bundle.mean, bundle.std)]
    torch.manual_seed(3)
    b = [y for _, y in BatchStream(bundle.train, 100, bundle.mean, bundle.std)]
    assert all(torch.equal(ya, yb) for ya, yb in zip(a, b))


def test_normalization_matches_formula(bundle):
    x, y = next(eval_batches(bundle.test, 50, bundle.mean, bundle.std))
    mean = torch.tensor(bundle.mean).view(1, 3, 1, 1)
    std = torch.tensor(bundle.std).view(1, 3, 1, 1)
    ref = (bundle.test.images[:50].float() / 255 - mean) / std
    assert x.dtype == torch.float32 and torch.allclose(x, ref, atol=1e-5)
    assert torch.equal(y, bundle.test.labels[:50])
    # an unaugmented training stream gives the same values for the images it picked
    split = _id_split(50)
    xb, yb = next(iter(BatchStream(split, 20, (0.1, 0.2, 0.3), (0.3, 0.2, 0.1), augment=False)))
    mean, std = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1), torch.tensor([0.3, 0.2, 0.1]).view(1, 3, 1, 1)
    assert torch.allclose(xb, (split.images[yb].float() / 255 - mean) / std, atol=1e-5)


def test_resize_path_gives_requested_size(bundle):
    s = BatchStream(bundle.train, 8, bundle.mean, bundle.std, resize_to=224)
    x, y = next(iter(s))
    assert x.shape == (8, 3, 224, 224) and x.dtype == torch.float32 and y.shape == (8,)
    x, _ = next(eval_batches(bundle.val, 4, bundle.mean, bundle.std, resize_to=64, channels_last=True))
    assert x.shape == (4, 3, 64, 64) and x.is_contiguous(memory_format=torch.channels_last)
    # bilinear upsampling of the normalized image (normalisation commutes with it)
    ref = torch.nn.functional.interpolate(
        next(eval_batches(bundle.val, 4, bundle.mean, bundle.std))[0],
        size=(64, 64),
        mode="bilinear",
        align_corners=False,
    )
    assert torch.allclose(x, ref, atol=1e-5)
    # a constant image stays constant
    flat = Split(torch.full((2, 3, 32, 32), 200, dtype=torch.uint8), torch.zeros(2, dtype=torch.long))
    x, _ = next(eval_batches(flat, 2, (0.0,) * 3, (1.0,) * 3, resize_to=224))
    assert torch.allclose(x, torch.full_like(x, 200 / 255), atol=1e-6)


def test_channels_last_stream(bundle):
    s = BatchStream(bundle.train, 16, bundle.mean, bundle.std, channels_last=True)
    x, _ = next(iter(s))
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_eval_batches_cover_split_in_order_and_respect_max_batches(bundle):
    batches = list(eval_batches(bundle.test, 30, bundle.mean, bundle.std))
    assert [len(y) for _, y in batches] == [30, 30, 30, 10]
    assert torch.equal(torch.cat([y for _, y in batches]), bundle.test.labels)
    assert len(list(eval_batches(bundle.test, 30, bundle.mean, bundle.std, max_batches=2))) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_stream_stays_on_device_without_host_sync():
    data = load_data(synthetic_cfg(), "cuda")
    assert data.train.images.is_cuda and data.train.labels.is_cuda
    gen = torch.Generator(device="cuda").manual_seed(0)
    stream = BatchStream(
        data.train, 64, data.mean, data.std, resize_to=224, channels_last=True, generator=gen
    )
    evals = eval_batches(data.val, 50, data.mean, data.std, resize_to=224)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, y in stream:
            assert x.is_cuda and y.is_cuda and x.shape == (64, 3, 224, 224)
        for x, y in evals:
            assert x.is_cuda
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_compare_data_pipelines_smoke():
    from normbench.perf.data import compare_data_pipelines

    out = compare_data_pipelines(
        "cpu", batch_size=32, n_images=256, seconds=0.05, rounds=1, num_workers=0, warmup_batches=1
    )
    assert out["normbench_img_s"] > 0 and out["torchvision_img_s"] > 0
    assert out["ratio"] == pytest.approx(out["normbench_img_s"] / out["torchvision_img_s"])
    assert out["data"] == "fake-cifar10" and out["n_images"] == 256
