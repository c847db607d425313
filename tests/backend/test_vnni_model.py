"""A real model through the VNNI convs, end to end: the embedded Fashion-MNIST ResNet-20 v1
(trained weights; 16/32/64 channels, stride-2 blocks with 1x1 projection shortcuts), quantized
and compiled by ``compile_model`` for the host, equals ``run_integer`` bit for bit. On a host
without VNNI the convs are the emulated kernel (tests/backend/vnni_emulation.py): the same
layouts, packs, corrections and schedule, with ``vpdpbusd`` in plain int32 ops.
"""
from __future__ import annotations

import numpy as np
import pytest

from qcal.config import QuantOptions
from qcal.data.sources import FashionMNISTSource
from qcal.drivers.session import ModelSession
from qcal.reference.int_interpreter import run_integer
from tests.backend.vnni_emulation import TARGET, assert_vnni_kernel, vnni_kernels

tvm_adapter = pytest.importorskip("qcal.backend.tvm.emit")
from qcal.backend.tvm import schedules, vnni  # noqa: E402
from qcal.backend.tvm.compile import compile_model  # noqa: E402

with vnni_kernels():
    LANES = vnni.vnni_lanes(TARGET)


@pytest.mark.skipif(LANES is None, reason="this CPU has neither VNNI nor AVX2 to emulate it")
@pytest.mark.usefixtures("vnni_kernels")
def test_resnet20_through_vnni_convs_bit_exact(tmp_path):
    session = ModelSession("fmnist_resnet20_v1", {"calib_images": 32}, batch_size=32, quiet=True,
                           cache_dir=tmp_path)
    qgraph = session.quantize(QuantOptions(activation_method="power2", bias_bits=8))
    batch = 2
    lowered = schedules.lower(tvm_adapter.emit_relax(qgraph, batch), TARGET)
    rules = schedules.scheduled_functions(lowered)
    # every conv on VNNI, the stem's included; the projection shortcuts fused into their
    # block's last conv
    assert "conv2d_nchw" not in rules.values() and "conv2d_int16_pairs" not in rules.values()
    vnni_convs = [name for name, rule in rules.items() if rule == "conv2d_vnni"]
    assert any("shortcut" in name for name in vnni_convs), rules
    for name in vnni_convs:
        assert_vnni_kernel(lowered[name].script())
    images = FashionMNISTSource("t10k").decode(np.arange(5))  # the last batch padded
    compiled = compile_model(qgraph, batch, cache_dir=None)  # the host target, as TARGET
    assert np.array_equal(compiled.run(images), run_integer(qgraph, images))
