"""Weight and activation widths below 8 bits: levels, scales, calibration, overflow proofs."""
from __future__ import annotations

import numpy as np
import pytest

from qcal.calib.collect import TensorStatistics
from qcal.calib.methods import TensorStats, choose_amax
from qcal.calib.result import CalibrationResult
from qcal.config import QuantOptions, levels_for_bits, options_from_values
from qcal.errors import UsageProblem
from qcal.ir.qgraph import INT32_MAX, int8_levels
from qcal.quant import quantize
from qcal.quant.annotate import annotate
from qcal.quant.fixed_point import quantize_weight, scale_for_amax
from qcal.quant.realize import realize
from qcal.reference.int_interpreter import run_integer, run_simulated
from tests.fixtures import MODELS, GraphMaker, calibrate_amax, float_values, images, realized, resnet_v1, vgg


def test_levels_are_symmetric_and_fit_int8():
    assert [levels_for_bits(b) for b in range(2, 9)] == [1, 3, 7, 15, 31, 63, 127]


@pytest.mark.parametrize("key", ["weight_bits", "activation_bits", "first_layer_bits",
                                 "last_layer_bits"])
@pytest.mark.parametrize("bits", [1, 9, 16, "4", True])
def test_widths_outside_2_to_8_are_refused(key, bits):
    with pytest.raises(UsageProblem, match=f"{key} must be an integer from 2 to 8"):
        QuantOptions(**{key: bits})


def test_labels_name_the_widths_only_when_not_8():
    assert "W" not in QuantOptions().label
    label = options_from_values({"weight_bits": 4, "first_layer_bits": 8}).label
    assert label.endswith("W4A8 first8")


class TestScalesAndWeights:
    @pytest.mark.parametrize("bits", [2, 4, 6, 8])
    def test_power_of_two_amax_keeps_a_power_of_two_scale(self, bits):
        levels = levels_for_bits(bits)
        assert scale_for_amax(4.0, levels) == 4.0 / 2 ** (bits - 1)
        assert scale_for_amax(3.5, levels) == 3.5 / levels

    @pytest.mark.parametrize("bits", [2, 3, 4, 7])
    @pytest.mark.parametrize("granularity", ["tensor", "channel"])
    def test_weights_use_every_level_and_no_more(self, bits, granularity):
        w = np.random.RandomState(bits).randn(6, 3, 3, 3).astype(np.float32)
        levels = levels_for_bits(bits)
        wq, scale = quantize_weight(w, "max", granularity, levels)
        per_channel = np.abs(wq.astype(np.int64)).reshape(6, -1).max(axis=1)
        assert per_channel.max() == levels
        if granularity == "channel":
            assert np.all(per_channel == levels) and scale.shape == (6,)
        # the largest weight of each scale group lands exactly on the top level
        amax = np.abs(w).reshape(6, -1).max(axis=1) if granularity == "channel" else np.abs(w).max()
        assert np.allclose(scale, amax / levels)


class TestCalibrationLevels:
    """The methods that trade rounding against clipping clip harder at fewer levels."""

    stats = TensorStats.from_values(np.random.RandomState(0).randn(400_000), bins=4096)

    def test_l2_finds_the_known_mse_optimal_gaussian_clip(self):
        # MSE-optimal symmetric clipping of N(0, 1): 2 bits are the levels {-t, 0, t}, whose
        # optimum is Max's 3-level quantizer (J. Max, "Quantizing for minimum distortion", 1960:
        # output 1.224); about 2.55 sigma at 16 levels (Banner et al., "ACIQ", 2019); at 8 bits
        # the clip sits far in the tail.
        assert abs(choose_amax("l2", self.stats, levels_for_bits(2)) - 1.224) < 0.01
        assert 2.3 < choose_amax("l2", self.stats, levels_for_bits(4)) < 2.8
        assert choose_amax("l2", self.stats, levels_for_bits(8)) > 3.5

    def test_kl_clips_harder_at_fewer_levels(self):
        # (near the tail, at 6-8 bits, KL's choice is noisy and need not be monotone)
        at = {b: choose_amax("kl", self.stats, levels_for_bits(b)) for b in (2, 3, 4, 5, 8)}
        assert at[2] < at[3] < at[4] < at[5] < at[8] <= self.stats.amax
        assert at[2] < 3.0 and at[8] > 4.0

    @pytest.mark.parametrize("method", ["max", "power2", "percentile"])
    def test_range_methods_do_not_depend_on_the_width(self, method):
        opts = {"percentile": 99.9} if method == "percentile" else {}
        assert (choose_amax(method, self.stats, 7, **opts)
                == choose_amax(method, self.stats, 127, **opts))

    def test_quantize_asks_calibration_for_each_tensor_at_its_width(self):
        g = vgg()
        x = images(8, (3, 16, 16))
        values = float_values(g, x)
        statistics = TensorStatistics("fp", g.name, len(x), 2048,
                                      {k: TensorStats.from_values(v) for k, v in values.items()},
                                      {}, "test")
        result = CalibrationResult.from_statistics(statistics)
        options = QuantOptions(activation_method="l2", activation_bits=4, last_layer_bits=8)
        q = quantize(g, result.ranges, options)
        a = annotate(g, options)
        last_input = a.graph.node(a.graph.output.name).inputs[0]
        for tensor in a.required_amax:
            node = q.node(f"{tensor}:q")
            bits = 8 if tensor == last_input else 4
            assert int8_levels(node) == levels_for_bits(bits)
            want = scale_for_amax(result.amax(tensor, "l2", levels_for_bits(bits)),
                                  levels_for_bits(bits))
            assert np.array_equal(node.scale, want)
        assert result.amax(last_input, "l2", 7) < result.amax(last_input, "l2", 127)


class TestRealizedWidths:
    def test_every_int8_value_stays_within_its_levels(self):
        g = resnet_v1()
        options = QuantOptions(weight_bits=3, activation_bits=4, weight_granularity="channel")
        q = realize(g, calibrate_amax(g, images(8, (3, 16, 16))), options)
        int8 = [n for n in q.nodes if n.op in ("quantize", "requantize") and n.dtype == "int8"]
        assert int8 and all(int8_levels(n) == 7 and np.all(n.bound <= 7) for n in int8)
        weights = [n.params["weight"] for n in q.nodes if n.op in ("qconv2d", "qdense")]
        assert all(np.abs(w.astype(int)).max() == 3 for w in weights)
        # saturating inputs: the interpreter checks every value against its proven bound
        values = run_integer(q, images(4, (3, 16, 16), seed=3, std=20.0), keep="all")
        reached = max(int(np.abs(values[n.name]).max()) for n in int8)
        assert reached == 7

    def test_first_and_last_layer_widths_are_set_separately(self):
        g = resnet_v1()
        options = QuantOptions(weight_bits=4, activation_bits=4, first_layer_bits=8,
                               last_layer_bits=6, weight_scale="max")
        q = realize(g, calibrate_amax(g, images(8, (3, 16, 16))), options)
        layers = [n for n in q.nodes if n.op in ("qconv2d", "qdense")]
        widths = [int(np.abs(n.params["weight"].astype(int)).max()) for n in layers]
        assert widths == [127] + [7] * (len(layers) - 2) + [31]
        inputs = [int8_levels(q.node(n.inputs[0])) for n in layers]
        assert inputs[0] == 127 and inputs[-1] == 31 and set(inputs[1:-1]) == {7}

    def test_accumulator_bound_uses_the_true_levels(self):
        g = _single_conv(cin=16)
        for bits in (8, 4, 2):
            q = realize(g, {"data": 4.0}, QuantOptions(weight_bits=bits, activation_bits=bits))
            acc = q.node("conv2d1:acc")
            wq = acc.params["weight"].astype(np.int64)
            l1 = np.abs(wq).reshape(wq.shape[0], -1).sum(axis=1)
            assert np.array_equal(acc.bound, levels_for_bits(bits) * l1)

    def test_narrower_widths_allow_a_larger_bias_shift_and_it_is_reported(self):
        # A 32-bit bias overflows int32 after its alignment at every width; the realizer lowers
        # the accumulator shift until it fits, and narrower operands leave room for more of it.
        g = _single_conv(cin=16)
        applied = {}
        for bits in (8, 6, 4, 2):
            q = realize(g, {"data": 4.0}, QuantOptions(bias_bits=32, weight_bits=bits,
                                                       activation_bits=bits))
            (adjustment,) = q.adjustments
            assert adjustment.what == "bias alignment (accumulator shift)"
            applied[bits] = int(adjustment.applied.lstrip("<"))
            assert int(np.max(q.node("conv2d1").bound)) <= INT32_MAX
            # worst case: every input at its top level with the weights' signs
            w = g.node("conv2d1").params["weight"]
            x = np.pad(np.sign(w[:1]) * 100.0, ((0, 0), (0, 0), (1, 2), (1, 2)))[:, :, :6, :6]
            run_integer(q, x.astype(np.float32))
        assert applied[8] < applied[6] < applied[4] < applied[2]


def _single_conv(cin=4):
    g = GraphMaker((cin, 6, 6), 0, "one_conv")
    g.conv("data", 2, k=3)
    node = g.nodes[-1]
    node.params["weight"] = g.rng.randn(*node.params["weight"].shape).astype(np.float32)
    node.params["bias"] = np.array([0.3, -0.7], dtype=np.float32)
    return g.graph()


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("model", sorted(MODELS))
def test_simulated_and_integer_models_agree_on_every_image_at_every_width(model, bits):
    # power-of-2 scales: every rescale is an exact shift, so the fake-quantized float model
    # computes the integer model's values exactly and top-1 agrees image by image
    graph = MODELS[model]()
    options = QuantOptions(weight_bits=bits, activation_bits=bits, bias_bits=8,
                           rounding="nearest" if bits % 2 else "upward")
    q = realized(graph, options, images(16, (3, 16, 16), seed=1))
    x = images(64, (3, 16, 16), seed=2, std=1.3)
    integer, simulated = run_integer(q, x), run_simulated(q, x)
    assert np.array_equal(integer.argmax(axis=1), simulated.argmax(axis=1))
    assert np.array_equal(integer, simulated.astype(np.float32))
