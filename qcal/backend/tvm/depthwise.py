"""int8 depthwise conv on VNNI: 4 kernel taps a ``vpdpbusd`` lane, windows gathered by ``vpermb``.

Where this sits: ``qcal.backend.tvm.schedules.rewrite_int8_convs`` calls ``rewrite_depthwise_convs``
when the target has AVX-512 VNNI and AVX-512 VBMI; depthwise convs it leaves (and every depthwise
conv on other targets) go on to the s_tir ``depthwise_conv2d_nchw`` rule. The conv becomes two
PrimFuncs written here::

    x int8 NCHW --pack_u8_rows--> xp int8 (N*C*(H+pads)*(W+pads) + 64,)   flat; u8 bits of x + 128
    xp, w', idx, init --depthwise_vnni--> int32 NCHW              (then the epilogue)

A depthwise conv has no channel sum to hand ``vpdpbusd``'s 4-byte dot products, so the 4 bytes of
a lane are 4 neighbouring taps of one kernel row instead: lane ``l`` of a 16-lane vector is output
pixel ``x0 + l`` and its bytes are the input pixels ``(x0 + l) * stride + 4q + k`` (k = 0..3) of
one input row, multiplied with the taps ``4q + k`` of that kernel row (zero past the kernel's
width). One 64-byte load of the input row covers all 16 lanes' windows as long as
``15 * stride + 4 * quads <= 64``, and one ``vpermb`` (AVX-512 VBMI, a byte permute with a fixed
index vector ``idx``) spreads it into the lanes. A 3x3 kernel is then 3 loads, 3 permutes and 3
``vpdpbusd`` per 16 output pixels (9 multiplies each), a 5x5 one 5 loads and 10 of the others.

The u8 shift is the VNNI conv's (``qcal.backend.tvm.vnni``): the pack adds 128 to every byte (the
padding holds 128, a shifted zero) and the accumulators start at ``init[c] = -128 * sum(w[c])``,
so the result is the int8 x int8 depthwise conv exactly. The padded planes are stored flat: a
64-byte load that starts near a row's end reads on into the next row (64 spare bytes after the
last), and those bytes only reach lanes past the output width or taps with zero weight.

Schedule (``schedule_depthwise_vnni``): up to ``_VECTORS`` vectors of one output row accumulate in
registers with the kernel rows and quads outside them; the epilogue FuseOps fused in (bias,
requantize, ReLU6, residual add) is computed per tile; (batch, channel, row) run in parallel.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, s_tir
from tvm.script import tirx as T
from tvm.target import codegen

from qcal.backend.tvm.schedules import (_CONV2D, SCHEDULE_ATTR, Decline, Scheduled, _extents, _i64,
                                        _inline_epilogue, _largest_divisor, _name, _parallel_outer,
                                        _root_blocks, _vectorize_tile_epilogue, padded_conv_extents)

DEPTHWISE_BLOCK = "depthwise_vnni"
PACK_RULE = "depthwise_pack"  # the qcal.schedule attribute of the pack (scheduled when written)
LANES = 16  # int32 lanes of a 512-bit vpdpbusd: output pixels a vector
_ROW_BYTES = 4 * LANES  # one zmm load of an input row
_OUT_ELEMWISE_FUSABLE = 4  # relax OpPatternKind kOutEWiseFusable (see qcal.backend.tvm.vnni)
_OPAQUE = 8  # kOpaque: FuseOps leaves the (already scheduled) pack alone
_VPDPBUSD = "llvm.x86.avx512.vpdpbusd.512"
_VPERMB = "llvm.x86.avx512.permvar.qi.512"
# output vectors of one row accumulated in registers at once, and at least this many chains
# (vectors x rows) in flight
_VECTORS = 2
_CHAINS = 4


def depthwise_supported(target: tvm.target.Target) -> bool:
    """AVX-512 VNNI for ``vpdpbusd``, VBMI for ``vpermb``."""
    return bool(codegen.llvm_cpu_has_features(["avx512vnni", "avx512bw", "avx512vbmi"], target))


def tap_quads(kernel_width: int) -> int:
    return (kernel_width + 3) // 4


def fits(kernel_width: int, stride: int) -> bool:
    """Whether one 64-byte load holds the windows of 16 output pixels."""
    return (LANES - 1) * stride + 4 * tap_quads(kernel_width) <= _ROW_BYTES


def pack_depthwise_weight(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(C, 1, kh, kw) int8 -> (the (C, kh, quads) int32 taps, 4 a lane, zero past kw; the
    (C,) int32 accumulator start -128 * sum(w[c]))."""
    c, _, kh, kw = weight.shape
    quads = tap_quads(kw)
    taps = np.zeros((c, kh, 4 * quads), np.int8)
    taps[:, :, :kw] = weight[:, 0]
    packed = np.ascontiguousarray(taps).view("<i4").reshape(c, kh, quads).astype(np.int32)
    init = (-128 * weight.reshape(c, -1).astype(np.int64).sum(axis=1)).astype(np.int32)
    return packed, init


def permute_indices(kernel_width: int, stride: int) -> np.ndarray:
    """(quads, 64) int8: byte ``4l + k`` of quad ``q`` takes byte ``l * stride + 4q + k`` of the
    loaded row (lane l's window, little-endian within the lane)."""
    quads = tap_quads(kernel_width)
    lane, k = np.meshgrid(np.arange(LANES), np.arange(4), indexing="ij")
    return np.stack([(lane * stride + 4 * q + k).reshape(-1) for q in range(quads)]).astype(np.int8)


def packed_size(n, c, hp, wp) -> int:
    """Bytes of the packed input: the padded planes, flat, and one load's worth after them (a
    load that starts near a row's end reads on into the next row, or past the last one)."""
    return n * c * hp * wp + _ROW_BYTES


def _pack_rows_func(n, c, h, w, pads):
    """The pack, already scheduled: one block per region (the interior, shifted; the padding
    rows and columns, 128), each with its rows in parallel and vectorized. (One block with a
    bounds test per byte did not vectorize: 1.5 GB/s.) The bytes after the last plane are
    never written: like the bytes a load reads past a row's end they only reach lanes past the
    output width or taps of zero weight."""
    pt, pl, pb, pr = pads
    hp = h + pt + pb
    wp = w + pl + pr
    n_, c_, h_, w_, hp_, wp_, pt_, pl_, pb_, pr_ = _i64(n, c, h, w, hp, wp, pt, pl, pb, pr)
    size, rows_below, cols_right = _i64(packed_size(n, c, hp, wp), pt + h, pl + w)
    shifted_zero = T.int8(-128)

    @T.prim_func(private=True, s_tir=True)
    def pack_u8_rows(x: T.Buffer((n_, c_, h_, w_), "int8"),  # noqa: F821 (TVMScript dtypes)
                     xp: T.Buffer((size,), "int8")):  # noqa: F821
        T.func_attr({"tirx.noalias": True})
        for i, j, y, z in T.grid(n_, c_, h_, w_):
            with T.sblock("shift"):
                vi, vj, vy, vz = T.axis.remap("SSSS", [i, j, y, z])
                # XOR 0x80 adds 128 modulo 256: the u8 bit pattern of x + 128
                xp[((vi * c_ + vj) * hp_ + vy + pt_) * wp_ + vz + pl_] = T.bitwise_xor(
                    x[vi, vj, vy, vz], shifted_zero)
        if pt > 0:
            for i, j, y, z in T.grid(n_, c_, pt_, wp_):
                with T.sblock("pad_top"):
                    vi, vj, vy, vz = T.axis.remap("SSSS", [i, j, y, z])
                    xp[((vi * c_ + vj) * hp_ + vy) * wp_ + vz] = shifted_zero
        if pb > 0:
            for i, j, y, z in T.grid(n_, c_, pb_, wp_):
                with T.sblock("pad_bottom"):
                    vi, vj, vy, vz = T.axis.remap("SSSS", [i, j, y, z])
                    xp[((vi * c_ + vj) * hp_ + vy + rows_below) * wp_ + vz] = shifted_zero
        if pl > 0:
            for i, j, y, z in T.grid(n_, c_, h_, pl_):
                with T.sblock("pad_left"):
                    vi, vj, vy, vz = T.axis.remap("SSSS", [i, j, y, z])
                    xp[((vi * c_ + vj) * hp_ + vy + pt_) * wp_ + vz] = shifted_zero
        if pr > 0:
            for i, j, y, z in T.grid(n_, c_, h_, pr_):
                with T.sblock("pad_right"):
                    vi, vj, vy, vz = T.axis.remap("SSSS", [i, j, y, z])
                    xp[((vi * c_ + vj) * hp_ + vy + pt_) * wp_ + vz + cols_right] = shifted_zero

    sch = s_tir.Schedule(pack_u8_rows)
    for block in _root_blocks(sch):
        i, j, y, z = sch.get_loops(block)
        sch.parallel(sch.fuse(i, j, y))
        sch.vectorize(z)
    return sch.mod["main"].with_attr("op_pattern", _OPAQUE).with_attr(SCHEDULE_ATTR, PACK_RULE)


def _depthwise_func(n, c, hp, wp, kh, quads, oh, ow, sh, sw):
    vectors = -(-ow // LANES)
    size = packed_size(n, c, hp, wp)
    n, c, hp, wp, kh, quads, oh, ow, sh, sw, vectors, size = _i64(
        n, c, hp, wp, kh, quads, oh, ow, sh, sw, vectors, size)
    lanes, width, zero, one = _i64(LANES, _ROW_BYTES, 0, 1)

    @T.prim_func(private=True, s_tir=True)
    def depthwise_vnni(xp: T.Buffer((size,), "int8"),  # noqa: F821 (TVMScript dtypes)
                       wq: T.Buffer((c, kh, quads), "int32"),  # noqa: F821
                       idx: T.Buffer((quads, width), "int8"),  # noqa: F821
                       init: T.Buffer((c,), "int32"),  # noqa: F821
                       out: T.Buffer((n, c, oh, ow), "int32")):  # noqa: F821
        T.func_attr({"tirx.noalias": True})
        acc = T.sblock_alloc_buffer((n, c, oh, vectors, lanes), "int32")
        for i, j, y, t, ry, q in T.grid(n, c, oh, vectors, kh, quads):
            with T.sblock("depthwise_vnni"):  # DEPTHWISE_BLOCK
                vi, vj, vy, vt, vry, vq = T.axis.remap("SSSSRR", [i, j, y, t, ry, q])
                with T.init():
                    acc[vi, vj, vy, vt, T.ramp(zero, one, LANES)] = T.broadcast(init[vj], LANES)
                acc[vi, vj, vy, vt, T.ramp(zero, one, LANES)] = T.call_llvm_pure_intrin(
                    "int32x16", T.llvm_lookup_intrinsic_id(_VPDPBUSD),
                    acc[vi, vj, vy, vt, T.ramp(zero, one, LANES)],
                    T.call_llvm_pure_intrin(
                        "int8x64", T.llvm_lookup_intrinsic_id(_VPERMB),
                        xp[T.ramp(((vi * c + vj) * hp + vy * sh + vry) * wp + vt * lanes * sw,
                                  one, _ROW_BYTES)],
                        idx[vq, T.ramp(zero, one, _ROW_BYTES)]),
                    T.reinterpret("int8x64", T.broadcast(wq[vj, vry, vq], LANES)))
        for i, j, y, z in T.grid(n, c, oh, ow):
            with T.sblock("unpack"):
                vi, vj, vy, vz = T.axis.remap("SSSS", [i, j, y, z])
                out[vi, vj, vy, vz] = acc[vi, vj, vy, vz // lanes, vz % lanes]
    return depthwise_vnni


def schedule_depthwise_vnni(func, lanes: int, prepack: bool) -> Scheduled:
    """The schedule rule for a PrimFunc holding ``depthwise_vnni`` (alone, or with the epilogue
    FuseOps fused in). As ``qcal.backend.tvm.vnni.schedule_vnni_conv2d``: the epilogue is inlined
    into its last block and computed per tile while the accumulators are in registers; with more
    than one output the conv and ``unpack`` are scheduled alone."""
    sch = s_tir.Schedule(func)
    blocks = _root_blocks(sch)
    names = [_name(sch, b) for b in blocks]
    if DEPTHWISE_BLOCK not in names:
        raise Decline("no depthwise_vnni block")
    index = names.index(DEPTHWISE_BLOCK)
    conv = blocks[index]
    if index != 0 or names[index + 1] != "unpack":
        raise RuntimeError(f"depthwise_vnni PrimFunc with unexpected blocks {names}")
    try:
        out = _inline_epilogue(sch, index, blocks)
        rest = []
    except Decline:
        out, rest = blocks[index + 1], blocks[index + 2:]
    i, j, y, t, ry, q = sch.get_loops(conv)
    rows, vectors = _extents(sch, [y, t])
    t_tile = vectors if vectors <= _VECTORS else _largest_divisor(vectors, _VECTORS)
    # independent accumulator chains: vpdpbusd's latency is several cycles
    y_tile = min(rows, max(1, _CHAINS // t_tile))  # a partial last tile of rows is fine
    yo, yi = sch.split(y, [None, y_tile])
    to, ti = sch.split(t, [None, t_tile])
    sch.reorder(i, j, yo, to, ry, q, yi, ti)
    sch.set_scope(conv, 0, "local")
    sch.reverse_compute_at(out, to)
    sch.unroll(yi)
    sch.unroll(ti)
    _vectorize_tile_epilogue(sch, out, to)
    sch.parallel(sch.fuse(i, j, yo))
    # parallel/vectorize/unroll first: after decompose_reduction they refuse the update block
    sch.decompose_reduction(conv, ry)
    for b in rest:
        _parallel_outer(sch, b)
    return Scheduled(sch.mod["main"])


def depthwise_geometry(call):
    """(N, C, H, W), pads, strides, kernel (kh, kw) of an int8 NCHW depthwise conv2d (groups =
    in = out channels, one filter each) with a constant weight, dilation 1, int32 out, a static
    shape and windows one load can hold; else None."""
    attrs = call.attrs
    data, weight = call.args
    if not isinstance(weight, tvm.ir.expr.Constant):
        return None
    if (str(attrs.data_layout) != "NCHW" or str(attrs.kernel_layout) != "OIHW"
            or str(attrs.out_layout) != "NCHW" or str(attrs.out_dtype) != "int32"
            or any(int(d) != 1 for d in attrs.dilation)):
        return None
    if str(data.ty.dtype) != "int8" or str(weight.ty.dtype) != "int8":
        return None
    try:
        shape = tuple(int(d) for d in data.ty.shape)
    except (TypeError, ValueError):  # symbolic batch: not handled
        return None
    o, per_group, kh, kw = (int(d) for d in weight.ty.shape)
    groups = int(attrs.groups)
    if groups < 2 or not groups == shape[1] == o or per_group != 1:
        return None
    strides = tuple(int(s) for s in attrs.strides)
    if not fits(kw, strides[1]):
        return None
    return shape, tuple(int(p) for p in attrs.padding), strides, (kh, kw)


@relax.expr_functor.mutator
class _DepthwiseRewriter(relax.PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not (isinstance(call, relax.Call) and call.op.same_as(_CONV2D)):
            return call
        geometry = depthwise_geometry(call)
        return call if geometry is None else _replace(self.builder_, call, *geometry)


def _replace(builder, call, shape, pads, strides, kernel):
    n, c, h, w = shape
    kh, kw = kernel
    weight = call.args[1].value.numpy()
    hp, wp, oh, ow = padded_conv_extents(shape, weight.shape, pads, strides)
    conv = _depthwise_func(n, c, hp, wp, kh, tap_quads(kw), oh, ow, *strides)
    conv = conv.with_attr("op_pattern", _OUT_ELEMWISE_FUSABLE)
    pack_gv = builder.add_func(_pack_rows_func(n, c, h, w, pads), "pack_u8_rows")
    conv_gv = builder.add_func(conv, "depthwise_vnni")
    packed = builder.emit(relax.call_tir(
        pack_gv, [call.args[0]], relax.TensorType((packed_size(n, c, hp, wp),), "int8")))
    wq, init = pack_depthwise_weight(weight)
    return relax.call_tir(conv_gv, [packed, relax.const(wq, "int32"),
                                    relax.const(permute_indices(kw, strides[1]), "int8"),
                                    relax.const(init, "int32")],
                          relax.TensorType((n, c, oh, ow), "int32"))


def rewrite_depthwise_convs(mod: tvm.IRModule) -> tvm.IRModule:
    """Replace each int8 depthwise conv2d ``depthwise_geometry`` accepts by the PrimFuncs above;
    other convs are left as they are. The caller checks ``depthwise_supported(target)``."""
    rewriter = _DepthwiseRewriter(mod)
    for gvar, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
    return rewriter.builder_.get()
