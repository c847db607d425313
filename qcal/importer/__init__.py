"""Import stage: a Gluon network or an ONNX classifier becomes a ``qcal.ir.graph.Graph``.

This is the first stage of the pipeline (import -> annotate -> calibrate -> realize -> compile);
everything after it reads only the ``Graph``.

Gluon networks are imported by walking their exported MXNet symbol graph (JSON nodes plus the
parameter arrays) rather than by exporting to ONNX first, because
- the MXNet layer names (``resnetv20_stage1_conv0_fwd``) survive unchanged into qcal's reports,
  calibration files and ``--skip-k-conv`` counting, where ONNX export renames or drops some
  (unnamed Conv/Pool nodes, ``*_data_flattened`` helpers);
- BatchNorm is folded here, in float64 and with MXNet's exact semantics (``fix_gamma``, ``eps``),
  instead of trusting an exporter's translation of them;
- ``mxnet.onnx`` needs ``onnx<=1.15`` and an opset choice: a direct importer has no version pin;
- one small IR is shared by the numpy float/integer references and the TVM emitter, so a
  Gluon model and an ONNX file go through exactly the same later stages.
ONNX files (``import_onnx``) are still supported for models that do not come from Gluon.

Both importers translate each source op into a few nodes of an intermediate op set: the float op
set of ``qcal.ir.graph`` plus ``affine`` (a per-channel ``x * scale + shift`` in float64: BatchNorm,
or an ONNX Add/Mul by a constant) and ``identity`` (Dropout, Identity, a no-op reshape). Two
shared passes then remove identities and fold each ``affine`` into the conv/dense before it when
that conv/dense has no other consumer; an ``affine`` that cannot fold (ResNet v2's pre-activation
BatchNorm, the input BatchNorm) becomes a ``channel_affine`` node. Shapes are tracked while
translating, because pooling conventions, global max pooling and "flatten before dense" depend on
them; ``infer_shapes`` exposes the same shape rules for a finished graph.
"""
from qcal.importer.mxnet_symbol import import_gluon, import_mxnet_symbol
from qcal.importer.onnx import import_onnx

__all__ = ["import_gluon", "import_mxnet_symbol", "import_onnx"]
