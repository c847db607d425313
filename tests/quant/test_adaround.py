"""AdaRound (``--weight-rounding adaround``): learned directions lower each layer's output error,
every weight stays floor or ceil of w / s, and the integer graph it gives is exact in TVM."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from qcal.cli import main
from qcal.config import QuantOptions, levels_for_bits, options_from_values
from qcal.drivers.sweep import ResultStore
from qcal.errors import QcalError, UsageProblem
from qcal.quant import adaround, quantize
from qcal.quant.annotate import annotate
from qcal.quant.fixed_point import quantize_weight, weight_scale
from qcal.reference.float_interpreter import float_op, run_float
from qcal.reference.int_interpreter import run_integer
from tests.fixtures import GraphMaker, calibrate_amax, tvm_and_numpy_values, tvm_mismatches

ITERATIONS = 300


def _graph():
    """Odd sizes, random weights::

        data (5x11x11) -> conv 3x3 (7) -> relu -> conv 3x3/2 (6) -> relu -+-> gap -> flatten -> dense (9)
    """
    g = GraphMaker((5, 11, 11), seed=4, name="adaround")
    x = g.relu(g.conv(g.relu(g.conv("data", 7)), 6, s=2))
    g.dense(g.flatten(g.gap(x)), 9)
    return g.graph()


def _smooth_images(n, seed):
    """Images whose neighbouring pixels and channels are correlated, as in photos: AdaRound gains
    from correlated inputs (on white noise nearest rounding is already about optimal)."""
    rng = np.random.RandomState(seed)
    coarse = rng.randn(n, 1, 4, 4) + 0.5 * rng.randn(n, 5, 4, 4) + 0.5
    x = np.kron(coarse, np.ones((1, 1, 3, 3)))[:, :, :11, :11]
    return (x + 0.1 * rng.randn(*x.shape)).astype(np.float32)


@pytest.fixture(scope="module")
def learned_4bit():
    """The graph, its calibration images and ranges, and its nearest and AdaRound W4A8 graphs."""
    graph = _graph()
    calib = _smooth_images(64, seed=2)
    amax = calibrate_amax(graph, calib)

    def ranges(options, tensors, levels):
        return {t: amax[t] for t in tensors}

    nearest = quantize(graph, ranges, QuantOptions(weight_bits=4))
    options = QuantOptions(weight_bits=4, weight_rounding="adaround",
                           adaround_iterations=ITERATIONS, adaround_images=64)
    learned = quantize(graph, ranges, options, images=calib)
    return graph, calib, amax, nearest, learned, options


def _layer_error(graph, name, weight, x_quantized, calib):
    """||relu(conv(x~, w) + b) - relu(conv(x, W) + b)||^2 per position, by numpy."""
    node = graph.node(name)
    relu = next(n for n in graph.nodes if name in n.inputs)
    quantized = float_op(relu, [float_op(_with_weight(node, weight), [x_quantized])])
    target = run_float(graph, calib, keep={relu.name})[relu.name]
    return float(np.mean(np.sum(np.square(quantized - target), axis=1)))


def _with_weight(node, weight):
    from dataclasses import replace

    return replace(node, params={**node.params, "weight": weight.astype(np.float32)})


def _conv_weights(qgraph, name):
    return qgraph.node(f"{name}:acc").params["weight"]


def test_adaround_lowers_the_first_layers_reconstruction_error_at_4_bits(learned_4bit):
    graph, calib, amax, nearest, learned, options = learned_4bit
    first = graph.nodes[1].name
    levels = levels_for_bits(4)
    scale, shaped = weight_scale(graph.node(first).params["weight"], "power2", "tensor", levels)
    # the first layer reads the quantized image, the same for both roundings
    s_x = amax["data"] / (levels_for_bits(8) + 1)
    x_q = np.clip(np.rint(calib / s_x), -127, 127) * s_x
    errors = [_layer_error(graph, first, _conv_weights(q, first) * shaped, x_q, calib)
              for q in (nearest, learned)]
    assert errors[1] < 0.9 * errors[0]
    recorded = learned.notes["adaround"]
    assert recorded["layers"] == 3 and recorded["images"] == 64 and recorded["seconds"] > 0
    assert recorded["reconstruction_error_adaround"] < recorded["reconstruction_error_nearest"]


def test_adaround_lowers_the_networks_output_error_on_other_images(learned_4bit):
    graph, _, _, nearest, learned, _ = learned_4bit
    x = _smooth_images(48, seed=9)
    reference = run_float(graph, x)
    mse = [float(np.mean(np.square(run_integer(q, x) - reference))) for q in (nearest, learned)]
    assert mse[1] < mse[0]


def test_every_learned_weight_is_the_floor_or_the_ceiling_of_w_over_s(learned_4bit):
    graph, _, _, nearest, learned, options = learned_4bit
    levels = levels_for_bits(4)
    changed = 0
    for node in graph.nodes:
        if node.op not in ("conv2d", "dense"):
            continue
        w = node.params["weight"].astype(np.float64)
        _, shaped = weight_scale(w, "power2", "tensor", levels)
        q = _conv_weights(learned, node.name).astype(np.int64)
        low = np.clip(np.floor(w / shaped), -levels, levels)
        high = np.clip(np.ceil(w / shaped), -levels, levels)
        assert np.all((q == low) | (q == high)), node.name
        changed += int(np.sum(q != _conv_weights(nearest, node.name)))
    assert changed > 0  # it learned something other than nearest


def test_the_adaround_graph_is_bit_exact_in_tvm(learned_4bit):
    _, calib, _, _, learned, _ = learned_4bit
    tvm_values, ref_values = tvm_and_numpy_values(learned, calib[:3])
    assert not tvm_mismatches(learned, tvm_values, ref_values)


def test_learning_is_deterministic():
    graph = _graph()
    calib = _smooth_images(40, seed=3)
    amax = calibrate_amax(graph, calib)
    options = QuantOptions(weight_bits=3, weight_rounding="adaround", adaround_iterations=30,
                           adaround_images=40, weight_granularity="channel")
    runs = [adaround.learn_rounding(graph, amax, options, annotate(graph, options), calib)
            for _ in range(2)]
    assert runs[0].round_up.keys() == runs[1].round_up.keys()
    for name, up in runs[0].round_up.items():
        assert np.array_equal(up, runs[1].round_up[name])


def test_the_rectified_sigmoid_starts_at_the_fractional_part_and_reaches_0_and_1():
    rest = np.array([0.0, 0.25, 0.5, 0.999])
    assert np.allclose(adaround.rectified_sigmoid(adaround.initial_v(rest)), rest)
    assert adaround.rectified_sigmoid(-20.0) == 0.0 and adaround.rectified_sigmoid(20.0) == 1.0
    assert adaround.beta_at(0, 100) is None and adaround.beta_at(20, 100) == 20.0
    assert adaround.beta_at(99, 100) == pytest.approx(2.0, abs=0.3)


@given(shape=st.tuples(st.integers(1, 7), st.integers(1, 5), st.sampled_from([1, 3])),
       bits=st.integers(2, 8), granularity=st.sampled_from(["tensor", "channel"]),
       method=st.sampled_from(["max", "power2"]), seed=st.integers(0, 2 ** 16))
def test_round_up_gives_floor_plus_direction_within_the_levels(shape, bits, granularity, method,
                                                               seed):
    rng = np.random.RandomState(seed)
    o, i, k = shape
    w = rng.randn(o, i, k, k).astype(np.float32)
    up = rng.rand(*w.shape) < 0.5
    levels = levels_for_bits(bits)
    q, scale = quantize_weight(w, method, granularity, levels, up)
    _, shaped = weight_scale(w, method, granularity, levels)
    assert np.array_equal(q, np.clip(np.floor(w / shaped) + up, -levels, levels))
    assert np.array_equal(scale, quantize_weight(w, method, granularity, levels)[1])


def test_a_direction_array_of_the_wrong_shape_is_refused():
    w = np.ones((2, 3), np.float32)
    with pytest.raises(QcalError, match="learned weight rounding of shape"):
        quantize_weight(w, "max", "tensor", 127, np.zeros((3, 2), bool))


class TestOptions:
    def test_nearest_variants_keep_their_keys_and_labels(self):
        nearest = QuantOptions(adaround_iterations=7)
        assert nearest == QuantOptions()  # nearest reads neither AdaRound field
        assert not {"weight_rounding", "adaround_iterations", "adaround_images"} & set(
            nearest.to_dict())
        assert "adaround" not in nearest.label

    def test_adaround_fields_enter_the_description_and_the_label(self):
        a = options_from_values({"weight_rounding": "adaround", "adaround_iterations": 50,
                                 "bias": "int32-acc"})
        b = QuantOptions.from_dict(a.to_dict())
        assert a == b and a.to_dict()["adaround_iterations"] == 50
        assert a.to_dict() != QuantOptions.from_dict({**a.to_dict(), "adaround_images": 9}).to_dict()
        assert a.label.endswith("adaround:50it/256img")

    @pytest.mark.parametrize("values, message", [
        ({"weight_rounding": "stochastic"}, "weight_rounding must be one of nearest, adaround"),
        ({"weight_rounding": "adaround", "adaround_iterations": 0},
         "adaround_iterations must be a positive integer"),
        ({"weight_rounding": "adaround", "adaround_images": "8"},
         "adaround_images must be a positive integer"),
    ])
    def test_bad_values_are_refused(self, values, message):
        with pytest.raises(UsageProblem, match=message):
            QuantOptions.from_dict(values)

    def test_no_images_is_refused(self):
        graph = _graph()
        options = QuantOptions(weight_rounding="adaround")
        with pytest.raises(UsageProblem, match="needs calibration images"):
            adaround.learn_rounding(graph, {}, options, annotate(graph, options),
                                    np.zeros((0, 5, 11, 11), np.float32))


def test_evaluate_records_adaround_and_its_time(tmp_path):
    """A real model through the CLI (simulated: the compiled path is the same as for any
    weights, and the fixture above checks TVM): the variant is described and timed."""
    results = tmp_path / "results"
    result = CliRunner().invoke(main, [
        "evaluate", "--model", "fmnist_resnet20_v1", "--num-images", "32", "--calib-images",
        "32", "--batch-size", "32", "--weight-bits", "4", "--weight-rounding", "adaround",
        "--adaround-iterations", "5", "--adaround-images", "16", "--simulate", "--results-dir", str(results),
        "--cache-dir", str(tmp_path / "cache"), "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads((results / "results.json").read_text())
    record = next(v for v in summary["variants"] if v["description"]["variant"])
    variant = record["description"]["variant"]
    assert (variant["weight_rounding"], variant["adaround_iterations"],
            variant["adaround_images"]) == ("adaround", 5, 16)
    assert record["adaround"]["images"] == 16 and record["adaround"]["layers"] == 22
    assert ResultStore(results).load(record["key"])[0]["adaround"] == record["adaround"]
    label = "a:power2 w:power2/tensor b16 W4A8 adaround:5it/16img simulated"
    row = next(r for r in summary["rows"] if r["variant"] == label)
    assert row["adaround_s"] == record["adaround"]["seconds"] > 0


def test_bias_correction_measures_the_model_with_the_learned_rounding():
    """AdaRound then empirical bias correction: the corrected graph keeps the learned weights,
    and its per-channel output means are float32's to within about an accumulator LSB."""
    from qcal.calib.sources import GraphInterpreter
    from qcal.quant.bias_correction import CorrectionData, biased_layers, float_output_means

    graph = _graph()
    calib = _smooth_images(24, seed=5)
    amax = calibrate_amax(graph, calib)

    def ranges(options, tensors, levels):
        return {t: amax[t] for t in tensors}

    values = {"weight_bits": 4, "bias": "int32-acc", "weight_rounding": "adaround",
              "adaround_iterations": 40, "adaround_images": 24}
    learned = quantize(graph, ranges, options_from_values(values), images=calib)
    means = float_output_means(graph, biased_layers(graph), [calib], GraphInterpreter(graph))
    corrected = quantize(graph, ranges, options_from_values({**values, "bias_correction": "empirical"}),
                         CorrectionData(calib, means, len(calib)), images=calib)
    ints = run_integer(corrected, calib, keep="all")
    for layer in biased_layers(graph):
        assert np.array_equal(_conv_weights(corrected, layer), _conv_weights(learned, layer))
        node = corrected.node(layer)
        axes = (0,) + tuple(range(2, ints[layer].ndim))
        got = ints[layer].astype(np.float64).mean(axis=axes) * np.asarray(node.scale)
        assert np.abs(got - means[layer]).max() <= 1.01 * np.max(node.scale) + 1e-6, layer
