"""Fixtures that make small but real inputs on disk: JPEG class folders, RecordIO files."""
from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, settings

from tests.fixtures import write_jpeg

# Compiled libraries go to a cache private to this test run: no test is served a library built by
# an earlier run or by a sweep in the working tree.
os.environ["QCAL_CACHE_DIR"] = tempfile.mkdtemp(prefix="qcal-test-compiled-")

# Property tests (hypothesis). An example compiles two or three TVM modules (1-4 s), so CI runs
# a fixed, derandomized budget: the same examples on every run, no database, no shrinking (a
# failure prints its unshrunk example; shrinking one took minutes). "long" is for a developer
# (QCAL_HYPOTHESIS_PROFILE=long): ten times the examples, fresh ones on each run, shrunk, and
# failures kept in .hypothesis/ and replayed first next time. Tests scale max_examples by their
# cost (tests/backend/test_schedules_fuzz.py: budget).
_SLOW_EXAMPLES = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("ci", max_examples=6, derandomize=True, database=None, deadline=None,
                          phases=[Phase.explicit, Phase.generate],
                          suppress_health_check=_SLOW_EXAMPLES, print_blob=True)
settings.register_profile("long", max_examples=60, deadline=None,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
                          suppress_health_check=_SLOW_EXAMPLES, print_blob=True)
settings.load_profile(os.environ.get("QCAL_HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def imagenet_folder(tmp_path):
    """ROOT/<wnid>/ILSVRC2012_val_*.JPEG, names interleaved across classes like the real set."""
    rng = np.random.RandomState(0)
    root = tmp_path / "val"
    layout = {  # file number -> class folder (class index in the folder name)
        1: "065", 2: "970", 3: "230", 4: "065", 5: "809", 6: "230", 7: "970", 8: "516",
    }
    for number, wnid in layout.items():
        write_jpeg(root / wnid / f"ILSVRC2012_val_{number:08d}.JPEG", rng)
    return root, layout


@pytest.fixture
def recordio_file(tmp_path):
    import cv2
    import mxnet as mx

    rng = np.random.RandomState(1)
    rec, idx = tmp_path / "val.rec", tmp_path / "val.idx"
    writer = mx.recordio.MXIndexedRecordIO(str(idx), str(rec), "w")
    labels = [3, 1, 4, 1, 5, 9]
    for i, label in enumerate(labels):
        image = rng.randint(0, 256, size=(48, 36, 3), dtype=np.uint8)
        ok, encoded = cv2.imencode(".jpg", image)
        assert ok
        header = mx.recordio.IRHeader(0, float(label), i, 0)
        writer.write_idx(i, mx.recordio.pack(header, encoded.tobytes()))
    writer.close()
    return rec, labels
