"""The paper's Table 2 at CPU scale (issue 12): all seven methods of one env in one table, on the
embedded SmolLM2-135M-Instruct, on the 2-core CPU, one command per env:

    python -m experiments.run --config=experiments/configs/table2_cpu.py --config.env=hotpotqa
    python -m experiments.run --config=experiments/configs/table2_cpu.py --config.env=intercode_sql
    python -m experiments.run --config=experiments/configs/table2_cpu.py --config.env=alfworld \\
        --config.eval.num_tasks=20                 # a fixed subset: 134 games x 50 steps do not fit

Runs in ``runs/table2_cpu/<env>/`` (resumable: rerun the command), publishes the committed artifacts
into ``results/table2_cpu/<env>/`` (stages/publish.py: results.md / .json, plots, RUN.md, adapters).
``python -m experiments.table2 --published=results/table2_cpu/<env>`` re-evaluates the adapters.

Tuning: ``--config.split=validation --config.methods=sft`` (etc.) evaluates on the validation slice
(``validation.num_tasks`` seeded train tasks, held out of the IL expert, the released IL rows and RL
collection in the same run; the RL learning curves are measured on it too). Never tune on the test split.

Data: HotpotQA = the project's gold expert on every train question outside the slice (753 - 20);
InterCode-SQL and ALFWorld = RetroAct's released IL files (rows naming a slice task dropped). RL
collects on train tasks outside the slice only.

Time budget, per env <= 3 h wall on the 2-core machine when it is otherwise free. Step costs
(idle 2 threads, bench/README.md): LoRA train step ~165 tokens/s (a 1024-token step ~6 s); decode
~70 tokens/s at 8 rows, ~110 at 32; HotpotQA IL rows 500 tokens median (planner) / 380 (reflector),
InterCode 560 / 1240, ALFWorld 750 / 1360. Estimate for HotpotQA (InterCode similar; ALFWorld
episodes are 10x longer, hence its test subset):
    IL planner (sft, sft_ei, sft_rl)        150 steps x ~3 s                  ~  8 min
    IL planner + reflector (retroact)       150 steps x ~6 s                  ~ 15 min
    IL single agent (retroact_single)       150 steps x ~6 s                  ~ 15 min
    RL x 4 (2 iterations each)              collect 32 tasks (x 3 trials with a reflector),
                                            score, update, eval hook 16 val. tasks x 2 trials
                                                                              ~ 10-15 min each, ~ 50 min
    eval, 100 test tasks: 4 one-trial methods x ~5 min, 3 K = 5 methods x ~15-20 min
                                                                              ~ 70 min
    compiles (~40 s each, persistent cache on later runs)                     ~ 15 min
    total                                                                     ~ 2.9 h
The per-stage figures above are estimates from the benchmarks' idle step costs, not an end-to-end
measurement. Measured (2026-12-07, the shared machine at load 11-15, so ~5x slower than idle): a
smoke run of this config (react + sft, 2 test tasks, K 2, 6 IL steps) took 9 min 11 s, peak RSS
2.6 GB: react eval 115 s (34 s compiling), IL planner 332 s (expert on 733 questions, 160 s
compiling, ~17 s per 500-token step), sft eval 95 s. RUN.md of the real run records every stage.
If the first stages run slower than the estimate, cut (in this order) rl.collect.tasks_per_iteration,
rl.train.iterations, il.train.max_steps; never the test tasks or K below 5. Done once (2026-12-07):
the measured HotpotQA walls (ReAct eval 78 min on one core before the grouped extension) cut
rl.collect.tasks_per_iteration from 32 to 16 (and its batch: 32 rows held 12.3 GB RSS).
"""
from experiments.configs.common import base

METHODS = "react,reflexion,sft,sft_ei,sft_rl,retroact,retroact_single"


def get_config():
    c = base("hotpotqa")                 # --config.env=intercode_sql | alfworld: everything below is env-free
    env = c.get_ref("env")
    c.methods = METHODS                  # the seven rows of Table 2, one merged table
    c.run_dir = "runs/table2_cpu/" + env             # stages, checkpoints, trajectories (resumable)
    c.publish = "results/table2_cpu/" + env          # the committed artifacts (stages/publish.py)
    c.backbone = "SmolLM2-135M-Instruct"  # the table rows' backbone label
    # --- tuning: a seeded slice of the train split, never trained on in this run
    c.validation.num_tasks = 20          # validation tasks (evaluate them with --config.split=validation)
    c.validation.seed = 0                # which train tasks
    # --- evaluation: the paper's test tasks (HotpotQA 100, InterCode 100, ALFWorld 134), greedy
    c.eval.trials = 5                    # K for every method of the env (>= 5; paper 10)
    c.eval.batch_size = 16               # tasks in flight
    c.eval.env_workers = 4               # threads / processes stepping the envs
    c.eval.num_examples = 2              # few-shot exemplars of ReAct / Reflexion
    c.eval.cache_buckets = "1024,2048,4096"     # few KV-cache lengths: few compiles
    c.eval.chunk_buckets = "16,64,256,512,1024,2048,4096"  # prefill / extension chunk lengths (an
                                         #   addition whose padding would overflow the cache is made in
                                         #   pieces; 512: what a new episode adds past the few-shot prefix
                                         #   its row already holds, a reflection prompt's scratchpad)
    c.eval.reflector_rows = 4            # failed trials per reflector call: its cache is 4 rows (0.75 GB
                                         #   at 4,096 slots), not the 16 tasks in flight (3 GB)
    # --- IL: every method's start; LoRA r 8 q/v, rows over 1536 tokens dropped (a truncated row loses
    # its end: the answer, the submit, the reflection), loss on what the agent writes (observations
    # masked: the quickstart's finding), lr 1e-3 (LoRA; the quickstart's), capped steps for the budget
    c.il.data.max_tokens = 1536          # longer rows are dropped (HotpotQA none; InterCode reflector 24%)
    c.il.data.long_rows = "drop"         # drop | truncate (the original, at 2048)
    c.il.data.eval_rows = 8              # held-out rows per role (IL loss before / after)
    c.il.train.buckets = "512,1024,1536" # padded row lengths (one compile each)
    c.il.train.epochs = 1                # one pass at most; max_steps cuts it for the budget
    c.il.train.max_steps = 150           # steps per IL stage (1 row per role per step)
    c.il.train.pack = False              # one sample per row, as budgeted (packed: ~2.5x samples per step, each a full row)
    c.il.train.observations = "masked"   # train the thoughts / actions / reflections only
    c.il.train.eval_every = 150          # held-out loss before and after only
    c.il.train.log_every = 10            # train metrics every n steps
    c.il.train.checkpoint_every = 50     # resumable within the stage
    c.il.optimizer.learning_rate = 1e-3  # LoRA tolerates ~10x the full fine-tuning rate
    c.il.optimizer.schedule = "constant" # after warmup
    c.il.optimizer.warmup_steps = 10     # linear warmup steps
    # --- RL: 2 iterations of collect (train tasks outside the slice) + 1 epoch, eval hook per iteration
    c.rl.train.iterations = 2            # collect + update rounds: the points of the learning curve
    c.rl.train.epochs = 1                # passes over the buffer per iteration
    c.rl.optimizer.schedule = "constant" # after warmup
    c.rl.train.buckets = "512,1024,1536" # padded row lengths
    c.rl.train.log_every = 1             # every update's ratio / clip / KL metrics
    c.rl.train.checkpoint_every = 50     # plus the end of every iteration
    c.rl.collect.tasks_per_iteration = 16   # train tasks rolled out per iteration (all in flight); cut
                                         #   from 32 for the budget (measured HotpotQA stage walls, RUN.md)
    c.rl.collect.trials = 3              # trials per task with a reflector (retroact); 1 without
    c.rl.collect.batch_size = 16         # tasks in flight (32 rows held 12.3 GB RSS: 4096-slot caches)
    c.rl.collect.cache_buckets = c.eval.cache_buckets   # the eval's shapes: compiles shared
    c.rl.collect.chunk_buckets = c.eval.chunk_buckets
    c.rl.collect.score_rows = 2          # behaviour scoring 2 rows at a time (8 x 2048: 1.4 GB of temp)
    c.rl.collect.reflector_rows = c.eval.reflector_rows   # as the eval's
    c.rl.replay.max_tokens = 1536        # rows longer than the largest train bucket are dropped
    c.rl.optimizer.learning_rate = 1e-4  # the original's RL rate
    c.rl.optimizer.warmup_steps = 5      # linear warmup steps
    c.rl.eval.every = 1                  # the learning curve: greedy trials after every iteration
    c.rl.eval.split = "validation"       # on the validation slice, never the test split
    c.rl.eval.num_tasks = 16             # of its 20 tasks
    c.rl.eval.trials = 2                 # trials per task (1 without a reflector)
    c.rl.eval.batch_size = 16            # tasks in flight
    return c
