"""Per-layer errors are measured tensor by tensor: the same figures as from every activation kept,
with a fraction of the memory."""
import tracemalloc

import numpy as np
import pytest

from qcal.eval.fidelity import sqnr_db
from qcal.eval.layer_errors import layer_errors
from qcal.quant.realize import qgraph_from_float
from qcal.reference.float_interpreter import channel_view
from qcal.reference.int_interpreter import iter_integer, run_integer
from tests.fixtures import MODELS, OPTION_SETS, every_op, images, realized

GRAPHS = {**MODELS, "every_op": every_op}


def _input_shape(graph):
    return tuple(graph.input.attrs["shape"])


def _kept(qgraph, x, images_per_pass):
    """Every activation of ``qgraph`` on ``x``, run in batches of ``images_per_pass`` images and
    joined: the float32 interpreter's BLAS may round a conv differently with the batch shape."""
    passes = [run_integer(qgraph, x[i:i + images_per_pass], keep="all")
              for i in range(0, len(x), images_per_pass)]
    return {name: np.concatenate([p[name] for p in passes]) for name in passes[0]}


def kept_rows(qgraph, graph, x, images_per_pass=None):
    """The figures from every activation of both interpreters kept at once (the definition), the
    images run ``images_per_pass`` at a time (default all at once)."""
    per_pass = images_per_pass or len(x)
    ints = _kept(qgraph, x, per_pass)
    floats = _kept(qgraph_from_float(graph), x, per_pass)
    rows = {}
    for fnode in graph.nodes[1:]:
        if fnode.name in ints and qgraph.node(fnode.name).is_int:
            qnode = qgraph.node(fnode.name)
            real = ints[fnode.name] * channel_view(qnode.scale, ints[fnode.name].ndim)
            ref = floats[fnode.name].astype(np.float64)
            rows[fnode.name] = (sqnr_db(ref, real), float(np.abs(ref - real).max()))
    return rows


@pytest.mark.parametrize("model", sorted(GRAPHS))
@pytest.mark.parametrize("options", ["power2-b8", "max-int32acc-channel"])
def test_streamed_layer_errors_equal_the_figures_of_every_activation_kept(model, options):
    graph = GRAPHS[model](seed=3)
    shape = _input_shape(graph)
    qgraph = realized(graph, OPTION_SETS[options], images(12, shape, seed=5))
    x = images(5, shape, seed=6)  # an odd count: the last pass is short
    expected = kept_rows(qgraph, graph, x)
    # one pass: the same arithmetic on the same values, only summed image by image
    rows = layer_errors(qgraph, graph, x, images_per_pass=len(x))
    assert [r["tensor"] for r in rows] == list(expected)  # graph order, every integer tensor
    for row in rows:
        sqnr, max_abs = expected[row["tensor"]]
        assert row["max_abs_error"] == max_abs
        assert row["sqnr_db"] == pytest.approx(sqnr, rel=1e-12, abs=1e-12)
    # passes of 2 images (the last one short), against the definition on the same batches: the
    # float32 reference's BLAS rounding may differ with the batch shape (on an Intel Xeon, one
    # 33.5 dB SQNR moved by 5.5e-5 dB between batches of 5 and of 2), so the kept figures are
    # computed batch for batch too
    expected = kept_rows(qgraph, graph, x, images_per_pass=2)
    for row in layer_errors(qgraph, graph, x, images_per_pass=2):
        sqnr, max_abs = expected[row["tensor"]]
        assert row["max_abs_error"] == max_abs
        assert row["sqnr_db"] == pytest.approx(sqnr, rel=1e-12, abs=1e-12)


def test_iter_integer_yields_what_keep_all_keeps():
    graph = every_op(seed=2)
    shape = _input_shape(graph)
    qgraph = realized(graph, OPTION_SETS["power2-b9-channel"], images(8, shape, seed=1))
    x = images(3, shape, seed=2)
    kept = run_integer(qgraph, x, keep="all")
    streamed = [(node.name, value) for node, value in iter_integer(qgraph, x)]
    assert [name for name, _ in streamed] == [n.name for n in qgraph.nodes]
    for name, value in streamed:
        assert np.array_equal(value, kept[name]) and value.dtype == kept[name].dtype


def _deep_graph(layers=12, size=24, width=8):
    from tests.fixtures import GraphMaker, classifier_head

    g = GraphMaker((3, size, size), seed=7, name="deep")
    x = g.relu(g.conv("data", width))
    for _ in range(layers):
        x = g.clip(g.conv(x, width), 0.0, 6.0)
    return classifier_head(g, x, 10)


def _peak_bytes(fn):
    tracemalloc.start()  # numpy reports its array buffers to tracemalloc
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_layer_errors_memory_does_not_grow_with_depth():
    # every activation of both interpreters kept at once (what the per-layer SQNR once did)
    # grows with the number of layers; measured tensor by tensor, the peak is that of one plain
    # run of the integer model (a conv's im2col and a few live tensors), whatever the depth
    x = images(16, (3, 24, 24), seed=2)
    peaks = {}
    for layers in (6, 24):
        graph = _deep_graph(layers)
        qgraph = realized(graph, OPTION_SETS["power2-b16"], images(8, (3, 24, 24), seed=1))
        peaks[layers] = (_peak_bytes(lambda: layer_errors(qgraph, graph, x, len(x))),
                         _peak_bytes(lambda: run_integer(qgraph, x)))
    every_activation = sum(v.nbytes for v in run_integer(qgraph, x, keep="all").values()) + sum(
        v.nbytes for v in run_integer(qgraph_from_float(graph), x, keep="all").values())
    (shallow, shallow_run), (deep, deep_run) = peaks[6], peaks[24]
    assert deep < 1.2 * shallow and deep < every_activation / 4, peaks
    assert deep < 1.5 * deep_run, peaks
    assert deep_run < 1.2 * shallow_run, peaks  # the plain run frees what no later node reads


def test_layer_errors_memory_does_not_grow_with_the_number_of_images():
    graph = _deep_graph(6)
    qgraph = realized(graph, OPTION_SETS["power2-b16"], images(8, (3, 24, 24), seed=1))
    few, many = images(2, (3, 24, 24), seed=2), images(16, (3, 24, 24), seed=3)
    peak_few = _peak_bytes(lambda: layer_errors(qgraph, graph, few, images_per_pass=2))
    peak_many = _peak_bytes(lambda: layer_errors(qgraph, graph, many, images_per_pass=2))
    assert peak_many < 1.2 * peak_few, (peak_few, peak_many)
