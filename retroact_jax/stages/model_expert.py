"""The HotpotQA LLM expert (docs/paper.md §2.1): a language model prompted few-shot rolls out the TRAIN
questions over several trials, writing its own reflections; the successful trials and the
reflections that preceded them, rendered in the zero-shot format, are the imitation data.

What the original did (RetroAct's ``agents_fs.py`` driven by Mixtral-8x7B, then its
``data_preprocess.py``), and how it is done here:

* **Few-shot rollouts.** The planner prompt is the agent's HotpotQA instruction with ``Here are some
  examples:`` ... ``(END OF EXAMPLES)`` (ReAct's 6 exemplars); the reflector prompt adds Reflexion's
  reflection exemplars (2). The original's exemplar files are not released, so the exemplars are
  ``agent.fewshot``'s: gold trajectories (and scripted failures + reflection) of the first train
  questions, played through the real env, in the exact inference format. Those questions are left
  out of the expert's question set (the model would copy their answers). One model writes both
  the actions and the reflections (two ``LMPolicy``s over one sampler, as the original used one
  model for both roles). Greedy decoding, 10 trials, HotpotQA's 5-step and 3896-token limits: the
  loop of ``agent.rollout.evaluate``, so the run is cached in ``trajectories.jsonl`` and an
  interrupted run resumes at the next unfinished trial.
* **Zero-shot rendering.** A training sample is what the fine-tuned agent sees at inference: the
  zero-shot prompt. A trial record's first span (the few-shot planner prompt) is replaced by the
  zero-shot planner prompt with the same reflections; a reflection's prompt by the zero-shot
  reflector prompt with the same (truncated) scratchpad. Every other span is kept as generated and
  observed, so the sample's text and span boundaries equal what the zero-shot agent loop builds
  for the same completions (tests/test_model_expert.py replays them through the loop). The
  original's preprocessing did the same with string surgery (few-shot part stripped).
* **EM filter.** ``expert.il_samples``: a planner sample per trial the evaluator accepts (normalised
  exact match), a reflector sample per reflection followed by such a trial.

Output: ``<out_dir>/hotpotqa/model-<name>-<key>/`` with ``expert.json`` (what the key covers:
source, exemplars, decoding, seed), ``trajectories.jsonl`` (few-shot, as rolled out),
``il_samples.jsonl`` (zero-shot) and ``summary.json`` (questions tried / solved, positives per role,
trial at which questions were solved, halts).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import pathlib
import re
from collections import Counter
from typing import Any, Mapping, Sequence

from retroact_jax import benchmarks
from retroact_jax.agent import prompts, protocols
from retroact_jax.stages import expert as expert_lib
from retroact_jax.stages.expert import ExpertError

ENVS = ("hotpotqa",)
DEFAULT_TRIALS = 10      # the agent's K (docs/paper.md §1.1): trials stop at the first success


@dataclasses.dataclass(frozen=True)
class ModelExpertConfig:
    planner_examples: int = 6      # few-shot trajectories in the planner prompt (ReAct: 6)
    reflector_examples: int = 2    # failed trials + reflection in the reflector prompt (Reflexion: 2)
    temperature: float = 0.0       # planner and reflector (the original: vLLM greedy)
    max_new_tokens: int = 0        # per model call; 0: the protocol's (250, the original's max_tokens)
    param_dtype: str = "float32"   # float32 (CPU) | bfloat16 (accelerators)


def check(env_name: str, source: str, mcfg: ModelExpertConfig) -> None:
    """Refuse a config that cannot work, before any model is loaded or env stepped."""
    if env_name not in ENVS:
        raise ExpertError(f"the model expert is built for {ENVS} (few-shot prompts and zero-shot "
                          f"rendering of that benchmark); got env {env_name!r}: use expert='gold'")
    from retroact_jax.models import embedded
    if embedded.is_packaged(source):
        try:
            embedded.check_installed(source)
        except embedded.EmbeddedModelError as e:
            raise ExpertError(str(e)) from None
    elif source != "tiny-random" and not pathlib.Path(source).exists():
        raise ExpertError(f"expert model source {source!r} is neither a packaged model "
                          f"({', '.join(embedded.NAMES)}) nor an existing HF directory / .gguf file")
    if mcfg.planner_examples < 1 or mcfg.reflector_examples < 1:
        raise ExpertError(f"the model expert is few-shot: planner_examples and reflector_examples "
                          f"must be >= 1, got {mcfg.planner_examples}, {mcfg.reflector_examples}")
    if mcfg.temperature < 0 or mcfg.max_new_tokens < 0:
        raise ExpertError(f"temperature and max_new_tokens must be >= 0: {mcfg}")


def build_policies(source: str, param_dtype: str = "float32"):
    """(planner, reflector): two ``LMPolicy``s over ONE sampler of the source's model."""
    from retroact_jax import sampling
    from retroact_jax.agent.lm_policy import LMPolicy
    from retroact_jax.stages import setup
    models, tok, _ = setup.load_models(source, roles=("planner",), param_dtype=param_dtype)
    sampler = sampling.Sampler(models["planner"], pad_id=tok.pad_id if tok.pad_id is not None else 0,
                               eos_ids=tok.eos_ids)
    return LMPolicy(sampler, tok), LMPolicy(sampler, tok, hold_cache=False)


def exemplars(env_name: str, mcfg: ModelExpertConfig) -> tuple[str, str, set[int]]:
    """(planner exemplars, reflector exemplars, indices of the train tasks they show)."""
    from retroact_jax.agent import fewshot
    p_ex = fewshot.planner_examples(env_name, mcfg.planner_examples)
    r_ex = fewshot.reflector_examples(env_name, mcfg.reflector_examples)
    shown = fewshot.example_task_indices(env_name, max(mcfg.planner_examples, mcfg.reflector_examples))
    return p_ex, r_ex, shown


def run_key(source: str, mcfg: ModelExpertConfig, seed: int, p_ex: str, r_ex: str) -> dict:
    """What the rollouts depend on besides the questions and the trial count (both extendable)."""
    src = str(pathlib.Path(source).resolve()) if pathlib.Path(source).exists() else source
    sha = hashlib.sha256((p_ex + "\0" + r_ex).encode()).hexdigest()[:16]
    return {"source": src, **dataclasses.asdict(mcfg), "seed": int(seed), "exemplars_sha": sha}


def run_dir(out_dir: str | pathlib.Path, env_name: str, source: str, key: Mapping) -> pathlib.Path:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", pathlib.Path(source).name or str(source))[:40]
    h = hashlib.sha256(json.dumps(dict(key), sort_keys=True).encode()).hexdigest()[:10]
    return pathlib.Path(out_dir) / env_name / f"model-{name}-{h}"


def collect(env_name: str, out_dir: str | pathlib.Path, cfg: expert_lib.ExpertConfig,
            mcfg: ModelExpertConfig = ModelExpertConfig(), split: str | None = None,
            task_indices: Sequence[int] | None = None, policies=None):
    """Roll the few-shot expert out (or resume / reuse the cache). Returns (records of the selected
    tasks, {task index: Task}, planner exemplars, reflector exemplars, run dir, info).
    ``policies``: (planner, reflector) instead of the source's model (tests)."""
    import envs
    from retroact_jax import evaluation
    from retroact_jax.agent import loop, rollout
    check(env_name, cfg.expert, mcfg)
    split = split or benchmarks.get(env_name).train_split
    trials = int(cfg.trials) or DEFAULT_TRIALS
    if trials < 1:
        raise ExpertError(f"expert trials must be >= 1 (0: the default {DEFAULT_TRIALS}), got {cfg.trials}")
    p_ex, r_ex, shown = exemplars(env_name, mcfg)
    probe = envs.make(env_name, split)
    try:
        n_all = len(probe.tasks)
        if task_indices is None:
            indices = expert_lib.pick(n_all, env_name, cfg, skip=shown)
        else:
            indices = [int(i) for i in task_indices]
            if shown & set(indices):
                raise ExpertError(f"tasks {sorted(shown & set(indices))} are the few-shot exemplars")
        tasks = {i: probe.task_at(i) for i in indices}
    finally:
        probe.close()
    key = run_key(cfg.expert, mcfg, cfg.seed, p_ex, r_ex)
    d = run_dir(out_dir, env_name, cfg.expert, key)
    d.mkdir(parents=True, exist_ok=True)
    meta = d / "expert.json"
    if meta.exists() and json.loads(meta.read_text()) != key:
        raise ExpertError(f"{meta} was written by another expert setting: {meta.read_text()[:200]}")
    meta.write_text(json.dumps(key, indent=2) + "\n")
    planner, reflector = policies if policies is not None else build_policies(cfg.expert, mcfg.param_dtype)
    agent_cfg = loop.AgentConfig(
        trials=trials, batch_size=cfg.batch_size, temperature=mcfg.temperature,
        reflector_temperature=mcfg.temperature, seed=cfg.seed, env_workers=cfg.env_workers,
        planner_max_tokens=mcfg.max_new_tokens or None, reflector_max_tokens=mcfg.max_new_tokens or None)
    rollout.evaluate(env_name, split, indices, planner, reflector, agent_cfg, d,
                     planner_examples=p_ex, reflector_examples=r_ex, show_progress=cfg.progress)
    wanted = {tasks[i].id for i in indices}
    recs = [r for r in evaluation.TrajectoryLog(d / "trajectories.jsonl").load() if r["task_id"] in wanted]
    info = {"trials_per_question": trials, "exemplar_tasks_excluded": sorted(shown)}
    return recs, tasks, p_ex, r_ex, d, info


# ------------------------------------------------------------------------------ zero-shot rendering
def _plain(span: Mapping) -> dict:
    """A span without the sampler's ids / log-probs (they belong to the few-shot context)."""
    return {"role": span["role"], "text": span["text"]}


def zero_shot_record(rec: Mapping[str, Any], task, p_ex: str, r_ex: str) -> dict:
    """The trial record as the zero-shot agent would have built it with the same completions."""
    proto = protocols.protocol_for(rec["env"])
    where = f"{rec['env']}/{rec['split']} task {rec['task_index']} trial {rec['trial']}"
    q = task.instruction                                   # the env's reset observation
    out = copy.deepcopy(dict(rec))
    spans = [_plain(s) for s in rec["planner"]["spans"]]
    if spans[0]["text"] != proto.planner_prompt(task, q, rec["memory"], p_ex):
        raise ExpertError(f"{where}: the planner prompt is not this expert's few-shot prompt")
    spans[0] = {"role": "prompt", "text": proto.planner_prompt(task, q, rec["memory"], None)}
    out["planner"] = {"spans": spans}
    refl = rec.get("reflection")
    if refl:
        prompt = refl["spans"][0]["text"]
        head, tail = prompts.hotpot_reflector(q, "\0", r_ex).split("\0")
        if not (prompt.startswith(head) and prompt.endswith(tail)):
            raise ExpertError(f"{where}: the reflector prompt is not this expert's few-shot prompt")
        pad = prompt[len(head): len(prompt) - len(tail)]
        zs_prompt = {"role": "prompt", "text": prompts.hotpot_reflector(q, pad, None)}
        out["reflection"] = {**refl, "spans": [zs_prompt] + [_plain(s) for s in refl["spans"][1:]]}
    return out


# ------------------------------------------------------------------------------------ entry point
def summarize(records: Sequence[Mapping], counts: Mapping, info: Mapping) -> dict:
    solved_at = Counter(int(r["trial"]) for r in records if expert_lib.passes_evaluator(r))
    return {"questions_tried": counts["tasks"], "questions_solved": counts["tasks_solved"],
            "trials": counts["trials"], "reflections": counts["reflections"],
            "positives": {"planner": counts["trials_kept"], "reflector": counts["reflector_kept"]},
            "solved_at_trial": {str(k): solved_at[k] for k in sorted(solved_at)},
            "halted": dict(Counter(str(r.get("halted")) for r in records)),
            "success_but_rejected": counts["success_but_rejected"], **info}


def expert_il_data(env_name: str, out_dir: str | pathlib.Path, cfg: expert_lib.ExpertConfig,
                   mcfg: ModelExpertConfig = ModelExpertConfig(), **kw):
    """collect -> zero-shot rendering -> EM filter -> samples; writes ``il_samples.jsonl`` and
    ``summary.json`` beside the rollouts. (planner samples, reflector samples, summary)."""
    recs, tasks, p_ex, r_ex, d, info = collect(env_name, out_dir, cfg, mcfg, **kw)
    by_index = {t.index: t for t in tasks.values()}
    zs = [zero_shot_record(r, by_index[int(r["task_index"])], p_ex, r_ex) for r in recs]
    planner, reflector, counts = expert_lib.il_samples(zs)
    expert_lib.write_samples(d, planner + reflector)
    summary = {"env": env_name, "expert": cfg.expert, **summarize(recs, counts, info)}
    (d / "summary.json").write_text(json.dumps(
        {**summary, "config": dataclasses.asdict(cfg), "model_config": dataclasses.asdict(mcfg)},
        indent=2) + "\n")
    return planner, reflector, summary
