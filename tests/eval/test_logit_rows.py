"""Per-image logits streamed (``qcal.eval.logit_rows``, ``evaluate``'s ``reference`` and
``logits_file``, ``FidelityAccumulator``): the same figures as the arrays kept whole, memory that
does not grow with the number of evaluated images."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from qcal.data.plan import Selection
from qcal.data.sources import FashionMNISTSource
from qcal.eval.evaluate import evaluate
from qcal.eval.fidelity import FidelityAccumulator, compare
from qcal.eval.logit_rows import ArrayRows, LogitsReader, LogitsWriter
from qcal.files import checked_path

CLASSES = 1000  # ImageNet's: 4 KB of logits an image


@pytest.fixture(scope="module")
def source():
    return FashionMNISTSource("t10k")


class LinearClassifier:
    """A real runner of the protocol: images (N, 1, 32, 32) float32 (Fashion-MNIST padded as
    qcal feeds it) -> logits (N, classes)."""

    def __init__(self, seed, noise=0.0):
        rng = np.random.default_rng(seed)
        self.weight = rng.standard_normal((32 * 32, CLASSES)).astype(np.float32) / 32
        if noise:
            self.weight += noise * rng.standard_normal(self.weight.shape).astype(np.float32)

    def __call__(self, images):
        return images.reshape(len(images), -1).astype(np.float32) @ self.weight


@pytest.mark.parametrize("batch", [1, 7, 64, 1000])
def test_accumulator_in_batches_equals_compare_on_whole_arrays(batch):
    rng = np.random.default_rng(batch)
    reference = rng.standard_normal((3000, 23)).astype(np.float32) * 4
    logits = (reference + rng.standard_normal(reference.shape) * 0.5).astype(np.float32)
    accumulator = FidelityAccumulator(rows_per_pass=512)
    for start in range(0, len(reference), batch):
        accumulator.update(reference[start:start + batch], logits[start:start + batch])
    assert accumulator.result("_x") == compare(reference, logits, "_x", rows_per_pass=512)
    with pytest.raises(ValueError, match="same images"):
        FidelityAccumulator().update(reference[:3], logits[:4])


def test_logits_file_round_trip_with_a_check_record(tmp_path):
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((10, 5)).astype(np.float32)
    path = tmp_path / "logits.npy"
    with checked_path(path, "test logits", "k", suffix=".npy") as tmp:
        writer = LogitsWriter(tmp, 10)
        writer.write(rows[:4])
        writer.write(rows[4:].astype(np.float64))  # written as float32
        writer.close()
    assert np.array_equal(np.load(path), rows)  # a plain .npy; the record after it is ignored
    reader = LogitsReader(path)
    assert (reader.rows, reader.classes) == (10, 5)
    assert np.array_equal(reader.take(3), rows[:3]) and np.array_equal(reader.take(7), rows[3:])
    with pytest.raises(ValueError, match="asked after"):
        reader.take(1)
    reader.close()
    short = LogitsWriter(tmp_path / "short.npy", 10)
    short.write(rows[:4])
    with pytest.raises(ValueError, match="4 rows of logits written, 10 expected"):
        short.close()


def test_evaluate_streams_the_same_figures(source, tmp_path):
    """float32 written to a file as it runs, a variant compared with that file batch by batch:
    the figures ``compare`` gives on both runs' logits kept whole; top-1/top-5 unchanged."""
    selection = Selection(source, 0, 300)
    float32, variant = LinearClassifier(1), LinearClassifier(1, noise=0.01)
    kept = evaluate(float32, selection, 32)
    path = tmp_path / "float32.npy"
    written = evaluate(float32, selection, 32, logits_file=path)
    assert written.logits is None and np.array_equal(np.load(path), kept.logits)
    assert (written.top1, written.top5) == (kept.top1, kept.top5)
    whole = evaluate(variant, selection, 32)
    reader = LogitsReader(path)
    streamed = evaluate(variant, selection, 32, reference=reader, fidelity_suffix="_crops")
    reader.close()
    assert streamed.logits is None
    assert streamed.fidelity == compare(kept.logits, whole.logits, "_crops")
    assert 0 < streamed.fidelity["agree_top1_crops"] < 100  # the noise moved some top-1s
    # another batch size: float32 BLAS rounds the runner's own logits by the batch's shape
    from_array = evaluate(variant, selection, 50, reference=ArrayRows(kept.logits))
    assert from_array.fidelity == compare(kept.logits, evaluate(variant, selection, 50).logits)
    with pytest.raises(ValueError, match="300 reference rows for 10 images"):
        evaluate(variant, Selection(source, 0, 10), 32, reference=ArrayRows(kept.logits))


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_images(source, tmp_path):
    """6,000 images against 2,500 (both more than one pass of the fidelity sums, whose float64
    temporaries are ``ROWS_PER_PASS`` rows): kept whole, the logits alone would add 14 MB (4 KB an
    image); the per-image top-5 and labels the results keep are 28 bytes an image."""
    float32, variant = LinearClassifier(2), LinearClassifier(2, noise=0.01)
    peaks = []
    for images in (2500, 6000):
        selection = Selection(source, 0, images)
        path = tmp_path / f"float32-{images}.npy"
        write = _peak_bytes(lambda: evaluate(float32, selection, 50, logits_file=path))
        reader = LogitsReader(path)
        compare_peak = _peak_bytes(lambda: evaluate(variant, selection, 50, reference=reader))
        reader.close()
        peaks.append(max(write, compare_peak))
    assert peaks[1] - peaks[0] < 2_000_000, peaks
