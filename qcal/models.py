"""Load stage, models: which architectures qcal knows and how their weights are found.

Two families:
- the MXNet/Gluon ImageNet model zoo (``resnet{18..152}_v{1,2}``, ``vgg{11..19}[_bn]``), whose
  weights come from MXNet's model store (``$MXNET_HOME/models``) or from ``--params FILE``;
- the embedded Fashion-MNIST models: gluoncv CIFAR architectures (and a VGG-11-BN of reduced
  width) trained by ``scripts/train_fmnist.py``, shipped under ``weights/fashion-mnist/``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import QcalError

REPO_ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_WEIGHTS_DIR = REPO_ROOT / "weights" / "fashion-mnist"


@dataclass(frozen=True)
class ModelSpec:
    """What qcal needs to know about an architecture before it builds one."""

    name: str
    family: str  # "imagenet-zoo" or "fashion-mnist"
    input_shape: tuple  # (C, H, W) of one preprocessed image
    classes: int
    description: str

    @property
    def embedded_params(self) -> Path | None:
        if self.family != "fashion-mnist":
            return None
        return EMBEDDED_WEIGHTS_DIR / f"{self.name}.params"


def _imagenet_zoo_specs():
    specs = {}
    for depth in (18, 34, 50, 101, 152):
        for version in (1, 2):
            name = f"resnet{depth}_v{version}"
            specs[name] = ModelSpec(name, "imagenet-zoo", (3, 224, 224), 1000,
                                    f"Gluon model zoo ResNet-{depth} v{version} (ImageNet)")
    for depth in (11, 13, 16, 19):
        for suffix, what in (("", ""), ("_bn", " with batch norm")):
            name = f"vgg{depth}{suffix}"
            specs[name] = ModelSpec(name, "imagenet-zoo", (3, 224, 224), 1000,
                                    f"Gluon model zoo VGG-{depth}{what} (ImageNet)")
    return specs


FMNIST_INPUT_SHAPE = (1, 32, 32)

_FMNIST_SPECS = {
    "fmnist_resnet20_v1": ModelSpec(
        "fmnist_resnet20_v1", "fashion-mnist", FMNIST_INPUT_SHAPE, 10,
        "gluoncv cifar_resnet20_v1 trained on Fashion-MNIST (embedded)"),
    "fmnist_resnet56_v2": ModelSpec(
        "fmnist_resnet56_v2", "fashion-mnist", FMNIST_INPUT_SHAPE, 10,
        "gluoncv cifar_resnet56_v2 trained on Fashion-MNIST (embedded)"),
    "fmnist_vgg11_bn": ModelSpec(
        "fmnist_vgg11_bn", "fashion-mnist", FMNIST_INPUT_SHAPE, 10,
        "Gluon VGG-11 with batch norm, widths /2 and 256-wide classifier, trained on "
        "Fashion-MNIST (embedded)"),
}

MODEL_SPECS = {**_imagenet_zoo_specs(), **_FMNIST_SPECS}
EMBEDDED_MODELS = tuple(_FMNIST_SPECS)


def get_spec(name: str) -> ModelSpec:
    try:
        return MODEL_SPECS[name]
    except KeyError:
        raise QcalError(f"unknown model '{name}'; `qcal models` lists the supported ones") from None


def _fmnist_vgg11_bn(classes):
    """VGG-11-BN as in Gluon's model zoo, with widths halved and a 256-wide classifier.

    The zoo class hard-codes two 4096-wide dense layers (67 MB of weights on a 1x1 feature map);
    everything else (conv/BN/ReLU/max-pool plan, initialisers) is the zoo's own code.
    """
    from mxnet.gluon import nn
    from mxnet.gluon.model_zoo.vision.vgg import VGG

    class FashionVGG(VGG):
        def __init__(self, layers, filters, classes, **kwargs):
            nn.HybridBlock.__init__(self, **kwargs)
            with self.name_scope():
                self.features = self._make_features(layers, filters, batch_norm=True)
                for _ in range(2):
                    self.features.add(nn.Dense(256, activation="relu"))
                    self.features.add(nn.Dropout(rate=0.3))
                self.output = nn.Dense(classes)

    return FashionVGG([1, 1, 2, 2, 2], [32, 64, 128, 256, 256], classes, prefix="vgg0_")


def build_network(name: str, classes: int | None = None):
    """An initialised-but-untrained Gluon network for ``name`` (no weights loaded)."""
    spec = get_spec(name)
    classes = classes or spec.classes
    if name == "fmnist_vgg11_bn":
        return _fmnist_vgg11_bn(classes)
    if spec.family == "fashion-mnist":
        from gluoncv.model_zoo import get_model as gluoncv_get_model

        return gluoncv_get_model(name.replace("fmnist_", "cifar_"), classes=classes)
    from mxnet.gluon.model_zoo import vision

    return vision.get_model(name, classes=classes)
