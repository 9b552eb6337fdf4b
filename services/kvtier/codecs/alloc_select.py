"""numba kernel for int4a on the CPU: the key bit allocation, which K channel of each head gets
how many bits (:func:`allocate_keys`; the torch code in :mod:`kvtier.codecs.alloc`,
``key_weights`` then ``allocate``, is the reference, and the tests hold both to the same
numbers). The code maps are :mod:`kvtier.codecs.alloc_kernels`.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from kvtier.codecs.rowops import JIT


@njit(**JIT)
def _m12(src, i):  # type: ignore[no-untyped-def]
    p = 3 * (i // 2)
    if i % 2 == 0:
        u = np.int64(src[p]) | ((np.int64(src[p + 2]) & 0x0F) << 8)
    else:
        u = np.int64(src[p + 1]) | ((np.int64(src[p + 2]) >> 4) << 8)
    return u - 4096 if u >= 2048 else u


@njit(**JIT)
def _before(gains, a, b):  # type: ignore[no-untyped-def]
    """Whether move ``a`` sorts before move ``b``: the larger gain, then the earlier move (the
    order of a stable descending sort)."""
    return gains[a] > gains[b] or (gains[a] == gains[b] and a < b)


@njit(**JIT)
def _select(gains, order, k):  # type: ignore[no-untyped-def]
    """Reorder ``order`` so that its first ``k`` entries are the ``k`` moves a stable
    descending sort of ``gains`` puts first (in some order): quickselect on a strict total
    order, so the set is exactly the sort's."""
    lo = 0
    hi = order.size - 1
    while lo < hi and 0 < k <= hi:
        if hi == lo + 1:  # two left: put them in order
            if _before(gains, order[hi], order[lo]):
                order[lo], order[hi] = order[hi], order[lo]
            return
        mid = (lo + hi) // 2
        # median of three as the pivot, moved to hi
        a, b, c = order[lo], order[mid], order[hi]
        if _before(gains, b, a):
            a, b = b, a
        if _before(gains, c, b):
            b, c = c, b
            if _before(gains, b, a):
                a, b = b, a
        order[lo], order[mid], order[hi] = a, c, b
        pivot = b
        store = lo
        for i in range(lo, hi):
            if _before(gains, order[i], pivot):
                order[store], order[i] = order[i], order[store]
                store += 1
        order[store], order[hi] = order[hi], order[store]
        if store == k or store == k - 1:
            return
        if store < k:
            lo = store + 1
        else:
            hi = store - 1


@njit(**JIT)
def _candidates(gains, n, k, order):  # type: ignore[no-untyped-def]
    """Put in ``order`` the moves that can be among the first ``k`` (of ``n`` channels' moves,
    listed bit by bit), and return how many: those up to the last move of the first
    ``ceil(k / n)`` bits. Every channel's moves come in bit order (its gains fall), so that last
    move has ``ceil(k / n) n >= k`` moves up to it. On pages whose channel weights are close,
    that leaves few more than ``k``."""
    total = gains.size
    if k <= 0 or k >= total:
        for i in range(total):
            order[i] = i
        return total
    base = (k + n - 1) // n * n - n
    y = base
    for i in range(base + 1, base + n):
        if _before(gains, y, i):
            y = i
    m = 0
    gy = gains[y]
    for i in range(total):  # branch-free: i is written anyway, m moves past it or not
        gi = gains[i]
        order[m] = i
        m += (gi > gy) | ((gi == gy) & (i <= y))
    return m


@njit(**JIT)
def allocate_keys(  # type: ignore[no-untyped-def]
        kb, km, e0, mant, L, nk, Gk, Tq, H, D, n_out, oidx, opeak, drop, budget, out):
    """Bits of every quantized K channel (``out`` ``[L, C']``), the same numbers as
    :func:`kvtier.codecs.alloc.key_weights` then :func:`~kvtier.codecs.alloc.allocate` (same
    float64 operations in the same order, the same stable sort)."""
    Dk = D - n_out
    C = H * Dk
    nm = drop.size
    for layer in range(L):
        peak = np.zeros(H * D)
        kidx = np.empty(C, np.int64)
        j = 0
        for h in range(H):
            for d in range(D):
                kept = True
                for o in range(n_out):
                    if oidx[(layer * H + h) * n_out + o] == d:
                        kept = False
                if kept:
                    kidx[j] = h * D + d
                    j += 1
            for o in range(n_out):
                peak[h * D + oidx[(layer * H + h) * n_out + o]] = opeak[(layer * H + h) * n_out + o]
        tab = np.empty(256)  # the layer's scales by code: as many ldexp as codes, not groups
        for b in range(256):
            tab[b] = math.ldexp(mant[b & 15], int(e0[layer] + (b >> 4)))
        step2 = np.zeros(C)
        for c in range(C):
            acc = 0.0
            reach = 0.0
            for g in range(nk):
                i = (layer * nk + g) * C + c
                s = tab[kb[i]]
                m = np.float64(_m12(km, i))
                n = np.float64(Tq - g * Gk if g == nk - 1 else Gk)
                acc = acc + (s * s) * n
                r = max(abs(m * s), abs((m + 255.0) * s))
                if r > reach:
                    reach = r
            step2[c] = acc
            peak[kidx[c]] = reach
        if D % 2 == 0:
            half = D // 2
            for h in range(H):
                for d in range(half):
                    p = max(peak[h * D + d], peak[h * D + d + half])
                    peak[h * D + d] = p
                    peak[h * D + d + half] = p
        gains = np.empty(nm * Dk)
        count = np.zeros(Dk, np.int64)
        w = np.empty(Dk)
        order = np.empty(nm * Dk, np.int64)
        chan = np.empty(nm * Dk, np.int64)  # a move's channel, without a division a move
        for k in range(nm):
            for c in range(Dk):
                chan[k * Dk + c] = c
        for h in range(H):
            for c in range(Dk):
                pk = peak[kidx[h * Dk + c]]
                w[c] = step2[h * Dk + c] * (pk * pk)
            for k in range(nm):
                for c in range(Dk):
                    gains[k * Dk + c] = w[c] * drop[k]
            take = budget - 2 * Dk
            m = _candidates(gains, Dk, take, order)
            _select(gains, order[:m], take)
            count[:] = 0
            for t in range(take):
                count[chan[order[t]]] += 1
            for c in range(Dk):
                out[layer * C + h * Dk + c] = np.uint8(2 + count[c])
