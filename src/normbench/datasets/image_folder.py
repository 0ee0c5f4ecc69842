"""`data=imagefolder`: your own images in torchvision's ImageFolder layout (docs/data.md), converted to
``data.channels``, resized to ``data.image_size`` (bilinear, antialiased), decoded once and cached."""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch

from normbench.datasets.cache import cached
from normbench.datasets.common import Tensors, absolute, short
from normbench.errors import ConfigError, DataNotFoundError

LAYOUT = "<root>/train/<class>/*.png|jpg|... and <root>/test/<class>/*"


def imagefolder(root=None, num_classes: int = 10, channels: int = 3, image_size: int = 32, **_) -> Tensors:
    from torchvision.datasets import ImageFolder

    if not root:
        raise ConfigError("data.root", root, f"set it to your image folder ({LAYOUT}), e.g. "
                          "data.root=~/my_images")
    if channels not in (1, 3) or isinstance(channels, bool):
        raise ConfigError("data.channels", channels, "use 1 (grayscale) or 3 (RGB)")
    root_abs = absolute(root)
    splits = {}
    for split in ("train", "test"):
        folder = os.path.join(root_abs, split)
        try:
            splits[split] = ImageFolder(folder, is_valid_file=_readable_by_pil)
        except (FileNotFoundError, NotADirectoryError) as err:
            raise DataNotFoundError(
                f"image folder data.root={root_abs} has no usable {split}/ ({short(err)}): put the images in "
                f"{LAYOUT}, or point data.root at such a folder") from err
    classes = splits["train"].classes
    if splits["test"].classes != classes:
        raise DataNotFoundError(
            f"image folder data.root={root_abs}: test/ has the classes {splits['test'].classes}, train/ has "
            f"{classes}; give both the same class folders")
    if num_classes != len(classes):
        raise ConfigError("data.num_classes", num_classes,
                          f"{root_abs}/train has {len(classes)} class folders ({', '.join(classes[:5])}"
                          f"{', ...' if len(classes) > 5 else ''}): set data.num_classes={len(classes)}")
    sources = [path for split in splits.values() for path, _ in split.samples]

    def decode() -> Tensors:
        out = []
        for ds in splits.values():
            out += [_decode_all(ds.samples, int(channels), int(image_size)),
                    torch.as_tensor([label for _, label in ds.samples], dtype=torch.int64)]
        return tuple(out)

    return cached("imagefolder", root_abs, sources, {"channels": int(channels), "image_size": int(image_size),
                                                     "classes": classes}, decode)


def _readable_by_pil(path: str) -> bool:
    from PIL import Image

    return os.path.splitext(path)[1].lower() in Image.registered_extensions()


def _decode_all(samples, channels: int, size: int) -> torch.Tensor:
    images = np.empty((len(samples), size, size, channels), dtype=np.uint8)
    for i, (path, _) in enumerate(samples):
        images[i] = _decode(path, channels, size)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def _decode(path: str, channels: int, size: int) -> np.ndarray:
    """A file PIL cannot decode, or one over its decompression-bomb limit, is one line naming it."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img = img.convert("L" if channels == 1 else "RGB")
                if img.size != (size, size):
                    img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
                return np.asarray(img).reshape(size, size, channels)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DataNotFoundError(f"image folder: {path} is refused ({str(err).rstrip('.')}); shrink it below "
                                f"{Image.MAX_IMAGE_PIXELS} pixels or delete it") from err
    except Exception as err:  # any decoder failure (OSError, SyntaxError, ...) is this file's
        raise DataNotFoundError(f"image folder: {path} cannot be read ({short(err)}); delete or replace "
                                "it") from err
