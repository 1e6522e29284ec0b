"""The ALFWorld game files: unpack a split's archive once, list its games in a stable order.

The data pack (``data/alfworld/README.md``) ships one ``<split>.tar.xz`` per split in the classic
ReAct/Reflexion grammar. ``split_dir(split)`` unpacks it once into the cache
(``$RETROACT_CACHE/alfworld/<split>-<sha12>``): to a temporary folder first, then checked
(game count), indexed and renamed into place, so a crash or a concurrent process never leaves a
half-unpacked split behind. The index (``index.json``) lists every game sorted by its path, with
the task line of its goal, its task type and its expert walkthrough, so listing tasks never needs
the (slow) TextWorld game loader.
"""
from __future__ import annotations

import functools
import json
import os
import pathlib
import re
import shutil
import tarfile
import tempfile

from envs import data
from envs.base import EnvError

# Games per split (data/alfworld/README.md); a mismatch means a corrupt or foreign archive.
GAME_COUNTS = {"valid_unseen": 134, "valid_seen": 140, "valid_train": 200, "train": 3553}
# The names ALFWorld / the paper use for the splits.
ALIASES = {
    "test": "valid_unseen",                      # the paper's evaluation split (134 games)
    "eval_out_of_distribution": "valid_unseen",  # AlfredTWEnv's name
    "eval_in_distribution": "valid_seen",
}
# ALFRED task types (traj_data.json "task_type", also the first field of a task folder's name).
TASK_TYPES = ("look_at_obj_in_light", "pick_and_place_simple", "pick_clean_then_place_in_recep",
              "pick_cool_then_place_in_recep", "pick_heat_then_place_in_recep",
              "pick_two_obj_and_place")
INDEX = "index.json"
_TASK_RULE = re.compile(r'"task"\s*:\s*\[\s*\{\s*"rhs"\s*:\s*"((?:[^"\\]|\\.)*)"')


def canonical_split(split: str) -> str:
    s = ALIASES.get(split, split)
    if s not in GAME_COUNTS:
        raise EnvError(f"alfworld: unknown split {split!r}; known: {sorted(GAME_COUNTS)} "
                       f"and aliases {sorted(ALIASES)}")
    return s


def task_line(grammar: str, where: str = "") -> str:
    """The goal sentence ("Your task is to: ...") that the game's grammar prints after the room."""
    found = _TASK_RULE.findall(grammar)
    if len(found) != 1:
        raise data.DataError(f"alfworld game {where}: expected one 'task' rule in its grammar, "
                             f"found {len(found)}")
    return json.loads(f'"{found[0]}"')


def _build_index(root: pathlib.Path, split: str) -> list[dict]:
    games_root = root / "json_2.1.1" / split
    entries = []
    for gamefile in sorted(games_root.glob("*/*/game.tw-pddl")):
        rel_id = gamefile.parent.relative_to(games_root).as_posix()
        with open(gamefile, encoding="utf-8") as f:
            game = json.load(f)
        walkthrough = game.get("walkthrough")
        if not isinstance(walkthrough, list) or not walkthrough:
            raise data.DataError(f"alfworld game {rel_id}: no walkthrough in game.tw-pddl")
        task_type = rel_id.split("-", 1)[0]
        if task_type not in TASK_TYPES:
            raise data.DataError(f"alfworld game {rel_id}: unknown task type {task_type!r}")
        entries.append({"id": rel_id, "gamefile": gamefile.relative_to(root).as_posix(),
                        "task_type": task_type, "instruction": task_line(game["grammar"], rel_id),
                        "walkthrough": walkthrough})
    return entries


def split_dir(split: str) -> pathlib.Path:
    """The unpacked, indexed folder of ``split`` (unpacking the archive on first use)."""
    split = canonical_split(split)
    name = f"alfworld/{split}.tar.xz"
    archive = data.path(name)
    base = data.cache_dir("alfworld")
    final = base / f"{split}-{data.PACK[name][:12]}"
    if (final / INDEX).is_file():
        return final
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{split}-", dir=base))
    try:
        os.chmod(tmp, 0o755)
        with tarfile.open(archive) as tf:
            tf.extractall(tmp, filter="data")
        entries = _build_index(tmp, split)
        if len(entries) != GAME_COUNTS[split]:
            raise data.DataError(f"{archive}: {len(entries)} games unpacked, expected "
                                 f"{GAME_COUNTS[split]}; the archive is not the pack's")
        with open(tmp / INDEX, "w", encoding="utf-8") as f:
            json.dump({"split": split, "games": entries}, f)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / INDEX).is_file():  # not a concurrent unpack that won the race
                raise data.DataError(f"cannot move the unpacked games into {final}; delete that "
                                     f"folder and retry") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


@functools.lru_cache(maxsize=None)
def games(split: str) -> tuple[pathlib.Path, tuple[dict, ...]]:
    """(root, index entries sorted by game path) of ``split``; cached per process."""
    split = canonical_split(split)
    root = split_dir(split)
    with open(root / INDEX, encoding="utf-8") as f:
        entries = json.load(f)["games"]
    if len(entries) != GAME_COUNTS[split]:
        raise data.DataError(f"{root / INDEX}: {len(entries)} games, expected "
                             f"{GAME_COUNTS[split]}; delete {root} to unpack again")
    return root, tuple(entries)
