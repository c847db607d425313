"""Annotate and realize: scales, rescale plans, bias alignment, overflow proofs, counts."""
from __future__ import annotations

import numpy as np
import pytest

from qcal.config import QuantOptions
from qcal.errors import QcalError, UsageProblem
from qcal.ir.qgraph import INT32_MAX
from qcal.quant.annotate import annotate
from qcal.quant.fixed_point import bias_scale, ceil_log2, quantize_weight, rescale_plan, scale_for_amax
from qcal.quant.realize import realize
from qcal.reference.int_interpreter import run_integer, run_simulated
from tests.fixtures import (MODELS, OPTION_SETS, GraphMaker, calibrate_amax, float_values, images, realized,
                            resnet_v1, resnet_v2, vgg)

# --------------------------------------------------------------------------------------------
# Scales and rescale plans (pure functions, known answers).
# --------------------------------------------------------------------------------------------


class TestScales:
    def test_power_of_two_amax_gives_power_of_two_scale(self):
        assert scale_for_amax(4.0) == 4.0 / 128
        assert scale_for_amax(0.25) == 2.0 ** -9

    def test_other_amax_uses_the_full_symmetric_range(self):
        assert scale_for_amax(3.0) == pytest.approx(3.0 / 127, rel=0, abs=0)

    def test_zero_range_gets_a_usable_scale(self):
        assert scale_for_amax(0.0) == 1.0 / 128

    def test_ceil_log2_is_exact(self):
        assert list(ceil_log2([1.0, 2.0, 3.0, 4.0, 0.5, 0.3, 2.0 ** -20])) == [0, 1, 2, 2, -1, -1, -20]

    def test_bias_scale_is_its_own_power_of_two(self):
        bias = np.array([0.3, -0.1])
        assert bias_scale(bias, 8) == 0.5 / 128
        assert bias_scale(bias, 16) == 0.5 / 2 ** 15
        assert bias_scale(np.zeros(3), 8) == 1.0

    def test_weights_per_tensor_and_per_channel(self):
        w = np.array([[[[0.5]], [[-0.25]]], [[[0.01]], [[0.02]]]], dtype=np.float32)  # (2, 2, 1, 1)
        q, s = quantize_weight(w, "max", "tensor")
        assert s.shape == () and s == 0.5 / 128  # 0.5 is a power of two: 1/128 exactly
        # the power-of-2 amax itself maps to 128 and clips to 127 (one LSB), as in Relay
        assert q.dtype == np.int8 and q[0, 0, 0, 0] == 127 and q[0, 1, 0, 0] == -64
        assert q[1, 1, 0, 0] == 5  # 0.02 * 256 = 5.12
        q, s = quantize_weight(w, "max", "channel")
        assert s.shape == (2,) and s[1] == pytest.approx(0.02 / 127)
        assert q[1, 1, 0, 0] == 127 and q[1, 0, 0, 0] == 64  # 63.5 rounds to 64
        q, s = quantize_weight(w, "power2", "channel")
        assert list(s) == [0.5 / 128, 2.0 ** -5 / 128]


class TestRescalePlan:
    values = np.arange(-1000, 1001, dtype=np.int64)

    def _apply(self, plan, v):
        from qcal.reference.int_interpreter import rounding_right_shift

        if plan.kind == "shift":
            return rounding_right_shift(np.left_shift(v, plan.lshift), plan.rshift)
        return rounding_right_shift(v * plan.multiplier, plan.rshift)

    @pytest.mark.parametrize("log2", [-7, -1, 0, 3])
    def test_powers_of_two_are_exact_shifts(self, log2):
        plan = rescale_plan(2.0 ** log2, 1000)
        assert plan.kind == "shift" and plan.compute == "int32"
        exact = np.floor(self.values * 2.0 ** log2 + 0.5)  # round half up
        assert np.array_equal(self._apply(plan, self.values), exact)

    @pytest.mark.parametrize("ratio", [0.3, 1 / 3, 0.9999, 1.7, 37.5])
    def test_other_ratios_use_a_fixed_point_multiplier(self, ratio):
        plan = rescale_plan(ratio, 1000)
        assert plan.kind == "multiply" and plan.compute == "int64"
        assert 2 ** 30 <= int(plan.multiplier) < 2 ** 31
        got = self._apply(plan, self.values)
        assert np.abs(got - self.values * ratio).max() <= 0.5 + 1e-6
        assert int(plan.out_bound) >= np.abs(got).max()

    def test_shift_needing_more_than_int32_computes_in_int64(self):
        assert rescale_plan(2.0 ** 4, 2 ** 28).compute == "int64"
        assert rescale_plan(2.0 ** -40, 100).compute == "int64"


# --------------------------------------------------------------------------------------------
# Annotate: decisions and counts.
# --------------------------------------------------------------------------------------------

class TestAnnotate:
    def test_resnet_v1_counts(self):
        # data -q-> conv1 -> relu -> maxpool -rq-> [block1: conv(rq relu) conv add relu -rq->]
        # [block2: conv(rq relu) conv, 1x1 conv, add, relu] -> gap -> flatten -rq-> dense -dq->
        a = annotate(resnet_v1(), QuantOptions())
        assert a.counts()["quantize"] == 1
        assert a.counts()["requantize"] == 5
        assert a.counts()["dequantize"] == 1
        assert a.counts()["float_ops"] == 0

    def test_skip_k_conv_keeps_the_first_convs_float(self):
        g = resnet_v1()
        a = annotate(g, QuantOptions(skip_k_conv=2))
        convs = [n.name for n in g.nodes if n.op == "conv2d"]
        assert not a.is_integer(convs[0]) and not a.is_integer(convs[1])
        assert a.is_integer(convs[2])
        # block 1's second conv reads a float relu: quantized from float, not requantized
        assert g.node(convs[2]).inputs[0] in a.quantize_points

    def test_skip_dense_keeps_the_classifier_float(self):
        g = vgg()
        a = annotate(g, QuantOptions(skip_dense=True))
        dense = [n.name for n in g.nodes if n.op == "dense"]
        assert not any(a.is_integer(d) for d in dense)
        assert a.counts()["dequantize"] == 1  # the last pooled feature map, once

    def test_pre_activation_bn_on_the_float_input_stays_float(self):
        g = resnet_v2()
        a = annotate(g, QuantOptions())
        affines = [n.name for n in g.nodes if n.op == "channel_affine"]
        assert not a.is_integer(affines[0])
        assert all(a.is_integer(name) for name in affines[1:])


class TestResidualQuantizedOnce:
    def test_one_int8_value_serves_both_branches(self):
        g = resnet_v1()
        q = realize(g, calibrate_amax(g, images(4, (3, 16, 16))), QuantOptions())
        block_in = "max_pool2d3"  # stem output: feeds block 1's conv and its residual add
        requants = [n for n in q.nodes if n.inputs == (block_in,) and n.op == "requantize"]
        assert len(requants) == 1 and requants[0].dtype == "int8"
        readers = [n.name for n in q.nodes if requants[0].name in n.inputs]
        assert len(readers) == 2  # the conv, and the add's alignment


# --------------------------------------------------------------------------------------------
# Bias modes and overflow.
# --------------------------------------------------------------------------------------------

def _single_conv(bias_value, k=3, cin=4, seed=0, weight_std=1.0):
    g = GraphMaker((cin, 6, 6), seed, "one_conv")
    g.conv("data", 2, k=k)
    node = g.nodes[-1]
    node.params["weight"] = (g.rng.randn(*node.params["weight"].shape) * weight_std).astype(np.float32)
    node.params["bias"] = np.asarray(bias_value, dtype=np.float32)
    return g.graph()


class TestBias:
    amax = {"data": 4.0}

    def test_int32_acc_bias_is_rint_of_bias_over_accumulator_scale(self):
        g = _single_conv([0.3, -0.7])
        q = realize(g, self.amax, QuantOptions(bias_mode="int32-acc", weight_scale="max"))
        add = q.node("conv2d1")
        acc = q.node("conv2d1:acc")
        assert add.op == "bias_add" and acc.op == "qconv2d"
        assert np.array_equal(add.params["bias"], np.rint(np.array([0.3, -0.7]) / acc.scale))
        assert np.array_equal(add.scale, acc.scale)

    def test_finer_bias_scale_wins_and_the_accumulator_is_shifted_left(self):
        g = _single_conv([0.3, -0.7])
        q = realize(g, self.amax, QuantOptions(bias_bits=16))
        acc, shift, add = q.node("conv2d1:acc"), q.node("conv2d1:align"), q.node("conv2d1")
        s_b = bias_scale(np.array([0.3, -0.7]), 16)
        assert s_b < acc.scale
        assert int(shift.params["lshift"]) == int(np.log2(acc.scale / s_b))
        assert add.scale == s_b
        assert np.array_equal(add.params["bias"], np.rint(np.array([0.3, -0.7]) / s_b))

    def test_coarser_bias_is_shifted_left_offline(self):
        g = _single_conv([0.3, -0.7])
        q = realize(g, self.amax, QuantOptions(bias_bits=2))  # s_b = 0.5: coarser than the acc
        names = [n.name for n in q.nodes]
        assert "conv2d1:align" not in names
        acc, add = q.node("conv2d1:acc"), q.node("conv2d1")
        b_q = np.clip(np.rint(np.array([0.3, -0.7]) / 0.5), -1, 1)
        assert np.array_equal(add.params["bias"], b_q * (0.5 / acc.scale))

    def test_32_bit_bias_that_would_overflow_is_realigned_and_reported(self):
        # docs/background.md: a 32-bit bias would overflow the accumulator after its left shift.
        g = _single_conv([0.3, -0.7], cin=16)
        q = realize(g, self.amax, QuantOptions(bias_bits=32))
        assert q.adjustments, "the overflowing alignment must be reported"
        text = str(q.adjustments[0])
        assert text.startswith("conv2d1: bias alignment") and "requested <<" in text
        add = q.node("conv2d1")
        assert int(np.max(add.bound)) <= INT32_MAX
        # worst case inputs (every int8 at +-127 with the weights' signs) stay inside int32
        w = g.node("conv2d1").params["weight"]
        x = np.sign(w[0:1]).repeat(1, axis=0) * 100.0
        x = np.pad(x, ((0, 0), (0, 0), (1, 2), (1, 2)))[:, :, :6, :6].astype(np.float32)
        run_integer(q, x)  # raises on any value outside its proven bound

    def test_huge_int32_acc_bias_shifts_the_accumulator_right(self):
        g = _single_conv([3.0e6, -1.0])
        q = realize(g, self.amax, QuantOptions(bias_mode="int32-acc"))
        assert q.adjustments and ">>" in q.adjustments[0].applied
        out = run_integer(q, images(2, (4, 6, 6)))
        assert np.allclose(out[:, 0], 3.0e6, rtol=1e-3)

    @pytest.mark.parametrize("bits", [1, 33, 0])
    def test_bias_bits_out_of_range_are_refused(self, bits):
        with pytest.raises(UsageProblem, match="bias_bits must be an integer from 2 to 32"):
            QuantOptions(bias_bits=bits)


class TestRefusals:
    def test_missing_range_names_the_tensor(self):
        g = resnet_v1()
        with pytest.raises(QcalError, match="no calibrated range for tensor 'data'"):
            realize(g, {}, QuantOptions())

    @pytest.mark.parametrize("options", [QuantOptions(), QuantOptions(skip_k_conv=2, skip_dense=True)])
    def test_required_amax_lists_exactly_what_realize_reads(self, options):
        class Recording(dict):
            def __getitem__(self, key):
                read.add(key)
                return super().__getitem__(key)

        g = resnet_v2()
        a = annotate(g, options)
        full = calibrate_amax(g, images(4, (3, 16, 16)))
        read = set()
        realize(g, Recording(full), options, a)
        assert read == set(a.required_amax) and read  # no more, no less


# --------------------------------------------------------------------------------------------
# Whole graphs: proven bounds hold; simulated and integer models agree on top-1.
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("options", sorted(OPTION_SETS))
def test_simulated_and_integer_models_agree_on_top1(model, options):
    graph = MODELS[model]()
    calib, test = images(16, (3, 16, 16), seed=1), images(48, (3, 16, 16), seed=2, std=1.3)
    q = realized(graph, OPTION_SETS[options], calib)
    integer = run_integer(q, test)  # also checks every value against its proven bound
    simulated = run_simulated(q, test)
    assert np.array_equal(integer.argmax(axis=1), simulated.argmax(axis=1))
    assert np.abs(integer - simulated).max() < 0.05 * np.abs(simulated).max()


def test_saturating_inputs_stay_within_proven_bounds():
    for build in MODELS.values():
        graph = build()
        q = realized(graph, OPTION_SETS["power2-b32"], images(4, (3, 16, 16)))
        run_integer(q, images(8, (3, 16, 16), seed=3, std=50.0))


def test_integer_model_tracks_the_float_model():
    graph = resnet_v1()
    calib, test = images(32, (3, 16, 16), seed=1), images(64, (3, 16, 16), seed=2)
    q = realized(graph, OPTION_SETS["max-int32acc-channel"], calib)
    ref = float_values(graph, test)[graph.output.name]
    out = run_integer(q, test)
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.9
