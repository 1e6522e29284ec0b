"""The RL stage on HotpotQA with a tiny random model and a character tokenizer (every sampled id
but pad/bos decodes to one character, so most sampled text re-tokenises into the sampled ids): behaviour scoring
vs the sampler's log-probs, the first update's ratio, full iterations, resume."""
import dataclasses
import json
import pathlib
import shutil

import numpy as np
import pytest
from flax import nnx

from retroact_jax import batching, losses, metrics, scoring, stages, train, tokenizer as tokenizer_lib
from retroact_jax.agent import loop
from retroact_jax.agent.lm_policy import LMPolicy
from retroact_jax.models.config import tiny
from retroact_jax.models.decoder import Decoder
from retroact_jax.stages import collect, rl as rl_stage, samples as samples_lib, setup
from retroact_jax.sampling import Sampler

ALPHABET = "\n" + "".join(chr(i) for i in range(32, 127))


class CharTok(tokenizer_lib.Tokenizer):
    """ids 0 pad, 1 bos, 2 eos, 3.. one printable ASCII character or newline; anything else -> '?'."""

    def __init__(self):
        self.bos_id, self.eos_ids, self.pad_id = 1, (2,), 0
        self.chat_template = self.bos_token = self.eos_token = None
        self.source = "test-char"
        self._id = {ch: 3 + i for i, ch in enumerate(ALPHABET)}

    @property
    def vocab_size(self):
        return 3 + len(ALPHABET)

    def _encode_offsets(self, text):
        return [self._id.get(ch, self._id["?"]) for ch in text], [(i, i + 1) for i in range(len(text))]

    def decode(self, ids, skip_special=False):
        return "".join(ALPHABET[int(i) - 3] for i in ids if int(i) >= 3)

    def _piece_text(self, token_id):
        return "" if token_id < 3 else ALPHABET[token_id - 3]


TOK = CharTok()


def _model(seed=0):
    return Decoder(tiny(vocab_size=TOK.vocab_size), rngs=nnx.Rngs(seed))


BUCKETS = dict(batch_buckets=(4,), length_buckets=(2048, 4096), new_token_buckets=(16,))
AGENT = dict(trials=2, batch_size=2, temperature=1.0, reflector_temperature=1.0, env_workers=2,
             max_steps=1, planner_max_tokens=16, reflector_max_tokens=16)


@pytest.fixture(scope="module")
def rollout(tmp_path_factory):
    model = _model(0)
    sampler = Sampler(model, pad_id=0, eos_ids=TOK.eos_ids, **BUCKETS)
    pol = LMPolicy(sampler, TOK)
    recs, summary = collect.rollout("hotpotqa", "train", [0, 1], pol, pol, loop.AgentConfig(seed=3, **AGENT),
                                    tmp_path_factory.mktemp("collect"))
    return model, recs, summary


def test_scored_behaviour_equals_sampler_logprobs(rollout):
    model, recs, _ = rollout
    assert len(recs) == 4 and all(r["planner"]["calls"] for r in recs)
    samples = collect.rl_samples(recs, ("planner", "reflector"))
    assert sum(s.role == "reflector" for s in samples) == 2      # trial 1 failed -> reflection -> trial 2
    scorer = scoring.Scorer(model, batch_buckets=(4,), length_buckets=(1024, 2048))
    scored, n_tok, health = collect.score_behaviour(samples, {"planner": scorer, "reflector": scorer}, TOK,
                                                    eos_id=TOK.eos_id, records=recs, batch_rows=3)
    generated = [s for spans in collect._record_spans(recs).values() for s in spans
                 if s.get("role") == "generated" and s.get("text")]
    # a sampled pad/bos id decodes to no text, so that span is re-tokenised instead of compared
    assert health["spans_compared"] + health["spans_retokenized"] == len(generated) >= 8, health
    assert health["spans_compared"] >= 4 and health["generated_tokens_compared"] > 50, health
    assert health["behaviour_gap_max_abs"] < 1e-4, health
    for s, n in zip(scored, n_tok):
        ts = batching.tokenize_sample(s, TOK, eos_id=TOK.eos_id)   # counts must fit exactly
        assert len(ts) == n and ts.behaviour_mask.sum() == (ts.kinds != batching.KIND_PROMPT).sum()
        direct = scorer(ts.ids[None], np.ones((1, len(ts)), bool))[0]
        np.testing.assert_allclose(ts.behaviour_logp[ts.behaviour_mask], direct[ts.behaviour_mask], atol=2e-5)
        assert ts.ids[-1] == TOK.eos_id


def test_first_update_ratio_is_one_when_behaviour_is_current(rollout):
    model, recs, _ = rollout
    scorer = scoring.Scorer(model, batch_buckets=(4,), length_buckets=(1024, 2048))
    samples = collect.rl_samples(recs, ("planner", "reflector"))
    scored, _, _ = collect.score_behaviour(samples, {"planner": scorer, "reflector": scorer}, TOK,
                                           eos_id=TOK.eos_id)
    pl = dataclasses.replace(next(s for s in scored if s.role == "planner"), reward=0.5)
    rf = dataclasses.replace(next(s for s in scored if s.role == "reflector"), current_reward=1.0)
    rows = {"planner": 1, "reflector": 1}
    learner = train.Learner({"planner": model, "reflector": model}, rows=rows,
                            optimizer={"name": "sgd", "learning_rate": 0.1, "schedule": "constant"})
    part = {"planner": [batching.tokenize_sample(pl, TOK, eos_id=2)],
            "reflector": [batching.tokenize_sample(rf, TOK, eos_id=2)]}
    arrays, _ = train.collate_step(part, rows, (1024, 2048), 0)
    m = train.check_finite(learner.step(arrays), 0)
    assert m["rl_tokens_missing_behaviour"] == 0 and m["tokens_rl_planner"] > 0 and m["tokens_rl_reflector"] > 0
    for k in ("ratio_mean", "ratio_min", "ratio_max"):
        assert m[k] == pytest.approx(1.0, abs=1e-5)
    assert m["clip_fraction"] == 0.0 and abs(m["approx_kl"]) < 1e-6
    m2 = train.check_finite(learner.step(arrays), 1)        # the policy moved: ratios spread
    assert m2["ratio_max"] - m2["ratio_min"] > 1e-4


def test_behaviour_scores_with_the_train_steps_attention(rollout):
    """The RL stage's scorer runs ``train.attention`` (blockwise: no [T, T] scores), the sampler and
    the model keep theirs; the log-probs agree with the default attention's."""
    import ml_collections
    from retroact_jax.stages import behaviour
    _, recs, _ = rollout
    model = _model(0)         # the fixture's model: an earlier test's learner took (donated) its arrays
    cfg = ml_collections.ConfigDict({"batch_buckets": "4", "chunk_buckets": "", "cache_buckets": "2048",
                                     "new_token_buckets": "16", "score_buckets": "1024"})
    b = behaviour.per_role({"planner": model, "reflector": model}, TOK, cfg, "blockwise")
    assert b["planner"] is b["reflector"] and model.cfg.attention == "default"
    assert nnx.merge(b["planner"].scorer.graphdef, b["planner"].scorer.params).cfg.attention == "blockwise"
    assert nnx.merge(b["planner"].sampler.graphdef, b["planner"].sampler.params).cfg.attention == "default"
    ts = batching.tokenize_sample(collect.rl_samples(recs, ("planner",))[0], TOK, eos_id=TOK.eos_id)
    ids, ones = ts.ids[None], np.ones((1, len(ts)), bool)
    np.testing.assert_allclose(b["planner"].scorer(ids, ones), scoring.Scorer(model)(ids, ones), atol=2e-5)


# ------------------------------------------------------------------------------- whole stage
def _config(tmp: pathlib.Path, iterations: int):
    c = rl_stage.default_config()
    c.env = "hotpotqa"
    c.model.planner = "test-char"
    c.model.lora_rank = 4
    c.collect.tasks_per_iteration = 2
    for k in ("trials", "batch_size", "env_workers", "max_steps", "planner_max_tokens", "reflector_max_tokens"):
        c.collect[k] = AGENT[k]
    c.collect.batch_buckets = "4"
    c.collect.cache_buckets = "2048,4096"
    c.collect.new_token_buckets = "16"
    c.collect.score_buckets = "1024,2048"
    c.replay.drop_zero_reward = False      # a random model scores 0: keep its rows to train on
    c.replay.max_chars = 0
    c.replay.max_age = 1                   # iteration 2 trains on its own collection only
    c.replay.max_tokens = 0
    c.il_data.files = str(tmp / "il.jsonl")
    c.train.iterations = iterations
    c.train.epochs = 1                     # the "iterated" schedule, constant lr
    c.optimizer.schedule = "constant"
    c.train.buckets = "1024,2048"
    c.train.checkpoint_every = 2
    c.train.progress = False
    c.train.tensorboard = False
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 0
    c.eval.every = 2
    c.eval.num_tasks = 1
    c.eval.trials = 1
    c.export.enabled = False
    return c


@pytest.fixture()
def tiny_models(monkeypatch, tmp_path):
    monkeypatch.setattr(setup, "load_one", lambda source, dtype, seed: (_model(seed), CharTok(),
                                                                          tiny(vocab_size=TOK.vocab_size)))
    il = [batching.Sample("planner", (("prompt", "Question: q"), ("generated", "\nThought 1: x\nAction 1: Finish[y]\n"))),
          batching.Sample("reflector", (("prompt", "Previous trial: q\nReflection:"), ("generated", " Search first.\n")))]
    (tmp_path / "il.jsonl").write_text("".join(json.dumps(samples_lib.sample_to_json(s)) + "\n" for s in il))
    return tmp_path


@pytest.mark.slow
def test_rl_stage_end_to_end_and_resume(tiny_models):
    tmp = tiny_models
    a = rl_stage.run_rl(_config(tmp, 2), tmp / "a")
    assert a["iterations"] == 2 and a["steps"] == 4 + 4      # 4 planner rows per collection, all kept
    rows = metrics.read_jsonl(tmp / "a" / "metrics.jsonl")
    tr = [r for r in rows if r["split"] == "train"]
    assert tr and all(np.isfinite(r["loss"]) and np.isfinite(r["il"]) for r in tr)
    assert all(r["rl_tokens_missing_behaviour"] == 0 for r in tr)
    col = [r for r in rows if r["split"] == "collect"]
    assert [r["iteration"] for r in col] == [1, 2] and all(r["behaviour_gap_max_abs"] < 1e-4 for r in col)
    assert all(r.get("rejected_reflector_no_reward_change", 0) + r.get("rejected_reflector_empty_output", 0) == 2
               for r in col)
    assert [r["iteration"] for r in rows if r["split"] == "eval"] == [2]
    buf_a = rl_stage.read_buffer(tmp / "a")
    assert buf_a.size("planner") == 4 and {e.iteration for e in buf_a.entries["planner"]} == {2}   # max_age 1
    assert buf_a.evicted["age"] == 4
    params_a = rl_stage.trained_params(tmp / "a")

    # stopped after iteration 1, resumed for iteration 2
    rl_stage.run_rl(_config(tmp, 1), tmp / "b")
    b = rl_stage.run_rl(_config(tmp, 2), tmp / "b")
    assert b["resumed_from_step"] == 4 and b["steps"] == 8
    _same(params_a, rl_stage.trained_params(tmp / "b"))
    assert rl_stage.read_buffer(tmp / "b").to_json() == buf_a.to_json()

    # killed in the middle of iteration 2: drop the last checkpoint, resume from step 6
    ck = tmp / "b" / "checkpoints"
    shutil.rmtree(ck / "8")
    (tmp / "b" / "eval").exists() and shutil.rmtree(tmp / "b" / "eval")
    b2 = rl_stage.run_rl(_config(tmp, 2), tmp / "b")
    assert b2["resumed_from_step"] == 6 and b2["steps"] == 8
    _same(params_a, rl_stage.trained_params(tmp / "b"))
    assert rl_stage.read_buffer(tmp / "b").to_json() == buf_a.to_json()
    steps = [r["step"] for r in metrics.read_jsonl(tmp / "b" / "metrics.jsonl") if r["split"] == "train"]
    assert steps == sorted(set(steps))                   # the resumed log reads as one run


def _same(pa, pb):
    assert pa.keys() == pb.keys() and pa
    for k in pa:
        np.testing.assert_allclose(pa[k], pb[k], rtol=0, atol=1e-6, err_msg=k)


def test_config_errors_name_the_key(tiny_models):
    c = _config(tiny_models, 1)
    c.method = "ppo"
    with pytest.raises(stages.StageError, match="config.method"):
        rl_stage.run_rl(c, tiny_models / "x")
    c = _config(tiny_models, 1)
    c.il_data.files = ""
    with pytest.raises(stages.StageError, match="il_rows_planner"):
        rl_stage.run_rl(c, tiny_models / "y")
    assert losses.LossConfig().epsilon == 0.3


@pytest.mark.slow
def test_original_schedule_decays_linearly_over_the_run(tiny_models):
    c = _config(tiny_models, 1)                # one collection round ...
    c.train.epochs = 2                         # ... several epochs over it, lr decayed to 0 (original)
    c.optimizer.schedule = "linear"
    c.eval.every = 0
    c.train.log_every = 1
    s = rl_stage.run_rl(c, tiny_models / "lin")
    total = json.loads((tiny_models / "lin" / "schedule.json").read_text())["total_steps"]
    assert total == s["steps"] == 2 * 4
    lrs = [r["lr_planner"] for r in metrics.read_jsonl(tiny_models / "lin" / "metrics.jsonl")
           if r["split"] == "train"]
    assert len(lrs) == 8 and lrs[0] == pytest.approx(1e-3) and lrs[-1] < 2e-4 and lrs == sorted(lrs, reverse=True)
