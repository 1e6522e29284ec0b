"""HotpotQA: RetroAct's local-searcher environment over the offline distractor pack.

``HotpotQAEnv(split, max_steps=None, mode="distractor"|"corpus", ranker="lexical"|"minilm")``;
modules: ``pack`` (data -> tasks, paragraph store), ``metrics`` (official F1/EM), ``lexical``
(BM25 ranker), ``minilm`` (optional sentence-encoder ranker), ``env`` (the environment).
"""
from envs.hotpotqa.env import HotpotQAEnv

__all__ = ["HotpotQAEnv"]
