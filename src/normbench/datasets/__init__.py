"""The built-in datasets, the `_target_`s of conf/data/*.yaml: they follow the protocol a user's dataset
follows (normbench.data; docs/extending.md). Files are read with torchvision's own dataset classes
(and downloaded by them); what was decoded is cached as one tensor file (normbench.datasets.cache).
"""

from normbench.datasets.cifar import cifar10, cifar100
from normbench.datasets.generated import make_synthetic, synthetic
from normbench.datasets.idx import fashion_mnist, mnist
from normbench.datasets.image_folder import imagefolder
from normbench.datasets.svhn_mat import svhn

__all__ = ["cifar10", "cifar100", "fashion_mnist", "imagefolder", "make_synthetic", "mnist", "svhn",
           "synthetic"]
