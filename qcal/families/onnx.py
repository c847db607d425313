"""ONNX classifiers: any ``.onnx`` file with one N x C x H x W image input and one N x classes output.

The file itself is the model (weights included); qcal imports it into its float graph
(``qcal.importer.onnx``) and runs float32 through TVM (the imported graph compiled as it is).
Exporters often leave dimensions symbolic (``mxnet.onnx.export_model(dynamic=True)`` writes
``[None, 3, 32, 32] -> [None, None]``): the batch is always the run's own (qcal imports the graph
per image and compiles it for the run's batch), the class count is what the graph computes, and a
symbolic H x W takes ``--input-size``.

The preprocessing the file declares: a fixed H x W is the input size; ``qcal.*`` metadata
(``qcal.input_size``, ``qcal.mean``/``qcal.std`` on the 0..255 pixel scale: EfficientNet-Lite0
states 127 / 128) and a ``NAME.preprocess.json`` beside the file add to it. Where the file
states no mean/std, the caller must give them (``--mean``/``--std``): ImageNet's are no safe
guess for a model qcal knows nothing about.
"""
from __future__ import annotations

import functools
from pathlib import Path

from qcal.data.preprocessing import Preprocessing, preprocessing_file, read_preprocessing_file
from qcal.errors import QcalError, UsageProblem
from qcal.families.base import FAMILIES, ModelFamily, ModelSpec, existing_file


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


def _dims(value_info):
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in value_info.type.tensor_type.shape.dim]


def onnx_interface(path: Path):
    """(input value info, input dims, output dims) with None for a symbolic dimension."""
    model, _ = read_onnx(path)
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise QcalError(f"{path}: qcal handles classifiers with one input and one output")
    in_dims, out_dims = _dims(inputs[0]), _dims(model.graph.output[0])
    if len(in_dims) != 4 or in_dims[1] is None or len(out_dims) not in (0, 2):
        raise QcalError(f"{path}: expected an N x C x H x W input (C known) and an N x classes "
                        f"output, found {in_dims} -> {out_dims}")
    return model, inputs[0], in_dims, out_dims


def metadata_preprocessing(meta: dict) -> dict:
    """The preprocessing keys of an ONNX file's ``qcal.*`` metadata."""
    keys = {}
    if "qcal.input_size" in meta:
        keys["input_size"] = int(meta["qcal.input_size"])
    for key in ("mean", "std"):
        if f"qcal.{key}" in meta:
            keys[key] = tuple(float(v) / 255.0 for v in meta[f"qcal.{key}"].split(","))
    return keys


@FAMILIES.register("onnx")
class OnnxModel(ModelFamily):
    family = "onnx"
    naming = "a path ending in .onnx (dynamic batch and class dims allowed)"

    @classmethod
    def claims(cls, name: str) -> bool:
        return name.endswith(".onnx")

    @classmethod
    def spec_of(cls, name: str, params=None) -> ModelSpec:
        if params is not None:
            raise UsageProblem(f"{Path(name).name} holds its own weights: --params does not apply")
        _, _, in_dims, out_dims = onnx_interface(Path(name))
        classes = out_dims[1] if len(out_dims) == 2 else None  # None: what the graph computes
        # (C, H, W); a symbolic H or W is None until the preprocessing gives the input size
        return ModelSpec(str(name), "onnx", tuple(in_dims[1:]), classes,
                         f"ONNX classifier {Path(name).name}")

    @classmethod
    def canonical_name(cls, name: str, base_dir: Path | None = None) -> str:
        return existing_file(name, base_dir, "ONNX model")

    @property
    def display_name(self) -> str:
        return Path(self.spec.name).stem

    def weights_file(self) -> Path:
        return Path(self.spec.name)

    @property
    def _fixed_size(self) -> bool:
        return None not in self.spec.input_shape

    @property
    def required_preprocessing(self) -> tuple:
        return ("mean", "std") + (() if self._fixed_size else ("input_size",))

    def declaration_source(self) -> str:
        stem = Path(self.spec.name).with_suffix("")
        return f"{Path(self.spec.name).name}'s metadata or {preprocessing_file(stem).name}"

    def declared_preprocessing(self) -> dict:
        return self._declared

    @functools.cached_property
    def _declared(self) -> dict:
        _, meta = read_onnx(Path(self.spec.name))
        declared = {**metadata_preprocessing(meta),
                    **read_preprocessing_file(preprocessing_file(Path(self.spec.name).with_suffix("")))}
        c, h, w = self.spec.input_shape
        if self._fixed_size and h == w:  # the graph's own input: nothing else can be fed
            declared["input_size"] = h
        return declared

    def input_shape(self, preprocessing: Preprocessing) -> tuple:
        c, h, w = self.spec.input_shape
        if self._fixed_size:
            return (c, h, w)
        return (c, preprocessing.input_size, preprocessing.input_size)

    def import_graph(self, input_shape: tuple):
        from qcal.importer import import_onnx

        return import_onnx(self.spec.name, input_shape=input_shape)

    def float_runner(self, graph, batch_size: int):
        """The imported float graph through TVM (no second runtime to install)."""
        from qcal.backend.tvm.compile import compile_model

        return compile_model(graph, batch_size).run
