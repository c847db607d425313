"""The shipped Fashion-MNIST models: weights intact and float32 accuracy exactly as recorded."""
import hashlib
import json

import pytest

from qcal.data.plan import Selection
from qcal.data.sources import FashionMNISTSource
from qcal.eval.evaluate import evaluate
from qcal.families import resolve_model
from qcal.families.embedded import EMBEDDED_MODELS, EMBEDDED_WEIGHTS_DIR


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
    model = resolve_model(name)
    result = evaluate(model.float_runner(None, record["eval_batch_size"]),
                      Selection(source, 0, len(source)), record["eval_batch_size"])
    assert result.images == 10000
    assert result.top1 == record["float32_test_top1"]
    assert result.top5 == record["float32_test_top5"]
    assert result.top1 >= 0.90  # what an embedded default must reach to be worth quantizing
