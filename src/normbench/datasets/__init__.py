"""The built-in datasets: the `_target_`s of conf/data/*.yaml.

They follow the protocol a user's dataset follows (docs/extending.md): a callable called with
every key of the data config as a keyword argument (so it takes ``**kwargs`` for the keys it does not
use) that returns four tensors: train images uint8 (N, C, H, W), train labels int64 (N,), test images,
test labels. Everything after that -- the validation hold-out, normalization, augmentation, the
on-device pipeline -- is the same for every dataset (normbench.data).

Files are read with torchvision's own dataset classes (and downloaded by them); what was decoded is
cached as one tensor file (normbench.datasets.cache), so a second load takes a fraction of a second.
"""

from normbench.datasets.cifar import cifar10, cifar100
from normbench.datasets.generated import make_synthetic, synthetic
from normbench.datasets.idx import fashion_mnist, mnist
from normbench.datasets.image_folder import imagefolder
from normbench.datasets.svhn_mat import svhn

__all__ = ["cifar10", "cifar100", "fashion_mnist", "imagefolder", "make_synthetic", "mnist", "svhn", "synthetic"]
