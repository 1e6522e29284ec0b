"""Training stages over agent trajectories: trial records -> samples (samples.py), the expert data
and imitation-learning stage (expert.py, il_stage.py), replay / collection / the RL stage (rl_*)."""
