"""Quantize stage, AdaRound: learn for each conv/dense weight whether it rounds up or down.

Nagel, Amjad, van Baalen, Louizos and Blankevoort, "Up or Down? Adaptive Rounding for Post-Training
Quantization", ICML 2020 (arXiv:2004.10568). Rounding every weight to its nearest level minimises
each weight's own error, not the layer's output error; at 4 bits the difference decides whether a
network still works. AdaRound keeps the realizer's scale and levels and learns only the direction
of each rounding, layer by layer, on calibration images:

- W~ = s * clip(floor(W / s) + h(V), -L, L), with the paper's rectified sigmoid
  h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1), zeta = 1.1, gamma = -0.1; V starts where
  h(V) is the fractional part of W / s (so training starts from the unrounded weights);
- loss = ||f(W~ x~ + b) - f(W x + b)||^2 (summed over output channels, averaged over images and
  positions) + lambda * sum(1 - |2 h(V) - 1|^beta), lambda = 0.01; the regulariser is off for the
  first 20 % of the iterations, then beta falls linearly from 20 to 2, which pushes every h(V) to
  0 or 1;
- input variant: x~ is the layer's input in the quantized network, the earlier layers already
  rounded as learned (the paper's asymmetric reconstruction, its eq. 25, which it found better than
  reconstructing from the float input); x is the float network's input, and f the ReLU or clip
  (ReLU6) that is the layer's only consumer, else the identity (the paper's eq. 25 includes the
  activation function);
- Adam (learning rate 1e-3) on batches of 32 of the first ``adaround_images`` calibration images,
  drawn with a fixed seed, for ``adaround_iterations`` steps per layer;
- then a weight rounds up where h(V) >= 0.5 (V >= 0). ``realize`` applies these directions
  (``quantize_weight(round_up=...)``): the weights then pass through the same integer pipeline,
  overflow proofs and checks as nearest-rounded ones.

x~ is computed by the fake-quantized model of the integer graph (``qcal.reference.int_interpreter``'s
simulated semantics) with the nearest-rounded graph's scales and shifts; the float targets by the
float interpreter. The gradient comes from MXNet's autograd over its own Convolution and
FullyConnected ops (qcal's graph ops are the same for every kind of model, so this serves Gluon and
ONNX models alike). Channel multipliers (``channel_affine``) keep nearest rounding.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np

from qcal.errors import UsageProblem
from qcal.ir.graph import Graph
from qcal.quant.fixed_point import quantize_weight, weight_scale
from qcal.quant.realize import accumulator_name, realize, weight_levels
from qcal.reference import kernels as K
from qcal.reference.float_interpreter import channel_view, float_op
from qcal.reference.int_interpreter import simulated_op

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (the paper's zeta, gamma)
REGULARIZER_WEIGHT = 0.01  # lambda
BETA_START, BETA_END = 20.0, 2.0
WARMUP = 0.2  # share of the iterations with the rounding regulariser off
LEARNING_RATE = 1e-2
BATCH_IMAGES = 32
SEED = 0
LEARNED_OPS = ("conv2d", "dense")


def rectified_sigmoid(v) -> np.ndarray:
    """h(V) of the paper, in numpy."""
    return np.clip(1.0 / (1.0 + np.exp(-np.asarray(v, np.float64))) * (ZETA - GAMMA) + GAMMA, 0, 1)


def initial_v(rest) -> np.ndarray:
    """V with h(V) = ``rest`` (the fractional part of W / s, in [0, 1))."""
    p = (np.asarray(rest, np.float64) - GAMMA) / (ZETA - GAMMA)
    return np.log(p / (1.0 - p))


def beta_at(step: int, iterations: int) -> float | None:
    """The regulariser's exponent at ``step`` (None during the warm-up)."""
    warm = int(WARMUP * iterations)
    if step < warm:
        return None
    progress = (step - warm) / max(iterations - warm, 1)
    return BETA_END + (BETA_START - BETA_END) * (1.0 - progress)


@dataclass
class LayerProblem:
    """One layer's reconstruction: its float op, weights at scale ``scale`` within +-``levels``,
    the quantized inputs ``x`` and the float targets."""

    node: object  # the float graph's conv2d / dense Node
    scale: np.ndarray  # broadcastable against the weight
    levels: int
    x: np.ndarray  # the layer's input in the quantized network, N images
    target: np.ndarray  # f(W x + b) of the float network, N images
    activation: object = None  # the float ReLU / clip node applied after the layer, or None


@dataclass
class LearnedRounding:
    """What AdaRound learned: per layer the directions, and the layer's reconstruction error
    (the loss's first term, on all the images it learned from) with nearest and learned
    rounding."""

    round_up: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)  # layer -> (nearest, adaround)
    seconds: float = 0.0
    images: int = 0

    def record(self) -> dict:
        nearest = sum(e[0] for e in self.errors.values())
        learned = sum(e[1] for e in self.errors.values())
        return {"seconds": round(self.seconds, 2), "layers": len(self.round_up),
                "images": self.images,
                "reconstruction_error_nearest": nearest, "reconstruction_error_adaround": learned,
                "layers_improved": sum(1 for e in self.errors.values() if e[1] < e[0])}


# -- MXNet: the layer, its loss and the optimiser -----------------------------------------------

def _mx_layer(node, x, weight):
    """The float layer ``node`` on an MXNet batch (input already padded), no bias."""
    from mxnet import nd

    if node.op == "dense":
        return nd.FullyConnected(x, weight, no_bias=True, num_hidden=weight.shape[0],
                                 flatten=False)
    a = node.attrs
    return nd.Convolution(x, weight, no_bias=True, kernel=weight.shape[2:],
                          stride=tuple(a.get("strides", (1, 1))),
                          dilate=tuple(a.get("dilation", (1, 1))), pad=(0, 0),
                          num_filter=weight.shape[0], num_group=int(a.get("groups", 1)))


def _mx_activation(activation, y):
    from mxnet import nd

    if activation is None:
        return y
    if activation.op == "relu":
        return nd.relu(y)
    return nd.clip(y, activation.attrs["a_min"], activation.attrs["a_max"])


def _padded_input(node, x):
    if node.op == "dense":
        return x
    return K.pad_nchw(x, node.attrs.get("padding", (0, 0, 0, 0)))


def _reconstruction_error(problem: LayerProblem, weight: np.ndarray, chunk: int = 64) -> float:
    """The loss's first term for ``weight`` on all of the problem's images."""
    from mxnet import nd

    node = problem.node
    bias = _bias_view(node)
    w = nd.array(weight, dtype="float32")
    total, count = 0.0, 0
    for start in range(0, len(problem.x), chunk):
        xb = nd.array(_padded_input(node, problem.x[start:start + chunk]), dtype="float32")
        y = _mx_activation(problem.activation, _mx_layer(node, xb, w) + bias)
        t = nd.array(problem.target[start:start + chunk], dtype="float32")
        per_position = nd.sum(nd.square(y - t), axis=1)
        total += float(nd.sum(per_position).asscalar())
        count += per_position.size
    return total / max(count, 1)


def _bias_view(node):
    from mxnet import nd

    bias = node.params.get("bias")
    if bias is None:
        return 0.0
    rank = 2 if node.op == "dense" else 4
    return nd.array(channel_view(np.asarray(bias, np.float32), rank), dtype="float32")


def learn_layer(problem: LayerProblem, iterations: int, seed: int = SEED) -> np.ndarray:
    """The learned directions (True: round up) of one layer's weights."""
    import mxnet as mx
    from mxnet import autograd, nd

    node = problem.node
    w = np.asarray(node.params["weight"], np.float64)
    floor = np.floor(w / problem.scale)
    v = nd.array(initial_v(w / problem.scale - floor), dtype="float32")
    v.attach_grad()
    floor_nd = nd.array(floor, dtype="float32")
    scale_nd = nd.array(np.broadcast_to(problem.scale, w.shape), dtype="float32")
    bias = _bias_view(node)
    x_all = nd.array(_padded_input(node, problem.x), dtype="float32")
    t_all = nd.array(problem.target, dtype="float32")
    updater = mx.optimizer.get_updater(mx.optimizer.Adam(learning_rate=LEARNING_RATE))
    rng = np.random.RandomState(seed)
    n = len(problem.x)
    for step in range(iterations):
        idx = nd.array(rng.choice(n, min(BATCH_IMAGES, n), replace=False), dtype="int64")
        xb, tb = nd.take(x_all, idx, axis=0), nd.take(t_all, idx, axis=0)
        beta = beta_at(step, iterations)
        with autograd.record():
            h = nd.clip(nd.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)
            w_soft = scale_nd * nd.clip(floor_nd + h, -problem.levels, problem.levels)
            y = _mx_activation(problem.activation, _mx_layer(node, xb, w_soft) + bias)
            loss = nd.mean(nd.sum(nd.square(y - tb), axis=1))
            if beta is not None:
                loss = loss + REGULARIZER_WEIGHT * nd.sum(1 - nd.power(nd.abs(2 * h - 1), beta))
        loss.backward()
        updater(0, v.grad, v)
    return v.asnumpy() >= 0


# -- the network walk: quantized inputs and float targets, layer by layer ------------------------

def _activation_after(graph: Graph, node):
    """The ReLU / clip that is ``node``'s only consumer, else None."""
    consumers = [n for n in graph.nodes if node.name in n.inputs]
    if len(consumers) == 1 and consumers[0].op in ("relu", "clip"):
        return consumers[0]
    return None


def _float_activation(activation, y):
    return y if activation is None else float_op(activation, [y], np.float32)


def learn_rounding(graph: Graph, amax, options, annotation, images: np.ndarray,
                   progress=None, wide_amax=None) -> LearnedRounding:
    """AdaRound's directions for every integer conv/dense layer of ``graph`` under ``options``
    (activation ranges ``amax``, ``annotation`` as ``quantize`` made them), learned on
    ``images`` (the first ``options.adaround_images`` are used); ``wide_amax`` as ``realize``'s."""
    if images is None or len(images) == 0:
        raise UsageProblem("weight_rounding adaround needs calibration images, and this run has "
                           "none")
    start = time.perf_counter()
    x = np.asarray(images[:options.adaround_images], dtype=np.float32)
    nearest = realize(graph, amax, options, annotation, wide_amax=wide_amax)
    layers = {accumulator_name(n): n for n in graph.nodes
              if n.op in LEARNED_OPS and annotation.is_integer(n.name)}
    targets = {n.name for n in layers.values()}
    learned = LearnedRounding(images=len(x))
    floats = _float_values(graph, x)
    pending = {}
    last_use = {}
    for step, qnode in enumerate(nearest.nodes):
        for name in qnode.inputs:
            last_use[name] = step
    values = {}
    for step, qnode in enumerate(nearest.nodes):
        if step == 0:
            out = x.astype(np.float64)
        else:
            args = [values[i] for i in qnode.inputs]
            if qnode.name in layers:
                node = layers[qnode.name]
                while node.name not in pending:  # the float walk runs just far enough
                    name, value = next(floats)
                    if name in targets:
                        pending[name] = value
                qnode = _learn(graph, node, options, annotation, args[0], pending.pop(node.name),
                               qnode, learned)
                if progress is not None:
                    progress(node.name)
            out = simulated_op(qnode, args, nearest)
            del args
            for name in set(qnode.inputs):
                if last_use[name] == step:
                    del values[name]
        if qnode.name in last_use:
            values[qnode.name] = out
        del out
    learned.seconds = time.perf_counter() - start
    return learned


def _learn(graph, node, options, annotation, x, float_out, qnode, learned: LearnedRounding):
    """Learn ``node``'s rounding from its quantized input ``x``; the integer node with it."""
    levels = weight_levels(annotation, node.name)
    weight = node.params["weight"]
    _, shaped = weight_scale(weight, options.weight_scale, options.weight_granularity, levels)
    activation = _activation_after(graph, node)
    problem = LayerProblem(node, shaped, levels, np.asarray(x, np.float32),
                           _float_activation(activation, float_out), activation)
    round_up = learn_layer(problem, options.adaround_iterations)
    wq, _ = quantize_weight(weight, options.weight_scale, options.weight_granularity, levels,
                            round_up)
    nearest_wq = qnode.params["weight"]
    learned.round_up[node.name] = round_up
    learned.errors[node.name] = (_reconstruction_error(problem, nearest_wq * shaped),
                                 _reconstruction_error(problem, wq * shaped))
    return dataclasses.replace(qnode, params={**qnode.params, "weight": wq})


def _float_values(graph: Graph, x: np.ndarray):
    """(name, value) of every float-graph tensor in order, each dropped once no later node reads
    it (a generator, advanced only as far as the walk needs)."""
    last_use = {}
    for step, n in enumerate(graph.nodes):
        for i in n.inputs:
            last_use[i] = step
    values = {}
    for step, n in enumerate(graph.nodes):
        y = x if n.op == "input" else float_op(n, [values[i] for i in n.inputs])
        y = y.astype(np.float32, copy=False)
        for i in set(n.inputs):
            if last_use[i] == step:
                del values[i]
        if n.name in last_use:
            values[n.name] = y
        yield n.name, y
        del y
