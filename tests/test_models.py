import hashlib

import mxnet as mx
import numpy as np
import pytest

from qcal import models
from qcal.errors import QcalError


@pytest.fixture
def mxnet_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MXNET_HOME", str(tmp_path / "mxnet-home"))
    monkeypatch.setenv("QCAL_OFFLINE", "1")
    return tmp_path / "mxnet-home"


def saved_random_resnet18(path):
    net = models._resolved_network("resnet18_v1")
    net.initialize(mx.init.Normal(0.05), force_reinit=True)
    net.save_parameters(str(path))
    return net


def test_registry_lists_the_zoo_and_the_embedded_models():
    names = set(models.MODEL_SPECS)
    for depth in (18, 34, 50, 101, 152):
        assert {f"resnet{depth}_v1", f"resnet{depth}_v2"} <= names
    for depth in (11, 13, 16, 19):
        assert {f"vgg{depth}", f"vgg{depth}_bn"} <= names
    assert set(models.EMBEDDED_MODELS) == {"fmnist_resnet20_v1", "fmnist_resnet56_v2",
                                           "fmnist_vgg11_bn"}


def test_offline_pretrained_fails_at_once_naming_the_file(mxnet_home):
    expected = mxnet_home / "models" / "resnet18_v1-a0666292.params"
    with pytest.raises(QcalError) as info:
        models.load_model("resnet18_v1", pretrained=True)
    message = str(info.value)
    assert str(expected) in message and "--params FILE" in message and "\n" not in message


def test_offline_pretrained_tries_one_download_without_retries(tmp_path, monkeypatch):
    # A closed local port: a real failed download, refused immediately.
    monkeypatch.setenv("MXNET_HOME", str(tmp_path))
    monkeypatch.setenv("MXNET_GLUON_REPO", "http://127.0.0.1:9/")
    import time

    start = time.monotonic()
    with pytest.raises(QcalError, match="cannot be downloaded"):
        models.fetch_pretrained("resnet18_v1")
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
    path = models.pretrained_params_path("resnet18_v1")
    assert path.name == f"resnet18_v1-{sha1[:8]}.params"
    path.parent.mkdir(parents=True)
    staged.rename(path)
    net = models.load_model("resnet18_v1", pretrained=True)
    x = mx.nd.array(np.random.RandomState(0).randn(1, 3, 224, 224))
    np.testing.assert_allclose(net(x).asnumpy(), reference(x).asnumpy(), rtol=1e-5, atol=1e-6)


def test_model_store_file_with_wrong_checksum_is_refused(mxnet_home):
    path = models.pretrained_params_path("resnet18_v1")
    path.parent.mkdir(parents=True)
    saved_random_resnet18(path)
    with pytest.raises(QcalError, match="does not match the model store's checksum"):
        models.load_model("resnet18_v1", pretrained=True)


def test_wrong_shaped_params_name_the_layer(tmp_path):
    path = tmp_path / "resnet18_v1-10classes.params"
    net = models.build_network("resnet18_v1", classes=10)
    net.initialize()
    net(mx.nd.zeros((1, 3, 224, 224)))
    net.save_parameters(str(path))
    with pytest.raises(QcalError, match=r"layer 'output.weight' has shape \(10, 512\), "
                                        r"the model needs \(1000, 512\)"):
        models.load_model("resnet18_v1", params=path)


def test_params_of_another_architecture_name_a_missing_layer(tmp_path):
    path = tmp_path / "r18.params"
    saved_random_resnet18(path)
    with pytest.raises(QcalError, match="layer '.*' is missing"):
        models.load_model("resnet34_v1", params=path)


def test_zoo_model_without_weights_is_refused():
    with pytest.raises(QcalError, match="needs weights"):
        models.load_model("vgg11")
