"""Gluon networks a researcher brings as files: an MXNet export, or a gluoncv architecture by name.

``ExportedGluonModel``: ``NAME-symbol.json`` + ``NAME-0000.params``, what ``HybridBlock.export``
writes (the ``SymbolBlock`` format). The symbol is the architecture; qcal imports it directly and
runs float32 through MXNet's ``SymbolBlock.imports`` of the same pair. The pair does not record
its input size or normalisation: they come from ``NAME.preprocess.json`` beside the symbol file,
or from the caller (``--input-size``, ``--mean``, ``--std``). Input channels and classes are read
from the weights (MXNet's shape inference over the symbol).

``GluoncvZooModel``: any classifier of ``gluoncv.model_zoo`` by name (``cifar_resnet20_v2``,
``resnet50_v1b``, ...), with the user's ``--params FILE`` (``save_parameters``). The class count
and input channels follow the file (its output layer, its first convolution), so a CIFAR net
trained on 10 grey classes loads as it was saved; a ``FILE``'s ``.preprocess.json`` beside it
declares the preprocessing.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

from qcal.data.preprocessing import Preprocessing, preprocessing_file, read_preprocessing_file
from qcal.errors import QcalError, UsageProblem
from qcal.families.base import FAMILIES, ModelSpec, existing_file
from qcal.families.gluon import GluonModel

SYMBOL_SUFFIX = "-symbol.json"
EPOCH_PARAMS = re.compile(r"-\d{4}\.params$")  # HybridBlock.export's NAME-EPOCH.params


def params_stem(path: Path) -> Path:
    """``NAME`` of ``NAME-0000.params`` or ``NAME.params``: where its preprocessing file sits."""
    text = EPOCH_PARAMS.sub("", str(path))
    return Path(text[:-len(".params")] if text.endswith(".params") else text)


def load_params(path: Path) -> dict:
    """name (``arg:``/``aux:`` prefixes dropped) -> NDArray of a ``.params`` file."""
    import mxnet as mx

    try:
        loaded = mx.nd.load(str(path))
    except Exception as exc:
        raise QcalError(f"cannot read parameter file {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise QcalError(f"{path} holds a list of arrays, not named Gluon parameters")
    return {k.split(":", 1)[-1]: v for k, v in loaded.items()}


# --- NAME-symbol.json + NAME-0000.params ------------------------------------------------------

def exported_params(symbol_path: Path) -> Path:
    """The weights ``HybridBlock.export`` wrote beside ``NAME-symbol.json``: the one
    ``NAME-NNNN.params`` there."""
    stem = str(symbol_path)[:-len(SYMBOL_SUFFIX)]
    found = sorted(Path(stem).parent.glob(f"{Path(stem).name}-[0-9][0-9][0-9][0-9].params"))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise UsageProblem(f"{Path(symbol_path).name} needs its weights: {what} "
                           f"{Path(stem).name}-NNNN.params beside it; pass --params FILE")
    return found[0]


def read_symbol(symbol_path: Path):
    import mxnet as mx

    try:
        return mx.sym.load(str(symbol_path))
    except Exception as exc:
        raise QcalError(f"cannot read MXNet symbol file {symbol_path}: "
                        f"{str(exc).splitlines()[0]}") from None


def symbol_interface(symbol_path: Path, params_path: Path, sizes=(32, 224)):
    """(image input name, input channels, classes) of an exported network, by MXNet's shape
    inference with the weights' shapes (channels and sizes tried in turn: the pair records none)."""
    symbol = read_symbol(symbol_path)
    params = load_params(params_path)
    known = set(symbol.list_arguments()) | set(symbol.list_auxiliary_states())
    inputs = [a for a in symbol.list_arguments() if a not in params]
    if len(inputs) != 1:
        raise QcalError(f"{params_path} does not fit {Path(symbol_path).name}: the symbol's "
                        f"inputs {', '.join(inputs) or 'none'} are not one image input "
                        f"(are weights missing?)")
    unknown = sorted(set(params) - known)
    if unknown:
        raise QcalError(f"{params_path} does not fit {Path(symbol_path).name}: it has an unknown "
                        f"layer '{unknown[0]}' ({len(unknown)} unknown in all)")
    shapes = {k: v.shape for k, v in params.items()}
    first_conv = next((s for k in symbol.list_arguments() if len(shapes.get(k, ())) == 4
                       for s in [shapes[k]]), None)
    channels = [c for c in dict.fromkeys([first_conv[1] if first_conv else 3, 3, 1])]
    for size in sizes:
        for c in channels:
            try:
                _, out, _ = symbol.infer_shape(**{inputs[0]: (1, c, size, size)}, **shapes)
            except Exception:  # MXNetError: this guess does not fit the weights; try the next
                continue
            if len(out) == 1 and len(out[0]) == 2:
                return inputs[0], c, int(out[0][1])
    raise QcalError(f"{params_path} does not fit {Path(symbol_path).name}, or its output is not "
                    f"N x classes, for any input of {'/'.join(map(str, channels))} channels at "
                    f"{'/'.join(map(str, sizes))} pixels")


@FAMILIES.register("mxnet-export")
class ExportedGluonModel(GluonModel):
    family = "mxnet-export"
    naming = (f"NAME{SYMBOL_SUFFIX} (HybridBlock.export), with --params NAME-0000.params or the "
              f"one NAME-NNNN.params beside it")
    required_preprocessing = ("input_size", "mean", "std")

    def __init__(self, spec: ModelSpec, params=None, pretrained: bool = False):
        if pretrained:
            raise UsageProblem(f"{Path(spec.name).name} is a model file: --pretrained does not apply")
        super().__init__(spec, params or exported_params(Path(spec.name)), pretrained)

    @classmethod
    def claims(cls, name: str) -> bool:
        return name.endswith(SYMBOL_SUFFIX)

    @classmethod
    def canonical_name(cls, name: str, base_dir: Path | None = None) -> str:
        return existing_file(name, base_dir, "MXNet symbol file")

    @classmethod
    def spec_of(cls, name: str, params=None) -> ModelSpec:
        path = Path(name)
        if not path.is_file():
            raise UsageProblem(f"MXNet symbol file not found: {name}")
        params = Path(params) if params else exported_params(path)
        declared = read_preprocessing_file(preprocessing_file(cls._stem(path)))
        sizes = (declared["input_size"],) if "input_size" in declared else (32, 224)
        _, channels, classes = symbol_interface(path, params, sizes)
        return ModelSpec(str(name), "mxnet-export", (channels, None, None), classes,
                         f"MXNet export {path.name}")

    @staticmethod
    def _stem(path: Path) -> Path:
        return Path(str(path)[:-len(SYMBOL_SUFFIX)])

    @property
    def display_name(self) -> str:
        return self._stem(Path(self.spec.name)).name

    def declaration_source(self) -> str:
        return preprocessing_file(self._stem(Path(self.spec.name))).name

    @functools.cached_property
    def _declared(self) -> dict:
        return read_preprocessing_file(preprocessing_file(self._stem(Path(self.spec.name))))

    def declared_preprocessing(self) -> dict:
        return self._declared

    def input_shape(self, preprocessing: Preprocessing) -> tuple:
        return (self.spec.input_shape[0], preprocessing.input_size, preprocessing.input_size)

    def resolve_params(self) -> Path:
        return self.params

    def load(self):
        import mxnet as mx

        if not self.params.is_file():
            raise QcalError(f"parameter file not found: {self.params}")
        name, _, _ = symbol_interface(Path(self.spec.name), self.params,
                                      (self._declared.get("input_size", 32), 224))
        try:
            return mx.gluon.SymbolBlock.imports(self.spec.name, [name], str(self.params))
        except Exception as exc:  # MXNetError / AssertionError: the pair does not fit
            raise QcalError(f"{self.params} does not fit {Path(self.spec.name).name}: "
                            f"{str(exc).splitlines()[0]}") from None

    def import_graph(self, input_shape: tuple):
        from qcal.importer import import_mxnet_symbol

        symbol = Path(self.spec.name).read_text()
        return import_mxnet_symbol(symbol, load_params(self.params), input_shape,
                                   name=self.display_name)


# --- gluoncv model-zoo names ----------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def gluoncv_names() -> frozenset:
    from gluoncv.model_zoo import model_zoo

    return frozenset(model_zoo._models)


def params_interface(path: Path):
    """(input channels, classes) a saved Gluon classifier's file implies: the first
    convolution's input channels and the last layer's outputs (checked against the architecture
    when the network is built: a wrong guess names the misfit)."""
    arrays = list(load_params(path).values())
    conv = next((a for a in arrays if a.ndim == 4), None)
    last = next((a for a in reversed(arrays) if a.ndim >= 2), None)
    if conv is None or last is None:
        raise QcalError(f"{path} has no convolution or no output layer: not a saved classifier")
    return int(conv.shape[1]), int(last.shape[0])


@FAMILIES.register("gluoncv-zoo")
class GluoncvZooModel(GluonModel):
    family = "gluoncv-zoo"
    naming = ("a gluoncv.model_zoo classifier name (cifar_resnet20_v2, resnet50_v1b, ...) with "
              "--params FILE (save_parameters); classes and channels follow the file")
    required_preprocessing = ("mean", "std")

    @classmethod
    def claims(cls, name: str) -> bool:
        # a path is never a zoo name: asking gluoncv would load MXNet for every ONNX file
        return not any(c in name for c in "./\\") and name in gluoncv_names()

    @classmethod
    def spec_of(cls, name: str, params=None) -> ModelSpec:
        size = 32 if name.startswith("cifar_") else 224
        channels, classes = (3, 10 if size == 32 else 1000)
        if params is not None:
            channels, classes = params_interface(Path(params))
        return ModelSpec(name, "gluoncv-zoo", (channels, size, size), classes,
                         f"gluoncv {name}")

    @classmethod
    def weights_note(cls, spec: ModelSpec) -> str:
        return "--params"

    def declaration_source(self) -> str:
        return preprocessing_file(params_stem(self.params)).name if self.params else "--params"

    @functools.cached_property
    def _declared(self) -> dict:
        if self.params is None:
            return {}
        return read_preprocessing_file(preprocessing_file(params_stem(self.params)))

    def declared_preprocessing(self) -> dict:
        return self._declared

    def default_preprocessing(self) -> Preprocessing:
        import dataclasses

        return dataclasses.replace(super().default_preprocessing(),
                                   input_size=self.spec.input_shape[1])

    def input_shape(self, preprocessing: Preprocessing) -> tuple:
        return (self.spec.input_shape[0], preprocessing.input_size, preprocessing.input_size)

    def build_network(self, classes: int | None = None):
        from gluoncv.model_zoo import get_model

        return get_model(self.spec.name, classes=classes or self.spec.classes)

    def resolve_params(self) -> Path:
        if self.pretrained:
            raise UsageProblem(f"gluoncv's pretrained weights need a download; pass --params "
                               f"FILE for '{self.spec.name}'")
        if self.params is None:
            raise UsageProblem(f"'{self.spec.name}' needs weights: pass --params FILE")
        return self.params
