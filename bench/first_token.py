"""How often a model ends a planner call at its first generated token (prints one JSON object).

On real agent prompts of the test splits (zero-shot planner format, trial 1): HotpotQA ``Thought 1:``
(stop ``\\n``), HotpotQA ``Action 1:`` after the model's own greedy thought, InterCode-SQL ``Thought 1:``
(stop ``Observation``). For each: the fraction of prompts whose greedy first token is a stop / EOS
token, the mean probability of such a token at temperature 1 (the expected fraction of T=1 samples),
and what the greedy completion is with ``min_new_tokens`` 0 and 1.

    python -m bench.first_token [--model embedded] [--tasks 20] [--mins 0,1] [--envs hotpotqa,intercode_sql]
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from retroact_jax import sampling
from retroact_jax.agent import protocols
from retroact_jax.agent.spans import join_cue


CHUNK = 4


def _stop_set(tok, vocab: int, stop: tuple[str, ...]) -> np.ndarray:
    mask = np.zeros((vocab,), bool)
    for i, t in enumerate(tok.token_texts()[:vocab]):
        mask[i] = any(s in t for s in stop)
    mask[list(tok.eos_ids)] = True
    return mask


def _encode(tok, text):
    return tok.encode(text, add_bos=True) if tok.add_bos else tok.encode(text)


def measure(sampler, tok, prompts: list[str], stop: tuple[str, ...], key, mins=(0, 1)) -> dict:
    v = sampler.cfg.vocab_size
    ended = _stop_set(tok, v, stop)
    ids = [_encode(tok, p) for p in prompts]
    chunks = [ids[i:i + CHUNK] for i in range(0, len(ids), CHUNK)]    # small batches: bounded memory
    logits = np.concatenate([np.asarray(sampler.start(c).last_logits_BxV)[:len(c)] for c in chunks])
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    greedy = logits.argmax(-1)
    seqs = sampling.stop_token_sequences(tok.encode, tok.decode, stop)
    out = {"prompts": len(prompts), "greedy_first_token_ends": float(np.mean(ended[greedy])),
           "t1_first_token_ends_mean_prob": float(np.mean(probs[:, ended].sum(-1))),
           "greedy_first_tokens": sorted({tok.decode([int(g)]) for g in greedy})}
    newline = np.asarray(["\n" in t for t in tok.token_texts()[:v]])
    out["greedy_first_token_newline"] = float(np.mean(newline[greedy]))
    out["t1_first_token_newline_mean_prob"] = float(np.mean(probs[:, newline].sum(-1)))
    t1 = []
    def texts(temperature, n_min):
        got = []
        for c in chunks:
            _, o = sampler.sample(c, key, 48, temperature=temperature, stop_mask=ended, stop_seqs=seqs,
                                  min_new_tokens=n_min)
            got += [tok.decode(list(o.tokens_BxN[i, :o.lengths_B[i]])) for i in range(len(c))]
        return got

    for n_min in mins:
        greedy_texts = texts(0.0, n_min)
        out[f"greedy_min{n_min}_examples"] = greedy_texts[:3]
        out[f"greedy_min{n_min}_empty"] = float(np.mean([not t.split(stop[0])[0].strip() for t in greedy_texts]))
        out[f"t1_min{n_min}_empty"] = float(np.mean([not t.split(stop[0])[0].strip() for t in texts(1.0, n_min)]))
        t1.append(greedy_texts)
    out["_greedy_texts"] = t1[0]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--tasks", type=int, default=20)
    ap.add_argument("--mins", default="0,1", help="min_new_tokens values to decode with (0 first)")
    ap.add_argument("--envs", default="hotpotqa,intercode_sql")
    a = ap.parse_args(argv)
    mins = tuple(int(x) for x in a.mins.split(","))
    from retroact_jax.models import hub
    t0 = time.time()
    model, tok, _ = hub.load_pretrained(a.model)
    sampler = sampling.Sampler(model, pad_id=tok.pad_id or 0, eos_ids=tok.eos_ids)
    key = jax.random.key(0)
    res = {"model": a.model, "add_bos": bool(tok.add_bos)}

    if "hotpotqa" in a.envs:
        _hotpotqa(res, sampler, tok, key, a.tasks, mins)
    if "intercode_sql" in a.envs:
        _intercode(res, sampler, tok, key, a.tasks, mins)
    res["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(res, indent=1))


def _hotpotqa(res, sampler, tok, key, n, mins):
    import envs
    hp = protocols.protocol_for("hotpotqa")
    hp_tasks = envs.make("hotpotqa", "test").tasks[:n]
    thought = [hp.planner_prompt(t, t.instruction, []) + "\nThought 1:" for t in hp_tasks]
    res["hotpotqa_thought"] = measure(sampler, tok, thought, ("\n",), key, mins)
    greedy_thoughts = res["hotpotqa_thought"].pop("_greedy_texts")
    action = [p + g + join_cue(g, "\nAction 1:") for p, g in zip(thought, greedy_thoughts)]
    res["hotpotqa_action"] = measure(sampler, tok, action, ("\n",), key, mins)
    res["hotpotqa_action"].pop("_greedy_texts")



def _intercode(res, sampler, tok, key, n, mins):
    import envs
    ic = protocols.protocol_for("intercode_sql")
    ic_tasks = envs.make("intercode_sql", "test").tasks[:n]
    ic_thought = [ic.planner_prompt(t, t.instruction, []) + "\nThought 1:" for t in ic_tasks]
    res["intercode_thought"] = measure(sampler, tok, ic_thought, ("Observation",), key, mins)
    res["intercode_thought"].pop("_greedy_texts")


if __name__ == "__main__":
    main()
