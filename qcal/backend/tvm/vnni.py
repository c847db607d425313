"""int8 conv as u8 x s8 quads on VNNI (``vpdpbusd``): a Relax rewrite that runs before legalization.

Where this sits: ``qcal.backend.tvm.schedules.rewrite_int8_convs`` calls ``rewrite_vnni_convs``
first when the target has AVX-512 VNNI (16 int32 lanes) or AVX-VNNI (8 lanes); the convs it
leaves go on to the int16-pair rewrite and the s_tir schedules. The conv is replaced by two
PrimFuncs written here, and the tensors between such convs stay channel-blocked
(``qcal.backend.tvm.blocked``: v channels of a pixel contiguous, v = the lanes)::

    x int8 (N, C/v, H, W, v) --pack_blocked_u8_quads--> xq int32 (N, C/v, H+pads, W+pads, v/4)
    x int8 NCHW (not made blocked) --pack_u8_quads--> xq int32 (N, ceil(C/4), .., .., 1)
                                                        one int32 = 4 u8 of 4 adjacent channels
    xq, w', init --conv2d_vnni--> int32 (N, O/v, OH, OW, v)             (then the epilogue)

(C/v and O/v rounded up: see "Channel counts that are not a multiple of v" below.)

``vpdpbusd`` multiplies 4 adjacent unsigned bytes of one operand with 4 signed bytes of the other
and adds the 4 products into one int32 lane, without saturation: 64 MACs an instruction with
AVX-512, against 32 for ``vpmaddwd`` (which also needs a separate add). It wants unsigned
activations, so the pack adds 128 to every int8 value (the padding included: a padded zero
becomes 128 like any other zero), and then for every output pixel

    sum_k (x_k + 128) * w_k  =  sum_k x_k * w_k  +  128 * sum_k w_k

The second term depends on the output channel only: the accumulators start at
``init[o] = -128 * sum(w[o])`` instead of 0, and the result is the int8 x int8 conv exactly.
No product or sum can wrap: |(x + 128) * w| <= 255 * 128 and a conv would need more than 65000
reduction terms to leave int32 (the numpy reference accumulates in int64 and agrees).

Inputs read in place: a 1x1 conv without padding whose input is channel-blocked and provably
>= 0 everywhere (a ReLU's output: ``qcal.backend.tvm.value_bounds`` proves it from the graph)
needs no pack at all. Its int8 bytes are already the unsigned bytes ``vpdpbusd`` wants (0..127
has the same bits either way) and already in the quads' order, 4 channels of a pixel adjacent,
so the conv reads 4 bytes of the blocked tensor as one int32 and its accumulators start at 0
(nothing to correct). No padding: the pack is also what writes a padded conv's border. In
resnet50_v1 every 1x1 conv reads in place; of its 53 convs only the 17 with a 3x3 or 7x7 kernel
keep a pack, a pass over their input (``scripts/profile_layers.py``).

w' is the constant weight repacked in numpy to (O/v, ceil(C/4), kh, kw, v) int32, each int32 holding
4 int8 of one output channel and 4 consecutive input channels (little-endian), so one v-lane load
is the ``vpdpbusd`` weight operand. Channel counts that are not a multiple of 4 are padded with
zero weights (zero products, zero correction).

Channel counts that are not a multiple of v (EfficientNet-Lite0's 1x1 projections to 24 and 40
channels): the out channels are padded to ``vector_blocks(O, v) * v`` with zero weights, whose
accumulator start is 0 (no weight to correct for), so a padded lane of the conv's output is 0 and
the epilogue's per-channel constants there are the last real channel's (``blocked.blocked_array``:
any op valid on a real channel is valid there, a divisor stays non-zero). Those lanes are never
read as a real channel: the conversion back to NCHW drops them, and a conv reading a padded
blocked input multiplies them by zero weights (its in channels padded the same way), with the
+128 correction unchanged because it sums the real weights only.

Emulation, for verification only (``$QCAL_VNNI_EMULATE``, ``EMULATE_ENV``): set to 16 or 8, it
makes ``vnni_lanes`` answer that lane count for a target that has AVX2 but no VNNI, and the
convs then compute each ``vpdpbusd`` in plain int32 vector ops, the same arithmetic exactly
(``_quad_dot``): the layouts, packs, corrections, padding and schedule are the real kernel's, so
tests on a CPU without VNNI check them bit for bit against numpy. It is far slower than the
int16-pair convs such a CPU otherwise gets, and is logged as a warning when it is used; a
target with VNNI ignores it, and a target whose ``mattr`` switches a VNNI feature off
(``-avx512vnni``, ``-avxvnni``) has that feature emulated neither. Its conv blocks carry the
annotation ``EMULATED_ANNOTATION`` (the real ones call ``vpdpbusd``), and the compile cache keys
an emulated library apart (``qcal.backend.tvm.compile.cache_key``). The depthwise VNNI conv
(``qcal.backend.tvm.depthwise``, which also needs VBMI's ``vpermb``) is not emulated: without
VNNI and VBMI it stays on the s_tir depthwise rule.

Schedule (``schedule_vnni_conv2d``): the int16-pair conv's tiling at vector granularity -- up to
``_PIXEL_TILE`` output pixels of one row x ``_CHANNEL_VECTORS`` vectors of channels accumulate in
registers with the reduction loops outside, written back per tile as whole vectors (the output
layout is the accumulator tile's), (batch, row, channel tile) in parallel. Measured per conv shape
by ``scripts/bench_ops.py``, per layer of a model by ``scripts/profile_layers.py``.

Length: the pack, conv and shortcut-fused conv PrimFuncs, the weight packing, the schedule rule
and the emulation of ``vpdpbusd`` share one kernel's layouts and constants and change together.
"""
from __future__ import annotations

import logging
import os

import numpy as np
import tvm
from tvm import relax, s_tir
from tvm.script import tirx as T
from tvm.target import codegen

from qcal.backend.tvm.schedules import (Decline, Scheduled, _extents, _i64, _inline_epilogue,
                                        _largest_divisor, _name, _parallel_outer, _root_blocks,
                                        _vectorize_tile_epilogue, padded_conv_extents)
from qcal.errors import UsageProblem

log = logging.getLogger("qcal.backend.tvm.vnni")

VNNI_BLOCK = "conv2d_vnni"
# relax's OpPatternKind kOutEWiseFusable: FuseOps may fuse the elementwise ops after the conv
# into its PrimFunc (as it does for a legalized conv2d); the rule then schedules them together
_OUT_ELEMWISE_FUSABLE = 4
_VPDPBUSD_INTRINSICS = {16: "llvm.x86.avx512.vpdpbusd.512", 8: "llvm.x86.avx512.vpdpbusd.256"}
# Output pixels x channel vectors of accumulators held in registers (of 32 with AVX-512).
_PIXEL_TILE = 8
_CHANNEL_VECTORS = 2
EMULATE_ENV = "QCAL_VNNI_EMULATE"
# the VNNI features an emulated lane count stands for, as llvm_cpu_has_features names them
_EMULATED_FEATURES = {16: ("avx512vnni", "avxvnni"), 8: ("avxvnni",)}
# block annotation of an emulated conv2d_vnni block (visible in the lowered TIR's script)
EMULATED_ANNOTATION = "qcal_vnni_emulated"
_warned = set()


def vector_blocks(channels: int, lanes: int) -> int:
    """Blocks of ``lanes`` channels holding ``channels``: the last one padded when they do not
    divide (the blocked layout's second dimension, the VNNI conv's vectors of out channels)."""
    return -(-channels // lanes)


def _hardware_lanes(target: tvm.target.Target) -> int | None:
    if codegen.llvm_cpu_has_features(["avx512vnni", "avx512bw"], target):
        return 16
    if codegen.llvm_cpu_has_features(["avxvnni"], target):
        return 8
    return None


def emulated_lanes() -> int | None:
    """The ``vpdpbusd`` lanes ``$QCAL_VNNI_EMULATE`` asks to emulate (16 or 8), None when unset."""
    value = os.environ.get(EMULATE_ENV, "").strip()
    if not value:
        return None
    if value not in ("16", "8"):
        raise UsageProblem(f"{EMULATE_ENV} must be 16 or 8 (the vpdpbusd lanes to emulate), "
                           f"not {value!r}")
    return int(value)


def _emulated_target_lanes(target: tvm.target.Target) -> int | None:
    """The lanes emulated for a target without VNNI (module docstring), or None."""
    requested = emulated_lanes()
    if requested is None or not codegen.llvm_cpu_has_features(["avx2"], target):
        return None
    switched_off = {str(a)[1:] for a in target.attrs.get("mattr", []) if str(a).startswith("-")}
    features = [f for f in _EMULATED_FEATURES[requested] if f not in switched_off]
    lanes = 16 if "avx512vnni" in features else 8 if features else None
    if lanes is not None and lanes not in _warned:
        _warned.add(lanes)
        log.warning("%s=%d: the VNNI convs emulate %d-lane vpdpbusd in plain int32 vector ops, "
                    "for verification only (much slower than this CPU's int16-pair convs)",
                    EMULATE_ENV, requested, lanes)
    return lanes


def vnni_lanes(target: tvm.target.Target) -> int | None:
    """int32 lanes of the target's ``vpdpbusd`` (16 with AVX-512 VNNI, 8 with AVX-VNNI), or
    None; on a target without VNNI, the emulated lanes when ``$QCAL_VNNI_EMULATE`` is set."""
    lanes = _hardware_lanes(target)
    return lanes if lanes is not None else _emulated_target_lanes(target)


def vnni_emulated(target: tvm.target.Target) -> bool:
    """Whether the target's VNNI convs are the portable emulation of ``vpdpbusd`` (for
    verification only: module docstring)."""
    return _hardware_lanes(target) is None and _emulated_target_lanes(target) is not None


def _quad_dot(v: int, emulate: bool):
    """``dot(acc, x, w)``: ``acc`` (int32 x v) plus, in each lane, the 4 products of the lane's
    bytes of ``x`` (unsigned) and of ``w`` (signed), summed: ``vpdpbusd``, or with ``emulate`` the
    same in plain int32 vector ops (no product or sum can wrap: module docstring)."""
    acc_t, bytes_t = f"int32x{v}", f"int8x{4 * v}"
    intrinsic = _VPDPBUSD_INTRINSICS[v]

    def vpdpbusd(acc, x, w):
        # LLVM's vpdpbusd takes its two multiplicands as byte vectors (unsigned, then signed)
        return T.call_llvm_pure_intrin(acc_t, T.llvm_lookup_intrinsic_id(intrinsic), acc,
                                       T.reinterpret(bytes_t, x), T.reinterpret(bytes_t, w))

    def lanes(value):
        return T.broadcast(T.int32(value), v)

    def emulated(acc, x, w):
        for k in range(4):
            # byte k of x zero-extended, byte k of w sign-extended (an arithmetic right shift)
            unsigned = T.bitwise_and(T.shift_right(x, lanes(8 * k)), lanes(0xFF))
            signed = T.shift_right(T.shift_left(w, lanes(24 - 8 * k)), lanes(24))
            acc = acc + unsigned * signed
        return acc

    return emulated if emulate else vpdpbusd


def _pack_quads_func(n, c, h, w, pads):
    """NCHW int8 -> (N, ceil(C/4), H+pads, W+pads, 1) u8 quads, +128 each byte."""
    c4, hp, wp = _i64((c + 3) // 4, h + pads[0] + pads[2], w + pads[1] + pads[3])
    n, c, h, w = _i64(n, c, h, w)
    pt, pl = _i64(pads[0], pads[1])
    zero = _i64(0)[0]

    # 0x80808080: XOR with 0x80 adds 128 to each signed byte modulo 256 (int8 -> u8 + 128)
    offset = T.int32(-0x7F7F7F80)

    @T.prim_func(private=True, s_tir=True)
    def pack_u8_quads(x: T.Buffer((n, c, h, w), "int8"),  # noqa: F821 (TVMScript dtypes)
                      xq: T.Buffer((n, c4, hp, wp, 1), "int32")):  # noqa: F821
        T.func_attr({"tirx.noalias": True})
        for i, j, y, z in T.grid(n, c4, hp, wp):
            with T.sblock("pack_u8_quads"):
                vi, vj, vy, vz = T.axis.remap("SSSS", [i, j, y, z])
                # byte k: channel 4j+k (little-endian) as raw bits, then + 128 each; padding and
                # missing channels are 0, so 128 once shifted
                xq[vi, vj, vy, vz, zero] = T.bitwise_xor(T.bitwise_or(T.bitwise_or(
                    T.bitwise_and(T.if_then_else(
                        pt <= vy and vy < pt + h and pl <= vz and vz < pl + w,
                        T.Cast("int32", x[vi, vj * 4, vy - pt, vz - pl]), 0), 0xFF),
                    T.shift_left(T.bitwise_and(T.if_then_else(
                        pt <= vy and vy < pt + h and pl <= vz and vz < pl + w and vj * 4 + 1 < c,
                        T.Cast("int32", x[vi, T.min(vj * 4 + 1, c - 1), vy - pt, vz - pl]), 0),
                        0xFF), 8)), T.bitwise_or(
                    T.shift_left(T.bitwise_and(T.if_then_else(
                        pt <= vy and vy < pt + h and pl <= vz and vz < pl + w and vj * 4 + 2 < c,
                        T.Cast("int32", x[vi, T.min(vj * 4 + 2, c - 1), vy - pt, vz - pl]), 0),
                        0xFF), 16),
                    T.shift_left(T.if_then_else(
                        pt <= vy and vy < pt + h and pl <= vz and vz < pl + w and vj * 4 + 3 < c,
                        T.Cast("int32", x[vi, T.min(vj * 4 + 3, c - 1), vy - pt, vz - pl]), 0),
                        24))), offset)
    return pack_u8_quads


def _pack_blocked_quads_func(n, cb, h, w, v, pads):
    """Channel-blocked int8 (N, C/v, H, W, v) -> (N, C/v, H+pads, W+pads, v/4) u8 quads, +128 each
    byte: the same bytes, padded; the v channels of a pixel stay one contiguous run."""
    q, hp, wp = _i64(v // 4, h + pads[0] + pads[2], w + pads[1] + pads[3])
    n, cb, h, w = _i64(n, cb, h, w)
    pt, pl = _i64(pads[0], pads[1])
    offset = T.int32(-0x7F7F7F80)  # 0x80808080, as above

    @T.prim_func(private=True, s_tir=True)
    def pack_blocked_u8_quads(x: T.Buffer((n, cb, h, w, q * 4), "int8"),  # noqa: F821
                              xq: T.Buffer((n, cb, hp, wp, q), "int32")):  # noqa: F821
        T.func_attr({"tirx.noalias": True})
        for i, j, y, z, k in T.grid(n, cb, hp, wp, q):
            with T.sblock("pack_u8_quads"):
                vi, vj, vy, vz, vk = T.axis.remap("SSSSS", [i, j, y, z, k])
                xq[vi, vj, vy, vz, vk] = T.bitwise_xor(T.if_then_else(
                    pt <= vy and vy < pt + h and pl <= vz and vz < pl + w,
                    T.bitwise_or(T.bitwise_or(
                        T.bitwise_and(T.Cast("int32", x[vi, vj, vy - pt, vz - pl, vk * 4]), 0xFF),
                        T.shift_left(T.bitwise_and(
                            T.Cast("int32", x[vi, vj, vy - pt, vz - pl, vk * 4 + 1]), 0xFF), 8)),
                        T.bitwise_or(
                            T.shift_left(T.bitwise_and(
                                T.Cast("int32", x[vi, vj, vy - pt, vz - pl, vk * 4 + 2]), 0xFF), 16),
                            T.shift_left(
                                T.Cast("int32", x[vi, vj, vy - pt, vz - pl, vk * 4 + 3]), 24))),
                    0), offset)
    return pack_blocked_u8_quads


def _quad_load(in_place: bool):
    """``load(x, i, c, y, z, k)``: the int32 of u8 quad ``k`` of pixel (y, z) of block ``c``;
    ``x`` is the pack's int32 quads, or with ``in_place`` the channel-blocked int8 tensor itself,
    whose 4 bytes of channels 4k..4k+3 are the quad's (little-endian, as the pack orders them)."""
    if not in_place:
        return lambda x, i, c, y, z, k: x[i, c, y, z, k]
    return lambda x, i, c, y, z, k: T.reinterpret("int32", x[i, c, y, z, T.ramp(k * 4, 1, 4)])


def _quad_buffer(n, cb, q, hp, wp, in_place: bool):
    """The shape and dtype of a conv's input: the pack's quads, or the blocked int8 tensor."""
    if in_place:
        return tuple(_i64(n, cb, hp, wp, q * 4)), "int8"
    return tuple(_i64(n, cb, hp, wp, q)), "int32"


def _vnni_conv_func(n, cb, q, hp, wp, o, kh, kw, oh, ow, sh, sw, v, emulate, in_place=False):
    dot, load = _quad_dot(v, emulate), _quad_load(in_place)
    annotations = {EMULATED_ANNOTATION: 1} if emulate else {}
    f, c4 = vector_blocks(o, v), cb * q
    x_shape, x_dtype = _quad_buffer(n, cb, q, hp, wp, in_place)
    n, cb, q, c4, hp, wp, o, kh, kw, oh, ow, sh, sw, f = _i64(
        n, cb, q, c4, hp, wp, o, kh, kw, oh, ow, sh, sw, f)
    lanes, zero, one = _i64(v, 0, 1)

    @T.prim_func(private=True, s_tir=True)
    def conv2d_vnni(xq: T.Buffer(x_shape, x_dtype),
                    wq: T.Buffer((f, c4, kh, kw, lanes), "int32"),  # noqa: F821
                    init: T.Buffer((f, lanes), "int32"),  # noqa: F821
                    out: T.Buffer((n, f, oh, ow, lanes), "int32")):  # noqa: F821
        T.func_attr({"tirx.noalias": True})
        acc = T.sblock_alloc_buffer((n, f, oh, ow, lanes), "int32")
        for i, j, y, z, rc, ry, rx, rq in T.grid(n, f, oh, ow, cb, kh, kw, q):
            with T.sblock("conv2d_vnni"):  # VNNI_BLOCK
                vi, vj, vy, vz, vc, vry, vrx, vq = T.axis.remap(
                    "SSSSRRRR", [i, j, y, z, rc, ry, rx, rq])
                T.sblock_attr(annotations)
                with T.init():
                    acc[vi, vj, vy, vz, T.ramp(zero, one, v)] = init[vj, T.ramp(zero, one, v)]
                acc[vi, vj, vy, vz, T.ramp(zero, one, v)] = dot(
                    acc[vi, vj, vy, vz, T.ramp(zero, one, v)],
                    T.broadcast(load(xq, vi, vc, vy * sh + vry, vz * sw + vrx, vq), v),
                    wq[vj, vc * q + vq, vry, vrx, T.ramp(zero, one, v)])
        for i, j, y, z, c in T.grid(n, f, oh, ow, lanes):
            with T.sblock("unpack"):
                vi, vj, vy, vz, vl = T.axis.remap("SSSSS", [i, j, y, z, c])
                out[vi, vj, vy, vz, vl] = acc[vi, vj, vy, vz, vl]
    return conv2d_vnni


def _vnni_shortcut_conv_func(main, short, o, oh, ow, v, emulate, in_place=(False, False)):
    """conv2d_vnni with a projection shortcut computed in the same tile: the shortcut conv's
    accumulators, (acc + bias) << shift (the residual add's alignment, per channel), start the
    main conv's accumulators. ``main`` / ``short``: (n, cb, q, hp, wp, kh, kw, sh, sw) of each;
    ``in_place``: whether each reads its blocked int8 input itself (``reads_in_place``).

    Written already tiled -- one block per tile of ``pixels`` output pixels x ``vectors``
    channel vectors, its two reductions as loops inside -- because s_tir's compute_at cannot
    place a block whose writes are whole vectors (its lane dimension has no iterator)."""
    dot, load, load_s = _quad_dot(v, emulate), _quad_load(in_place[0]), _quad_load(in_place[1])
    annotations = {EMULATED_ANNOTATION: 1} if emulate else {}
    f = vector_blocks(o, v)
    pixels, vectors = _largest_divisor(ow, _PIXEL_TILE), _largest_divisor(f, _CHANNEL_VECTORS)
    x_shape, x_dtype = _quad_buffer(*main[:5], in_place[0])
    xs_shape, xs_dtype = _quad_buffer(*short[:5], in_place[1])
    xw, xsw = x_shape[4], xs_shape[4]  # the tile's reads of each input, in its last axis
    n, cb, q, hp, wp, kh, kw, sh, sw = _i64(*main)
    _, cbs, qs, hps, wps, khs, kws, shs, sws = _i64(*short)
    c4, c4s = _i64(main[1] * main[2], short[1] * short[2])
    fo, zt = _i64(f // vectors, ow // pixels)
    f, oh, ow, px, vc = _i64(f, oh, ow, pixels, vectors)
    lanes, zero, one = _i64(v, 0, 1)

    @T.prim_func(private=True, s_tir=True)
    def conv2d_vnni_shortcut(xq: T.Buffer(x_shape, x_dtype),
                             wq: T.Buffer((f, c4, kh, kw, lanes), "int32"),  # noqa: F821
                             init: T.Buffer((f, lanes), "int32"),  # noqa: F821
                             xs: T.Buffer(xs_shape, xs_dtype),
                             ws: T.Buffer((f, c4s, khs, kws, lanes), "int32"),  # noqa: F821
                             inits: T.Buffer((f, lanes), "int32"),  # noqa: F821
                             bias: T.Buffer((f, lanes), "int32"),  # noqa: F821
                             shift: T.Buffer((f, lanes), "int32"),  # noqa: F821
                             out: T.Buffer((n, f, oh, ow, lanes), "int32")):  # noqa: F821
        T.func_attr({"tirx.noalias": True})
        acc = T.sblock_alloc_buffer((n, f, oh, ow, lanes), "int32", scope="local")
        for i, y, jo, zo in T.grid(n, oh, fo, zt):
            with T.sblock("conv2d_vnni"):  # VNNI_BLOCK, the whole tile
                vi, vy, vjo, vzo = T.axis.remap("SSSS", [i, y, jo, zo])
                T.sblock_attr(annotations)
                T.reads(xq[vi, 0:cb, vy * sh:vy * sh + kh,
                           vzo * px * sw:vzo * px * sw + (px - 1) * sw + kw, 0:xw],
                        wq[vjo * vc:vjo * vc + vc, 0:c4, 0:kh, 0:kw, 0:lanes],
                        init[vjo * vc:vjo * vc + vc, 0:lanes],
                        xs[vi, 0:cbs, vy * shs:vy * shs + khs,
                           vzo * px * sws:vzo * px * sws + (px - 1) * sws + kws, 0:xsw],
                        ws[vjo * vc:vjo * vc + vc, 0:c4s, 0:khs, 0:kws, 0:lanes],
                        inits[vjo * vc:vjo * vc + vc, 0:lanes],
                        bias[vjo * vc:vjo * vc + vc, 0:lanes], shift[vjo * vc:vjo * vc + vc, 0:lanes])
                T.writes(acc[vi, vjo * vc:vjo * vc + vc, vy, vzo * px:vzo * px + px, 0:lanes])
                accs = T.sblock_alloc_buffer((vc, px, lanes), "int32", scope="local")
                for jm in T.unroll(vc):
                    for zi in T.unroll(px):
                        accs[jm, zi, T.ramp(zero, one, v)] = inits[
                            vjo * vc + jm, T.ramp(zero, one, v)]
                for rc, ry, rx, rq in T.grid(cbs, khs, kws, qs):
                    for zi in T.unroll(px):
                        for jm in T.unroll(vc):
                            accs[jm, zi, T.ramp(zero, one, v)] = dot(
                                accs[jm, zi, T.ramp(zero, one, v)],
                                T.broadcast(load_s(
                                    xs, vi, rc, vy * shs + ry, (vzo * px + zi) * sws + rx, rq), v),
                                ws[vjo * vc + jm, rc * qs + rq, ry, rx, T.ramp(zero, one, v)])
                for jm in T.unroll(vc):
                    for zi in T.unroll(px):
                        # the residual add's alignment of the shortcut, then the main conv's start
                        acc[vi, vjo * vc + jm, vy, vzo * px + zi, T.ramp(zero, one, v)] = (
                            T.shift_left(accs[jm, zi, T.ramp(zero, one, v)]
                                         + bias[vjo * vc + jm, T.ramp(zero, one, v)],
                                         shift[vjo * vc + jm, T.ramp(zero, one, v)])
                            + init[vjo * vc + jm, T.ramp(zero, one, v)])
                for rc, ry, rx, rq in T.grid(cb, kh, kw, q):
                    for zi in T.unroll(px):
                        for jm in T.unroll(vc):
                            acc[vi, vjo * vc + jm, vy, vzo * px + zi, T.ramp(zero, one, v)] = dot(
                                acc[vi, vjo * vc + jm, vy, vzo * px + zi, T.ramp(zero, one, v)],
                                T.broadcast(load(
                                    xq, vi, rc, vy * sh + ry, (vzo * px + zi) * sw + rx, rq), v),
                                wq[vjo * vc + jm, rc * q + rq, ry, rx, T.ramp(zero, one, v)])
        for i, j, y, z, c in T.grid(n, f, oh, ow, lanes):
            with T.sblock("unpack"):
                vi, vj, vy, vz, vl = T.axis.remap("SSSSS", [i, j, y, z, c])
                out[vi, vj, vy, vz, vl] = acc[vi, vj, vy, vz, vl]
    return conv2d_vnni_shortcut


def schedule_vnni_conv2d(func, lanes: int, prepack: bool) -> Scheduled:
    """The schedule rule for a PrimFunc holding ``conv2d_vnni`` (alone, or fused by FuseOps with
    the elementwise epilogue after it: bias, requantize, ReLU, residual add).

    The epilogue (``unpack`` included) is inlined into its last block, which is computed per tile
    right after the tile's accumulators, while they are in registers: the conv's int32 tensor
    never exists. When the function has more than one output (FuseOps makes such), the
    conv and ``unpack`` are scheduled alone and the other blocks get parallel outer loops."""
    sch = s_tir.Schedule(func)
    blocks = _root_blocks(sch)
    names = [_name(sch, b) for b in blocks]
    if VNNI_BLOCK not in names:
        raise Decline("no conv2d_vnni block")
    index = names.index(VNNI_BLOCK)
    conv = blocks[index]
    if index != 0 or names[index + 1] != "unpack":
        raise RuntimeError(f"conv2d_vnni PrimFunc with unexpected blocks {names}")
    try:
        out = _inline_epilogue(sch, index, blocks)
        rest = []
    except Decline:
        out, rest = blocks[index + 1], blocks[index + 2:]
    loops = sch.get_loops(conv)
    if len(loops) == 4:  # the shortcut-fused conv, written as one block per tile
        i, y, jo, zo = loops
        sch.reverse_compute_at(out, zo)
        _vectorize_tile_epilogue(sch, out, zo)
        sch.parallel(sch.fuse(i, y, jo))
        for b in rest:
            _parallel_outer(sch, b)
        return Scheduled(sch.mod["main"])
    i, j, y, z, rc, ry, rx, rq = loops
    f, ow = _extents(sch, [j, z])
    jo, jm = sch.split(j, [None, _largest_divisor(f, _CHANNEL_VECTORS)])
    zo, zi = sch.split(z, [None, _largest_divisor(ow, _PIXEL_TILE)])
    sch.reorder(i, y, jo, zo, rc, ry, rx, rq, zi, jm)
    sch.set_scope(conv, 0, "local")
    sch.reverse_compute_at(out, zo)
    sch.unroll(zi)
    sch.unroll(jm)
    _vectorize_tile_epilogue(sch, out, zo)
    sch.parallel(sch.fuse(i, y, jo))
    # parallel/vectorize/unroll first: after decompose_reduction they refuse the update block
    sch.decompose_reduction(conv, rc)
    for b in rest:
        _parallel_outer(sch, b)
    return Scheduled(sch.mod["main"])


def pack_vnni_weight(weight: np.ndarray, lanes: int, in_quads: int | None = None,
                     shifted: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """OIHW int8 -> (the (ceil(O/lanes), in_quads, kh, kw, lanes) int32 layout ``vpdpbusd`` reads,
    the (ceil(O/lanes), lanes) int32 accumulator start ``-128 * sum(weight[o])``, or 0 when the
    input is not ``shifted`` by 128: read in place). ``in_quads`` (default ceil(I/4)) is the
    packed input's quads a pixel, more than ceil(I/4) when it is blocked with padded channels;
    padded in and out channels get zero weights, and a padded out channel's start is 0."""
    o, c, kh, kw = weight.shape
    c4 = (c + 3) // 4 if in_quads is None else in_quads
    if 4 * c4 < c:
        raise ValueError(f"{c4} quads cannot hold {c} input channels")
    f = vector_blocks(o, lanes)
    w8 = np.zeros((f * lanes, 4 * c4, kh, kw), np.int8)
    w8[:o, :c] = weight
    # (F, l, c4, 4, kh, kw) -> (F, c4, kh, kw, l, 4): the 4 bytes of one int32 lane adjacent
    quads = np.ascontiguousarray(w8.reshape(f, lanes, c4, 4, kh, kw)
                                 .transpose(0, 2, 4, 5, 1, 3))
    packed = quads.view("<i4").reshape(f, c4, kh, kw, lanes).astype(np.int32)
    init = np.zeros(f * lanes, np.int32)
    if shifted:
        init[:o] = -128 * weight.reshape(o, -1).astype(np.int64).sum(axis=1)
    return packed, init.reshape(f, lanes)


def reads_in_place(kernel: tuple[int, int], pads, blocked_input, nonnegative: bool) -> bool:
    """Whether a conv reads its input's bytes as they are, with no pack (module docstring,
    "Inputs read in place"): a 1x1 conv, unpadded, on a channel-blocked input whose values are
    all >= 0 (``nonnegative``: proved by ``qcal.backend.tvm.value_bounds``)."""
    return (tuple(kernel) == (1, 1) and not any(pads) and blocked_input is not None
            and nonnegative)


def _emit_pack(builder, call, lanes, shape, pads, blocked_input, in_place=False):
    """The pack of one conv's input: ((n, cb, q, hp, wp) of the quads, the pack's call), or with
    ``in_place`` the blocked int8 input itself in the pack's place."""
    n, c, h, w = shape
    hp, wp = h + pads[0] + pads[2], w + pads[1] + pads[3]
    if in_place:
        return (n, vector_blocks(c, lanes), lanes // 4, hp, wp), blocked_input
    if blocked_input is not None:
        cb, q = vector_blocks(c, lanes), lanes // 4
        pack = _pack_blocked_quads_func(n, cb, h, w, lanes, pads)
        source, pack_name = blocked_input, "pack_blocked_u8_quads"
    else:
        cb, q = (c + 3) // 4, 1
        pack = _pack_quads_func(n, c, h, w, pads)
        source, pack_name = call.args[0], "pack_u8_quads"
    pack_gv = builder.add_func(pack, pack_name)
    packed = builder.emit(relax.call_tir(
        pack_gv, [source], relax.TensorType((n, cb, hp, wp, q), "int32")))
    return (n, cb, q, hp, wp), packed


def emit_vnni_conv(builder, call, lanes, shape, pads, strides, blocked_input=None,
                   emulate=False, nonnegative=False):
    """Emit the VNNI PrimFuncs for an int8 conv2d call that ``int8_conv_geometry`` accepted (its
    NCHW input ``call.args[0]``, or ``blocked_input``: the same tensor channel-blocked,
    (N, C/lanes, H, W, lanes)); returns the conv's call, whose int32 output is channel-blocked
    (N, O/lanes, OH, OW, lanes), the layout of its accumulator tiles (O/lanes rounded up, the
    padded lanes 0). ``emulate``: ``vpdpbusd`` in plain int32 ops (verification only).
    ``nonnegative``: every input value is proved >= 0, so a 1x1 conv may read it in place."""
    weight = call.args[1].value.numpy()
    o, _, kh, kw = weight.shape
    _, _, oh, ow = padded_conv_extents(shape, weight.shape, pads, strides)
    in_place = reads_in_place((kh, kw), pads, blocked_input, nonnegative)
    (n, cb, q, hp, wp), packed = _emit_pack(builder, call, lanes, shape, pads, blocked_input,
                                            in_place)
    conv = _vnni_conv_func(n, cb, q, hp, wp, o, kh, kw, oh, ow, *strides, lanes, emulate,
                           in_place)
    conv = conv.with_attr("op_pattern", _OUT_ELEMWISE_FUSABLE)
    conv_gv = builder.add_func(conv, "conv2d_vnni")
    wq, init = pack_vnni_weight(weight, lanes, cb * q, shifted=not in_place)
    return relax.call_tir(conv_gv, [packed, relax.const(wq, "int32"), relax.const(init, "int32")],
                          relax.TensorType((n, vector_blocks(o, lanes), oh, ow, lanes), "int32"))


def emit_vnni_shortcut_conv(builder, lanes, main, shortcut, bias, shift, emulate=False):
    """One PrimFunc for ``main + ((shortcut + bias) << shift)`` of two int8 convs with the same
    output shape (a residual block's last conv and its projection shortcut): ``main`` and
    ``shortcut`` are (call, shape, pads, strides, blocked input or None, nonnegative) as for
    ``emit_vnni_conv``; ``bias`` and ``shift`` int32 per output channel. The shortcut's int32
    tensor is never written: each tile computes it in registers first. Returns the call (its
    output channel-blocked int32). ``emulate``: as for ``emit_vnni_conv``."""
    geometry, packed, weights, in_place = [], [], [], []
    for call, shape, pads, strides, blocked_input, nonnegative in (main, shortcut):
        weight = call.args[1].value.numpy()
        o, _, kh, kw = weight.shape
        _, _, oh, ow = padded_conv_extents(shape, weight.shape, pads, strides)
        in_place.append(reads_in_place((kh, kw), pads, blocked_input, nonnegative))
        (n, cb, q, hp, wp), xq = _emit_pack(builder, call, lanes, shape, pads, blocked_input,
                                            in_place[-1])
        geometry.append((n, cb, q, hp, wp, kh, kw) + tuple(strides))
        packed.append(xq)
        weights.append(pack_vnni_weight(weight, lanes, cb * q, shifted=not in_place[-1]))
    conv = _vnni_shortcut_conv_func(geometry[0], geometry[1], o, oh, ow, lanes, emulate,
                                    tuple(in_place))
    conv = conv.with_attr("op_pattern", _OUT_ELEMWISE_FUSABLE)
    conv_gv = builder.add_func(conv, "conv2d_vnni_shortcut")
    f = vector_blocks(o, lanes)
    # padded channels repeat the last real one's bias and shift (a shift that stays in range)
    per_lane = [relax.const(np.pad(np.broadcast_to(np.asarray(a, np.int32).reshape(-1), (o,)),
                                   (0, f * lanes - o), mode="edge").reshape(f, lanes), "int32")
                for a in (bias, shift)]
    (wq, init), (ws, inits) = weights
    args = [packed[0], relax.const(wq, "int32"), relax.const(init, "int32"),
            packed[1], relax.const(ws, "int32"), relax.const(inits, "int32")] + per_lane
    return relax.call_tir(conv_gv, args, relax.TensorType((n, f, oh, ow, lanes), "int32"))


def rewrite_vnni_convs(mod: tvm.IRModule, lanes: int, emulate: bool = False) -> tvm.IRModule:
    """Replace each int8 NCHW conv2d with a constant weight (groups 1, dilation 1, any out channel
    count: padded to whole vectors of ``lanes``) by the VNNI PrimFuncs, with the tensors between
    them kept channel-blocked (``qcal.backend.tvm.blocked``); other convs are left as they are.
    ``emulate``: ``vpdpbusd`` computed in plain int32 ops, for verification only (module
    docstring; ``vnni_emulated`` says when a target gets it)."""
    from qcal.backend.tvm import blocked  # it builds on this module

    return blocked.rewrite_blocked(mod, lanes, emulate)


def without_vnni(target: tvm.target.Target) -> tvm.target.Target:
    """The same LLVM target with AVX-512 VNNI and AVX-VNNI switched off: what the int16-pair path
    compiles for on this CPU (benchmarks compare the two kernels side by side with it)."""
    config = {"kind": "llvm", "mcpu": str(target.attrs.get("mcpu", ""))}
    config["mattr"] = [str(a) for a in target.attrs.get("mattr", [])] + ["-avx512vnni", "-avxvnni"]
    return tvm.target.Target(config)
