"""CPU schedules for the PrimFuncs qcal's integer (and float) Relax graphs lower to.

Where this sits: after the TVM adapter has emitted a Relax module and before TVM's own lowering.
TVM 0.27's ``tvm.compile(mod, "llvm")`` runs ``relax.pipeline.default_build_pipeline``, which
legalizes but neither fuses nor schedules: every conv2d becomes a naive 7-deep loop nest (2.8 GOP/s
on a 1x64x56x56 3x3 int8 conv with a generic target). ``build`` / ``lower`` below run the CPU pipeline of
``tvm/relax/backend/cpu_generic/pipeline.py`` with two steps of ours inserted, in this order::

    rewrite_int8_convs  (ours: int8 conv2d with a constant weight -> VNNI or int16-pair PrimFuncs)
    DispatchSampling -> DispatchSortScan                      (library_dispatch_passes)
    LegalizeOps -> AnnotateTIROpPattern -> FoldConstant
        -> FuseOps -> FuseTIR                                 (legalize_passes)
    ApplyCpuSchedules   (ours: schedule each fused PrimFunc, or decline)
    RewriteDataflowReshape -> ToNonDataflow -> RemovePurityChecking
        -> CallTIRRewrite                                     (dataflow_lower_passes)
    StaticPlanBlockMemory -> LowerAllocTensor -> KillAfterLastUse -> LowerRuntimeBuiltin
        -> ComputePrimValue -> VMShapeLower -> AttachGlobalSymbol   (finalize_passes)
    then VM codegen + the default TIR pipeline, LLVM (``tvm.compile``)

``relax_pipeline(target)`` is that sequence as one pass, ``build(mod, target)`` compiles with it
(``qcal.backend.tvm.emit`` compiles through ``build``, so the sequence is written once, here). A caller
running its own legalization calls ``rewrite_int8_convs(mod, target)`` before it and
``apply_cpu_schedules(mod, target)`` after FuseTIR.

Each fused PrimFunc is offered to the rules in ``SCHEDULE_RULES`` in order. A rule recognises its
anchor block structurally (the block names legalization gives -- ``conv2d_nchw``,
``group_conv2d_nchw``, ``matmul`` -- plus iterator kinds and buffer shapes) and schedules it with
``tvm.s_tir`` primitives. A rule that does not recognise a PrimFunc raises ``Decline`` and the
next rule is offered it; a PrimFunc every rule declines is left exactly as legalization made it.
Any other exception out of a rule is a bug in the rule and stops the compile.

s_tir primitives check their own preconditions, but not every contract the later lowering relies
on: ``sch.vectorize`` accepts a loop that holds a whole tile with its local accumulator, and TVM
0.27's VectorizeLoop then silently shares that accumulator between the lanes (see ``_vectorize``,
which now refuses it). A schedule that TVM accepts is therefore not proven right by TVM; the
property tests in ``tests/backend/test_schedules_fuzz.py`` run every rule, and the int16-pair conv
(hand-written TIR calling ``pmaddwd``), on random shapes against the unscheduled pipeline and the
numpy reference, bit for bit.

int8 conv, VNNI path (groups 1, dilation 1, constant weight, any out channel count, padded with
zero weights to whole vectors of 16 (AVX-512 VNNI) or 8 (AVX-VNNI); chosen when the target has
those features): ``qcal.backend.tvm.vnni``,
u8 x s8 ``vpdpbusd`` with the +128 shift corrected in the accumulator start, its epilogue fused
by FuseOps and computed per tile by the ``conv2d_vnni`` rule; 2-4x the pair path per conv. The
tensors between such convs stay channel-blocked (``qcal.backend.tvm.blocked``), and a residual
block's projection shortcut is computed inside its last conv's tiles (``conv2d_vnni_shortcut``).
int8 conv, int16-pair path (same convs, out channels a multiple of 16 (AVX-512BW) or 8 (AVX2), on
a target without VNNI): see the section comment below; ~200 GOP/s, 2-3x the s_tir conv.
Everything else goes through the rules:

s_tir conv schedule (NCHW, int8 x int8 -> int32, any stride/kernel, groups with >= 4 output
channels per group; float32 too):
  * the weight is repacked ``OIHW -> (O/v) I H W v`` so that ``v`` output channels (one vector
    register of int32 accumulators, v = 16 with AVX-512) are contiguous. When every call site
    passes the weight as a Relax constant (qcal binds weights as constants) the repack is done
    once, in numpy, on the constant, and the PrimFunc (renamed ``*_prepacked``) takes the packed
    layout; otherwise the repack runs inside each call.
  * output tile = up to 8 pixels of one row x 2 vectors of channels, accumulated in a local buffer
    laid out ``[.., x, c % v]`` (lanes contiguous): reduction loops outside, pixels and channel
    vectors unrolled inside, lanes vectorized.
  * the fused epilogue (bias add, shifts, clip, casts, ReLU, residual add) is inlined into one block
    computed right after each tile, while the accumulators are hot.
  * (batch, output row, channel tile) run in parallel, in that order (rows next to each other
    share input rows: 2x on a 1x1 conv at batch 16 against channel tile outermost).
Depthwise int8 convs vectorize along output pixels instead (each channel reads its own input
plane); float32 depthwise is left alone (LLVM's vectorization of the plain loops was faster).
Dense vectorizes along output features with the same tiling. Anything else worth threads
(pooling, the residual-add requantize, the pair path's pack and epilogue) gets its elementwise
steps inlined, parallel outer loops and a vectorized last loop.

Measured on this 2-core AMD EPYC (znver4, AVX-512) box; ``scripts/bench_ops.py`` prints the table.
The benchmark conv (1x64x56x56, 64 filters 3x3, pad 1, int8, requantize epilogue): default pipeline
with a generic target 2.8 GOP/s, with ``mcpu=znver4`` 6-13 GOP/s, s_tir schedule 78-83 GOP/s
(2.9 ms), int16 pairs 200-212 GOP/s (1.1 ms); MXNet fp32 oneDNN 2.5-3.7 ms. The s_tir conv is
limited by ``vpmulld``, the instruction LLVM emits for int8 x int8 -> int32 lanes. ``sch.tensorize``
would be the usual way to get ``pmaddwd``/VNNI, but it segfaults in the apache-tvm 0.27.0.post1 wheel
(even TVM's own ``dot_16x4_vnni`` on a 3-loop matmul), hence the hand-written pair PrimFunc.
Whole models through ``qcal.backend.tvm.emit`` (random weights, 224x224, int8, one sitting): resnet50_v1
batch 16 21.7 img/s with the pair rewrite, 9.1 img/s s_tir only, MXNet fp32 11.6 img/s; batch 1
22.6 / 9.2 / 12.4 img/s; resnet18_v1 batch 1 50.9 / 21.1 / 28.8 img/s.

Length: the rule dispatcher, every rule and the int16-pair conv kernel still share this module;
the pair conv is the next to move out.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import tvm
from tvm import relax, s_tir
from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline
from tvm.script import tirx as T
from tvm.target import codegen

from qcal.errors import QcalError

_log = logging.getLogger(__name__)

# Name of the PrimFunc attribute recording which rule scheduled it (read by tests and reports).
SCHEDULE_ATTR = "qcal.schedule"
# Largest output-pixel tile kept in registers (times 2 vectors of accumulators: 16 of AVX-512's 32
# registers; measured 74-83 GOP/s for 4x4, 7x2, 8x1, 8x2 tiles alike, so the exact tile matters less).
_MAX_PIXEL_TILE = 8
_CONV_BLOCKS = ("conv2d_nchw", "group_conv2d_nchw")


# --------------------------------------------------------------------------------------------
# target
# --------------------------------------------------------------------------------------------

def cpu_target() -> tvm.target.Target:
    """An LLVM target for this machine's CPU (the one definition qcal compiles with). Without
    ``mcpu`` LLVM emits baseline x86-64 (SSE2) code; naming the host CPU alone makes the unscheduled
    conv 3x faster. Dict form: TVM 0.27 refuses ``"llvm -mcpu=..."``."""
    return tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})


def vector_bits(target: tvm.target.Target) -> int:
    bits = codegen.llvm_get_vector_width(target)
    return bits if bits and bits > 0 else 128


# --------------------------------------------------------------------------------------------
# small helpers over a schedule
# --------------------------------------------------------------------------------------------

class Decline(Exception):
    """Raised by a schedule rule for a PrimFunc it does not handle: the next rule is offered the
    function. Any other exception out of a rule is a bug in it and propagates."""


def _root_blocks(sch: s_tir.Schedule) -> list:
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def _name(sch, block) -> str:
    return sch.get(block).name_hint


def _iter_kinds(sch, block) -> str:
    """'S' for data-parallel, 'R' for reduction iterators, e.g. 'SSSSRRR' for conv2d."""
    kinds = {0: "S", 2: "R"}
    return "".join(kinds.get(int(iv.iter_type), "?") for iv in sch.get(block).iter_vars)


def _extents(sch, loops) -> list[int]:
    return [int(sch.get(loop).extent) for loop in loops]


def _largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def _lanes_for(n: int, lanes: int) -> int:
    """The largest power of two <= lanes that divides n: vector width without a tail."""
    v = 1
    while v * 2 <= lanes and n % (v * 2) == 0:
        v *= 2
    return v


def _writes_param(sch, block) -> bool:
    """Whether the block writes one of the PrimFunc's parameters (an output of the function)."""
    params = sch.mod["main"].params
    return any(any(p.same_as(w.source) for p in params) for w in sch.get(block).writes)


def _inline_epilogue(sch, anchor_index: int, blocks: list):
    """Inline every block after the anchor into the last one; return that last block (or None).

    Only a chain of data-parallel blocks with one output at its end qualifies as epilogue: a
    reduction after the anchor, or an anchor or intermediate block that is itself an output of
    the function (FuseOps makes such multi-output functions), is a PrimFunc the rules do not know."""
    epilogue = blocks[anchor_index + 1:]
    for b in epilogue:
        if "R" in _iter_kinds(sch, b):
            raise Decline("reduction after the anchor block")
    if epilogue and any(_writes_param(sch, b) for b in blocks[anchor_index:-1]):
        raise Decline("the anchor or an intermediate block is an output of the function")
    for b in epilogue[:-1]:
        sch.compute_inline(b)
    return epilogue[-1] if epilogue else None


def _vectorize(sch, loop):
    """Vectorize an innermost loop: one whose body is a single block.

    This is a contract of TVM 0.27's lowering that ``sch.vectorize`` does not check. The primitive
    only asks that the loop bind data-parallel block iterators; a loop that holds a whole tile (the
    reduction loops and the local accumulator under them) passes. Buffer allocation is then placed
    at the lowest loop covering all accesses -- inside the vectorized loop -- and VectorizeLoop
    (src/tirx/transform/vectorize_loop.cc: "vectorization of AllocBuffer not yet implemented")
    keeps the allocation scalar, so every lane adds into the same accumulator: wrong values, no
    error. Vectorizing anything but an innermost loop is therefore a bug in the rule, raised here."""
    body = sch.get(loop).body
    if not isinstance(body, s_tir.SBlockRealize):
        raise RuntimeError("qcal schedules: refusing to vectorize a loop that is not innermost "
                           f"(its body is a {type(body).__name__})")
    sch.vectorize(loop)


def _vectorize_tile_epilogue(sch, out, tile_loop):
    """Vectorize the innermost loop that ``reverse_compute_at(out, tile_loop)`` gave the epilogue.

    A tile of one element gets no loop of its own (reverse_compute_at drops unit loops): the
    block's innermost loop is then ``tile_loop`` itself, the one holding the reduction, and the
    epilogue stays a scalar statement."""
    loops = sch.get_loops(out)
    tile = sch.get(tile_loop)
    depth = next(i for i, loop in enumerate(loops) if sch.get(loop).same_as(tile))
    if depth + 1 < len(loops):
        _vectorize(sch, loops[-1])


def _parallel_outer(sch, block):
    """Fuse the leading data-parallel loops of a root-level block and run them in parallel."""
    loops = sch.get_loops(block)
    kinds = _iter_kinds(sch, block)
    n_spatial = 0
    for k in kinds:
        if k != "S":
            break
        n_spatial += 1
    if len(loops) != len(kinds) or n_spatial == 0:
        return
    lead = loops[:max(1, min(2, n_spatial))]
    sch.parallel(sch.fuse(*lead) if len(lead) > 1 else lead[0])


# --------------------------------------------------------------------------------------------
# rules
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scheduled:
    """A rule's result: the new PrimFunc, and, when the rule moved a weight's repack out of the
    function, which parameter changed and how to repack a constant for it."""

    func: tvm.tirx.PrimFunc
    packed_param: int | None = None
    pack: Callable[[np.ndarray], np.ndarray] | None = None


def _conv_geometry(sch, conv):
    """Shapes of a legalized NCHW conv block: (O, I/groups, kh, kw) from the weight it reads."""
    block = sch.get(conv)
    if len(block.reads) != 2 or len(block.writes) != 1:
        raise Decline("conv block with unexpected reads/writes")
    data, weight = (r.source for r in block.reads)
    if len(weight.shape) != 4 or len(data.shape) != 4:
        raise Decline("conv operands are not 4-D")
    return data, weight


def _weight_param_index(func, weight_buffer) -> int | None:
    # In TVM 0.27 a PrimFunc parameter is itself the buffer (no separate buffer_map).
    for i, param in enumerate(func.params):
        if param.same_as(weight_buffer):
            return i
    return None


def pack_oihw(weight: np.ndarray, lanes: int) -> np.ndarray:
    """OIHW -> (O/lanes) I H W lanes, the layout the conv schedule reads (numpy, at compile time)."""
    o, i, h, w = weight.shape
    return np.ascontiguousarray(weight.reshape(o // lanes, lanes, i, h, w).transpose(0, 2, 3, 4, 1))


def schedule_conv2d(func, lanes: int, prepack: bool) -> Scheduled:
    """Output-channel-vectorized tiling for (grouped) NCHW conv with its epilogue.

    Depthwise (one output channel per group) has no contiguous channel dimension in its input
    reads and goes to ``schedule_depthwise_conv2d``."""
    sch = s_tir.Schedule(func)
    blocks = _root_blocks(sch)
    names = [_name(sch, b) for b in blocks]
    anchors = [i for i, n in enumerate(names) if n in _CONV_BLOCKS]
    if len(anchors) != 1 or _iter_kinds(sch, blocks[anchors[0]]) != "SSSSRRR":
        raise Decline("not a single NCHW conv")
    conv = blocks[anchors[0]]
    for b in blocks[:anchors[0]]:
        if _name(sch, b) != "pad_temp":
            raise Decline("unexpected producer before conv")
    data, weight = _conv_geometry(sch, conv)
    oc, icg = int(weight.shape[0]), int(weight.shape[1])
    groups = int(data.shape[1]) // icg if names[anchors[0]] == "group_conv2d_nchw" else 1
    ocg = oc // groups
    v = _lanes_for(ocg, lanes)
    if groups > 1 and ocg == 1:
        raise Decline("depthwise")
    if v < 4:
        raise Decline("too few output channels per group to vectorize")
    out = _inline_epilogue(sch, anchors[0], blocks)
    if out is None:
        out = sch.cache_write(conv, 0, "global")
    sch.set_scope(conv, 0, "local")
    # accumulators [.., x, c % v] so a vector of lanes is contiguous in the local tile
    sch.transform_layout(conv, ("write", 0), lambda n, f, y, x: (n, f // v, y, x, f % v))
    packed_param, pack_block = None, None
    weight_index = _weight_param_index(func, weight)
    repack = lambda o, i, h, w: (o // v, i, h, w, o % v)  # noqa: E731
    if prepack and weight_index is not None:
        sch.transform_layout(conv, ("read", 1), repack)
        packed_param = weight_index
    else:
        pack_block = sch.cache_read(conv, 1, "global")
        sch.transform_layout(conv, ("read", 1), repack)

    nn, ff, yy, xx, rc, ry, rx = sch.get_loops(conv)
    ow = int(sch.get(xx).extent)
    oc_vectors = 2 if (ocg // v) % 2 == 0 else 1
    ow_tile = _largest_divisor(ow, _MAX_PIXEL_TILE)
    ffo, ffm, ffv = sch.split(ff, [None, oc_vectors, v])
    xxo, xxi = sch.split(xx, [None, ow_tile])
    sch.reorder(nn, yy, ffo, xxo, rc, ry, rx, xxi, ffm, ffv)
    sch.reverse_compute_at(out, xxo)
    sch.unroll(xxi)
    sch.unroll(ffm)
    _vectorize(sch, ffv)
    _vectorize_tile_epilogue(sch, out, xxo)
    sch.parallel(sch.fuse(nn, yy, ffo))
    # parallel/vectorize/unroll first: after decompose_reduction they refuse the update block
    sch.decompose_reduction(conv, rc)
    for b in _root_blocks(sch):
        is_pack = pack_block is not None and sch.get(b).same_as(sch.get(pack_block))
        if _name(sch, b) == "pad_temp" or is_pack:
            _parallel_outer(sch, b)
    if packed_param is None:
        return Scheduled(sch.mod["main"])
    return Scheduled(sch.mod["main"], packed_param, functools.partial(pack_oihw, lanes=v))


def schedule_depthwise_conv2d(func, lanes: int, prepack: bool) -> Scheduled:
    """Depthwise NCHW conv: one channel per tile, a whole output row (up to 64 pixels; 16 when
    strided, whose input reads are gathers) vectorized, up to 4 rows unrolled.

    Tile sizes were picked by measurement (``scripts/bench_ops.py`` mbv2_dw_3x3): 4 channels x 28
    pixels x 1 row ran 3.5x slower than 1 channel x 56 pixels x 4 rows at batch 1."""
    sch = s_tir.Schedule(func)
    blocks = _root_blocks(sch)
    names = [_name(sch, b) for b in blocks]
    if names.count("group_conv2d_nchw") != 1:
        raise Decline("not a grouped conv")
    index = names.index("group_conv2d_nchw")
    conv = blocks[index]
    data, weight = _conv_geometry(sch, conv)
    if int(weight.shape[1]) != 1 or int(weight.shape[0]) != int(data.shape[1]):
        raise Decline("not depthwise")
    if _iter_kinds(sch, conv) != "SSSSRRR":
        raise Decline("unexpected iterators")
    for b in blocks[:index]:
        # an elementwise prologue fused in front (an int32 window sum of a shifted residual
        # operand) would have to follow the tile that reverse_compute_at places: not handled
        if _name(sch, b) != "pad_temp":
            raise Decline("unexpected producer before the depthwise conv")
    if not str(sch.get(conv).writes[0].source.dtype).startswith("int"):
        # float32 depthwise: LLVM's own vectorization of the unscheduled loops measured 2-4x
        # faster than this tiling (0.16 ms against 0.6 ms on mbv2_dw_3x3); keep the default
        raise Decline("float depthwise is faster unscheduled")
    out = _inline_epilogue(sch, index, blocks)
    if out is None:
        out = sch.cache_write(conv, 0, "global")
    sch.set_scope(conv, 0, "local")
    nn, ff, yy, xx, rc, ry, rx = sch.get_loops(conv)
    oh, ow, kw = _extents(sch, [yy, xx, rx])
    # data is the padded input: its width and the output width give the stride back
    strided = ow > 1 and (int(data.shape[3]) - kw) // (ow - 1) > 1
    x_tile = _largest_divisor(ow, 16 if strided else 64)
    y_tile = _largest_divisor(oh, 4)
    yyo, yyi = sch.split(yy, [None, y_tile])
    xxo, xxi = sch.split(xx, [None, x_tile])
    sch.reorder(nn, ff, yyo, xxo, rc, ry, rx, yyi, xxi)
    sch.reverse_compute_at(out, xxo)
    sch.unroll(yyi)
    _vectorize(sch, xxi)
    _vectorize_tile_epilogue(sch, out, xxo)
    sch.parallel(sch.fuse(nn, ff, yyo))
    sch.decompose_reduction(conv, rc)
    for b in _root_blocks(sch):
        if _name(sch, b) == "pad_temp":
            _parallel_outer(sch, b)
    return Scheduled(sch.mod["main"])


def schedule_dense(func, lanes: int, prepack: bool) -> Scheduled:
    """matmul [M, K] x [K, N] -> [M, N] (legalized relax matmul/linear): vectorize along N."""
    sch = s_tir.Schedule(func)
    blocks = _root_blocks(sch)
    names = [_name(sch, b) for b in blocks]
    if names.count("matmul") != 1:
        raise Decline("not a single matmul")
    index = names.index("matmul")
    mm = blocks[index]
    if _iter_kinds(sch, mm) != "SSR":
        raise Decline("batched or unexpected matmul")
    producers = blocks[:index]
    for b in producers:
        if "R" in _iter_kinds(sch, b):
            raise Decline("reduction before matmul")
    out = _inline_epilogue(sch, index, blocks)
    if out is None:
        out = sch.cache_write(mm, 0, "global")
    sch.set_scope(mm, 0, "local")
    i, j, k = sch.get_loops(mm)
    m, n = _extents(sch, [i, j])
    v = _lanes_for(n, lanes)
    n_vectors = 2 if (n // v) % 2 == 0 else 1
    m_tile = _largest_divisor(m, 4)
    io, ii = sch.split(i, [None, m_tile])
    jo, jm, jv = sch.split(j, [None, n_vectors, v])
    sch.reorder(io, jo, k, ii, jm, jv)
    sch.reverse_compute_at(out, jo)
    sch.unroll(ii)
    sch.unroll(jm)
    _vectorize(sch, jv)
    _vectorize_tile_epilogue(sch, out, jo)
    sch.parallel(sch.fuse(io, jo))
    sch.decompose_reduction(mm, k)
    for b in producers:  # e.g. a transpose FuseTIR kept in front of the matmul
        _parallel_outer(sch, b)
    return Scheduled(sch.mod["main"])


def _parallel_vectorize_spatial(sch, loops, extents, lanes):
    """(N, C, H, W)-like loop nest: (N, C) in parallel, H serial, W vectorized.

    Only the last loop is vectorized, never a fusion of H and W: per-lane index arithmetic
    (div/mod of a fused index) measured 40x slower on the pad/pack block."""
    last = loops[-1]
    if extents[-1] % lanes == 0 and extents[-1] > lanes:
        _, inner = sch.split(last, [None, lanes])
        _vectorize(sch, inner)
    elif extents[-1] <= 4 * lanes:
        _vectorize(sch, last)
    if len(loops) > 1:
        lead = loops[:max(1, len(loops) - 2)]
        sch.parallel(sch.fuse(*lead) if len(lead) > 1 else lead[0])


def schedule_parallel_outer(func, lanes: int, prepack: bool) -> Scheduled:
    """Pooling, elementwise requantize/residual add, anything made of root-level loop nests with
    no loop structure of its own: inline the intermediate elementwise steps (else each one
    materializes an int64 tensor), then run the outer loops in parallel and vectorize.

    Declines for functions with fewer than 4096 elements of work (threading overhead would
    exceed the gain)."""
    sch = s_tir.Schedule(func)
    blocks = _root_blocks(sch)
    if not blocks:
        raise Decline("no blocks")
    for b in blocks[:-1]:
        if "R" in _iter_kinds(sch, b) or _writes_param(sch, b):
            continue
        try:
            sch.compute_inline(b)
        except s_tir.ScheduleError:
            # compute_inline's own precondition check (e.g. a producer whose consumer reads it
            # through a non-affine index): it leaves the schedule unchanged, keep the block
            pass
    touched = False
    for b in _root_blocks(sch):
        loops = sch.get_loops(b)
        kinds = _iter_kinds(sch, b)
        if len(loops) != len(kinds) or not loops:
            continue
        extents = _extents(sch, loops)
        if int(np.prod(extents)) < 4096:
            continue
        if "R" in kinds:
            _parallel_outer(sch, b)
        else:
            _parallel_vectorize_spatial(sch, loops, extents, lanes)
        touched = True
    if not touched:
        raise Decline("too small to be worth threads")
    return Scheduled(sch.mod["main"])


def schedule_vnni_conv2d(func, lanes: int, prepack: bool) -> Scheduled:
    """``qcal.backend.tvm.vnni.schedule_vnni_conv2d``: the conv ``rewrite_int8_convs`` wrote for
    VNNI, with the epilogue FuseOps gave it."""
    from qcal.backend.tvm import vnni  # it builds on this module's helpers

    return vnni.schedule_vnni_conv2d(func, lanes, prepack)


def schedule_depthwise_vnni(func, lanes: int, prepack: bool) -> Scheduled:
    """``qcal.backend.tvm.depthwise.schedule_depthwise_vnni``: the depthwise conv
    ``rewrite_int8_convs`` wrote for VNNI + VBMI, with the epilogue FuseOps gave it."""
    from qcal.backend.tvm import depthwise  # it builds on this module's helpers

    return depthwise.schedule_depthwise_vnni(func, lanes, prepack)


# Tried in order; the first that does not decline wins.
SCHEDULE_RULES: dict[str, Callable] = {
    "conv2d_vnni": schedule_vnni_conv2d,
    "depthwise_vnni": schedule_depthwise_vnni,
    "conv2d_nchw": schedule_conv2d,
    "depthwise_conv2d_nchw": schedule_depthwise_conv2d,
    "dense": schedule_dense,
    "parallel_outer": schedule_parallel_outer,
}


def schedule_primfunc(func: tvm.tirx.PrimFunc, target: tvm.target.Target, prepack: bool = False,
                      name: str = "?") -> tuple[Scheduled | None, str | None]:
    """Offer one PrimFunc (called ``name`` in its module) to each rule; (result, rule name), or
    (None, None) when every rule declines. An error other than ``Decline`` propagates."""
    lanes_int32 = max(4, vector_bits(target) // 32)
    for rule_name, rule in SCHEDULE_RULES.items():
        try:
            result = rule(func, lanes_int32, prepack)
        except Decline as why:
            _log.debug("%s declined %s: %s", rule_name, name, why)
            continue
        except Exception as err:
            # a new exception, not a note on the old one: the message is what survives the trip
            # through TVM's pass infrastructure (C++) back to the caller
            raise RuntimeError(f"qcal schedule rule '{rule_name}' failed on PrimFunc '{name}': "
                               f"{type(err).__name__}: {err}") from err
        return Scheduled(result.func.with_attr(SCHEDULE_ATTR, rule_name), result.packed_param,
                         result.pack), rule_name
    return None, None


# --------------------------------------------------------------------------------------------
# module pass
# --------------------------------------------------------------------------------------------

_CALL_TIR = tvm.ir.Op.get("relax.call_tir")


def _call_tir_sites(mod: tvm.IRModule) -> dict:
    """GlobalVar name -> list of argument tuples of every call_tir to it in the Relax functions."""
    sites: dict[str, list] = {}

    def visit(expr):
        if isinstance(expr, relax.Call) and expr.op.same_as(_CALL_TIR):
            sites.setdefault(expr.args[0].name_hint, []).append(expr.args[1].fields)

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, visit)
    return sites


def _is_constant(expr) -> bool:
    return isinstance(expr, tvm.ir.expr.Constant)


@relax.expr_functor.mutator
class _RepackWeights(relax.PyExprMutator):
    """Point each call of a prepacked PrimFunc at its new version, with the repacked constant.

    The new version gets a new GlobalVar: the old one's type still says the weight is OIHW, and
    Relax checks call arguments against it."""

    def __init__(self, mod: tvm.IRModule, packed: dict):
        super().__init__(mod)
        self.packed = packed  # old GlobalVar name -> (param index, pack function, new PrimFunc)
        self.new_gvars: dict = {}

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not (isinstance(call, relax.Call) and call.op.same_as(_CALL_TIR)):
            return call
        name = call.args[0].name_hint
        if name not in self.packed:
            return call
        index, pack, new_func = self.packed[name]
        if name not in self.new_gvars:
            self.new_gvars[name] = self.builder_.add_func(new_func, name + "_prepacked")
        args = list(call.args[1].fields)
        array = pack(args[index].value.numpy())
        args[index] = relax.const(array, str(array.dtype))
        return relax.Call(call.op, [self.new_gvars[name], relax.Tuple(args)], call.attrs,
                          call.ty_args)


def apply_cpu_schedules(mod: tvm.IRModule, target: tvm.target.Target | None = None) -> tvm.IRModule:
    """Schedule every fused PrimFunc of a legalized+fused module; leave the ones no rule knows."""
    target = target or tvm.target.Target.current() or cpu_target()
    sites = _call_tir_sites(mod)
    packed: dict = {}
    updates = {}
    for gvar, func in mod.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc) or (func.attrs and SCHEDULE_ATTR in func.attrs):
            continue
        calls = sites.get(gvar.name_hint, [])
        # Prepack the weight once, at compile time, when every caller passes it as a constant.
        prepacked, _ = (schedule_primfunc(func, target, True, gvar.name_hint) if calls
                        else (None, None))
        if prepacked is not None and prepacked.packed_param is not None and all(
                _is_constant(args[prepacked.packed_param]) for args in calls):
            packed[gvar.name_hint] = (prepacked.packed_param, prepacked.pack, prepacked.func)
            continue
        result, _ = schedule_primfunc(func, target, False, gvar.name_hint)
        if result is not None:
            updates[gvar] = result.func
    mod = mod.clone() if hasattr(mod, "clone") else mod
    for gvar, func in updates.items():
        mod[gvar] = func
    if not packed:
        return mod
    rewriter = _RepackWeights(mod, packed)
    for gvar, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
    mod = rewriter.builder_.get()
    for name in packed:
        del mod[name]
    return mod


def ApplyCpuSchedules(target: tvm.target.Target | None = None) -> tvm.transform.Pass:  # noqa: N802
    """``apply_cpu_schedules`` as a module pass, for a ``tvm.transform.Sequential``."""

    @tvm.transform.module_pass(opt_level=0, name="qcal.ApplyCpuSchedules")
    def _pass(mod, _ctx):
        return apply_cpu_schedules(mod, target)

    return _pass


def scheduled_functions(mod: tvm.IRModule) -> dict[str, str]:
    """PrimFunc name -> rule that scheduled it, for the PrimFuncs a rule accepted."""
    return {gv.name_hint: str(f.attrs[SCHEDULE_ATTR]) for gv, f in mod.functions.items()
            if isinstance(f, tvm.tirx.PrimFunc) and f.attrs and SCHEDULE_ATTR in f.attrs}


# --------------------------------------------------------------------------------------------
# int8 conv as int16 pairs (a Relax rewrite that runs before legalization)
# --------------------------------------------------------------------------------------------
#
# pmaddwd multiplies 2 adjacent int16 pairs and adds them into one int32 lane: 2 MACs per lane per
# instruction against 1 MAC per vpmulld + vpaddd pair that LLVM emits for the legalized conv.
# Legalized TIR cannot be made to use it (s_tir's tensorize segfaults in this wheel), so the conv
# is replaced before legalization by two PrimFuncs written here:
#
#   x int8 NCHW --pack_int16_pairs--> xp int32 (N, ceil(C/2), H+pads, W+pads)   one int32 = 2 int16
#   xp, w' --conv2d_int16_pairs--> int32 NCHW                                  (then the epilogue)
#
# w' is the constant weight repacked in numpy to int16 (O/v, ceil(C/2), kh, kw, v x 2), so one
# 2v-lane int16 load holds v output channels x 2 input channels. An odd channel count is padded
# with a zero channel (zero products). |a0*b0 + a1*b1| <= 2 * 128 * 128, so every lane is exact.

_PMADDWD_INTRINSICS = {16: "llvm.x86.avx512.pmaddw.d.512", 8: "llvm.x86.avx2.pmadd.wd"}
_PAIR_ATTR_VALUE = "conv2d_int16_pairs"
# relax's OpPatternKind kOpaque: keeps FuseOps from merging this scheduled PrimFunc with others
_OPAQUE = 8


def pair_lanes(target: tvm.target.Target) -> int | None:
    """int32 lanes of the target's pmaddwd (16 with AVX-512BW, 8 with AVX2), None without."""
    if codegen.llvm_cpu_has_features(["avx512bw"], target):
        return 16
    if codegen.llvm_cpu_has_features(["avx2"], target):
        return 8
    return None


def _i64(*values):
    """int64 immediates: legalized PrimFuncs use int64 shapes, and FuseTIR refuses to join a
    buffer of int32 shape to one of int64 shape."""
    return [tvm.tirx.IntImm("int64", int(v)) for v in values]


def _pack_pairs_func(n, c, h, w, pads):
    c2, hp, wp = _i64((c + 1) // 2, h + pads[0] + pads[2], w + pads[1] + pads[3])
    n, c, h, w = _i64(n, c, h, w)
    pt, pl = _i64(pads[0], pads[1])

    @T.prim_func(private=True, s_tir=True)
    def pack_int16_pairs(x: T.Buffer((n, c, h, w), "int8"),  # noqa: F821 (TVMScript dtypes)
                         xp: T.Buffer((n, c2, hp, wp), "int32")):  # noqa: F821
        T.func_attr({"tirx.noalias": True})
        for i, j, y, z in T.grid(n, c2, hp, wp):
            with T.sblock("pack_int16_pairs"):
                vi, vj, vy, vz = T.axis.remap("SSSS", [i, j, y, z])
                # low half: channel 2j, high half: channel 2j+1 (little-endian int16x2)
                xp[vi, vj, vy, vz] = T.bitwise_or(
                    T.bitwise_and(T.if_then_else(
                        pt <= vy and vy < pt + h and pl <= vz and vz < pl + w,
                        T.Cast("int32", x[vi, vj * 2, vy - pt, vz - pl]), 0), 0xFFFF),
                    T.shift_left(T.if_then_else(
                        pt <= vy and vy < pt + h and pl <= vz and vz < pl + w and vj * 2 + 1 < c,
                        T.Cast("int32", x[vi, T.min(vj * 2 + 1, c - 1), vy - pt, vz - pl]), 0), 16))
    return pack_int16_pairs


def _pair_conv_func(n, c2, hp, wp, o, kh, kw, oh, ow, sh, sw, v):
    acc_t, pair_t = f"int32x{v}", f"int16x{2 * v}"
    intrinsic = _PMADDWD_INTRINSICS[v]
    f, v2 = _i64(o // v, 2 * v)
    n, c2, hp, wp, o, kh, kw, oh, ow, sh, sw = _i64(n, c2, hp, wp, o, kh, kw, oh, ow, sh, sw)
    lanes, zero, one = _i64(v, 0, 1)

    @T.prim_func(private=True, s_tir=True)
    def conv2d_int16_pairs(xp: T.Buffer((n, c2, hp, wp), "int32"),  # noqa: F821 (TVMScript dtypes)
                           wq: T.Buffer((f, c2, kh, kw, v2), "int16"),  # noqa: F821
                           out: T.Buffer((n, o, oh, ow), "int32")):  # noqa: F821
        T.func_attr({"tirx.noalias": True})
        acc = T.sblock_alloc_buffer((n, f, oh, ow, lanes), "int32")
        for i, j, y, z, rc, ry, rx in T.grid(n, f, oh, ow, c2, kh, kw):
            with T.sblock("conv2d_int16_pairs"):
                vi, vj, vy, vz, vc, vry, vrx = T.axis.remap("SSSSRRR", [i, j, y, z, rc, ry, rx])
                with T.init():
                    acc[vi, vj, vy, vz, T.ramp(zero, one, v)] = T.broadcast(T.int32(0), v)
                acc[vi, vj, vy, vz, T.ramp(zero, one, v)] = acc[vi, vj, vy, vz, T.ramp(zero, one, v)] + (
                    T.call_llvm_pure_intrin(
                        acc_t, T.llvm_lookup_intrinsic_id(intrinsic),
                        T.reinterpret(pair_t, T.broadcast(xp[vi, vc, vy * sh + vry, vz * sw + vrx], v)),
                        wq[vj, vc, vry, vrx, T.ramp(zero, one, 2 * v)]))
        for i, j, y, z in T.grid(n, o, oh, ow):
            with T.sblock("unpack"):
                vi, vj, vy, vz = T.axis.remap("SSSS", [i, j, y, z])
                out[vi, vj, vy, vz] = acc[vi, vj // lanes, vy, vz, vj % lanes]
    return conv2d_int16_pairs


def _schedule_pair_conv(func):
    """The conv schedule above at vector granularity: 8 pixels x 2 channel vectors of
    accumulators in registers, NCHW written back per tile, (batch, row, channel tile) parallel."""
    sch = s_tir.Schedule(func)
    conv, unpack = sch.get_sblock("conv2d_int16_pairs"), sch.get_sblock("unpack")
    i, j, y, z, rc, ry, rx = sch.get_loops(conv)
    f, ow = _extents(sch, [j, z])
    jo, jm = sch.split(j, [None, 2 if f % 2 == 0 else 1])
    zo, zi = sch.split(z, [None, _largest_divisor(ow, _MAX_PIXEL_TILE)])
    sch.reorder(i, y, jo, zo, rc, ry, rx, zi, jm)
    sch.set_scope(conv, 0, "local")
    sch.reverse_compute_at(unpack, zo)
    sch.unroll(zi)
    sch.unroll(jm)
    _vectorize_tile_epilogue(sch, unpack, zo)
    sch.parallel(sch.fuse(i, y, jo))
    sch.decompose_reduction(conv, rc)
    return sch.mod["main"]


def pack_pair_weight(weight: np.ndarray, lanes: int) -> np.ndarray:
    """OIHW int8 -> int16 (O/lanes, ceil(I/2), kh, kw, lanes * 2), the layout pmaddwd reads."""
    o, c, kh, kw = weight.shape
    c2 = (c + 1) // 2
    w16 = np.zeros((o, 2 * c2, kh, kw), np.int16)
    w16[:, :c] = weight
    blocks = w16.reshape(o // lanes, lanes, c2, 2, kh, kw).transpose(0, 2, 4, 5, 1, 3)
    return np.ascontiguousarray(blocks).reshape(o // lanes, c2, kh, kw, 2 * lanes)


_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")


def int8_conv_geometry(call, lanes=None):
    """(N, C, H, W), pads, strides of an int8 NCHW conv2d call with a constant OIHW weight, groups
    and dilation 1, int32 out and, when ``lanes`` is given, ``lanes`` dividing its output channels
    (the pair rewrite's domain; the VNNI rewrite pads its output channels to whole vectors and
    takes any count), else None."""
    attrs = call.attrs
    data, weight = call.args
    if not isinstance(weight, tvm.ir.expr.Constant):
        return None
    if (int(attrs.groups) != 1 or str(attrs.data_layout) != "NCHW"
            or str(attrs.kernel_layout) != "OIHW" or str(attrs.out_layout) != "NCHW"
            or str(attrs.out_dtype) != "int32" or any(int(d) != 1 for d in attrs.dilation)):
        return None
    if str(data.ty.dtype) != "int8" or str(weight.ty.dtype) != "int8":
        return None
    try:
        shape = tuple(int(d) for d in data.ty.shape)
    except (TypeError, ValueError):  # symbolic batch: not handled
        return None
    if lanes is not None and int(weight.ty.shape[0]) % lanes:
        return None
    return shape, tuple(int(p) for p in attrs.padding), tuple(int(s) for s in attrs.strides)


@relax.expr_functor.mutator
class _Int8ConvRewriter(relax.PyExprMutator):
    """Replaces each conv2d that ``int8_conv_geometry`` accepts by what
    ``replace(builder, call, lanes, shape, pads, strides)`` emits; the pair and the VNNI rewrites
    differ only in that function."""

    def __init__(self, mod: tvm.IRModule, lanes: int, replace):
        super().__init__(mod)
        self.lanes = lanes
        self.replace = replace

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not (isinstance(call, relax.Call) and call.op.same_as(_CONV2D)):
            return call
        geometry = int8_conv_geometry(call, self.lanes)
        return call if geometry is None else self.replace(self.builder_, call, self.lanes,
                                                          *geometry)


def rewrite_matching_int8_convs(mod: tvm.IRModule, lanes: int, replace) -> tvm.IRModule:
    """``mod`` with every conv2d ``int8_conv_geometry`` accepts replaced (see ``_Int8ConvRewriter``)."""
    rewriter = _Int8ConvRewriter(mod, lanes, replace)
    for gvar, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
    return rewriter.builder_.get()


def padded_conv_extents(shape, weight_shape, pads, strides):
    """(padded height, padded width, output height, output width) of an NCHW conv."""
    _, _, h, w = shape
    _, _, kh, kw = weight_shape
    hp, wp = h + pads[0] + pads[2], w + pads[1] + pads[3]
    return hp, wp, (hp - kh) // strides[0] + 1, (wp - kw) // strides[1] + 1


def _replace_with_pair_conv(builder, call, lanes, shape, pads, strides):
    n, c, h, w = shape
    weight = call.args[1].value.numpy()
    o, _, kh, kw = weight.shape
    c2 = (c + 1) // 2
    hp, wp, oh, ow = padded_conv_extents(shape, weight.shape, pads, strides)
    conv = _schedule_pair_conv(_pair_conv_func(n, c2, hp, wp, o, kh, kw, oh, ow, *strides, lanes))
    conv = conv.with_attr("op_pattern", _OPAQUE).with_attr(SCHEDULE_ATTR, _PAIR_ATTR_VALUE)
    pack_gv = builder.add_func(_pack_pairs_func(n, c, h, w, pads), "pack_int16_pairs")
    conv_gv = builder.add_func(conv, "conv2d_int16_pairs")
    packed = builder.emit(relax.call_tir(
        pack_gv, [call.args[0]], relax.TensorType((n, c2, hp, wp), "int32")))
    return relax.call_tir(conv_gv, [packed, relax.const(pack_pair_weight(weight, lanes))],
                          relax.TensorType((n, o, oh, ow), "int32"))


def rewrite_int8_convs(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Replace each int8 NCHW conv2d with a constant weight (groups 1, dilation 1) by hand-written
    PrimFuncs: the u8 x s8 ``vpdpbusd`` ones of ``qcal.backend.tvm.vnni`` when the target has
    AVX-512 VNNI or AVX-VNNI (any out channel count), else the int16-pair ones (out channels a
    multiple of the vector lanes); others stay for the schedules. First, a max pool whose
    result is only requantized moves after the requantize (``qcal.backend.tvm.pool_order``:
    exact, and the pool reads int8). Runs before legalization; a target without AVX2 gets the
    module back unchanged."""
    from qcal.backend.tvm import depthwise, pool_order, vnni  # they build on this module

    quad_lanes = vnni.vnni_lanes(target)
    if quad_lanes is not None or pair_lanes(target) is not None:
        mod = pool_order.requantize_before_max_pools(mod)
    if quad_lanes is not None:
        mod = vnni.rewrite_vnni_convs(mod, quad_lanes, vnni.vnni_emulated(target))
    if depthwise.depthwise_supported(target):
        mod = depthwise.rewrite_depthwise_convs(mod)
    lanes = pair_lanes(target)
    if lanes is None:
        return mod
    return rewrite_matching_int8_convs(mod, lanes, _replace_with_pair_conv)


def RewriteInt8Convs(target: tvm.target.Target) -> tvm.transform.Pass:  # noqa: N802
    """``rewrite_int8_convs`` as a module pass, for a ``tvm.transform.Sequential``."""

    @tvm.transform.module_pass(opt_level=0, name="qcal.RewriteInt8Convs")
    def _pass(mod, _ctx):
        return rewrite_int8_convs(mod, target)

    return _pass


# --------------------------------------------------------------------------------------------
# pipeline
# --------------------------------------------------------------------------------------------

def relax_pipeline(target: tvm.target.Target, schedule: bool = True,
                   pair_convs: bool = True) -> tvm.transform.Pass:
    """The CPU Relax pipeline (sequence in the module docstring) as one module pass, for
    ``tvm.compile(mod, target, relax_pipeline=...)``. ``schedule=False`` leaves the fused PrimFuncs
    unscheduled, the baseline tests and benchmarks compare against; ``pair_convs=False`` skips the
    int16-pair conv rewrite (int8 convs then get the s_tir conv schedule)."""
    if target.kind.name != "llvm":
        raise QcalError(f"qcal's schedules build for LLVM CPU targets only, not {target.kind.name}")
    passes = (([RewriteInt8Convs(target)] if schedule and pair_convs else [])
              + cpu_pipeline.library_dispatch_passes(target)
              + cpu_pipeline.legalize_passes(target)
              + ([ApplyCpuSchedules(target)] if schedule else [])
              + cpu_pipeline.dataflow_lower_passes(target)
              + cpu_pipeline.finalize_passes(target))

    @tvm.transform.module_pass(opt_level=0, name="qcal.CpuPipeline")
    def _pipeline(mod, _ctx):
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline


def lower(mod: tvm.IRModule, target: tvm.target.Target, schedule: bool = True,
          pair_convs: bool = True) -> tvm.IRModule:
    """``relax_pipeline`` applied: the module as VM codegen receives it (tests inspect it)."""
    return relax_pipeline(target, schedule, pair_convs)(mod)


def build(mod: tvm.IRModule, target: tvm.target.Target | None = None, schedule: bool = True,
          pair_convs: bool = True):
    """Compile a Relax module for the CPU with qcal's schedules; returns a relax Executable
    (run it with ``relax.VirtualMachine(ex, tvm.cpu())``; ``export_library`` writes it as a .so)."""
    target = target or cpu_target()
    return tvm.compile(mod, target, relax_pipeline=relax_pipeline(target, schedule, pair_convs))
