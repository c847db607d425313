"""The real embedded models, quantized: TVM's integer model equals its numpy reference bit for bit,
and the simulated (fake-quantized float) model agrees with it on top-1, on Fashion-MNIST test images.

One power-of-2 variant (every rescale an exact shift: docs/background.md's set-up, 8-bit bias) and one with
fixed-point multipliers (KL ranges, per-channel max weights, int32 accumulator bias) per model.
"""
import numpy as np
import pytest

from qcal.backend.tvm.compile import compile_model
from qcal.config import QuantOptions
from qcal.data.sources import FashionMNISTSource
from qcal.drivers.session import ModelSession
from qcal.families.embedded import EMBEDDED_MODELS
from qcal.reference.int_interpreter import run_integer, run_simulated

VARIANTS = {
    "power2-b8": QuantOptions(activation_method="power2", bias_bits=8),
    "kl-channel-int32acc": QuantOptions(activation_method="kl", weight_scale="max",
                                        weight_granularity="channel", bias_mode="int32-acc"),
}
IMAGES = 256


@pytest.fixture(scope="module", params=EMBEDDED_MODELS)
def session(request, tmp_path_factory):
    return ModelSession(request.param, {"calib_images": 256}, batch_size=64, quiet=True,
                        cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def test_images():
    return FashionMNISTSource("t10k").decode(np.arange(IMAGES))


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_tvm_equals_numpy_reference_and_simulation_agrees(session, test_images, variant):
    qgraph = session.quantize(VARIANTS[variant])
    # the whole model runs in integers, but for ResNet v2's parameter-free BatchNorm on the image
    float_nodes = [n for n in qgraph.nodes if not n.is_int and n.op not in ("input", "dequantize")]
    assert all(n.op == "channel_affine" and n.inputs == (qgraph.input.name,) for n in float_nodes)
    tvm_logits = compile_model(qgraph, 64).run(test_images)
    reference = run_integer(qgraph, test_images)  # also checks every proven bound
    assert np.array_equal(tvm_logits, reference)
    simulated = run_simulated(qgraph, test_images)
    assert np.array_equal(reference.argmax(axis=1), simulated.argmax(axis=1))
    if variant == "power2-b8":  # every rescale an exact shift: the simulation is exact too
        assert np.array_equal(reference, simulated)
