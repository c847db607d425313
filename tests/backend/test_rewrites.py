"""Structural tests of qcal's two Relax rewrites, before and after, beside the numeric ones.

``tests/backend/test_schedules.py`` shows that the rewritten modules compute the same integers; these
tests show that the rewrites did what they claim to the module itself:

- ``rewrite_int8_convs``: every eligible int8 conv2d (constant weight, groups 1, and for the
  int16 pairs out channels a multiple of the vector lanes) is gone, replaced by one pack call
  and one conv call whose constant is the weight in the kernel's layout -- ``pack_u8_quads`` /
  ``conv2d_vnni`` (weight quads and the -128 * weight-sum accumulator start, out channels padded
  to whole vectors with zero weights) on a VNNI target, ``pack_int16_pairs`` /
  ``conv2d_int16_pairs`` on the same target without VNNI; every other conv is left as it was; a
  target without AVX2 gets its module back unchanged.
- ``apply_cpu_schedules``' weight prepack: a conv whose every caller passes a constant weight is
  replaced by a ``*_prepacked`` PrimFunc that receives the weight already repacked
  (``pack_oihw``), and the OIHW version is gone; a weight passed as a parameter is not prepacked.

The modules are the TVM adapter's own output (``emit_relax``) for the shared fixture graphs. On a
host without VNNI the VNNI rewrite is that of the emulated kernel (tests/backend/vnni_emulation.py).
"""
from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402
from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline  # noqa: E402
from tvm_ffi import structural_equal  # noqa: E402

from qcal.backend.tvm import schedules, vnni  # noqa: E402
from qcal.backend.tvm.emit import emit_relax  # noqa: E402
from tests.backend.vnni_emulation import assert_vnni_kernel, vnni_kernels  # noqa: E402
from tests.fixtures import OPTION_SETS, every_op, images, realized, resnet_v1  # noqa: E402

TARGET = schedules.cpu_target()
NO_VNNI = vnni.without_vnni(TARGET)
LANES = schedules.pair_lanes(TARGET)
with vnni_kernels():  # real or emulated
    VNNI_LANES = vnni.vnni_lanes(TARGET)
    VNNI_EMULATED = vnni.vnni_emulated(TARGET)
CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
CALL_TIR = tvm.ir.Op.get("relax.call_tir")
PERMUTE_DIMS = tvm.ir.Op.get("relax.permute_dims")
CONSTANT = tvm.ir.expr.Constant


def _calls(mod, op):
    """Every call to ``op`` in the module's Relax functions, in visiting order."""
    found = []

    def visit(expr):
        if isinstance(expr, relax.Call) and expr.op.same_as(op):
            found.append(expr)

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, visit)
    return found


def _bound_values(mod):
    """Every variable of the module's Relax functions -> the value bound to it."""
    bound = {}
    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            for block in func.body.blocks:
                bound.update({b.var: b.value for b in block.bindings})
    return bound


def _call_tir_to(mod, name):
    return [c for c in _calls(mod, CALL_TIR) if c.args[0].name_hint == name]


def _pair_eligible(call, lanes) -> bool:
    """The rewrite's contract, restated from its docstring rather than from its code; ``lanes``
    None: the VNNI rewrite's, any out channel count."""
    data, weight = call.args
    return (isinstance(weight, CONSTANT) and int(call.attrs.groups) == 1
            and str(data.ty.dtype) == "int8" and str(weight.ty.dtype) == "int8"
            and (lanes is None or int(weight.ty.shape[0]) % lanes == 0))


def _int8_module(graph, batch=2):
    qgraph = realized(graph, OPTION_SETS["power2-b16"], images(8, graph.input.attrs["shape"], seed=1))
    return emit_relax(qgraph, batch)


GRAPHS = {"resnet_v1_w16": lambda: resnet_v1(width=16), "every_op": every_op}


@pytest.mark.skipif(LANES is None, reason="this CPU has no pmaddwd (AVX2) for the pair rewrite")
@pytest.mark.parametrize("graph_name", sorted(GRAPHS))
def test_pair_rewrite_replaces_exactly_the_eligible_convs(graph_name):
    before = _int8_module(GRAPHS[graph_name]())
    convs = _calls(before, CONV2D)
    eligible = [c for c in convs if _pair_eligible(c, LANES)]
    kept = [c for c in convs if not _pair_eligible(c, LANES)]

    after = schedules.rewrite_int8_convs(before, NO_VNNI)

    remaining = _calls(after, CONV2D)
    assert len(remaining) == len(kept)
    assert not [c for c in remaining if _pair_eligible(c, LANES)]
    # the kept convs are untouched: same weights, same attributes, same order
    for old, new in zip(kept, remaining):
        assert structural_equal(old.attrs, new.attrs)
        assert np.array_equal(old.args[1].value.numpy(), new.args[1].value.numpy())

    packs = [c for c in _calls(after, CALL_TIR) if c.args[0].name_hint.startswith("pack_int16_pairs")]
    pair_convs = [c for c in _calls(after, CALL_TIR)
                  if c.args[0].name_hint.startswith("conv2d_int16_pairs")]
    assert len(packs) == len(pair_convs) == len(eligible)
    for old, new in zip(eligible, pair_convs):
        weight = old.args[1].value.numpy()
        packed = new.args[1].fields[1].value.numpy()
        assert packed.dtype == np.int16
        assert np.array_equal(packed, schedules.pack_pair_weight(weight, LANES))
        o, c, kh, kw = weight.shape
        assert packed.shape == (o // LANES, (c + 1) // 2, kh, kw, 2 * LANES)
        # the pair conv reads an int32 input of the pack call's shape, and keeps the conv's output
        pack = packs[pair_convs.index(new)]
        assert tuple(int(d) for d in new.args[1].fields[0].ty.shape) == tuple(
            int(d) for d in pack.ty.shape)
        assert tuple(int(d) for d in new.ty.shape) == tuple(int(d) for d in old.ty.shape)
    if graph_name == "resnet_v1_w16":
        assert eligible, "the 16-wide fixture must exercise the rewrite"


@pytest.mark.skipif(VNNI_LANES is None, reason="this CPU has neither VNNI nor AVX2 to emulate it")
@pytest.mark.usefixtures("vnni_kernels")
@pytest.mark.parametrize("graph_name", sorted(GRAPHS))
def test_vnni_rewrite_replaces_exactly_the_eligible_convs(graph_name):
    before = _int8_module(GRAPHS[graph_name]())
    convs = _calls(before, CONV2D)
    eligible = [c for c in convs if _pair_eligible(c, None)]
    kept = [c for c in convs if not _pair_eligible(c, None)]

    # the VNNI rewrite alone: the depthwise rewrite that follows it takes some of the kept convs
    after = vnni.rewrite_vnni_convs(before, VNNI_LANES, VNNI_EMULATED)

    remaining = _calls(after, CONV2D)
    assert len(remaining) == len(kept)
    for old, new in zip(kept, remaining):
        assert structural_equal(old.attrs, new.attrs)
        assert np.array_equal(old.args[1].value.numpy(), new.args[1].value.numpy())
    names = [c.args[0].name_hint for c in _calls(after, CALL_TIR)]
    assert not [n for n in names if "int16_pairs" in n]  # VNNI took every conv pairs could
    bound = _bound_values(after)
    packs = [c for c in _calls(after, CALL_TIR)
             if c.args[0].name_hint.startswith(("pack_u8_quads", "pack_blocked_u8_quads"))]
    quad_convs = [c for c in _calls(after, CALL_TIR)
                  if c.args[0].name_hint.startswith("conv2d_vnni")]
    assert len(quad_convs) == len(eligible)
    for conv in quad_convs:  # vpdpbusd, or its emulation where the host has no VNNI
        assert_vnni_kernel(after[conv.args[0]].script())
    v = VNNI_LANES
    in_place = []
    for old, new in zip(eligible, quad_convs):
        weight = old.args[1].value.numpy()
        source, packed, init = (a.value.numpy() if isinstance(a, CONSTANT) else a
                                for a in new.args[1].fields)
        o, c, kh, kw = weight.shape
        f = -(-o // v)  # out channels padded to whole vectors
        pack = bound.get(source)
        read_in_place = pack not in packs
        in_place.append(read_in_place)
        blocked_input = read_in_place or pack.args[0].name_hint.startswith("pack_blocked")
        # in quads: ceil(c / 4), or whole blocks of v channels when the input comes blocked
        c4 = -(-c // v) * v // 4 if blocked_input else (c + 3) // 4
        assert packed.dtype == np.int32 and packed.shape == (f, c4, kh, kw, v)
        expected_packed, expected_init = vnni.pack_vnni_weight(weight, v, c4,
                                                               shifted=not read_in_place)
        assert np.array_equal(packed, expected_packed)
        # padded out channels and padded in channels: zero weights, zero accumulator start
        assert not packed.reshape(f, c4, kh, kw, v).transpose(0, 4, 1, 2, 3).reshape(
            f * v, -1)[o:].any()
        # +128 on every input byte, corrected at the start; none when the bytes are read as
        # they are
        correction = 0 if read_in_place else -128
        assert np.array_equal(init.reshape(-1)[:o], correction * weight.reshape(o, -1).sum(axis=1))
        assert not init.reshape(-1)[o:].any()
        assert np.array_equal(init, expected_init)
        # the conv writes its accumulators channel-blocked: (N, ceil(O/v), OH, OW, v)
        n, _, oh, ow = (int(d) for d in old.ty.shape)
        assert tuple(int(d) for d in new.ty.shape) == (n, f, oh, ow, v)
        if read_in_place:
            # only a 1x1 unpadded conv, on the blocked int8 tensor itself, proved >= 0
            assert (kh, kw) == (1, 1) and not any(int(p) for p in old.attrs.padding)
            assert str(source.ty.dtype) == "int8"
            _, _, h, w = (int(d) for d in old.args[0].ty.shape)
            assert tuple(int(d) for d in source.ty.shape) == (n, -(-c // v), h, w, v)
            continue
        assert tuple(int(d) for d in source.ty.shape) == tuple(int(d) for d in pack.ty.shape)
        # an input made by a VNNI conv comes blocked from the op before it (no conversion in
        # between) unless it is the function's input; the pack keeps it blocked
        source = pack.args[1].fields[0]
        if blocked_input:
            assert tuple(int(d) for d in source.ty.shape)[1:2] == (-(-c // v),)
            assert tuple(int(d) for d in source.ty.shape)[-1] == v
            assert tuple(int(d) for d in pack.ty.shape)[-1] == v // 4
        else:
            assert tuple(int(d) for d in pack.ty.shape)[-1] == 1
    assert len(packs) == in_place.count(False)
    if graph_name == "resnet_v1_w16":
        assert eligible, "the 16-wide fixture must exercise the rewrite"
        # channel counts of 16 and 32 throughout: every conv but the stem (3 channels) reads a
        # blocked input, and layouts are converted only at the edges (the stem's input is
        # NCHW; the classifier's flatten wants NCHW)
        assert sum(p.args[0].name_hint.startswith("pack_blocked") for p in packs) == len(packs) - 1
        assert len(_calls(after, PERMUTE_DIMS)) <= 2
        # its 1x1 projection shortcuts read a ReLU's output: in place
        assert any(in_place)


def test_pair_rewrite_leaves_a_target_without_avx2_alone():
    before = _int8_module(resnet_v1(width=16))
    plain = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"})
    assert schedules.pair_lanes(plain) is None
    after = schedules.rewrite_int8_convs(before, plain)
    assert structural_equal(before, after)


def _legalized(mod):
    """The module as ApplyCpuSchedules receives it (legalized and fused, not yet scheduled)."""
    with TARGET:
        passes = cpu_pipeline.library_dispatch_passes(TARGET) + cpu_pipeline.legalize_passes(TARGET)
        return tvm.transform.Sequential(passes)(mod)


def _prepacked_calls(mod):
    return [c for c in _calls(mod, CALL_TIR) if c.args[0].name_hint.endswith("_prepacked")]


def test_schedules_prepack_constant_conv_weights_once():
    # no pair rewrite, so every int8 conv reaches the s_tir conv rules
    before = _legalized(_int8_module(every_op()))
    after = schedules.apply_cpu_schedules(before, TARGET)

    prepacked = _prepacked_calls(after)
    assert prepacked, "every_op's convs pass constant weights: some must be prepacked"
    names_after = {gv.name_hint for gv in after.functions}
    for call in prepacked:
        name = call.args[0].name_hint
        original = name[: -len("_prepacked")]
        assert original not in names_after  # the OIHW version is gone
        func = after[name]
        assert schedules.SCHEDULE_ATTR in func.attrs
        old_calls = _call_tir_to(before, original)
        assert old_calls
        # find the argument that changed: the weight, now in (O/v) I H W v
        old_args, new_args = old_calls[0].args[1].fields, call.args[1].fields
        changed = [i for i, (a, b) in enumerate(zip(old_args, new_args))
                   if not (isinstance(a, CONSTANT) and isinstance(b, CONSTANT)
                           and a.value.shape == b.value.shape
                           and np.array_equal(a.value.numpy(), b.value.numpy()))
                   and isinstance(a, CONSTANT)]
        assert len(changed) == 1
        weight = old_args[changed[0]].value.numpy()
        packed = new_args[changed[0]].value.numpy()
        lanes = packed.shape[-1]
        assert packed.shape == (weight.shape[0] // lanes,) + weight.shape[1:] + (lanes,)
        assert np.array_equal(packed, schedules.pack_oihw(weight, lanes))


def test_weight_passed_as_parameter_is_not_prepacked():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 16, 9, 9), "int8"))
    w = relax.Var("w", relax.TensorType((32, 16, 3, 3), "int8"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.conv2d(x, w, padding=1, out_dtype="int32"))
        bb.emit_func_output(out)
    after = schedules.apply_cpu_schedules(_legalized(bb.get()), TARGET)
    assert not _prepacked_calls(after)
    assert "conv" in " ".join(schedules.scheduled_functions(after).values())
