import hashlib

import mxnet as mx
import numpy as np
import pytest

from qcal.errors import QcalError, UsageProblem
from qcal.families import canonical_model_name, family_of, listed_specs, resolve_model
from qcal.families.gluon import fetch_pretrained, pretrained_params_path


@pytest.fixture
def mxnet_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MXNET_HOME", str(tmp_path / "mxnet-home"))
    monkeypatch.setenv("QCAL_OFFLINE", "1")
    return tmp_path / "mxnet-home"


def saved_random_resnet18(path):
    net = resolve_model("resnet18_v1").resolved_network()
    net.initialize(mx.init.Normal(0.05), force_reinit=True)
    net.save_parameters(str(path))
    return net


def test_registry_lists_the_zoo_and_the_embedded_models():
    names = {spec.name for spec in listed_specs()}
    for depth in (18, 34, 50, 101, 152):
        assert {f"resnet{depth}_v1", f"resnet{depth}_v2"} <= names
    for depth in (11, 13, 16, 19):
        assert {f"vgg{depth}", f"vgg{depth}_bn"} <= names
    embedded = {spec.name for spec in listed_specs() if spec.family == "fashion-mnist"}
    assert embedded == {"fmnist_resnet20_v1", "fmnist_resnet56_v2", "fmnist_vgg11_bn"}


def test_each_name_has_exactly_one_family(tmp_path):
    for spec in listed_specs():
        assert family_of(spec.name).family == spec.family
    assert family_of("net.onnx").family == "onnx"
    with pytest.raises(UsageProblem, match="unknown model 'resnet19_v1'"):
        family_of("resnet19_v1")
    with pytest.raises(UsageProblem, match="ONNX model not found: missing.onnx"):
        canonical_model_name("missing.onnx")
    (tmp_path / "here.onnx").write_bytes(b"")
    assert canonical_model_name("here.onnx", base_dir=tmp_path) == str(tmp_path / "here.onnx")


def test_offline_pretrained_fails_at_once_naming_the_file(mxnet_home):
    expected = mxnet_home / "models" / "resnet18_v1-a0666292.params"
    with pytest.raises(QcalError) as info:
        resolve_model("resnet18_v1", pretrained=True).load()
    message = str(info.value)
    assert str(expected) in message and "--params FILE" in message and "\n" not in message


def test_offline_pretrained_tries_one_download_without_retries(tmp_path, monkeypatch):
    # A closed local port: a real failed download, refused immediately.
    monkeypatch.setenv("MXNET_HOME", str(tmp_path))
    monkeypatch.setenv("MXNET_GLUON_REPO", "http://127.0.0.1:9/")
    import time

    start = time.monotonic()
    with pytest.raises(QcalError, match="cannot be downloaded"):
        fetch_pretrained("resnet18_v1")
    assert time.monotonic() - start < 10
    assert not list(tmp_path.rglob("*.part"))


def test_model_store_file_is_found_and_loaded(mxnet_home, monkeypatch):
    from mxnet.gluon.model_zoo import model_store

    staged = mxnet_home / "staged.params"
    mxnet_home.mkdir()
    reference = saved_random_resnet18(staged)
    # The real sha1 of ImageNet weights cannot be met offline: register our fixture's sha1 instead
    # (the model store names its files by that hash, so the expected path follows from it).
    sha1 = hashlib.sha1(staged.read_bytes()).hexdigest()
    monkeypatch.setitem(model_store._model_sha1, "resnet18_v1", sha1)
    path = pretrained_params_path("resnet18_v1")
    assert path.name == f"resnet18_v1-{sha1[:8]}.params"
    path.parent.mkdir(parents=True)
    staged.rename(path)
    net = resolve_model("resnet18_v1", pretrained=True).load()
    x = mx.nd.array(np.random.RandomState(0).randn(1, 3, 224, 224))
    np.testing.assert_allclose(net(x).asnumpy(), reference(x).asnumpy(), rtol=1e-5, atol=1e-6)


def test_model_store_file_with_wrong_checksum_is_refused(mxnet_home):
    path = pretrained_params_path("resnet18_v1")
    path.parent.mkdir(parents=True)
    saved_random_resnet18(path)
    with pytest.raises(QcalError, match="does not match the model store's checksum"):
        resolve_model("resnet18_v1", pretrained=True).load()


def test_wrong_shaped_params_name_the_layer(tmp_path):
    path = tmp_path / "resnet18_v1-10classes.params"
    net = resolve_model("resnet18_v1").build_network(classes=10)
    net.initialize()
    net(mx.nd.zeros((1, 3, 224, 224)))
    net.save_parameters(str(path))
    with pytest.raises(QcalError, match=r"layer 'output.weight' has shape \(10, 512\), "
                                        r"the model needs \(1000, 512\)"):
        resolve_model("resnet18_v1", params=path).load()


def test_params_of_another_architecture_name_a_missing_layer(tmp_path):
    path = tmp_path / "r18.params"
    saved_random_resnet18(path)
    with pytest.raises(QcalError, match="layer '.*' is missing"):
        resolve_model("resnet34_v1", params=path).load()


def test_zoo_model_without_weights_is_refused():
    with pytest.raises(QcalError, match="needs weights"):
        resolve_model("vgg11").load()
