"""The methods of the paper's Table 2, each a whole pipeline (docs/methods.md, docs/paper.md §5).

A ``Method`` says which stages run, which roles imitation learning trains, which RL variant runs
(planner and reflector jointly, the planner alone, or expert iteration of the planner), and what
the reflector is at evaluation: trained (RetroAct), prompted with few-shot exemplars (Reflexion) or
absent (ReAct and the fine-tuned baselines, whose first trial is their only trial, so IR = FR = AR).

    m = methods.get("sft_rl")
    m.stages, m.il_roles, m.rl, m.reflector, m.eval_trials(10)

``retroact_single`` is RetroAct with one shared model for both roles (``--config.multi_agent=False``
on ``retroact`` runs the same), so one ``config.methods`` list holds all seven rows of Table 2.
"""
from __future__ import annotations

import dataclasses

TRAINED, PROMPTED, NONE = "trained", "prompted", "none"


class MethodError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Method:
    name: str                     # config.method
    label: str                    # the Table 2 row label
    stages: tuple[str, ...]       # the stages of the whole pipeline, in order
    il_roles: tuple[str, ...]     # roles the IL stage trains (() = no IL)
    rl: str                       # the RL stage's method ("" = no RL): retroact | sft_rl | sft_ei
    reflector: str                # at evaluation: trained | prompted | none
    few_shot: bool                # prompted with exemplars (the base model, no training)
    single_agent: bool = False    # always one shared model for both roles (``retroact_single``)

    def eval_trials(self, k: int) -> int:
        """Trials run per task at evaluation: K with a reflector, else 1 (its score carries over)."""
        return k if self.reflector != NONE else 1

    def multi_agent(self, configured: bool = True) -> bool:
        """Two models (planner, reflector): ``config.multi_agent``, unless the method is single-agent."""
        return bool(configured) and not self.single_agent

    def run_name(self, multi_agent: bool = True) -> str:
        """The method's run directory and results key (``retroact_single`` when single-agent)."""
        return self.name if multi_agent or self.single_agent else f"{self.name}_single"

    def row_label(self, multi_agent: bool = True) -> str:
        return self.label if multi_agent or self.single_agent else f"{self.label} (single-agent)"


METHODS = {m.name: m for m in (
    Method("react", "ReAct", ("eval",), (), "", NONE, True),
    Method("reflexion", "Reflexion", ("eval",), (), "", PROMPTED, True),
    Method("sft", "SFT", ("il", "eval"), ("planner",), "", NONE, False),
    Method("sft_ei", "SFT+EI", ("il", "rl", "eval"), ("planner",), "sft_ei", NONE, False),
    Method("sft_rl", "SFT+RL", ("il", "rl", "eval"), ("planner",), "sft_rl", NONE, False),
    Method("retroact", "RetroAct", ("il", "rl", "eval"), ("planner", "reflector"), "retroact", TRAINED, False),
    Method("retroact_single", "RetroAct (single-agent)", ("il", "rl", "eval"), ("planner", "reflector"),
           "retroact", TRAINED, False, single_agent=True),
)}


def get(name: str) -> Method:
    if name not in METHODS:
        raise MethodError(f"config.method={name!r}: choose one of {', '.join(METHODS)}")
    return METHODS[name]
