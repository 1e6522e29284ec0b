"""ALFWorld env and worker pool: the games, the original agent's rules, hostile input, the pool.

The reference is the game itself: every expert walkthrough must win, and observations must equal
what TextWorld (registered as ALFWorld's AlfredTWEnv does) says to the same commands.
"""
from __future__ import annotations

import collections
import os
import random
import signal
import subprocess
import sys
import textwrap

import pytest

import envs
from envs.alfworld import actions, games
from envs.pool import EnvPool, PoolError

pytestmark = pytest.mark.alfworld
pytest.importorskip("textworld")
pytest.importorskip("alfworld")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def env():
    e = envs.make("alfworld", "test")
    yield e
    e.close()


@pytest.fixture(scope="module")
def sample(env):
    """The first game of each task type (6 games): the CI-sized replay sample."""
    first = {}
    for t in env.tasks:
        first.setdefault(t.data["task_type"], t)
    return [first[k] for k in games.TASK_TYPES]


def replay(e, task):
    obs = e.reset(task)
    result = None
    for a in task.data["walkthrough"]:
        result = e.step(a)
    return obs, result


# -- the task set -----------------------------------------------------------------------------
def test_tasks_sorted_stable_and_counted(env):
    ts = env.tasks
    assert len(ts) == 134 and env.split == "valid_unseen"
    assert [t.id for t in ts] == sorted(t.id for t in ts)
    assert [t.index for t in ts] == list(range(134))
    assert ts[0].id == "look_at_obj_in_light-AlarmClock-None-DeskLamp-308/trial_T20190908_222917_366542"
    counts = collections.Counter(t.data["task_type"] for t in ts)   # data/alfworld/README.md
    assert [counts[k] for k in games.TASK_TYPES] == [18, 24, 31, 21, 23, 17]
    for t in ts:
        assert t.instruction.startswith("Your task is to: ") and "\n" not in t.instruction
        assert t.data["gamefile"].endswith(t.id + "/game.tw-pddl") and os.path.isfile(t.data["gamefile"])
        assert 3 <= len(t.data["walkthrough"]) <= 10
    assert envs.make("alfworld", "eval_in_distribution").split == "valid_seen"
    assert len(envs.make("alfworld", "valid_seen").tasks) == 140
    with pytest.raises(envs.EnvError, match="unknown split"):
        envs.make("alfworld", "valid")


# -- pure rules of the original agent ------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("go to desk 1", ("go to desk 1", True)),
    ("Go to the Desk 1 now", ("go to desk 1", True)),
    ("Go to the desk 1.", ("Go to the desk 1.", True)),             # "1." is not a number: verbatim
    ("take mug 1 from countertop 2", ("take mug 1 from countertop 2", True)),
    ("take the mug 1 off the countertop 2", ("take mug 1 from countertop 2", True)),
    ("put mug 1 into coffeemachine 1", ("put mug 1 in/on coffeemachine 1", True)),
    ("put mug 1 in/on coffeemachine 1", ("put mug 1 in/on coffeemachine 1", True)),
    ("open fridge 1", ("open fridge 1", True)),
    ("close fridge 1", ("close fridge 1", True)),                    # 1 entity: no rule, verbatim
    ("close fridge 1 and drawer 2", ("close fridge 1", True)),       # the original needs 2
    ("toggle desklamp 1 on desk 2", ("toggle desklamp 1 desk 2", True)),
    ("use desklamp 1", ("use desklamp 1", True)),
    ("clean apple 1 in sinkbasin 1", ("clean apple 1 with sinkbasin 1", True)),
    ("heat egg 2 using microwave 1", ("heat egg 2 with microwave 1", True)),
    ("cool pan 1 with fridge 1", ("cool pan 1 with fridge 1", True)),
    ("think: I need to go to desk 1", ("go to desk 1", True)),       # rules run before think:
    ("think: first find a mug (1).", ("think: first find a mug (1).", True)),
    ("a b c d e f g h", ("a b c d e f g h", True)),                  # 8 words: kept
    ("a b c d e f g h i", ("a b c d e f g h i", False)),             # 9 words: format hint
    ("go 1 desk 1", ("go to desk 1", True)),                         # digit at position 1 ignored
    ("", ("", True)),
])
def test_format_action(text, expected):
    assert actions.format_action(text) == expected


def test_process_observation():
    assert actions.process_observation("You arrive at loc 24. On the desk 2, you see a pen 1.") == \
        "On the desk 2, you see a pen 1."
    assert actions.process_observation("You pick up the pen 1.") == "You pick up the pen 1."
    assert actions.initial_observation("-= Welcome to TextWorld, ALFRED! =-\n\nRoom.\n\nYour task is to: x.") \
        == "Room.\nYour task is to: x."


# -- the games ----------------------------------------------------------------------------------
def test_walkthrough_wins_sample_through_env(env, sample):
    for task in sample:
        obs, (last, reward, done, info) = replay(env, task)
        assert "Welcome" not in obs and obs.startswith("You are in the middle of a room.")
        assert obs.split("\n")[-1] == task.instruction
        assert done and reward == 1.0 and info["success"] and info["won"] and info["score"] == 1.0
        assert info["steps"] == len(task.data["walkthrough"]) and not info["truncated"]


def test_matches_textworld_on_mixed_commands(env, sample):
    """Short-cutting inadmissible commands gives exactly TextWorld's own answers. The two envs play
    the same game in one process, interleaved: they must not share wrapper state."""
    from envs.alfworld.env import _gym_env
    task = sample[1]
    raw = _gym_env(task.data["gamefile"])
    raw.reset()
    env2 = envs.make("alfworld", "test", end_on_repeat=False)
    env2.reset(task)
    wt = list(task.data["walkthrough"])
    cmds = ["look", "inventory", "help", "go to", wt[0], wt[0], "examine " + wt[0][6:], "take it",
            "open drawer 99", wt[1], "go to " + wt[0][6:]] + wt[2:]
    try:
        for c in cmds:
            want, _, _, info = raw.step(c)
            got, _, done, got_info = env2.step(c)
            assert got == actions.process_observation(want), c
            assert got_info["won"] == info["won"]
        assert done and got_info["success"]
    finally:
        raw.close()
        env2.close()


def test_rules_think_hint_nothing_repeat(env, sample):
    task = sample[2]
    env.reset(task)
    before = env.admissible_commands()
    obs, r, done, info = env.step("  think: where could it be?  ")
    assert (obs, r, done, info["action"], info["invalid"]) == ("OK.", 0.0, False, "think: where could it be?", False)
    obs, r, done, info = env.step("I would like to walk around the room and look at things")
    assert (obs, done, info["invalid"]) == (actions.FORMAT_HINT, False, True)
    obs, r, done, info = env.step("jump")
    assert (obs, done, info["invalid"]) == ("Nothing happens.", False, True)
    assert env.admissible_commands() == before           # none of these touched the game
    assert info["steps"] == 3                             # ... but all of them count as steps
    obs, r, done, info = env.step("jump")                 # identical consecutive action: trial over
    assert done and info["repeated"] and not info["success"] and not info["truncated"]


def test_repeat_rule_is_a_flag_and_empty_first_action(env, sample):
    task = sample[0]
    e = envs.make("alfworld", "test", end_on_repeat=False)
    e.reset(task)
    for _ in range(3):
        obs, _, done, info = e.step("think: hmm")
    assert not done and info["repeated"] and obs == "OK."
    e.close()
    env.reset(task)
    obs, _, done, info = env.step("")                     # the original's last action starts as ""
    assert obs == "Nothing happens." and done and info["repeated"]


def test_step_limit(sample):
    e = envs.make("alfworld", "test", max_steps=3)
    assert envs.make("alfworld", "test").max_steps == 50
    e.reset(sample[0])
    results = [e.step(a) for a in ("look", "inventory", "think: x")]
    assert [r[2] for r in results] == [False, False, True]
    assert results[-1][3]["truncated"] and not results[-1][3]["success"]
    with pytest.raises(envs.EnvError):
        e.step("look")
    e.close()


def hostile_strings(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    fixed = ["", " ", "\n", "\x00", "go to", "go to ", "take", "put in/on", "go to desk",
             "x" * 100_000, "go " * 1000, "put " + "mug " * 999, "\x00go to desk 1\x00",
             "think:", "\u202ego to desk 1", "go to desk \u0661", "take ²", "🙂" * 50,
             "go to desk -1", "go to desk 99999999999999999999", "%s%n{0}", "\r\n\t\v\f",
             "open fridge 1; rm -rf /", "'\"\\", "\ud800".encode("utf-8", "surrogatepass").decode("utf-8", "replace")]
    alphabet = [chr(c) for c in range(0, 0x250)] + list("  go to take put open 0123456789\n\t")
    out = list(fixed)
    while len(out) < n:
        k = rng.choice([1, 3, 10, 60, 400])
        out.append("".join(rng.choice(alphabet) for _ in range(k)))
    return out


def test_fuzz_never_raises_and_state_survives(sample):
    task = sample[3]
    e = envs.make("alfworld", "test", max_steps=10**6, end_on_repeat=False)
    first = e.reset(task)
    wt = list(task.data["walkthrough"])
    fuzz = hostile_strings(3000)
    allowed = {"OK.", actions.FORMAT_HINT, actions.NOTHING_HAPPENS}
    for i, s in enumerate(fuzz):
        if i % (len(fuzz) // len(wt)) == 0 and wt:        # interleave the walkthrough
            obs, _, done, info = e.step(wt.pop(0))
            assert not info["invalid"]
            if done:
                break
        obs, r, done, info = e.step(s)
        assert isinstance(obs, str) and not done
        # none of these strings is a real command: the game never saw them
        assert info["invalid"] or info["action"].startswith("think:"), (s[:60], info["action"][:60])
        assert obs in allowed, (s[:60], obs)
    for a in wt:
        obs, _, done, info = e.step(a)
    assert done and info["success"]
    e.close()
    # a new episode of the same game on this env (restarted without reloading) starts afresh
    obs, last = replay(e, task)
    assert obs == first and last[3]["success"] and last[3]["steps"] == len(task.data["walkthrough"])
    e.close()


# -- the pool -----------------------------------------------------------------------------------
def test_pool_replays_sample_with_two_workers(sample):
    with EnvPool("alfworld", "test", workers=2) as pool:
        obs = pool.reset_many(sample)
        assert [o.split("\n")[-1] for o in obs] == [t.instruction for t in sample]
        wts = [list(t.data["walkthrough"]) for t in sample]
        won = [False] * len(sample)
        for k in range(max(map(len, wts))):
            acts = [wt[k] if k < len(wt) else None for wt in wts]
            for i, res in enumerate(pool.step_many(acts)):
                if res is not None:
                    won[i] = res[3]["success"]
                    assert res[2] == (k == len(wts[i]) - 1)
        assert all(won)
        # stepping a finished episode is caller misuse: a clear error naming the episode
        with pytest.raises(PoolError, match=r"episode 0 \(task 'look_at_obj_in_light.*step\('look'\)"):
            pool.step_many(["look"] + [None] * (len(sample) - 1))
        # the pool is still usable: restart only the last episode, the others keep their state
        obs = pool.reset_many([None] * 5 + [7])
        assert obs[:5] == [None] * 5 and obs[5].split("\n")[-1] == pool.tasks[7].instruction
        with pytest.raises(PoolError, match=r"episode 0 \(task 'look_at_obj_in_light"):
            pool.step_many(["look"] + [None] * 4 + ["look"])
        assert pool.step_many([None] * 5 + ["inventory"])[5][0] == "You are not carrying anything."
        with pytest.raises(envs.EnvError, match="2 actions for a batch of 6"):
            pool.step_many(["look", "look"])
        pool.ping()
        # a dead worker is named
        os.kill(pool._procs[1].pid, signal.SIGKILL)
        pool._procs[1].join(10)
        with pytest.raises(PoolError, match=r"worker 1 .*died.*episodes \[5\]"):
            pool.step_many([None] * 5 + ["look"])
        with pytest.raises(PoolError, match="unusable"):
            pool.step_many([None] * 6)


def test_pool_shutdown_is_quiet(tmp_path):
    script = textwrap.dedent("""
        import envs
        from envs.pool import EnvPool
        p = EnvPool("alfworld", "test", workers=2)
        print(p.reset_many([0, 1])[1].split("\\n")[-1])
        try:
            p.step_many(["look", "\\x00" * 10])
            p.step_many([None, "look"])
            p.step_many(["look", "look"])
        except Exception as e:
            print("unexpected", e)
        # exit without close(): the finalizer stops the workers
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": REPO})
    assert run.returncode == 0, run.stderr
    assert "Your task is to:" in run.stdout and "unexpected" not in run.stdout
    assert "Process" not in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_pool_reports_worker_side_errors():
    with pytest.raises(envs.EnvError, match="unknown env"):
        EnvPool("no_such_env", "test", workers=1)
    with EnvPool("alfworld", "no_such_split", workers=1) as pool:
        pool.ping()
        with pytest.raises(PoolError, match=r"(?s)episode 0 \(task #0\) failed in worker 0 on reset.*"
                                            r"unknown split 'no_such_split'"):
            pool.reset_many([0])
        with pytest.raises(PoolError, match=r"(?s)episode 0 \(task #0\).*never reset"):
            pool.step_many(["look"])
    with pytest.raises(envs.EnvError, match="closed"):
        pool.reset_many([0])
