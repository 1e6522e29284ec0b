"""InterCode-SQL (Spider dev tasks 0-99 in InterCode's format; metric reward, then success rate).

Its gold script looks at the database before it queries, as InterCode's own ReAct demos and
RetroAct's released IL rows do (91% of the 866 released planner rows run ``SHOW TABLES`` / ``DESC``;
most first guess a query, fail, then look): ``SHOW TABLES``, ``DESC`` of the tables the gold query
reads (at most ``MAX_DESC``, in the order the query names them), the gold query, ``submit``. A
script cannot make a natural wrong guess, so it looks first. The same script is the few-shot
exemplars (agent/fewshot.py) and the IL expert (``expert="gold"``, stages/expert.py), so both show
the schema being read; an exemplar that ran the gold straight away taught the prompted baselines to
query tables and columns they had never seen. The scripted failure lists the tables and submits
that list; its reflection names the DESC steps and the gold query it should have run. Exemplars
come from train golds on one table without LIMIT (``stable_example``): short, and the same text in
every run.
"""
from __future__ import annotations

import re

from retroact_jax.benchmarks import intercode
from retroact_jax.benchmarks.hotpotqa import cue

MAX_DESC = 2        # DESC steps at most: the exemplars stay short (SmolLM2-135M reads two of them)
_LITERAL = re.compile(r"'(?:[^'\\]|\\.|'')*'|\"(?:[^\"\\]|\\.|\"\")*\"")
_TOKEN = re.compile(r"`[^`]+`|\w+|[(),]")
_CLAUSE = {"where", "group", "order", "having", "limit", "union", "intersect", "except", "on",
           "join", "inner", "left", "right", "outer", "cross", "natural", "select", "from", "as"}
_RESERVED = {"show", "order", "group", "select", "table", "key", "keys", "match", "range", "index",
             "desc", "describe", "limit", "values", "where", "from", "join"}   # DESC `show` (orchestra)


def gold_tables(task) -> list[str]:
    """The schema's tables that the gold query reads, in the order it names them: the names after
    FROM / JOIN and after the commas of a FROM list (aliases, ``AS``, subqueries and string
    literals skipped), kept only when the database has them (``db_tables``, case-insensitive)."""
    known = {t.lower(): t for t in task.data["db_tables"]}
    toks = [t.strip("`") for t in _TOKEN.findall(_LITERAL.sub("''", task.data["gold"]))]
    out: list[str] = []
    i, expect = 0, False
    while i < len(toks):
        low = toks[i].lower()
        if low in ("from", "join"):
            expect = True
        elif expect:
            expect = False
            if low in known and known[low] not in out:
                out.append(known[low])
            j = i + 1                                  # skip an alias: [AS] name
            if j < len(toks) and toks[j].lower() == "as":
                j += 1
            if j < len(toks) and toks[j].lower() not in _CLAUSE and toks[j] not in "(),":
                j += 1
            if j < len(toks) and toks[j] == ",":       # FROM a, b: another table follows
                expect, i = True, j
        i += 1
    return out


def _desc_name(table: str) -> str:
    """The table as SHOW TABLES lists it (lower case), quoted where it is a reserved word."""
    t = table.lower()
    return f"`{t}`" if t in _RESERVED else t


def plan(task, fail: bool = False) -> list[tuple[str, str]]:
    """The script's (thought, action) steps. The server lists table names in lower case
    (``lower_case_table_names=1``), so DESC names them as SHOW TABLES showed them."""
    steps = [("I should first see which tables this database has.", "execute[SHOW TABLES]")]
    if fail:
        return steps + [("The output answers the question, so I can submit it.", "submit")]
    for k, t in enumerate(gold_tables(task)[:MAX_DESC]):
        lead = (f"The {t.lower()} table looks relevant to the question." if k == 0 else
                f"I also need the {t.lower()} table.")
        steps.append((f"{lead} I should check its columns.", f"execute[DESC {_desc_name(t)}]"))
    steps.append(("Now I know the tables and columns to use, so I can write a SQL query that "
                  "answers the question.", f"execute[{task.data['gold']}]"))
    steps.append(("The output answers the question, so I can submit it.", "submit"))
    return steps


def gold_planner(task, prompt: str, fail: bool = False) -> str:
    """The next Thought + Action of ``plan`` (``fail``: list the tables, then submit the list)."""
    _, n = cue(prompt)
    steps = plan(task, fail)
    thought, action = steps[min(max(n, 1), len(steps)) - 1]
    return f" {thought}\nAction {n}: {action}\nObservation"


def gold_reflection(task) -> str:
    ts = [t.lower() for t in gold_tables(task)[:MAX_DESC]]
    look = (f"checked the columns of {' and '.join(ts)} with DESC, then " if ts else "")
    return (" I submitted the list of tables, which does not answer the question. I should have "
            f"{look}executed {task.data['gold']} and submitted its output.\n")


def stable_example(task) -> bool:
    """A short exemplar that reads the same in every run: a gold on one table (one DESC: a join's
    DESCs and long results made a two-exemplar prompt of 1,297 tokens instead of ~700) without LIMIT
    (MariaDB breaks ``ORDER BY ... LIMIT`` ties per connection, so such an exemplar would show other
    rows in each run: the 5 of the first 300 train golds whose result varied over four connections
    all end in ``ORDER BY ... LIMIT``)."""
    return (len(gold_tables(task)) == 1
            and not re.search(r"\blimit\b", _LITERAL.sub("''", task.data["gold"]), re.I))


BENCHMARK = intercode.benchmark("intercode_sql", "InterCode-SQL", "SQL", "SHOW TABLES", eval_tasks=100,
                                train_split="train", released_il="intercode_il",
                                planner=gold_planner, reflection=gold_reflection,
                                example_ok=stable_example)
