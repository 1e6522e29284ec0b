"""``eval.compare``: the base and IL models played by the same agent on the same tasks as the
trained one, side by side in compare.md (valid-action rate, IR / FR), on the tiny random model."""
import json

import pytest

from retroact_jax.stages import validate
from tests.test_methods import run, tiny_config


def _results(d):
    return json.loads((d / "results.json").read_text())


@pytest.mark.slow
def test_compare_evaluates_base_il_and_trained_models(tmp_path):
    c = tiny_config(tmp_path, "sft_rl")
    c.eval.compare = "base,il"
    run(c)
    m = tmp_path / "sft_rl"
    got = {k: _results(m / d) for k, d in (("base", "eval_base"), ("il", "eval_il"), ("trained", "eval"))}
    assert {k: r["model"] for k, r in got.items()} == {"base": "base", "il": "il", "trained": "trained"}
    assert got["base"]["sources"] == {"planner": "tiny-random"}
    assert got["il"]["sources"]["planner"].startswith(str(tmp_path / "il_planner" / "export"))
    assert got["trained"]["sources"]["planner"].startswith(str(m / "rl" / "export"))
    # RL started from the IL export (not from the base model)
    assert json.loads((m / "rl" / "stage_config.json").read_text())["model"]["planner"] == got["il"]["sources"]["planner"]
    for r in got.values():    # the same tasks and trials, each action judged by the env
        assert r["num_tasks"] == 2 and r["trials_run"] == 2 and r["actions"]["actions"] == 2
    md = (m / "compare.md").read_text().splitlines()
    rows = [ln for ln in md if ln.startswith("| ") and not ln.startswith("| Model")]
    assert [r.split(" | ")[0] for r in rows] == ["| base (untrained)", "| IL", "| IL + RL"]
    assert "valid actions" in md[2] and rows[0].split(" | ")[1].endswith("(%d/2)" % got["base"]["actions"]["valid"])
    # the Table 2 files hold the trained model only; dropping the comparison reruns nothing
    assert [r["method"] for r in json.loads((tmp_path / "results.json").read_text())] == ["SFT+RL"]
    before = {p: p.stat().st_mtime_ns for p in m.rglob("trajectories.jsonl")}
    c2 = tiny_config(tmp_path, "sft_rl")
    run(c2)
    assert {p: p.stat().st_mtime_ns for p in before} == before


@pytest.mark.parametrize("methods,compare,msg", [
    ("retroact", "rl", "a comma list of base, il"),
    ("react", "base", "react trains no model"),
    ("sft", "il", "'il' needs methods with an RL stage"),
])
def test_compare_refuses_what_cannot_be_compared(tmp_path, methods, compare, msg):
    c = tiny_config(tmp_path, methods)
    c.eval.compare = compare
    with pytest.raises(validate.ConfigError, match=msg):
        run(c)
