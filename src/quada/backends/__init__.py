"""Deployments: the same model served by another engine, compared with quada's own generation.

quada's reference is the model run by transformers (:mod:`quada.measures.generate`, where the
approximations hook in). A *deployment* is that model as a user serves it, one of:

- ``llamacpp:<GGUF file or built-in name>``: llama.cpp in this process (``llama-cpp-python``,
  ``pip install 'quada[llamacpp]'``) with ggml's own kernels, which on a CPU quantize the
  activations of every quantized matrix product to 8 bits (:mod:`quada.backends.llamacpp`);
- ``openai:<base URL>@<model name>``: any OpenAI-compatible server (vLLM, TGI, llama.cpp's
  server, ``transformers serve``, ...) through ``/v1/completions`` (:mod:`quada.backends.openai`);
- ``openai-chat:<base URL>@<model name>``: the same server through ``/v1/chat/completions``, used
  only when the server is shown to render the chat template to the very text quada renders.

Every backend receives the prompt text that quada renders with the model's own chat template
(:func:`quada.chat.format_prompt`), so every arm of a comparison reads byte-identical text, and
decodes greedily with the same token budget and the same stop rules as the reference. A
backend's responses are stored under a key that names it (:func:`deployment_key`): backend,
version, quantization type, server model name and the SHA-256 of the prompt text.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from quada.chat import format_prompt, messages
from quada.errors import QuadaError
from quada.judging import refusal_phrase
from quada.measures.generate import GenerationSettings
from quada.store import GenerationKey, settings_json

LLAMACPP, OPENAI, OPENAI_CHAT = "llamacpp", "openai", "openai-chat"
KINDS = (LLAMACPP, OPENAI, OPENAI_CHAT)
DEPLOYMENT_HELP = (
    "A deployment of the model to compare with the transformers reference (repeat for several): "
    "llamacpp:<GGUF file or built-in name> (llama.cpp in process; pip install 'quada[llamacpp]'), "
    "openai:<base URL>@<model name> (an OpenAI-compatible server, /v1/completions with quada's rendered prompt) "
    "or openai-chat:<base URL>@<model name> (chat completions, after a check that the server renders the same text)."
)
# How a response ended: an end-of-sequence token, the token budget, or a refusal phrase (stop_on_refusal).
STOP, LENGTH, REFUSAL = "stop", "length", "refusal"


@dataclass(frozen=True)
class Deployment:
    """A parsed ``--deployment``: its kind, the GGUF or the server's base URL, the served name."""

    kind: str
    target: str
    served_name: str = ""

    def __str__(self) -> str:
        return f"{self.kind}:{self.target}" + (f"@{self.served_name}" if self.served_name else "")


def parse_deployment(text: str) -> Deployment:
    """The :class:`Deployment` that ``text`` names, or a :class:`QuadaError` saying how to write one."""
    kind, colon, rest = text.partition(":")
    if kind not in KINDS or not colon or not rest:
        raise QuadaError(
            f"cannot read the deployment {text!r}; write llamacpp:<GGUF file or built-in name>, "
            "openai:<base URL>@<model name> or openai-chat:<base URL>@<model name>"
        )
    if kind == LLAMACPP:
        return Deployment(kind, rest)
    url, at, name = rest.rpartition("@")
    if not at or not url or not name:
        raise QuadaError(
            f"the deployment {text!r} names no model: write {kind}:<base URL>@<model name>, "
            f"e.g. {kind}:http://127.0.0.1:8000/v1@qwen2.5-coder-1.5b-instruct"
        )
    return Deployment(kind, base_url(url), name)


def base_url(url: str) -> str:
    """The API root of an OpenAI-compatible server: ``http(s)://host:port`` and a path (``/v1`` when
    none is given), without a trailing slash. Credentials in the URL are refused: the API key comes
    from an environment variable and is never stored."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise QuadaError(f"{url!r} is not a server URL; write http://HOST:PORT/v1 (or https://...)")
    if parts.username or parts.password:
        raise QuadaError(
            f"the server URL {parts.hostname} carries credentials; remove them and put the API key in the "
            "environment variable named by --api-key-env instead (it is sent, never stored)"
        )
    if parts.query or parts.fragment:
        raise QuadaError(f"the server URL {url!r} has a query or fragment; give the API root, e.g. http://HOST:PORT/v1")
    path = parts.path.rstrip("/") or "/v1"
    return f"{parts.scheme}://{parts.netloc}{path}"


@dataclass(frozen=True)
class Rendered:
    """One request as every arm reads it: its chat turns and their text under the model's own chat
    template with the generation prompt (what transformers tokenizes)."""

    messages: tuple[dict[str, str], ...]
    text: str


def render(tokenizer, prompt: str, prompt_format: str) -> Rendered:
    """``prompt`` in ``prompt_format`` rendered by ``tokenizer``'s chat template, as the reference renders it."""
    return Rendered(tuple(messages(prompt, prompt_format)), format_prompt(tokenizer, prompt, prompt_format))


@dataclass(frozen=True)
class Completion:
    """One response of a backend: its text, how many tokens it generated and why it ended
    (:data:`STOP`, :data:`LENGTH` or :data:`REFUSAL`)."""

    text: str
    tokens: int
    finish: str


class Backend(Protocol):
    """A deployment opened for generation."""

    condition: str  # the store's condition column: names the deployment (its kind, quantization, file or server)
    identity: dict  # everything besides the prompt and the settings that decides a response (goes into the key)

    def complete(self, prompt: Rendered, settings: GenerationSettings) -> Completion:
        """The greedy response to ``prompt``."""
        ...

    def perplexity(self, windows: Sequence[Sequence[int]]) -> float | None:
        """Perplexity over token-id ``windows`` (each window's first token unpredicted), or ``None``
        where the backend cannot score given tokens."""
        ...

    def close(self) -> None:
        ...


def prompt_sha256(text: str) -> str:
    """The SHA-256 of a rendered prompt: part of a deployment's key, so a changed template is a new row."""
    return hashlib.sha256(text.encode()).hexdigest()


def deployment_key(backend, reference: str, prompt_id: str, text: str, settings: GenerationSettings,
                   seed: int) -> GenerationKey:
    """The store key of ``backend``'s response (anything with its ``condition`` and ``identity``: the
    backend or its facts) to one prompt (rendered as ``text``) in a vetting of the model with
    fingerprint ``reference``: the settings column holds the generation settings, the
    backend's identity and the prompt text's hash."""
    described = {**settings.as_dict(), "backend": backend.identity, "prompt_sha256": prompt_sha256(text)}
    return GenerationKey(reference, backend.condition, prompt_id, settings_json(described), seed)


def refusal_cut(token_texts: Callable[[int], str], count: int) -> int | None:
    """The number of tokens after which the reference's stop-on-refusal rule would have ended a
    response of ``count`` tokens, whose first ``n`` tokens decode to ``token_texts(n)``; ``None`` if
    it never would. The rule (:mod:`quada.measures.generate`): stop at the first token whose prefix
    contains a refusal phrase."""
    if refusal_phrase(token_texts(count)) is None:
        return None
    return next(n for n in range(1, count + 1) if refusal_phrase(token_texts(n)) is not None)


def check_deployment(deployment: Deployment, api_key_env: str = "OPENAI_API_KEY") -> None:
    """Fail now, before any model work, on a deployment that cannot run: llama-cpp-python missing or
    a GGUF that llama.cpp cannot load (not a GGUF, damaged or truncated); a server that does not
    answer within seconds or does not serve the name."""
    if deployment.kind == LLAMACPP:
        from quada.backends.llamacpp import check_loads, llama_cpp_module
        from quada.models import BUILTINS, gguf_file

        llama_cpp_module()
        if deployment.target in BUILTINS:  # checked against its pinned digest when it is first joined
            BUILTINS[deployment.target].part_paths()
        else:
            check_loads(gguf_file(deployment.target))
        return
    from quada.backends.openai import check_served

    check_served(deployment, api_key_env)


def open_backend(deployment: Deployment, tokenizer, api_key_env: str = "OPENAI_API_KEY",
                 request_timeout: float = 300.0, retries: int = 6) -> Backend:
    """``deployment`` opened for generation with the reference model's ``tokenizer``: a GGUF loaded
    into llama.cpp, or a server checked to answer and to serve the named model."""
    if deployment.kind == LLAMACPP:
        from quada.backends.llamacpp import LlamaCppBackend

        return LlamaCppBackend(deployment, tokenizer)
    from quada.backends.openai import OpenAIBackend

    return OpenAIBackend(deployment, tokenizer, api_key_env, request_timeout, retries)


def served_perplexity(backend: Backend, windows: Sequence[Sequence[int]]) -> float | None:
    """``backend``'s perplexity over token-id ``windows`` (``None`` where it cannot score given tokens)."""
    return backend.perplexity(windows)


def determinism(backend: Backend, prompts: Sequence[Rendered], settings: GenerationSettings) -> list[bool]:
    """Whether ``backend`` answers each prompt the same way twice, asked in the order A, B, A, B (so a
    server that reuses the previous request's cache, or batches requests, is caught too)."""
    first = [backend.complete(p, settings).text for p in prompts]
    second = [backend.complete(p, settings).text for p in prompts]
    return [a == b for a, b in zip(first, second)]


def backend_cache_key(backend, *parts) -> str:
    """A key of the run's store for a number measured on ``backend`` (anything with its ``condition``
    and ``identity``: the backend or its facts; its condition and a hash of its identity, then ``parts``)."""
    identity = hashlib.sha256(settings_json(backend.identity).encode()).hexdigest()[:16]
    return "|".join(map(str, (backend.condition, identity, *parts)))
