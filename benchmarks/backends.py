"""Generation speed of each backend on the same prompts, in one run: quada's transformers generation
(the reference: automatic batches, bf16), llama.cpp in process on the model's GGUF (one sequence at
a time, as `quada vet --deployment llamacpp:...` runs it; also with one thread, and with every
prompt as a sequence of one shared batch, which quada does not do because it changes responses),
and llama-cpp-python's OpenAI-compatible server on the same GGUF, started here on the loopback and
asked one prompt at a time (as `--deployment openai:...` asks). Greedy, the same prompts, token
budget and no stop on refusal, so every arm generates until its end of sequence or the budget.
Prints each arm's time, tokens and tokens per second, its time ratio against transformers, how
many responses equal the reference's and llama.cpp's, and the CPU it ran on.

    python benchmarks/backends.py --model qwen2.5-coder-1.5b-instruct --limit 16
"""

from __future__ import annotations

import http.client
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import typer

from quada.backends import LLAMACPP, OPENAI, Deployment, render
from quada.backends.llamacpp import LlamaCppBackend
from quada.backends.openai import OpenAIBackend
from quada.data import load_benchmark, subset
from quada.measures.generate import GenerationSettings, generate
from quada.models import gguf_file, load


def cpu_description() -> str:
    """The CPU model name and the vector extensions that decide these kernels' speed."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16")
    return f"{name} ({', '.join(f for f in wanted if f in flags) or 'no AVX2'})"


def batched(gguf: Path, tokenizer, prompts, max_new_tokens: int, threads: int) -> tuple[list[str], int]:
    """Greedy responses with every prompt a sequence of one llama.cpp batch (a shared KV cache of
    ``len(prompts)`` sequences, one decode call per step for all unfinished ones): how a server
    batches, and what quada's one-sequence runs are compared with. Returns the texts and the tokens."""
    from quada.backends.llamacpp import llama_cpp_module

    llama = llama_cpp_module()
    model = llama.llama_model_load_from_file(str(gguf).encode(), llama.llama_model_default_params())
    vocab = llama.llama_model_get_vocab(model)
    n_vocab = llama.llama_vocab_n_tokens(vocab)
    ids = [tokenizer(p.text, add_special_tokens=False)["input_ids"] for p in prompts]
    params = llama.llama_context_default_params()
    params.n_ctx = params.n_batch = len(ids) * (max(map(len, ids)) + max_new_tokens)  # room for every sequence
    params.n_seq_max = len(ids)
    params.n_threads = params.n_threads_batch = threads
    context = llama.llama_init_from_model(model, params)
    batch = llama.llama_batch_init(params.n_ctx, 0, 1)

    def decode(items):  # (token, position, sequence, wants logits)
        batch.n_tokens = len(items)
        for i, (token, position, sequence, logits) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, position, 1, logits
            batch.seq_id[i][0] = sequence
        assert llama.llama_decode(context, batch) == 0

    decode([(t, i, s, i == len(seq) - 1) for s, seq in enumerate(ids) for i, t in enumerate(seq)])
    rows = {s: sum(map(len, ids[: s + 1])) - 1 for s in range(len(ids))}  # each sequence's logits row
    generated = [[] for _ in ids]
    for step in range(max_new_tokens):
        nexts = {}
        for s, row in rows.items():
            logits = np.ctypeslib.as_array(llama.llama_get_logits_ith(context, row), shape=(n_vocab,))
            token = int(np.argmax(logits))
            if not llama.llama_vocab_is_eog(vocab, token):
                generated[s].append(token)
                nexts[s] = token
        if not nexts or step == max_new_tokens - 1:
            break
        decode([(t, len(ids[s]) + len(generated[s]) - 1, s, True) for s, t in nexts.items()])
        rows = {s: i for i, s in enumerate(nexts)}
    llama.llama_batch_free(batch)
    llama.llama_free(context)
    llama.llama_model_free(model)
    return [tokenizer.decode(g, skip_special_tokens=True) for g in generated], sum(map(len, generated))


def start_server(gguf: Path, threads: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
         "--model_alias", "served", "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", "4096"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    while True:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/v1/models")
            if connection.getresponse().status == 200:
                return server, f"http://127.0.0.1:{port}/v1"
        except OSError:
            if server.poll() is not None:
                raise RuntimeError("the llama.cpp server did not start") from None
            time.sleep(0.5)


def main(
    model: str = typer.Option("qwen2.5-coder-1.5b-instruct", help="A built-in model or a model folder (the reference)."),
    gguf: str = typer.Option("", help="The GGUF that llama.cpp runs; default: the built-in model's own GGUF."),
    prompts: str = typer.Option("advbench", help="Benchmark name or prompt file."),
    limit: int = typer.Option(16, help="Number of prompts (a seeded subset)."),
    max_new_tokens: int = typer.Option(64),
    prompt_format: str = typer.Option("paper"),
    serve: bool = typer.Option(True, help="Also time llama-cpp-python's server on the loopback."),
) -> None:
    threads = torch.get_num_threads()
    lm, tokenizer = load(model)
    requests = [p.text for p in subset(load_benchmark(prompts), limit, 0)]
    settings = GenerationSettings(max_new_tokens=max_new_tokens, prompt_format=prompt_format)
    rendered = [render(tokenizer, p, prompt_format) for p in requests]
    path = gguf_file(gguf or model)

    def tokens_of(texts):
        return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)

    arms = {}
    start = time.perf_counter()
    reference = generate(lm, tokenizer, requests, settings, progress=False)
    arms["transformers (bf16, automatic batch)"] = (time.perf_counter() - start, tokens_of(reference), reference)
    del lm

    for count in sorted({threads, 1}, reverse=True):
        llama = LlamaCppBackend(Deployment(LLAMACPP, str(path)), tokenizer, threads=count)
        start = time.perf_counter()
        completions = [llama.complete(r, settings) for r in rendered]
        arms[f"llama.cpp in process ({llama.identity['quant']}, one sequence, {count} threads)"] = (
            time.perf_counter() - start, sum(c.tokens for c in completions), [c.text for c in completions])
        llama.close()
    start = time.perf_counter()
    texts, tokens = batched(path, tokenizer, rendered, max_new_tokens, threads)
    arms[f"llama.cpp in process, all {len(rendered)} prompts as sequences of one batch"] = (
        time.perf_counter() - start, tokens, texts)

    if serve:
        server, url = start_server(path, threads)
        try:
            client = OpenAIBackend(Deployment(OPENAI, url, "served"), tokenizer)
            start = time.perf_counter()
            completions = [client.complete(r, settings) for r in rendered]
            arms["llama-cpp-python server (/v1/completions, one request at a time)"] = (
                time.perf_counter() - start, sum(c.tokens for c in completions), [c.text for c in completions])
        finally:
            server.terminate()
            server.wait()

    print(f"model {model}, GGUF {path.name}, {len(requests)} prompts of {prompts}, {max_new_tokens} new tokens, "
          f"prompt format {prompt_format}, {threads} threads; CPU: {cpu_description()}")
    baseline = next(iter(arms.values()))[0]
    one_sequence = list(arms.values())[1][2]
    for label, (seconds, tokens, texts) in arms.items():
        same = sum(a == b for a, b in zip(texts, reference))
        same_llama = sum(a == b for a, b in zip(texts, one_sequence))
        print(f"{label}: {seconds:.1f} s, {tokens} tokens, {tokens / seconds:.1f} tokens/s, "
              f"time x{seconds / baseline:.2f} of transformers; responses equal to transformers' {same}/{len(texts)}, "
              f"to llama.cpp's one sequence at a time {same_llama}/{len(texts)}")


if __name__ == "__main__":
    typer.run(main)
