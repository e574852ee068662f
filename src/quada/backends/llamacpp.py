"""llama.cpp in this process: a GGUF file run by ggml's own kernels, through llama-cpp-python's
bindings of the llama.cpp C API (``pip install 'quada[llamacpp]'``).

This is what llama.cpp, Ollama and LM Studio deploy. On a CPU, ggml multiplies by a quantized
weight after quantizing the activations to the weight type's ``vec_dot_type`` (8 bits: Q8_K for
the k-quants, Q8_0/Q8_1 for the legacy quants), so a GGUF k-quant served by llama.cpp applies an
8-bit activation quantization that quada's dequantized transformers model does not.

Generation is greedy and exact to the reference's rules: the prompt is tokenized by llama.cpp
as its server would (special tokens parsed, a BOS token only where the GGUF asks for one) and
must give the reference tokenizer's ids; each prompt runs as the only sequence of a cleared
context, since llama.cpp's kernels give other results when sequences share a batch (measured on
the 1.5B built-in) and a stored row must not depend on its neighbours; generation ends at
llama.cpp's end-of-generation tokens, after ``max_new_tokens``, or (``stop_on_refusal``) at the
first refusal phrase; the new ids are decoded by the reference tokenizer, so the arms differ in
their tokens only, never in how text is decoded.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
from collections.abc import Sequence
from pathlib import Path

import gguf
import numpy as np
import torch

from quada.backends import (
    LENGTH,
    LLAMACPP,
    REFUSAL,
    STOP,
    Completion,
    Deployment,
    Rendered,
)
from quada.errors import QuadaError
from quada.judging import refusal_phrase
from quada.measures.generate import GenerationSettings
from quada.models import BUILTINS, file_sha256, gguf_file
from quada.runs import atomic_path, check_apart

CONTEXT = 4096  # tokens per context: room for a prompt and its response, and for a perplexity window
MICRO_BATCH = 512  # llama.cpp's default ubatch
NLL_ROWS = 256  # logit rows turned into log-likelihoods at a time (bounds the memory of a window)
_LOG_SINK = None  # the ctypes callback that silences llama.cpp's log; kept alive for the process


def llama_cpp_module():
    """The ``llama_cpp`` bindings, imported on first use (their log silenced), or a
    :class:`QuadaError` naming the extra."""
    global _LOG_SINK
    try:
        import llama_cpp
    except ImportError as err:
        raise QuadaError(
            "llamacpp deployments need llama-cpp-python, which is not installed: pip install 'quada[llamacpp]' "
            "(it builds llama.cpp from source: a C/C++ compiler and cmake are needed, and several minutes)"
        ) from err
    if _LOG_SINK is None:
        _LOG_SINK = llama_cpp.llama_log_callback(lambda level, text, data: None)
        llama_cpp.llama_log_set(_LOG_SINK, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
    return llama_cpp


def quant_type(file_type: int) -> str:
    """The name of a GGUF ``general.file_type`` (``Q4_K_M``, ``F16``, ...)."""
    try:
        name = gguf.LlamaFileType(file_type).name
    except ValueError:
        return f"file type {file_type}"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def default_threads() -> int:
    """llama.cpp's threads: as many as torch uses here (set by ``OMP_NUM_THREADS`` or ``torch.set_num_threads``).
    The thread count does not change llama.cpp's results (each output is computed by one thread;
    the same responses with 1 and 2 threads on the 1.5B built-in in ``benchmarks/backends.py``), so it
    is not part of the key.

    ggml runs its threads on the OpenMP runtime that torch loaded, which reads ``OMP_WAIT_POLICY``
    once, when the process starts: its waiting threads spin, taking cores that other work on a
    shared CPU needs; start quada with ``OMP_WAIT_POLICY=PASSIVE`` on such a machine."""
    return torch.get_num_threads()


def load_model(llama, path: Path):
    """``path`` loaded by llama.cpp onto the CPU (the ``llama_model`` pointer), or a :class:`QuadaError`
    when llama.cpp cannot load it: a damaged or truncated file, or an architecture or quantization this
    llama.cpp does not know."""
    params = llama.llama_model_default_params()
    params.n_gpu_layers = 0
    model = llama.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise QuadaError(
            f"llama.cpp cannot load {path} (a damaged or truncated file, or an architecture or quantization this "
            f"llama.cpp ({llama.__version__}) does not know); give a GGUF file that llama.cpp runs"
        )
    return model


def check_loads(path: Path) -> None:
    """Fail now, before any other work, on a GGUF file that llama.cpp cannot load. Its weights are
    mapped, not read, so this costs little even for a large file."""
    llama = llama_cpp_module()
    llama.llama_model_free(load_model(llama, path))


class LlamaCppBackend:
    """A GGUF file (or a built-in model's GGUF) run by llama.cpp here; see the module docstring."""

    def __init__(self, deployment: Deployment, tokenizer, threads: int | None = None):
        llama = self._llama = llama_cpp_module()
        path = gguf_file(deployment.target)
        self.tokenizer = tokenizer
        self._model = load_model(llama, path)
        self._vocab = llama.llama_model_get_vocab(self._model)
        self._n_vocab = llama.llama_vocab_n_tokens(self._vocab)
        params = llama.llama_context_default_params()
        params.n_ctx = params.n_batch = CONTEXT
        params.n_ubatch = MICRO_BATCH
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = threads or default_threads()
        self._context = llama.llama_init_from_model(self._model, params)
        if not self._context:
            llama.llama_model_free(self._model)
            raise QuadaError(f"llama.cpp could not make a context of {CONTEXT} tokens for {path} (out of memory?)")
        self._batch = llama.llama_batch_init(CONTEXT, 0, 1)
        sha = BUILTINS[deployment.target].sha256 if deployment.target in BUILTINS else file_sha256(path)
        quant = quant_type(int(self._metadata("general.file_type") or llama.LLAMA_FTYPE_GUESSED))
        self.path = path
        self.condition = f"{LLAMACPP}:{quant}:{sha[:16]}"
        # What decides a response besides the prompt and the settings: the file, this llama.cpp and the
        # CPU features its kernels use, and the context settings left at llama.cpp's defaults.
        self.identity = {
            "backend": "llama.cpp",
            "version": f"llama-cpp-python {importlib.metadata.version('llama-cpp-python')}",
            "quant": quant,
            "gguf_sha256": sha,
            "cpu": llama.llama_print_system_info().decode().strip(),
            "flash_attn": {-1: "auto", 0: "off", 1: "on"}[params.flash_attn_type],
            "kv_cache": {1: "f16", 0: "f32"}.get(params.type_k, str(params.type_k)),
            "micro_batch": MICRO_BATCH,
        }

    def _metadata(self, key: str) -> str | None:
        buffer = ctypes.create_string_buffer(256)
        size = self._llama.llama_model_meta_val_str(self._model, key.encode(), buffer, len(buffer))
        return buffer.value.decode() if size >= 0 else None

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` as llama.cpp's server reads a prompt: special tokens parsed, BOS added
        where the GGUF asks for it."""
        data = text.encode()
        ids = (self._llama.llama_token * (len(data) + 8))()
        count = self._llama.llama_tokenize(self._vocab, data, len(data), ids, len(ids), True, True)
        return list(ids[:count])

    def _decode(self, tokens: Sequence[tuple[int, int, bool]]) -> None:
        """Run ``(token, position, wants logits)`` items through the model as sequence 0."""
        batch = self._batch
        batch.n_tokens = len(tokens)
        for i, (token, position, logits) in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, position, 1, logits
            batch.seq_id[i][0] = 0
        status = self._llama.llama_decode(self._context, batch)
        if status != 0:
            raise QuadaError(f"llama.cpp failed to evaluate a batch of {len(tokens)} tokens (status {status}) on {self.path}")

    def _logits(self, index: int) -> np.ndarray:
        return np.ctypeslib.as_array(self._llama.llama_get_logits_ith(self._context, index), shape=(self._n_vocab,))

    def _prompt_ids(self, text: str) -> list[int]:
        ids = self.tokenize(text)
        reference = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids != reference:
            at = next((i for i, (a, b) in enumerate(zip(ids, reference)) if a != b), min(len(ids), len(reference)))
            raise QuadaError(
                f"llama.cpp reads {len(ids)} prompt tokens from {self.path.name} where the reference tokenizer reads "
                f"{len(reference)}, first differing at token {at}: the GGUF's tokenizer (or its BOS setting) is not the "
                "reference model's, so the arms would not read the same prompt; vet the GGUF against the model it was made from"
            )
        return ids

    def complete(self, prompt: Rendered, settings: GenerationSettings) -> Completion:
        ids = self._prompt_ids(prompt.text)
        if len(ids) + settings.max_new_tokens > CONTEXT:
            raise QuadaError(
                f"a prompt of {len(ids)} tokens and {settings.max_new_tokens} new tokens exceed the llama.cpp context "
                f"of {CONTEXT} tokens; lower --max-new-tokens or use shorter prompts"
            )
        self._llama.llama_memory_clear(self._llama.llama_get_memory(self._context), True)
        self._decode([(token, position, position == len(ids) - 1) for position, token in enumerate(ids)])
        generated: list[int] = []
        finish = LENGTH
        for step in range(settings.max_new_tokens):
            token = int(np.argmax(self._logits(-1)))
            if self._llama.llama_vocab_is_eog(self._vocab, token):
                finish = STOP
                break
            generated.append(token)
            if settings.stop_on_refusal and refusal_phrase(self.tokenizer.decode(generated, skip_special_tokens=True)):
                finish = REFUSAL
                break
            if step < settings.max_new_tokens - 1:
                self._decode([(token, len(ids) + step, True)])
        return Completion(self.tokenizer.decode(generated, skip_special_tokens=True), len(generated), finish)

    def perplexity(self, windows: Sequence[Sequence[int]]) -> float:
        """exp(mean NLL) over the windows' predicted tokens, each window evaluated in a cleared
        context as one batch (the protocol of :func:`quada.measures.utility.perplexity`)."""
        total, count = 0.0, 0
        for window in windows:
            if len(window) > CONTEXT:
                raise QuadaError(f"a perplexity window of {len(window)} tokens exceeds the llama.cpp context of {CONTEXT}")
            self._llama.llama_memory_clear(self._llama.llama_get_memory(self._context), True)
            self._decode([(token, position, True) for position, token in enumerate(window)])
            logits = np.ctypeslib.as_array(self._llama.llama_get_logits(self._context), shape=(len(window), self._n_vocab))
            targets = torch.tensor(window[1:])
            for start in range(0, len(window) - 1, NLL_ROWS):
                rows = torch.from_numpy(logits[start : start + NLL_ROWS][: len(window) - 1 - start])
                total += torch.nn.functional.cross_entropy(rows, targets[start : start + len(rows)], reduction="sum").item()
            count += len(window) - 1
        return float(np.exp(total / count))

    def close(self) -> None:
        llama = self._llama
        if self._context:
            llama.llama_batch_free(self._batch)
            llama.llama_free(self._context)
            llama.llama_model_free(self._model)
            self._context = self._model = None


class LlamaCppScorer(LlamaCppBackend):
    """A GGUF run by llama.cpp here as a judge's model (``--judge-model llamacpp:<GGUF or built-in>``):
    the log-probabilities of candidate next tokens after given token ids. The ids that open every
    input of a judge (its chat frame and rules: ``prefix``, fixed by the judge, never by the other
    inputs of a call) are evaluated once and kept in the KV cache across calls; each input
    continues from there, alone in the context, so its scores do not depend on what else is judged.
    The ids come from the reference tokenizer (the one the GGUF's vocabulary was read into)."""

    def __init__(self, target: str, tokenizer):
        super().__init__(Deployment(LLAMACPP, target), tokenizer)
        self._cached: list[int] = []  # the ids whose KV the context holds as sequence 0

    @property
    def fingerprint(self) -> str:
        """What stands for a transformers model's fingerprint in a judge's identity: the GGUF's hash."""
        return f"llamacpp-{self.identity['gguf_sha256'][:16]}"

    def next_token_logprobs(self, sequences: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]],
                            prefix: int = 0) -> list[list[float]]:
        """Log-probabilities of ``candidates[i]`` as the next token after ``sequences[i]`` (as
        :func:`quada.measures.scoring.next_token_logprobs` gives them for a transformers model), each
        sequence's first ``prefix`` ids read from the KV cache where they are the cached ones."""
        results = []
        for ids, wanted in zip(sequences, candidates, strict=True):
            if len(ids) > CONTEXT:
                raise QuadaError(f"a judge input of {len(ids)} tokens exceeds the llama.cpp context of {CONTEXT}")
            start = self._reuse(list(ids[:prefix])) if 0 < prefix < len(ids) else self._reuse([])
            tail = ids[start:]
            self._decode([(token, start + i, i == len(tail) - 1) for i, token in enumerate(tail)])
            logits = self._logits(-1).astype(np.float64)
            top = logits.max()
            logprobs = logits - top - np.log(np.exp(logits - top).sum())
            results.append([float(logprobs[i]) for i in wanted])
        return results

    def _reuse(self, prefix: list[int]) -> int:
        """Leave exactly ``prefix`` in the context (evaluated now unless it is the cached one, in one
        batch, so that its KV is the same whenever it is evaluated); its length."""
        memory = self._llama.llama_get_memory(self._context)
        if prefix and prefix == self._cached:
            self._llama.llama_memory_seq_rm(memory, 0, len(prefix), -1)
            return len(prefix)
        self._llama.llama_memory_clear(memory, True)
        self._cached = []
        if prefix:
            self._decode([(token, position, False) for position, token in enumerate(prefix)])
            self._cached = prefix
        return len(prefix)

    def complete(self, prompt: Rendered, settings: GenerationSettings) -> Completion:
        self._cached = []  # generation clears the context
        return super().complete(prompt, settings)

    def perplexity(self, windows: Sequence[Sequence[int]]) -> float:
        self._cached = []
        return super().perplexity(windows)


# What `quada requantize --type` offers: the 16-bit types (whose matrix products take 16-bit
# activations), then llama.cpp's quantized types (8-bit activations: Q8_K for k-quants, Q8_0/Q8_1 else).
QUANT_TYPES = ("BF16", "F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_0", "Q3_K_L",
               "Q3_K_M", "Q3_K_S", "Q2_K")


def requantize(source: str, out: Path, quant: str, threads: int | None = None) -> Path:
    """Write ``source`` (a GGUF file or a built-in) quantized to ``quant`` at ``out`` with llama.cpp's
    own quantizer (``llama_model_quantize``, the code behind its ``llama-quantize`` tool). Tensors
    that are already quantized are dequantized first (``allow_requantize``), so quantizing a k-quant
    further compounds both errors, as any requantization of a released GGUF does. Written to a
    temporary name and renamed when complete; an ``out`` that is the source is refused."""
    if quant not in QUANT_TYPES:
        raise QuadaError(f"unknown quantization type {quant!r}; choose one of {', '.join(QUANT_TYPES)}")
    llama = llama_cpp_module()
    path = gguf_file(source)
    out = Path(out).expanduser()
    if out.suffix != ".gguf":
        raise QuadaError(f"the output {out} must end in .gguf")
    check_apart([("SOURCE", path)], files=[("OUT", out)])
    params = llama.llama_model_quantize_default_params()
    params.ftype = gguf.LlamaFileType[f"MOSTLY_{quant}"].value
    params.allow_requantize = True
    params.nthread = threads or default_threads()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as partial:
            status = llama.llama_model_quantize(str(path).encode(), str(partial).encode(), ctypes.byref(params))
            if status != 0:
                raise QuadaError(f"llama.cpp could not quantize {path} to {quant} (status {status})")
    except OSError as err:
        raise QuadaError(f"cannot write {out} ({err.strerror}); choose a writable OUT") from err
    return out
