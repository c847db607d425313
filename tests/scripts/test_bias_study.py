"""scripts/bias_study.py: its pure functions on known answers, and one tiny real measurement."""
from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

from qcal.config import QuantOptions
from qcal.files import REPO_ROOT
from qcal.ir.graph import Graph, Node
from qcal.quant.realize import realize

SCRIPT = REPO_ROOT / "scripts" / "bias_study.py"


@pytest.fixture(scope="module")
def bs():
    spec = importlib.util.spec_from_file_location("bias_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bias_study"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _conv(name, inp, weight, bias=None, groups=1):
    params = {"weight": np.asarray(weight, np.float32)}
    if bias is not None:
        params["bias"] = np.asarray(bias, np.float32)
    return Node(name, "conv2d", (inp,), {"strides": (1, 1), "padding": (1, 1, 1, 1),
                                         "dilation": (1, 1), "groups": groups}, params)


def tiny_graph():
    """input (2x4x4) -> conv (3 ch, bias) -> relu -> depthwise (3 ch, bias)
       -> channel_affine -> global avg pool -> flatten -> dense (2, bias)"""
    rng = np.random.RandomState(0)
    nodes = [
        Node("x", "input", attrs={"shape": (2, 4, 4)}),
        _conv("c0", "x", rng.randn(3, 2, 3, 3) * 0.3, [0.5, -0.01, 0.2]),
        Node("r0", "relu", ("c0",)),
        _conv("dw", "r0", rng.randn(3, 1, 3, 3) * 0.3, [1.5, 0.003, -0.7], groups=3),
        Node("aff", "channel_affine", ("dw",), params={
            "scale": np.array([0.9, 1.1, 0.5], np.float32),
            "shift": np.array([0.25, -0.125, 0.0], np.float32)}),
        Node("gap", "global_avg_pool2d", ("aff",)),
        Node("flat", "flatten", ("gap",)),
        Node("fc", "dense", ("flat",), params={"weight": rng.randn(2, 3).astype(np.float32),
                                               "bias": np.array([0.1, -0.3], np.float32)}),
    ]
    return Graph(nodes, "tiny")


class TestLayers:
    def test_kinds(self, bs):
        g = tiny_graph()
        assert [(n.name, bs.layer_kind(n)) for n in bs.biased_layers(g)] == [
            ("c0", "conv"), ("dw", "depthwise"), ("aff", "channel_affine"), ("fc", "dense")]
        assert bs.layer_kind(g.node("r0")) is None

    def test_conv_without_bias_is_not_a_bias_layer(self, bs):
        assert bs.layer_kind(_conv("c", "x", np.ones((2, 2, 3, 3)))) is None

    def test_grouped_conv_with_several_inputs_per_group_is_a_conv(self, bs):
        assert bs.layer_kind(_conv("c", "x", np.ones((4, 2, 3, 3)), [0] * 4, groups=2)) == "conv"

    def test_channel_affine_bias_is_its_shift(self, bs):
        assert bs.layer_bias(tiny_graph().node("aff")).tolist() == [0.25, -0.125, 0.0]


class TestBiasQuantization:
    def test_step_is_power_of_two_of_absmax(self, bs):
        # max |b| = 0.7 -> 2**ceil(log2 0.7) = 1 -> step 1/128 at 8 bits, 1/256 at 9, 2**-15 at 16
        b = np.array([0.7, -0.01, 0.2])
        assert [bs.bias_step(b, bits) for bits in (8, 9, 16)] == [2 ** -7, 2 ** -8, 2 ** -15]

    def test_quantized_values_and_zeroed_channels(self, bs):
        b = np.array([0.7, -0.003, 0.2, 0.0])
        q = bs.quantized_bias(b, 8)
        assert q.tolist() == [90 / 128, 0.0, 26 / 128, 0.0]
        # -0.003 is under half a step (1/256): it becomes 0; the exact zero is not counted
        assert bs.rounded_to_zero(b, 8) == 1
        assert bs.rounded_to_zero(b, 16) == 0

    def test_spread(self, bs):
        assert bs.bias_spread([4.0, -1.0, 2.0, 0.0]) == 2.0  # max 4 / median(4, 1, 2) 2
        assert np.isnan(bs.bias_spread([0.0, 0.0]))


class TestSqnr:
    def test_bias_only_is_mean_square_over_mean_squared_error(self, bs):
        # output mean square 1; errors 0.1 and 0 on two channels -> noise 0.005 -> 23.01 dB
        assert bs.bias_only_sqnr_db(1.0, [0.1, 0.0]) == pytest.approx(10 * np.log10(200))

    def test_excess(self, bs):
        assert bs.excess_sqnr_db(100.0, 3.0, 2.0) == pytest.approx(20.0)
        assert bs.excess_sqnr_db(100.0, 2.0, 3.0) == float("inf")

    def test_energies_accumulate_across_batches(self, bs):
        e = bs.Energies()
        ref1, ref2 = np.array([1.0, -1.0]), np.array([2.0, 0.0])
        e.add_reference(ref1)
        e.add_noise("v", ref1, ref1 + 0.5)
        e.add_reference(ref2)
        e.add_noise("v", ref2, ref2)
        assert (e.signal, e.count, e.noise["v"]) == (6.0, 4, 0.5)
        assert e.sqnr("v") == pytest.approx(10 * np.log10(12))
        assert e.std == pytest.approx(np.std([1.0, -1.0, 2.0, 0.0]))

    def test_dc_share(self, bs):
        e = bs.Energies()
        ref = np.zeros((2, 2, 1, 2))  # N C H W
        approx = np.zeros_like(ref)
        approx[:, 0] = 0.5  # channel 0: a constant error, all of it DC
        approx[:, 1, 0] = [[1.0, -1.0], [1.0, -1.0]]  # channel 1: zero-mean error
        e.add_reference(ref)
        e.add_noise("v", ref, approx)
        # DC energy 4 * 0.25 = 1 of a noise energy 1 + 4 = 5
        assert e.dc_share("v") == pytest.approx(0.2)


class TestTextHelpers:
    @pytest.mark.parametrize("name, short", [
        ("vgg0_conv3_fwd", "conv3"),
        ("cifarresnetv20_stage1_conv0_fwd", "stage1_conv0"),
        ("/_blocks.1/_depthwise_conv/Conv", "blocks.1/depthwise_conv"),
        ("/_fc/Gemm", "fc"),
        ("plain", "plain"),
    ])
    def test_short_name(self, bs, name, short):
        assert bs.short_name(name) == short

    def test_powers_of_two(self, bs):
        assert bs.power_of_two_text(2 ** -14) == "2^-14"
        assert bs.power_of_two_text(0.3) == "3.00e-01"
        assert bs.scale_text(np.array([2 ** -3, 2 ** -5])) == "2^-5..2^-3"
        assert bs.shift_text(np.array([0, 0])) == "0"


class TestOnIntegerGraphs:
    """Static facts read off a realized QGraph of the tiny model."""

    AMAX = {"x": 2.0, "c0": 4.0, "r0": 4.0, "dw": 4.0, "aff": 4.0, "gap": 4.0, "flat": 4.0,
            "fc": 4.0}

    def _q(self, bs, label):
        return realize(tiny_graph(), self.AMAX, bs.variant_options(label))

    def test_variants_differ_only_where_named(self, bs):
        assert bs.variant_options("b8") == QuantOptions(
            activation_method="power2", weight_scale="power2", weight_granularity="tensor",
            bias_bits=8)
        assert bs.variant_options("pc-b32acc").weight_granularity == "channel"
        assert set(bs.REFERENCE_OF.values()) <= set(bs.VARIANTS)

    def test_bias_as_added_matches_the_quantized_bias(self, bs):
        g = tiny_graph()
        for label, bits in (("b8", 8), ("b16", 16)):
            q = self._q(bs, label)
            for node in bs.biased_layers(g):
                bias = bs.layer_bias(node)
                added = bs.bias_as_added(q, node.name, bias)
                # the realizer adds exactly the B-bit value (shifted, never re-rounded) here
                expected = np.abs(bs.quantized_bias(bias, bits) - bias)
                np.testing.assert_allclose(added.error, expected, atol=1e-12)
                assert np.all(added.acc_shift >= 0)

    def test_int32_acc_error_is_at_most_half_an_lsb(self, bs):
        q = self._q(bs, "b32acc")
        for node in bs.biased_layers(tiny_graph()):
            added = bs.bias_as_added(q, node.name, bs.layer_bias(node))
            assert np.all(added.acc_shift == 0)
            # float32 biases against a float64 grid: half an LSB plus float32 representation
            assert np.all(added.error_lsb <= 0.5 + 1e-6)

    def test_8bit_bias_coarser_than_accumulator_shifts_the_bias_not_the_accumulator(self, bs):
        q = self._q(bs, "b8")
        added = bs.bias_as_added(q, "dw", bs.layer_bias(tiny_graph().node("dw")))
        step = bs.bias_step(bs.layer_bias(tiny_graph().node("dw")), 8)
        assert np.all(step > added.acc_scale)  # 2**-6 (max |b| 1.5) vs s_in * s_w = 2**-12
        assert np.all(added.acc_shift == 0)
        assert added.error_lsb.max() > 0.5

    def test_16bit_bias_finer_than_accumulator_shifts_the_accumulator(self, bs):
        q = self._q(bs, "b16")
        added = bs.bias_as_added(q, "dw", bs.layer_bias(tiny_graph().node("dw")))
        # step 2**-14 (max |b| 1.5) against an accumulator LSB s_in * s_w = 2**-5 * 2**-7: acc << 2
        assert added.acc_scale.tolist() == [2 ** -12] * 3
        assert added.acc_shift.tolist() == [2, 2, 2]
        assert np.all(added.error_lsb <= 2 ** -2 / 2 + 1e-6)  # half a 16-bit step, in acc LSB

    def test_single_bias_variant_adds_the_8bit_bias_at_that_layer_only(self, bs):
        ranges = lambda options, tensors, levels: {t: self.AMAX[t] for t in tensors}  # noqa: E731
        b8, b32 = self._q(bs, "b8"), self._q(bs, "b32acc")
        one = bs.single_bias_variant(tiny_graph(), ranges, "b32acc", "dw")
        # bit for bit the 8-bit variant's bias at dw, the int32-acc biases elsewhere
        assert np.array_equal(one.node("dw").params["bias"], b8.node("dw").params["bias"])
        assert not np.array_equal(one.node("dw").params["bias"], b32.node("dw").params["bias"])
        for layer in ("c0", "aff", "fc"):
            assert np.array_equal(one.node(layer).params["bias"], b32.node(layer).params["bias"])
        assert bs.ABLATION_DONOR["b32acc"] == "b8"

    def test_float_graph_with_quantized_biases(self, bs):
        g = tiny_graph()
        g8 = bs.with_quantized_biases(g, 8)
        assert g8.node("aff").params["shift"].tolist() == bs.quantized_bias(
            bs.layer_bias(g.node("aff")), 8).astype(np.float32).tolist()
        assert np.array_equal(g8.node("c0").params["weight"], g.node("c0").params["weight"])
        assert np.array_equal(g.node("c0").params["bias"], np.float32([0.5, -0.01, 0.2]))
        only = bs.with_quantized_biases(g, 8, {"fc"})
        assert np.array_equal(only.node("c0").params["bias"], g.node("c0").params["bias"])
        assert not np.array_equal(only.node("fc").params["bias"], g.node("fc").params["bias"])


def test_whole_study_on_the_embedded_vgg(bs, tmp_path, capsys):
    """The script end to end on 8 real Fashion-MNIST images (a few seconds)."""
    from qcal.families import resolve_model

    if not resolve_model("fmnist_vgg11_bn").weights_file().is_file():
        pytest.skip("fmnist_vgg11_bn weights are not in weights/fashion-mnist/")
    out = tmp_path / "vgg.md"
    assert bs.main(["fmnist_vgg11_bn", "--images", "8", "--calib-images", "16",
                    "--ablate-images", "4", "--batch-size", "4", "--output", str(out)]) == 0
    text = out.read_text()
    assert text == capsys.readouterr().out.split("on 8 images\n", 1)[1].rstrip("\n") + "\n"
    # one row per biased layer (8 convs, 3 dense) in each per-layer table
    assert sum(line.startswith("| conv") or line.startswith("| dense") for line in
               text.splitlines()) == 2 * 11
    assert "| b32acc | " in text and "| float+b8 | " in text
    assert "ranked by single-layer ablation" in text


def test_unknown_variant_is_refused(bs):
    with pytest.raises(SystemExit) as e:
        bs.main(["fmnist_vgg11_bn", "--variants", "b8,b7"])
    assert e.value.code == 2


def test_bias_share(bs):
    # biases 1 and 3 -> mean square 5; output mean square 20 -> a quarter of the energy
    assert bs.bias_share([1.0, -3.0], 20.0) == pytest.approx(0.25)
