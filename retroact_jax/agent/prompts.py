"""Prompt texts per environment and role, and the functions that fill them.

Zero-shot formats (the fine-tuned planner / reflector) follow the released imitation data
(``data/retroact/*.json``, docs/paper.md §2.3) character for character where the data shows them:

ALFWorld planner   ``Interact with a household to solve a task.\\n`` [memory] ``Here is the task:\\n{ob}``
                   then ``\\n>`` before every action, ``> action`` / observation lines.
InterCode planner  the InterCode ReAct instruction ``...(2) submit, which indicates that the previous
                   observation is the answer\\n`` [memory] ``Here is the task:\\nQuestion: {q}``, then
                   ``\\nThought n:`` ... ``\\nAction n: ...`` ... ``\\nObservation n: ...``.
memory             ``Your memory for the task below:\\nTrial 0:\\n{m}\\nTrial 1:\\n{m}\\n`` (last 3).
reflector          the Reflexion instruction ``... Give your plan after "Plan".`` immediately
                   followed (no separator, as in the IL files) by the trial log, ``\\n\\nSTATUS: FAIL``,
                   ``\\n\\nPlans from past attempts:\\nTrial #i: {m}\\n`` (last 3) and ``\\n\\nNew plan:``.
HotpotQA           no released IL file: RetroAct's ``prompts_zs.py`` texts (docs/paper.md §1.2) without
                   the 4-space indentation and blank lines of its f-strings:
                   ``{instruction}\\n`` [``{REFLECTION_HEADER}Reflections:\\n- r1\\n- r2\\n``]
                   ``Question: {q}`` then ``\\nThought n:`` / ``\\nAction n:`` / ``\\nObservation n: ``.
                   Reflector: ``{instruction}\\n\\nPrevious trial:\\nQuestion: {q}{scratchpad}\\n\\nReflection:``.

Few-shot variants (expert and prompting baselines) insert the exemplars of ``fewshot.py`` the way
ReAct / Reflexion / InterCode do ("Here are two examples." / "Here are some examples:").
"""
from __future__ import annotations

from typing import Sequence

# ---------------------------------------------------------------------------------------------
# HotpotQA (RetroAct agent/prompts_zs.py, texts as facts)
HOTPOT_INSTRUCTION = (
    "Solve a question answering task with interleaving Thought, Action, Observation steps. "
    "Thought can reason about the current situation, and Action can be two types: \n"
    "(1) Search[entity], Invoke a local searcher with the chosen keywords or entities to gather "
    "relevant information. You only need to complete the thought step and output Search[Entity] "
    "in the action step, and we will return the relevant content in \"Observation\" for you. \n"
    "(2) Finish[answer], which returns the answer and finishes the task.\n"
    "You may take as many steps as necessary.")
HOTPOT_REFLECTION_HEADER = (
    "You have attempted to answer following question before and failed. The following "
    "reflection(s) give a plan to avoid failing to answer the question in the same way you did "
    "previously. Use them to improve your strategy of correctly answering the given question.\n")
HOTPOT_REFLECT_INSTRUCTION = (
    "You are an advanced reasoning agent that can improve based on self refection. You will be "
    "given a previous reasoning trial in which you were given access to an local searcher "
    "environment and a question to answer. You were unsuccessful in answering the question either "
    "because you guessed the wrong answer with Finish[<answer>], or you used up your set number of "
    "reasoning steps. In a few sentences, Diagnose a possible reason for failure and devise a new, "
    "concise, high level plan that aims to mitigate the same failure. Use complete sentences.")
HOTPOT_TRUNCATED = "[truncated wikipedia excerpt]"

# ALFWorld (IL data; Reflexion alfworld_runs)
ALFWORLD_INSTRUCTION = "Interact with a household to solve a task."
ALFWORLD_FEWSHOT_INSTRUCTION = "Interact with a household to solve a task. Here are two examples.\n"

# InterCode (IL data; InterCode TemplateReAct.get_init_msg)
INTERCODE_SETTINGS = {"sql": ("MySQL Database", "SQL"), "bash": ("Bourne Shell", "bash")}


def intercode_instruction(language: str) -> str:
    setting, code = INTERCODE_SETTINGS[language]
    return (f"Interact with a {setting} system using {code} queries to answer a question.\n"
            "Use interleaving Thought, Action, Observation steps.\n"
            "Thought can reason about the current situation, and Action can be two types: \n"
            f"(1) execute, which executes {code} code on the {setting} system\n"
            "(2) submit, which indicates that the previous observation is the answer")


def reflexion_instruction(task_kind: str) -> str:
    """The Reflexion / RetroAct reflector instruction; ``task_kind`` "task" or "programming task"."""
    return (
        "You will be given the history of a past experience in which you were placed in an "
        f"environment and given a {task_kind} to complete. You were unsuccessful in completing the "
        "task. Do not summarize your environment, but rather think about the strategy and path you "
        "took to attempt to complete the task. Devise a concise, new plan of action that accounts "
        "for your mistake with reference to specific actions that you should have taken. For "
        "example, if you tried A and B but forgot C, then devise a plan to achieve C with "
        "environment-specific actions. You will need this later when you are solving the same "
        "task. Give your plan after \"Plan\".")


# ---------------------------------------------------------------------------------------------
def window(memory: Sequence[str], last: int | None) -> list[str]:
    """The reflections the next trial sees: all (``last=None``, HotpotQA) or the last ``last``."""
    mem = list(memory)
    return mem if last is None else mem[-last:] if last > 0 else []


def trial_memory_block(memory: Sequence[str]) -> str:
    """ALFWorld / InterCode planner memory (``EnvironmentHistory._get_base_query``, IL layout)."""
    if not memory:
        return ""
    return ("Your memory for the task below:"
            + "".join(f"\nTrial {i}:\n{m.strip()}" for i, m in enumerate(memory)) + "\n")


def hotpot_memory_block(memory: Sequence[str]) -> str:
    """HotpotQA planner memory (``format_reflections``): header + bulleted reflections."""
    if not memory:
        return ""
    return HOTPOT_REFLECTION_HEADER + "Reflections:\n- " + "\n- ".join(m.strip() for m in memory) + "\n"


def past_plans_block(memory: Sequence[str]) -> str:
    """Reflector input: the plans of past attempts (``generate_reflections.py``)."""
    if not memory:
        return ""
    return "\n\nPlans from past attempts:\n" + "".join(f"Trial #{i}: {m}\n" for i, m in enumerate(memory))


# ---------------------------------------------------------------------------------------------
def hotpot_planner(question: str, memory: Sequence[str], examples: str | None = None) -> str:
    shots = f"Here are some examples:\n{examples}\n(END OF EXAMPLES)\n" if examples else ""
    return f"{HOTPOT_INSTRUCTION}\n{shots}{hotpot_memory_block(memory)}Question: {question}"


def hotpot_reflector(question: str, scratchpad: str, examples: str | None = None) -> str:
    shots = f"\nHere are some examples:\n{examples}\n(END OF EXAMPLES)" if examples else ""
    return (f"{HOTPOT_REFLECT_INSTRUCTION}{shots}\n\nPrevious trial:\nQuestion: {question}"
            f"{scratchpad}\n\nReflection:")


def alfworld_planner(ob: str, memory: Sequence[str], examples: Sequence[str] | None = None) -> str:
    head = (ALFWORLD_FEWSHOT_INSTRUCTION + "".join(e.rstrip("\n") + "\n\n" for e in examples)
            if examples else ALFWORLD_INSTRUCTION + "\n")
    return f"{head}{trial_memory_block(memory)}Here is the task:\n{ob}"


def intercode_planner(language: str, question: str, memory: Sequence[str],
                      examples: str | None = None) -> str:
    shots = f"\nHere are some examples.\n{examples.rstrip(chr(10))}" if examples else ""
    return (f"{intercode_instruction(language)}{shots}\n{trial_memory_block(memory)}"
            f"Here is the task:\nQuestion: {question}")


def reflexion_reflector(task_kind: str, log: str, memory: Sequence[str], status: str = "FAIL",
                        examples: str | None = None) -> str:
    """ALFWorld / InterCode reflector prompt; ``log`` is the trial text after "Here is the task:"."""
    shots = f" Here are two examples:\n{examples.rstrip(chr(10))}\n\n" if examples else ""
    return (f"{reflexion_instruction(task_kind)}{shots}{log}\n\nSTATUS: {status}"
            f"{past_plans_block(memory)}\n\nNew plan:")


# ---------------------------------------------------------------------------------------------
def truncate_scratchpad(scratchpad: str, count_tokens, n_tokens: int = 1600) -> str:
    """RetroAct / Reflexion ``truncate_scratchpad``: while the scratchpad has more than ``n_tokens``
    tokens, replace the longest remaining ``Observation`` line (by token count) with
    ``Observation n: [truncated wikipedia excerpt]``. Among equally long observations the later
    line goes first (the original's stable sort + ``pop(-1)``). Stops when none is left."""
    lines = scratchpad.split("\n")
    obs = [i for i, ln in enumerate(lines) if ln.startswith("Observation")]
    obs.sort(key=lambda i: count_tokens(lines[i]))      # stable: ties keep line order
    while count_tokens("\n".join(lines)) > n_tokens and obs:
        i = obs.pop(-1)
        lines[i] = lines[i].split(":")[0] + ": " + HOTPOT_TRUNCATED
    return "\n".join(lines)


def approx_token_count(text: str) -> int:
    """A tokenizer-free count for scripted runs and tests: words and punctuation marks, the unit a
    BPE tokenizer (tiktoken, SmolLM2) mostly assigns one token each; within ~15% of SmolLM2's count
    on English prose. LM policies count with their own tokenizer instead."""
    import re
    return len(re.findall(r"\w+|[^\w\s]", text))
