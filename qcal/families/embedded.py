"""The embedded Fashion-MNIST models: qcal's offline default.

gluoncv CIFAR architectures (and a VGG-11-BN of reduced width) trained on Fashion-MNIST by
``scripts/train_fmnist.py`` and shipped under ``weights/fashion-mnist/`` (see its PROVENANCE.md).
Their data defaults to the vendored Fashion-MNIST test split, calibrated on 2,000 images held out
of training, with the preprocessing they were trained with (``qcal.data.fashion_mnist``).
"""
from __future__ import annotations

from pathlib import Path

from qcal.data import fashion_mnist
from qcal.data.preprocessing import Preprocessing
from qcal.families.base import FAMILIES, ModelSpec
from qcal.families.gluon import GluonModel
from qcal.files import REPO_ROOT

EMBEDDED_WEIGHTS_DIR = REPO_ROOT / "weights" / "fashion-mnist"
FMNIST_INPUT_SHAPE = (1, 32, 32)

EMBEDDED_SPECS = {
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
EMBEDDED_MODELS = tuple(EMBEDDED_SPECS)


def embedded_params_path(name: str) -> Path:
    return EMBEDDED_WEIGHTS_DIR / f"{name}.params"


@FAMILIES.register("fashion-mnist")
class EmbeddedModel(GluonModel):
    family = "fashion-mnist"
    naming = "an fmnist_* name listed above (weights shipped; data default to the vendored split)"

    @classmethod
    def claims(cls, name: str) -> bool:
        return name in EMBEDDED_SPECS

    @classmethod
    def spec_of(cls, name: str, params=None) -> ModelSpec:
        return EMBEDDED_SPECS[name]

    @classmethod
    def listed_specs(cls) -> list:
        return list(EMBEDDED_SPECS.values())

    @classmethod
    def weights_note(cls, spec: ModelSpec) -> str:
        return "embedded" if embedded_params_path(spec.name).is_file() else "embedded (missing)"

    def weights_file(self) -> Path:
        return self.params or embedded_params_path(self.spec.name)

    def resolve_params(self) -> Path:
        return self.weights_file()

    def default_preprocessing(self) -> Preprocessing:
        """How they were trained (``qcal.data.fashion_mnist``), for images other than the IDX
        splits (a folder of 28x28 PNGs, calibration photos)."""
        return Preprocessing(input_size=32, resize="none", pad=fashion_mnist.PAD, channels=1,
                             mean=(fashion_mnist.PIXEL_MEAN,), std=(fashion_mnist.PIXEL_STD,))

    def evaluation_source(self, data, preprocessing: Preprocessing):
        """The vendored test split, or the Fashion-MNIST IDX files in the folder ``data``."""
        from qcal.data.sources import FashionMNISTSource

        if data is None:
            return FashionMNISTSource("t10k")
        return FashionMNISTSource("t10k", directory=Path(data))

    def default_calibration_source(self):
        from qcal.data.sources import FashionMNISTSource

        return FashionMNISTSource("calib")

    def build_network(self, classes: int | None = None):
        classes = classes or self.spec.classes
        if self.spec.name == "fmnist_vgg11_bn":
            return _fmnist_vgg11_bn(classes)
        from gluoncv.model_zoo import get_model as gluoncv_get_model

        return gluoncv_get_model(self.spec.name.replace("fmnist_", "cifar_"), classes=classes)


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
