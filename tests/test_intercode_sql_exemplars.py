"""InterCode-SQL gold script (few-shot exemplars and the gold IL expert): it lists the tables, DESCs
the ones the gold query reads, runs the gold and submits. Table parsing on hand-made golds and on
every Spider gold; the exemplars and a two-table task played through the real env (MariaDB)."""
from __future__ import annotations

import ast
import re

import pytest

import envs
from envs.base import Task
from envs.intercode_sql.env import split_tasks
from retroact_jax.agent import fewshot, loop, protocols
from retroact_jax.agent.policy import ScriptedPolicy
from retroact_jax.agent.slots import ThreadSlots
from retroact_jax.benchmarks import intercode_sql as S

SCHEMA = {"Singer": ["Singer_ID", "Name"], "concert": ["concert_ID", "Year"],
          "singer_in_concert": ["concert_ID", "Singer_ID"], "Stadium": ["Stadium_ID", "Name"]}


def _task(gold: str, schema=SCHEMA) -> Task:
    return Task("intercode_sql", "train", 0, "t", "q?", {"gold": gold, "db_tables": schema, "db": "x"})


@pytest.mark.parametrize("gold, tables", [
    ("SELECT count(*) FROM singer", ["Singer"]),
    ("SELECT T2.name FROM singer_in_concert AS T1 JOIN singer AS T2 ON T1.singer_id = T2.singer_id "
     "JOIN concert AS T3 ON T1.concert_id = T3.concert_id WHERE T3.year = 2014",
     ["singer_in_concert", "Singer", "concert"]),
    ("SELECT name FROM singer WHERE singer_id NOT IN (SELECT singer_id FROM singer_in_concert)",
     ["Singer", "singer_in_concert"]),
    ("SELECT T1.name FROM stadium T1, concert AS T2 WHERE T1.stadium_id = T2.stadium_id",
     ["Stadium", "concert"]),
    ("SELECT name FROM `Singer` WHERE name = 'x from concert join stadium'", ["Singer"]),
    ("SELECT year FROM concert GROUP BY year UNION SELECT year FROM concert", ["concert"]),
])
def test_gold_tables_aliases_joins_subqueries_literals(gold, tables):
    assert S.gold_tables(_task(gold)) == tables


def test_gold_tables_of_every_spider_gold_are_schema_tables():
    for t in split_tasks("all"):
        ts = S.gold_tables(t)
        assert ts and set(ts) <= set(t.data["db_tables"]), (t.id, t.data["gold"])
        words = {w.lower() for w in re.findall(r"\w+", t.data["gold"])}   # no table missed
        assert {x for x in t.data["db_tables"] if x.lower() in words} == set(ts), t.id


def test_exemplar_tasks_one_table_no_limit():
    assert not S.stable_example(_task("SELECT name FROM singer ORDER BY age LIMIT 1"))
    assert S.stable_example(_task("SELECT name FROM singer WHERE name = 'limit'"))
    assert not S.stable_example(_task("SELECT count(*) FROM singer AS T1 JOIN concert AS T2"))
    assert S.stable_example(split_tasks("train")[1]) and not S.stable_example(split_tasks("train")[0])


def test_plan_caps_desc_quotes_reserved_and_fail_path():
    four = _task("SELECT * FROM singer AS a JOIN concert AS b JOIN stadium AS c JOIN singer_in_concert")
    acts = [a for _, a in S.plan(four)]
    assert acts == ["execute[SHOW TABLES]", "execute[DESC singer]", "execute[DESC concert]",
                    f"execute[{four.data['gold']}]", "submit"]
    assert len(acts) - 3 == S.MAX_DESC
    show = _task("SELECT count(*) FROM show", {"show": ["Show_ID"]})
    assert [a for _, a in S.plan(show)][1] == "execute[DESC `show`]"
    assert [a for _, a in S.plan(four, fail=True)] == ["execute[SHOW TABLES]", "submit"]
    # the completion for "Thought n:" is the thought, the action, and the stop word
    assert S.gold_planner(four, "...\nThought 2:") == (
        " The singer table looks relevant to the question. I should check its columns.\n"
        "Action 2: execute[DESC singer]\nObservation")
    r = S.gold_reflection(four)
    assert "list of tables" in r and "singer and concert with DESC" in r and four.data["gold"] in r
    assert r.endswith("\n") and r.count("\n") == 1


# ------------------------------------------------------------------------------- real env (MariaDB)
def _server():
    from envs.intercode_sql import server
    if server.available():
        pytest.skip(server.available())


def _check_trial(rec, task):
    """Every step valid, reward 1, the DESC'd tables listed by SHOW TABLES and described."""
    steps = rec["steps"]
    assert rec["success"] and rec["score"] == 1.0
    assert all(not s["info"].get("invalid") for s in steps)
    assert steps[0]["action"] == "execute[SHOW TABLES]"
    listed = {row[0] for row in ast.literal_eval(steps[0]["observation"])}
    descs = [s for s in steps if s["action"].startswith("execute[DESC ")]
    assert [s["action"][len("execute[DESC "):-1] for s in descs] == \
        [t.lower() for t in S.gold_tables(task)[:S.MAX_DESC]]
    for s in descs:
        assert s["action"][len("execute[DESC "):-1].strip("`") in listed
        assert s["observation"].startswith("[(") and not s["observation"].startswith("Error")
    assert [s["action"] for s in steps[-2:]] == [f"execute[{task.data['gold']}]", "submit"]


@pytest.mark.mariadb
def test_exemplars_played_in_real_env_and_shown_in_planner_prompt():
    _server()
    train = split_tasks("train")
    shown = fewshot._pick("intercode_sql", 2)[None]
    assert [t.index for t in shown] == [1, 4]     # 0: ORDER BY ... LIMIT; 2, 3: two tables
    two = next(t for t in train if len(S.gold_tables(t)) >= 2)       # a join, not an exemplar
    by_index = {r["task_index"]: r for r in fewshot._run("intercode_sql", shown + [two], fail=False)}
    recs = [by_index[t.index] for t in shown + [two]]
    for rec, task in zip(recs, shown + [two]):
        _check_trial(rec, task)
    assert len([s for s in recs[2]["steps"] if "DESC" in s["action"]]) == 2
    fewshot.planner_examples.cache_clear()               # rendered anew: the same text in every run
    ex = fewshot.planner_examples("intercode_sql", 2)
    assert ex == "".join(fewshot._planner_text("intercode_sql", r) + "\n" for r in recs[:2])
    assert ex.count("Action 1: execute[SHOW TABLES]") == 2 and ex.count("Action 2: execute[DESC ") == 2
    # the prompt a ReAct planner sees holds the exemplars verbatim
    seen = []

    def script(call):
        seen.append(call.prompt)
        return " I can submit.\nAction 1: submit\nObservation"
    task = train[5]
    runner = loop.TrialRunner(
        protocols.protocol_for("intercode_sql"),
        lambda n: ThreadSlots(lambda: envs.make("intercode_sql", "train"), n, 1),
        ScriptedPolicy(script), None, loop.AgentConfig(trials=1, batch_size=1), planner_examples=ex)
    runner.run([loop.TaskState(task)], lambda r: None)
    assert ("Here are some examples.\n" + ex.rstrip("\n") + "\nHere is the task:\nQuestion: "
            + task.instruction) in seen[0]


@pytest.mark.mariadb
def test_reflector_exemplars_list_tables_then_name_the_desc_plan():
    _server()
    ex = fewshot.reflector_examples("intercode_sql", 2)
    for task in fewshot._pick("intercode_sql", 2)[None]:
        block = ex[ex.index("Question: " + task.instruction):]
        assert "Action 1: execute[SHOW TABLES]\nObservation 1: [(" in block
        assert "Action 2: submit" in block and "STATUS: FAIL" in block
        plan = block.split("New plan:", 1)[1].split("\n", 1)[0]
        assert "DESC" in plan and task.data["gold"] in plan
