"""A researcher's own files: a gluoncv CIFAR net with random weights saved the three usual ways
(save_parameters, HybridBlock.export, mxnet.onnx.export_model with a dynamic batch), a folder of
grey PNGs with custom class names; each route against MXNet's own forward of the same network."""
import json
import logging

import mxnet as mx
import numpy as np
import pytest

from qcal.data.sources import ImageFolderSource
from qcal.errors import QcalError, UsageProblem
from qcal.families import family_of, resolve_model
from qcal.reference.float_interpreter import run_float

CLASSES = 7  # not CIFAR's 10: the class count must come from the files
MEAN, STD = 0.3, 0.4
PREPROCESSING = {"input_size": 32, "resize": "none", "pad": 2, "channels": 3,
                 "mean": [MEAN] * 3, "std": [STD] * 3}


def randomise(net, seed):
    rng = np.random.RandomState(seed)
    for name, param in net.collect_params().items():
        shape = param.shape
        if param.grad_req == "null" and "running" not in name:
            continue  # a fixed gamma (BatchNorm(scale=False)): training never moves it from 1
        if name.endswith("running_var") or name.endswith("gamma"):
            value = rng.uniform(0.5, 1.5, shape)
        elif name.endswith("running_mean") or name.endswith("beta"):
            value = rng.normal(0, 0.2, shape)
        else:
            value = rng.normal(0, np.sqrt(2.0 / max(1, np.prod(shape[1:]))), shape)
        param.set_data(mx.nd.array(value))


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    from gluoncv.model_zoo import get_model
    from mxnet import onnx as mx_onnx

    root = tmp_path_factory.mktemp("byom")
    net = get_model("cifar_resnet20_v2", classes=CLASSES)
    net.initialize()
    net(mx.nd.zeros((1, 3, 32, 32)))
    randomise(net, 5)
    net.hybridize()
    net(mx.nd.zeros((1, 3, 32, 32)))
    mx.nd.waitall()
    net.save_parameters(str(root / "mine.params"))
    net.export(str(root / "mine"))
    mx_onnx.export_model(str(root / "mine-symbol.json"), str(root / "mine-0000.params"),
                         in_shapes=[(1, 3, 32, 32)], in_types=[np.float32],
                         onnx_file_path=str(root / "mine.onnx"), dynamic=True,
                         dynamic_input_shapes=[(None, 3, 32, 32)])
    for stem in ("mine",):
        (root / f"{stem}.preprocess.json").write_text(json.dumps(PREPROCESSING))
    bare = root / "bare"  # the ONNX file alone, nothing declaring its preprocessing
    bare.mkdir()
    (bare / "mine.onnx").write_bytes((root / "mine.onnx").read_bytes())
    import cv2

    rng = np.random.RandomState(2)
    pixels = []
    for i, folder in enumerate(["sandal", "bag", "coat", "sandal", "boot", "bag"]):
        image = rng.randint(0, 256, size=(28, 28), dtype=np.uint8)
        path = root / "png" / folder / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(path), image)
        pixels.append(image)
    x = np.pad(np.stack(pixels), ((0, 0), (2, 2), (2, 2))).astype(np.float32) / 255.0
    x = np.repeat(((x - np.float32(MEAN)) / np.float32(STD))[:, None], 3, axis=1)
    return {"root": root, "bare": bare, "net": net, "x": x.astype(np.float32),
            "mxnet_logits": net(mx.nd.array(x)).asnumpy()}


ROUTES = {
    "export pair": lambda r: resolve_model(str(r / "mine-symbol.json"),
                                           params=r / "mine-0000.params"),
    "export pair, params found beside": lambda r: resolve_model(str(r / "mine-symbol.json")),
    "gluoncv name": lambda r: resolve_model("cifar_resnet20_v2", params=r / "mine.params"),
}


@pytest.mark.parametrize("route", ROUTES)
def test_gluon_routes_run_the_users_network(user_files, route):
    root = user_files["root"]
    model = ROUTES[route](root)
    assert model.spec.classes == CLASSES and model.spec.input_shape[0] == 3
    pre = model.preprocessing({})  # all of it from mine.preprocess.json
    assert (pre.input_size, pre.pad, pre.resize, pre.mean) == (32, 2, "none", (MEAN,) * 3)
    source = ImageFolderSource(root / "png", pre)
    x = source.decode(range(len(source)))
    order = [int(f.stem) for f in source.files]
    np.testing.assert_allclose(x, user_files["x"][order], rtol=0, atol=1e-6)
    logits = model.float_runner(None, 4)(x)
    np.testing.assert_allclose(logits, user_files["mxnet_logits"][order], rtol=1e-5, atol=1e-5)
    graph = model.import_graph(model.input_shape(pre))  # qcal's own graph, BatchNorm folded
    np.testing.assert_allclose(run_float(graph, x), logits, rtol=1e-4, atol=1e-4)
    assert source.labels.tolist() == [["bag", "boot", "coat", "sandal"].index(f.parent.name)
                                      for f in source.files]


def test_dynamic_onnx_export_is_accepted_and_says_what_it_lacks(user_files):
    root, bare = user_files["root"], user_files["bare"]
    assert family_of(str(root / "mine.onnx")).family == "onnx"
    model = resolve_model(str(bare / "mine.onnx"))
    assert model.spec.input_shape == (3, 32, 32) and model.spec.classes is None
    with pytest.raises(UsageProblem, match="mine does not state its preprocessing: pass --mean, "
                                           "--std"):
        model.preprocessing({})
    pre = model.preprocessing({"mean": MEAN, "std": STD, "resize": "none", "pad": 2})
    assert pre.input_size == 32  # the file's own input, not 224
    declared = resolve_model(str(root / "mine.onnx")).preprocessing({})
    assert declared.pad == 2 and declared.mean == (MEAN,) * 3
    graph = model.import_graph(model.input_shape(pre))
    np.testing.assert_allclose(run_float(graph, user_files["x"]), user_files["mxnet_logits"],
                               rtol=1e-4, atol=1e-4)


def test_given_preprocessing_that_contradicts_the_declared_one_warns(user_files, caplog):
    model = resolve_model(str(user_files["root"] / "mine-symbol.json"))
    with caplog.at_level(logging.WARNING, logger="qcal"):
        pre = model.preprocessing({"pad": 0, "input_size": 32, "mean": "0.485,0.456,0.406"})
    messages = [r.getMessage() for r in caplog.records]
    assert pre.pad == 0 and len(messages) == 2
    assert "mine: pad 0 differs from 2, which mine.preprocess.json declares; using 0" in messages
    assert any(m.startswith("mine: mean 0.485,0.456,0.406 differs from 0.3,0.3,0.3") for m in messages)


def test_bad_files_are_named(user_files, tmp_path):
    root = user_files["root"]
    (tmp_path / "lonely-symbol.json").write_text((root / "mine-symbol.json").read_text())
    with pytest.raises(UsageProblem, match="lonely-symbol.json needs its weights: no "
                                           "lonely-NNNN.params beside it"):
        resolve_model(str(tmp_path / "lonely-symbol.json"))
    other = get_other_params(tmp_path)
    with pytest.raises(QcalError, match="does not fit mine-symbol.json"):
        resolve_model(str(root / "mine-symbol.json"), params=other)
    with pytest.raises(QcalError, match="does not fit this architecture"):
        resolve_model("cifar_resnet56_v2", params=root / "mine.params").load()
    with pytest.raises(UsageProblem, match="'cifar_resnet20_v1' needs weights: pass --params"):
        resolve_model("cifar_resnet20_v1").load()
    with pytest.raises(UsageProblem, match="holds its own weights"):
        resolve_model(str(root / "mine.onnx"), params=root / "mine.params")


def get_other_params(tmp_path):
    from gluoncv.model_zoo import get_model

    net = get_model("cifar_resnet20_v1", classes=3)
    net.initialize()
    net(mx.nd.zeros((1, 3, 32, 32)))
    net.hybridize()
    net(mx.nd.zeros((1, 3, 32, 32)))
    net.export(str(tmp_path / "other"))
    return tmp_path / "other-0000.params"
