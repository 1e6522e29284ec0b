"""Attention implementations for the decoder, chosen by ``ModelConfig.attention``.

All take pre-scaled queries ``q_BxTxKxGxH`` (head ``n = k * G + g``, HF's ``repeat_kv`` order), keys
and values ``[B, S, K, H]`` and a ``Mask``, and return ``[B, T, K*G*H]`` in the compute dtype. The
mask is never stored as [T, S] scores: query ``t`` (at cache slot ``qslot_T[t]``) sees key ``s`` iff
``s <= qslot_T[t]`` and ``kvalid_BxS[b, s]``, and, for packed rows (several samples in one row,
``batching.pack_rows``; no cache, so S = T), ``segment_BxS[b, t] == segment_BxS[b, s]``: a sample
never sees another one. Scores and softmax are float32 in every form.

* ``default``: two batched GEMMs over full [B, K, G*T, S] float32 scores (fastest on this CPU; the
  layouts are chosen for XLA:CPU, bench/README.md). Memory O(T * S) per layer, kept for backward.
* ``dot_product``: ``jax.nn.dot_product_attention`` with ``implementation="cudnn"`` (the cuDNN flash
  kernel) on GPU for bfloat16/float16, ``"xla"`` elsewhere (which, like ``default``, materialises the
  scores). The mask goes in as a boolean [B, 1, T, S] array.
* ``blockwise``: online softmax over key blocks inside a map over query blocks (``block`` tokens
  each), with a custom VJP that saves only the output and the log-sum-exp and recomputes the block
  scores in the backward (flash-attention style). Peak extra memory O(block^2) per (batch, head), on
  any backend. Query rows that see no key (padding) give the mean of all values, as ``default``; no
  gradient flows through such rows (their cotangent is zero in any masked loss).

One-query steps without a cache use ``attend_one`` in ``default`` and ``blockwise`` (the [B, K, G, S]
scores of one query are small); ``dot_product`` uses XLA's form there (cuDNN is for prefill/training).

With a cache (T new tokens written at ``[end, end + T)`` of an S-slot cache) the decoder calls
``attend_cached``: in ``default`` and ``blockwise``, ``attend_prefix`` (T > 1) and
``attend_one_prefix`` (decode) visit only the key blocks up to ``end + T`` (loops with a traced
trip count, forward only); ``dot_product`` scores every slot as before. The cache is
sized for the longest row plus the decode budget, so most of its slots are still empty during an
extension: scoring them all made a 2,048-token prefill into a 4,096-slot cache run at half the rate
of one into 2,048 slots (bench/cache_attention.py, bench/README.md).
"""
from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("default", "dot_product", "blockwise")
_NEG = -1e30   # finite "minus infinity": fully masked rows (padding queries) stay NaN-free
_F32 = jnp.float32


@flax.struct.dataclass
class Mask:
    qslot_T: jax.Array      # int32 [T]: the cache slot of each query (its own index without cache)
    kvalid_BxS: jax.Array   # bool [B, S]: valid key slots
    segment_BxS: jax.Array | None = None   # int32 [B, S]: packed sample of each slot (None: one per row)

    def full(self):
        """The boolean [B, T, S] mask (what ``default`` and ``dot_product`` use)."""
        s_idx = jnp.arange(self.kvalid_BxS.shape[1], dtype=jnp.int32)
        m = (s_idx[None, None, :] <= self.qslot_T[None, :, None]) & self.kvalid_BxS[:, None, :]
        if self.segment_BxS is not None:
            seg = self.segment_BxS
            m = m & (seg[:, :, None] == seg[:, None, :])
        return m


def attend(impl: str, q_BxTxKxGxH, k_BxSxKxH, v_BxSxKxH, mask: Mask, full_BxTxS=None,
           block: int = 512):
    """Dispatch on ``impl``; ``full_BxTxS`` is ``mask.full()`` computed once per forward (or None)."""
    t = q_BxTxKxGxH.shape[1]
    full = full_BxTxS if full_BxTxS is not None else (None if impl == "blockwise" else mask.full())
    if impl == "dot_product":
        return attend_dot_product(q_BxTxKxGxH, k_BxSxKxH, v_BxSxKxH, full)
    if t == 1:
        return attend_one(q_BxTxKxGxH, k_BxSxKxH, v_BxSxKxH, mask.full() if full is None else full)
    if impl == "blockwise":
        return attend_blockwise(q_BxTxKxGxH, k_BxSxKxH, v_BxSxKxH, mask.qslot_T, mask.kvalid_BxS,
                                block, mask.segment_BxS)
    if impl == "default":
        return attend_many(q_BxTxKxGxH, k_BxSxKxH, v_BxSxKxH, full)
    raise ValueError(f"attention implementation {impl!r}: choose one of {IMPLEMENTATIONS}")


# --------------------------------------------------------------------------------------- default
def attend_one(q_Bx1xKxGxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xS):
    """Attention of one query per row over the cache in its own [B, S, K, H] layout.

    Batch > 1: broadcast-multiply + reductions. A ``dot_general`` here makes XLA:CPU transpose
    the whole cache to [B, K, S, H] first (batch dims major) at every decode step: 2x slower at
    batch 32. Batch 1: that transpose is small and the two dots beat the reductions (a SmolLM2
    decode step 33 vs 43 ms on the 2-core CPU, bench/README.md)."""
    if q_Bx1xKxGxH.shape[0] == 1:
        return _attend_one_dots(q_Bx1xKxGxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xS)
    return _attend_one_reduce(q_Bx1xKxGxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xS)


def _attend_one_dots(q_Bx1xKxGxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xS):
    b = q_Bx1xKxGxH.shape[0]
    s = jnp.einsum("bkgh,bskh->bkgs", q_Bx1xKxGxH[:, 0], k_BxSxKxH).astype(_F32)
    s = jnp.where(mask_Bx1xS[:, 0][:, None, None, :], s, _NEG)
    p = jax.nn.softmax(s, axis=-1).astype(v_BxSxKxH.dtype)
    return jnp.einsum("bkgs,bskh->bkgh", p, v_BxSxKxH).reshape(b, 1, -1)


def _attend_one_reduce(q_Bx1xKxGxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xS):
    q = q_Bx1xKxGxH[:, 0][:, None, :, :, :]                                  # [B, 1, K, G, H]
    s = jnp.sum((k_BxSxKxH[:, :, :, None, :] * q).astype(_F32), axis=-1)     # [B, S, K, G]
    s = jnp.where(mask_Bx1xS[:, 0][:, :, None, None], s, _NEG)
    p = jax.nn.softmax(s, axis=1).astype(v_BxSxKxH.dtype)
    o = jnp.sum(p[..., None] * v_BxSxKxH[:, :, :, None, :], axis=1)          # [B, K, G, H]
    b, k, g, h = o.shape
    return o.reshape(b, 1, k * g * h)


def attend_many(q_BxTxKxGxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS):
    """T queries per row (prefill, extension, training) as two batched GEMMs over (b, kv head):
    q -> [B, K, G*T, H] and k, v -> [B, K, S, H] first (small copies), so the [.., G*T, S] scores
    come out with S minor and softmax + the second GEMM need no transpose. A plain
    ``einsum("btkgh,bskh->bkgts")`` lets XLA:CPU pick a layout that transposes the scores (the
    largest tensor) several times: 1.5-2x slower forward and backward (bench/README.md)."""
    b, t, nk, g, h = q_BxTxKxGxH.shape
    s_len = k_BxSxKxH.shape[1]
    q = q_BxTxKxGxH.transpose(0, 2, 3, 1, 4).reshape(b, nk, g * t, h)
    k = k_BxSxKxH.transpose(0, 2, 1, 3)
    v = v_BxSxKxH.transpose(0, 2, 1, 3)
    s = jnp.einsum("bkxh,bksh->bkxs", q, k).astype(_F32).reshape(b, nk, g, t, s_len)
    s = jnp.where(mask_BxTxS[:, None, None, :, :], s, _NEG)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype).reshape(b, nk, g * t, s_len)
    o = jnp.einsum("bkxs,bksh->bkxh", p, v).reshape(b, nk, g, t, h)
    return o.transpose(0, 3, 1, 2, 4).reshape(b, t, nk * g * h)


def attend_cached(impl: str, q_BxTxKxGxH, k_BxSxKxH, v_BxSxKxH, mask: Mask, full_BxTxS=None,
                  block: int = 512):
    """Attention of T queries written at the cache slots ``mask.qslot_T`` (consecutive) over the
    updated cache: ``attend_one`` / ``dot_product`` as ``attend``, else ``attend_prefix``."""
    if impl == "dot_product":
        return attend(impl, q_BxTxKxGxH, k_BxSxKxH, v_BxSxKxH, mask, full_BxTxS, block)
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {impl!r}: choose one of {IMPLEMENTATIONS}")
    if q_BxTxKxGxH.shape[1] == 1:
        return attend_one_prefix(q_BxTxKxGxH, k_BxSxKxH, v_BxSxKxH, mask.qslot_T, mask.kvalid_BxS)
    return attend_prefix(q_BxTxKxGxH, k_BxSxKxH, v_BxSxKxH, mask.qslot_T, mask.kvalid_BxS, block)


def scored_slots(impl: str, s_len: int, block: int) -> int:
    """Key slots one pass of ``attend_cached`` scores per query with T > 1 (what bounds its [B, heads,
    T, .] float32 scores): a key block of ``attend_prefix``, or the whole cache for ``dot_product``."""
    return s_len if impl == "dot_product" else key_block(s_len, block)


def key_block(s_len: int, block: int) -> int:
    """The largest divisor of ``s_len`` that is <= ``block``, or ``s_len`` when that is below
    ``block // 4`` (an awkward cache length gets one block rather than many tiny ones)."""
    if s_len <= block:
        return s_len
    bk = next(d for d in range(block, 0, -1) if s_len % d == 0)
    return bk if 4 * bk >= block else s_len


def attend_prefix(q_BxTxKxGxH, k_BxSxKxH, v_BxSxKxH, qslot_T, kvalid_BxS, block: int = 512):
    """Queries at the consecutive slots ``qslot_T`` over keys ``[0, qslot_T[-1] + 1)`` only: a loop
    over key blocks (``key_block`` slots) with a traced trip count and an online softmax, each
    block's scores as ``attend_many``'s two GEMMs. Forward only (a while loop has no VJP). Queries
    that see no key give the mean of the visited values (padding; no valid query reads them)."""
    b, t, nk, g, h = q_BxTxKxGxH.shape
    s_len = k_BxSxKxH.shape[1]
    bk = key_block(s_len, block)
    q = q_BxTxKxGxH.transpose(0, 2, 3, 1, 4).reshape(b, nk, g * t, h)
    n_blocks = (qslot_T[-1] + bk) // bk                          # covers slots [0, qslot_T[-1]]

    def body(i, carry):
        m_i, l_i, acc = carry                                    # [B, K, G, T] x2, [B, K, G*T, H]
        start = i * bk
        kb = jax.lax.dynamic_slice_in_dim(k_BxSxKxH, start, bk, axis=1).transpose(0, 2, 1, 3)
        vb = jax.lax.dynamic_slice_in_dim(v_BxSxKxH, start, bk, axis=1).transpose(0, 2, 1, 3)
        ok = jax.lax.dynamic_slice_in_dim(kvalid_BxS, start, bk, axis=1)
        slot = start + jnp.arange(bk, dtype=jnp.int32)
        msk = (slot[None, :] <= qslot_T[:, None])[None, None, None] & ok[:, None, None, None, :]
        s = jnp.einsum("bkxh,bkch->bkxc", q, kb).astype(_F32).reshape(b, nk, g, t, bk)
        s = jnp.where(msk, s, _NEG)
        m_new = jnp.maximum(m_i, jnp.max(s, axis=-1))
        corr = jnp.exp(m_i - m_new)
        p = jnp.exp(s - m_new[..., None])
        pv = jnp.einsum("bkxc,bkch->bkxh", p.astype(vb.dtype).reshape(b, nk, g * t, bk), vb,
                        preferred_element_type=_F32)
        acc = acc * corr.reshape(b, nk, g * t)[..., None] + pv
        return m_new, l_i * corr + jnp.sum(p, axis=-1), acc

    init = (jnp.full((b, nk, g, t), _NEG, _F32), jnp.zeros((b, nk, g, t), _F32),
            jnp.zeros((b, nk, g * t, h), _F32))
    _, l_i, acc = jax.lax.fori_loop(0, n_blocks, body, init)
    o = (acc / l_i.reshape(b, nk, g * t)[..., None]).astype(q_BxTxKxGxH.dtype)
    return o.reshape(b, nk, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, nk * g * h)


DECODE_BLOCK = 256   # key block of a decode step (256 beat 128 and 512 at batch 1-16 on this CPU)


def attend_one_prefix(q_Bx1xKxGxH, k_BxSxKxH, v_BxSxKxH, qslot_T, kvalid_BxS, block: int = DECODE_BLOCK):
    """One query per row (a decode step) at slot ``qslot_T[0]`` over the key blocks up to it only
    (loops with a traced trip count). Batch 1: an online softmax over blocks, two dots each. Batch
    > 1: two passes in the cache's own layout (``attend_one``'s broadcast-multiply + reductions per
    block): scores of the visited blocks into a [B, S, K, G] buffer, one masked softmax, then the
    probability-weighted values block by block. Both beat ``attend_one`` over the whole cache even
    when every block is visited (blocks stay in cache); with half the slots still empty, 2-4x."""
    b, _, nk, g, h = q_Bx1xKxGxH.shape
    s_len = k_BxSxKxH.shape[1]
    bk = key_block(s_len, block)
    q = q_Bx1xKxGxH[:, 0]                                                     # [B, K, G, H]
    qslot = qslot_T[0]
    n_blocks = (qslot + bk) // bk
    kv_block = lambda a, start: jax.lax.dynamic_slice_in_dim(a, start, bk, axis=1)  # noqa: E731
    if b == 1:
        def body(i, carry):
            m_i, l_i, acc = carry                                # [B, K, G] x2, [B, K, G, H]
            start = i * bk
            ok = kv_block(kvalid_BxS, start) & (start + jnp.arange(bk, dtype=jnp.int32) <= qslot)[None]
            s = jnp.einsum("bkgh,bskh->bkgs", q, kv_block(k_BxSxKxH, start)).astype(_F32)
            s = jnp.where(ok[:, None, None, :], s, _NEG)
            m_new = jnp.maximum(m_i, jnp.max(s, axis=-1))
            p = jnp.exp(s - m_new[..., None])
            pv = jnp.einsum("bkgs,bskh->bkgh", p.astype(v_BxSxKxH.dtype), kv_block(v_BxSxKxH, start),
                            preferred_element_type=_F32)
            corr = jnp.exp(m_i - m_new)
            return m_new, l_i * corr + jnp.sum(p, axis=-1), acc * corr[..., None] + pv

        init = (jnp.full((b, nk, g), _NEG, _F32), jnp.zeros((b, nk, g), _F32),
                jnp.zeros((b, nk, g, h), _F32))
        _, l_i, acc = jax.lax.fori_loop(0, n_blocks, body, init)
        return (acc / l_i[..., None]).astype(q.dtype).reshape(b, 1, nk * g * h)

    def scores(i, s_BxSxKxG):
        kb = kv_block(k_BxSxKxH, i * bk)
        s = jnp.sum((kb[:, :, :, None, :] * q[:, None]).astype(_F32), axis=-1)     # [B, bk, K, G]
        return jax.lax.dynamic_update_slice_in_dim(s_BxSxKxG, s, i * bk, axis=1)

    s = jax.lax.fori_loop(0, n_blocks, scores, jnp.full((b, s_len, nk, g), _NEG, _F32))
    ok = kvalid_BxS & (jnp.arange(s_len, dtype=jnp.int32) <= qslot)[None, :]
    p = jax.nn.softmax(jnp.where(ok[:, :, None, None], s, _NEG), axis=1).astype(v_BxSxKxH.dtype)

    def values(i, acc):
        pb = kv_block(p, i * bk)
        return acc + jnp.sum(pb[..., None] * kv_block(v_BxSxKxH, i * bk)[:, :, :, None, :], axis=1)

    o = jax.lax.fori_loop(0, n_blocks, values, jnp.zeros((b, nk, g, h), v_BxSxKxH.dtype))
    return o.reshape(b, 1, nk * g * h)


# ----------------------------------------------------------------------------------- dot_product
def dot_product_backend(dtype) -> str:
    """``cudnn`` on GPU for half-precision compute (its kernels take no float32), else ``xla``."""
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if jax.default_backend() == "gpu" and half else "xla"


def attend_dot_product(q_BxTxKxGxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS):
    b, t, nk, g, h = q_BxTxKxGxH.shape
    impl = dot_product_backend(q_BxTxKxGxH.dtype) if t > 1 else "xla"
    o = jax.nn.dot_product_attention(q_BxTxKxGxH.reshape(b, t, nk * g, h), k_BxSxKxH, v_BxSxKxH,
                                     mask=mask_BxTxS[:, None, :, :], scale=1.0, implementation=impl)
    return o.reshape(b, t, nk * g * h)


# ------------------------------------------------------------------------------------- blockwise
def _blocks(n: int, block: int) -> tuple[int, int]:
    """(block length, number of blocks) covering n (the last block padded)."""
    bl = min(block, n)
    return bl, -(-n // bl)


def attend_blockwise(q_BxTxKxGxH, k_BxSxKxH, v_BxSxKxH, qslot_T, kvalid_BxS, block: int = 512,
                     segment_BxS=None):
    """``segment_BxS`` (packed rows, S = T): a query sees keys of its own segment only."""
    b, t, nk, g, h = q_BxTxKxGxH.shape
    s_len = k_BxSxKxH.shape[1]
    bq, nq = _blocks(t, block)
    bk, nkb = _blocks(s_len, block)
    # blocks first: q [nq, B, K, G, bq, H]; k, v [nkb, B, K, bk, H]; padded queries see no key
    q = jnp.pad(q_BxTxKxGxH, ((0, 0), (0, nq * bq - t), (0, 0), (0, 0), (0, 0)))
    q = q.reshape(b, nq, bq, nk, g, h).transpose(1, 0, 3, 4, 2, 5)
    kv_pad = ((0, 0), (0, nkb * bk - s_len), (0, 0), (0, 0))
    k = jnp.pad(k_BxSxKxH, kv_pad).reshape(b, nkb, bk, nk, h).transpose(1, 0, 3, 2, 4)
    v = jnp.pad(v_BxSxKxH, kv_pad).reshape(b, nkb, bk, nk, h).transpose(1, 0, 3, 2, 4)
    qs = jnp.pad(qslot_T.astype(jnp.int32), (0, nq * bq - t), constant_values=-1).reshape(nq, bq)
    kok = jnp.pad(kvalid_BxS, ((0, 0), (0, nkb * bk - s_len))).reshape(b, nkb, bk).transpose(1, 0, 2)
    ks = jnp.arange(nkb * bk, dtype=jnp.int32).reshape(nkb, bk)
    seg = None
    if segment_BxS is not None:      # (query segments [nq, B, bq], key segments [nkb, B, bk])
        sq = jnp.pad(segment_BxS, ((0, 0), (0, nq * bq - t)), constant_values=-1)
        sk = jnp.pad(segment_BxS, ((0, 0), (0, nkb * bk - s_len)), constant_values=-2)
        seg = (sq.reshape(b, nq, bq).transpose(1, 0, 2), sk.reshape(b, nkb, bk).transpose(1, 0, 2))
    o = _flash(q, k, v, qs, kok, ks, seg)                                        # [nq, B, K, G, bq, H]
    o = o.transpose(1, 0, 4, 2, 3, 5).reshape(b, nq * bq, nk * g * h)
    return o[:, :t]


def _block_scores(qb, kb, qs_q, ks_c, kok_Bxc, sq_Bxq=None, sk_Bxc=None):
    """Masked float32 scores [B, K, G, bq, bk] of one (query block, key block) pair, and the mask.
    ``sq_Bxq`` / ``sk_Bxc``: the blocks' segment ids (packed rows), or None."""
    s = jnp.einsum("bkgqh,bkch->bkgqc", qb, kb, preferred_element_type=_F32)
    m = (ks_c[None, :] <= qs_q[:, None])[None, None, None] & kok_Bxc[:, None, None, None, :]
    if sq_Bxq is not None:
        m = m & (sq_Bxq[:, :, None] == sk_Bxc[:, None, :])[:, None, None]
    return jnp.where(m, s, _NEG), m


def _forward(q, k, v, qs, kok, ks, seg):
    sq, sk = seg if seg is not None else (None, None)

    def one_qblock(args):
        qb, qs_q, sq_b = args

        def body(carry, xs):
            m_i, l_i, acc = carry
            kb, vb, kok_b, ks_c, sk_b = xs
            s, _ = _block_scores(qb, kb, qs_q, ks_c, kok_b, sq_b, sk_b)
            m_new = jnp.maximum(m_i, jnp.max(s, axis=-1))
            corr = jnp.exp(m_i - m_new)
            p = jnp.exp(s - m_new[..., None])
            l_new = l_i * corr + jnp.sum(p, axis=-1)
            pv = jnp.einsum("bkgqc,bkch->bkgqh", p.astype(vb.dtype), vb, preferred_element_type=_F32)
            return (m_new, l_new, acc * corr[..., None] + pv), None

        shp = qb.shape[:-1]
        init = (jnp.full(shp, _NEG, _F32), jnp.zeros(shp, _F32), jnp.zeros(qb.shape, _F32))
        (m_i, l_i, acc), _ = jax.lax.scan(body, init, (k, v, kok, ks, sk))
        return (acc / l_i[..., None]).astype(qb.dtype), m_i + jnp.log(l_i)

    return jax.lax.map(one_qblock, (q, qs, sq))


@jax.custom_vjp
def _flash(q, k, v, qs, kok, ks, seg):
    return _forward(q, k, v, qs, kok, ks, seg)[0]


def _flash_fwd(q, k, v, qs, kok, ks, seg):
    o, lse = _forward(q, k, v, qs, kok, ks, seg)
    return o, (q, k, v, qs, kok, ks, seg, o, lse)


def _flash_bwd(res, do):
    q, k, v, qs, kok, ks, seg, o, lse = res
    sq, sk = seg if seg is not None else (None, None)
    delta = jnp.sum(do.astype(_F32) * o.astype(_F32), axis=-1)              # [nq, B, K, G, bq]

    def probs(qb, kb, qs_q, ks_c, kok_b, lse_b, sq_b, sk_b):
        s, m = _block_scores(qb, kb, qs_q, ks_c, kok_b, sq_b, sk_b)
        return jnp.where(m, jnp.exp(s - lse_b[..., None]), 0.0)            # [B, K, G, bq, bk]

    def dq_block(args):                      # dq of one query block: scan over key blocks
        qb, qs_q, dob, lse_b, dl_b, sq_b = args

        def body(dq, xs):
            kb, vb, kok_b, ks_c, sk_b = xs
            p = probs(qb, kb, qs_q, ks_c, kok_b, lse_b, sq_b, sk_b)
            dp = jnp.einsum("bkgqh,bkch->bkgqc", dob, vb, preferred_element_type=_F32)
            ds = p * (dp - dl_b[..., None])
            return dq + jnp.einsum("bkgqc,bkch->bkgqh", ds.astype(kb.dtype), kb,
                                   preferred_element_type=_F32), None

        dq, _ = jax.lax.scan(body, jnp.zeros(qb.shape, _F32), (k, v, kok, ks, sk))
        return dq.astype(qb.dtype)

    def dkv_block(args):                     # dk, dv of one key block: scan over query blocks
        kb, vb, kok_b, ks_c, sk_b = args

        def body(carry, xs):
            dk, dv = carry
            qb, qs_q, dob, lse_b, dl_b, sq_b = xs
            p = probs(qb, kb, qs_q, ks_c, kok_b, lse_b, sq_b, sk_b)
            dv = dv + jnp.einsum("bkgqc,bkgqh->bkch", p.astype(dob.dtype), dob,
                                 preferred_element_type=_F32)
            dp = jnp.einsum("bkgqh,bkch->bkgqc", dob, vb, preferred_element_type=_F32)
            ds = p * (dp - dl_b[..., None])
            dk = dk + jnp.einsum("bkgqc,bkgqh->bkch", ds.astype(qb.dtype), qb,
                                 preferred_element_type=_F32)
            return (dk, dv), None

        zeros = jnp.zeros(kb.shape, _F32)
        (dk, dv), _ = jax.lax.scan(body, (zeros, zeros), (q, qs, do, lse, delta, sq))
        return dk.astype(kb.dtype), dv.astype(vb.dtype)

    dq = jax.lax.map(dq_block, (q, qs, do, lse, delta, sq))
    dk, dv = jax.lax.map(dkv_block, (k, v, kok, ks, sk))
    return dq, dk, dv, None, None, None, None if seg is None else jax.tree.map(lambda _: None, seg)


_flash.defvjp(_flash_fwd, _flash_bwd)


@functools.lru_cache(maxsize=None)
def remat_policy(name: str):
    """``jax.checkpoint`` policy of ``ModelConfig.remat`` (None = no rematerialisation)."""
    policies = {"none": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                "full": jax.checkpoint_policies.nothing_saveable, "layer": None}   # layer: recompute.py
    if name not in policies:
        raise ValueError(f"remat {name!r}: choose one of {tuple(policies)}")
    return policies[name]
