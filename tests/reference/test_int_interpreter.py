"""The numpy interpreters of a QGraph, checked on known answers (they are TVM's reference)."""
from __future__ import annotations

import numpy as np
import pytest

from qcal.errors import QcalError
from qcal.ir.qgraph import QGraph, QNode
from qcal.quant.fixed_point import rescale_plan
from qcal.quant.realize import qgraph_from_float
from qcal.reference.int_interpreter import run_integer, run_simulated
from tests.fixtures import MODELS, OPTION_SETS, every_op, images, realized


def _graph(shape, *nodes):
    return QGraph([QNode("x", "input", attrs={"shape": shape}, shape=shape), *nodes], "t")


def _quantize(scale, shape, name="q"):
    return QNode(name, "quantize", ("x",), params={"inv_scale": np.float32(1.0 / scale)},
                 dtype="int8", shape=shape, scale=np.float64(scale), bound=np.int64(127))


def _int_input(values, shape):
    """A graph whose quantize turns ``values`` (integers, scale 1) into int8 unchanged."""
    return np.asarray(values, dtype=np.float32).reshape((1,) + shape)


def _requantize(src, name, plan, out_dtype, shape, out_scale=1.0):
    params = {"lshift": plan.lshift, "rshift": plan.rshift}
    if plan.kind == "multiply":
        params["multiplier"] = plan.multiplier
    return QNode(name, "requantize", (src,), {"kind": plan.kind, "compute": plan.compute}, params,
                 dtype=out_dtype, shape=shape, scale=np.float64(out_scale),
                 bound=np.minimum(plan.out_bound, 127) if out_dtype == "int8" else plan.out_bound)


class TestQuantize:
    def test_rounds_half_to_even_and_clips_symmetrically(self):
        shape = (6,)
        g = _graph(shape, _quantize(0.5, shape))
        x = np.array([[0.25, 0.75, 1.25, -1.25, 100.0, -100.0]], dtype=np.float32)
        assert run_integer(g, x, keep="all")["q"].tolist() == [[0, 2, 2, -2, 127, -127]]


class TestRequantize:
    shape = (7,)

    def _run(self, plan, values, out_dtype="int32"):
        g = _graph(self.shape, _quantize(1.0, self.shape),
                   _requantize("q", "r", plan, out_dtype, self.shape))
        return run_integer(g, _int_input(values, self.shape), keep="all")["r"][0].tolist()

    def test_rounding_right_shift_rounds_half_up(self):
        assert self._run(rescale_plan(0.5, 127), [-3, -2, -1, 0, 1, 2, 3]) == [-1, -1, 0, 0, 1, 1, 2]

    def test_left_shift(self):
        assert self._run(rescale_plan(8.0, 127), [-3, -2, -1, 0, 1, 2, 3]) == [-24, -16, -8, 0, 8, 16, 24]

    def test_fixed_point_multiplier(self):
        got = self._run(rescale_plan(0.3, 127), [10, -10, 5, -5, 127, -127, 0])
        # m / 2**n is 0.3 + 4.7e-11, so -5 * 0.3 is just below -1.5 and rounds to -2
        assert got == [3, -3, 2, -2, 38, -38, 0]

    def test_int8_output_clips(self):
        assert self._run(rescale_plan(4.0, 127), [-40, -31, -1, 0, 1, 31, 40], "int8") == \
            [-127, -124, -4, 0, 4, 124, 127]


class TestPooling:
    shape = (1, 3, 3)

    def _pool_graph(self, op, attrs, params=None, out_shape=(1, 3, 3)):
        return _graph(self.shape, _quantize(1.0, self.shape),
                      QNode("p", op, ("q",), attrs, params or {}, dtype="int32" if op != "max_pool2d"
                            else "int8", shape=out_shape, scale=np.float64(1.0),
                            bound=np.int64(127 * 9)))

    def test_avg_pool_without_pad_counting_divides_by_the_window_it_saw(self):
        attrs = {"pool_size": (3, 3), "strides": (1, 1), "padding": (1, 1, 1, 1)}
        counts = np.array([[4, 6, 4], [6, 9, 6], [4, 6, 4]], dtype=np.int32)
        g = self._pool_graph("qavg_pool2d", attrs, {"counts": counts})
        x = _int_input([1, 2, 3, 4, 5, 6, 7, 8, 9], self.shape)
        out = run_integer(g, x, keep="all")["p"][0, 0]
        # corner (1+2+4+5)/4 = 3; edges 21/6 = 3.5 -> 4, 27/6 = 4.5 -> 5 (half up); centre 45/9
        assert out.tolist() == [[3, 4, 4], [5, 5, 6], [6, 7, 7]]

    def test_max_pool_pads_with_the_lowest_value(self):
        attrs = {"pool_size": (2, 2), "strides": (2, 2), "padding": (1, 1, 1, 1)}
        g = self._pool_graph("max_pool2d", attrs, out_shape=(1, 2, 2))
        x = _int_input([-100] * 9, self.shape)
        assert run_integer(g, x, keep="all")["p"].max() == -100

    def test_sum_pool(self):
        attrs = {"pool_size": (2, 2), "strides": (1, 1), "padding": (0, 0, 0, 0)}
        g = self._pool_graph("qsum_pool2d", attrs, out_shape=(1, 2, 2))
        x = _int_input([1, 2, 3, 4, 5, 6, 7, 8, 9], self.shape)
        assert run_integer(g, x, keep="all")["p"][0, 0].tolist() == [[12, 16], [24, 28]]


class TestOverflowIsCaught:
    def test_a_value_beyond_its_proven_bound_raises(self):
        shape = (2,)
        bad = QNode("b", "bias_add", ("q",), params={"bias": np.array([100, 0], np.int32)},
                    dtype="int32", shape=shape, scale=np.float64(1.0), bound=np.int64(127))
        g = _graph(shape, _quantize(1.0, shape), bad)
        with pytest.raises(QcalError, match="'b' exceeds its proven bound 127"):
            run_integer(g, _int_input([100, 1], shape))

    def test_int32_overflow_raises(self):
        shape = (1,)
        big = QNode("b", "bias_add", ("q",), params={"bias": np.array([2 ** 31 - 1], np.int64)},
                    dtype="int32", shape=shape, scale=np.float64(1.0), bound=np.int64(2 ** 40))
        g = _graph(shape, _quantize(1.0, shape), big)
        with pytest.raises(QcalError, match="integer overflow at 'b'"):
            run_integer(g, _int_input([5], shape))


def test_float_nodes_match_the_float_reference():
    from qcal.reference.float_interpreter import run_float

    graph = every_op()
    x = images(3, (4, 8, 8))
    ours = run_integer(qgraph_from_float(graph), x)
    np.testing.assert_allclose(ours, run_float(graph, x), rtol=1e-5, atol=1e-6)


def test_dequantized_output_is_exact_integer_times_scale():
    graph = MODELS["vgg"]()
    q = realized(graph, OPTION_SETS["max-int32acc-channel"], images(8, (3, 16, 16)))
    values = run_integer(q, images(4, (3, 16, 16), seed=5), keep="all")
    out = q.output
    scale = out.params["scale"].astype(np.float32)
    assert np.array_equal(values[out.name], values[out.inputs[0]].astype(np.float32) * scale)


def test_simulated_equals_integer_when_every_rescale_is_an_exact_shift():
    # power-of-2 scales, 16x16 -> gap over 4x4: no rounding outside the int8 grids
    graph = MODELS["resnet_v1"]()
    q = realized(graph, OPTION_SETS["power2-b16"], images(8, (3, 16, 16)))
    x = images(8, (3, 16, 16), seed=4)
    assert np.array_equal(run_integer(q, x).astype(np.float64), run_simulated(q, x))


def test_layer_errors_show_where_a_short_bias_costs_precision():
    from qcal.eval.layer_errors import layer_errors

    graph = MODELS["resnet_v1"]()
    calib, x = images(16, (3, 16, 16), seed=1), images(8, (3, 16, 16), seed=2)
    rows = {}
    for options in ("power2-b8", "power2-b16"):
        q = realized(graph, OPTION_SETS[options], calib)
        rows[options] = {r["tensor"]: r for r in layer_errors(q, graph, x)}
    first_conv = graph.nodes[1].name
    short, wide = rows["power2-b8"][first_conv], rows["power2-b16"][first_conv]
    assert short["bias_max_error"] > 10 * wide["bias_max_error"]
    assert short["bias_error_vs_acc_lsb"] > 0.5 >= wide["bias_error_vs_acc_lsb"]
    assert wide["sqnr_db"] > 25 and wide["sqnr_db"] >= short["sqnr_db"]
