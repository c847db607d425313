"""The shipped Fashion-MNIST models: weights intact and float32 accuracy exactly as recorded."""
import hashlib
import json

import pytest

from qcal.datasets import FashionMNISTSource, Selection
from qcal.evaluate import MXNetFloatRunner, evaluate
from qcal.models import EMBEDDED_MODELS, EMBEDDED_WEIGHTS_DIR, load_model


def record_of(name):
    return json.loads((EMBEDDED_WEIGHTS_DIR / f"{name}.json").read_text())


@pytest.mark.parametrize("name", EMBEDDED_MODELS)
def test_weights_match_their_recorded_checksum(name):
    params = EMBEDDED_WEIGHTS_DIR / f"{name}.params"
    assert hashlib.sha256(params.read_bytes()).hexdigest() == record_of(name)["sha256"]


@pytest.mark.slow
@pytest.mark.parametrize("name", EMBEDDED_MODELS)
def test_float32_accuracy_on_the_test_set_equals_the_record(name):
    record = record_of(name)
    source = FashionMNISTSource("t10k")
    result = evaluate(MXNetFloatRunner(load_model(name)), Selection(source, 0, len(source)),
                      record["eval_batch_size"])
    assert result.images == 10000
    assert result.top1 == record["float32_test_top1"]
    assert result.top5 == record["float32_test_top5"]
    assert result.top1 >= 0.90  # the floor for every embedded model
