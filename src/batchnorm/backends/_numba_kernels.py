"""The numba kernels behind ``batchnorm.backends.numba_cpu`` (private).

Every kernel works on flat NumPy views of the canonical ``(A, C, B)`` layout:

* ``B > 1`` (NCHW): channel ``c`` is ``A`` runs of ``B`` contiguous values. A work item is a
  block of whole channels that fits ``L2_BUDGET`` (``channels_per_block``); for each
  sample the block is one contiguous run, so the first pass streams from memory in order
  (runs under ``PREFETCH_MAX_B`` values prefetch the next sample's) and the later passes
  (centred sums, normalisation; or dx in backward) re-read the block from L2: one read from
  memory and one write per element in forward-train, two reads and one write in backward.
  Short runs
  (``B < SMALL_B``, e.g. 7x7 maps) use one flat loop per sample over the block against
  per-position accumulators and repeated per-channel coefficients ("tiles"). A channel bigger
  than the budget gets L1-sized chunks with a shifted two-pass each, merged with Chan's
  update. Eval streams the tensor in memory order (nothing is re-read).
* ``B == 1`` (channels-last, ``(N, C)``): rows of ``C`` interleaved channels. A work item is
  a fixed block of rows; each block computes partial moments (in one pass, sums about a
  per-block shift) or gradient sums per channel, the partials merge in block order, then a
  second pass normalises (or computes dx). Each thread keeps one contiguous share of the
  blocks for both passes (re-reading what another thread read was 2x slower), running it
  backwards in the second pass for tensors that may still be in cache.
* Eval streams the tensor in memory order, NCHW runs through ``affine_run`` (one 64-byte
  vector per step, so short runs such as 7x7 maps stay vectorised).
* Outputs over ``STREAM_BYTES`` (y, and dx in backward; NCHW eval: over
  ``EVAL_STREAM_BYTES``, ``streaming_eval``) are written with non-temporal stores
  (``streaming``; ``affine_run`` / ``affine_tile`` / ``grad_x_run`` / ``grad_x_tile`` with
  ``nt``), fenced once per work item (``store_fence``): no read-for-ownership, and the block
  being re-read is not evicted by the output. Values are the same either way.

Statistics are two-pass or shifted (sums of x - m and (x - m)^2 about a shift m close to the
mean: the chunk's or block's own mean, or for channels-last the mean of a block's first rows)
with accumulators in the input's dtype inside short runs and float64 across them, so data far
from zero (``1e4 + 0.1 * randn``) keeps its variance; ``E[x^2] - E[x]^2`` is never used.

Determinism: each per-channel result is a fixed function of the data (fixed runs, fixed
accumulation order), whatever the blocking; blocks depend on the shape only; threads only
decide *which* blocks they run. So the bytes do not depend on the thread count. The serial
(``_ser``) and parallel (``_par``) drivers call the same block functions; which one runs
depends on the size only.

No fast-math: every kernel is compiled with IEEE semantics (no reassociation, no FMA
contraction, signed zeros, NaN and inf as in torch), so the arithmetic the source spells out is
the arithmetic that runs, and the bytes cannot depend on how LLVM happens to vectorise a loop.
With ``reassoc`` they did: a kernel compiled in a fresh process and the same kernel loaded from
numba's disk cache were seen to differ in the last bits of sum_dy (which optimisation differs
between the two, we did not pin down), and the CPU's vector width changes the order as well.
Sums that must vectorise anyway have their lanes spelled out: run reductions through
``sum_centred``/``sum_grad`` (vector accumulators in a fixed order, written at the LLVM level,
below), per-position or per-channel accumulator arrays elsewhere (elementwise loops, which
vectorise as they are). Inner loops run over slices indexed from 0 (numba then proves the
index non-negative and vectorises them), but for ``affine_run``, which takes whole arrays and
an offset and writes its loop in LLVM IR.
"""

from __future__ import annotations

import platform

import numpy as np
from llvmlite import ir
from numba import carray, njit, prange
from numba.core import cgutils, errors, types
from numba.extending import intrinsic

CHUNK = 2048  # values per statistics chunk: 8 KiB of float32, stays in L1 for the 2nd look
# Bytes of one NCHW work item (a block of whole channels) that should stay in L2 (1 MiB per
# core on the machines we measured) between its first read and its last, leaving room for the
# outputs streaming through.
L2_BUDGET = 1 << 19
CL_TILE = 2048  # values per channels-last tile: whole rows, T = max(1, CL_TILE // C) of them
CL_CHUNK = 8192  # values per channels-last gradient-sums chunk: 32 KiB of float32, in L1
CL_FLUSH_ROWS = 64  # channels-last statistics: rows summed in x's dtype before a float64 flush
CL_SHIFT_ROWS = 16  # channels-last statistics: rows whose mean is the block's shift
L3_REUSE_BYTES = 16 << 20  # tensors up to this size may stay in L3 between two passes
# Outputs bigger than this are written with non-temporal stores (``streaming``): they cost no
# read-for-ownership and do not evict what the kernel re-reads (a block in L2, x in L3), at
# the price of y going to memory, not to the cache. Measured in alternating
# ``batchnorm bench`` runs (2 cores, 32 MiB L3 shared with other tenants): at 16 MiB
# (65536x64, 8x128x64x64) and 12 MiB (32x2048x7x7, 6x128x64x64) streaming gave equal or
# faster forward-train, eval and backward than cached stores (e.g. 8x128x64x64 NCHW
# forward-train 4.3x -> 5.3x torch; channels-last eval of 6x128x64x64 0.40 -> 0.32 ms).
STREAM_BYTES = 8 << 20
# NCHW eval (``nchw_eval_*``) has nothing in cache to protect, and streams each run with
# scalar stores up to its first 64-byte boundary: up to here it stores through the cache.
# Alternating bench runs, three rounds: 12 MiB outputs faster cached (32x2048x7x7
# 0.32-0.43 -> 0.26-0.30 ms, 6x128x64x64 0.33-0.39 -> 0.24-0.26); at 16 MiB (8x128x64x64)
# and for channels-last (its tile loop) no better, left streamed.
EVAL_STREAM_BYTES = 14 << 20
# NCHW runs shorter than this (and at least SMALL_B) get a software prefetch of the next
# sample's runs of the block in the first pass: a sample's part of a block (a few KiB: 2
# channels of 28x28 are 6 KiB) starts on a new page, where the hardware prefetchers stop
# and start again. Longer runs stream well without.
PREFETCH_MAX_B = 2048
EVAL_VALUES = 1 << 16  # values per work item of the streaming eval kernel
MIN_BLOCKS = 16  # channel blocks per tensor at least (when C allows): load balance
SMALL_B = 256  # NCHW runs shorter than this go through the tiled block kernel
FLUSH_ROWS = 64  # rows summed per position in x's dtype before a float64 flush
assert FLUSH_ROWS % 4 == 0  # the short-run kernels step four samples at a time
CL_BLOCK_VALUES = 1 << 15  # values per channels-last work item (rows x C): 128 KiB of float32
CL_MIN_ROWS = 64  # rows per channels-last work item at least (C > 512: more than 128 KiB)


# ---------------------------------------------- run reductions in explicit vector lanes
#
# Why: a plain ``s += x[i]`` loop only vectorises if LLVM may reassociate (fast-math
# ``reassoc``), and then the order of the additions is LLVM's choice: it changes with the
# CPU's vector width and, as seen here, between a kernel compiled in a fresh process and the
# same kernel loaded from numba's disk cache. So these reductions are numba intrinsics that
# emit the loop in LLVM IR with the order spelled out: ``UNROLL`` accumulators of 64 bytes
# (16 float32 or 8 float64 lanes); element ``i`` of the vector part goes to lane
# ``i % (UNROLL * width)``; the tail (fewer than ``UNROLL * width`` values) is added in order
# into a scalar; the lanes fold in a fixed pairwise tree, then the tail is added. The
# accumulators are stack slots, which LLVM keeps in registers, and no fast-math flag is set:
# every addition is an IEEE addition in that order, on any x86 (AVX2 runs a 16-lane add as
# two 8-lane ones: the same lanewise results) and whatever the cache state. They live in this
# file on purpose: numba's disk cache checks only the source file of the cached function, so
# intrinsics in another file could change without invalidating the kernels that inline them.
#
# Each takes 1-d C-contiguous arrays of one length (slices from 0 of the flat views) and
# returns a pair in the arrays' dtype:
#   sum_centred(x, m) -> (sum(x - m), sum((x - m)^2)); with m = 0 the first is sum(x)
#   sum_grad(dy, x, m) -> (sum(dy), sum(dy * (x - m)))
#   sum_grad_masked(dy, x, mask, m) -> the same with dy counted only where not mask <= 0
#     (mask > 0 or NaN: torch's relu backward, ``threshold_backward``, passes NaN's gradient)

ROWS_BAND = 4  # 64-byte vectors of channels per band of grad_sums_rows4 / centred_sums_rows4
UNROLL = 4  # independent vector accumulators per sum (hides the add latency)
_VECTOR_BYTES = 64


def _ir_check(*arrays):
    dtype = arrays[0].dtype
    for a in arrays:
        if not (isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C"):
            raise errors.TypingError(f"run intrinsics want 1-d C-contiguous arrays, got {a}")
        if a.dtype != dtype or dtype not in (types.float32, types.float64):
            raise errors.TypingError(f"run intrinsics want float32 or float64, one dtype: {a}")
    return dtype


def _ir_fold(builder, vecs, scalar_type, width):
    """Sum of all lanes of ``vecs``: lane-wise adds of the accumulators pairwise (0+1, 2+3,
    then the results), then the lanes of that vector pairwise (halves added in a tree)."""
    while len(vecs) > 1:
        vecs = [builder.fadd(vecs[i], vecs[i + 1]) for i in range(0, len(vecs), 2)]
    lanes = [builder.extract_element(vecs[0], ir.Constant(ir.IntType(32), j)) for j in range(width)]
    while len(lanes) > 1:
        half = len(lanes) // 2
        lanes = [builder.fadd(lanes[j], lanes[j + half]) for j in range(half)]
    return lanes[0]


def _ir_loop(context, builder, arrays, m, scalar_type, body):
    """The loop: ``body(builder, loads, m, ty)`` gives the two increments for loaded values
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
        folded = _ir_fold(builder, [builder.load(a) for a in acc[q]], scalar_type, width)
        out.append(builder.fadd(folded, builder.load(tail[q])))
    return out


def _ir_codegen(nargs, body):
    def codegen(context, builder, sig, args):
        arrays = [context.make_array(sig.args[k])(context, builder, args[k]) for k in range(nargs)]
        scalar_type = context.get_value_type(sig.args[0].dtype)
        s1, s2 = _ir_loop(context, builder, arrays, args[nargs], scalar_type, body)
        return context.make_tuple(builder, sig.return_type, (s1, s2))

    return codegen


def _ir_centred(builder, loads, m, ty):
    d = builder.fsub(loads[0], m)
    return d, builder.fmul(d, d)


def _ir_grad(builder, loads, m, ty):
    g, x = loads
    return g, builder.fmul(g, builder.fsub(x, m))


def _ir_grad_masked(builder, loads, m, ty):
    g, x, mask = loads
    keep = builder.fcmp_unordered(">", mask, ir.Constant(ty, None))  # not (mask <= 0)
    g = builder.select(keep, g, ir.Constant(ty, None))
    return g, builder.fmul(g, builder.fsub(x, m))


@intrinsic
def sum_centred(typingctx, x, m):
    dtype = _ir_check(x)
    return types.UniTuple(dtype, 2)(x, dtype), _ir_codegen(1, _ir_centred)


@intrinsic
def sum_grad(typingctx, dy, x, m):
    dtype = _ir_check(dy, x)
    return types.UniTuple(dtype, 2)(dy, x, dtype), _ir_codegen(2, _ir_grad)


@intrinsic
def sum_grad_masked(typingctx, dy, x, mask, m):
    dtype = _ir_check(dy, x, mask)
    return types.UniTuple(dtype, 2)(dy, x, mask, dtype), _ir_codegen(3, _ir_grad_masked)


# ------------------------------------------------ affine runs in explicit vector lanes
#
# ``y = x * scale + shift`` over one run (with a residual and a relu when fused). Element-wise,
# so the bits are those of the scalar loop (a multiply then an add, no fused multiply-add:
# no flag allows the contraction); what the intrinsic fixes is the loop's shape. LLVM's own
# vectorisation of that loop steps 4 x 16 float32 at a time, so a run of 49 values (a 7x7
# map) went through its scalar remainder; here one 64-byte vector per step, then the
# remainder in scalars: 3 steps and 1 scalar for 49 values. Measured on NCHW eval in memory
# order, kernels alone, 2 threads, input flushed from the caches (scratch script, medians of
# 11 rounds; the copy floor beside): (32, 2048, 7, 7) 0.431 ms against 0.520 for the tiled
# kernel this replaced (copy 0.437), (8, 64, 112, 112) 0.991 against 1.063 for the loop
# LLVM vectorised (copy 0.996).


def _ir_affine(builder, ptrs, i, vty, scale, shift, relu_const, zero, nt=False):
    """One step of the affine run at index i: scalars when vty is None, else vectors (with
    ``nt``, stored non-temporally to a 64-byte-aligned address)."""
    v = builder.fadd(builder.fmul(_ir_load(builder, ptrs[0], i, vty), scale), shift)
    if len(ptrs) == 3:
        v = builder.fadd(v, _ir_load(builder, ptrs[2], i, vty))
    if relu_const:
        v = builder.select(builder.fcmp_ordered("<", v, zero), zero, v)
    _ir_put(builder, v, ptrs[1], i, vty, nt)


def _ir_load(builder, p, i, vty):
    """p[i]: a scalar when vty is None, else the vector of vty starting there (unaligned)."""
    q = builder.gep(p, [i])
    if vty is None:
        return builder.load(q)
    return builder.load(builder.bitcast(q, vty.as_pointer()), align=1)


def _ir_put(builder, v, p, i, vty, nt=False):
    """Store v at p[i]: a scalar when vty is None, else a vector, unaligned, or with ``nt``
    non-temporally (the address 64-byte aligned)."""
    q = builder.gep(p, [i])
    if vty is None:
        builder.store(v, q)
        return
    st = builder.store(v, builder.bitcast(q, vty.as_pointer()), align=_VECTOR_BYTES if nt else 1)
    if nt:
        one = ir.Constant(ir.IntType(32), 1)
        st.set_metadata("nontemporal", builder.module.add_metadata([one]))


def _vector_type(sty):
    """(width, vector type) of 64-byte vectors of the scalar type sty."""
    width = _VECTOR_BYTES // (4 if isinstance(sty, ir.FloatType) else 8)
    return width, ir.VectorType(sty, width)


def _out_of_line(builder, fnty, name, body):
    """The internal, noinline function ``name`` of this module, its body emitted by
    ``body(fn)`` the first time: one copy per module and dtype, called from each site. (The
    four loops of ``affine_run`` inlined at every normalisation site cost 1.7 s of compile
    time on the first cold forward-train, benchmarks/first_call.py. A kernel linked from
    several numba libraries holds one renamed copy per library: internal linkage, no
    clash.)"""
    fn = cgutils.get_or_insert_function(builder.module, fnty, name)
    if fn.is_declaration:
        fn.linkage = "internal"
        fn.attributes.add("noinline")
        body(fn)
    return fn


def _run_loops(builder, sty, intp, n, nt, pout, step):
    """The loops of a run of n values written at pout: ``step(i, vty, nt)`` emits one step
    at index i, scalar (vty None) or vector; scalars up to pout's next 64-byte boundary when
    ``nt`` (``_run_split``), then vectors, stored non-temporally or not (a branch outside the
    loops), then the scalar remainder."""
    width, vty, head, nvec = _run_split(builder, pout, n, nt, sty, intp)
    one = ir.Constant(intp, 1)
    with cgutils.for_range_slice(builder, ir.Constant(intp, 0), head, one, intp) as (i, _):
        step(i, None, False)
    with builder.if_else(nt) as (non_temporal, cached):
        for flag, branch in ((True, non_temporal), (False, cached)):
            with branch:
                with cgutils.for_range_slice(builder, head, nvec, ir.Constant(intp, width),
                                             intp) as (i, _):  # fmt: skip
                    step(i, vty, flag)
    with cgutils.for_range_slice(builder, nvec, n, one, intp) as (i, _):
        step(i, None, False)


def _run_split(builder, pout, n, nt, sty, intp):
    """(width, vector type, head, nvec) of a run of n values written at pout: scalars in
    [0, head), vectors in [head, nvec), scalars in [nvec, n). head is 0 without nt, else the
    values before pout's next 64-byte boundary (all n if the run is shorter)."""
    item = 4 if isinstance(sty, ir.FloatType) else 8
    width, vty = _vector_type(sty)
    mis = builder.and_(builder.ptrtoint(pout, intp), ir.Constant(intp, _VECTOR_BYTES - 1))
    gap = builder.and_(builder.sub(ir.Constant(intp, _VECTOR_BYTES), mis),
                       ir.Constant(intp, _VECTOR_BYTES - 1))  # fmt: skip
    head = builder.udiv(gap, ir.Constant(intp, item))
    head = builder.select(builder.icmp_unsigned("<", head, n), head, n)
    head = builder.select(nt, head, ir.Constant(intp, 0))
    rest = builder.mul(builder.udiv(builder.sub(n, head), ir.Constant(intp, width)),
                       ir.Constant(intp, width))  # fmt: skip
    return width, vty, head, builder.add(head, rest)


def _splat(builder, vty, v):
    """A vector of vty with v in every lane."""
    out = ir.Constant(vty, None)
    for j in range(vty.count):
        out = builder.insert_element(out, v, ir.Constant(ir.IntType(32), j))
    return out


def _coefficients(builder, vty, values, tiled):
    """``coef(i, vector) -> [values at i]``: per-run scalars (splatted for vectors), or with
    ``tiled`` pointers to per-element coefficients (tiles indexed like the run)."""
    if tiled:

        def coef(i, vector):
            return [_ir_load(builder, p, i, vty if vector else None) for p in values]

        return coef
    splat = [_splat(builder, vty, v) for v in values]
    return lambda i, vector: splat if vector else list(values)


def _affine_body(fn, sty, intp, tiled):
    """The body of the out-of-line affine function ``fn(px, py, pr, n, has_res, relu, nt,
    scale, shift)`` (scale and shift: scalars, or with ``tiled`` pointers to per-element
    tiles): the branches sit outside the loops. With ``nt`` the run starts with scalars up to
    y's next 64-byte boundary, then stores whole vectors non-temporally."""
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    px, py, pr, n, has_res, relu, nt, scale, shift = fn.args
    coef = _coefficients(builder, _vector_type(sty)[1], (scale, shift), tiled)

    def loops(ptrs, relu_const):
        def step(i, vty, flag):
            zero = ir.Constant(sty if vty is None else vty, None)
            _ir_affine(builder, ptrs, i, vty, *coef(i, vty is not None), relu_const, zero, flag)

        _run_loops(builder, sty, intp, n, nt, py, step)

    with builder.if_else(has_res) as (with_res, without):
        with with_res:
            with builder.if_else(relu) as (on, off):
                with on:
                    loops((px, py, pr), True)
                with off:
                    loops((px, py, pr), False)
        with without:
            with builder.if_else(relu) as (on, off):
                with on:
                    loops((px, py), True)
                with off:
                    loops((px, py), False)
    builder.ret_void()


def _affine_codegen(context, builder, sig, args):
    xa, ya, ra = (context.make_array(sig.args[k])(context, builder, args[k]) for k in range(3))
    lo, n, scale, shift, relu, nt = args[3:]
    sty = context.get_value_type(sig.args[0].dtype)
    intp = context.get_value_type(types.intp)
    tiled = isinstance(sig.args[5], types.Array)
    if tiled:  # the tiles' data pointers
        scale, shift = (context.make_array(sig.args[k])(context, builder, args[k]).data
                        for k in (5, 6))  # fmt: skip
    pty = sty.as_pointer()
    bit = ir.IntType(1)
    cty = pty if tiled else sty
    fnty = ir.FunctionType(ir.VoidType(), [pty, pty, pty, intp, bit, bit, bit, cty, cty])
    name = f"batchnorm_affine_{'tile' if tiled else 'run'}_{sty}"
    fn = _out_of_line(builder, fnty, name, lambda f: _affine_body(f, sty, intp, tiled))
    px, py, pr = (builder.gep(a.data, [lo]) for a in (xa, ya, ra))
    has_res = builder.icmp_unsigned(">", ra.nitems, ir.Constant(intp, 0))
    relu = builder.trunc(relu, bit) if relu.type != bit else relu
    nt = builder.trunc(nt, bit) if nt.type != bit else nt
    builder.call(fn, [px, py, pr, n, has_res, relu, nt, scale, shift])
    return context.get_dummy_value()


@intrinsic
def affine_run(typingctx, x, y, res, lo, n, scale, shift, relu, nt):
    """``y[i] = x[i] * scale + shift (+ res[i])`` for i in [lo, lo + n), then ``max(., 0)``
    if relu: 1-d C-contiguous arrays of one dtype (res may be empty: no residual; nothing is
    bounds-checked), scale and shift in that dtype. It takes the whole arrays and an offset:
    slicing them for each run cost 10-25% on eval of 7x7 and 14x14 maps (kernel alone,
    (32, 512, 14, 14) 0.290 -> 0.221 ms, with the data in cache). The relu keeps NaN and
    -0.0, as ``if v < 0: v = 0`` does. ``nt``: y is written with non-temporal stores
    (``streaming``); the caller fences (``store_fence``) before its work item ends."""
    dtype = _ir_check(x, y, res)
    sig = types.void(x, y, res, types.intp, types.intp, dtype, dtype, types.boolean,
                     types.boolean)  # fmt: skip
    return sig, _affine_codegen


@intrinsic
def affine_tile(typingctx, x, y, res, lo, n, sct, sft, relu, nt):
    """``affine_run`` with per-element coefficients: ``y[lo + i] = x[lo + i] * sct[i] +
    sft[i] (+ res[lo + i])`` for i in [0, n), then the relu (channels-last tiles of T rows
    of C channels)."""
    _ir_check(x, y, res, sct, sft)
    sig = types.void(x, y, res, types.intp, types.intp, sct, sft, types.boolean, types.boolean)
    return sig, _affine_codegen


def _fence_codegen(context, builder, sig, args):
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        fnty = ir.FunctionType(ir.VoidType(), [])
        sfence = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.sse.sfence")
        builder.call(sfence, [])
    else:
        builder.fence("seq_cst")
    return context.get_dummy_value()


@intrinsic
def store_fence(typingctx):
    """Orders the non-temporal stores before it (x86 ``sfence``) ahead of any later store,
    so that whoever reads y after the work item sees them."""
    return types.void(), _fence_codegen


def _prefetch_codegen(context, builder, sig, args):
    arr = context.make_array(sig.args[0])(context, builder, args[0])
    lo, n = args[1], args[2]
    intp = context.get_value_type(types.intp)
    i8p = ir.IntType(8).as_pointer()
    i32 = ir.IntType(32)
    fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
    # named by llvmlite for this LLVM's pointer spelling (``llvm.prefetch.p0i8`` / ``.p0``)
    fn = builder.module.declare_intrinsic("llvm.prefetch", [i8p], fnty)
    item = context.get_abi_sizeof(context.get_value_type(sig.args[0].dtype))
    start = builder.ptrtoint(builder.gep(arr.data, [lo]), intp)
    stop = builder.add(start, builder.mul(n, ir.Constant(intp, item)))
    first = builder.and_(start, ir.Constant(intp, -64))
    step = ir.Constant(intp, 64)
    with cgutils.for_range_slice(builder, first, stop, step, intp) as (q, _):
        builder.call(fn, [builder.inttoptr(q, i8p), ir.Constant(i32, 0),
                          ir.Constant(i32, 3), ir.Constant(i32, 1)])  # fmt: skip
    return context.get_dummy_value()


@intrinsic
def prefetch(typingctx, x, lo, n):
    """Asks for the cache lines of x[lo : lo + n] ahead of their use (``llvm.prefetch``, read,
    locality 3: x86 ``prefetcht0``), one instruction per 64-byte line from the one holding
    x[lo]; no effect on any value, and an address past x's end does not fault. x: a 1-d
    C-contiguous array (strides are not looked at)."""
    _ir_check(x)
    return types.void(x, types.intp, types.intp), _prefetch_codegen


@njit(cache=True, inline="always")
def streaming(y):
    """Whether the kernels write y (or dx) with non-temporal stores: over ``STREAM_BYTES``
    (NCHW eval asks ``streaming_eval``)."""
    return y.size * y.itemsize > STREAM_BYTES


@njit(cache=True, inline="always")
def streaming_eval(y):
    """``streaming`` for NCHW eval: y over ``EVAL_STREAM_BYTES``."""
    return y.size * y.itemsize > EVAL_STREAM_BYTES


# ``dx = dy * k_dy + x * k_x + k_0`` over one run (backward of NCHW long runs), in IR for the
# non-temporal stores: the same arithmetic as the scalar loop (multiplies, then adds left to
# right, no contraction); dy counts only where not mask <= 0 when a mask is given (a fused
# relu; NaN passes, as in torch's ``threshold_backward``);
# eval is ``dy * k_dy``, with or without a mask (x plays no part: an inf in x must not turn
# dx into NaN).


def _ir_grad_x(builder, ptrs, i, vty, k_dy, k_x, k_0, masked, training, zero, nt):
    """One step of the dx run at index i: scalars when vty is None, else vectors."""
    pdy, px, pmask, pdx = ptrs
    g = _ir_load(builder, pdy, i, vty)
    if masked:
        keep = builder.fcmp_unordered(">", _ir_load(builder, pmask, i, vty), zero)
        g = builder.select(keep, g, zero)
    v = builder.fmul(g, k_dy)
    if training:
        v = builder.fadd(builder.fadd(v, builder.fmul(_ir_load(builder, px, i, vty), k_x)), k_0)
    _ir_put(builder, v, pdx, i, vty, nt)


def _grad_x_body(fn, sty, intp, tiled):
    """Body of ``fn(pdy, px, pmask, pdx, n, masked, training, nt, k_dy, k_x, k_0)`` (the k:
    scalars, or with ``tiled`` pointers to per-element tiles)."""
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    pdy, px, pmask, pdx, n, masked, training, nt, k_dy, k_x, k_0 = fn.args
    coef = _coefficients(builder, _vector_type(sty)[1], (k_dy, k_x, k_0), tiled)
    ptrs = (pdy, px, pmask, pdx)

    def loops(mask_const, training_const):
        def step(i, vty, flag):
            zero = ir.Constant(sty if vty is None else vty, None)
            _ir_grad_x(builder, ptrs, i, vty, *coef(i, vty is not None), mask_const,
                       training_const, zero, flag)  # fmt: skip

        _run_loops(builder, sty, intp, n, nt, pdx, step)

    with builder.if_else(masked) as (with_mask, without):
        for mask_const, outer in ((True, with_mask), (False, without)):
            with outer:
                with builder.if_else(training) as (train, evaluate):
                    with train:
                        loops(mask_const, True)
                    with evaluate:
                        loops(mask_const, False)
    builder.ret_void()


def _grad_x_codegen(context, builder, sig, args):
    arrays = [context.make_array(sig.args[k])(context, builder, args[k]) for k in range(4)]
    lo, n, k_dy, k_x, k_0, training, nt = args[4:]
    sty = context.get_value_type(sig.args[0].dtype)
    intp = context.get_value_type(types.intp)
    tiled = isinstance(sig.args[6], types.Array)
    if tiled:  # the tiles' data pointers
        k_dy, k_x, k_0 = (context.make_array(sig.args[k])(context, builder, args[k]).data
                          for k in (6, 7, 8))  # fmt: skip
    pty, bit = sty.as_pointer(), ir.IntType(1)
    cty = pty if tiled else sty
    fnty = ir.FunctionType(ir.VoidType(), [pty] * 4 + [intp, bit, bit, bit, cty, cty, cty])
    name = f"batchnorm_grad_x_{'tile' if tiled else 'run'}_{sty}"
    fn = _out_of_line(builder, fnty, name, lambda f: _grad_x_body(f, sty, intp, tiled))
    ptrs = [builder.gep(a.data, [lo]) for a in arrays]
    masked = builder.icmp_unsigned(">", arrays[2].nitems, ir.Constant(intp, 0))
    flags = [builder.trunc(f, bit) if f.type != bit else f for f in (training, nt)]
    builder.call(fn, [*ptrs, n, masked, *flags, k_dy, k_x, k_0])
    return context.get_dummy_value()


@intrinsic
def grad_x_run(typingctx, dy, x, mask, dx, lo, n, k_dy, k_x, k_0, training, nt):
    """``dx[i] = g * k_dy + x[i] * k_x + k_0`` for i in [lo, lo + n), g = dy[i] (0 where
    mask[i] <= 0, if mask is not empty); ``g * k_dy`` in eval (training false). 1-d
    C-contiguous arrays of one dtype, nothing bounds-checked; the coefficients
    in that dtype. ``nt``: dx written with non-temporal stores (the caller fences)."""
    dtype = _ir_check(dy, x, mask, dx)
    sig = types.void(dy, x, mask, dx, types.intp, types.intp, dtype, dtype, dtype,
                     types.boolean, types.boolean)  # fmt: skip
    return sig, _grad_x_codegen


@intrinsic
def grad_x_tile(typingctx, dy, x, mask, dx, lo, n, k_dy, k_x, k_0, training, nt):
    """``grad_x_run`` with per-element coefficients indexed from 0 (channels-last tiles):
    ``dx[lo + i] = g * k_dy[i] + x[lo + i] * k_x[i] + k_0[i]``."""
    _ir_check(dy, x, mask, dx, k_dy, k_x, k_0)
    sig = types.void(dy, x, mask, dx, types.intp, types.intp, k_dy, k_x, k_0, types.boolean,
                     types.boolean)  # fmt: skip
    return sig, _grad_x_codegen


# Gradient sums of channels-last rows, four rows per step, with ``_add_grad_4``'s arithmetic:
# per channel, ``s_dy += (g0 + g1) + (g2 + g3)`` and ``s_dx += (g0 (x0 - m) + g1 (x1 - m)) +
# (g2 (x2 - m) + g3 (x3 - m))``, step after step; and the moments of ``_add_centred_4``
# (sums of d and d^2, d = x - m, the same pairing). Written in IR with the loops the other way
# round: for each band of ROWS_BAND 64-byte vectors of channels, all steps, the band's sums in
# registers. The plain loop (all channels of one step, then the next) loaded and stored the
# (C,) sums every step and, for C = 64, ran one vector iteration per call behind LLVM's runtime
# alias checks. A band of four vectors reads 256 contiguous bytes per row and array (one
# vector read 64 bytes a row apart): channels-last backward of 8x64x112x112 1.86 -> 1.57 ms.
# Callers keep the rows of one call to an L1-sized piece (each band re-walks them).


def _rows_body(fn, sty, intp, centred):
    """Body of ``fn(pdy, px, pm, ps_dy, ps_dx, nsteps, C)``: rows 4 * step + j at
    (4 * step + j) * C from pdy and px; sums updated in place. ``centred``: the moments
    ``_add_centred_4`` sums instead (px unused, pdy is x, ps_dy and ps_dx get s1 and s2)."""
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    pdy, px, pm, ps_dy, ps_dx, nsteps, C = fn.args
    width, vty = _vector_type(sty)
    one = ir.Constant(intp, 1)
    nvec = builder.mul(builder.udiv(C, ir.Constant(intp, width)), ir.Constant(intp, width))

    def group(k, ty, lanes):
        """All steps for ``lanes`` vectors (ty a vector type) or one channel (ty None) of
        channels from k: their sums in registers (stack slots LLVM promotes)."""
        w = 1 if ty is None else width
        at_k = [builder.add(k, ir.Constant(intp, q * w)) for q in range(lanes)]

        def load(p, i):
            return _ir_load(builder, p, i, ty)

        m = [load(pm, a) for a in at_k]
        acc = []
        for a in at_k:
            a_dy, a_dx = cgutils.alloca_once(builder, ty or sty), cgutils.alloca_once(
                builder, ty or sty)  # fmt: skip
            builder.store(load(ps_dy, a), a_dy)
            builder.store(load(ps_dx, a), a_dx)
            acc.append((a_dy, a_dx))
        with cgutils.for_range_slice(builder, ir.Constant(intp, 0), nsteps, one, intp) as (t, _):
            base = builder.mul(builder.mul(t, ir.Constant(intp, 4)), C)
            # loads in memory order (row by row), then the arithmetic lane by lane
            lv = {}
            for j in range(4):
                row = builder.add(base, builder.mul(ir.Constant(intp, j), C))
                for q in range(lanes):
                    at = builder.add(row, at_k[q])
                    lv[j, q] = (load(pdy, at), None if centred else load(px, at))
            for q in range(lanes):
                g, d = [], []
                for j in range(4):
                    if centred:  # g: x - m; d: its square
                        gj = builder.fsub(lv[j, q][0], m[q])
                        g.append(gj)
                        d.append(builder.fmul(gj, gj))
                        continue
                    gj = lv[j, q][0]
                    g.append(gj)
                    d.append(builder.fmul(gj, builder.fsub(lv[j, q][1], m[q])))
                t_dy = builder.fadd(builder.fadd(g[0], g[1]), builder.fadd(g[2], g[3]))
                t_dx = builder.fadd(builder.fadd(d[0], d[1]), builder.fadd(d[2], d[3]))
                a_dy, a_dx = acc[q]
                builder.store(builder.fadd(builder.load(a_dy), t_dy), a_dy)
                builder.store(builder.fadd(builder.load(a_dx), t_dx), a_dx)
        for a, (a_dy, a_dx) in zip(at_k, acc):
            _ir_put(builder, builder.load(a_dy), ps_dy, a, ty)
            _ir_put(builder, builder.load(a_dx), ps_dx, a, ty)

    band = ROWS_BAND * width
    nband = builder.mul(builder.udiv(C, ir.Constant(intp, band)), ir.Constant(intp, band))
    with cgutils.for_range_slice(builder, ir.Constant(intp, 0), nband, ir.Constant(intp, band),
                                 intp) as (k, _):  # fmt: skip
        group(k, vty, ROWS_BAND)
    with cgutils.for_range_slice(builder, nband, nvec, ir.Constant(intp, width), intp) as (k, _):
        group(k, vty, 1)
    with cgutils.for_range_slice(builder, nvec, C, one, intp) as (k, _):
        group(k, None, 1)
    builder.ret_void()


def _rows_codegen(context, builder, sig, args):
    centred = len(args) == 7  # (x, m, s1, s2, lo, nsteps, C): x stands in for dy and x
    if centred:
        args = (args[0], *args)
        sig = types.void(sig.args[0], *sig.args)
    arrays = [context.make_array(sig.args[k])(context, builder, args[k]) for k in range(5)]
    lo, nsteps, C = args[5:]
    sty = context.get_value_type(sig.args[0].dtype)
    intp = context.get_value_type(types.intp)
    pty = sty.as_pointer()
    fnty = ir.FunctionType(ir.VoidType(), [pty] * 5 + [intp, intp])
    name = f"batchnorm_{'centred' if centred else 'grad'}_rows4_{sty}"
    fn = _out_of_line(builder, fnty, name, lambda f: _rows_body(f, sty, intp, centred))
    ptrs = [builder.gep(arrays[0].data, [lo]), builder.gep(arrays[1].data, [lo])]
    ptrs += [a.data for a in arrays[2:]]
    builder.call(fn, [*ptrs, nsteps, C])
    return context.get_dummy_value()


@intrinsic
def grad_sums_rows4(typingctx, dy, x, m, s_dy, s_dx, lo, nsteps, C):
    """For rows of C values starting at ``lo`` of dy and x, ``nsteps`` steps of four rows:
    ``_add_grad_4``'s sums into s_dy and s_dx ((C,), x's dtype), the same bytes (for NaN-free
    data: with NaNs, which NaN comes out may differ). Nothing is
    bounds-checked."""
    _ir_check(dy, x, m, s_dy, s_dx)
    sig = types.void(dy, x, m, s_dy, s_dx, types.intp, types.intp, types.intp)
    return sig, _rows_codegen


@intrinsic
def centred_sums_rows4(typingctx, x, m, s1, s2, lo, nsteps, C):
    """For rows of C values starting at ``lo`` of x, ``nsteps`` steps of four rows:
    ``_add_centred_4``'s sums of x - m and (x - m)^2 into s1 and s2 ((C,), x's dtype), the
    same bytes for NaN-free data (``grad_sums_rows4``'s loops; with NaNs, which NaN comes out
    may differ). Nothing is bounds-checked."""
    _ir_check(x, m, s1, s2)
    sig = types.void(x, m, s1, s2, types.intp, types.intp, types.intp)
    return sig, _rows_codegen


@njit(cache=True, inline="always")
def _aligned(k, L, dt):
    """An empty (k, L) C-contiguous scratch array of dtype dt starting on a 64-byte boundary
    (numba's own arrays start on 32-byte ones), and so does every row when L * itemsize is a
    multiple of 64 (otherwise only the first: short-run tiles of nc * 49 values): the 64-byte
    vector loads and stores of the loops over tiles and per-channel accumulators then do not
    straddle two cache lines. Misaligned scale/shift tiles made
    channels-last eval 15-35% slower (kernel alone, (32, 256, 28, 28) 0.297 -> 0.40 ms)."""
    item = np.empty(0, dt).itemsize
    buf = np.empty(k * L + 64 // item, dt)
    off = ((-buf.ctypes.data) % 64) // item
    return buf[off : off + k * L].reshape((k, L))


@njit(cache=True)
def _merge(n, mean, m2, cnt, mean_k, m2_k):
    """Chan's update of (n, mean, m2) with a chunk of cnt values; all float64."""
    n_new = n + cnt
    delta = mean_k - mean
    mean = mean + delta * (cnt / n_new)
    m2 = m2 + m2_k + delta * delta * (n * cnt / n_new)
    return n_new, mean, m2


@njit(cache=True)
def _segment_moments(x, C, B, c, a0, a1, lo, hi, shift, zero):
    """(mean, m2) in float64 of channel c over rows [a0, a1) and columns [lo, hi): at most
    CHUNK values, so the second look hits L1.

    A first sum gives a shift m in x's dtype (kept in the length-1 array ``shift``); then
    s1 = sum(x - m) and s2 = sum((x - m)^2) give the exact mean m + s1/n and the centred
    m2 = s2 - s1^2/n, whatever the data's offset from zero. Each row's run is one
    ``sum_centred`` reduction, added in order in x's dtype."""
    cnt = (a1 - a0) * (hi - lo)
    s = zero
    for a in range(a0, a1):
        base = (a * C + c) * B
        s += sum_centred(x[base + lo : base + hi], zero)[0]
    shift[0] = s / cnt
    m = shift[0]
    s1 = zero
    s2 = zero
    for a in range(a0, a1):
        base = (a * C + c) * B
        p1, p2 = sum_centred(x[base + lo : base + hi], m)
        s1 += p1
        s2 += p2
    s1d = np.float64(s1)
    return cnt, np.float64(m) + s1d / cnt, np.float64(s2) - s1d * s1d / cnt


@njit(cache=True)
def _channel_moments(x, A, C, B, c, zero):
    """(n, mean, m2) of channel c: segments of at most CHUNK values (part of a row when
    B >= CHUNK, else several whole rows), merged in order with Chan's update."""
    shift = np.empty(1, x.dtype)
    n = 0.0
    mean = 0.0
    m2 = 0.0
    if B >= CHUNK:
        for a in range(A):
            for lo in range(0, B, CHUNK):
                cnt, mk, m2k = _segment_moments(
                    x, C, B, c, a, a + 1, lo, min(lo + CHUNK, B), shift, zero
                )
                n, mean, m2 = _merge(n, mean, m2, cnt, mk, m2k)
    else:
        R = CHUNK // B
        for a0 in range(0, A, R):
            cnt, mk, m2k = _segment_moments(x, C, B, c, a0, min(a0 + R, A), 0, B, shift, zero)
            n, mean, m2 = _merge(n, mean, m2, cnt, mk, m2k)
    return n, mean, m2


@njit(cache=True)
def _finish_stats(c, n, mean64, m2, mean, var, invstd, eps_t):
    """Store mean, biased var and invstd (as ``_conventions.invstd_from_var``) of channel c."""
    mean[c] = mean64
    v = m2 / n if n > 0 else 0.0
    # m2 = s2 - s1^2 / cnt may round below zero; a NaN (a NaN or an inf in the channel) stays
    var[c] = 0.0 if v < 0 else v
    den = np.sqrt(var[c] + eps_t)  # in the accumulation dtype, as the torch backend
    invstd[c] = 1.0 / den if den != 0 else 0.0


@njit(cache=True)
def _plain_stats_where_nan(x, A, C, B, c0, c1, mean, var, invstd, eps_t):
    """Channels in [c0, c1) whose mean came out NaN get plain float64 statistics: the mean a
    float64 sum in memory order over n, then the centred squares about it. The kernels' sums
    give NaN for an infinity (``inf - inf`` about a shift) where the plain mean keeps it, as
    torch's does (a NaN, or both infinities, stay NaN; the variance is NaN either way), and
    for finite float32 data so large that a float32 partial sum overflows (|x| beyond about
    1e35), where these are finite. x as (A, C, B); channels-last rows are B = 1."""
    n = A * B
    for c in range(c0, c1):
        if mean[c] == mean[c]:
            continue
        s = 0.0
        for a in range(A):
            base = (a * C + c) * B
            for i in range(B):
                s += x[base + i]
        m = s / n
        m2 = 0.0
        for a in range(A):
            base = (a * C + c) * B
            for i in range(B):
                d = x[base + i] - m
                m2 += d * d
        _finish_stats(c, n, m, m2, mean, var, invstd, eps_t)


@njit(cache=True)
def _scale_shift(c, mean, invstd, w, b):
    """(scale, shift) in float64 with y = x * scale + shift; w, b empty when absent."""
    scale = np.float64(invstd[c])
    if w.size > 0:
        scale *= np.float64(w[c])
    shift = -np.float64(mean[c]) * scale
    if b.size > 0:
        shift += np.float64(b[c])
    return scale, shift


# ---------------------------------------------------------------- NCHW (B > 1): one channel


@njit(cache=True)
def _nchw_fwd_channel(
    c, x, y, res, A, C, B, mean, var, invstd, w, b, eps_t, stats, apply, relu, zero, acc
):
    """Statistics and/or normalisation of channel c; x, y, res flat (A * C * B,)."""
    if stats:
        n, mean64, m2 = _channel_moments(x, A, C, B, c, zero)
        _finish_stats(c, n, mean64, m2, mean, var, invstd, eps_t)
        _plain_stats_where_nan(x, A, C, B, c, c + 1, mean, var, invstd, eps_t)
    if apply:
        scale64, shift64 = _scale_shift(c, mean, invstd, w, b)
        acc[0] = scale64  # in x's compute dtype, so the loop below stays in it
        acc[1] = shift64
        scale = acc[0]
        sh = acc[1]
        nt = streaming(y)
        for a in range(A):
            base = (a * C + c) * B
            affine_run(x, y, res, base, B, scale, sh, relu, nt)


@njit(cache=True)
def channels_per_block(A, C, B, itemsize, streams, min_blocks):
    """Channels per NCHW work item (``streams`` tensors of them are read: x, or x and dy).

    As many whole channels as fit L2_BUDGET, at most C / min_blocks (MIN_BLOCKS for load
    balance, or 1 for the serial drivers of short runs, B < SMALL_B, where more blocks only
    cost per-block set-up), so the later passes re-read from L2. (Tensors over 16 MiB with
    runs of 256 to 2048 values used to get a few blocks of up to 16 MiB, re-read from L3, since
    a sample's part of an L2 block, e.g. 2 channels of 28x28 = 6 KiB, left the first pass
    waiting on memory. The first pass now prefetches the next sample's part instead
    (``PREFETCH_MAX_B``), which needs no L3: with the L3 slow (the machine's slow state, a
    neighbour holding it, we guess) that L2 blocking was ahead by 10-25%, forward-train of
    32x256x28x28 3.4-4.1x -> 4.7-5.2x torch, backward of 64x128x28x28 2.23-2.38 -> 1.78-1.81
    ms; with it fast, backward was mixed: 64x128x28x28 1.48 -> 1.16-1.25 ms, 16x512x28x28
    1.25-1.27 -> 1.43-1.56, where the L3 blocks stay 15% ahead.)
    Results do not depend on the blocking: the tiled kernels of short runs sum per position,
    then fold per channel; the long-run kernels sum each run of a channel in a fixed order
    and add the runs in row order."""
    per_channel = max(1, A * B * itemsize * streams)
    cb = max(1, L2_BUDGET // per_channel)
    return max(1, min(cb, (C + min_blocks - 1) // min_blocks))


@njit(cache=True)
def _nchw_fwd_block(
    c0, c1, x, y, res, A, C, B, mean, var, invstd, w, b, eps_t, stats, apply, relu, zero, sx, sd
):  # fmt: skip
    """Channels [c0, c1): two-pass statistics then normalisation, rows in memory order.

    For each sample a, the block's channels are one contiguous run of (c1 - c0) * B values,
    so the first pass streams from memory (prefetching the next sample's runs when they are
    short); the block fits L2, so the centred second pass and the normalisation read it from
    there. Scratch (allocated by the caller, once per call on the serial path: tiny tensors
    are all overhead): sx (3, >= c1 - c0) in x's dtype, sd
    (3, >= c1 - c0) float64."""
    nc = c1 - c0
    n = A * B
    if stats:
        tot, t1, t2 = sd[0], sd[1], sd[2]
        for k in range(nc):
            tot[k] = 0.0
            t1[k] = 0.0
            t2[k] = 0.0
        for a in range(A):
            if B < PREFETCH_MAX_B and a + 1 < A:  # the next sample's runs
                prefetch(x, ((a + 1) * C + c0) * B, nc * B)
            for k in range(nc):
                base = (a * C + c0 + k) * B
                for lo in range(0, B, CHUNK):
                    tot[k] += sum_centred(x[base + lo : base + min(lo + CHUNK, B)], zero)[0]
        for k in range(nc):
            sx[0, k] = tot[k] / n  # a shift close to the mean, in x's dtype
        for a in range(A):
            for k in range(nc):
                base = (a * C + c0 + k) * B
                m = sx[0, k]
                for lo in range(0, B, CHUNK):
                    s1, s2 = sum_centred(x[base + lo : base + min(lo + CHUNK, B)], m)
                    t1[k] += s1
                    t2[k] += s2
        for k in range(nc):
            # exact mean and centred sum of squares from sums about the shift m
            mean64 = np.float64(sx[0, k]) + t1[k] / n
            _finish_stats(c0 + k, n, mean64, t2[k] - t1[k] * t1[k] / n, mean, var, invstd, eps_t)
        _plain_stats_where_nan(x, A, C, B, c0, c1, mean, var, invstd, eps_t)
    if not apply:
        return
    for k in range(nc):
        sc, sf = _scale_shift(c0 + k, mean, invstd, w, b)
        sx[1, k] = sc
        sx[2, k] = sf
    nt = streaming(y)
    for a in range(A):
        for k in range(nc):
            base = (a * C + c0 + k) * B
            affine_run(x, y, res, base, B, sx[1, k], sx[2, k], relu, nt)


@njit(cache=True, inline="always")
def _four(v, lo, step, n):
    """The runs ``v[lo + j * step : lo + j * step + n]`` for j = 0, 1, 2, 3 (four samples or
    rows at once)."""
    return (
        v[lo : lo + n],
        v[lo + step : lo + step + n],
        v[lo + 2 * step : lo + 2 * step + n],
        v[lo + 3 * step : lo + 3 * step + n],
    )


@njit(cache=True, inline="always")
def _grad_x_four(dy, x, dx, lo, step, n, kdy, kx, k0):
    """``dx = dy * kdy + x * kx + k0`` (``grad_x_tile``'s arithmetic, training, no mask) over
    four runs of n values, ``step`` apart from lo, against one set of n coefficients: each
    coefficient loaded once for four values."""
    x0, x1, x2, x3 = _four(x, lo, step, n)
    g0, g1, g2, g3 = _four(dy, lo, step, n)
    d0, d1, d2, d3 = _four(dx, lo, step, n)
    for i in range(n):
        p, q, r = kdy[i], kx[i], k0[i]
        d0[i] = g0[i] * p + x0[i] * q + r
        d1[i] = g1[i] * p + x1[i] * q + r
        d2[i] = g2[i] * p + x2[i] * q + r
        d3[i] = g3[i] * p + x3[i] * q + r


@njit(cache=True, inline="always")
def _add_centred_4(x0, x1, x2, x3, m, s1, s2):
    """Four rows at once, per position i < s1.size: ``s1[i] += (d0 + d1) + (d2 + d3)`` and
    ``s2[i] += (d0^2 + d1^2) + (d2^2 + d3^2)`` with ``dj = xj[i] - m[i]``, in the arrays'
    dtype (one accumulator load-add-store per four values)."""
    for i in range(s1.size):
        mi = m[i]
        d0 = x0[i] - mi
        d1 = x1[i] - mi
        d2 = x2[i] - mi
        d3 = x3[i] - mi
        s1[i] += (d0 + d1) + (d2 + d3)
        s2[i] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)


@njit(cache=True, inline="always")
def _add_grad_4(g0, g1, g2, g3, x0, x1, x2, x3, m, s_dy, s_dx):
    """Four rows at once, per position i < s_dy.size: ``s_dy[i] += (g0 + g1) + (g2 + g3)`` and
    ``s_dx[i] += (g0 (x0 - m) + g1 (x1 - m)) + (g2 (x2 - m) + g3 (x3 - m))`` at i, in the
    arrays' dtype (the gradient sums' counterpart of ``_add_centred_4``)."""
    for i in range(s_dy.size):
        mi = m[i]
        s_dy[i] += (g0[i] + g1[i]) + (g2[i] + g3[i])
        s_dx[i] += (g0[i] * (x0[i] - mi) + g1[i] * (x1[i] - mi)) + (
            g2[i] * (x2[i] - mi) + g3[i] * (x3[i] - mi)
        )


@njit(cache=True)
def _fold_rows(t, t64, L):
    """t64 += t; t = 0 (float32 tile partials into float64, every FLUSH_ROWS rows)."""
    for i in range(L):
        t64[i] += t[i]
        t[i] = 0


@njit(cache=True)
def _nchw_fwd_block_tiled(
    c0, c1, x, y, res, A, C, B, mean, var, invstd, w, b, eps_t, stats, apply, relu, zero
):  # fmt: skip
    """``_nchw_fwd_block`` for short runs (B < SMALL_B, e.g. 7x7 maps): for each sample the
    block's channels are one contiguous run of (c1 - c0) * B values, handled as one flat loop
    against per-position accumulators and per-channel scale/shift repeated B times (tiles).
    Per position, values are summed over the rows in x's dtype, flushed to float64 every
    FLUSH_ROWS rows; each channel then folds its B positions in float64. None of this depends
    on the block size, so results do not either."""
    nc = c1 - c0
    L = nc * B
    n = A * B
    tiles = _aligned(3, L, x.dtype)
    if stats:
        t64 = _aligned(3, L, np.float64)
        acc = tiles[0]
        acc[:] = zero
        s64 = t64[0]
        s64[:] = 0.0
        a4 = A // 4 * 4
        S = C * B  # one sample
        for a in range(0, a4, 4):
            # four samples per step: four streams in flight, one accumulator load-add-store
            # per four values (rows flushed every FLUSH_ROWS, a multiple of 4)
            lo = (a * C + c0) * B
            x0, x1, x2, x3 = _four(x, lo, S, L)
            for i in range(L):
                acc[i] += (x0[i] + x1[i]) + (x2[i] + x3[i])
            if (a + 4) % FLUSH_ROWS == 0:
                _fold_rows(acc, s64, L)
        for a in range(a4, A):
            xs = x[(a * C + c0) * B : (a * C + c0) * B + L]
            for i in range(L):
                acc[i] += xs[i]
        _fold_rows(acc, s64, L)
        mt = tiles[1]
        for k in range(nc):
            tot = 0.0
            for i in range(k * B, (k + 1) * B):
                tot += s64[i]
            mt[k * B] = tot / n  # the shift, in x's dtype
            m = mt[k * B]
            for i in range(k * B, (k + 1) * B):
                mt[i] = m
        a1, a2 = tiles[0], tiles[2]
        a1[:] = zero
        a2[:] = zero
        q1, q2 = t64[1], t64[2]
        q1[:] = 0.0
        q2[:] = 0.0
        for a in range(0, a4, 4):
            lo = (a * C + c0) * B
            x0, x1, x2, x3 = _four(x, lo, S, L)
            _add_centred_4(x0, x1, x2, x3, mt, a1, a2)
            if (a + 4) % FLUSH_ROWS == 0:
                _fold_rows(a1, q1, L)
                _fold_rows(a2, q2, L)
        for a in range(a4, A):
            xs = x[(a * C + c0) * B : (a * C + c0) * B + L]
            for i in range(L):
                d = xs[i] - mt[i]
                a1[i] += d
                a2[i] += d * d
        _fold_rows(a1, q1, L)
        _fold_rows(a2, q2, L)
        for k in range(nc):
            s1 = 0.0
            s2 = 0.0
            for i in range(k * B, (k + 1) * B):
                s1 += q1[i]
                s2 += q2[i]
            mean64 = np.float64(mt[k * B]) + s1 / n
            _finish_stats(c0 + k, n, mean64, s2 - s1 * s1 / n, mean, var, invstd, eps_t)
        _plain_stats_where_nan(x, A, C, B, c0, c1, mean, var, invstd, eps_t)
    if not apply:
        return
    st, ht = tiles[0], tiles[1]
    for k in range(nc):
        sc, sf = _scale_shift(c0 + k, mean, invstd, w, b)
        st[k * B] = sc
        ht[k * B] = sf
        for i in range(k * B + 1, (k + 1) * B):
            st[i] = st[k * B]
            ht[i] = ht[k * B]
    if streaming(y):  # one sample's block at a time, streamed (``_nchw_fwd_item`` fences)
        for a in range(A):
            affine_tile(x, y, res, (a * C + c0) * B, L, st, ht, relu, True)
        return
    has_res = res.size > 0
    a4 = 0 if has_res or relu else A // 4 * 4
    S = C * B
    for a in range(0, a4, 4):  # four samples per step: each tile value loaded once for four
        lo = (a * C + c0) * B
        x0, x1, x2, x3 = _four(x, lo, S, L)
        y0, y1, y2, y3 = _four(y, lo, S, L)
        for i in range(L):
            p = st[i]
            q = ht[i]
            y0[i] = x0[i] * p + q
            y1[i] = x1[i] * p + q
            y2[i] = x2[i] * p + q
            y3[i] = x3[i] * p + q
    for a in range(a4, A):
        lo = (a * C + c0) * B
        xs = x[lo : lo + L]
        ys = y[lo : lo + L]
        if has_res:
            rs = res[lo : lo + L]
            for i in range(L):
                v = xs[i] * st[i] + ht[i] + rs[i]
                if relu and v < 0:
                    v = 0
                ys[i] = v
        elif relu:
            for i in range(L):
                v = xs[i] * st[i] + ht[i]
                if v < 0:
                    v = 0
                ys[i] = v
        else:
            for i in range(L):
                ys[i] = xs[i] * st[i] + ht[i]


@njit(cache=True)
def _nchw_fwd_item(j, cb, x, y, res, A, C, B, mean, var, invstd, w, b, eps_t, stats, apply,
                   relu, zero, sx, sd):  # fmt: skip
    c0 = j * cb
    c1 = min(C, c0 + cb)
    _nchw_fwd_work(c0, c1, x, y, res, A, C, B, mean, var, invstd, w, b, eps_t, stats, apply,
                   relu, zero, sx, sd)  # fmt: skip
    if apply and streaming(y):
        store_fence()


@njit(cache=True, inline="always")
def _nchw_fwd_work(c0, c1, x, y, res, A, C, B, mean, var, invstd, w, b, eps_t, stats, apply,
                   relu, zero, sx, sd):  # fmt: skip
    if A * B * x.itemsize > L2_BUDGET:
        # one channel overflows L2: chunked moments read it from memory once, normalisation
        # a second time (no blocked pass could do better)
        for c in range(c0, c1):
            _nchw_fwd_channel(
                c, x, y, res, A, C, B, mean, var, invstd, w, b, eps_t, stats, apply, relu,
                zero, sx[0],
            )  # fmt: skip
    elif B < SMALL_B:
        _nchw_fwd_block_tiled(
            c0, c1, x, y, res, A, C, B, mean, var, invstd, w, b, eps_t, stats, apply, relu, zero
        )
    else:
        _nchw_fwd_block(
            c0, c1, x, y, res, A, C, B, mean, var, invstd, w, b, eps_t, stats, apply, relu,
            zero, sx, sd,
        )  # fmt: skip


@njit(cache=True, parallel=True)
def nchw_fwd_par(x, y, res, A, C, B, mean, var, invstd, w, b, eps_t, stats, apply, relu, threads):
    zero = np.zeros(1, x.dtype)[0]
    cb = channels_per_block(A, C, B, x.itemsize, 1, MIN_BLOCKS)
    for j in prange((C + cb - 1) // cb):
        sx = np.empty((3, max(cb, 2)), x.dtype)
        sd = np.empty((3, cb))
        _nchw_fwd_item(
            j, cb, x, y, res, A, C, B, mean, var, invstd, w, b, eps_t, stats, apply, relu,
            zero, sx, sd,
        )  # fmt: skip


@njit(cache=True)
def nchw_fwd_ser(x, y, res, A, C, B, mean, var, invstd, w, b, eps_t, stats, apply, relu, threads):
    zero = np.zeros(1, x.dtype)[0]
    cb = channels_per_block(A, C, B, x.itemsize, 1, 1 if B < SMALL_B else MIN_BLOCKS)
    sx = np.empty((3, max(cb, 2)), x.dtype)
    sd = np.empty((3, cb))
    for j in range((C + cb - 1) // cb):
        _nchw_fwd_item(
            j, cb, x, y, res, A, C, B, mean, var, invstd, w, b, eps_t, stats, apply, relu,
            zero, sx, sd,
        )  # fmt: skip


@njit(cache=True)
def _nchw_eval_item(j, per_item, x, y, res, C, B, sct, relu):
    """Runs [j * per_item, (j + 1) * per_item) of the A * C runs of B values, in memory order;
    sct: (2, C) scale and shift in x's dtype."""
    runs = y.size // B
    q0 = j * per_item
    c = q0 % C  # then counted up: no division per run
    nt = streaming_eval(y)
    for q in range(q0, min(runs, (j + 1) * per_item)):
        affine_run(x, y, res, q * B, B, sct[0, c], sct[1, c], relu, nt)
        c += 1
        if c == C:
            c = 0
    if nt:
        store_fence()


@njit(cache=True)
def _eval_setup(C, B, mean, invstd, w, b, x):
    sct = np.empty((2, C), x.dtype)
    for c in range(C):
        sc, sf = _scale_shift(c, mean, invstd, w, b)
        sct[0, c] = sc
        sct[1, c] = sf
    per_item = max(1, EVAL_VALUES // B)
    return sct, per_item, (x.size // B + per_item - 1) // per_item


@njit(cache=True, parallel=True)
def nchw_eval_par(x, y, res, C, B, mean, invstd, w, b, relu):
    """Eval (given statistics): one streaming pass in memory order, no channel blocking
    (nothing is re-read, so long sequential runs serve the prefetchers best)."""
    sct, per_item, items = _eval_setup(C, B, mean, invstd, w, b, x)
    for j in prange(items):
        _nchw_eval_item(j, per_item, x, y, res, C, B, sct, relu)


@njit(cache=True)
def nchw_eval_ser(x, y, res, C, B, mean, invstd, w, b, relu):
    sct, per_item, items = _eval_setup(C, B, mean, invstd, w, b, x)
    for j in range(items):
        _nchw_eval_item(j, per_item, x, y, res, C, B, sct, relu)


@njit(cache=True)
def _segment_grad_sums(dy, x, mask, C, B, c, a0, a1, lo, hi, m, zero):
    """(sum(dy), sum(dy * (x - m))) of channel c over rows [a0, a1) and columns [lo, hi),
    accumulated in x's dtype (at most CHUNK values), returned as float64. dy counts only
    where not mask <= 0 when a mask is given (a fused relu: NaN passes, as in torch)."""
    s_dy = zero
    s_dyxmu = zero
    for a in range(a0, a1):
        lo_a = (a * C + c) * B + lo
        hi_a = lo_a + hi - lo
        if mask.size > 0:
            p1, p2 = sum_grad_masked(dy[lo_a:hi_a], x[lo_a:hi_a], mask[lo_a:hi_a], m)
        else:
            p1, p2 = sum_grad(dy[lo_a:hi_a], x[lo_a:hi_a], m)
        s_dy += p1
        s_dyxmu += p2
    return np.float64(s_dy), np.float64(s_dyxmu)


@njit(cache=True)
def _nchw_bwd_block(
    c0, c1, dy, x, mask, dx, A, C, B, mean, invstd, w, sum_dy, sum_dy_xhat, count,
    sums, do_dx, training, zero, sx, sd,
):  # fmt: skip
    """sum_dy, sum_dy_xhat and/or dx of channels [c0, c1), rows in memory order: the sums
    stream dy and x from memory, dx re-reads them from L2 (the block of x and dy fits it; a
    single channel over L2_BUDGET / 2, as 8x64x112x112's, partly from L3 or memory).
    Scratch: sx (4, >= c1 - c0) in x's dtype, sd (2, >= c1 - c0) float64."""
    nc = c1 - c0
    for k in range(nc):
        sx[0, k] = mean[c0 + k]
    if sums:
        t_dy, t_dyxmu = sd[0], sd[1]
        for k in range(nc):
            t_dy[k] = 0.0
            t_dyxmu[k] = 0.0
        for a in range(A):
            if B < PREFETCH_MAX_B and a + 1 < A:  # the next sample's runs
                prefetch(x, ((a + 1) * C + c0) * B, nc * B)
                prefetch(dy, ((a + 1) * C + c0) * B, nc * B)
            for k in range(nc):
                m = sx[0, k]
                for lo in range(0, B, CHUNK):
                    hi = min(lo + CHUNK, B)
                    p_dy, p_dyxmu = _segment_grad_sums(
                        dy, x, mask, C, B, c0 + k, a, a + 1, lo, hi, m, zero
                    )
                    t_dy[k] += p_dy
                    t_dyxmu[k] += p_dyxmu
        for k in range(nc):
            sum_dy[c0 + k] = t_dy[k]
            sum_dy_xhat[c0 + k] = t_dyxmu[k] * np.float64(invstd[c0 + k])
    if not do_dx:
        return
    for k in range(nc):
        c = c0 + k
        # dx = k_dy * (dy - sum_dy / n - xhat * sum_dy_xhat / n) = k_dy * dy + k_x * x + k_0
        k_dy = np.float64(invstd[c])
        if w.size > 0:
            k_dy *= np.float64(w[c])
        k_x = 0.0
        k_0 = 0.0
        if training:
            k_x = -k_dy * np.float64(invstd[c]) * np.float64(sum_dy_xhat[c]) / count
            k_0 = -k_dy * np.float64(sum_dy[c]) / count - np.float64(mean[c]) * k_x
        sx[1, k] = k_dy
        sx[2, k] = k_x
        sx[3, k] = k_0
    nt = streaming(dx)
    for a in range(A):
        for k in range(nc):
            base = (a * C + c0 + k) * B
            grad_x_run(dy, x, mask, dx, base, B, sx[1, k], sx[2, k], sx[3, k], training, nt)
    if nt:
        store_fence()


@njit(cache=True)
def _nchw_bwd_block_tiled(
    c0, c1, dy, x, mask, dx, A, C, B, mean, invstd, w, sum_dy, sum_dy_xhat, count,
    sums, do_dx, training, zero,
):  # fmt: skip
    """``_nchw_bwd_block`` for short runs (B < SMALL_B): per sample, one flat loop over the
    block's (c1 - c0) * B values against per-position accumulators (flushed to float64 every
    FLUSH_ROWS rows, then folded per channel) and repeated per-channel coefficients."""
    nc = c1 - c0
    L = nc * B
    has_mask = mask.size > 0
    tiles = _aligned(4, L, x.dtype)
    mt = tiles[0]
    for k in range(nc):
        mt[k * B] = mean[c0 + k]
        for i in range(k * B + 1, (k + 1) * B):
            mt[i] = mt[k * B]
    if sums:
        t_dy, t_dx = tiles[1], tiles[2]
        t_dy[:] = zero
        t_dx[:] = zero
        q = _aligned(2, L, np.float64)
        for i in range(L):
            q[0, i] = 0.0
            q[1, i] = 0.0
        a4 = 0 if has_mask else A // 4 * 4
        S = C * B  # one sample
        for a in range(0, a4, 4):
            # four samples per step: four streams per tensor in flight, one accumulator
            # load-add-store per four values (rows flushed every FLUSH_ROWS, a multiple of 4)
            lo = (a * C + c0) * B
            x0, x1, x2, x3 = _four(x, lo, S, L)
            g0, g1, g2, g3 = _four(dy, lo, S, L)
            _add_grad_4(g0, g1, g2, g3, x0, x1, x2, x3, mt, t_dy, t_dx)
            if (a + 4) % FLUSH_ROWS == 0:
                _fold_rows(t_dy, q[0], L)
                _fold_rows(t_dx, q[1], L)
        for a in range(a4, A):
            lo = (a * C + c0) * B
            xs = x[lo : lo + L]
            gs = dy[lo : lo + L]
            if has_mask:
                ms = mask[lo : lo + L]
                for i in range(L):
                    g = zero if ms[i] <= 0 else gs[i]
                    t_dy[i] += g
                    t_dx[i] += g * (xs[i] - mt[i])
            else:
                for i in range(L):
                    t_dy[i] += gs[i]
                    t_dx[i] += gs[i] * (xs[i] - mt[i])
            if (a + 1) % FLUSH_ROWS == 0:
                _fold_rows(t_dy, q[0], L)
                _fold_rows(t_dx, q[1], L)
        _fold_rows(t_dy, q[0], L)
        _fold_rows(t_dx, q[1], L)
        for k in range(nc):
            s_dy = 0.0
            s_dx = 0.0
            for i in range(k * B, (k + 1) * B):
                s_dy += q[0, i]
                s_dx += q[1, i]
            sum_dy[c0 + k] = s_dy
            sum_dy_xhat[c0 + k] = s_dx * np.float64(invstd[c0 + k])
    if not do_dx:
        return
    kdy, kx, k0 = tiles[1], tiles[2], tiles[3]
    for k in range(nc):
        c = c0 + k
        a_dy = np.float64(invstd[c])
        if w.size > 0:
            a_dy *= np.float64(w[c])
        a_x = 0.0
        a_0 = 0.0
        if training:
            a_x = -a_dy * np.float64(invstd[c]) * np.float64(sum_dy_xhat[c]) / count
            a_0 = -a_dy * np.float64(sum_dy[c]) / count - np.float64(mean[c]) * a_x
        kdy[k * B] = a_dy
        kx[k * B] = a_x
        k0[k * B] = a_0
        for i in range(k * B + 1, (k + 1) * B):
            kdy[i] = kdy[k * B]
            kx[i] = kx[k * B]
            k0[i] = k0[k * B]
    nt = streaming(dx)
    # training without a mask, cached: four samples per step, each coefficient loaded once
    # for four values (``_cl_dx_block``'s loop); the rest one sample's block at a time
    a4 = 0 if has_mask or not training or nt else A // 4 * 4
    S = C * B
    for a in range(0, a4, 4):
        _grad_x_four(dy, x, dx, (a * C + c0) * B, S, L, kdy, kx, k0)
    for a in range(a4, A):
        grad_x_tile(dy, x, mask, dx, (a * C + c0) * B, L, kdy, kx, k0, training, nt)
    if nt:
        store_fence()


@njit(cache=True, parallel=True)
def nchw_bwd_par(
    dy, x, mask, dx, A, C, B, mean, invstd, w, sum_dy, sum_dy_xhat, count, sums, do_dx, training,
    threads,
):  # fmt: skip
    zero = np.zeros(1, x.dtype)[0]
    cb = channels_per_block(A, C, B, x.itemsize, 2, MIN_BLOCKS)
    for j in prange((C + cb - 1) // cb):
        c0 = j * cb
        c1 = min(C, c0 + cb)
        if B < SMALL_B:
            _nchw_bwd_block_tiled(
                c0, c1, dy, x, mask, dx, A, C, B, mean, invstd, w, sum_dy, sum_dy_xhat,
                count, sums, do_dx, training, zero,
            )  # fmt: skip
        else:
            sx = np.empty((4, c1 - c0), x.dtype)
            sd = np.empty((2, c1 - c0))
            _nchw_bwd_block(
                c0, c1, dy, x, mask, dx, A, C, B, mean, invstd, w, sum_dy, sum_dy_xhat,
                count, sums, do_dx, training, zero, sx, sd,
            )  # fmt: skip


@njit(cache=True)
def nchw_bwd_ser(
    dy, x, mask, dx, A, C, B, mean, invstd, w, sum_dy, sum_dy_xhat, count, sums, do_dx, training,
    threads,
):  # fmt: skip
    zero = np.zeros(1, x.dtype)[0]
    cb = channels_per_block(A, C, B, x.itemsize, 2, 1 if B < SMALL_B else MIN_BLOCKS)
    sx = np.empty((4, cb), x.dtype)
    sd = np.empty((2, cb))
    for j in range((C + cb - 1) // cb):
        c0 = j * cb
        if B < SMALL_B:
            _nchw_bwd_block_tiled(
                c0, min(C, c0 + cb), dy, x, mask, dx, A, C, B, mean, invstd, w, sum_dy,
                sum_dy_xhat, count, sums, do_dx, training, zero,
            )  # fmt: skip
        else:
            _nchw_bwd_block(
                c0, min(C, c0 + cb), dy, x, mask, dx, A, C, B, mean, invstd, w, sum_dy,
                sum_dy_xhat, count, sums, do_dx, training, zero, sx, sd,
            )  # fmt: skip


# -------------------------------------------- channels-last (B == 1): blocks of rows
#
# Rows of C interleaved channels. A channel-wise fusion would need A * 64 bytes (one line of
# 16 channels for every row) in cache, which ResNet-shaped NHWC tensors (A = N*H*W ~ 1e5)
# overflow in L2; so rows are split into fixed blocks, each block computes per-channel partial
# moments, the partials merge in block order (fixed, so deterministic), then a second pass
# normalises. x is read twice; tensors that fit L3 get the second read from there.
#
# Normalisation and dx loops run over *tiles*: T = max(1, CL_TILE // C) whole rows seen as
# one flat run of T * C values, against per-channel vectors repeated T times (also T * C
# long): one long vectorised loop per tile instead of T short ones keeps the per-loop costs
# (alias checks, remainders) off small C. Reductions step four rows at a time instead, so
# the (C,) accumulators are loaded and stored once per four rows (tiled accumulators would
# cost a store per value).


@njit(cache=True)
def tile_rows(C):
    return max(1, CL_TILE // C)


@njit(cache=True)
def rows_per_block(C):
    """Rows of a channels-last work item: about CL_BLOCK_VALUES values, whole tiles, and at
    least CL_MIN_ROWS rows: each block pays per-channel set-up (shift, flushes, partial
    moments written and merged), which 16 rows of 2048 channels did not amortise (with 64,
    (32, 2048, 7, 7) statistics 0.55 -> 0.19 ms, forward-train 0.77 -> 0.38 ms)."""
    T = tile_rows(C)
    return max(CL_BLOCK_VALUES // (T * C), (CL_MIN_ROWS + T - 1) // T, 1) * T


@njit(cache=True)
def _tiled(v, C, t):
    """t (T * C,) = v (C,) repeated T times."""
    for j in range(t.size // C):
        tj = t[j * C : (j + 1) * C]
        for k in range(C):
            tj[k] = v[k]


@njit(cache=True)
def _fold(t, C, out, zero):
    """out (C,) = sum over the T rows of the tile t (T * C,), in t's dtype."""
    for k in range(C):
        out[k] = zero
    for j in range(t.size // C):
        tj = t[j * C : (j + 1) * C]
        for k in range(C):
            out[k] += tj[k]


@njit(cache=True)
def _cl_block_moments(x, C, rlo, rhi, pmean, pm2, zero, sh, s1, s2):
    """Moments of rows [rlo, rhi) into pmean, pm2 (C,) float64, in ONE pass over the rows.

    Sums about a per-block shift m (the mean of the block's first CL_SHIFT_ROWS rows, a
    second look at a few KiB): s1 = sum(x - m), s2 = sum((x - m)^2) in x's dtype over
    CL_FLUSH_ROWS rows at a time, then added into float64 (pmean, pm2 double as those
    float64 sums until the end). mean = m + S1 / n and m2 = S2 - S1^2 / n are exact up to
    rounding whatever the offset of the data from zero, as long as m is within a few standard
    deviations of the block's mean (the first rows of a block are). The sums are
    ``centred_sums_rows4``'s: four rows per step, a band of channels at a time in registers,
    over pieces of about CL_CHUNK values (channels-last forward-train, alternating bench runs,
    three rounds: 8x64x112x112 0.65-0.94 -> 0.54-0.58 ms, 32x256x28x28 0.70-0.79 -> 0.58-0.71;
    the numba loop loaded and stored the (C,) sums every four rows). sh, s1, s2: (C,) scratch
    in x's dtype (the shift and the sums)."""
    n0 = min(CL_SHIFT_ROWS, rhi - rlo)
    for k in range(C):
        sh[k] = zero
    for r in range(rlo, rlo + n0):
        xr = x[r * C : (r + 1) * C]
        for k in range(C):
            sh[k] += xr[k]
    for k in range(C):
        sh[k] = sh[k] / n0
        pmean[k] = 0.0
        pm2[k] = 0.0
    sub = max(1, CL_CHUNK // (4 * C)) * 4
    for r0 in range(rlo, rhi, CL_FLUSH_ROWS):
        r1 = min(r0 + CL_FLUSH_ROWS, rhi)
        for k in range(C):
            s1[k] = zero
            s2[k] = zero
        r4 = r0 + ((r1 - r0) // 4) * 4
        for q in range(r0, r4, sub):  # L1-sized pieces: each band of channels re-walks them
            centred_sums_rows4(x, sh, s1, s2, q * C, (min(q + sub, r4) - q) // 4, C)
        for r in range(r4, r1):
            xr = x[r * C : (r + 1) * C]
            for k in range(C):
                d = xr[k] - sh[k]
                s1[k] += d
                s2[k] += d * d
        for k in range(C):
            pmean[k] += s1[k]
            pm2[k] += s2[k]
    cnt = rhi - rlo
    for k in range(C):
        t1 = pmean[k]
        pmean[k] = np.float64(sh[k]) + t1 / cnt
        pm2[k] = pm2[k] - t1 * t1 / cnt


@njit(cache=True)
def _cl_combine(A, C, RB, pmean, pm2, mean, var, invstd, eps_t):
    """Merge the blocks' partial moments in block order; store mean, var, invstd.

    Total = within + between: m2 = sum_j (m2_j + n_j * (mean_j - mean)^2), with mean the
    count-weighted mean of the block means. Loops run over C inside (vectorised) and no
    division is spent per block: this runs serially, once per call."""
    nblocks = pmean.shape[0]
    n = np.float64(A)
    total = np.zeros(C)
    for j in range(nblocks):
        cnt = np.float64(min(A, (j + 1) * RB) - j * RB)
        pj = pmean[j]
        for c in range(C):
            total[c] += cnt * pj[c]
    for c in range(C):
        total[c] /= n
    m2 = np.zeros(C)
    for j in range(nblocks):
        cnt = np.float64(min(A, (j + 1) * RB) - j * RB)
        pj = pmean[j]
        qj = pm2[j]
        for c in range(C):
            d = pj[c] - total[c]
            m2[c] += qj[c] + cnt * d * d
    for c in range(C):
        _finish_stats(c, n, total[c], m2[c], mean, var, invstd, eps_t)


@njit(cache=True)
def _cl_apply_block(x, y, res, C, rlo, rhi, sct, sft, relu):
    """y = x * scale + shift (+ residual, relu) over rows [rlo, rhi); sct, sft: tiles. Each
    tile of rows through ``affine_tile``, streamed for big outputs (the caller fences). (Its
    64-byte vector loop also beat the plain numba loop with cached stores: channels-last eval
    of 8x64x56x56 0.091-0.094 -> 0.073-0.080 ms, alternating bench runs.)"""
    T = tile_rows(C)
    nt = streaming(y)
    for t0 in range(rlo, rhi, T):
        lo = t0 * C
        affine_tile(x, y, res, lo, min(t0 + T, rhi) * C - lo, sct, sft, relu, nt)


@njit(cache=True)
def _cl_scale_shift_tiles(C, mean, invstd, w, b, dtype_like):
    """(2, T * C) tiles of scale and shift in x's dtype."""
    T = tile_rows(C)
    v = np.empty((2, C), dtype_like.dtype)
    for c in range(C):
        sc, sf = _scale_shift(c, mean, invstd, w, b)
        v[0, c] = sc
        v[1, c] = sf
    t = _aligned(2, T * C, dtype_like.dtype)
    _tiled(v[0], C, t[0])
    _tiled(v[1], C, t[1])
    return t


@njit(cache=True, inline="always")
def _share(t, nt, n):
    """Work items [lo, hi) of thread t of nt: contiguous, in order."""
    return t * n // nt, (t + 1) * n // nt


@njit(cache=True, parallel=True)
def cl_fwd_par(x, y, res, A, C, mean, var, invstd, w, b, eps_t, stats, apply, relu, threads):
    zero = np.zeros(1, x.dtype)[0]
    RB = rows_per_block(C)
    nblocks = (A + RB - 1) // RB
    # each of the threads takes one contiguous share of the blocks, the same in both passes:
    # what one thread read in the first pass, it re-reads in the second. (Before, the second
    # pass ran all blocks in reverse order through prange, so each thread re-read the
    # other's share: channels-last backward of (65536, 64), kernel alone, 1.22-1.28 ms ->
    # 0.60-0.75; three alternating rounds.)
    nt = max(1, min(threads, nblocks))
    if stats:
        pmean = _aligned(nblocks, C, np.float64)
        pm2 = _aligned(nblocks, C, np.float64)
        for t in prange(nt):
            lo, hi = _share(t, nt, nblocks)
            sc = _aligned(3, C, x.dtype)
            for j in range(lo, hi):
                _cl_block_moments(
                    x, C, j * RB, min(A, (j + 1) * RB), pmean[j], pm2[j], zero, sc[0], sc[1],
                    sc[2],
                )  # fmt: skip
        _cl_combine(A, C, RB, pmean, pm2, mean, var, invstd, eps_t)
        _plain_stats_where_nan(x, A, C, 1, 0, C, mean, var, invstd, eps_t)
    if apply:
        t2 = _cl_scale_shift_tiles(C, mean, invstd, w, b, x)
        back = stats and x.size * x.itemsize <= L3_REUSE_BYTES
        for t in prange(nt):
            lo, hi = _share(t, nt, nblocks)
            for i in range(hi - lo):
                # after the statistics pass, each thread runs its share backwards, starting
                # on the rows it read last, which may still be in its cache
                j = hi - 1 - i if back else lo + i
                _cl_apply_block(x, y, res, C, j * RB, min(A, (j + 1) * RB), t2[0], t2[1], relu)
            if streaming(y):
                store_fence()


@njit(cache=True)
def cl_fwd_ser(x, y, res, A, C, mean, var, invstd, w, b, eps_t, stats, apply, relu, threads):
    zero = np.zeros(1, x.dtype)[0]
    RB = rows_per_block(C)
    nblocks = (A + RB - 1) // RB
    if stats:
        pmean = _aligned(nblocks, C, np.float64)
        pm2 = _aligned(nblocks, C, np.float64)
        sc = _aligned(3, C, x.dtype)
        for j in range(nblocks):
            _cl_block_moments(
                x, C, j * RB, min(A, (j + 1) * RB), pmean[j], pm2[j], zero, sc[0], sc[1],
                sc[2],
            )  # fmt: skip
        _cl_combine(A, C, RB, pmean, pm2, mean, var, invstd, eps_t)
        _plain_stats_where_nan(x, A, C, 1, 0, C, mean, var, invstd, eps_t)
    if apply:
        t = _cl_scale_shift_tiles(C, mean, invstd, w, b, x)
        for j in range(nblocks):
            _cl_apply_block(x, y, res, C, j * RB, min(A, (j + 1) * RB), t[0], t[1], relu)
        if streaming(y):
            store_fence()


@njit(cache=True)
def _cl_block_sums(dy, x, mask, C, rlo, rhi, m, psum_dy, psum_dyxmu, zero, s_dy, s_dyxmu):
    """Partial sum_dy and sum(dy * (x - mean)) of rows [rlo, rhi), float64 (C,): float32
    (x's dtype) within chunks of CL_CHUNK values, four rows per step without a mask."""
    R = max(4, CL_CHUNK // C)
    has_mask = mask.size > 0
    psum_dy[:] = 0.0
    psum_dyxmu[:] = 0.0
    for r0 in range(rlo, rhi, R):
        r1 = min(r0 + R, rhi)
        s_dy[:] = zero
        s_dyxmu[:] = zero
        r4 = r0 if has_mask else r0 + ((r1 - r0) // 4) * 4
        grad_sums_rows4(dy, x, m, s_dy, s_dyxmu, r0 * C, (r4 - r0) // 4, C)
        for r in range(r4, r1):
            xr = x[r * C : (r + 1) * C]
            dyr = dy[r * C : (r + 1) * C]
            if has_mask:
                mr = mask[r * C : (r + 1) * C]
                for k in range(C):
                    g = zero if mr[k] <= 0 else dyr[k]
                    s_dy[k] += g
                    s_dyxmu[k] += g * (xr[k] - m[k])
            else:
                for k in range(C):
                    s_dy[k] += dyr[k]
                    s_dyxmu[k] += dyr[k] * (xr[k] - m[k])
        for k in range(C):
            psum_dy[k] += s_dy[k]
            psum_dyxmu[k] += s_dyxmu[k]


@njit(cache=True)
def _cl_dx_block(dy, x, mask, dx, C, rlo, rhi, kt, training):
    """dx = kdy * dy + kx * x + k0 over rows [rlo, rhi); kt: (3, T * C) tiles of kdy, kx, k0
    (``grad_x_tile``'s formula, with the relu mask and eval)."""
    T = tile_rows(C)
    has_mask = mask.size > 0
    kdy, kx, k0 = kt[0], kt[1], kt[2]
    L = T * C
    nt = streaming(dx)  # (the caller fences)
    # training without a mask, cached: four tiles per step, below; the rest tile by tile
    t4 = rlo if has_mask or not training or nt else rlo + (rhi - rlo) // (4 * T) * (4 * T)
    for t0 in range(rlo, t4, 4 * T):  # four tiles per step
        _grad_x_four(dy, x, dx, t0 * C, L, L, kdy, kx, k0)
    for t0 in range(t4, rhi, T):
        lo = t0 * C
        grad_x_tile(dy, x, mask, dx, lo, min(t0 + T, rhi) * C - lo, kdy, kx, k0, training, nt)


@njit(cache=True)
def _cl_sums_combine(C, invstd, psum_dy, psum_dyxmu, sum_dy, sum_dy_xhat):
    """The blocks' partial sums added in block order per channel, blocks outside and channels
    inside (vectorised, rows read in order: with the channel loop outside, reading a column
    at a time, this serial step took 85 us of 64x512x7x7's 0.27 ms backward)."""
    t_dy = np.zeros(C)
    t_dyxmu = np.zeros(C)
    for j in range(psum_dy.shape[0]):
        p_dy, p_dyxmu = psum_dy[j], psum_dyxmu[j]
        for c in range(C):
            t_dy[c] += p_dy[c]
            t_dyxmu[c] += p_dyxmu[c]
    for c in range(C):
        sum_dy[c] = t_dy[c]
        sum_dy_xhat[c] = t_dyxmu[c] * np.float64(invstd[c])


@njit(cache=True)
def _dx_tiles(C, mean, invstd, w, sum_dy, sum_dy_xhat, count, training, dtype_like):
    """(3, T * C) tiles of kdy, kx, k0 in x's dtype with dx = kdy * dy + kx * x + k0, from
    dx = w * invstd * (dy - sum_dy / n - xhat * sum_dy_xhat / n) (eval: w * invstd * dy)."""
    v = np.empty((3, C), dtype_like.dtype)
    for c in range(C):
        a_dy = np.float64(invstd[c])
        if w.size > 0:
            a_dy *= np.float64(w[c])
        a_x = 0.0
        a_0 = 0.0
        if training:
            a_x = -a_dy * np.float64(invstd[c]) * np.float64(sum_dy_xhat[c]) / count
            a_0 = -a_dy * np.float64(sum_dy[c]) / count - np.float64(mean[c]) * a_x
        v[0, c] = a_dy
        v[1, c] = a_x
        v[2, c] = a_0
    t = _aligned(3, tile_rows(C) * C, dtype_like.dtype)
    for q in range(3):
        _tiled(v[q], C, t[q])
    return t


@njit(cache=True, parallel=True)
def cl_bwd_par(
    dy, x, mask, dx, A, C, mean, invstd, w, sum_dy, sum_dy_xhat, count, sums, do_dx, training,
    threads,
):  # fmt: skip
    zero = np.zeros(1, x.dtype)[0]
    RB = rows_per_block(C)
    nblocks = (A + RB - 1) // RB
    nt = max(1, min(threads, nblocks))  # shares as in cl_fwd_par
    if sums:
        m = _aligned(1, C, x.dtype)[0]
        for c in range(C):
            m[c] = mean[c]
        psum_dy = _aligned(nblocks, C, np.float64)
        psum_dyxmu = _aligned(nblocks, C, np.float64)
        for t in prange(nt):
            lo, hi = _share(t, nt, nblocks)
            sc = _aligned(2, C, x.dtype)
            for j in range(lo, hi):
                _cl_block_sums(
                    dy, x, mask, C, j * RB, min(A, (j + 1) * RB), m, psum_dy[j],
                    psum_dyxmu[j], zero, sc[0], sc[1],
                )  # fmt: skip
        _cl_sums_combine(C, invstd, psum_dy, psum_dyxmu, sum_dy, sum_dy_xhat)
    if do_dx:
        kt = _dx_tiles(C, mean, invstd, w, sum_dy, sum_dy_xhat, count, training, x)
        back = sums and x.size * x.itemsize <= L3_REUSE_BYTES
        for t in prange(nt):
            lo, hi = _share(t, nt, nblocks)
            for i in range(hi - lo):
                j = hi - 1 - i if back else lo + i
                _cl_dx_block(dy, x, mask, dx, C, j * RB, min(A, (j + 1) * RB), kt, training)
            if streaming(dx):
                store_fence()


@njit(cache=True)
def cl_bwd_ser(
    dy, x, mask, dx, A, C, mean, invstd, w, sum_dy, sum_dy_xhat, count, sums, do_dx, training,
    threads,
):  # fmt: skip
    zero = np.zeros(1, x.dtype)[0]
    RB = rows_per_block(C)
    nblocks = (A + RB - 1) // RB
    if sums:
        m = _aligned(1, C, x.dtype)[0]
        for c in range(C):
            m[c] = mean[c]
        psum_dy = _aligned(nblocks, C, np.float64)
        psum_dyxmu = _aligned(nblocks, C, np.float64)
        sc = _aligned(2, C, x.dtype)
        for j in range(nblocks):
            _cl_block_sums(
                dy, x, mask, C, j * RB, min(A, (j + 1) * RB), m, psum_dy[j], psum_dyxmu[j],
                zero, sc[0], sc[1],
            )  # fmt: skip
        _cl_sums_combine(C, invstd, psum_dy, psum_dyxmu, sum_dy, sum_dy_xhat)
    if do_dx:
        kt = _dx_tiles(C, mean, invstd, w, sum_dy, sum_dy_xhat, count, training, x)
        for j in range(nblocks):
            _cl_dx_block(dy, x, mask, dx, C, j * RB, min(A, (j + 1) * RB), kt, training)
        if streaming(dx):
            store_fence()


# -------------------------------------------- one call each way (the direct paths)


@njit(cache=True)
def _in_dtype(x, v):
    """The Python float v rounded to x's dtype (as NumPy's ``np.float32(v)``)."""
    k = np.empty(1, x.dtype)
    k[0] = v
    return k[0]


@njit(cache=True, inline="always")
def _invstd_from_running(var, eps, x):
    """``1 / sqrt(var + eps)`` in x's dtype, the arithmetic of ``_conventions.invstd_from_var``
    (NumPy's float32 ops: eps and 1 rounded to the dtype first; inf where ``var + eps == 0``,
    as torch, under the callers' numpy error model)."""
    eps_t, one = _in_dtype(x, eps), _in_dtype(x, 1.0)
    invstd = np.empty(var.size, x.dtype)
    for c in range(var.size):
        invstd[c] = one / np.sqrt(var[c] + eps_t)
    return invstd


# The one-call entries below (``numba_cpu.eval_direct`` / ``train_direct``) take their tensors as
# addresses, not NumPy arrays: a tensor's ``numpy()`` costs 0.6-0.8 us, ``data_ptr()`` 0.06 us,
# and a tiny layer's whole call is about 10 us. The caller guarantees what NumPy would have:
# contiguous tensors of the witness ``z``'s dtype, alive for the call; address 0 = absent.
# The ``*_par`` entries are plain numba functions calling parallel ones, so numba does not
# start its thread pool for them: the caller must have (``numba_cpu._threads_for`` does;
# without it the first parallel region crashes the process).


# The entries pass the kernels' flags as run-time values (``A >= 0`` for True, ``A < 0`` for
# False), never as constants: numba would compile a second specialisation of the whole kernel
# for a literal True (seconds of compile time per entry: 4.7 s for ``bwd_runs_par`` with the
# kernel already compiled for the general path's plain bools).


@intrinsic
def _pointer(typingctx, address, z):
    """``address`` (an integer) as a pointer to values of z's (float) type."""
    if not isinstance(address, types.Integer) or not isinstance(z, types.Float):
        return None

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

    return types.CPointer(z)(address, z), codegen


@njit(cache=True, inline="always")
def _at(address, n, z):
    """The n values of z's dtype at ``address`` as a 1-d array; empty where address is 0."""
    return carray(_pointer(address, z), n if address != 0 else 0)


# Eval from the running buffers in one call (``numba_cpu``'s direct paths): invstd, then the
# eval kernel that ``numba_cpu.normalize`` picks for the shape and size, so the bytes are the
# general path's. One entry per kernel, so a first call compiles only the one it needs.
# Addresses: x, y and the residual (A * C * B values), the running mean and var, weight and
# bias (C each), and ``st`` (3 * C: mean, var, invstd), where the statistics used are kept for
# the backward (mean and invstd; var is not written in eval), or 0.


@njit(cache=True, inline="always")
def _eval_views(px, py, pres, pm, pv, pw, pb, A, C, B, eps, pst, z):
    """The arrays at these addresses, and invstd (kept in st[2C:] when st is given)."""
    n = A * C * B
    x, y, res, mean = _at(px, n, z), _at(py, n, z), _at(pres, n, z), _at(pm, C, z)
    invstd = _invstd_from_running(_at(pv, C, z), eps, x)
    if pst != 0:  # (a loop: slice assignment costs a second of compile time per entry)
        st = _at(pst, 3 * C, z)
        for c in range(C):
            st[c] = mean[c]
            st[2 * C + c] = invstd[c]
    return x, y, res, mean, invstd, _at(pw, C, z), _at(pb, C, z)


@njit(cache=True, error_model="numpy")
def eval_runs_ser(px, py, pres, pm, pv, pw, pb, A, C, B, eps, relu, threads, pst, z):
    """NCHW runs (B > 1), in memory order."""
    x, y, res, mean, invstd, w, b = _eval_views(px, py, pres, pm, pv, pw, pb, A, C, B, eps, pst, z)
    nchw_eval_ser(x, y, res, C, B, mean, invstd, w, b, relu)


@njit(cache=True, error_model="numpy")
def eval_runs_par(px, py, pres, pm, pv, pw, pb, A, C, B, eps, relu, threads, pst, z):
    x, y, res, mean, invstd, w, b = _eval_views(px, py, pres, pm, pv, pw, pb, A, C, B, eps, pst, z)
    nchw_eval_par(x, y, res, C, B, mean, invstd, w, b, relu)


@njit(cache=True, error_model="numpy")
def eval_rows_ser(px, py, pres, pm, pv, pw, pb, A, C, B, eps, relu, threads, pst, z):
    """Channels-last and (N, C): rows of C interleaved channels (B is 1)."""
    x, y, res, mean, invstd, w, b = _eval_views(px, py, pres, pm, pv, pw, pb, A, C, B, eps, pst, z)
    cl_fwd_ser(x, y, res, A, C, mean, x[:0], invstd, w, b, z, A < 0, A >= 0, relu, threads)


@njit(cache=True, error_model="numpy")
def eval_rows_par(px, py, pres, pm, pv, pw, pb, A, C, B, eps, relu, threads, pst, z):
    x, y, res, mean, invstd, w, b = _eval_views(px, py, pres, pm, pv, pw, pb, A, C, B, eps, pst, z)
    cl_fwd_par(x, y, res, A, C, mean, x[:0], invstd, w, b, z, A < 0, A >= 0, relu, threads)


@njit(cache=True)
def update_running(rm, rv, mean, var, factor, unbias):
    """In place: ``rm = rm * (1 - f) + f * mean``, ``rv = rv * (1 - f) + f * (var * unbias)``,
    each product and sum rounded to the buffers' dtype in that order, with ``1 - f``, ``f``
    and ``unbias`` rounded to it first: the float arithmetic of the NumPy path of
    ``_conventions.update_running_stats`` (no FMA: no fast-math), in one call."""
    keep, f, u = _in_dtype(rm, 1.0 - factor), _in_dtype(rm, factor), _in_dtype(rm, unbias)
    for c in range(rm.size):
        rm[c] = rm[c] * keep + f * mean[c]
        rv[c] = rv[c] * keep + f * (var[c] * u)


@njit(cache=True, inline="always")
def _update_at(prm, prv, mean, var, factor, unbias, z):
    """``update_running`` on the running buffers at ``prm``/``prv`` (0: none) from the batch
    mean and var."""
    if prm != 0:
        C = mean.size
        update_running(_at(prm, C, z), _at(prv, C, z), mean, var, factor, unbias)


@njit(cache=True)
def update_running_at(prm, prv, pst, C, factor, unbias, z):
    """``_update_at`` from the batch mean and var in ``st`` (3 * C: mean, var, invstd), after
    a direct call with a graph."""
    st = _at(pst, 3 * C, z)
    _update_at(prm, prv, st[:C], st[C : 2 * C], factor, unbias, z)


# Training forward in one call (``numba_cpu``'s direct paths): the statistics and the
# normalisation of ``nchw_fwd_*`` / ``cl_fwd_*``, then ``update_running`` on the running
# buffers (address 0: none): the general path's kernels, arithmetic and bytes. Addresses as
# for eval above, the running buffers read and written; st (or a scratch array) gets all three.


@njit(cache=True, inline="always")
def _train_views(px, py, pres, pw, pb, pst, A, C, B, z):
    n = A * C * B
    x, y, res, w, b = _at(px, n, z), _at(py, n, z), _at(pres, n, z), _at(pw, C, z), _at(pb, C, z)
    st = _at(pst, 3 * C, z) if pst != 0 else np.empty(3 * C, x.dtype)
    return x, y, res, w, b, st[:C], st[C : 2 * C], st[2 * C :]


@njit(cache=True)
def train_runs_ser(px, py, pres, pw, pb, prm, prv, A, C, B, eps, relu, factor, unbias, threads,
                   pst, z):  # fmt: skip
    x, y, res, w, b, mean, var, invstd = _train_views(px, py, pres, pw, pb, pst, A, C, B, z)
    nchw_fwd_ser(x, y, res, A, C, B, mean, var, invstd, w, b, _in_dtype(x, eps), A >= 0, A >= 0,
                 relu, threads)  # fmt: skip
    _update_at(prm, prv, mean, var, factor, unbias, z)


@njit(cache=True)
def train_runs_par(px, py, pres, pw, pb, prm, prv, A, C, B, eps, relu, factor, unbias, threads,
                   pst, z):  # fmt: skip
    x, y, res, w, b, mean, var, invstd = _train_views(px, py, pres, pw, pb, pst, A, C, B, z)
    nchw_fwd_par(x, y, res, A, C, B, mean, var, invstd, w, b, _in_dtype(x, eps), A >= 0, A >= 0,
                 relu, threads)  # fmt: skip
    _update_at(prm, prv, mean, var, factor, unbias, z)


@njit(cache=True)
def train_rows_ser(px, py, pres, pw, pb, prm, prv, A, C, B, eps, relu, factor, unbias, threads,
                   pst, z):  # fmt: skip
    x, y, res, w, b, mean, var, invstd = _train_views(px, py, pres, pw, pb, pst, A, C, B, z)
    cl_fwd_ser(x, y, res, A, C, mean, var, invstd, w, b, _in_dtype(x, eps), A >= 0, A >= 0, relu,
               threads)  # fmt: skip
    _update_at(prm, prv, mean, var, factor, unbias, z)


@njit(cache=True)
def train_rows_par(px, py, pres, pw, pb, prm, prv, A, C, B, eps, relu, factor, unbias, threads,
                   pst, z):  # fmt: skip
    x, y, res, w, b, mean, var, invstd = _train_views(px, py, pres, pw, pb, pst, A, C, B, z)
    cl_fwd_par(x, y, res, A, C, mean, var, invstd, w, b, _in_dtype(x, eps), A >= 0, A >= 0, relu,
               threads)  # fmt: skip
    _update_at(prm, prv, mean, var, factor, unbias, z)


# Backward in one call (``numba_cpu``'s direct autograd Function): ``nchw_bwd_*`` / ``cl_bwd_*``
# with both sums. Addresses: dy, x, the fused relu's output y (its mask, or 0), dx (or 0:
# not wanted), st (mean and invstd as the forward kept them), weight (or 0), and the two
# sums (C each, written).


@njit(cache=True, inline="always")
def _bwd_views(pdy, px, pmask, pdx, pst, pw, psdy, psdyx, A, C, B, do_dx, z):
    n = A * C * B
    x, st = _at(px, n, z), _at(pst, 3 * C, z)
    dx = _at(pdx, n if do_dx else 0, z)
    return (_at(pdy, n, z), x, _at(pmask, n, z), dx, st[:C], st[2 * C :], _at(pw, C, z),
            _at(psdy, C, z), _at(psdyx, C, z))  # fmt: skip


@njit(cache=True)
def bwd_runs_ser(pdy, px, pmask, pdx, pst, pw, psdy, psdyx, A, C, B, count, do_dx, training,
                 threads, z):  # fmt: skip
    dy, x, mask, dx, mean, invstd, w, s_dy, s_dyx = _bwd_views(
        pdy, px, pmask, pdx, pst, pw, psdy, psdyx, A, C, B, do_dx, z)  # fmt: skip
    nchw_bwd_ser(dy, x, mask, dx, A, C, B, mean, invstd, w, s_dy, s_dyx, count, A >= 0, do_dx,
                 training, threads)  # fmt: skip


@njit(cache=True)
def bwd_runs_par(pdy, px, pmask, pdx, pst, pw, psdy, psdyx, A, C, B, count, do_dx, training,
                 threads, z):  # fmt: skip
    dy, x, mask, dx, mean, invstd, w, s_dy, s_dyx = _bwd_views(
        pdy, px, pmask, pdx, pst, pw, psdy, psdyx, A, C, B, do_dx, z)  # fmt: skip
    nchw_bwd_par(dy, x, mask, dx, A, C, B, mean, invstd, w, s_dy, s_dyx, count, A >= 0, do_dx,
                 training, threads)  # fmt: skip


@njit(cache=True)
def bwd_rows_ser(pdy, px, pmask, pdx, pst, pw, psdy, psdyx, A, C, B, count, do_dx, training,
                 threads, z):  # fmt: skip
    dy, x, mask, dx, mean, invstd, w, s_dy, s_dyx = _bwd_views(
        pdy, px, pmask, pdx, pst, pw, psdy, psdyx, A, C, B, do_dx, z)  # fmt: skip
    cl_bwd_ser(dy, x, mask, dx, A, C, mean, invstd, w, s_dy, s_dyx, count, A >= 0, do_dx, training,
               threads)  # fmt: skip


@njit(cache=True)
def bwd_rows_par(pdy, px, pmask, pdx, pst, pw, psdy, psdyx, A, C, B, count, do_dx, training,
                 threads, z):  # fmt: skip
    dy, x, mask, dx, mean, invstd, w, s_dy, s_dyx = _bwd_views(
        pdy, px, pmask, pdx, pst, pw, psdy, psdyx, A, C, B, do_dx, z)  # fmt: skip
    cl_bwd_par(dy, x, mask, dx, A, C, mean, invstd, w, s_dy, s_dyx, count, A >= 0, do_dx, training,
               threads)  # fmt: skip
