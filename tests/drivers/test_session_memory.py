"""What a variant leaves behind: nothing compiled outlives the variant that compiled it."""
import gc

import numpy as np
import pytest

from qcal.backend.tvm.compile import CompiledModel
from qcal.config import QuantOptions
from qcal.drivers.session import ModelSession
from tests.fixtures import write_jpeg

SIZE = 13  # odd on purpose


def tiny_onnx(path, rng, classes=3):
    """x(N x 3 x 13 x 13) - Conv 3x3 (16: the int16-pair kernel) - Relu - Conv 3x3/2 depthwise - Clip 0..6
    - GlobalAveragePool - Flatten - Gemm (transB) -> 3 logits, random weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def const(name, shape, scale=0.5):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32),
                                       name)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="dw", pads=[1, 1, 1, 1],
                         strides=[2, 2], group=16),
        helper.make_node("Clip", ["c2", "lo", "hi"], ["r2"], name="relu6"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wd", "bd"], ["y"], name="fc", transB=1),
    ]
    initializers = [const("w1", (16, 3, 3, 3)), const("b1", (16,), 0.1),
                    const("w2", (16, 1, 3, 3)), const("b2", (16,), 0.1),
                    numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
                    numpy_helper.from_array(np.array(6.0, np.float32), "hi"),
                    const("wd", (classes, 16)), const("bd", (classes,), 0.1)]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                      ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", classes])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    helper.set_model_props(model, {"qcal.mean": "127,127,127", "qcal.std": "128,128,128"})
    onnx.save(model, str(path))
    return path


def compiled_models_alive() -> int:
    # no gc.collect() first: a compiled model kept only by a reference cycle would hold its
    # library and buffers until some later collection, which counts as kept here
    return sum(isinstance(o, CompiledModel) for o in gc.get_objects())


@pytest.mark.slow
def test_each_variant_releases_what_it_compiled(tmp_path, monkeypatch):
    monkeypatch.setenv("QCAL_CACHE_DIR", str(tmp_path / "compiled"))
    rng = np.random.default_rng(5)
    model = tiny_onnx(tmp_path / "tiny.onnx", rng)
    for i in range(14):
        write_jpeg(tmp_path / "images" / str(i % 3) / f"{i:02d}.jpg", np.random.RandomState(i))
    data = {"data": str(tmp_path / "images"), "num_images": 9, "calib_range": "9:14"}
    session = ModelSession(str(model), data, batch_size=4, quiet=True, cache_dir=tmp_path / "batches")
    before = compiled_models_alive()
    float_result, _, _ = session.evaluate(None)
    assert compiled_models_alive() == before
    for options in (QuantOptions(), QuantOptions(activation_method="max", bias_mode="int32-acc")):
        result, _, extra = session.evaluate(options)
        assert result.images == 9 and result.predictions.shape == (9, 3) == result.logits.shape
        assert [row["tensor"] for row in extra["layers"]][:2] == ["conv1", "relu1"]
        assert compiled_models_alive() == before
    assert float_result.images == 9
