"""The model-family seam: everything that varies with the kind of model, behind one interface.

A *family* is a kind of model qcal can take (a Gluon model-zoo architecture, one of the embedded
Fashion-MNIST models, an ONNX file, ...). ``resolve_model(name)`` asks each registered family in
turn whether it claims the name and returns an instance of that ``ModelFamily`` subclass: one model
of that family, which knows its spec, its weights, its default preprocessing and data, how to
import itself into qcal's float graph, where the statistics pass reads its tensors, and what runs
it in float32. The pipeline asks
its ``ModelFamily``; no code outside ``qcal.families`` tests what kind of model it has.

To add a kind of model: subclass ``ModelFamily`` in a module of this package and register the class
with ``@FAMILIES.register(name)``; ``qcal models`` lists it, the CLI and sweep files accept its
names.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from pathlib import Path

from qcal.data.preprocessing import IMAGENET_PREPROCESSING, Preprocessing
from qcal.errors import UsageProblem
from qcal.files import file_digest
from qcal.registry import Registry

FAMILIES = Registry("model family")
log = logging.getLogger("qcal.families")


@dataclass(frozen=True)
class ModelSpec:
    """What qcal knows about an architecture before it builds one."""

    name: str
    family: str
    input_shape: tuple  # (C, H, W) of one preprocessed image
    classes: int
    description: str


class ModelFamily:
    """The seam. A subclass is a family; an instance is one model of it: a spec plus where its
    weights come from.

    Subclasses implement the hooks below; the base class holds what every family shares.
    """

    family = "abstract"
    naming = ""  # how ``qcal models`` says this family's models are named
    # preprocessing keys a model must have from its own files or from the caller (no default fits)
    required_preprocessing: tuple = ()

    def __init__(self, spec: ModelSpec, params=None, pretrained: bool = False):
        self.spec = spec
        self.params = Path(params) if params else None
        self.pretrained = pretrained

    # --- which names a family takes ---------------------------------------------------------
    @classmethod
    def claims(cls, name: str) -> bool:
        """Whether ``name`` (as given on the command line or in a sweep file) is this family's."""
        raise NotImplementedError

    @classmethod
    def spec_of(cls, name: str, params=None) -> ModelSpec:
        """The spec of ``name`` (with its weights file ``params`` where that tells the shapes)."""
        raise NotImplementedError

    @classmethod
    def listed_specs(cls) -> list:
        """The specs ``qcal models`` lists (families of files, such as ONNX, list none)."""
        return []

    @classmethod
    def weights_note(cls, spec: ModelSpec) -> str:
        """Where ``qcal models`` says the weights of ``spec`` come from."""
        return "in the model file"

    @classmethod
    def canonical_name(cls, name: str, base_dir: Path | None = None) -> str:
        """The name as the pipeline keeps it (files: an existing path, tried as given and then
        relative to ``base_dir``); a ``UsageProblem`` naming the file when it does not exist."""
        return name

    # --- identity -------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def display_name(self) -> str:
        """The model's name in tables."""
        return self.spec.name

    def weights_file(self) -> Path | None:
        """The file the weights are read from (None: MXNet's model store)."""
        return self.params

    @functools.cached_property
    def identity(self) -> dict:
        """What the weights are, read once: a file replaced mid-sweep cannot mislabel results."""
        weights = self.weights_file()
        return {"name": self.spec.name,
                "weights_sha256": file_digest(weights) if weights else "model-store",
                "pretrained": self.pretrained}

    # --- data -------------------------------------------------------------------------------------
    def default_preprocessing(self) -> Preprocessing:
        """What applies where neither the model's files nor the caller say otherwise: ImageNet's,
        at the model's channel count (one channel: the mean of ImageNet's three)."""
        pre, channels = IMAGENET_PREPROCESSING, self.spec.input_shape[0]
        if channels == pre.channels:
            return pre
        return dataclasses.replace(pre, channels=channels,
                                   mean=(sum(pre.mean) / len(pre.mean),) * channels,
                                   std=(sum(pre.std) / len(pre.std),) * channels)

    def declared_preprocessing(self) -> dict:
        """The preprocessing keys the model's own files state (a preprocessing file beside it,
        ONNX metadata, a fixed input size); {} when they state nothing."""
        return {}

    def declaration_source(self) -> str:
        """Where ``declared_preprocessing`` comes from, for messages."""
        return "the model"

    def preprocessing(self, given: dict | None = None) -> Preprocessing:
        """The preprocessing to use: the caller's keys ``given`` over what the model declares over
        the defaults. A given key that contradicts the declaration is used, with a warning; a
        required key that neither states is a ``UsageProblem`` naming the option."""
        from qcal.data.preprocessing import PREPROCESSING_FIELDS, coerce_all

        given = coerce_all({k: v for k, v in (given or {}).items() if v is not None})
        declared = self.declared_preprocessing()
        for key, value in given.items():
            if key in declared and declared[key] != value:
                log.warning("%s: %s %s differs from %s, which %s declares; using %s",
                            self.display_name, key, _show(value), _show(declared[key]),
                            self.declaration_source(), _show(value))
        missing = [f.option for f in PREPROCESSING_FIELDS
                   if f.key in self.required_preprocessing and f.key not in {**declared, **given}]
        if missing:
            raise UsageProblem(f"{self.display_name} does not state its preprocessing: pass "
                               f"{', '.join(missing)} (or save the keys in "
                               f"{self.declaration_source()})")
        return dataclasses.replace(self.default_preprocessing(), **{**declared, **given})

    def input_shape(self, preprocessing: Preprocessing) -> tuple:
        """(C, H, W) the imported graph takes under ``preprocessing``."""
        return tuple(self.spec.input_shape)

    def evaluation_source(self, data, preprocessing: Preprocessing):
        """The evaluation images: ``data`` (a path) opened, or the family's default when None."""
        from qcal.data.sources import open_source

        if data is None:
            raise UsageProblem(f"'{self.display_name}' needs --data (data.data in a sweep config): "
                               f"class folders, a .rec file, an .npz or IDX file")
        return open_source(data, preprocessing)

    def default_calibration_source(self):
        """Calibration images when none are given (None: the tail of the evaluation source)."""
        return None

    # --- the model itself ---------------------------------------------------------------------
    def check_weights(self):
        """Refuse, before any work, weights that cannot be read or do not fit the architecture
        (a ``QcalError`` naming the file and the layer). The default: the weights are in the model
        file that naming the model already read."""

    def import_graph(self, input_shape: tuple):
        """qcal's float ``Graph`` of the model, BatchNorm folded."""
        raise NotImplementedError

    def tensor_source(self, graph):
        """Where the statistics pass reads every tensor's float values."""
        from qcal.calib.sources import GraphInterpreter

        return GraphInterpreter(graph)

    def float_runner(self, graph, batch_size: int):
        """A callable ``images -> logits`` that runs the float32 model."""
        raise NotImplementedError

    def close(self):
        """Drop what the model holds in memory (networks, executors)."""


def _show(value) -> str:
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" for v in value)
    return str(value)


def existing_file(name: str, base_dir: Path | None, what: str) -> str:
    """``name`` as an existing file, tried as given and then relative to ``base_dir`` (resolved
    when ``base_dir`` is given); a ``UsageProblem`` naming it otherwise."""
    for candidate in (Path(name), *([Path(base_dir) / name] if base_dir else [])):
        if candidate.is_file():
            return str(candidate.resolve()) if base_dir else name
    raise UsageProblem(f"{what} not found: {name}")


def resolve_model(name: str, params=None, pretrained: bool = False) -> ModelFamily:
    """The ``ModelFamily`` for ``name``: the first family that claims it."""
    cls = family_of(name)
    return cls(cls.spec_of(str(name), params=params), params=params, pretrained=pretrained)


def family_of(name: str):
    for family in FAMILIES.keys():
        cls = FAMILIES.lookup(family)
        if cls.claims(str(name)):
            return cls
    raise UsageProblem(f"unknown model '{name}'; `qcal models` lists the supported ones")


def canonical_model_name(name: str, base_dir: Path | None = None) -> str:
    """``name`` as the pipeline keeps it, or a ``UsageProblem`` saying why it is not a model."""
    return family_of(name).canonical_name(str(name), base_dir)


def listed_specs() -> list:
    """Every spec ``qcal models`` lists, family by family."""
    return [spec for family in FAMILIES.keys() for spec in FAMILIES.lookup(family).listed_specs()]
