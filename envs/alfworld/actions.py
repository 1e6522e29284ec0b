"""The original ALFWorld agent's handling of a model output, as pure functions.

RetroAct's ALFWorld loop (``alfworld/agent/alfworld_trial.py``, adapted from Reflexion /
ReAct; docs/paper.md §1.3) does, per step, on the stripped model output:

1. ``format_action``: the lower-cased words are scanned for *entities*, a word made of digits at
   position >= 2 together with the word before it ("desk 1"). The first rule below whose verb is
   one of the words and whose entity count matches rewrites the output into the canonical command
   (so "Go to the desk 1." stays as is but "go to desk 1 now" becomes "go to desk 1", and
   "put mug 1 into coffeemachine 1" becomes "put mug 1 in/on coffeemachine 1"). Quirks kept on
   purpose: ``close`` needs two entities and keeps the first; ``toggle`` needs two; the rules run
   *before* the ``think:`` test, so a thought naming a verb and its entities ("think: I go to
   desk 1") becomes that command. An output matching no rule is kept verbatim; if it has more
   than 8 words it is rejected with ``FORMAT_HINT`` (no game step).
2. An output starting with ``think:`` gets ``OK.`` (no game step).
3. Otherwise the game runs it; TextWorld answers ``Nothing happens.`` to anything that is not
   exactly an admissible command. ``process_observation`` drops the "You arrive at loc N. " prefix.
"""
from __future__ import annotations

FORMAT_HINT = "Please generate an action follow the action format in the examples."
THINK_OK = "OK."
NOTHING_HAPPENS = "Nothing happens."
MAX_FREE_WORDS = 8

# (verb, number of entities required, template over the entities), tried in this order.
RULES: tuple[tuple[str, int, str], ...] = (
    ("go", 1, "go to {0}"),
    ("take", 2, "take {0} from {1}"),
    ("put", 2, "put {0} in/on {1}"),
    ("open", 1, "open {0}"),
    ("close", 2, "close {0}"),
    ("toggle", 2, "toggle {0} {1}"),
    ("clean", 2, "clean {0} with {1}"),
    ("heat", 2, "heat {0} with {1}"),
    ("cool", 2, "cool {0} with {1}"),
)


def entities(words: list[str]) -> list[str]:
    """"<word> <number>" for every all-digit word at position >= 2 (the original's rule)."""
    return [f"{words[i - 1]} {w}" for i, w in enumerate(words) if i > 1 and w.isdigit()]


def format_action(text: str) -> tuple[str, bool]:
    """(command to run, well-formed). ``well-formed`` is False only for the >8-word rejection."""
    words = text.lower().split()
    found = entities(words)
    present = set(words)
    for verb, count, template in RULES:
        if verb in present and len(found) == count:
            return template.format(*found), True
    return text, len(words) <= MAX_FREE_WORDS


def is_think(command: str) -> bool:
    return command.startswith("think:")


def process_observation(obs: str) -> str:
    """Drop the "You arrive at loc N. " prefix of a move's feedback, as the original agent does."""
    if obs.startswith("You arrive at loc "):
        obs = obs[obs.find(". ") + 2:]
    return obs


def initial_observation(intro: str) -> str:
    """The game's intro without its "-= Welcome to TextWorld, ALFRED! =-" header paragraph."""
    return "\n".join(intro.split("\n\n")[1:])
