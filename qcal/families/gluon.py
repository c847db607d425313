"""Gluon models: what every family of MXNet Gluon networks shares, and the ImageNet model zoo.

A ``GluonModel`` is built by its family (``build_network``), gets its weights from a ``.params``
file that is checked against the architecture first (a misfit names the layer), is imported
through its MXNet symbol graph, runs float32 in MXNet itself (oneDNN), and lets the statistics
pass read its tensors from MXNet's own executor.

``GluonZooModel``: the MXNet/Gluon ImageNet model zoo (``resnet{18..152}_v{1,2}``,
``vgg{11..19}[_bn]``), whose weights come from MXNet's model store (``$MXNET_HOME/models``) or
from ``--params FILE``.
"""
from __future__ import annotations

import os
from pathlib import Path

from qcal.data.preprocessing import Preprocessing
from qcal.errors import QcalError, UsageProblem
from qcal.families.base import FAMILIES, ModelFamily, ModelSpec


class GluonModel(ModelFamily):
    """A Gluon network with a ``.params`` file (subclasses say which architecture and file)."""

    def __init__(self, spec: ModelSpec, params=None, pretrained: bool = False):
        super().__init__(spec, params, pretrained)
        self._net = None

    def build_network(self, classes: int | None = None):
        """An initialised-but-untrained Gluon network (no weights loaded)."""
        raise NotImplementedError

    def resolve_params(self) -> Path:
        """The ``.params`` file to load (``--params``, the model store, or a shipped file)."""
        raise NotImplementedError

    @property
    def net(self):
        """The Gluon network with its weights, loaded once."""
        if self._net is None:
            self._net = self.load()
        return self._net

    def use_network(self, net):
        """Take ``net``, an already built and initialised network of this architecture (random
        weights for benchmarks and tests), instead of loading a weights file."""
        self._net = net
        return self

    def load(self):
        """A Gluon network with its weights loaded, ready for inference."""
        if self.params and self.pretrained:
            raise UsageProblem("give either --params or --pretrained, not both")
        params = Path(self.resolve_params())
        if not params.is_file():
            raise QcalError(f"parameter file not found: {params}")
        net = self.resolved_network()
        check_params_file(net, params)
        net.load_parameters(str(params))
        return net

    def check_weights(self):
        """Load the weights once (``load`` checks them against the architecture), then let go of
        them: a sweep checks every model before it runs the first."""
        self.load()

    def resolved_network(self):
        """The network with every parameter at its final shape (one dummy forward on zeros)."""
        import mxnet as mx

        # a fresh name manager: Gluon names a top-level block by how many of its class this
        # process built before ("resnetv10_", "resnetv11_", ...), and the names reach the graph
        # and its fingerprint; every build is then the first, in any process
        with mx.name.NameManager():
            net = self.build_network()
        net.initialize(mx.init.Zero())
        net(mx.nd.zeros((1,) + tuple(self.spec.input_shape)))
        return net

    def import_graph(self, input_shape: tuple):
        from qcal.importer import import_gluon

        return import_gluon(self.net, input_shape, name=self.spec.name)

    def tensor_source(self, graph):
        from qcal.families.mxnet_internals import MXNetInternals

        if graph.source_tensors:  # the importer recorded each tensor's MXNet output
            return MXNetInternals(graph, self.net)
        return super().tensor_source(graph)

    def float_runner(self, graph, batch_size: int):
        return MXNetFloatRunner(self.net)

    def close(self):
        self._net = None


class MXNetFloatRunner:
    """The float32 reference: the Gluon network itself, run by MXNet (oneDNN)."""

    def __init__(self, net):
        self.net = net
        net.hybridize(static_alloc=True)

    def __call__(self, images):
        import mxnet as mx

        out = self.net(mx.nd.array(images, dtype="float32"))
        return out.asnumpy()


def check_params_file(net, path: Path):
    """Refuse a parameter file that does not fit ``net``, naming the first layer at fault."""
    import mxnet as mx

    try:
        loaded = mx.nd.load(str(path))
    except mx.base.MXNetError:  # its message is MXNet's C++ stack; what it means is simple
        raise QcalError(f"cannot read parameter file {path}: not an MXNet .params file, or "
                        f"truncated") from None
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


# --- the ImageNet model zoo ----------------------------------------------------------------------

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


ZOO_SPECS = _imagenet_zoo_specs()


@FAMILIES.register("imagenet-zoo")
class GluonZooModel(GluonModel):
    family = "imagenet-zoo"
    naming = "a resnet*/vgg* name listed above, with --pretrained (MXNet's model store) or --params"

    @classmethod
    def claims(cls, name: str) -> bool:
        return name in ZOO_SPECS

    @classmethod
    def spec_of(cls, name: str, params=None) -> ModelSpec:
        return ZOO_SPECS[name]

    @classmethod
    def listed_specs(cls) -> list:
        return list(ZOO_SPECS.values())

    @classmethod
    def weights_note(cls, spec: ModelSpec) -> str:
        found = pretrained_params_path(spec.name).is_file()
        return "model store: found" if found else "--pretrained or --params"

    def input_shape(self, preprocessing: Preprocessing) -> tuple:
        """ImageNet models follow ``--input-size``."""
        size = preprocessing.input_size
        return (self.spec.input_shape[0], size, size)

    def build_network(self, classes: int | None = None):
        from mxnet.gluon.model_zoo import vision

        return vision.get_model(self.spec.name, classes=classes or self.spec.classes)

    def resolve_params(self) -> Path:
        """Zoo models need ``params`` or ``pretrained``: qcal never evaluates random weights by
        accident."""
        if self.params is not None:
            return self.params
        if self.pretrained:
            return fetch_pretrained(self.spec.name)
        raise UsageProblem(f"'{self.spec.name}' needs weights: pass --pretrained (MXNet model "
                           f"store) or --params FILE")


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
