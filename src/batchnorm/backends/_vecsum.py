"""Run reductions in explicit vector lanes, IEEE arithmetic (private; used by ``_numba_kernels``).

Why this exists: a plain ``s += x[i]`` loop only vectorises if LLVM may reassociate (fast-math
``reassoc``), and then the order of the additions is LLVM's choice: it changes with the CPU's
vector width and, as seen here, between a kernel compiled in a fresh process and the same
kernel loaded from numba's disk cache. The bytes of a batch norm must not depend on either.

So these reductions are written at the LLVM level with the order spelled out: ``UNROLL``
accumulators of 64 bytes each (16 float32 or 8 float64 lanes); element ``i`` of the vector
part goes to lane ``i % (UNROLL * width)``; the tail (fewer than ``UNROLL * width`` values) is
added in order into a scalar; the lanes fold in a fixed pairwise tree, then the tail is added.
The accumulators are stack slots, which LLVM keeps in registers, and no fast-math flag is
set: every addition is an IEEE addition in the order above, on any x86 (AVX2 runs a 16-lane
add as two 8-lane ones: the same lanewise results) and whatever the cache state.

Each function takes 1-d C-contiguous arrays (slices from 0 of the kernels' flat views) and
returns a pair in the arrays' dtype:

* ``sum_centred(x, m)``: ``(sum(x - m), sum((x - m)^2))``; with ``m = 0`` the first is sum(x).
* ``sum_grad(dy, x, m)``: ``(sum(dy), sum(dy * (x - m)))``.
* ``sum_grad_masked(dy, x, mask, m)``: the same with dy counted only where ``mask > 0``.
"""

from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils, errors, types
from numba.extending import intrinsic

UNROLL = 4  # independent vector accumulators per sum (hides the add latency)
_VECTOR_BYTES = 64


def _check(*arrays):
    dtype = arrays[0].dtype
    for a in arrays:
        if not (isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C"):
            raise errors.TypingError(f"_vecsum wants 1-d C-contiguous arrays, got {a}")
        if a.dtype != dtype or dtype not in (types.float32, types.float64):
            raise errors.TypingError(f"_vecsum wants float32 or float64 arrays, one dtype: {a}")
    return dtype


def _fold(builder, vecs, scalar_type, width):
    """Sum of all lanes of ``vecs``: lane-wise adds of the accumulators pairwise (0+1, 2+3,
    then the results), then the lanes of that vector pairwise (halves added in a tree)."""
    while len(vecs) > 1:
        vecs = [builder.fadd(vecs[i], vecs[i + 1]) for i in range(0, len(vecs), 2)]
    lanes = [builder.extract_element(vecs[0], ir.Constant(ir.IntType(32), j)) for j in range(width)]
    while len(lanes) > 1:
        half = len(lanes) // 2
        lanes = [builder.fadd(lanes[j], lanes[j + half]) for j in range(half)]
    return lanes[0]


def _emit(context, builder, arrays, m, scalar_type, body):
    """The loop: ``body(builder, loads, m)`` gives the two increments for loaded values
    (vectors in the main loop, scalars in the tail). Returns the two sums."""
    itemsize = 4 if isinstance(scalar_type, ir.FloatType) else 8
    width = _VECTOR_BYTES // itemsize
    step = width * UNROLL
    vty = ir.VectorType(scalar_type, width)
    intp = context.get_value_type(types.intp)
    ptrs = [a.data for a in arrays]
    n = arrays[0].nitems
    nvec = builder.mul(builder.udiv(n, ir.Constant(intp, step)), ir.Constant(intp, step))

    zero_v = ir.Constant(vty, None)
    acc = [[cgutils.alloca_once_value(builder, zero_v) for _ in range(UNROLL)] for _ in range(2)]
    m_v = cgutils.alloca_once_value(builder, ir.Constant(vty, None))
    for j in range(width):
        builder.store(
            builder.insert_element(builder.load(m_v), m, ir.Constant(ir.IntType(32), j)), m_v
        )
    m_vec = builder.load(m_v)

    with cgutils.for_range_slice(builder, ir.Constant(intp, 0), nvec, ir.Constant(intp, step),
                                 intp) as (i, _):  # fmt: skip
        for u in range(UNROLL):
            off = builder.add(i, ir.Constant(intp, u * width))
            loads = []
            for p in ptrs:
                vp = builder.bitcast(builder.gep(p, [off]), vty.as_pointer())
                loads.append(builder.load(vp, align=itemsize))
            inc = body(builder, loads, m_vec, vty)
            for q in range(2):
                builder.store(builder.fadd(builder.load(acc[q][u]), inc[q]), acc[q][u])

    tail = [cgutils.alloca_once_value(builder, ir.Constant(scalar_type, 0.0)) for _ in range(2)]
    with cgutils.for_range_slice(builder, nvec, n, ir.Constant(intp, 1), intp) as (i, _):
        loads = [builder.load(builder.gep(p, [i])) for p in ptrs]
        inc = body(builder, loads, m, scalar_type)
        for q in range(2):
            builder.store(builder.fadd(builder.load(tail[q]), inc[q]), tail[q])

    out = []
    for q in range(2):
        folded = _fold(builder, [builder.load(a) for a in acc[q]], scalar_type, width)
        out.append(builder.fadd(folded, builder.load(tail[q])))
    return out


def _codegen(nargs, body):
    def codegen(context, builder, sig, args):
        arrays = [context.make_array(sig.args[k])(context, builder, args[k]) for k in range(nargs)]
        scalar_type = context.get_value_type(sig.args[0].dtype)
        s1, s2 = _emit(context, builder, arrays, args[nargs], scalar_type, body)
        return context.make_tuple(builder, sig.return_type, (s1, s2))

    return codegen


def _centred(builder, loads, m, ty):
    d = builder.fsub(loads[0], m)
    return d, builder.fmul(d, d)


def _grad(builder, loads, m, ty):
    g, x = loads
    return g, builder.fmul(g, builder.fsub(x, m))


def _grad_masked(builder, loads, m, ty):
    g, x, mask = loads
    keep = builder.fcmp_ordered(">", mask, ir.Constant(ty, None))
    g = builder.select(keep, g, ir.Constant(ty, None))
    return g, builder.fmul(g, builder.fsub(x, m))


@intrinsic
def sum_centred(typingctx, x, m):
    dtype = _check(x)
    return types.UniTuple(dtype, 2)(x, dtype), _codegen(1, _centred)


@intrinsic
def sum_grad(typingctx, dy, x, m):
    dtype = _check(dy, x)
    return types.UniTuple(dtype, 2)(dy, x, dtype), _codegen(2, _grad)


@intrinsic
def sum_grad_masked(typingctx, dy, x, mask, m):
    dtype = _check(dy, x, mask)
    return types.UniTuple(dtype, 2)(dy, x, mask, dtype), _codegen(3, _grad_masked)
