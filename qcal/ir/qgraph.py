"""qcal's integer graph (``QGraph``): what realize produces, and what the numpy integer
interpreter (``qcal.reference``) and the TVM backend (``qcal.backend.tvm``) both run, bit for bit.

Widths. An int8 tensor of b bits (2..8) holds the levels -L..L, L = 2**(b-1) - 1 (``levels``
attribute of its ``quantize`` / ``requantize``; 127 when absent); weights narrower than 8 bits are
int8 constants within +-L. The kernels do not change with the width, only the clips and bounds.

Narrowed intermediates (``intermediate_bits`` B < 32, Relay's ``nbit_activation``): an int32
tensor that one integer op hands to another is requantized to int32 values within +-L,
L = 2**(B-1) - 1: an int32 ``requantize`` with a ``levels`` attribute clips as an int8 one does.

Rounding (``rounding`` attribute, "upward" when absent). ``rshr(v, R)``, the rounding right shift,
is ``(v + (1 << R >> 1)) >> R`` under "upward" (ties towards +inf, Relay's UPWARD) and
``(v + (1 << R >> 1) - 1 + ((v >> R) & 1)) >> R`` for R > 0 under "nearest" (ties to even, Relay's
TONEAREST); both add at most half, so one bound serves both. R = 0 leaves v as it is.

Value model. Every integer tensor ``v`` means the real number ``v * scale``; ``scale`` is a float64
array of shape ``()`` (per tensor) or ``(C,)`` (per channel, axis 1 of the NCHW / NC tensor).
Each integer node also carries ``bound``: a proven upper bound of ``|v|`` (same shape), derived from
int8 ranges, the integer weights and the shifts. The realizer refuses to build an int32 node whose
bound exceeds 2**31 - 1, and where an alignment would overflow it picks a coarser common scale
and records an ``Adjustment`` (never a silent wrap-around). ``int_reference`` checks at run time that
every value respects its bound.

QGraph op set (``QNode.op``). Ops marked "any" work on float32 or integer tensors alike.

=====================  =====================================  ========================================
op                     semantics                              attrs / params
=====================  =====================================  ========================================
input                  float32 image batch                    shape
quantize               f32 -> int8: clip(rint(x * inv), L)    inv_scale (float32 scalar); levels L
dequantize             int -> f32: float32(v) * scale         scale (float32, () or (C,))
requantize             int -> int8/int32, rounding rescale:   kind "shift": lshift, rshift (C,) ints:
                       shift: rshr(v << L, R)                 kind "multiply": multiplier, rshift:
                       multiply: rshr(v * m, R)               (int64 math); compute (int32|int64);
                       then clip +-L when out is int8 or      out dtype in QNode.dtype; levels L;
                       levels is given (a narrowing)          rounding
qconv2d                int8 x int8 -> int32, zero padding     conv attrs of graph.py; weight int8
qdense                 int8 (N, I) x int8 (O, I)^T -> int32   weight int8
qchannel_mul           int8 * int8[c] -> int32                multiplier int8 (C,)
bias_add               int32 + int32[c]                       bias int32 (C,)
qclip                  int: min(max(v, lo[c]), hi[c])         lo, hi int64 (() or (C,))
qsum_pool2d            window sums -> int32 (divisor is in    pool_size, strides, padding
                       the output scale)
qavg_pool2d            rounded mean: (2*sum + n) // (2n),     pool_size, strides, padding; counts
                       a tie made even under "nearest"        int32 (OH, OW); rounding
                       (count_include_pad=False with pads)
qglobal_sum_pool2d     sum over H, W -> int32 (N, C, 1, 1)    -
qadd                   int32 + int32 (operands aligned)       -
relu, max_pool2d,      any: as in graph.py (max-pool pads     as in graph.py
flatten                with the dtype's minimum)
conv2d, dense,         float32 only: graph.py semantics       as in graph.py (float params)
channel_affine, clip,
avg_pool2d,
global_avg_pool2d, add
=====================  =====================================  ========================================
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from qcal.config import ROUNDINGS, QuantOptions
from qcal.errors import QcalError

INT8_MAX = 127
INT32_MAX = 2 ** 31 - 1

FLOAT_ONLY_OPS = frozenset({"conv2d", "dense", "channel_affine", "clip", "avg_pool2d",
                            "global_avg_pool2d", "add"})
ANY_DTYPE_OPS = frozenset({"relu", "max_pool2d", "flatten"})
INT_OPS = frozenset({"quantize", "dequantize", "requantize", "qconv2d", "qdense", "qchannel_mul",
                     "bias_add", "qclip", "qsum_pool2d", "qavg_pool2d", "qglobal_sum_pool2d",
                     "qadd"})
QGRAPH_OPS = frozenset({"input"}) | FLOAT_ONLY_OPS | ANY_DTYPE_OPS | INT_OPS


@dataclass
class QNode:
    name: str
    op: str
    inputs: tuple = ()
    attrs: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    dtype: str = "float32"
    shape: tuple = ()  # one image's shape
    scale: np.ndarray | None = None  # integer nodes: float64, () or (C,)
    bound: np.ndarray | None = None  # integer nodes: int64, () or (C,)

    def __post_init__(self):
        self.inputs = tuple(self.inputs)

    @property
    def is_int(self) -> bool:
        return self.dtype != "float32"


@dataclass(frozen=True)
class Adjustment:
    """An alignment changed to avoid int32 overflow (recorded, never silent)."""

    layer: str
    what: str
    channels: int
    requested: str
    applied: str

    def __str__(self):
        return (f"{self.layer}: {self.what} on {self.channels} channel(s): requested "
                f"{self.requested}, applied {self.applied} (int32 overflow otherwise)")


@dataclass
class QGraph:
    nodes: list
    name: str = "model"
    adjustments: list = field(default_factory=list)
    options: QuantOptions | None = None
    # What quantizing learned or measured on the way, for the results record (AdaRound: its
    # time and per-layer reconstruction errors, ``qcal.quant.adaround.LearnedRounding.record``).
    notes: dict = field(default_factory=dict)

    def __post_init__(self):
        self._index = {n.name: n for n in self.nodes}
        for n in self.nodes:
            if n.op not in QGRAPH_OPS:
                raise QcalError(f"qgraph '{self.name}': unknown op '{n.op}' at '{n.name}'")

    @property
    def input(self) -> QNode:
        return self.nodes[0]

    @property
    def output(self) -> QNode:
        return self.nodes[-1]

    def node(self, name: str) -> QNode:
        return self._index[name]

    def counts(self) -> dict:
        ops = [n.op for n in self.nodes]
        requant = [n for n in self.nodes if n.op == "requantize"]
        narrowed = sum(1 for n in requant if is_narrowing(n))
        counts = {
            "quantize": ops.count("quantize"),
            "requantize": sum(1 for n in requant if n.dtype == "int8"),
            "align": sum(1 for n in requant if n.dtype != "int8" and not is_narrowing(n)),
            "dequantize": ops.count("dequantize"),
            "integer_intermediates": sum(1 for n in self.nodes if n.is_int),
            "float_ops": sum(1 for n in self.nodes if not n.is_int and n.op not in
                             ("input", "dequantize")),
            "overflow_adjustments": len(self.adjustments),
        }
        if narrowed:  # only where intermediate_bits < 32: the counts of exact graphs stay as they were
            counts["narrowed_intermediates"] = narrowed
        return counts

    def report(self) -> list:
        """Human-readable lines: the op counts, then every overflow adjustment."""
        counts = ", ".join(f"{k} {v}" for k, v in self.counts().items())
        return [f"{self.name}: {counts}"] + [f"  {a}" for a in self.adjustments]


def int8_levels(node: QNode) -> int:
    """The largest level L of a ``quantize`` or int8 ``requantize`` node's output (clip to +-L)."""
    return int(node.attrs.get("levels", INT8_MAX))


def is_narrowing(node: QNode) -> bool:
    """An int32 ``requantize`` that clips to B-bit levels (``intermediate_bits`` < 32)."""
    return node.op == "requantize" and node.dtype == "int32" and "levels" in node.attrs


def clip_levels(node: QNode) -> int | None:
    """The level L a ``requantize`` clips its result to (+-L), or None for an exact int32
    rescale (an alignment)."""
    return int8_levels(node) if node.dtype == "int8" or is_narrowing(node) else None


def rounding_of(node: QNode) -> str:
    """How a ``requantize`` or ``qavg_pool2d`` node rounds its ties."""
    return str(node.attrs.get("rounding", ROUNDINGS[0]))


def channels_of(shape) -> int:
    return int(shape[0])


def per_channel(a, channels) -> np.ndarray:
    a = np.asarray(a)
    return np.broadcast_to(a, (channels,)).copy() if a.ndim == 0 else a


def collapse(a) -> np.ndarray:
    """A per-channel array whose entries are all equal becomes a scalar (0-d) array."""
    a = np.asarray(a)
    if a.ndim == 1 and a.size and np.all(a == a[0]):
        return a[0].copy().reshape(())
    return a
