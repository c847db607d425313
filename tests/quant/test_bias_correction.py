"""Empirical bias correction (``bias_correction='empirical'``): after correction, every corrected
layer's integer output mean per channel equals the float model's on the correction images (which
holds for later layers only if earlier corrections were applied first), the correction removes a
known weight-quantization shift, and TVM computes the corrected graph bit for bit as numpy does."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qcal.calib.sources import GraphInterpreter
from qcal.config import QuantOptions
from qcal.errors import QcalError
from qcal.quant import quantize
from qcal.quant.bias_correction import CorrectionData, biased_layers, float_output_means
from qcal.reference.float_interpreter import run_float
from qcal.reference.int_interpreter import run_integer
from tests.fixtures import MODELS, GraphMaker, calibrate_amax, images


def _ranges(amax):
    return lambda options, tensors, levels: {t: amax[t] for t in tensors}


def _correction(graph, x, batch=5):
    means = float_output_means(graph, biased_layers(graph),
                               (x[i:i + batch] for i in range(0, len(x), batch)),
                               GraphInterpreter(graph))
    return CorrectionData(x, means, batch)


def _mean_errors(qgraph, graph, x, layers):
    """Per layer: the largest |integer mean - float mean| over channels, and the layer's
    accumulator scale (its LSB)."""
    ints = run_integer(qgraph, x, keep="all")
    floats = run_float(graph, x, keep=set(layers))
    out = {}
    for layer in layers:
        node = qgraph.node(layer)
        axes = (0,) + tuple(range(2, ints[layer].ndim))
        scale = np.asarray(node.scale, np.float64)
        got = ints[layer].astype(np.float64).mean(axis=axes) * scale
        want = floats[layer].astype(np.float64).mean(axis=axes)
        out[layer] = (float(np.abs(got - want).max()), float(np.max(scale)))
    return out


@given(seed=st.integers(0, 2 ** 16), model=st.sampled_from(sorted(MODELS)),
       width=st.sampled_from([3, 5, 8]), size=st.sampled_from([8, 11, 16]),
       weight_bits=st.sampled_from([3, 4, 8]), granularity=st.sampled_from(["tensor", "channel"]))
def test_corrected_means_equal_float_means_in_every_layer(seed, model, width, size, weight_bits,
                                                          granularity):
    """int32-acc biases (rounded to half an accumulator LSB): after correction every layer's
    per-channel mean on the correction images is float32's to within about one accumulator LSB
    (the rest: the bias rounding and float32 sums), while without it the low-bit weights leave
    shifts many LSBs wide. Later layers match only because they were measured after the earlier
    corrections were applied."""
    graph = MODELS[model](seed=seed, width=width, size=size)
    x = images(12, (3, size, size), seed=seed + 1)
    options = QuantOptions(bias_mode="int32-acc", weight_bits=weight_bits,
                           weight_granularity=granularity)
    amax = calibrate_amax(graph, x)
    plain = quantize(graph, _ranges(amax), options)
    corrected_options = QuantOptions(**{**options.to_dict(), "bias_correction": "empirical"})
    corrected = quantize(graph, _ranges(amax), corrected_options, _correction(graph, x))
    layers = [n for n in biased_layers(graph) if plain.node(n).is_int]  # not resnet_v2's input BN
    before = _mean_errors(plain, graph, x, layers)
    after = _mean_errors(corrected, graph, x, layers)
    for layer in layers:
        err, lsb = after[layer]
        assert err <= 1.01 * lsb + 1e-6 * (1 + abs(err)), (layer, err, lsb, before[layer])
    assert max(e / lsb for e, lsb in before.values()) > 2  # there was something to correct


def test_known_weight_shift_is_removed():
    """A 1x1 conv on a constant input 0.5 (exact in int8 at scale 1/128): its weight 0.3 at 3 bits
    (power-of-2 step 0.5/4) is 0.25, so every output is 0.05 x 0.5 too low; the correction adds
    0.025 to the bias 0.125 (int32-acc: exact to half an accumulator LSB, 1/1024)."""
    g = GraphMaker((1, 2, 2), 0)
    conv = g.conv("data", 1, k=1, p=0)
    g.nodes[-1].params.update(weight=np.full((1, 1, 1, 1), 0.3, np.float32),
                              bias=np.array([0.125], np.float32))
    graph = g.graph()
    x = np.full((4, 1, 2, 2), 0.5, np.float32)
    options = QuantOptions(bias_mode="int32-acc", weight_bits=3, bias_correction="empirical")
    q = quantize(graph, _ranges({"data": 1.0}), options, _correction(graph, x))
    bias = q.node(conv).params["bias"] * float(q.node(conv).scale)
    assert float(q.node(conv).scale) == 1 / 1024
    assert bias[0] == pytest.approx(0.15, abs=0.5 / 1024)


def test_refused_without_data():
    graph = MODELS["vgg"](seed=0)
    with pytest.raises(QcalError, match="bias correction needs"):
        quantize(graph, _ranges(calibrate_amax(graph, images(2, (3, 16, 16)))),
                 QuantOptions(bias_correction="empirical"))
    assert QuantOptions(bias_correction="empirical").label.endswith("bcorr-empirical")


def test_tvm_equals_numpy_on_a_corrected_graph():
    pytest.importorskip("qcal.backend.tvm.emit")
    from tests.fixtures import tvm_and_numpy_values, tvm_mismatches

    graph = MODELS["resnet_v2"](seed=3, width=5, size=11)
    x = images(6, (3, 11, 11), seed=4)
    options = QuantOptions(bias_bits=8, bias_granularity="channel", weight_bits=4,
                           bias_correction="empirical")
    q = quantize(graph, _ranges(calibrate_amax(graph, x)), options, _correction(graph, x, 4))
    tvm_values, ref_values = tvm_and_numpy_values(q, images(2, (3, 11, 11), seed=5, std=1.5))
    assert not tvm_mismatches(q, tvm_values, ref_values)
