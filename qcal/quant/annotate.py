"""Annotate stage: decide which parts of a float ``Graph`` run in integers.

Pipeline position: import -> **annotate** -> calibrate -> realize -> compile. Annotate reads only the
float graph and the ``QuantOptions``; it needs no data. Its answer, an ``Annotation``, says for every
tensor which domain it lives in, and which tensors must be materialised as int8 at their calibrated
scale (so it also names the activation ranges that calibration must supply: ``required_amax``).

Domains of a tensor:
- ``float``: float32 (the input, skipped layers, ops that follow only float tensors);
- ``int8``: symmetric int8 at a calibrated scale, or derived from such a tensor without rescaling
  (ReLU, clip, max-pool and flatten keep int8 as int8);
- ``int32``: an accumulator (conv/dense/channel multiply, bias add, pooling sums, residual adds).

Rules (one handler per op, registered with ``@annotator``; returning ``None`` declines and the op
stays float):
- conv2d / dense are integer unless ``skip_k_conv`` (the first K convs in graph order) or
  ``skip_dense`` keeps them float; their data input must be int8.
- channel_affine (ResNet v2's pre-activation BatchNorm) is integer when its input already is; its
  multiplier is quantized like a weight and its additive constant like a bias. Before the first
  integer op it stays float: there is nothing to gain from quantizing the float image twice.
- relu / clip / pooling / flatten follow their input's domain.
- add is integer when either operand is; a float operand is quantized to int8; an integer operand
  that is quantized to int8 for another consumer is read as that int8 value (one quantized value
  per tensor), any other integer operand keeps its int32 value.
- ``quantize_ops`` (when set) keeps every op type it does not name float, and ``float_layers``
  every layer it names, before any of the rules above is asked.

A tensor that several consumers need as int8 (the two branches of a residual block) is quantized
ONCE and shared; likewise one dequantize serves every float consumer.

Widths. Every integer conv/dense/channel multiply gets its weight width, and every tensor
materialised as int8 its activation width (``weight_bits`` / ``activation_bits``), except the
network's first and last conv/dense (graph order) when ``first_layer_bits`` / ``last_layer_bits``
are set: those apply to the layer's weights and to its int8 input. A tensor read as int8 by
several layers gets the widest width any of them asks for (one quantized value per tensor);
a tensor that is int8 by derivation (ReLU or max-pool of an int8 tensor) passes the request on to
the tensor it derives from.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from qcal.config import QUANTIZABLE_OPS, QuantOptions
from qcal.errors import UsageProblem
from qcal.ir.graph import Graph, Node
from qcal.registry import Registry

FLOAT, INT8, INT32 = "float", "int8", "int32"


@dataclass(frozen=True)
class OpDecision:
    """An integer decision for one node: its output domain and which inputs it needs as int8."""

    domain: str
    int8_inputs: tuple = ()


@dataclass
class _Context:
    options: QuantOptions
    domain: dict  # tensor name -> domain, filled in graph order
    conv_index: dict  # conv node name -> position among convs (graph order)

    def is_int(self, tensor: str) -> bool:
        return self.domain[tensor] != FLOAT


# handlers ``f(node, ctx) -> OpDecision | None`` per float op
ANNOTATORS = Registry("op", "is not one qcal can quantize")
annotator = ANNOTATORS.register


@annotator("conv2d")
def _conv2d(node: Node, ctx: _Context):
    if ctx.conv_index[node.name] < ctx.options.skip_k_conv:
        return None
    return OpDecision(INT32, (node.inputs[0],))


@annotator("dense")
def _dense(node: Node, ctx: _Context):
    if ctx.options.skip_dense:
        return None
    return OpDecision(INT32, (node.inputs[0],))


@annotator("channel_affine")
def _channel_affine(node: Node, ctx: _Context):
    if not ctx.is_int(node.inputs[0]):
        return None
    return OpDecision(INT32, (node.inputs[0],))


@annotator("relu", "clip", "max_pool2d", "flatten")
def _same_domain(node: Node, ctx: _Context):
    if not ctx.is_int(node.inputs[0]):
        return None
    return OpDecision(ctx.domain[node.inputs[0]])


@annotator("avg_pool2d", "global_avg_pool2d")
def _pool_sum(node: Node, ctx: _Context):
    if not ctx.is_int(node.inputs[0]):
        return None
    return OpDecision(INT32)


@annotator("add")
def _add(node: Node, ctx: _Context):
    if not any(ctx.is_int(i) for i in node.inputs):
        return None
    return OpDecision(INT32, tuple(i for i in node.inputs if not ctx.is_int(i)))


assert set(ANNOTATORS) == set(QUANTIZABLE_OPS), "annotators out of step with qcal.config"


@dataclass
class Annotation:
    """Which tensors are integer, and where the domain conversions go."""

    graph: Graph
    options: QuantOptions
    domain: dict  # tensor -> float | int8 | int32
    decisions: dict  # node name -> OpDecision (integer nodes only)
    int8_needed: list = field(default_factory=list)  # tensors some consumer needs as int8, ordered
    float_needed: list = field(default_factory=list)  # integer tensors some float op (or the output) reads
    activation_bits: dict = field(default_factory=dict)  # int8_needed tensor -> width
    weight_bits: dict = field(default_factory=dict)  # integer weighted node -> width

    def is_integer(self, name: str) -> bool:
        return name in self.decisions

    @property
    def quantize_points(self) -> list:
        """Float tensors converted to int8 (one ``quantize`` each)."""
        return [t for t in self.int8_needed if self.domain[t] == FLOAT]

    @property
    def requantize_points(self) -> list:
        """int32 tensors converted to int8 (one ``requantize`` each)."""
        return [t for t in self.int8_needed if self.domain[t] == INT32]

    @property
    def int32_tensors(self) -> list:
        """Tensors held in int32 (what ``intermediate_bits`` < 32 may narrow)."""
        return [t for t, d in self.domain.items() if d == INT32]

    @property
    def required_amax(self) -> list:
        """Tensors whose calibrated range the realizer needs (int8 tensors derived from another
        int8 tensor inherit its scale)."""
        return self.quantize_points + self.requantize_points

    def counts(self) -> dict:
        return {
            "quantize": len(self.quantize_points),
            "requantize": len(self.requantize_points),
            "dequantize": len(self.float_needed),
            "integer_ops": len(self.decisions),
            "integer_intermediates": sum(1 for d in self.domain.values() if d != FLOAT),
            "float_ops": len(self.graph.nodes) - 1 - len(self.decisions),
        }


def check_layer_names(graph: Graph, options: QuantOptions):
    """Refuse a ``float_layers`` or ``layer_bias_bits`` name the graph does not have (or, for a
    bias precision, a layer without a bias), naming it."""
    names = {n.name for n in graph.nodes if n.op != "input"}
    shown = ", ".join([n.name for n in graph.nodes if n.op in ("conv2d", "dense")][:4])
    for what, asked in (("float_layers", options.float_layers),
                        ("layer_bias_bits", [name for name, _ in options.layer_bias_bits])):
        unknown = [n for n in asked if n not in names]
        if unknown:
            raise UsageProblem(f"{what}: model '{graph.name}' has no layer "
                               f"{', '.join(repr(n) for n in unknown)} (its layers are named "
                               f"like {shown}; layers.csv lists them)")
    unbiased = [name for name, _ in options.layer_bias_bits if not has_bias(graph.node(name))]
    if unbiased:
        raise UsageProblem(f"layer_bias_bits: layer {', '.join(repr(n) for n in unbiased)} of "
                           f"model '{graph.name}' has no bias")


def has_bias(node: Node) -> bool:
    """Whether a layer adds a constant that is quantized as a bias (a conv's or dense's bias, a
    channel_affine's shift)."""
    return "bias" in node.params or (node.op == "channel_affine" and "shift" in node.params)


def annotate(graph: Graph, options: QuantOptions) -> Annotation:
    check_layer_names(graph, options)
    enabled = set(options.quantize_ops or QUANTIZABLE_OPS)
    kept_float = set(options.float_layers)
    convs = [n.name for n in graph.nodes if n.op == "conv2d"]
    ctx = _Context(options, {}, {name: i for i, name in enumerate(convs)})
    decisions = {}
    int8_needed, float_needed = [], []

    def need(lst, tensor):
        if tensor not in lst:
            lst.append(tensor)

    for node in graph.nodes:
        if node.op == "input":
            ctx.domain[node.name] = FLOAT
            continue
        handler = ANNOTATORS.lookup(node.op, layer=node.name)
        chosen = node.op in enabled and node.name not in kept_float
        decision = handler(node, ctx) if chosen else None
        if decision is None:
            ctx.domain[node.name] = FLOAT
            for i in node.inputs:
                if ctx.is_int(i):
                    need(float_needed, i)
            continue
        decisions[node.name] = decision
        ctx.domain[node.name] = decision.domain
        for i in decision.int8_inputs:
            if ctx.domain[i] != INT8:
                need(int8_needed, i)
    if ctx.is_int(graph.output.name):
        need(float_needed, graph.output.name)
    activation_bits, weight_bits = _widths(graph, options, ctx.domain, decisions, int8_needed)
    return Annotation(graph, options, ctx.domain, decisions, int8_needed, float_needed,
                      activation_bits, weight_bits)


WEIGHTED_OPS = ("conv2d", "dense", "channel_affine")


def _widths(graph: Graph, options: QuantOptions, domain: dict, decisions: dict, int8_needed: list):
    """(activation width per int8_needed tensor, weight width per integer weighted node)."""
    layers = [n.name for n in graph.nodes if n.op in ("conv2d", "dense")]
    position = {}
    if layers:
        position[layers[-1]] = "last"
        position[layers[0]] = "first"  # a one-layer network: its first layer's width wins
    nodes = {n.name: n for n in graph.nodes}

    def root(tensor):
        while domain[tensor] == INT8:
            tensor = nodes[tensor].inputs[0]
        return tensor

    activation_bits, weight_bits = {}, {}
    for node in graph.nodes:
        if node.name not in decisions:
            continue
        w_bits, a_bits = options.layer_bits(position.get(node.name))
        if node.op in WEIGHTED_OPS:
            weight_bits[node.name] = w_bits
        for tensor in map(root, decisions[node.name].int8_inputs):
            activation_bits[tensor] = max(activation_bits.get(tensor, 0), a_bits)
    return {t: activation_bits[t] for t in int8_needed}, weight_bits
