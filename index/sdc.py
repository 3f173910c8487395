"""Multi-bit binary codes as packed bit planes, and Symmetric Distance Calculation (SDC).

A code of m dims x u bits is b = sum_j 2^-j s_j with s_j in {-1, +1}^m (BEBR's recurrent
binarization: plane 0 is the coarse sign, each later plane a finer correction). Plane j is
stored as its bits c_j = (s_j > 0), packed little-endian into W = ceil(m / 64) uint64 words,
so a vector costs u * W * 8 bytes. Codes are (n, u, W) arrays; a database scanned many times
is kept plane-major, (u, W, n), so that each word of each plane is one contiguous row.

SDC: query and document are both codes, and with integer weights w_j = 2^(u-1-j)

    4^(u-1) <b, b'> = sum_{j,l} w_j w_l (m - 2 popcount(c_j XOR c'_l)).

The sum is done in integers and scaled once by a power of two, so `sdc` equals the inner
product of the decoded codes exactly, not approximately.
"""

from __future__ import annotations

import numpy as np

WORD_BITS = 64
#: Bytes of XOR temporaries one scan step may hold (about an L2 cache).
CACHE_BYTES = 1 << 20
#: top_n counts integer scores with a histogram (one row at a time) from this many columns,
#: when their range is at most HISTOGRAM_RANGE_LIMIT.
HISTOGRAM_MIN_COLUMNS = 8192
HISTOGRAM_RANGE_LIMIT = 1 << 18


def words_for(m: int) -> int:
    return -(-m // WORD_BITS)


def plane_weights(bits: int) -> np.ndarray:
    """Integer weights 2^(u-1-j) of the planes: plane 0 counts most."""
    return np.left_shift(1, np.arange(bits - 1, -1, -1)).astype(np.int64)


def score_scale(bits: int) -> float:
    """`sdc_int` / score_scale(u) is the inner product of the decoded codes."""
    return float(4 ** (bits - 1))


def pack(signs: np.ndarray) -> np.ndarray:
    """(n, u, m) signs (> 0 is +1, anything else -1) -> (n, u, W) uint64 codes."""
    if signs.ndim != 3:
        raise ValueError(f"signs must have shape (n, bits, dims), got {signs.shape}")
    n, u, m = signs.shape
    packed = np.packbits(signs > 0, axis=-1, bitorder="little")
    pad = words_for(m) * 8 - packed.shape[-1]
    if pad:
        packed = np.concatenate([packed, np.zeros((n, u, pad), np.uint8)], axis=-1)
    return np.ascontiguousarray(packed).view("<u8").astype(np.uint64, copy=False)


def unpack(codes: np.ndarray, m: int) -> np.ndarray:
    """(n, u, W) uint64 codes -> (n, u, m) int8 signs in {-1, +1}."""
    _check_codes(codes, m)
    n, u, w = codes.shape
    raw = np.ascontiguousarray(codes).astype("<u8", copy=False).view(np.uint8).reshape(n, u, w * 8)
    bits = np.unpackbits(raw, axis=-1, count=m, bitorder="little")
    return (bits.astype(np.int8) * 2 - 1).astype(np.int8)


def decode(codes: np.ndarray, m: int) -> np.ndarray:
    """(n, u, W) codes -> (n, m) float64 vectors sum_j 2^-j s_j (exact: dyadic values)."""
    signs = unpack(codes, m).astype(np.float64)
    steps = 0.5 ** np.arange(codes.shape[1])
    return np.einsum("num,u->nm", signs, steps)


def to_planes(codes: np.ndarray) -> np.ndarray:
    """(n, u, W) -> plane-major (u, W, n), the layout `sdc_int` scans."""
    return np.ascontiguousarray(codes.transpose(1, 2, 0))


def sdc_int(queries: np.ndarray, planes: np.ndarray, m: int) -> np.ndarray:
    """Integer SDC scores (Q, n) int32 of (Q, u, W) query codes against (u, W, n) planes.

    One XOR and one popcount per (query plane, document plane, word), each over the whole
    batch of queries at once; equals score_scale(u) x the decoded inner product. Documents
    go in column blocks whose temporaries stay in cache: unblocked, the (Q, n) uint64 XOR
    result makes the scan memory-bound."""
    _check_codes(queries, m)
    u, w, n = planes.shape
    if queries.shape[1:] != (u, w) or planes.dtype != np.uint64:
        raise ValueError(f"query codes {queries.shape[1:]} do not match document planes ({u}, {w}, n)")
    weights = plane_weights(u)
    pairs = [(j, l, int(weights[j] * weights[l])) for j in range(u) for l in range(u)]
    q = len(queries)
    out = np.empty((q, n), np.int32)
    block = max(256, CACHE_BYTES // (8 * max(q, 1)))
    xor = np.empty((q, block), np.uint64)
    count = np.empty((q, block), np.uint8)
    hamming = np.empty((q, block), np.int32)
    total = int(weights.sum()) ** 2 * m
    qcols = [[queries[:, j, word][:, None] for word in range(w)] for j in range(u)]
    for start in range(0, n, block):
        end = min(n, start + block)
        x, c, h = xor[:, :end - start], count[:, :end - start], hamming[:, :end - start]
        h.fill(0)
        for j, l, weight in pairs:
            for word in range(w):
                np.bitwise_xor(qcols[j][word], planes[l, word, start:end][None, :], out=x)
                np.bitwise_count(x, out=c)
                if weight == 1:
                    np.add(h, c, out=h, casting="unsafe")
                else:
                    np.add(h, np.left_shift(c, weight.bit_length() - 1, dtype=np.int32), out=h)
        np.multiply(h, -2, out=out[:, start:end])
        out[:, start:end] += total
    return out


def sdc(queries: np.ndarray, planes: np.ndarray, m: int) -> np.ndarray:
    """SDC scores as float64: exactly decode(queries) @ decode(documents).T."""
    return sdc_int(queries, planes, m) / score_scale(queries.shape[1])


def top_n(scores: np.ndarray, n: int) -> np.ndarray:
    """Column indices (Q, min(n, N)) of each row's n highest scores, best first (ties: lower index)."""
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-d, got {scores.shape}")
    total = scores.shape[1]
    n = min(n, total)
    if n <= 0:
        return np.zeros((len(scores), 0), np.int64)
    if n == total:
        part = np.tile(np.arange(total), (len(scores), 1))
    elif scores.dtype.kind == "i" and total >= HISTOGRAM_MIN_COLUMNS:
        part = np.stack([_top_int(row, n) for row in scores])
    else:
        part = np.argpartition(-scores, n - 1, axis=1)[:, :n]
    vals = np.take_along_axis(scores, part, 1)
    order = np.lexsort((part, -vals), axis=1)
    return np.take_along_axis(part, order, 1)


def _top_int(row: np.ndarray, n: int) -> np.ndarray:
    """n columns of the highest integer scores (ties at the cut: lowest columns), unordered.

    SDC scores take few distinct values, so a histogram finds the cut in one pass: about
    twice as fast as argpartition on 400k scores."""
    low = int(row.min())
    span = int(row.max()) - low + 1
    if span > HISTOGRAM_RANGE_LIMIT:
        return np.argpartition(-row, n - 1)[:n]
    counts = np.bincount(row - low, minlength=span)
    above = np.cumsum(counts[::-1])  # above[i]: how many score >= low + span - 1 - i
    cut = low + span - 1 - int(np.searchsorted(above, n))
    better = np.flatnonzero(row > cut)
    ties = np.flatnonzero(row == cut)[:n - len(better)]
    return np.concatenate([better, ties])


def _check_codes(codes: np.ndarray, m: int) -> None:
    if codes.ndim != 3 or codes.dtype != np.uint64:
        raise ValueError(f"codes must be uint64 (n, bits, words), got {codes.dtype} {codes.shape}")
    if codes.shape[2] != words_for(m):
        raise ValueError(f"codes of {m} dims need {words_for(m)} words per plane, got {codes.shape[2]}")
