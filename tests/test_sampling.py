"""The compiled sampler: greedy == naive argmax loop and == transformers' generate, extend == full
prefill, log-probs == the scoring pass, top-p, stop masks, budgets, cache growth, no recompiles."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from retroact_jax import sampling, scoring, stops
from retroact_jax.models import convert
from retroact_jax.models.config import ModelConfig, tiny
from retroact_jax.models.decoder import Decoder, forward_fn, positions_from_mask

PROMPTS = [[5, 6, 7, 8, 9, 40, 41], [10, 11], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [77]]


@pytest.fixture(scope="module")
def model():
    return Decoder(tiny(), rngs=nnx.Rngs(0))


def _naive_greedy(model, prompts, n, width=32):
    """Argmax of full forwards (no cache) over a left-padded batch, one token at a time."""
    fwd = jax.jit(forward_fn, static_argnums=(0, 6))
    graphdef, params = nnx.split(model)
    seqs = [list(p) for p in prompts]
    for _ in range(n):
        tok, val = _left_pad(seqs, width)
        logits, _ = fwd(graphdef, params, tok, positions_from_mask(jnp.asarray(val)), val, None,
                        True)
        for s, t in zip(seqs, np.asarray(jnp.argmax(logits, -1))):
            s.append(int(t))
    return [s[len(p):] for s, p in zip(seqs, prompts)]


def _left_pad(seqs, width=None):
    t = width or max(map(len, seqs))
    tok = np.zeros((len(seqs), t), np.int32)
    val = np.zeros((len(seqs), t), bool)
    for i, s in enumerate(seqs):
        tok[i, t - len(s):], val[i, t - len(s):] = s, True
    return tok, val


def test_greedy_equals_naive_argmax_loop_and_logp_is_temperature_1(model):
    sampler = sampling.Sampler(model, eos_ids=())
    _, out = sampler.sample(PROMPTS, max_new_tokens=10)
    assert out.tokens_BxN.shape == (4, 10) and out.lengths_B.tolist() == [10] * 4
    assert out.tokens_BxN.tolist() == _naive_greedy(model, PROMPTS, 10)
    tok, val = _left_pad([p + list(o) for p, o in zip(PROMPTS, out.tokens_BxN)])
    ref = scoring.Scorer(model)(tok, val)[:, -10:]
    np.testing.assert_allclose(out.logp_BxN, ref, atol=1e-4)


def test_sampled_logp_equals_scoring_at_temperature_1(model):
    sampler = sampling.Sampler(model, eos_ids=())
    _, out = sampler.sample(PROMPTS, jax.random.key(7), max_new_tokens=16, temperature=1.0)
    assert len({tuple(r) for r in out.tokens_BxN}) == 4           # it does sample
    tok, val = _left_pad([p + list(o) for p, o in zip(PROMPTS, out.tokens_BxN)])
    ref = scoring.Scorer(model)(tok, val)[:, -16:]
    assert np.abs(out.logp_BxN - ref).max() <= 1e-4
    # a different key gives different samples; the same key the same ones
    _, again = sampler.sample(PROMPTS, jax.random.key(7), max_new_tokens=16, temperature=1.0)
    _, other = sampler.sample(PROMPTS, jax.random.key(8), max_new_tokens=16, temperature=1.0)
    assert (again.tokens_BxN == out.tokens_BxN).all()
    assert (other.tokens_BxN != out.tokens_BxN).any()


def test_top_p_to_zero_is_greedy_and_top_p_logp_is_renormalised(model):
    sampler = sampling.Sampler(model, eos_ids=())
    _, greedy = sampler.sample(PROMPTS, max_new_tokens=8)
    _, nucleus = sampler.sample(PROMPTS, jax.random.key(3), max_new_tokens=8, temperature=0.7,
                                top_p=1e-6)
    assert (nucleus.tokens_BxN == greedy.tokens_BxN).all()
    np.testing.assert_allclose(nucleus.logp_BxN, 0.0, atol=1e-6)   # the nucleus is one token
    # the nucleus mask against a numpy reference
    logits = np.random.default_rng(0).normal(size=(3, 50)).astype(np.float32) * 2
    got = np.asarray(sampling._nucleus(jnp.asarray(logits), jnp.float32(0.8)))
    for row, g in zip(logits, got):
        p = np.exp(row - row.max())
        p /= p.sum()
        order = np.argsort(-p)
        k = np.searchsorted(np.cumsum(p[order]), 0.8) + 1
        assert set(np.nonzero(np.isfinite(g))[0]) == set(order[:k])


def test_stop_mask_eos_and_budgets(model):
    sampler = sampling.Sampler(model, eos_ids=())
    _, free = sampler.sample(PROMPTS, max_new_tokens=12)
    row0 = free.tokens_BxN[0].tolist()
    j = next(j for j in range(2, 12) if row0[j] not in row0[:j])
    stop_tok = row0[j]                              # row 0 will stop at its (j+1)-th token
    first = [list(r).index(stop_tok) + 1 if stop_tok in r else 12 for r in free.tokens_BxN]
    stop = np.zeros((512,), bool)
    stop[stop_tok] = True
    budgets = [12, 1, 12, 0]
    _, out = sampler.sample(PROMPTS, max_new_tokens=budgets, stop_mask=stop)
    want = [min(f, b) for f, b in zip(first, budgets)]
    assert want[0] == j + 1 and out.lengths_B.tolist() == want
    for i, n in enumerate(want):
        assert out.tokens_BxN[i, :n].tolist() == free.tokens_BxN[i, :n].tolist()
        assert (out.tokens_BxN[i, n:] == 0).all() and (out.logp_BxN[i, n:] == 0).all()
    # the same token as an eos id
    _, eos = sampler.sample(PROMPTS, max_new_tokens=budgets, eos_ids=[stop_tok])
    assert eos.lengths_B.tolist() == want

    vocab = {i: ("a\nb" if i == 7 else "x" if i % 2 else "Obs") for i in range(20)}
    mask = sampling.stop_token_mask(vocab.__getitem__, 20, ["\n", "Ob"])
    assert np.nonzero(mask)[0].tolist() == [0, 2, 4, 6, 7, 8, 10, 12, 14, 16, 18]
    with pytest.raises(stops.StopError):
        sampling.stop_token_mask(vocab.__getitem__, 20, [""])


def _first_end(row, seq):
    """1 + index of the last token of ``seq``'s first occurrence in ``row`` (len(row) if none)."""
    n = len(seq)
    return next((j + n for j in range(len(row) - n + 1) if list(row[j:j + n]) == list(seq)), len(row))


def test_stop_sequences_end_rows_after_a_multi_token_match(model):
    sampler = sampling.Sampler(model, eos_ids=())
    _, free = sampler.sample(PROMPTS, max_new_tokens=16)
    row2 = free.tokens_BxN[2].tolist()
    seq = row2[5:8]                                  # a 3-token "stop string" row 2 emits
    other = free.tokens_BxN[1, 2:4].tolist()         # and a 2-token one from row 1
    want = [min(_first_end(r, seq), _first_end(r, other)) for r in free.tokens_BxN.tolist()]
    assert want[2] <= 8 and want[1] <= 4
    _, out = sampler.sample(PROMPTS, max_new_tokens=16, stop_seqs=[seq, other])
    assert out.lengths_B.tolist() == want
    for i, n in enumerate(want):
        assert out.tokens_BxN[i, :n].tolist() == free.tokens_BxN[i, :n].tolist()
    # the incremental path stops the same way, and one-token sequences act like the stop mask
    state = sampler.start(PROMPTS)
    _, inc = sampler.generate(state, None, 16, stop_seqs=[seq, other])
    assert inc.lengths_B.tolist() == want
    _, one = sampler.sample(PROMPTS, max_new_tokens=16, stop_seqs=[[row2[3]]])
    assert one.lengths_B[2] == row2.index(row2[3]) + 1
    with pytest.raises(sampling.SamplerError, match="stop_seqs"):
        sampler.sample(PROMPTS, max_new_tokens=4, stop_seqs=[list(range(sampling.MAX_STOP_LEN + 1))])
    with pytest.raises(sampling.SamplerError, match="outside"):
        sampler.sample(PROMPTS, max_new_tokens=4, stop_seqs=[[1, 10 ** 6]])


def test_stop_token_sequences_from_tokenizers():
    from retroact_jax.models import embedded
    from retroact_jax.testing import ByteTokenizer
    tok = ByteTokenizer()
    seqs = sampling.stop_token_sequences(tok.encode, tok.decode, ["Obs"])
    assert seqs == [tuple(tok.encode("Obs"))]       # bytes: every context drops to the same ids
    assert sampling.stop_token_sequences(tok.encode, tok.decode, ["\n"]) == []   # one token: the mask
    smol = embedded.load_tokenizer()                # SmolLM2's BPE: the agent's "Observation" stop
    seqs = sampling.stop_token_sequences(smol.encode, smol.decode, ["Observation"])
    assert seqs and all(len(q) >= 2 for q in seqs)
    for c in ("\n", " ", "", "."):                 # every spelling is caught by the mask or a sequence
        ids = smol.encode("Thought: x" + c + "Observation 1:")
        assert (any("Observation" in smol.decode([i]) for i in ids)
                or any(tuple(ids[j:j + len(q)]) == q for q in seqs for j in range(len(ids)))), c
    assert all("Observation" in smol.decode(list(q)) and "Observation" not in smol.decode(list(q[1:]))
               for q in seqs)


def _grown_episodes(model):
    """Three rounds of generate + extend over the four PROMPTS (the cache grows from 64 to 128 slots):
    the sampler, its state and each row's token history."""
    sampler = sampling.Sampler(model, eos_ids=(), length_buckets=(64, 128, 256))
    obs = [[100, 101, 102], [200], [], [300, 301, 302, 303, 304, 305, 306, 307, 308]]
    state = sampler.start(PROMPTS)
    assert state.cache.length == 64
    histories = [list(p) for p in PROMPTS]
    for _ in range(3):
        state, out = sampler.generate(state, max_new_tokens=[5, 9, 2, 6])
        for h, o, n in zip(histories, out.tokens_BxN, out.lengths_B):
            h.extend(o[:n].tolist())
        state = sampler.extend(state, obs)
        for h, o in zip(histories, obs):
            h.extend(o)
    return sampler, state, histories


def test_extend_then_decode_equals_decode_from_full_prefill(model):
    sampler, state, histories = _grown_episodes(model)
    assert state.cache.length == 128                   # grew past 64 slots by copying
    state, out = sampler.generate(state, max_new_tokens=6)
    fresh, ref = sampler.sample(histories, max_new_tokens=6)
    assert (out.tokens_BxN == ref.tokens_BxN).all()
    np.testing.assert_allclose(out.logp_BxN, ref.logp_BxN, atol=1e-4)
    np.testing.assert_allclose(np.asarray(state.last_logits_BxV)[:4],
                               np.asarray(fresh.last_logits_BxV)[:4], atol=1e-4)
    with pytest.raises(sampling.SamplerError, match="KV cache length"):
        sampler.extend(state, [[1] * 250] * 4)


def test_compact_drops_holes_and_keeps_the_continuation(model):
    """compact() moves each row's kept slots to the front of a smaller cache: generation goes on
    as from the uncompacted cache (and equals a full re-prefill of the kept tokens)."""
    sampler, state, histories = _grown_episodes(model)
    assert state.cache.length == 128 and int(state.cache.end) > max(map(len, histories))
    valid = np.asarray(state.cache.valid_BxS)
    keep = [np.flatnonzero(valid[i]).tolist() for i in range(4)]
    keep[2] = keep[2][:len(PROMPTS[2])]                   # row 2 also rolls back to its prompt
    small = sampler.compact(state, keep, reserve=8)
    assert small.cache.length == 64 and int(small.cache.end) == max(map(len, keep))
    assert np.asarray(small.cache.lengths()).tolist() == list(map(len, keep))
    histories[2] = list(PROMPTS[2])
    small = sampler.extend(small, [[], [], [9], []])      # fresh logits for the rolled-back row
    histories[2].append(9)
    small, out = sampler.generate(small, max_new_tokens=6)
    _, ref = sampler.sample(histories, max_new_tokens=6)
    assert (out.tokens_BxN == ref.tokens_BxN).all()
    np.testing.assert_allclose(out.logp_BxN, ref.logp_BxN, atol=1e-4)
    with pytest.raises(sampling.SamplerError, match="compact"):
        sampler.compact(small, keep[:3])
    with pytest.raises(sampling.SamplerError, match="outside"):
        sampler.compact(small, [[0], [1], [64], []])


def test_growth_and_compaction_copy_one_layer_at_a_time(model, monkeypatch):
    """Growing or compacting the cache frees each old layer as soon as its copy exists: the live
    arrays never hold more than the old cache plus one layer (a whole-cache copy held two caches:
    +3 GB at 16 rows x 4,096 slots of SmolLM2-135M), the old state is consumed, and the copy is
    the cache's (the compaction test above checks the continuation)."""
    sampler, state, histories = _grown_episodes(model)
    old = state.cache
    layer = old.k[0].nbytes
    base = sum(a.nbytes for a in jax.live_arrays())
    from retroact_jax import decode_segments
    peaks, layerwise = [], decode_segments.layerwise

    def watched(cache, fn, *args):
        def step(a, *xs):
            out = fn(a, *xs)
            out.block_until_ready()
            peaks.append(sum(x.nbytes for x in jax.live_arrays()) - base)
            return out
        return layerwise(cache, step, *args)
    monkeypatch.setattr(decode_segments, "layerwise", watched)
    ref_k = np.asarray(old.k[-1])
    valid = np.asarray(old.valid_BxS)
    keep = [np.flatnonzero(valid[i]).tolist() for i in range(4)]
    small = sampler.compact(state, keep, reserve=8)
    assert all(a.is_deleted() for a in old.k + old.v)
    np.testing.assert_array_equal(np.asarray(small.cache.k[-1])[1, :len(keep[1])], ref_k[1, keep[1]])
    grown = sampler._fit(small, 100)
    assert grown.cache.length == 128 and all(a.is_deleted() for a in small.cache.k + small.cache.v)
    assert len(peaks) == 4 * model.cfg.num_layers and max(peaks) <= layer + 4096


def test_long_extension_in_query_sub_chunks_equals_one_pass(model, monkeypatch):
    """An extension whose scores pass the budget runs as a scan over query sub-chunks: the same
    cache, positions and next-token logits as one pass (prefill, then an extension with holes)."""
    assert sampling.sub_chunk(32, 9, 1024, 4096) == 32 and sampling.sub_chunk(4, 9, 1024, 2048) == 512
    assert sampling.sub_chunk(1, 9, 40, 64, budget=1) == 10 and sampling.sub_chunk(1, 9, 48, 64, budget=1) == 12
    outs = []
    for budget in (sampling.SCORES_BUDGET, 1):          # 1 byte: every extension of > 16 tokens splits
        monkeypatch.setattr(sampling, "SCORES_BUDGET", budget)
        sampler = sampling.Sampler(model, eos_ids=(), chunk_buckets=(64,), length_buckets=(256,))
        state = sampler.start([list(range(3, 40)), [9, 10], list(range(50, 114))])
        state = sampler.extend(state, [[100, 101, 102], [], list(range(200, 240))])
        state, out = sampler.generate(state, max_new_tokens=4)
        outs.append((state, out))
    (s0, o0), (s1, o1) = outs
    assert sampling.TRACE_COUNTS["extend"] >= 2
    np.testing.assert_allclose(np.asarray(s1.last_logits_BxV), np.asarray(s0.last_logits_BxV), atol=1e-5)
    for a, b in zip(jax.tree.leaves(s1.cache), jax.tree.leaves(s0.cache)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    assert (o1.tokens_BxN == o0.tokens_BxN).all()


def test_no_recompile_within_buckets(model):
    sampler = sampling.Sampler(model, eos_ids=())
    sampler.sample(PROMPTS, max_new_tokens=10)
    state = sampler.start(PROMPTS[:3], reserve=100)
    state, _ = sampler.generate(state, max_new_tokens=10)
    state = sampler.extend(state, [[1, 2], [3], [4, 5, 6]])
    state, _ = sampler.generate(state, max_new_tokens=3)   # the 8-token bucket (so the test runs alone)
    before = dict(sampling.TRACE_COUNTS)
    # other prompts, batch 3 (same bucket of 4), other budgets <= 16, other temperature / top-p
    sampler.sample([[9] * 9, [8], [7] * 16], jax.random.key(1), max_new_tokens=[3, 16, 9],
                   temperature=0.8, top_p=0.9)
    state, _ = sampler.generate(state, jax.random.key(2), max_new_tokens=[12, 1, 5],
                                temperature=1.3)
    state = sampler.extend(state, [[7], [], [8, 8, 8, 8, 8]])
    state, _ = sampler.generate(state, max_new_tokens=3)
    sampler.set_params(jax.tree.map(lambda x: x * 1.0, sampler.params))
    state, _ = sampler.generate(state, max_new_tokens=3, min_new_tokens=[2, 0, 1])   # min_new_tokens: data
    sampler.sample([[9] * 9, [8], [7] * 16], jax.random.key(1), max_new_tokens=[3, 16, 9],
                   temperature=0.8, top_p=0.9, min_new_tokens=3)
    assert dict(sampling.TRACE_COUNTS) == before


def test_min_new_tokens_masks_stop_tokens_eos_and_sequences_first(model):
    """As vLLM's min_tokens: for the first n tokens no stop / EOS token is drawn and no sequence stops."""
    sampler = sampling.Sampler(model, eos_ids=())
    _, free = sampler.sample(PROMPTS, max_new_tokens=12)
    firsts = sorted({int(r[0]) for r in free.tokens_BxN})
    stop = np.zeros((512,), bool)
    stop[firsts] = True                          # every row's greedy first token is a stop token
    _, out0 = sampler.sample(PROMPTS, max_new_tokens=12, stop_mask=stop)
    assert out0.lengths_B.tolist() == [1] * 4
    _, out = sampler.sample(PROMPTS, max_new_tokens=12, stop_mask=stop, min_new_tokens=[1, 2, 0, 1])
    assert out.lengths_B[2] == 1 and all(out.lengths_B[i] >= n + 1 for i, n in ((0, 1), (1, 2), (3, 1)))
    logits = np.asarray(sampler.start(PROMPTS).last_logits_BxV)
    for i in (0, 1, 3):
        row = out.tokens_BxN[i].tolist()
        assert not stop[row[0]] and row[0] == int(np.argmax(np.where(stop, -np.inf, logits[i])))
        assert not any(stop[t] for t in row[:[1, 2, 0, 1][i]])
        # greedy log-probs stay the temperature-1 (unmasked) ones, what the scoring pass gives
        np.testing.assert_allclose(out.logp_BxN[i, 0], jax.nn.log_softmax(logits[i])[row[0]], atol=1e-4)
    # the same with the ids as EOS, and on the incremental path
    _, eos = sampler.sample(PROMPTS, max_new_tokens=12, eos_ids=firsts[:8], min_new_tokens=1)
    state = sampler.start(PROMPTS)
    _, inc = sampler.generate(state, None, 12, eos_ids=firsts[:8], min_new_tokens=1)
    assert eos.tokens_BxN.tolist() == inc.tokens_BxN.tolist() and all(not stop[r[0]] for r in eos.tokens_BxN)
    # at temperature 1 the first token is drawn outside the mask; its log-prob is the model's (= scoring)
    for seed in range(3):
        _, t1 = sampler.sample(PROMPTS, jax.random.key(seed), 12, temperature=1.0, stop_mask=stop, min_new_tokens=1)
        for i in range(4):
            t = int(t1.tokens_BxN[i, 0])
            assert not stop[t]
            np.testing.assert_allclose(t1.logp_BxN[i, 0], jax.nn.log_softmax(logits[i])[t], atol=1e-4)
    # a stop sequence completed inside the first n tokens does not end the row
    row = free.tokens_BxN[2].tolist()
    _, seq = sampler.sample(PROMPTS, max_new_tokens=12, stop_seqs=[row[:2]], min_new_tokens=2)
    _, seq0 = sampler.sample(PROMPTS, max_new_tokens=12, stop_seqs=[row[:2]])
    assert seq0.lengths_B[2] == 2 and seq.lengths_B[2] > 2
    with pytest.raises(sampling.SamplerError, match="min_new_tokens must be >= 0"):
        sampler.sample(PROMPTS, max_new_tokens=4, min_new_tokens=-1)


def test_sampler_rejects_bad_input(model):
    sampler = sampling.Sampler(model)
    with pytest.raises(sampling.SamplerError, match="empty"):
        sampler.sample([[1, 2], []])
    with pytest.raises(sampling.SamplerError, match="outside"):
        sampler.sample([[1, 9999]])
    with pytest.raises(sampling.SamplerError, match="top_p"):
        sampler.sample([[1, 2]], top_p=0.0)
    with pytest.raises(sampling.SamplerError, match="PRNG key"):
        sampler.sample([[1, 2]], temperature=1.0)
    with pytest.raises(sampling.SamplerError, match="one per row"):
        sampler.sample([[1, 2], [3]], max_new_tokens=[4, 5, 6])
    state = sampler.start([[1, 2]])
    with pytest.raises(sampling.SamplerError, match="rows"):
        sampler.extend(state, [[1], [2]])


def test_greedy_equals_transformers_generate():
    torch.manual_seed(0)
    hc = transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, initializer_range=0.2,
        max_position_embeddings=256, tie_word_embeddings=True, architectures=["LlamaForCausalLM"],
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    hf = transformers.LlamaForCausalLM(hc).eval()
    cfg = ModelConfig.from_hf(hc.to_dict())
    sampler = sampling.Sampler(convert.load_model(cfg, hf.state_dict()), eos_ids=())
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 512, n).tolist() for n in (13, 5, 21, 9)]
    _, out = sampler.sample(prompts, max_new_tokens=32)
    tok, val = _left_pad(prompts)
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(tok, dtype=torch.long),
                          attention_mask=torch.tensor(val.astype(np.int64)), do_sample=False,
                          max_new_tokens=32, min_new_tokens=32, pad_token_id=0,
                          eos_token_id=None)
    ref = ref[:, tok.shape[1]:].numpy()
    assert len({tuple(r) for r in ref}) == 4 and len(set(ref[0])) > 3   # not degenerate
    assert (out.tokens_BxN == ref).all()


@pytest.mark.real_weights
def test_smollm2_greedy_equals_transformers_generate():
    """The embedded SmolLM2-135M-Instruct: batch of 4 left-padded prompts, 32 greedy tokens."""
    from retroact_jax.models import embedded, gguf
    cfg, tensors = embedded.load_weights()
    tok = embedded.load_tokenizer()
    weights_dir = gguf.cache_dir_for(embedded.gguf_path()) / "weights"
    hf = transformers.AutoModelForCausalLM.from_pretrained(weights_dir, dtype=torch.float32).eval()
    texts = ["The capital of France is",
             "Thought: I need to search Colorado orogeny and find the area that the eastern "
             "sector extends into.\nAction:",
             "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
             "def fibonacci(n):"]
    prompts = [tok.encode(t) for t in texts]
    assert len(set(map(len, prompts))) == 4
    sampler = sampling.Sampler(convert.load_model(cfg, tensors), pad_id=tok.pad_id, eos_ids=())
    _, out = sampler.sample(prompts, max_new_tokens=32)
    ids, val = _left_pad(prompts)
    ids[~val] = tok.pad_id
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                          attention_mask=torch.tensor(val.astype(np.int64)), do_sample=False,
                          max_new_tokens=32, min_new_tokens=32, pad_token_id=tok.pad_id,
                          eos_token_id=None)
    ref = ref[:, ids.shape[1]:].numpy()
    for i in range(4):
        assert out.tokens_BxN[i].tolist() == ref[i].tolist(), (texts[i], tok.decode(ref[i]),
                                                               tok.decode(out.tokens_BxN[i]))


def test_segmented_decode_with_shrinking_batch_equals_one_call(model):
    """generate(segment=..) decodes a few steps at a time and moves the rows still running into a
    smaller batch: same greedy tokens, stops (incl. a stop sequence across segments) and log-probs
    as one call, and the state continues the same way."""
    sampler = sampling.Sampler(model, eos_ids=(), length_buckets=(64, 128, 256), new_token_buckets=(8, 16, 32, 64))
    prompts = [[5 + i, 6, 7 + 2 * i] for i in range(8)]
    _, probe = sampler.sample(prompts, max_new_tokens=30)
    stop = np.zeros((model.cfg.vocab_size,), bool)
    stop[[int(probe.tokens_BxN[i, 3 + i]) for i in range(0, 8, 2)]] = True   # some rows stop early
    seqs = [tuple(int(t) for t in probe.tokens_BxN[1, 9:11])]               # row 1: a 2-token sequence
    budgets = [30, 30, 12, 30, 5, 30, 0, 30]
    outs = []
    for segment in (0, 8):
        state = sampler.start(prompts, reserve=40)
        state, out = sampler.generate(state, max_new_tokens=budgets, stop_mask=stop, stop_seqs=seqs,
                                      min_new_tokens=2, segment=segment)
        state = sampler.extend(state, [[9, 9]] * 8)
        state, nxt = sampler.generate(state, max_new_tokens=6)
        outs.append((out, nxt, np.asarray(state.cache.lengths())))
    (a, a2, la), (b, b2, lb) = outs
    assert a.lengths_B.tolist() == b.lengths_B.tolist() and min(a.lengths_B[:6]) < 30
    assert (a.tokens_BxN == b.tokens_BxN).all() and (a2.tokens_BxN == b2.tokens_BxN).all()
    np.testing.assert_allclose(a.logp_BxN, b.logp_BxN, atol=1e-5)
    assert la.tolist() == lb.tolist()
    assert sampling.TRACE_COUNTS["take_rows"] >= 1 and sampling.TRACE_COUNTS["put_rows"] >= 1


def test_extend_plan_peels_the_few_long_additions():
    from retroact_jax import decode_segments
    bb, cb = (1, 2, 4, 8), (16, 64, 256, 1024)
    extend_plan = functools.partial(decode_segments.extend_plan, min_saved=0)
    # one long addition among short ones: 1 x 1024 + 8 x 16 tokens instead of 8 x 1024
    assert extend_plan([5, 300, 5, 5, 0, 5, 5, 5], 8, bb, cb) == [([1], 1024), (None, 16)]
    # two levels: the 1024 row, then the two 256 rows, then the rest
    assert extend_plan([5, 300, 100, 200, 5, 5, 5, 5], 8, bb, cb) == [([1], 1024), ([2, 3], 256), (None, 16)]
    assert extend_plan([300] * 5 + [5] * 3, 8, bb, cb) == [(None, 1024)]     # most rows are long
    assert extend_plan([20, 30, 40, 50], 4, bb, cb) == [(None, 64)]          # one chunk for all
    assert extend_plan([0, 0, 300, 0], 4, bb, cb) == [([2], 1024)]          # only it adds tokens
    # the default floor: a sub-batch must save MIN_SAVED_TOKENS (2048) token computations
    assert decode_segments.extend_plan([5, 300, 5, 5], 4, bb, cb) == [([1], 1024), (None, 16)]   # saves 3008
    assert decode_segments.extend_plan([5, 100, 5, 5], 4, bb, cb) == [(None, 256)]             # would save 704


def test_grouped_extension_equals_one_call(model, monkeypatch):
    """Sampler.extend with a few long additions (a new prompt among observations): the long rows
    go through a sub-batch first; every row's next-token logits and greedy continuation equal one
    whole-batch call's (the padding differs, the per-row math does not)."""
    from retroact_jax import decode_segments
    from retroact_jax.decode_segments import extend_plan
    monkeypatch.setattr(decode_segments, "MIN_SAVED_TOKENS", 0)        # the tiny model's tiny chunks
    sampler = sampling.Sampler(model, eos_ids=(), chunk_buckets=(8, 32, 128), length_buckets=(256, 512),
                               batch_buckets=(1, 2, 4, 8))
    prompts = [[5 + i, 6, 7 + 2 * i, 9] for i in range(8)]
    new = [[30 + i, 31] for i in range(8)]
    new[3] = list(range(100, 200))                                      # one long addition
    new[6] = []                                                         # one row adds nothing
    assert extend_plan(list(map(len, new)), 8, sampler.batch_buckets, sampler.chunk_buckets)[0] == ([3], 128)

    outs = []
    for extend in (lambda s: sampler.extend(s, new, grouped=False), lambda s: sampler.extend(s, new)):
        before = dict(sampling.TRACE_COUNTS)
        state = extend(sampler.start(prompts))
        state, out = sampler.generate(state, max_new_tokens=6)
        outs.append((np.asarray(state.last_logits_BxV), out, np.asarray(state.cache.lengths()),
                     {k: sampling.TRACE_COUNTS[k] - before.get(k, 0) for k in ("take_rows", "put_rows")}))
    (l0, o0, n0, _), (l1, o1, n1, traced) = outs
    assert (o1.tokens_BxN == o0.tokens_BxN).all() and n1.tolist() == n0.tolist()
    np.testing.assert_allclose(o1.logp_BxN, o0.logp_BxN, atol=1e-5)
    np.testing.assert_allclose(l1, l0, atol=1e-5)
    assert traced["take_rows"] >= 1 and traced["put_rows"] >= 1      # the sub-batch path ran (first trace)


def test_a_grouped_extension_that_would_overflow_the_largest_cache_is_one_call(model, monkeypatch):
    """Near the largest cache bucket (512) the groups' extra slots (128 + 32 from 360) do not fit
    while one call's (128) do: ``Sampler.extend`` makes one call, with one call's results."""
    from retroact_jax import decode_segments
    monkeypatch.setattr(decode_segments, "MIN_SAVED_TOKENS", 0)
    sampler = sampling.Sampler(model, eos_ids=(), chunk_buckets=(8, 32, 128), length_buckets=(256, 512),
                               batch_buckets=(1, 2, 4, 8))
    prompts = [[5 + i, 6, 7 + 2 * i, 9] for i in range(8)]
    new = [[30 + i] * 20 for i in range(8)]
    new[3] = list(range(100, 200))
    assert sum(c for _, c in decode_segments.extend_plan(
        list(map(len, new)), 8, sampler.batch_buckets, sampler.chunk_buckets)) == 160
    outs = []
    for grouped in (False, True):
        state = sampler.start(prompts, reserve=500)                        # end 8, 512 slots
        for n in (100, 100, 20, 20, 20):                                    # end 8 + 2 x 128 + 3 x 32 = 360
            state = sampler.extend(state, [[11] * n] * 8)
        assert int(state.cache.end) == 360
        state = sampler.extend(state, new, grouped=grouped)
        outs.append((np.asarray(state.last_logits_BxV), int(state.cache.end), state.cache.length))
    assert outs[1][1:] == outs[0][1:] == (488, 512)
    np.testing.assert_allclose(outs[1][0], outs[0][0], atol=1e-5)
