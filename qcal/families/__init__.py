"""Load stage, models: every kind of model qcal takes, behind one seam (``ModelFamily``).

=====================  ==========================================================================
module                 family
=====================  ==========================================================================
``base``               the seam: ``ModelFamily``, ``resolve_model``, the registry of families
``gluon``              what Gluon networks share; the MXNet/Gluon ImageNet model zoo
``embedded``           the shipped Fashion-MNIST models (the offline default)
``onnx``               any ONNX classifier file
``gluon_files``        a researcher's Gluon files: an MXNet export pair, a gluoncv name + .params
``mxnet_internals``    Gluon models' statistics source: MXNet's executor with every tensor an output
=====================  ==========================================================================
"""
from qcal.families import embedded, gluon, gluon_files, onnx  # noqa: F401  (register the families)
from qcal.families.base import (FAMILIES, ModelFamily, ModelSpec, canonical_model_name, family_of,
                                listed_specs, resolve_model)

__all__ = ["FAMILIES", "ModelFamily", "ModelSpec", "canonical_model_name", "family_of", "listed_specs",
           "resolve_model"]
