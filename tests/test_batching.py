"""batching.py (spans -> tokens, collate, resumable epochs) and released_data.py (the RetroAct files)."""
import dataclasses
import collections
import re

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from retroact_jax import batching, losses
from retroact_jax import released_data as rd
from retroact_jax.batching import KIND_GENERATED, KIND_OBSERVATION, KIND_PAD, KIND_PROMPT, Sample


class WhitespaceTokenizer:
    """Words and single whitespace characters; a tokenizer with offsets but no encode_pieces."""

    def __init__(self):
        self.vocab = {}

    def encode_with_offsets(self, text):
        ids, offsets = [], []
        for m in re.finditer(r"\S+|\s", text):
            ids.append(self.vocab.setdefault(m.group(0), len(self.vocab) + 3))
            offsets.append(m.span())
        return ids, offsets


@pytest.fixture(scope="module")
def alfworld():
    return rd.load_retroact("alfworld_il")


@pytest.fixture(scope="module")
def intercode_rl():
    return rd.load_retroact("intercode_rl")


@pytest.fixture(scope="module")
def bpe(alfworld, intercode_rl):
    """A tiny byte-level BPE trained here on the released texts."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [s.text for s in alfworld.samples[:150] + intercode_rl.samples[:150]]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def _check_kinds(ts, text, spans, offsets):
    """Every token gets the kind of the span holding its last character."""
    ends = np.cumsum([len(t) for _, t in spans])
    for k, (s, e) in zip(ts.kinds, offsets):
        i = int(np.searchsorted(ends, e - 1, side="right"))
        assert k == batching._KIND_ID[spans[i][0]], (text[s:e], spans[i])


def test_span_kinds_survive_real_bpe_tokenization(bpe, alfworld, intercode_rl):
    picked = alfworld.samples[:5] + alfworld.samples[-3:] + intercode_rl.samples[:5] + intercode_rl.samples[-3:]
    for s in picked:
        ts = batching.tokenize_sample(s, bpe)
        enc = bpe.encode(s.text)
        assert list(ts.ids) == enc.ids  # tokenised once, as the whole text
        _check_kinds(ts, s.text, s.spans, enc.offsets)
        # byte-level pre-tokenisation splits at every span boundary of these formats
        assert ts.n_boundary_tokens == 0
        for kind in (KIND_PROMPT, KIND_GENERATED, KIND_OBSERVATION):
            expect = "".join(t for k, t in s.spans if batching._KIND_ID[k] == kind)
            assert bpe.decode([int(i) for i, k in zip(ts.ids, ts.kinds) if k == kind]) == expect


def test_span_by_span_tokenization_differs_and_is_not_used(bpe):
    word = max((w[1:] for w in bpe.get_vocab() if w.startswith("Ġ") and w[1:].isalpha()), key=len)
    assert len(bpe.encode(" " + word).ids) == 1 and len(word) >= 4  # one token in the whole text
    spans = (("prompt", "Interact with a " + word[:2]), ("generated", word[2:] + " to solve a task"))
    s = Sample("planner", spans)
    per_span = sum((bpe.encode(t).ids for _, t in spans), [])
    whole = bpe.encode(s.text).ids
    assert per_span != whole  # the word merges across the boundary
    ts = batching.tokenize_sample(s, bpe)
    assert list(ts.ids) == whole and ts.n_boundary_tokens >= 1


def test_boundary_token_goes_to_the_later_span_and_is_counted():
    tok = WhitespaceTokenizer()
    tok.add_bos, tok.bos_id = True, 1
    s = Sample("planner", (("prompt", "say hel"), ("generated", "lo world"), ("observation", "")))
    ts = batching.tokenize_sample(s, tok, eos_id=2)
    assert ts.n_boundary_tokens == 1  # "hello" straddles prompt / generated
    assert ts.ids[0] == 1 and ts.ids[-1] == 2
    # bos, "say", " ", "hello", " ", "world", eos; the empty last span owns no text token, eos takes its kind
    assert list(ts.kinds) == [KIND_PROMPT, KIND_PROMPT, KIND_PROMPT, KIND_GENERATED, KIND_GENERATED,
                              KIND_GENERATED, KIND_OBSERVATION]


def test_encode_pieces_is_preferred_and_validated():
    class Pieces:
        def encode_pieces(self, pieces):
            ids, idx = [7], [-1]  # a special token owned by no piece -> prompt
            for i, p in enumerate(pieces):
                ids += [ord(c) for c in p]
                idx += [i] * len(p)
            return ids, idx

    s = Sample("reflector", (("prompt", "ab"), ("generated", "c"), ("observation", "de")))
    ts = batching.tokenize_sample(s, Pieces())
    assert list(ts.ids) == [7, 97, 98, 99, 100, 101]
    assert list(ts.kinds) == [KIND_PROMPT, KIND_PROMPT, KIND_PROMPT, KIND_GENERATED, KIND_OBSERVATION,
                              KIND_OBSERVATION]

    class Bad:
        def encode_pieces(self, pieces):
            return [1, 2], [0]

    with pytest.raises(batching.SampleError, match="piece indices"):
        batching.tokenize_sample(s, Bad())
    with pytest.raises(TypeError, match="span by span"):
        batching.tokenize_sample(s, object())


def test_project_tokenizer_encode_pieces_agrees_with_offset_fallback(tmp_path, bpe, alfworld):
    tokenizer_mod = pytest.importorskip("retroact_jax.tokenizer")
    bpe.save(str(tmp_path / "tokenizer.json"))
    try:
        tok = tokenizer_mod.load_tokenizer(tmp_path / "tokenizer.json")
    except Exception as e:  # the teammate's loader may want a config beside tokenizer.json
        pytest.skip(f"project tokenizer cannot load a bare tokenizer.json: {e}")
    for s in alfworld.samples[:3] + alfworld.samples[-2:]:
        a, b = batching.tokenize_sample(s, tok), batching.tokenize_sample(s, bpe)
        assert list(a.ids) == list(b.ids) and list(a.kinds) == list(b.kinds)


def test_behaviour_logprobs_alignment():
    tok = WhitespaceTokenizer()
    spans = (("prompt", "p q"), ("generated", " a b"), ("observation", " o"), ("generated", " c"))
    ts0 = batching.tokenize_sample(Sample("planner", spans), tok)
    n_nonprompt = int((ts0.kinds != KIND_PROMPT).sum())
    n_gen = int((ts0.kinds == KIND_GENERATED).sum())
    assert n_nonprompt > n_gen
    full = tuple(np.linspace(-1, -2, n_nonprompt))
    ts = batching.tokenize_sample(Sample("planner", spans, behaviour_logp=full), tok)
    np.testing.assert_allclose(ts.behaviour_logp[ts.kinds != KIND_PROMPT], full, rtol=1e-6)
    assert np.all(ts.behaviour_mask == (ts.kinds != KIND_PROMPT))
    gen = tuple(np.linspace(-1, -2, n_gen))
    ts = batching.tokenize_sample(Sample("planner", spans, behaviour_logp=gen), tok)
    np.testing.assert_allclose(ts.behaviour_logp[ts.kinds == KIND_GENERATED], gen, rtol=1e-6)
    assert np.all(ts.behaviour_logp[ts.kinds == KIND_OBSERVATION] == 0) and ts.behaviour_mask.sum() == n_gen
    with pytest.raises(batching.SampleError, match="behaviour_logp has 3 values"):
        batching.tokenize_sample(Sample("planner", spans, behaviour_logp=(0.0,) * 3), tok)


def _toy(role="planner", objective="il", n_prompt=2, n_gen=3, n_obs=2, **kw):
    words = lambda n, w: "".join(f" {w}{i}" for i in range(n))  # noqa: E731
    spans = [("prompt", "P" + words(n_prompt - 1, "p")), ("generated", words(n_gen, "g")[:]),
             ("observation", words(n_obs, "o"))]
    return Sample(role, tuple(spans), objective=objective, **kw)


def test_collate_padding_masks_rewards_and_buckets():
    tok = WhitespaceTokenizer()
    samples = [_toy(n_gen=2, objective="rl", reward=0.5),
               _toy("reflector", "rl", n_obs=0, last_reward=0.25, current_reward=1.0),
               _toy(n_prompt=3, n_gen=4, n_obs=3)]
    tss = [batching.tokenize_sample(s, tok) for s in samples]
    lens = [len(t) for t in tss]
    for padding in ("right", "left"):
        for obs in ("trained", "masked"):
            b = batching.collate(tss, [8, 16, 32, 64], pad_id=0, padding=padding, observations=obs, batch_size=4)
            T = 16 if max(lens) <= 16 else 32
            assert 8 < max(lens) <= 32 and b.tokens_BxT.shape == (4, T) and b.tokens_BxT.dtype == np.int32
            assert b.n_rows == 3
            for i, ts in enumerate(tss):
                L = len(ts)
                sl = slice(0, L) if padding == "right" else slice(T - L, T)
                np.testing.assert_array_equal(b.tokens_BxT[i, sl], ts.ids)
                np.testing.assert_array_equal(b.positions_BxT[i, sl], np.arange(L))
                assert b.valid_BxT[i].sum() == L and b.valid_BxT[i, sl].all()
                np.testing.assert_array_equal(b.kinds_BxT[i, sl], ts.kinds)
                assert np.all(b.kinds_BxT[i][~b.valid_BxT[i]] == KIND_PAD)
                assert np.all(b.tokens_BxT[i][~b.valid_BxT[i]] == 0)
                want = (ts.kinds == KIND_GENERATED) | ((ts.kinds == KIND_OBSERVATION) & (obs == "trained"))
                np.testing.assert_array_equal(b.loss_mask_BxT[i, sl], want)
            assert not b.valid_BxT[3].any() and not b.loss_mask_BxT[3].any()
            assert (b.loss_mask_BxT & (b.kinds_BxT == KIND_OBSERVATION)).any() == (obs == "trained")
            np.testing.assert_allclose(b.reward_B, [0.5, 0.75 * 1.25, 0.0, 0.0])
            nonprompt = (b.kinds_BxT == KIND_GENERATED) | (b.kinds_BxT == KIND_OBSERVATION)
            np.testing.assert_allclose(b.reward_BxT, np.where(nonprompt, b.reward_B[:, None], 0))
            np.testing.assert_array_equal(b.role_B, [0, 1, 0, 0])
            np.testing.assert_array_equal(b.objective_B, [1, 1, 0, 0])
            assert b.n_truncated == 0 and b.n_rows_untrained == 0
    b = batching.collate(tss, [8, 16, 32], pad_id=0, reflector_reward="delta")
    np.testing.assert_allclose(b.reward_B, [0.5, 0.75, 0.0])
    assert set(b.arrays()) >= {"tokens_BxT", "loss_mask_BxT", "valid_BxT", "role_B", "objective_B", "reward_BxT",
                               "behaviour_logp_BxT", "behaviour_mask_BxT", "positions_BxT", "kinds_BxT"}


def test_collate_first_token_is_never_trained():
    tok = WhitespaceTokenizer()
    s = Sample("planner", (("generated", "a b c"),))
    b = batching.collate([batching.tokenize_sample(s, tok)], [8], pad_id=0, padding="left")
    assert b.valid_BxT[0, 8 - 5] and not b.loss_mask_BxT[0, 8 - 5] and b.loss_mask_BxT[0, 8 - 4:].all()


def test_collate_truncation_and_errors():
    tok = WhitespaceTokenizer()
    tss = [batching.tokenize_sample(_toy(n_gen=n), tok) for n in (1, 10, 30)]
    b = batching.collate(tss, [16, 64], pad_id=0, max_len=16)
    assert b.tokens_BxT.shape == (3, 16) and b.n_truncated == 2
    np.testing.assert_array_equal(b.tokens_BxT[2], tss[2].ids[:16])  # right truncation keeps the start
    long_prompt = batching.tokenize_sample(_toy(n_prompt=20), tok)
    b = batching.collate([long_prompt], [16], pad_id=0)
    assert b.n_truncated == 1 and b.n_rows_untrained == 1
    with pytest.raises(batching.SampleError, match="exceeds the largest bucket"):
        batching.collate(tss, [16], pad_id=0, max_len=32)
    with pytest.raises(batching.SampleError, match="valid: right, left"):
        batching.collate(tss, [64], pad_id=0, padding="middle")
    with pytest.raises(batching.SampleError, match="valid: trained, masked"):
        batching.collate(tss, [64], pad_id=0, observations="some")
    with pytest.raises(batching.SampleError, match="needs `reward`"):
        batching.collate([batching.tokenize_sample(_toy(objective="rl"), tok)], [64], pad_id=0)
    with pytest.raises(batching.SampleError, match="last_reward and current_reward"):
        batching.collate([batching.tokenize_sample(_toy("reflector", "rl", reward=1.0), tok)], [64], pad_id=0)
    with pytest.raises(batching.SampleError, match="1..batch_size"):
        batching.collate(tss, [64], pad_id=0, batch_size=2)
    with pytest.raises(batching.SampleError, match="unknown role"):
        Sample("critic", (("generated", "x"),))
    with pytest.raises(batching.SampleError, match="kind in"):
        Sample("planner", (("action", "x"),))


def test_observation_mask_reaches_the_loss_gradient():
    """Logits that predict observation tokens get gradient exactly when observations are trained."""
    import jax
    import jax.numpy as jnp

    tok = WhitespaceTokenizer()
    ts = batching.tokenize_sample(_toy(objective="rl", reward=1.0, n_gen=2, n_obs=3), tok)
    for obs in ("trained", "masked"):
        arrs = batching.collate([ts], [16], pad_id=0, observations=obs).arrays()
        T = arrs["tokens_BxT"].shape[1]
        logits = jnp.asarray(np.random.default_rng(0).normal(size=(1, T, 64)), jnp.float32)
        g = jax.grad(lambda lg: losses.joint_loss_from_logits(lg, arrs)[0])(logits)
        moved = np.abs(np.asarray(g)[0]).sum(-1) > 0  # logits[t-1] predicts token t
        kinds = arrs["kinds_BxT"][0]
        for t in range(1, T):
            expect = kinds[t] == KIND_GENERATED or (kinds[t] == KIND_OBSERVATION and obs == "trained")
            assert moved[t - 1] == expect, (obs, t, kinds[t])


def test_length_grouped_batches_deterministic_and_grouped():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 500, size=103)
    a = batching.length_grouped_batches(lengths, 4, seed=1, epoch=0, mega_batch_mult=5)
    b = batching.length_grouped_batches(lengths, 4, seed=1, epoch=0, mega_batch_mult=5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == len(b) == 26
    assert sorted(np.concatenate(a).tolist()) == list(range(103))
    c = batching.length_grouped_batches(lengths, 4, seed=1, epoch=1, mega_batch_mult=5)
    d = batching.length_grouped_batches(lengths, 4, seed=2, epoch=0, mega_batch_mult=5)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert not all(np.array_equal(x, y) for x, y in zip(a, d))
    # grouped: padding waste well below random batching
    waste = lambda bs: sum(len(x) * lengths[x].max() - lengths[x].sum() for x in bs)  # noqa: E731
    perm = rng.permutation(103)
    assert waste(a) < 0.5 * waste([perm[i:i + 4] for i in range(0, 103, 4)])
    for x in a:
        assert np.all(np.diff(lengths[x]) <= 0)  # longest first inside a batch


def test_iterate_batches_resumes_exactly():
    tok = WhitespaceTokenizer()
    tss = [batching.tokenize_sample(_toy(n_gen=n), tok) for n in range(1, 12)]
    kw = dict(buckets=[8, 16, 32], pad_id=0)
    full = list(batching.iterate_batches(tss, 3, seed=5, num_epochs=3, **kw))
    assert [p for p, _ in full] == [(e, i) for e in range(3) for i in range(4)]
    assert all(b.tokens_BxT.shape[0] == 3 for _, b in full)
    for cut in (0, 2, 3, 5, 11):
        (e, i), _ = full[cut]
        resumed = list(batching.iterate_batches(tss, 3, seed=5, start=(e, i + 1), num_epochs=3, **kw))
        assert len(resumed) == len(full) - cut - 1
        for (p, x), (q, y) in zip(full[cut + 1:], resumed):
            assert p == q and np.array_equal(x.tokens_BxT, y.tokens_BxT)
    for epoch in range(3):  # every sample once per epoch
        rows = [tuple(b.tokens_BxT[r][b.valid_BxT[r]]) for (e, _), b in full if e == epoch for r in range(b.n_rows)]
        assert sorted(rows) == sorted(tuple(t.ids) for t in tss)
    order = lambda e: [b.tokens_BxT.tobytes() for (ep, _), b in full if ep == e]  # noqa: E731
    assert order(0) != order(1) and sorted(order(0)) == sorted(order(1))  # reshuffled per epoch


# ------------------------------------------------------------------------------------------------
# released data


def test_released_files_counts(alfworld, intercode_rl):
    ic_il = rd.load_retroact("intercode_il")
    for loaded, n, n_pl, n_rf in ((alfworld, 914, 693, 221), (ic_il, 963, 866, 97), (intercode_rl, 659, 551, 108)):
        roles = collections.Counter(s.role for s in loaded.samples)
        assert (len(loaded.samples), roles["planner"], roles["reflector"], loaded.n_skipped) == (n, n_pl, n_rf, 0)
    assert rd.load_retroact("intercode_il", empty_reflections="skip").n_skipped == 29
    rewards = collections.Counter(s.reward for s in intercode_rl.samples if s.role == "planner")
    # (the upstream pack README said 2 are 0.0; the file has none: the smallest is 0.001, docs/paper.md §3.3)
    assert rewards[1.0] == 446 and sum(rewards.values()) == 551 and 0.001 < min(rewards) < 0.0011
    pairs = collections.Counter((s.last_reward, s.current_reward) for s in intercode_rl.samples if s.role == "reflector")
    assert pairs[(0.0, 1.0)] == 104 and pairs[(-0.47, 1.0)] == 1
    assert all(s.objective == "il" for s in alfworld.samples) and all(s.objective == "rl" for s in intercode_rl.samples)


def test_released_spans_reassemble_the_original_text(alfworld, intercode_rl):
    import json

    from envs import data
    for loaded, name in ((alfworld, "retroact/alfworld_il.json"), (intercode_rl, "retroact/intercode_rl.json")):
        rows = json.load(open(data.path(name)))
        original = rd.load_retroact(name.split("/")[1][:-5], join="original").samples
        sep = " " if "alfworld" in name else "\n"   # join="inference" (default): as the agent renders it
        for s, o, row in zip(loaded.samples, original, rows):
            if s.role == "planner":
                assert o.text == row["input"] + row["output"]
                assert s.text == row["input"] + sep + row["output"]
            else:
                assert s == o
                assert s.text == row["input"] + " " + row["output"].strip()
                assert s.spans[-1] == ("generated", " " + row["output"].strip())


def test_alfworld_planner_spans(alfworld):
    s = alfworld.samples[0]
    kinds = [k for k, _ in s.spans]
    assert kinds[0] == "prompt" and s.spans[0][1].endswith("\n>")
    # inference: the cue "\n>", then the model writes " think: ...\n" (as every later "> action" line)
    assert s.spans[1] == ("generated", s.spans[1][1]) and s.spans[1][1].startswith(" think:")
    assert s.spans[2] == ("observation", "OK.\n") and s.spans[3] == ("observation", ">")
    gen = [t for k, t in s.spans if k == "generated"]
    assert all(t.endswith("\n") for t in gen) and " go to fridge 1\n" in gen
    assert s.spans[-1] == ("observation", "\n\nSTATUS: OK")
    dropped = rd.load_retroact("alfworld_il", status_tail="drop", step_prefix="generated").samples[0]
    assert not dropped.text.endswith("STATUS: OK") and ("generated", ">") in dropped.spans


def test_intercode_planner_spans(intercode_rl):
    s = intercode_rl.samples[0]
    assert s.spans[1] == ("observation", "Thought 1:")
    assert s.spans[2][0] == "generated" and s.spans[2][1].startswith(" I should")
    assert s.spans[3][0] == "generated" and s.spans[3][1].startswith("Action 1: execute[")
    assert s.spans[4] == ("generated", "Observation")        # the stop word ends the model's turn
    assert s.spans[5][0] == "observation" and s.spans[5][1].startswith(" 1:")
    assert s.spans[-1] == ("observation", "\n\nSTATUS: OK\nREWARD: 1.0")
    # inference renders "...Question: X" + "\nThought 1:" (protocols.InterCodeProtocol); so does the row
    assert s.spans[0][1].endswith("?\n") and s.text[len(s.spans[0][1]) - 2:].startswith("?\nThought 1:")
    orig = rd.load_retroact("intercode_rl", join="original").samples[0]
    assert orig.spans[0][1] + "\n" == s.spans[0][1] and s.text == orig.spans[0][1] + "\n" + orig.text[len(orig.spans[0][1]):]


GOOD_IC = {"instruction": "", "type": "planner", "input": "Q?", "reward": 1.0,
           "output": "Thought 1: t\nAction 1: submit\nObservation 1: []\n\nSTATUS: OK\nREWARD: 1.0"}
GOOD_AW = {"instruction": "", "type": "planner", "input": "task\n>",
           "output": "think: x\nOK.\n> go to a 1\nNothing.\n\nSTATUS: OK"}


@pytest.mark.parametrize("env,obj,row,msg", [
    ("intercode", "rl", dict(GOOD_IC, reward="1"), "finite number"),
    ("intercode", "rl", dict(GOOD_IC, reward=0.5), "REWARD 1.0 differs"),
    ("intercode", "rl", {k: v for k, v in GOOD_IC.items() if k != "reward"}, "fields missing \\['reward'\\]"),
    ("intercode", "rl", dict(GOOD_IC, output="Thought 1: t\nObservation 1: x"), "expected 'Action 1:'"),
    ("intercode", "rl", dict(GOOD_IC, output="Thought 1: t\nAction 1: submit"), "ends inside step 1"),
    ("intercode", "rl", dict(GOOD_IC, type="critic"), "type must be"),
    ("intercode", "il", dict(GOOD_IC), "unexpected \\['reward'\\]"),
    ("alfworld", "il", dict(GOOD_AW, output="think: x\nDone.\n> go"), "not 'OK.'"),
    ("alfworld", "il", dict(GOOD_AW, input="task"), "must end with '>'"),
    ("alfworld", "il", dict(GOOD_AW, output="  "), "empty planner output"),
    ("alfworld", "il", dict(GOOD_AW, instruction="do it"), "instruction is not empty"),
    ("alfworld", "il", dict(type="reflector", instruction="", input="x\nNew plan:", output=3), "must be a string"),
    ("alfworld", "il", dict(type="reflector", instruction="", input="x", output="y"), "New plan:"),
    ("alfworld", "il", [1, 2], "JSON object"),
])
def test_bad_rows_name_file_and_row(env, obj, row, msg):
    good = dict(GOOD_IC) if env == "intercode" else dict(GOOD_AW)
    if obj == "il":
        good.pop("reward", None)
        good["output"] = good["output"].replace("\nREWARD: 1.0", "")
    rows = [good, good, row]
    with pytest.raises(rd.DataRowError, match=f"my.json: row 2: .*{msg}"):
        rd.samples_from_rows(rows, env, obj, source="my.json")
    loaded = rd.samples_from_rows(rows, env, obj, source="my.json", skip_bad=True)
    assert len(loaded.samples) == 2 and loaded.n_skipped == 1 and loaded.skipped[0][0] == 2
    assert re.search(msg, loaded.skipped[0][1])


def test_loader_option_errors():
    with pytest.raises(ValueError, match="valid: alfworld_il, intercode_il, intercode_rl"):
        rd.load_retroact("hotpotqa_il")
    with pytest.raises(ValueError, match="valid: observation, drop"):
        rd.samples_from_rows([GOOD_AW], "alfworld", "il", status_tail="keep")


def test_released_samples_collate_with_real_tokenizer(bpe, intercode_rl):
    """End to end on real rows: the RL file, tokenised, collated, rewards shaped as the original."""
    rows = [s for s in intercode_rl.samples if s.role == "reflector"][:3] + intercode_rl.samples[:3]
    tss = [batching.tokenize_sample(s, bpe, eos_id=0) for s in rows]
    b = batching.collate(tss, [512, 1024, 2048, 4096], pad_id=0, max_len=4096)
    want = [losses.reflector_reward(s.last_reward, s.current_reward) for s in rows[:3]] + [s.reward for s in rows[3:]]
    np.testing.assert_allclose(b.reward_B, want, rtol=1e-6)
    assert b.n_truncated == 0 and b.n_rows_untrained == 0
    assert all(b.loss_mask_BxT[i, b.lengths_B[i] - 1] for i in range(6))  # eos trained, as the original


def test_released_ref_prob_is_cut_and_counted_as_the_original():
    """A ref_prob list (the original ref_prob.py) longer than the output: ``ref_prob[:n_output]``."""
    tok = WhitespaceTokenizer()
    row = dict(GOOD_IC, output="Thought 1: t\nAction 1: submit\nObservation 1: []")
    s0 = rd.row_to_sample(row, "intercode", "rl")
    n_out = int(np.sum(batching.tokenize_sample(s0, tok, eos_id=2).kinds != KIND_PROMPT))
    ref = [-0.1 * (i + 1) for i in range(n_out + 3)]
    s = rd.row_to_sample(dict(row, ref_prob=ref), "intercode", "rl")
    assert s.behaviour_alignment == "original"
    ts = batching.tokenize_sample(s, tok, eos_id=2)
    assert ts.n_behaviour_cut == 3 and ts.behaviour_mask.sum() == n_out
    np.testing.assert_allclose(ts.behaviour_logp[ts.behaviour_mask], ref[:n_out], rtol=1e-6)
    b = batching.collate([ts, ts], [256], pad_id=0)
    assert b.n_behaviour_cut == 6
    with pytest.raises(batching.SampleError, match="at least one per output token"):
        batching.tokenize_sample(rd.row_to_sample(dict(row, ref_prob=ref[:n_out - 1]), "intercode", "rl"), tok,
                                 eos_id=2)
    with pytest.raises(ValueError, match="list of finite numbers"):
        rd.row_to_sample(dict(row, ref_prob=[0.0, "x"]), "intercode", "rl")
    # an exact-count sample (the project's own scoring) still refuses a wrong count
    with pytest.raises(batching.SampleError, match="non-prompt"):
        batching.tokenize_sample(dataclasses.replace(s, behaviour_alignment="exact"), tok, eos_id=2)


def test_intercode_il_rows_train_the_stop_word_with_observations_masked():
    """The agent stops a thought + action call when the model writes "Observation"; with the
    observations masked, the row's tokens of that word are still trained (else the model runs on with
    "Action n+1: ..." lines), and the observation after it is not. SmolLM2's tokenizer."""
    from retroact_jax.models import embedded
    tok = embedded.load_tokenizer()
    row = {"instruction": "", "type": "planner", "input": "Q?",
           "output": "Thought 1: t\nAction 1: execute[SELECT 1]\nObservation 1: [(1,)]\nThought 2: u\n"
                     "Action 2: submit\nObservation 2: []"}
    s = rd.samples_from_rows([row], "intercode", "il").samples[0]
    t = batching.tokenize_sample(s, tok)
    trained = tok.decode([i for i, k in zip(t.ids, t.kinds) if k == batching.KIND_GENERATED])
    assert trained.count("Observation") == 2 and "[(1,)]" not in trained and "Observation 1" not in trained
    assert "execute[SELECT 1]\nObservation" in trained
