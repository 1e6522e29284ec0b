"""LMPolicy over the real sampler: the incremental KV cache (LCP rollback + extend) gives exactly the
completions of a full re-prefill, across steps, discards, episode ends and row reuse. A toy
tokenizer with merges ("\\n\\n", "Ob") makes span boundaries re-tokenise, forcing rollbacks."""
import numpy as np
import pytest
from flax import nnx

from retroact_jax import sampling
from retroact_jax.agent.lm_policy import LMPolicy
from retroact_jax.agent.policy import Request
from retroact_jax.agent.spans import Span
from retroact_jax.models.config import tiny
from retroact_jax.models.decoder import Decoder


class ToyTokenizer:
    """Greedy longest match over printable ASCII, "\\n" and a few merges; no BOS."""
    MERGES = ["\n\n", "Ob", "Th", " t", "ion", ": "]

    def __init__(self):
        self.vocab = ["<pad>", "<bos>", "<eos>"] + self.MERGES + [chr(c) for c in range(32, 127)] + ["\n"]
        self.index = {t: i for i, t in enumerate(self.vocab)}
        self.vocab_size = len(self.vocab)

    def encode(self, text):
        out, i = [], 0
        while i < len(text):
            for t in sorted(self.MERGES, key=len, reverse=True) + [text[i]]:
                if text.startswith(t, i):
                    out.append(self.index.get(t, self.index["?"]))
                    i += len(t)
                    break
        return out

    def decode(self, ids):
        return "".join(self.vocab[i] if i >= 3 else "" for i in ids)

    def token_texts(self):
        return tuple(self.vocab)


@pytest.fixture(scope="module")
def sampler_tok():
    tok = ToyTokenizer()
    cfg = tiny(vocab_size=tok.vocab_size, max_position_embeddings=2048)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    return sampling.Sampler(model, pad_id=0, batch_buckets=(4, 8), chunk_buckets=(32, 128, 512),
                            length_buckets=(256, 512, 1024, 2048), new_token_buckets=(16,)), tok


def test_incremental_cache_equals_reprefill(sampler_tok):
    sampler, tok = sampler_tok
    inc, ref = LMPolicy(sampler, tok), LMPolicy(sampler, tok, incremental=False)
    ctx = {k: [Span("prompt", f"Question {k}: what is {k}?")] for k in range(3)}
    for step in range(5):
        keys = [k for k in sorted(ctx) if not (k == 2 and step == 2)]   # a row that sits out
        reqs = [Request(k, list(ctx[k])) for k in keys]
        a = inc.generate(reqs, ["\n"], 10, 0.0)
        b = ref.generate(reqs, ["\n"], 10, 0.0)
        for k, x, y in zip(keys, a, b):
            assert x.token_ids == y.token_ids and x.text == y.text
            np.testing.assert_allclose(x.logprobs, y.logprobs, atol=2e-4)
            if step == 3 and k == 1:
                continue                                   # discarded completion: not appended
            ctx[k].append(Span("generated", x.text, x.token_ids, x.logprobs))
            ctx[k].append(Span("observation", f"\nObservation {step}: ok\nThought {step + 1}:"))
        if step == 1:                                      # episode 0 ends; a new one takes its row
            inc.release([0])
            del ctx[0]
            ctx[7] = [Span("prompt", "A new episode starts here.")]
    assert inc.stats["reused_tokens"] > inc.stats["prefill_tokens"] / 2
    assert inc.stats["rolled_back"] > 0


def test_a_new_episode_reuses_a_released_rows_shared_prefix(sampler_tok):
    """Episodes whose prompts start with the same instructions / exemplars: a new episode takes the
    released row sharing the longest prefix and computes only the rest; its completions equal a full
    re-prefill's, and the other rows are untouched."""
    sampler, tok = sampler_tok
    shared = "Solve the task. Example: Thought: look\nAction: go\n\n"
    inc, ref = LMPolicy(sampler, tok), LMPolicy(sampler, tok, incremental=False)
    ctx = {"a": [Span("prompt", shared + "Question: red?")], "b": [Span("prompt", "Other: blue?")]}
    for k in ("a", "b"):
        out = inc.generate([Request(k, ctx[k])], ["\n"], 6, 0.0)[0]
        ctx[k].append(Span("generated", out.text, out.token_ids, out.logprobs))
    row_a = next(i for i, r in enumerate(inc.rows) if r.key == "a")
    inc.release(["a", "b"])
    before = dict(inc.stats)
    ctx["c"] = [Span("prompt", shared + "Question: green?")]
    reqs = [Request("c", ctx["c"])]
    a, b = inc.generate(reqs, ["\n"], 8, 0.0)[0], ref.generate(reqs, ["\n"], 8, 0.0)[0]
    assert (a.text, a.token_ids) == (b.text, b.token_ids)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=2e-4)
    assert next(i for i, r in enumerate(inc.rows) if r.key == "c") == row_a     # the row with the prefix
    prefix = len(tok.encode(shared + "Question: "))
    assert inc.stats["reused_tokens"] - before["reused_tokens"] >= prefix
    assert inc.stats["prefill_tokens"] - before["prefill_tokens"] <= len(tok.encode(ctx["c"][0].text)) - prefix + 1


def test_near_the_largest_cache_bucket_a_grouped_extension_falls_back_to_one_call(sampler_tok, monkeypatch):
    """A grouped extension moves the shared cursor by the sum of its chunks (here 512 + 32), one
    whole-batch call by the longest's (512): when only the latter fits the largest cache bucket
    (2048) the policy makes one call instead of failing (the Table 2 Reflexion eval stopped on
    "KV cache length = 4346 exceeds the largest bucket 4096")."""
    from retroact_jax import decode_segments
    monkeypatch.setattr(decode_segments, "MIN_SAVED_TOKENS", 0)
    base, tok = sampler_tok
    sampler = sampling.Sampler(graphdef=base.graphdef, params=base.params, pad_id=0, eos_ids=(),
                               batch_buckets=(1, 2, 4, 8), chunk_buckets=(32, 128, 512, 1536),
                               length_buckets=(256, 512, 1024, 2048), new_token_buckets=(16,))
    inc, ref = LMPolicy(sampler, tok), LMPolicy(sampler, tok, incremental=False)
    ctx = {"a": [Span("prompt", "x" * 1500)], "b": [Span("prompt", "Q: ")], "c": [Span("prompt", "R: ")],
           "d": [Span("prompt", "S: ")]}
    for step, more in enumerate(({}, {"a": "y" * 20, "b": "z" * 400, "c": "w" * 9, "d": "v" * 9})):
        for k in ctx:
            if more.get(k):
                ctx[k].append(Span("observation", more[k]))
        reqs = [Request(k, list(ctx[k])) for k in ctx]
        a, b = inc.generate(reqs, ["\n"], 4 if step == 0 else 16, 0.0), ref.generate(reqs, ["\n"], 4 if step == 0 else 16, 0.0)
        for k, x, y in zip(ctx, a, b):
            assert (x.text, x.token_ids) == (y.text, y.token_ids)
            ctx[k].append(Span("generated", x.text, x.token_ids, x.logprobs))
    lengths = [21, 401, 10, 10]
    assert decode_segments.extend_advance(sampler, 4, lengths) == 544          # would not fit
    assert decode_segments.extend_advance(sampler, 4, lengths, grouped=False) == 512
    assert inc.state.cache.length == 2048


def test_new_weights_invalidate_every_cached_row(sampler_tok):
    """After ``Sampler.set_params`` (an RL update) no row's keys / values are reused, live or
    released: the next completions equal a fresh policy's under the new weights."""
    import jax
    base, tok = sampler_tok
    sampler = sampling.Sampler(graphdef=base.graphdef, params=base.params, pad_id=0, eos_ids=(),
                               batch_buckets=(4, 8), chunk_buckets=(32, 128, 512),
                               length_buckets=(256, 512, 1024, 2048), new_token_buckets=(16,))
    pol = LMPolicy(sampler, tok)
    ctx = {k: [Span("prompt", f"Question {k}: what is {k}?")] for k in ("a", "b")}
    first = pol.generate([Request(k, ctx[k]) for k in ctx], ["\n"], 8, 0.0)
    pol.release(["b"])                                           # a stays live, b's row is free
    sampler.set_params(jax.tree.map(lambda x: x * 1.5, base.params))
    reqs = [Request("a", ctx["a"] + [Span("generated", first[0].text, first[0].token_ids)]),
            Request("c", ctx["b"])]                              # c: b's prompt, b's row
    got = pol.generate(reqs, ["\n"], 8, 0.0)
    want = LMPolicy(sampler, tok, incremental=False).generate(reqs, ["\n"], 8, 0.0)
    for x, y in zip(got, want):
        assert (x.text, x.token_ids) == (y.text, y.token_ids)
        np.testing.assert_allclose(x.logprobs, y.logprobs, atol=2e-4)


def test_multi_token_stop_string_cuts_completion(sampler_tok):
    sampler, tok = sampler_tok
    pol = LMPolicy(sampler, tok)
    out = pol.generate([Request("a", [Span("prompt", "Thought 1:")])], ["x"], 16, 0.0)[0]
    full = LMPolicy(sampler, tok, incremental=False).generate(
        [Request("a", [Span("prompt", "Thought 1:")])], ["\x7f"], 16, 0.0)[0]  # never stops
    if "x" in full.text:
        assert out.text == full.text[: full.text.index("x") + 1] and out.finish == "stop"
    else:
        assert out.finish == "length"
    assert tok.decode(out.token_ids) == out.text


def test_min_new_tokens_reaches_the_sampler(sampler_tok):
    """A stop string that is every row's greedy first token ends the call at once unless min_new_tokens."""
    sampler, tok = sampler_tok
    reqs = [Request(k, [Span("prompt", f"Question {k}: what is {k}?")]) for k in range(3)]
    first = [c.text[0] for c in LMPolicy(sampler, tok, incremental=False).generate(reqs, ["\n"], 6, 0.0)]
    stops = sorted(set(first))
    for incremental in (True, False):
        plain = LMPolicy(sampler, tok, incremental=incremental).generate(reqs, stops, 6, 0.0)
        assert all(c.text in stops and c.finish == "stop" for c in plain)
        held = LMPolicy(sampler, tok, incremental=incremental, min_new_tokens=1).generate(reqs, stops, 6, 0.0)
        assert all(c.text[0] not in stops and len(c.token_ids) >= 2 for c in held)
    with pytest.raises(ValueError, match="min_new_tokens"):
        LMPolicy(sampler, tok, min_new_tokens=-1)


def test_long_episodes_compact_the_cache_and_match_reprefill(sampler_tok):
    """Many steps with short, uneven rows: the shared write cursor leaves holes that compaction
    (a gather) drops; the cache stays in a small bucket and completions equal a full re-prefill."""
    sampler, tok = sampler_tok
    inc, ref = LMPolicy(sampler, tok), LMPolicy(sampler, tok, incremental=False)
    ctx = {k: [Span("prompt", f"Q{k}: " + "x" * (5 + 20 * k))] for k in range(3)}
    for step in range(12):
        reqs = [Request(k, list(ctx[k])) for k in sorted(ctx)]
        longest = max(len(tok.encode("".join(s.text for s in ctx[k]))) for k in ctx)
        a = inc.generate(reqs, ["\n"], 10, 0.0)
        b = ref.generate(reqs, ["\n"], 10, 0.0)
        for k, x, y in zip(sorted(ctx), a, b):
            assert x.token_ids == y.token_ids and x.text == y.text
            ctx[k].append(Span("generated", x.text, x.token_ids, x.logprobs))
            ctx[k].append(Span("observation", f"\nObs {step}: {'ok' * k}\n>"))
        # near the longest row: + one extension chunk (<= 32 here) + the call's 10 new tokens
        assert inc.state.cache.length <= sampling.bucket(longest + 32 + 10, sampler.length_buckets, "")
    assert inc.stats["compactions"] >= 3
    assert max(len(r.ids) for r in inc.rows) > 100


class _SpecialTextTokenizer(ToyTokenizer):
    """Decodes every id to its text, special tokens included (an HF tokenizer without
    ``skip_special_tokens``: "<|im_end|>" shows up in the text)."""

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids)


def test_a_completion_ending_on_eos_excludes_it(sampler_tok):
    """The EOS token ends a completion but is not part of its text, ids or log-probs
    (``Finish[no]<|im_end|>`` was parsed as an invalid action); the next call, whose context
    lacks the EOS, equals a full re-prefill."""
    base, _ = sampler_tok
    tok = _SpecialTextTokenizer()
    ctx = [Span("prompt", "Question 7: what is 7?")]
    free = LMPolicy(sampling.Sampler(graphdef=base.graphdef, params=base.params, pad_id=0, batch_buckets=(4, 8), chunk_buckets=(32, 128, 512),
                                     length_buckets=(256, 512, 1024, 2048), new_token_buckets=(16,), eos_ids=()),
                    tok, incremental=False).generate([Request(0, ctx)], [], 12, 0.0)[0]
    ids = free.token_ids
    k = next(j for j in range(2, len(ids)) if ids[j] not in ids[:j])      # first occurrence at j >= 2
    eos = sampling.Sampler(graphdef=base.graphdef, params=base.params, pad_id=0, batch_buckets=(4, 8), chunk_buckets=(32, 128, 512),
                           length_buckets=(256, 512, 1024, 2048), new_token_buckets=(16,), eos_ids=(ids[k],))
    inc, ref = LMPolicy(eos, tok), LMPolicy(eos, tok, incremental=False)
    a, b = (p.generate([Request(0, ctx)], [], 12, 0.0)[0] for p in (inc, ref))
    assert a.finish == "eos" and a.token_ids == ids[:k] and a.text == tok.decode(ids[:k])
    assert len(a.logprobs) == k and np.allclose(a.logprobs, free.logprobs[:k], atol=1e-5)
    assert (b.text, b.token_ids, b.finish) == (a.text, a.token_ids, a.finish)
    nxt = ctx + [Span("generated", a.text, a.token_ids, a.logprobs), Span("observation", "\nObservation: ok\n")]
    c, d = (p.generate([Request(0, nxt)], ["\n"], 8, 0.0)[0] for p in (inc, ref))
    assert (c.text, c.token_ids) == (d.text, d.token_ids)
    assert inc.stats["rolled_back"] >= 1          # the EOS the row's cache held


def test_a_long_kept_row_and_a_long_addition_evict_the_cache_instead_of_failing(sampler_tok):
    """Additions are written after the longest kept row (one shared cursor): a row keeping 1,400
    tokens and another adding 700 need 1,400 + 700 (even in pieces) + 16 slots, over the largest
    bucket (2,048), although each context fits it alone. The policy drops every row's cache and re-prefills
    them whole instead of failing (the Table 2 Reflexion eval stopped on "KV cache length = 5002
    exceeds the largest bucket 4096": a reflector row kept 2,000 tokens of its task's last prompt),
    with the completions of a full re-prefill."""
    base, tok = sampler_tok
    sampler = sampling.Sampler(graphdef=base.graphdef, params=base.params, pad_id=0, eos_ids=(),
                               batch_buckets=(4, 8), chunk_buckets=(32, 128, 512, 1536),
                               length_buckets=(256, 512, 1024, 2048), new_token_buckets=(16,))
    inc, ref = LMPolicy(sampler, tok), LMPolicy(sampler, tok, incremental=False)
    ctx = {"a": [Span("prompt", "x" * 1400)], "b": [Span("prompt", "Q: ")]}
    for step, more in enumerate(({}, {"a": "y" * 5, "b": "z" * 700}, {"a": "u" * 5, "b": "w" * 5})):
        for k in ctx:
            if more.get(k):
                ctx[k].append(Span("observation", more[k]))
        reqs = [Request(k, list(ctx[k])) for k in ctx]
        a, b = inc.generate(reqs, ["\n"], 16, 0.0), ref.generate(reqs, ["\n"], 16, 0.0)
        for k, x, y in zip(ctx, a, b):
            assert (x.text, x.token_ids) == (y.text, y.token_ids)
            np.testing.assert_allclose(x.logprobs, y.logprobs, atol=2e-4)
            ctx[k].append(Span("generated", x.text, x.token_ids, x.logprobs))
        assert inc.stats["evictions"] == (0 if step == 0 else 1)     # the third step reuses again
    assert inc.state.cache.length == 2048


def test_a_policy_that_does_not_hold_its_cache_frees_it_with_its_last_row(sampler_tok):
    """``hold_cache=False`` (the reflector's: every row is released after each call): releasing the
    last row frees the cache, the next call starts one sized to its own rows, and completions
    equal a full re-prefill's. With ``hold_cache`` (the planner's) released rows keep their cache."""
    sampler, tok = sampler_tok
    drop, hold = LMPolicy(sampler, tok, hold_cache=False), LMPolicy(sampler, tok)
    ref = LMPolicy(sampler, tok, incremental=False)
    calls = [[f"Trial {k}: what went wrong with task {k}?" for k in range(6)], ["Trial 9: and now?"]]
    for n, texts in enumerate(calls):
        reqs = [Request((n, i), [Span("prompt", t)]) for i, t in enumerate(texts)]
        a, b = drop.generate(reqs, ["\n"], 8, 0.0), ref.generate(reqs, ["\n"], 8, 0.0)
        hold.generate(reqs, ["\n"], 8, 0.0)
        assert [(x.text, x.token_ids) for x in a] == [(y.text, y.token_ids) for y in b]
        assert drop.state.cache.batch == (8 if n == 0 else 4)
        for p in (drop, hold):
            p.release([r.key for r in reqs])
        assert drop.state is None and drop.rows == []
        assert hold.state is not None and hold.state.cache.batch == 8


def test_the_stages_reflectors_do_not_hold_their_cache(monkeypatch):
    """The RL stage's and the evaluation's reflector policies free their cache between calls; the
    planners keep theirs (its rows' prefixes serve the next step)."""
    import types
    from retroact_jax.stages import evaluate, methods, rl
    fake = types.SimpleNamespace(sampler=types.SimpleNamespace(params=None))
    s = types.SimpleNamespace(c=types.SimpleNamespace(collect=types.SimpleNamespace(top_p=1.0, min_new_tokens=0)),
                              behaviour={"planner": fake, "reflector": fake}, reflector=True,
                              t=types.SimpleNamespace(tokenizer=ToyTokenizer()))
    planner, reflector = rl.policies(s, explore=True)
    assert (planner.hold_cache, reflector.hold_cache) == (True, False)
    seen = []
    monkeypatch.setattr(evaluate, "_policy", lambda src, lora, c, cache, hold_cache=True: seen.append(hold_cache))
    monkeypatch.setattr(evaluate, "model_sources", lambda *a: ("p", "r"))
    c = types.SimpleNamespace(model=types.SimpleNamespace(policy="lm", planner="p", reflector="",
                                                          planner_lora="", reflector_lora=""))
    evaluate.policies(c, methods.get("retroact"), None, None, {})
    assert seen == [True, False]


def test_an_addition_whose_chunk_padding_overflows_is_made_in_pieces(sampler_tok):
    """One call pads an addition to its chunk bucket: a 2,314-token prompt takes a 4,096 chunk and,
    with a 250-token budget, overflows the 4,096 cache (the Table 2 Reflexion eval, after the
    eviction above). The policy extends such an addition in pieces (2,048 + 256 + 16 slots), which
    also makes an addition longer than the largest chunk bucket possible; the completions equal a
    full re-prefill's (a sampler with a larger chunk bucket)."""
    from retroact_jax.decode_segments import stage_sizes
    assert stage_sizes(2314, (16, 64, 256, 512, 1024, 2048, 4096)) == [2048, 256, 16]
    assert stage_sizes(0, (16, 64)) == [] and stage_sizes(5, (16, 64)) == [16]
    base, tok = sampler_tok
    kw = dict(graphdef=base.graphdef, params=base.params, pad_id=0, eos_ids=(), batch_buckets=(4, 8),
              new_token_buckets=(16,))
    inc = LMPolicy(sampling.Sampler(chunk_buckets=(32, 128, 512, 1536), length_buckets=(256, 512, 1024, 2048),
                                    **kw), tok)
    ref = LMPolicy(sampling.Sampler(chunk_buckets=(32, 128, 512, 2048), length_buckets=(2048, 4096), **kw),
                   tok, incremental=False)
    ctx = {"a": [Span("prompt", "x" * 1700)], "b": [Span("prompt", "Q: ")]}
    for step in range(2):
        reqs = [Request(k, list(ctx[k])) for k in ctx]
        a, b = inc.generate(reqs, ["\n"], 16, 0.0), ref.generate(reqs, ["\n"], 16, 0.0)
        for k, x, y in zip(ctx, a, b):
            assert (x.text, x.token_ids) == (y.text, y.token_ids)
            np.testing.assert_allclose(x.logprobs, y.logprobs, atol=2e-4)
            ctx[k].append(Span("generated", x.text, x.token_ids, x.logprobs))
            ctx[k].append(Span("observation", "\nok"))
    assert inc.stats["staged"] == 1 and inc.stats["evictions"] == 0 and inc.state.cache.length == 2048
    # an addition that fits one chunk (2,048) whose padding overflows the cache with the budget
    inc = LMPolicy(sampling.Sampler(chunk_buckets=(32, 128, 512, 2048), length_buckets=(256, 512, 1024, 2048),
                                    **kw), tok)
    reqs = [Request("c", [Span("prompt", "y" * 1100)]), Request("d", [Span("prompt", "R: ")])]
    a, b = inc.generate(reqs, ["\n"], 16, 0.0), ref.generate(reqs, ["\n"], 16, 0.0)
    assert [(x.text, x.token_ids) for x in a] == [(y.text, y.token_ids) for y in b]
    assert inc.stats["staged"] == 1 and inc.state.cache.length == 2048


def test_releasing_compiled_code_between_calls_changes_no_output(sampler_tok, monkeypatch):
    """With a budget of ~0 every ``generate`` first releases every executable (metrics.bound_compiled):
    the completions equal those of a policy that keeps them."""
    from retroact_jax import metrics
    sampler, tok = sampler_tok
    reqs = [Request(k, [Span("prompt", f"Question {k}: where is {k}?")]) for k in range(3)]
    keep = [c.token_ids for c in LMPolicy(sampler, tok).generate(reqs, ["\n"], 8, 0.0)]
    for k, v in (("budget_gb", 1e-9), ("floor_gb", -100.0), ("releases", 0), ("released_gb", 0.0)):
        monkeypatch.setitem(metrics._COMPILED, k, v)
    policy = LMPolicy(sampler, tok)
    for _ in range(2):
        got = [c.token_ids for c in policy.generate(reqs, ["\n"], 8, 0.0)]
        assert got == keep
        monkeypatch.setitem(metrics._COMPILED, "floor_gb", -100.0)
    assert metrics._COMPILED["releases"] == 2


def test_the_policy_records_the_call_phase_of_the_peak_rss(sampler_tok, monkeypatch):
    """``memory.peak``: the phase (sync | decode) during which the process peak last rose, with the
    policy's cache shape then; phases that do not raise the peak leave it alone."""
    from retroact_jax import metrics
    sampler, tok = sampler_tok
    hwm = {"gb": 1.0, "rise": {"sync"}}
    monkeypatch.setattr(metrics, "rss_gb", lambda: (0.5, hwm["gb"]))
    policy = LMPolicy(sampler, tok)
    real_sync = policy._sync

    def sync(*a):
        real_sync(*a)
        if "sync" in hwm["rise"]:
            hwm["gb"] += 0.25
    monkeypatch.setattr(policy, "_sync", sync)
    reqs = [Request(k, [Span("prompt", f"Question {k}: who is {k}?")]) for k in range(3)]
    policy.generate(reqs, ["\n"], 8, 0.0)
    peak = policy.memory.peak
    assert peak["phase"] == "sync" and peak["peak_rss_gb"] == 1.25
    c = policy.state.cache
    assert (peak["rows"], peak["slots"]) == (c.batch, c.length) == (4, sampler.length_buckets[0])
    assert peak["cache_gb"] == round(sum(a.nbytes for a in (*c.k, *c.v)) / 1e9, 3)
    hwm["rise"] = set()
    policy.generate(reqs, ["\n"], 8, 0.0)                 # no rise: the record stays
    assert policy.memory.peak == peak
    real_generate = policy.sampler.generate

    def generate(*a, **k):                                  # the decode phase raises it now
        out = real_generate(*a, **k)
        hwm["gb"] += 0.5
        return out
    monkeypatch.setattr(policy.sampler, "generate", generate)
    policy.generate(reqs, ["\n"], 8, 0.0)
    assert policy.memory.peak["phase"] == "decode" and policy.memory.peak["peak_rss_gb"] >= 1.75
    top = policy.memory.peak
    hwm["gb"] = 1.0                                         # a new stage: VmHWM reset, lower rise
    hwm["rise"] = {"sync"}
    monkeypatch.setattr(policy.sampler, "generate", real_generate)
    policy.generate(reqs, ["\n"], 8, 0.0)
    assert policy.memory.peak == top                        # 1.25 < 1.75: the higher record stays
