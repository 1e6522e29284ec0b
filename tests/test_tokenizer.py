"""Tokenizer interface vs references: SentencePiece itself, transformers' tokenizers built from the
same files (SmolLM2's GGUF, a Llama-style SPM .model shipped by mistral-common), piece ownership."""
import importlib.metadata
import json
import pathlib

import pytest

from retroact_jax import tokenizer as tk

TEXTS = ["Hello world", " leading space", "  two spaces\n\nnewlines\ttab\n", "naïve café — 日本語 🙂",
         "Thought: I need to search Colorado orogeny.\nAction: Search[Colorado orogeny]\n",
         "SELECT name FROM singer WHERE age > 20;", "x", "a" * 40, "trailing space "]


def _spm_path() -> pathlib.Path:
    try:
        dist = importlib.metadata.distribution("mistral-common")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("mistral-common (test data: a Llama-style SentencePiece model) not installed; "
                    "run experiments/setup.sh")
    return pathlib.Path(str(dist.locate_file("mistral_common/data/tokenizer.model.v1")))


@pytest.fixture(scope="module")
def spm():
    return tk.load_tokenizer(_spm_path())


def _check_pieces(tok, pieces):
    """encode_pieces = encode of the joined text; owners follow the documented rule."""
    text = "".join(pieces)
    ids, owner = tok.encode_pieces(pieces)
    assert ids == tok.encode(text) and len(owner) == len(ids)
    assert owner == sorted(owner)
    _, offsets = tok._encode_offsets(text)
    ends = [sum(len(p) for p in pieces[:i + 1]) for i in range(len(pieces))]
    for (s, e), o in zip(offsets, owner):
        last = e - 1 if e > s else s
        assert (ends[o - 1] if o else 0) <= last < ends[o] or (last >= len(text) and o == len(pieces) - 1)
    return ids, owner


# ----------------------------------------------------------------------------------- SentencePiece
def test_spm_matches_sentencepiece_and_transformers(spm, tmp_path):
    import shutil
    import sentencepiece
    transformers = pytest.importorskip("transformers")
    ref = sentencepiece.SentencePieceProcessor(model_file=str(_spm_path()))
    shutil.copyfile(_spm_path(), tmp_path / "tokenizer.model")
    hf = transformers.LlamaTokenizer.from_pretrained(str(tmp_path))
    assert isinstance(tk.load_tokenizer(tmp_path), tk.SentencePieceTokenizer)
    assert spm.vocab_size == 32000 and (spm.bos_id, spm.eos_ids, spm.pad_id) == (1, (2,), None)
    for text in TEXTS:
        ids = spm.encode(text)
        assert ids == ref.encode(text), text
        assert spm.decode(ids) == ref.decode(ids)
        # transformers' converted (tokenizers) Llama tokenizer splits runs of spaces differently
        # from SentencePiece; SentencePiece (what the model was trained with) is the reference.
        if "  " not in text and not text.startswith(" "):
            assert ids == hf.encode(text, add_special_tokens=False), text
    assert spm.encode("hi", add_bos=True) == [1] + ref.encode("hi")
    assert spm.decode([1, *ref.encode("hi"), 2]) == "<s>hi</s>"
    assert spm.decode([1, *ref.encode("hi"), 2], skip_special=True) == "hi"


def test_spm_token_texts(spm):
    texts = spm.token_texts()
    assert len(texts) == 32000
    assert texts[spm.encode("\n")[-1]] == "\n"                    # byte-fallback token <0x0A>
    the = spm.encode("the cat")[0]
    assert texts[the] == " the" == spm.decode_token(the)          # "▁the" keeps its space
    assert sum("\n" in t for t in texts) >= 1


def test_spm_pieces_with_multibyte_text(spm):
    pieces = ["Observation: 日本", "語 🙂 ok", "\nThought:", " done"]
    ids, owner = _check_pieces(spm, pieces)
    for i in range(len(pieces)):
        assert i in owner
    # A token straddling a boundary belongs to the later piece.
    ids, owner = _check_pieces(spm, ["Hel", "lo world"])
    assert spm.encode("Hello") == ids[:1] == [22557] and owner[0] == 1    # "▁Hello" spans both


# ------------------------------------------------------------------------ transformers back end
def test_transformers_backend_gpt2_files(tmp_path):
    transformers = pytest.importorskip("transformers")
    import tokenizers
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXTS * 20, vocab_size=300, min_frequency=1,
                            special_tokens=["<|endoftext|>"])
    bpe.save_model(str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>",
        "bos_token": "<|endoftext|>"}))
    tok = tk.load_tokenizer(tmp_path)
    assert isinstance(tok, tk.TransformersTokenizer) and tok.eos_ids == (0,)
    for text in TEXTS:
        assert tok.encode(text) == bpe.encode(text).ids
        assert tok.decode(tok.encode(text)) == text
    _check_pieces(tok, ["Thought: I", " need\n", "Action"])


def test_errors(tmp_path):
    with pytest.raises(tk.TokenizerError, match="does not exist"):
        tk.load_tokenizer(tmp_path / "missing")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(tk.TokenizerError, match="tokenizer.json"):
        tk.load_tokenizer(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(tk.TokenizerError, match="no tokenizer.json"):
        tk.load_tokenizer(tmp_path / "empty")


# ------------------------------------------------------------------------- SmolLM2 (embedded GGUF)
@pytest.fixture(scope="module")
def smol():
    from retroact_jax.models import embedded
    return embedded.load_tokenizer()


@pytest.mark.real_weights
def test_smollm2_matches_transformers_gguf_tokenizer(smol):
    transformers = pytest.importorskip("transformers")
    from retroact_jax.models import embedded
    path = embedded.gguf_path()
    hf = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert (smol.bos_id, smol.eos_ids, smol.pad_id, smol.vocab_size) == (1, (2,), 2, 49152)
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>\n"]:
        assert smol.encode(text) == hf.encode(text, add_special_tokens=False), text
        assert smol.decode(smol.encode(text)) == text
    msgs = [{"role": "user", "content": "Where is Paris?"},
            {"role": "assistant", "content": "In France."}, {"role": "user", "content": "And Rome?"}]
    assert smol.apply_chat_template(msgs) == hf.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True)
    assert smol.apply_chat_template(msgs[:1], add_generation_prompt=False).startswith(
        "<|im_start|>system\n")


@pytest.mark.real_weights
def test_smollm2_pieces_and_token_texts(smol):
    prompt = smol.apply_chat_template([{"role": "user", "content": "Question: who?"}])
    pieces = [prompt, "Thought: search it.\nAction: Search[x]", "\nObservation: 日本 🙂 found.",
              "\nThought:", " done<|im_end|>"]
    ids, owner = _check_pieces(smol, pieces)
    assert set(owner) == set(range(len(pieces))) and ids[-1] == 2
    texts = smol.token_texts()
    assert texts[198] == "\n" and smol.decode_token(2) == "<|im_end|>"
    assert smol.decode_token(smol.encode(" the")[0]) == " the"
    assert "".join(texts[i] for i in smol.encode("plain ascii text\n")) == "plain ascii text\n"


# ------------------------------------------------------------------------------------------- BOS
LLAMA2_CONFIG = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
                 "unk_token": "<unk>", "pad_token": None, "tokenizer_class": "LlamaTokenizer",
                 "legacy": False, "clean_up_tokenization_spaces": False}   # Llama-2-7b-chat-hf's fields
BOS_TEXTS = [t for t in TEXTS if "  " not in t and not t.startswith(" ")] + [
    "Interact with a household to solve a task.\nHere is the task:\nYou are in a room.\n> think: go"]


def _same_ids_everywhere(tok, text):
    """Sampler prompt ids (LMPolicy), trained and scored ids (tokenize_sample) of one text."""
    from retroact_jax import batching
    from retroact_jax.agent.spans import Span, render
    from retroact_jax.agent import lm_policy

    policy_ids = []

    class Sampler:   # captures the prompt ids LMPolicy would prefill
        def sample(self, ids, *a, **k):
            policy_ids.extend(ids)
            raise StopIteration

    pol = lm_policy.LMPolicy(Sampler(), tok, incremental=False)
    pol._stop_masks[()] = (None, [])
    spans = [Span("prompt", text[:len(text) // 2]), Span("observation", text[len(text) // 2:])]
    from retroact_jax.agent.policy import Request
    try:
        pol.generate([Request(key=0, spans=spans, seed=0)], (), 4, 0.0)
    except StopIteration:
        pass
    sample = batching.Sample("planner", (("prompt", spans[0].text), ("generated", spans[1].text)))
    trained = list(batching.tokenize_sample(sample, tok).ids)
    assert policy_ids == [tok.encode(render(spans), add_bos=tok.add_bos)] == [trained]
    return trained


def test_bos_follows_transformers_for_llama_spm(tmp_path):
    """Llama-2 (HF training and vLLM both call tokenizer(text)): BOS first, everywhere."""
    import shutil
    transformers = pytest.importorskip("transformers")
    shutil.copyfile(_spm_path(), tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(LLAMA2_CONFIG))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    fast_dir = tmp_path / "fast"
    hf.save_pretrained(str(fast_dir))          # a tokenizer.json whose post-processor adds <s>
    cfg = json.loads((fast_dir / "tokenizer_config.json").read_text())
    cfg.pop("add_bos_token", None)
    (fast_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    for tok in (tk.load_tokenizer(tmp_path), tk.load_tokenizer(fast_dir)):
        assert tok.add_bos and tok.bos_id == 1
        for text in BOS_TEXTS:
            assert _same_ids_everywhere(tok, text) == hf(text)["input_ids"], (type(tok).__name__, text)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(LLAMA2_CONFIG, add_bos_token=False)))
    off = tk.load_tokenizer(tmp_path)
    hf_off = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert not off.add_bos and _same_ids_everywhere(off, "Hello world") == hf_off("Hello world")["input_ids"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(LLAMA2_CONFIG, add_bos_token="yes")))
    with pytest.raises(tk.TokenizerError, match="add_bos_token must be true or false"):
        tk.load_tokenizer(tmp_path)


@pytest.mark.real_weights
def test_bos_follows_transformers_for_smollm2(smol):
    """SmolLM2 (GPT-2-style BPE): transformers' tokenizer(text) adds no BOS; neither do we."""
    transformers = pytest.importorskip("transformers")
    from retroact_jax.models import embedded
    hf = transformers.AutoTokenizer.from_pretrained(str(embedded.tokenizer_dir()))
    path = embedded.gguf_path()
    hf_gguf = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert not smol.add_bos
    for text in BOS_TEXTS:
        assert _same_ids_everywhere(smol, text) == hf(text)["input_ids"] == hf_gguf(text)["input_ids"], text
