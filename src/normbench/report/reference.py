"""The studies' reported numbers as data, each with the settings it belongs to.

Source: the two studies themselves. Study 000: VGG-A with and without BatchNorm on CIFAR-10 -- its
tables of losses, activations, optimizers, dropout, schedules, learning rates and the best combination,
and its section 9 on the optimisation mechanism. Study 002: AlexNet with none/BN/LN/GN across batch
sizes and learning rates. (The VGG-A parameter counts are computed, not the study's: see their note.)

A run matches a reference row when every setting of the row, and of its table's ``context``, equals
the run's setting (group choices such as ``norm=bn``, plus the numeric keys ``batch_size``,
``dropout`` = model.dropout and ``lr`` = optimizer.lr). Keys a table does not name are free: the
report shows them when they vary.

Reference metric keys use the run-record names; accuracies and errors are in percent here:
``test/err`` (%), ``test/acc`` (%), ``val/best_acc`` (%), ``convergence/epoch``, ``model/params``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Smaller variants of the studies' models (conf/model/): their runs fill the study's tables, and the
# report notes that the study's numbers are for the full model.
MODEL_VARIANTS = {"vgg_a_light": "vgg_a", "alexnet_cifar": "alexnet"}


def model_family(model: object) -> object:
    return MODEL_VARIANTS.get(model, model) if isinstance(model, str) else model

NORM_LABEL = {"none": "plain", "bn": "BN", "ln": "LN", "gn": "GN"}


@dataclass(frozen=True)
class RefRow:
    """One reported number (or several for the same settings) of a study table."""

    label: str
    settings: dict[str, Any]
    ref: dict[str, float]  # metric -> value in the study's units (see module doc)
    vs: str | None = None  # label of the row this one is compared with (same table)


@dataclass(frozen=True)
class Contrast:
    """A relative claim between two rows: metric(row) / metric(base) - 1, in percent."""

    metric: str
    row: str
    base: str
    percent: float
    text: str


@dataclass(frozen=True)
class StudyTable:
    name: str  # also the sweep preset's name (summary["experiment"])
    study: str  # "000" | "002"
    title: str
    context: dict[str, Any]  # settings every row of the table shares
    rows: tuple[RefRow, ...]
    primary: str = "test/err"  # the metric the study reports for the rows
    note: str = ""
    contrasts: tuple[Contrast, ...] = ()
    # per norm: reported optimisation-mechanism numbers (study 000, section 9)
    mechanism: dict[str, dict[str, Any]] = field(default_factory=dict)
    # where the study contradicts itself about these numbers (shown beside them in the report)
    flags: tuple[str, ...] = ()
    # the comparisons the study draws besides each row's `vs`: (row, base) label pairs
    pairs: tuple[tuple[str, str], ...] = ()

    def row(self, label: str) -> RefRow:
        for r in self.rows:
            if r.label == label:
                return r
        raise KeyError(label)


STUDY_TITLES = {
    "000": "Study 000 - VGG-A on CIFAR-10, with and without BatchNorm",
    "002": "Study 002 - AlexNet on CIFAR-10: no norm / BN / LN / GN across batch sizes",
}

# The study-000 baseline: VGG-A, ReLU, cross-entropy, constant learning rate 0.001 (section 7's
# "固定学习率 (0.001)" is the 12.35 % of the BN baseline), no dropout.
_VGG = {"model": "vgg_a"}
BASE_LR = 0.001
SGD_LR = 0.01  # section 5's "SGD (lr=0.01, momentum=0.9)": its own row, 11.32 %
_VGG_BASE = {"model": "vgg_a", "activation": "relu", "loss": "ce", "scheduler": "constant", "dropout": 0.0,
             "lr": BASE_LR}


def _ctx(**drop_and_set: Any) -> dict[str, Any]:
    """The VGG baseline context without the keys a table varies (pass key=None to drop it)."""
    ctx = dict(_VGG_BASE)
    for key, value in drop_and_set.items():
        if value is None:
            ctx.pop(key, None)
        else:
            ctx[key] = value
    return ctx


def _norm_by(key: str, labels: dict[str, str], plain: list[float], bn: list[float], base: str) -> tuple:
    rows = []
    for norm, values in (("none", plain), ("bn", bn)):
        for (value, text), err in zip(labels.items(), values, strict=True):
            label = f"{NORM_LABEL[norm]} · {text}"
            vs = None if value == base else f"{NORM_LABEL[norm]} · {labels[base]}"
            rows.append(RefRow(label, {"norm": norm, key: value}, {"test/err": err}, vs))
    return tuple(rows)


_LOSSES = {"ce": "CE", "ce_l1": "CE+L1", "ce_l2": "CE+L2", "label_smoothing": "label smoothing",
           "focal": "focal"}
_ACTS = {"relu": "ReLU", "leaky_relu": "LeakyReLU", "elu": "ELU", "swish": "Swish", "gelu": "GELU",
         "mish": "Mish"}
_OPTS = {"sgd": "SGD (lr 0.01, momentum 0.9)", "sgd_momentum": "SGD+momentum", "adam": "Adam",
         "adamw": "AdamW", "rmsprop": "RMSprop", "adagrad": "Adagrad"}
_SCHEDS = {"constant": "constant (lr 0.001)", "cosine": "cosine annealing", "step": "step",
           "onecycle": "one-cycle"}
_LRS = (1e-4, 5e-4, 1e-3, 2e-3, 5e-3)

VGG_BN_BASELINE = StudyTable(
    name="vgg_bn_baseline",
    study="000",
    title="VGG-A: plain vs BatchNorm",
    context=_ctx(),
    rows=(
        RefRow("plain", {"norm": "none"},
               {"test/err": 26.58, "test/acc": 73.42, "val/best_acc": 75.23, "convergence/epoch": 45,
                "model/params": 9_750_922}),
        RefRow("BN", {"norm": "bn"},
               {"test/err": 12.35, "test/acc": 87.65, "val/best_acc": 88.13, "convergence/epoch": 25,
                "model/params": 9_756_426}, vs="plain"),
    ),
    note="The parameter counts are not study 000's (it reports only that BN adds 0.067%): they are VGG-A's "
         "for 32x32 input, classifier 512-512-512-10, BN after each of its 8 convolutions. Both rows: "
         "constant lr 0.001, the study's \"固定学习率 (0.001)\" run (12.35%).",
    flags=(
        ("Study inconsistency: BN \"+0.067% parameters\" fits no architecture. BN after VGG-A's 8 "
         "convolutions adds 5,504 parameters: +0.0564% on the 32x32 VGG-A (9,750,922), +0.0041% on the "
         "224x224 VGG-A (132,863,336); +0.067% would need a 8.2M-parameter network."),
        ("Study inconsistency: one BN run, three convergence epochs. The BN baseline (12.35%) converges "
         "in 25 epochs (section 2) and, as section 7's constant-lr 0.001 run with the same 12.35%, in 30; "
         "section 8's curves say 15 (and 35 for plain VGG-A, 45 in section 2)."),
    ),
    contrasts=(
        Contrast("model/params", "BN", "plain", 0.067, "BN adds parameters"),
        Contrast("memory/peak_mb", "BN", "plain", 10.7, "BN adds peak memory"),
    ),
)

VGG_LOSSES = StudyTable(
    name="vgg_losses",
    study="000",
    title="VGG-A: five losses, plain and BN",
    context=_ctx(loss=None),
    rows=_norm_by("loss", _LOSSES, [26.58, 27.23, 26.91, 27.45, 26.34], [12.35, 12.89, 12.67, 13.12, 12.28],
                  base="ce"),
    flags=(("Study inconsistency: the text says L2 regularisation slightly improves BN VGG (\"L2 正则化对 "
           "BatchNorm VGG 有轻微改善\"), but its numbers show it worse: 12.67% vs CE 12.35% (BN), 26.91% vs "
           "26.58% (plain)."),),
)

VGG_ACTIVATIONS = StudyTable(
    name="vgg_activations",
    study="000",
    title="VGG-A: six activations, plain and BN",
    context=_ctx(activation=None),
    rows=_norm_by("activation", _ACTS, [26.58, 26.12, 27.34, 25.89, 26.45, 26.78],
                  [19.85, 12.64, 21.13, 14.32, 15.87, 16.45], base="relu"),
    flags=(
        ("Study inconsistency: BN+ReLU here (19.85%) differs from its own BN baseline with the same settings "
        "(12.35%), while plain+ReLU (26.58%) equals the plain baseline."),
        ("Study inconsistency: \"最大差异 7.21%\" (largest difference between activations on BN): its numbers "
        "give 21.13 − 12.64 = 8.49 points (ELU vs LeakyReLU); 7.21 is ReLU − LeakyReLU (19.85 − 12.64)."),
    ),
)

_SGD_REF = {"convergence/epoch": 25, "val/best_acc": 88.95}  # section 5's SGD row reports these too

VGG_OPTIMIZERS = StudyTable(
    name="vgg_optimizers",
    study="000",
    title="VGG-A + BN: six optimizers",
    context=_ctx(norm="bn", lr=None),
    rows=tuple(
        RefRow(f"BN · {text}", {"optimizer": opt, **({"lr": SGD_LR} if opt == "sgd" else {})},
               {"test/err": err, **(_SGD_REF if opt == "sgd" else {})},
               vs=None if opt == "sgd" else f"BN · {_OPTS['sgd']}")
        for (opt, text), err in zip(_OPTS.items(), [11.32, 11.89, 14.89, 18.64, 12.09, 15.23], strict=True)
    ),
)

VGG_DROPOUT = StudyTable(
    name="vgg_dropout",
    study="000",
    title="VGG-A: dropout 0.5, plain and BN",
    context=_ctx(dropout=None),
    rows=(
        RefRow("plain · no dropout", {"norm": "none", "dropout": 0.0}, {"test/err": 26.58}),
        RefRow("plain · dropout 0.5", {"norm": "none", "dropout": 0.5}, {"test/err": 24.73},
               vs="plain · no dropout"),
        RefRow("BN · no dropout", {"norm": "bn", "dropout": 0.0}, {"test/err": 12.35}),
        RefRow("BN · dropout 0.5", {"norm": "bn", "dropout": 0.5}, {"test/err": 11.89}, vs="BN · no dropout"),
    ),
)

VGG_SCHEDULERS = StudyTable(
    name="vgg_schedulers",
    study="000",
    title="VGG-A + BN: four learning-rate schedules",
    context=_ctx(scheduler=None, norm="bn"),
    rows=tuple(
        RefRow(f"BN · {text}", {"scheduler": sched}, {"test/err": err, "convergence/epoch": conv},
               vs=None if sched == "constant" else f"BN · {_SCHEDS['constant']}")
        for (sched, text), err, conv in zip(_SCHEDS.items(), [12.35, 11.87, 12.01, 11.92], [30, 28, 32, 25],
                                            strict=True)
    ),
)

VGG_LR_ROBUSTNESS = StudyTable(
    name="vgg_lr_robustness",
    study="000",
    title="VGG-A: learning-rate robustness (10 epochs per lr), plain vs BN",
    context=_ctx(lr=None),
    rows=tuple(
        RefRow(f"{NORM_LABEL[norm]} · lr {lr:g}", {"norm": norm, "lr": lr}, {},
               vs=None if norm == "none" else f"plain · lr {lr:g}")
        for norm in ("none", "bn") for lr in _LRS
    ),
    note="The study reports no per-lr errors here, only the training-loss range over all five lrs and "
         "the gradient statistics below.",
    mechanism={
        "none": {"loss_range": (0.8, 3.2), "grad_cos": 0.23, "lipschitz": 15.7},
        "bn": {"loss_range": (0.3, 1.8), "grad_cos": 0.67, "lipschitz": 6.3},
    },
)

def _best_row(label: str, ref: float, vs: str | None = "best", **settings: Any) -> RefRow:
    base = {"norm": "bn", "activation": "relu", "loss": "ce", "optimizer": "sgd", "scheduler": "constant",
            "dropout": 0.0, "lr": BASE_LR}
    return RefRow(label, {**base, **settings}, {"test/err": ref}, vs)


VGG_BEST = StudyTable(
    name="vgg_best",
    study="000",
    title="VGG-A: best combination and its parts",
    context=dict(_VGG),
    rows=(
        _best_row("plain baseline", 26.58, norm="none"),
        _best_row("BN + LeakyReLU", 12.64, activation="leaky_relu"),
        _best_row("BN + SGD", 11.32, lr=SGD_LR),
        _best_row("BN + focal", 12.28, loss="focal"),
        _best_row("BN + cosine", 11.87, scheduler="cosine"),
        _best_row("best", 10.95, None, dropout=0.3, activation="leaky_relu", loss="focal", scheduler="cosine",
                  lr=SGD_LR),
    ),
    note="Each part is the row of its own table with that table's settings (constant lr 0.001, except BN + "
         "SGD: lr 0.01); best = BN + dropout 0.3 + LeakyReLU + SGD (lr 0.01, momentum 0.9) + focal loss + "
         "cosine annealing.",
)

_BATCHES = (8, 16, 32, 64)
_NORM_BATCH = {
    "none": (39.14, 77.08, 79.66, 80.49),
    "bn": (77.49, 78.78, 80.66, 81.31),
    "ln": (77.31, 76.97, 79.47, 82.66),
    "gn": (78.55, 81.31, 82.16, 82.36),
}

ALEXNET_NORM_BATCH = StudyTable(
    name="alexnet_norm_batch",
    study="002",
    title="AlexNet: norm x batch size (SGD lr 0.005, momentum 0.9, 10 epochs), test accuracy",
    context={"model": "alexnet", "lr": 0.005},
    rows=tuple(
        RefRow(f"{NORM_LABEL[norm]}{' (4 groups)' if norm == 'gn' else ''} · bs {bs}",
               {"norm": norm, "batch_size": bs}, {"test/acc": acc},
               vs=None if norm == "none" else f"plain · bs {bs}")
        for norm, accs in _NORM_BATCH.items() for bs, acc in zip(_BATCHES, accs, strict=True)
    ),
    primary="test/acc",
    note="GN uses 4 groups; LN is nn.LayerNorm([C,H,W]) (per-element affine). The study trains on all "
         "50,000 training images with the last partial batch kept (782/1563/3125/6250 batches per epoch) and "
         "reports test accuracy only.",
    flags=(
        ("Study inconsistency: the GN bs-64 log is partly copied from the bs-32 log: its epochs 1-2 show "
        "\"Batch [1563/1563]\" (bs 32's count; bs 64 has 782) with bs 32's losses 10.9855 and 6.7723, and "
        "epochs 8-10 repeat one line (loss 0.3133, accuracy 87.50). Its 82.36% is not backed by a log."),
        ("Study inconsistency: the text says GN at bs 8 (78.55%) is \"slightly below the other methods\" "
        "(相较于其他方法略有下降); it is the highest at bs 8 (BN 77.49%, LN 77.31%, plain 39.14%)."),
    ),
    pairs=(
        *((f"{NORM_LABEL[n]}{' (4 groups)' if n == 'gn' else ''} · bs 8",
           f"{NORM_LABEL[n]}{' (4 groups)' if n == 'gn' else ''} · bs 64") for n in _NORM_BATCH),
        ("LN · bs 64", "BN · bs 64"),
        ("GN (4 groups) · bs 8", "BN · bs 8"),
    ),
)

ALEXNET_LR = StudyTable(
    name="alexnet_lr",
    study="002",
    title="AlexNet without norm, batch size 64: learning rate (momentum 0.9, 10 epochs), test accuracy",
    context={"model": "alexnet", "norm": "none", "batch_size": 64},
    rows=tuple(
        RefRow(f"plain · lr {lr:g}", {"lr": lr}, {"test/acc": acc},
               vs=None if lr == 0.005 else "plain · lr 0.005")
        for lr, acc in ((0.001, 62.44), (0.005, 80.91), (0.01, 79.44))
    ),
    primary="test/acc",
    note="The study's lr 0.005 run here (80.91%) and its bs-64 no-norm run in the norm x batch table "
         "(80.49%) share their settings: 0.42 points of run-to-run noise in the study itself.",
)

STUDY_TABLES: tuple[StudyTable, ...] = (
    VGG_BN_BASELINE, VGG_LOSSES, VGG_ACTIVATIONS, VGG_OPTIMIZERS, VGG_DROPOUT, VGG_SCHEDULERS,
    VGG_LR_ROBUSTNESS, VGG_BEST, ALEXNET_NORM_BATCH, ALEXNET_LR,
)
TABLES_BY_NAME = {t.name: t for t in STUDY_TABLES}

