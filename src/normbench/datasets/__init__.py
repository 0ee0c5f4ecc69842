"""The built-in datasets (conf/data/*.yaml): they follow the protocol a user's dataset follows
(docs/extending.md), read with torchvision's own classes; what was decoded is cached (datasets.cache)."""

from normbench.datasets.cifar import cifar10, cifar100
from normbench.datasets.generated import make_synthetic, synthetic
from normbench.datasets.idx import fashion_mnist, mnist
from normbench.datasets.image_folder import imagefolder
from normbench.datasets.svhn_mat import svhn

__all__ = ["cifar10", "cifar100", "fashion_mnist", "imagefolder", "make_synthetic", "mnist", "svhn",
           "synthetic"]
