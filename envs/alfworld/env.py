"""ALFWorld (TextWorld text games) behind the ``Env`` protocol, with the original agent's rules.

Each game is registered with TextWorld's gym API on its own (``register_game``, synchronous,
``AlfredDemangler(shuffle=False)`` so object numbers match the walkthroughs, ``AlfredInfos``), so
``reset(task)`` plays exactly that game, never "the next one" of a shuffled list. The model output
goes through the RetroAct/Reflexion handling (``envs.alfworld.actions``) inside the env so every
caller gets the same rules:

- ``think: ...`` -> ``OK.``; more than 8 words matching no command -> the format hint; neither is a
  game step, but both count as steps.
- A command that is not exactly one of the game's admissible commands gets TextWorld's own answer
  to it, ``Nothing happens.``, without calling the game: TextWorld looks commands up verbatim in
  the same list, so the answer is identical, it is 20x cheaper and hostile strings never reach
  the game engine.
- ``end_on_repeat`` (default True, as the original): an action (after canonicalisation) equal to
  the previous one ends the trial; it still runs first, so a winning repeat is a success. As in
  the original the "previous action" starts as ``""``, so an empty first action also ends it.
- The step limit defaults to 50 (the paper); the original code's loop stops after 49 actions
  (``max_steps=49`` reproduces it).

``info`` adds ``won``, ``action`` (the canonical command, what the original writes into the
history after ``> ``) and ``repeated``. success = won, reward = score = 1.0 on a win else 0.0.
"""
from __future__ import annotations

import functools
import pathlib
from typing import Sequence

from envs.alfworld import actions, games
from envs.base import Env, EnvError, StepResult, Task

_REGISTERED: dict[str, str] = {}  # gamefile -> textworld gym env id (per process)


def _gym_env(gamefile: str):
    """A fresh synchronous TextWorld gym env that plays only ``gamefile``."""
    import textworld
    import textworld.gym
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos

    env_id = _REGISTERED.get(gamefile)
    if env_id is None:
        infos = textworld.EnvInfos(won=True, admissible_commands=True,
                                   extras=["gamefile", "walkthrough"])
        env_id = textworld.gym.register_game(
            gamefile, infos, max_episode_steps=None, asynchronous=False,
            # A factory, not an ``AlfredDemangler(shuffle=False)`` instance: TextWorld calls each
            # wrapper on every new env, and an instance returns *itself*, so two envs of the same
            # registration would share (and corrupt) one wrapper chain.
            wrappers=[functools.partial(AlfredDemangler, shuffle=False), AlfredInfos])
        _REGISTERED[gamefile] = env_id
    return textworld.gym.make(env_id)


class ALFWorldEnv(Env):
    name = "alfworld"
    default_max_steps = 50

    def __init__(self, split: str = "valid_unseen", max_steps: int | None = None,
                 end_on_repeat: bool = True):
        super().__init__(split=games.canonical_split(split), max_steps=max_steps)
        self.end_on_repeat = bool(end_on_repeat)
        self._tasks: tuple[Task, ...] | None = None
        self._game = None             # the TextWorld gym env of the current episode
        self._gamefile = ""           # ... and the game it plays
        self._admissible: frozenset[str] = frozenset()
        self._last_action = ""
        self._won = False

    @property
    def tasks(self) -> Sequence[Task]:
        if self._tasks is None:
            root, entries = games.games(self.split)
            self._tasks = tuple(
                Task(env=self.name, split=self.split, index=i, id=e["id"],
                     instruction=e["instruction"],
                     data={"gamefile": str(root / e["gamefile"]), "task_type": e["task_type"],
                           "walkthrough": tuple(e["walkthrough"])})
                for i, e in enumerate(entries))
        return self._tasks

    def admissible_commands(self) -> list[str]:
        """The commands the game accepts now (sorted), for agents and tests."""
        return sorted(self._admissible)

    def _reset(self, task: Task) -> str:
        gamefile = str(task.data.get("gamefile", ""))
        if not pathlib.Path(gamefile).is_file():
            raise EnvError(f"alfworld: game file of task {task.id} not found: {gamefile!r}")
        if self._game is not None and self._gamefile == gamefile:
            # The same game again (the next trial): restart it without reloading it. TextWorld's
            # own ``reset`` would close, load (parse + translate the PDDL) and reset: ~40% more.
            intros, infos = self._game.batch_env.reset()
            intro, info = intros[0], {k: v[0] for k, v in infos.items()}
        else:
            self._close_game()
            self._game, self._gamefile = _gym_env(gamefile), gamefile
            intro, info = self._game.reset()
        self._admissible = frozenset(info["admissible_commands"])
        self._won, self._last_action = bool(info["won"]), ""
        return actions.initial_observation(intro)

    def _step(self, action: str) -> StepResult:
        command, well_formed = actions.format_action(action.strip())
        invalid = False
        if actions.is_think(command):
            obs = actions.THINK_OK
        elif not well_formed:
            obs, invalid = actions.FORMAT_HINT, True
        elif command in self._admissible:
            raw, _, _, info = self._game.step(command)
            self._admissible = frozenset(info["admissible_commands"])
            self._won = bool(info["won"])
            obs = actions.process_observation(raw)
        else:
            obs, invalid = actions.NOTHING_HAPPENS, True
        repeated = command == self._last_action
        self._last_action = command
        done = self._won or (self.end_on_repeat and repeated)
        reward = 1.0 if self._won else 0.0
        return obs, reward, done, {"success": self._won, "score": reward, "won": self._won,
                                   "invalid": invalid, "action": command, "repeated": repeated}

    def _close_game(self) -> None:
        if self._game is not None:
            game, self._game, self._gamefile = self._game, None, ""
            game.close()

    def close(self) -> None:
        self._close_game()
