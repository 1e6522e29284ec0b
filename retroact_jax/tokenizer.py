"""One small tokenizer interface over three back ends: HF ``tokenizers`` (tokenizer.json),
SentencePiece (.model) and transformers ``AutoTokenizer`` (any other HF tokenizer directory).

    tok = load_tokenizer(path)        # tokenizer.json | *.model | HF directory
    ids = tok.encode("Hello", add_bos=tok.add_bos)     # = transformers' tokenizer("Hello")
    ids, piece_of_token = tok.encode_pieces([prompt, completion, observation])

**BOS.** ``tok.add_bos`` is the one place that says whether this model family's sequences start with
BOS: what transformers' ``tokenizer(text)`` (and so vLLM, and the original's HF training) does for the
same files. tokenizer.json: ``add_bos_token`` of tokenizer_config.json when it is set, else whether the
post-processor inserts the BOS id (Llama-2/3: yes; SmolLM2, Qwen2: no); SentencePiece ``.model``:
``add_bos_token`` when set, else True (the Llama convention); transformers back end: asked directly.
The sampler's prompt ids (agent/lm_policy.py), the scored and the trained sequences
(``batching.tokenize_sample``) all read it; ``encode`` itself never adds BOS unless asked.

``encode_pieces`` is how training and inference agree on tokens: the pieces are concatenated and the
full text is tokenised ONCE (so the trained sequence tokenises exactly like the inference prompt of
the same text), then each token is assigned to the piece that holds the LAST character it covers:
a token straddling a boundary (e.g. "\\nObs" merged across observation / next thought) belongs to
the later piece. Zero-width tokens (BOS, tokens of an all-removed normalisation) belong to the piece
at their start offset (BOS -> piece 0). Offsets are characters of the concatenated string.

``decode_token(id)`` gives a token's text as it appears inside a decoded sequence (leading spaces
kept, SentencePiece "▁" -> " ", byte tokens of partial UTF-8 -> "\\ufffd"); the sampler builds
stop-string vocabulary masks from ``token_texts()``.

Chat templates are rendered with jinja2 as transformers does (sandboxed, trim_blocks,
lstrip_blocks, ``raise_exception``, ``bos_token`` / ``eos_token`` in scope).
"""
from __future__ import annotations

import abc
import functools
import json
import os
import pathlib
from typing import Any, Sequence


class TokenizerError(ValueError):
    """A tokenizer file or directory is missing or unusable; the message names it."""


class Tokenizer(abc.ABC):
    """Common interface. Subclasses set the special ids and implement ``_encode_offsets``."""

    bos_id: int | None
    add_bos: bool = False    # sequences start with BOS (see the module docstring)
    eos_ids: tuple[int, ...]
    pad_id: int | None
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    source: str

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @abc.abstractmethod
    def _encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``text`` (no BOS/EOS added) with (start, end) character offsets."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str: ...

    @abc.abstractmethod
    def _piece_text(self, token_id: int) -> str: ...

    @property
    def eos_id(self) -> int | None:
        return self.eos_ids[0] if self.eos_ids else None

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids, _ = self._encode_offsets(text)
        return self._with_bos(ids, add_bos)

    def _with_bos(self, ids: list[int], add_bos: bool) -> list[int]:
        if add_bos:
            if self.bos_id is None:
                raise TokenizerError(f"{self.source}: add_bos=True but the tokenizer has no BOS")
            return [self.bos_id] + ids
        return ids

    def encode_pieces(self, pieces: Sequence[str], add_bos: bool = False
                      ) -> tuple[list[int], list[int]]:
        """(ids of "".join(pieces), index of the piece each token belongs to); rule in the module
        docstring. Empty pieces own no tokens."""
        text = "".join(pieces)
        ids, offsets = self._encode_offsets(text)
        ends, acc = [], 0
        for p in pieces:
            acc += len(p)
            ends.append(acc)

        def piece_at(char: int) -> int:
            for i, e in enumerate(ends):
                if char < e:
                    return i
            return len(pieces) - 1

        owner = [piece_at(e - 1) if e > s else piece_at(s) for s, e in offsets]
        if add_bos:
            return self._with_bos(ids, True), [0] + owner
        return ids, owner

    def decode_token(self, token_id: int) -> str:
        return self._piece_text(int(token_id))

    @functools.cached_property
    def _token_texts(self) -> tuple[str, ...]:
        return tuple(self._piece_text(i) for i in range(self.vocab_size))

    def token_texts(self) -> tuple[str, ...]:
        """``decode_token(i)`` for every id (computed once)."""
        return self._token_texts

    def apply_chat_template(self, messages: Sequence[dict[str, str]],
                            add_generation_prompt: bool = True, **kwargs: Any) -> str:
        if not self.chat_template:
            raise TokenizerError(f"{self.source}: this tokenizer has no chat template")
        return _render_chat(self.chat_template, list(messages), add_generation_prompt,
                            bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.source!r}, vocab={self.vocab_size}, bos={self.bos_id},"
                f" eos={self.eos_ids}, pad={self.pad_id})")


@functools.lru_cache(maxsize=8)
def _compiled_template(template: str):
    import jinja2.sandbox

    def raise_exception(message):
        raise TokenizerError(f"chat template: {message}")

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def _render_chat(template: str, messages: list, add_generation_prompt: bool, **kw) -> str:
    return _compiled_template(template).render(messages=messages,
                                               add_generation_prompt=add_generation_prompt, **kw)


# --------------------------------------------------------------------------- HF tokenizers backend
class HFTokenizer(Tokenizer):
    """``tokenizers.Tokenizer`` from a tokenizer.json, specials from tokenizer_config.json."""

    def __init__(self, tokenizer_json: str | os.PathLike, config: dict | None = None,
                 eos_ids: Sequence[int] | None = None):
        import tokenizers
        self.source = str(tokenizer_json)
        try:
            self._tok = tokenizers.Tokenizer.from_file(self.source)
        except Exception as e:
            raise TokenizerError(f"{self.source}: not a readable tokenizer.json ({e})") from None
        self._tok.no_padding()
        self._tok.no_truncation()
        _set_specials(self, config or {}, self._tok.token_to_id, eos_ids)
        with_specials = self._tok.encode("a", add_special_tokens=True).ids
        inserted = (self.bos_id is not None and len(with_specials) > len(self._tok.encode("a", add_special_tokens=False).ids)
                    and with_specials[0] == self.bos_id)
        self.add_bos = _config_add_bos(config or {}, default=inserted)
        # Anchor for decode_token: decoders strip a leading space at the start of a sequence.
        self._anchor = self._tok.encode("a", add_special_tokens=False).ids[-1:]

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _encode_offsets(self, text: str):
        enc = self._tok.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def _piece_text(self, token_id: int) -> str:
        a = self._tok.decode(self._anchor, skip_special_tokens=False)
        both = self._tok.decode(self._anchor + [token_id], skip_special_tokens=False)
        return both[len(a):] if both.startswith(a) else self._tok.decode([token_id], False)

    @functools.cached_property
    def _token_texts(self) -> tuple[str, ...]:
        a = self._tok.decode(self._anchor, skip_special_tokens=False)
        both = self._tok.decode_batch([self._anchor + [i] for i in range(self.vocab_size)],
                                      skip_special_tokens=False)
        return tuple(t[len(a):] if t.startswith(a) else self._tok.decode([i], False)
                     for i, t in enumerate(both))


# --------------------------------------------------------------------------- sentencepiece backend
class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model``. Text is encoded literally (``<s>`` in text is not BOS)."""

    def __init__(self, model_file: str | os.PathLike, config: dict | None = None,
                 eos_ids: Sequence[int] | None = None):
        import sentencepiece as spm
        self.source = str(model_file)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.source)
        except Exception as e:
            raise TokenizerError(f"{self.source}: not a readable SentencePiece model ({e})") from None
        sp = self._sp
        defaults = {"bos_token": sp.id_to_piece(sp.bos_id()) if sp.bos_id() >= 0 else None,
                    "eos_token": sp.id_to_piece(sp.eos_id()) if sp.eos_id() >= 0 else None,
                    "pad_token": sp.id_to_piece(sp.pad_id()) if sp.pad_id() >= 0 else None}
        cfg = {**defaults, **{k: v for k, v in (config or {}).items() if v is not None}}

        def to_id(piece: str):
            i = sp.piece_to_id(piece)
            return None if i == sp.unk_id() and piece != sp.id_to_piece(sp.unk_id()) else i
        _set_specials(self, cfg, to_id, eos_ids)
        self.add_bos = _config_add_bos(cfg, default=self.bos_id is not None)

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    def _encode_offsets(self, text: str):
        proto = self._sp.encode(text, return_type="proto")
        # begin/end are UTF-8 byte offsets; map them to character offsets.
        char_of_byte = [0] * (len(text.encode()) + 1)
        b = 0
        for ci, ch in enumerate(text):
            n = len(ch.encode())
            for k in range(n):
                char_of_byte[b + k] = ci
            b += n
        char_of_byte[b] = len(text)
        ids = [p.id for p in proto.pieces]
        offsets = [(char_of_byte[p.begin], char_of_byte[p.end]) for p in proto.pieces]
        return ids, offsets

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        sp = self._sp
        if skip_special:
            return sp.decode([int(i) for i in ids if not sp.is_control(int(i))])
        out, run = [], []
        for i in ids:          # SentencePiece drops control tokens; keep their text unless skipped
            i = int(i)
            if sp.is_control(i):
                out.append(sp.decode(run) if run else "")
                out.append(sp.id_to_piece(i))
                run = []
            else:
                run.append(i)
        out.append(sp.decode(run) if run else "")
        return "".join(out)

    def _piece_text(self, token_id: int) -> str:
        sp = self._sp
        piece = sp.id_to_piece(token_id)
        if sp.is_byte(token_id):
            return bytes([int(piece[3:5], 16)]).decode("utf-8", errors="replace")
        if sp.is_control(token_id):
            return piece
        if sp.is_unknown(token_id):
            return " \u2047 "
        return piece.replace("\u2581", " ")


# ----------------------------------------------------------------------------- transformers backend
class TransformersTokenizer(Tokenizer):
    """transformers ``AutoTokenizer`` for HF directories without tokenizer.json / tokenizer.model."""

    def __init__(self, directory: str | os.PathLike, eos_ids: Sequence[int] | None = None):
        from transformers import AutoTokenizer
        self.source = str(directory)
        try:
            self._tok = AutoTokenizer.from_pretrained(self.source)
        except Exception as e:
            raise TokenizerError(f"{self.source}: transformers cannot load a tokenizer here "
                                 f"({type(e).__name__}: {e})") from None
        t = self._tok
        self.bos_id, self.pad_id = t.bos_token_id, t.pad_token_id
        self.bos_token, self.eos_token = t.bos_token, t.eos_token
        self.eos_ids = tuple(eos_ids) if eos_ids else (
            (t.eos_token_id,) if t.eos_token_id is not None else ())
        self.chat_template = getattr(t, "chat_template", None)
        with_specials = t("a")["input_ids"]
        self.add_bos = (self.bos_id is not None and len(with_specials) > len(t("a", add_special_tokens=False)["input_ids"])
                        and with_specials[0] == self.bos_id)

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    def _encode_offsets(self, text: str):
        if not getattr(self._tok, "is_fast", False):
            raise TokenizerError(f"{self.source}: encode needs offsets, which this slow "
                                 "tokenizer cannot give; provide a tokenizer.json")
        enc = self._tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def _piece_text(self, token_id: int) -> str:
        anchor = self._tok.encode("a", add_special_tokens=False)[-1:]
        a = self._tok.decode(anchor)
        both = self._tok.decode(anchor + [token_id])
        return both[len(a):] if both.startswith(a) else self._tok.decode([token_id])


# ----------------------------------------------------------------------------------------- loading
def _token_str(v: Any) -> str | None:
    return v.get("content") if isinstance(v, dict) else v


def _config_add_bos(cfg: dict, default: bool) -> bool:
    v = cfg.get("add_bos_token")
    if v is None:
        return bool(default)
    if not isinstance(v, bool):
        raise TokenizerError(f"add_bos_token must be true or false, got {v!r}")
    return v


def _set_specials(tok: Tokenizer, cfg: dict, to_id, eos_ids: Sequence[int] | None) -> None:
    """bos/eos/pad from tokenizer_config.json-style fields (``*_token`` strings, ``*_token_id``)."""
    def resolve(name: str) -> tuple[int | None, str | None]:
        s = _token_str(cfg.get(f"{name}_token"))
        i = cfg.get(f"{name}_token_id")
        if i is None and s is not None:
            i = to_id(s)
            if i is None:
                raise TokenizerError(f"{tok.source}: {name}_token {s!r} is not in the vocabulary")
        return (None if i is None else int(i)), s

    tok.bos_id, tok.bos_token = resolve("bos")
    eos, tok.eos_token = resolve("eos")
    tok.pad_id, _ = resolve("pad")
    tok.eos_ids = tuple(int(i) for i in eos_ids) if eos_ids else ((eos,) if eos is not None else ())
    tok.chat_template = cfg.get("chat_template")


def _read_config(directory: pathlib.Path) -> dict:
    cfg: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        f = directory / name
        if f.is_file():
            try:
                cfg.update(json.loads(f.read_text()))
            except json.JSONDecodeError as e:
                raise TokenizerError(f"{f}: not valid JSON ({e})") from None
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        cfg["chat_template"] = jinja.read_text()
    if isinstance(cfg.get("chat_template"), list):      # named templates: use "default"
        named = {t["name"]: t["template"] for t in cfg["chat_template"]}
        cfg["chat_template"] = named.get("default")
    return cfg


def load_tokenizer(path: str | os.PathLike, eos_ids: Sequence[int] | None = None) -> Tokenizer:
    """A Tokenizer from a tokenizer.json, a SentencePiece .model, or an HF directory (tokenizer.json
    preferred, then tokenizer.model, then transformers). ``eos_ids`` overrides the stop ids (e.g.
    from generation_config.json)."""
    path = pathlib.Path(path)
    if path.is_file():
        cfg = _read_config(path.parent)
        if path.suffix == ".json":
            return HFTokenizer(path, cfg, eos_ids)
        if path.suffix == ".model" or ".model" in path.name:
            return SentencePieceTokenizer(path, cfg, eos_ids)
        raise TokenizerError(f"{path}: expected tokenizer.json or a SentencePiece .model")
    if not path.is_dir():
        raise TokenizerError(f"tokenizer path does not exist: {path}")
    cfg = _read_config(path)
    if (path / "tokenizer.json").is_file():
        return HFTokenizer(path / "tokenizer.json", cfg, eos_ids)
    if (path / "tokenizer.model").is_file():
        return SentencePieceTokenizer(path / "tokenizer.model", cfg, eos_ids)
    if any((path / n).is_file() for n in ("vocab.json", "tokenizer_config.json")):
        return TransformersTokenizer(path, eos_ids)
    raise TokenizerError(f"{path}: no tokenizer.json, tokenizer.model or vocab.json")
