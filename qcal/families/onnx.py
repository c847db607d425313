"""ONNX classifiers: any ``.onnx`` file with one N x C x H x W image input and one N x classes output.

The file itself is the model (weights included); qcal imports it into its float graph
(``qcal.importer.onnx``) and runs float32 through TVM (the imported graph compiled as it is). The
preprocessing comes from the file's ``qcal.*`` metadata where present, else ImageNet's defaults
(which the caller may override).
"""
from __future__ import annotations

from pathlib import Path

from qcal.data.preprocessing import IMAGENET_PREPROCESSING, Preprocessing
from qcal.errors import QcalError, UsageProblem
from qcal.families.base import FAMILIES, ModelFamily, ModelSpec


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


def onnx_preprocessing(path: Path) -> Preprocessing:
    """Input size and normalisation an ONNX classifier states in its ``qcal.*`` metadata.

    ``qcal.mean``/``qcal.std`` are on the 0..255 pixel scale (EfficientNet-Lite0: 127 / 128);
    without them the ImageNet defaults apply and the caller may override them.
    """
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


@FAMILIES.register("onnx")
class OnnxModel(ModelFamily):
    family = "onnx"

    @classmethod
    def claims(cls, name: str) -> bool:
        return name.endswith(".onnx")

    @classmethod
    def spec_of(cls, name: str) -> ModelSpec:
        return onnx_spec(Path(name))

    @classmethod
    def canonical_name(cls, name: str, base_dir: Path | None = None) -> str:
        for candidate in (Path(name), *([Path(base_dir) / name] if base_dir else [])):
            if candidate.is_file():
                return str(candidate.resolve()) if base_dir else name
        raise UsageProblem(f"ONNX model not found: {name}")

    @property
    def display_name(self) -> str:
        return Path(self.spec.name).stem

    def weights_file(self) -> Path:
        return Path(self.spec.name)

    def default_preprocessing(self) -> Preprocessing:
        return onnx_preprocessing(Path(self.spec.name))

    def import_graph(self, input_shape: tuple):
        from qcal.importer import import_onnx

        return import_onnx(self.spec.name)

    def float_runner(self, graph, batch_size: int):
        """The imported float graph through TVM (no second runtime to install)."""
        from qcal.backend.tvm.compile import compile_model

        return compile_model(graph, batch_size).run
