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

from .errors import QcalError, UsageProblem

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
    if str(name).endswith(".onnx"):
        return onnx_spec(Path(name))
    try:
        return MODEL_SPECS[name]
    except KeyError:
        raise UsageProblem(f"unknown model '{name}'; `qcal models` lists the supported "
                           f"ones") from None


def read_onnx(path: Path):
    """(model proto without external data, its metadata_props as a dict)."""
    import onnx

    if not Path(path).is_file():
        raise UsageProblem(f"ONNX model not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise QcalError(f"cannot read ONNX model {path}: {str(exc).splitlines()[0]}") from None
    return model, {p.key: p.value for p in model.metadata_props}


def onnx_preprocessing(path: Path):
    """Input size and normalisation an ONNX classifier states in its ``qcal.*`` metadata.

    ``qcal.mean``/``qcal.std`` are on the 0..255 pixel scale (EfficientNet-Lite0: 127 / 128);
    without them the ImageNet defaults apply and the caller may override them.
    """
    from .datasets import IMAGENET_PREPROCESSING, Preprocessing

    _, meta = read_onnx(path)
    pre = IMAGENET_PREPROCESSING
    if "qcal.mean" in meta and "qcal.std" in meta:
        mean = tuple(float(v) / 255.0 for v in meta["qcal.mean"].split(","))
        std = tuple(float(v) / 255.0 for v in meta["qcal.std"].split(","))
        pre = Preprocessing(input_size=int(meta.get("qcal.input_size", 224)), mean=mean, std=std)
    return pre


def onnx_spec(path: Path) -> ModelSpec:
    model, _ = read_onnx(path)
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise QcalError(f"{path}: qcal handles classifiers with one input and one output")

    def dims(value_info):
        return [d.dim_value if d.HasField("dim_value") else None
                for d in value_info.type.tensor_type.shape.dim]

    in_dims, out_dims = dims(inputs[0]), dims(model.graph.output[0])
    if len(in_dims) != 4 or None in in_dims[1:] or len(out_dims) != 2 or out_dims[1] is None:
        raise QcalError(f"{path}: expected an N x C x H x W input and an N x classes output, "
                        f"found {in_dims} -> {out_dims}")
    return ModelSpec(str(path), "onnx", tuple(in_dims[1:]), out_dims[1],
                     f"ONNX classifier {Path(path).name}")


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


def _resolved_network(name: str):
    """Build ``name`` and run one dummy forward so every parameter has its final shape."""
    import mxnet as mx

    spec = get_spec(name)
    net = build_network(name)
    net.initialize(mx.init.Zero())
    net(mx.nd.zeros((1,) + tuple(spec.input_shape)))
    return net


def check_params_file(net, path: Path):
    """Refuse a parameter file that does not fit ``net``, naming the first layer at fault."""
    import mxnet as mx

    try:
        loaded = mx.nd.load(str(path))
    except Exception as exc:
        raise QcalError(f"cannot read parameter file {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise QcalError(f"{path} holds a list of arrays, not named Gluon parameters")
    expected = {k: v.shape for k, v in net._collect_params_with_prefix().items()}
    got = {k.split(":", 1)[-1]: v.shape for k, v in loaded.items()}
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing:
        raise QcalError(f"{path} does not fit this architecture: layer '{missing[0]}' is missing"
                        f" ({len(missing)} missing in all)")
    if extra:
        raise QcalError(f"{path} does not fit this architecture: it has an unknown layer "
                        f"'{extra[0]}' ({len(extra)} unknown in all)")
    for key, shape in expected.items():
        if tuple(got[key]) != tuple(shape):
            raise QcalError(f"{path} does not fit this architecture: layer '{key}' has shape "
                            f"{tuple(got[key])}, the model needs {tuple(shape)}")


def mxnet_home() -> Path:
    return Path(os.environ.get("MXNET_HOME", Path.home() / ".mxnet"))


def pretrained_params_path(name: str, root: Path | None = None) -> Path:
    """Where MXNet's model store keeps ``name``'s weights (``$MXNET_HOME/models/NAME-HASH.params``)."""
    from mxnet.gluon.model_zoo import model_store

    root = Path(root) if root else mxnet_home() / "models"
    return root / f"{name}-{model_store.short_hash(name)}.params"


def fetch_pretrained(name: str, root: Path | None = None) -> Path:
    """The verified model-store file for ``name``, downloading it once if absent.

    MXNet's own ``get_model_file`` retries five times and then raises a traceback; qcal tries one
    download and otherwise stops with the path it expected and how to supply the weights.
    """
    from mxnet.gluon.model_zoo import model_store
    from mxnet.gluon.utils import check_sha1

    path = pretrained_params_path(name, root)
    if name not in model_store._model_sha1:
        raise QcalError(f"MXNet's model store has no pretrained weights for '{name}'")
    sha1 = model_store._model_sha1[name]
    if path.is_file():
        if check_sha1(str(path), sha1):
            return path
        raise QcalError(f"{path} does not match the model store's checksum (sha1 {sha1}); "
                        f"replace it or pass --params FILE")
    if os.environ.get("QCAL_OFFLINE") != "1":
        import contextlib
        import io
        import zipfile

        from mxnet.gluon.utils import download

        zip_path = path.with_suffix(".zip.part")
        try:
            repo = os.environ.get("MXNET_GLUON_REPO", model_store.apache_repo_url).rstrip("/") + "/"
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.redirect_stdout(io.StringIO()):  # MXNet prints its progress
                download(model_store._url_format.format(repo_url=repo, file_name=path.stem),
                         path=str(zip_path), overwrite=True, retries=1)
            with zipfile.ZipFile(zip_path) as zf:
                zf.extract(path.name, path.parent)
            zip_path.unlink()
            if check_sha1(str(path), sha1):
                return path
            path.unlink()
        except Exception:  # any failure to fetch ends in the one-line error below
            zip_path.unlink(missing_ok=True)
    raise QcalError(f"pretrained weights for '{name}' are not in {path} and cannot be downloaded; "
                    f"put the model-store file there (MXNET_HOME={path.parent.parent}) "
                    f"or pass --params FILE")


def load_model(name: str, params: Path | None = None, pretrained: bool = False):
    """A Gluon network with its weights loaded, ready for inference.

    Embedded models default to their shipped weights; zoo models need ``params`` or
    ``pretrained`` (qcal never evaluates random weights by accident).
    """
    spec = get_spec(name)
    if params and pretrained:
        raise QcalError("give either --params or --pretrained, not both")
    if params is None:
        if pretrained:
            params = fetch_pretrained(name)
        elif spec.embedded_params is not None:
            params = spec.embedded_params
        else:
            raise QcalError(f"'{name}' needs weights: pass --pretrained (MXNet model store) "
                            f"or --params FILE")
    params = Path(params)
    if not params.is_file():
        raise QcalError(f"parameter file not found: {params}")
    net = _resolved_network(name)
    check_params_file(net, params)
    net.load_parameters(str(params))
    return net
