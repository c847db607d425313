"""Plain-numpy kernels shared by the float and the integer reference interpreters.

Convolution and dense run as one matrix product over an im2col view. For integer operands the
product is computed in float64 and converted back: every int8 x int8 product is at most 2**14 in
magnitude and a conv sums at most a few thousand of them, so the float64 sum (53-bit mantissa) is
exact, and we get BLAS speed with bit-exact integer results. ``exact_int_matmul`` checks that bound
instead of trusting it.
"""
from __future__ import annotations

import numpy as np

_FLOAT64_EXACT = 2 ** 53


def pad_nchw(x: np.ndarray, padding, value=0) -> np.ndarray:
    top, left, bottom, right = padding
    if not any(padding):
        return x
    return np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=value)


def windows(x: np.ndarray, kernel, strides, dilation=(1, 1)) -> np.ndarray:
    """A read-only N x C x OH x OW x kh x kw view of the sliding windows of a padded input."""
    kh, kw = kernel
    sh, sw = strides
    dh, dw = dilation
    n, c, h, w = x.shape
    oh = (h - dh * (kh - 1) - 1) // sh + 1
    ow = (w - dw * (kw - 1) - 1) // sw + 1
    s = x.strides
    return np.lib.stride_tricks.as_strided(
        x, shape=(n, c, oh, ow, kh, kw),
        strides=(s[0], s[1], s[2] * sh, s[3] * sw, s[2] * dh, s[3] * dw), writeable=False)


def exact_int_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b for integer arrays, exact, returned as int64."""
    bound = float(np.abs(a).max(initial=0)) * float(np.abs(b).max(initial=0)) * a.shape[-1]
    if bound >= _FLOAT64_EXACT:
        return a.astype(np.int64) @ b.astype(np.int64)
    return np.rint(a.astype(np.float64) @ b.astype(np.float64)).astype(np.int64)


def _matmul(a, b):
    if np.issubdtype(a.dtype, np.integer):
        return exact_int_matmul(a, b)
    return a @ b


def conv2d(x, weight, strides=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), groups=1,
           pad_value=0):
    """NCHW conv. Integer inputs give an exact int64 result; float32 inputs a float32 result."""
    x = pad_nchw(x, padding, pad_value)
    o, ipg, kh, kw = weight.shape
    n = x.shape[0]
    cols = windows(x, (kh, kw), strides, dilation)  # N C OH OW kh kw
    oh, ow = cols.shape[2:4]
    opg = o // groups
    if ipg == 1 and opg == 1 and groups > 1:  # depthwise: one multiply-add per tap, vectorised
        acc = np.int64 if np.issubdtype(x.dtype, np.integer) else x.dtype
        xa = x.astype(acc, copy=False)
        taps = weight.astype(acc, copy=False)
        out = np.zeros((n, o, oh, ow), dtype=acc)
        sh, sw = strides
        dh, dw = dilation
        for i in range(kh):
            for j in range(kw):
                window = xa[:, :, i * dh:i * dh + sh * (oh - 1) + 1:sh,
                            j * dw:j * dw + sw * (ow - 1) + 1:sw]
                out += window * taps[:, 0, i, j][None, :, None, None]
        return out
    out = []
    for g in range(groups):
        cg = cols[:, g * ipg:(g + 1) * ipg]
        patches = cg.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, ipg * kh * kw)
        wg = weight[g * opg:(g + 1) * opg].reshape(opg, ipg * kh * kw)
        out.append(_matmul(patches, wg.T).reshape(n, oh, ow, opg))
    return np.concatenate(out, axis=3).transpose(0, 3, 1, 2)


def dense(x, weight):
    """N x I times (O x I)^T."""
    return _matmul(x, weight.T)


def max_pool2d(x, pool_size, strides, padding):
    lowest = np.iinfo(x.dtype).min if np.issubdtype(x.dtype, np.integer) else -np.inf
    xp = pad_nchw(x, padding, lowest)
    return windows(xp, pool_size, strides).max(axis=(4, 5))


def pool_sum_and_count(x, pool_size, strides, padding, count_include_pad):
    """Window sums (int64 for integers, float64 for floats) and the divisor of each window."""
    acc = np.int64 if np.issubdtype(x.dtype, np.integer) else np.float64
    xp = pad_nchw(x.astype(acc), padding, 0)
    sums = windows(xp, pool_size, strides).sum(axis=(4, 5))
    if count_include_pad:
        counts = np.full(sums.shape[2:], pool_size[0] * pool_size[1], dtype=np.int64)
    else:
        ones = pad_nchw(np.ones((1, 1) + x.shape[2:], dtype=np.int64), padding, 0)
        counts = windows(ones, pool_size, strides).sum(axis=(4, 5))[0, 0]
    return sums, counts
