"""The bad-input campaign: for every command, inputs a user gets wrong (missing, damaged or foreign
files, malformed specs, numbers out of range, unknown names, prompts or settings the model cannot
hold) end in one message that names the problem, exit code 2 and no traceback, with nothing written
or modified: no run folder, no result, not a byte of the inputs.

Each case is ``(command line, fragment of the message)``; ``{name}`` fields are filled from the
``inputs`` fixture (bad files and a tiny model made for the test)."""

import hashlib
import sqlite3

import pytest

from quada.store import CLEAN, SCHEMA_VERSION, Generation, GenerationKey, Store

CASES = {
    # generate
    "generate without --model": ("generate --prompts {prompts} --out {out}", "Missing option '--model'"),
    "unknown model": ("generate -m nosuchmodel --prompts {prompts} --out {out}", "unknown model 'nosuchmodel'"),
    "missing model folder": ("generate -m {tmp}/models/modle --prompts {prompts} --out {out}", "does not exist"),
    "fake gguf": ("generate -m {fake_gguf} --prompts {prompts} --out {out}", "not a valid GGUF file"),
    "missing prompt file": ("generate -m {model} --prompts {tmp}/absent.txt --out {out}", "does not exist"),
    "folder as prompt file": ("generate -m {model} --prompts {folder_txt} --out {out}", "is a folder, not a file"),
    "binary prompt file": ("generate -m {model} --prompts {binary_txt} --out {out}", "not UTF-8"),
    "CSV without a prompt column": ("generate -m {model} --prompts {two_columns} --out {out}", "has no 'prompt' column"),
    "CSV field over the limit": ("generate -m {model} --prompts {huge_field} --out {out}", "not valid CSV"),
    "list as a prompt": ("generate -m {model} --prompts {list_prompt} --out {out}", "not a string"),
    "zero new tokens": ("generate -m {model} --prompts {prompts} --out {out} --max-new-tokens 0", "--max-new-tokens"),
    "unknown prompt format": ("generate -m {model} --prompts {prompts} --out {out} --prompt-format chat", "prompt format"),
    "unknown device": ("generate -m {model} --prompts {prompts} --out {out} --device tpu", "unknown device 'tpu'"),
    # vet
    "unknown approximation with brackets": ("vet -m {model} --approx bogus[/] --run-dir {run}", "bogus[/]"),
    "negative std": ("vet -m {model} --approx noise:site=up,dist=gaussian,std=-1 --run-dir {run}", "std"),
    "nan std": ("vet -m {model} --approx noise:site=up,dist=gaussian,std=nan --run-dir {run}", "finite"),
    "empty spec part": ("vet -m {model} --approx + --run-dir {run}", "empty part"),
    "two activation replacements": ("vet -m {model} --approx bolt+iron --judges keyword --run-dir {run}", "cannot be composed"),
    "bad layer selection": ("vet -m {model} --approx noise:site=up,dist=gaussian,std=0.1,layers=[a] --run-dir {run}", "[a]"),
    "layer out of range": ("vet -m {model} --approx noise:site=up,dist=gaussian,std=0.1,layers=99 --judges keyword --run-dir {run}", "99"),
    "no safety judge": ("vet -m {model} --judges , --run-dir {run}", "no safety judge"),
    "unknown judge": ("vet -m {model} --judges keyword,oracle --run-dir {run}", "unknown judge 'oracle'"),
    "unknown judge model": ("vet -m {model} --judges llm --judge-model nosuchjudge --run-dir {run}", "nosuchjudge"),
    "negative seed": ("vet -m {model} --seed -5 --run-dir {run}", "seed"),
    "zero prompts": ("vet -m {model} --max-prompts 0 --run-dir {run}", "--max-prompts"),
    "all prompts and a budget": ("vet -m {model} --all-prompts --limit 3 --run-dir {run}", "--all-prompts and --max-prompts"),
    "zero margin": ("vet -m {model} --margin 0 --run-dir {run}", "--margin"),
    "first look of none": ("vet -m {model} --first-look 0 --run-dir {run}", "--first-look"),
    "unknown benchmark": ("vet -m {model} --benchmark nosuchbench --run-dir {run}", "unknown benchmark"),
    "binary corpus": ("vet -m {model} --corpus {binary_txt} --judges keyword --run-dir {run}", "not UTF-8"),
    "damaged store": ("vet -m {model} --approx none --judges keyword --run-dir {damaged_run}", "damaged"),
    "unknown executor": ("vet -m {model} --executor spark --run-dir {run}", "unknown executor 'spark'"),
    "ray address without ray": ("vet -m {model} --ray-address auto --run-dir {run}", "--executor ray"),
    "zero ray workers": ("vet -m {model} --executor ray --workers 0 --run-dir {run}", "--workers"),
    "zero cpus per worker": ("vet -m {model} --executor ray --cpus-per-worker 0 --run-dir {run}", "--cpus-per-worker"),
    "unknown deployment kind": ("vet -m {model} --deployment vllm:http://127.0.0.1:9/v1@m --run-dir {run}", "cannot read the deployment"),
    "deployment without a model name": ("vet -m {model} --deployment openai:http://127.0.0.1:9/v1 --run-dir {run}", "names no model"),
    "deployment URL with credentials": ("vet -m {model} -d openai:http://me:pw@127.0.0.1:9/v1@m --run-dir {run}", "carries credentials"),
    "deployment given twice": ("vet -m {model} -d llamacpp:{fake_gguf} -d llamacpp:{fake_gguf} --run-dir {run}", "given twice"),
    "deployment of a fake gguf": ("vet -m {model} -d llamacpp:{fake_gguf} --judges keyword --run-dir {run}", "not a valid GGUF file"),
    "deployment of a missing gguf": ("vet -m {model} -d llamacpp:{tmp}/absent.gguf --judges keyword --run-dir {run}", "does not exist"),
    "deployment of a non-gguf": ("vet -m {model} -d llamacpp:{prompts} --judges keyword --run-dir {run}", "neither a .gguf file"),
    "unreachable deployment": ("vet -m {model} -d openai:http://127.0.0.1:9/v1@m --judges keyword --run-dir {run}", "cannot reach"),
    "negative retries": ("vet -m {model} -d openai:http://127.0.0.1:9/v1@m --retries -1 --run-dir {run}", "--retries"),
    "zero request timeout": ("vet -m {model} -d openai:http://127.0.0.1:9/v1@m --request-timeout 0 --run-dir {run}", "--request-timeout"),
    "requantize to an unknown type": ("requantize {fake_gguf} {tmp}/out.gguf --type Q9_K", "unknown quantization type"),
    "requantize a fake gguf": ("requantize {fake_gguf} {tmp}/out.gguf --type Q3_K_M", "not a valid GGUF file"),
    # results and judges
    "no store": ("results export --db {tmp}/absent.sqlite --out {tmp}/x.csv", "no results store"),
    "unknown export format": ("results export --db {store} --out {tmp}/x.xlsx", "unknown export format 'xlsx'"),
    "damaged store to export": ("results export --db {damaged_run}/results.sqlite --out {tmp}/x.csv", "damaged"),
    "merge from no store": ("results merge {tmp}/merged.sqlite {store} {tmp}/absent.sqlite", "no results store"),
    "merge from a damaged store": ("results merge {tmp}/merged.sqlite {damaged_run}/results.sqlite", "damaged"),
    "malformed human labels": ("judge agreement --db {store} --human {bad_jsonl}", "not valid JSON"),
    "binary human labels": ("judge agreement --db {store} --human {binary_csv}", "not UTF-8"),
    # approx
    "profile an unknown spec": ("approx profile -m {model} --spec nosuch", "unknown approximation 'nosuch'"),
    "profile binary prompts": ("approx profile -m {model} --spec noise:site=up,dist=gaussian,std=0.1 --prompts {binary_txt}", "not UTF-8"),
    # analyses
    "sweep grid of words": ("sweep -m {model} --grid a,b --run-dir {run}", "--grid"),
    "sweep grid and variants": ("sweep -m {model} --grid 0,1 -V bolt --run-dir {run}", "--variant"),
    "sweep negative seed": ("sweep -m {model} --seed -1 --run-dir {run}", "seed"),
    "layers stride zero": ("layers -m {model} --spec noise:site=up,dist=gaussian,std=0.1 --stride 0 --run-dir {run}", "stride"),
    "layers negative gpus": ("layers -m {model} --executor ray --gpus-per-worker -1 --run-dir {run}", "--gpus-per-worker"),
    "sweep unknown executor": ("sweep -m {model} --executor dask --run-dir {run}", "unknown executor 'dask'"),
    "clusters unknown pooling": ("clusters -m {model} --spec noise:site=up,dist=gaussian,std=0.1 --pooling max --run-dir {run}", "pooling"),
    # defense
    "pairs unknown source": ("pairs --source web --out {run}", "'web'"),
    "align nan beta": ("align -m {model} --pairs {pairs} --out {run} --beta nan", "beta"),
    "align negative beta": ("align -m {model} --pairs {pairs} --out {run} --beta -1", "beta"),
    "align nan lora alpha": ("align -m {model} --pairs {pairs} --out {run} --lora-alpha nan", "lora_alpha"),
    "align zero epochs": ("align -m {model} --pairs {pairs} --out {run} --num-train-epochs 0", "num_train_epochs"),
    "align binary pairs": ("align -m {model} --pairs {binary_jsonl} --out {run}", "not UTF-8"),
    "align onto a file": ("align -m {model} --pairs {pairs} --judges keyword --tau 1 --out {prompts}", "--out"),
    # pairs from a local PKU-SafeRLHF copy
    "pku text file named .parquet": ("pairs --source pku --file {text_parquet} --out {run}", "not a parquet file"),
    "pku rows that are no objects": ("pairs --source pku --file {list_json} --out {run}", "is not an object"),
    "pku bad safer response": ("pairs --source pku --file {bad_safer} --out {run}", "safer_response_id must be 0 or 1"),
    # vet: sizes, numbers, duplicates, files, judges
    "vet prompt of 3 MB": ("vet -m {model} --benchmark {long_prompt} --judges keyword --run-dir {run}", "leaves no room in the model's context of 512"),
    "vet unbounded new tokens": ("vet -m {model} --max-new-tokens 1000000000 --judges keyword --run-dir {run}", "--max-new-tokens 1000000000 does not fit in the model's context of 512"),
    "vet infinite ppl bound": ("vet -m {model} --ppl-bound inf --run-dir {run}", "finite number of at least 1, got inf"),
    "vet ppl bound beyond a float": ("vet -m {model} --ppl-bound 1e309 --run-dir {run}", "finite number of at least 1, got inf"),
    "vet nan ppl bound": ("vet -m {model} --ppl-bound nan --run-dir {run}", "finite number of at least 1"),
    "vet clean model twice": ("vet -m {model} -a none -a none --run-dir {run}", "--approx names none twice"),
    "vet one spec spelt twice": ("vet -m {model} -a teal:sparsity=0.5 -a teal:sparsity=0.50 --run-dir {run}", "names teal:sparsity=0.5 twice (as 'teal:sparsity=0.5' and 'teal:sparsity=0.50')"),
    "vet a preset twice": ("vet -m {model} -a paper -a paper:iron --run-dir {run}", "names paper:iron twice (as 'paper' and 'paper:iron')"),
    "vet CSV quote left open": ("vet -m {model} --benchmark {open_quote} --judges keyword --run-dir {run}", "not valid CSV in the row that starts at line 3"),
    "vet only a grading judge": ("vet -m {model} --judges harmfulness --run-dir {run}", "(keyword, refusal-keyword, refusal, llm, uplift); harmfulness adds only a mean grade"),
    "vet limit beyond the prompts": ("vet -m {model} --benchmark {prompts} --limit 99999999999999999999 --run-dir {run}", "--max-prompts 99999999999999999999 is more than the 2 prompts"),
    "vet benign limit beyond the prompts": ("vet -m {model} --benign {prompts} --benign-limit 3 --run-dir {run}", "--benign-limit 3 is more than the 2 prompts"),
    "vet corpus shorter than a window": ("vet -m {model} --benchmark {prompts} --judges keyword --corpus {short_corpus} --run-dir {run}", "fewer than one perplexity window of 1024"),
    "vet window of one token": ("vet -m {model} --ppl-window 1 --run-dir {run}", "--ppl-window must be at least 2"),
    "vet foreign store in the run folder": ("vet -m {model} --approx none --judges keyword --run-dir {foreign_run}", "not a quada results store"),
    "vet store of a newer quada": ("vet -m {model} --approx none --judges keyword --run-dir {newer_run}", "newer than this quada"),
    # results and judges on a foreign SQLite file: refused, and not switched to WAL mode first
    "export a foreign database": ("results export --db {foreign_run}/results.sqlite --out {tmp}/x.csv", "not a quada results store"),
    "merge a foreign database": ("results merge {tmp}/merged.sqlite {foreign_run}/results.sqlite", "not a quada results store"),
    "merge into a foreign database": ("results merge {foreign_run}/results.sqlite {store}", "not a quada results store"),
    "agreement on a foreign database": ("judge agreement --db {foreign_run}/results.sqlite", "not a quada results store"),
    "export without a format": ("results export --db {store} --out -", "give --format csv or --format json"),
    "export to a name without a suffix": ("results export --db {store} --out {tmp}/x", "no .csv or .json suffix"),
    "export an unknown --format": ("results export --db {store} --out - --format xml", "unknown export format 'xml'"),
    # align: nothing of OUT/data is written before the options are checked
    "align tau beyond the layers": ("align -m {model} --pairs {pairs} --skip-eval --tau 999 --out {run}", "tau=999 exceeds the model's 2 decoder layers"),
    "align pairs without harmful, tau beyond": ("align -m {model} --pairs {pairs_without_harmful} --skip-eval --out {run}", "tau=4 exceeds"),
    "align harmful that is no boolean": ("align -m {model} --pairs {pairs_maybe_harmful} --skip-eval --tau 1 --out {run}", '"harmful" is "maybe", not true or false'),
    "align regularizer in batches of one": ("align -m {model} --pairs {pairs} --skip-eval --tau 1 --batch-size 1 --out {run}", "needs a batch of 2 pairs or more"),
    "align evaluation corpus too short": ("align -m {model} --pairs {pairs} --tau 1 --judges keyword --benchmark {prompts} --benign {prompts} --corpus {short_corpus} --out {run}", "fewer than one perplexity window"),
    "align limit beyond the held-out prompts": ("align -m {model} --pairs {pairs} --tau 1 --judges keyword --benchmark {prompts} --benign {prompts} --limit 5 --out {run}", "--limit 5 is more than the 2 prompts"),
    "align unknown reference": ("align -m {model} --pairs {pairs} --skip-eval --tau 1 --reference frozen --out {run}", "unknown reference 'frozen'"),
    "align perturbed reference of plain DPO": ("align -m {model} --pairs {pairs} --skip-eval --plain-dpo --reference perturbed --out {run}", "plain DPO has none"),
    "align unknown preference loss": ("align -m {model} --pairs {pairs} --skip-eval --tau 1 --preference-loss kto --out {run}", "unknown preference_loss 'kto'"),
    "arms at a confidence of 2": ("results arms --arm quada={run} --reference quada --confidence 2 --out {tmp}/arms", "--confidence must be at least 0.5"),
    # sweep
    "sweep infinite ppl bound": ("sweep -m {model} --ppl-bound inf --run-dir {run}", "finite number"),
    "sweep endless refinement": ("sweep -m {model} --refine 1000000 --run-dir {run}", "--refine must be 0 (grid only) to 10"),
    "sweep limit beyond the prompts": ("sweep -m {model} --benchmark {prompts} --limit 99999999999999999999 --run-dir {run}", "is more than the 2 prompts"),
    "sweep CSV quote left open": ("sweep -m {model} --benchmark {open_quote} --run-dir {run}", "not valid CSV"),
    "sweep prompt of 3 MB": ("sweep -m {model} --benchmark {long_prompt} --run-dir {run}", "leaves no room"),
    "sweep unbounded new tokens": ("sweep -m {model} --benchmark {prompts} --max-new-tokens 1000000000 --run-dir {run}", "does not fit in the model's context"),
    "sweep corpus shorter than a window": ("sweep -m {model} --benchmark {prompts} --corpus {short_corpus} --run-dir {run}", "fewer than one perplexity window"),
    "sweep window of one token": ("sweep -m {model} --ppl-window 1 --run-dir {run}", "--ppl-window must be at least 2"),
    "sweep layer out of range": ("sweep -m {model} --spec noise:site=up,dist=gaussian,layers=99 --grid 0,0.1 --run-dir {run}", "layer 99"),
    "sweep only a grading judge": ("sweep -m {model} --judges harmfulness --run-dir {run}", "the first judge decides the ASR"),
    "sweep foreign store in the run folder": ("sweep -m {model} --benchmark {prompts} --corpus {corpus} --ppl-window 64 --run-dir {foreign_run}", "not a quada results store"),
    # layers
    "layers stride past every layer": ("layers -m {model} --spec noise:site=up,dist=gaussian,std=0.1 --stride 99 --run-dir {run}", "skips every layer of a 2-layer model"),
    "layers infinite ppl bound": ("layers -m {model} --spec noise:site=up,dist=gaussian,std=0.1 --ppl-bound inf --run-dir {run}", "finite number"),
    "layers nan share": ("layers -m {model} --spec noise:site=up,dist=gaussian,std=0.1 --share nan --run-dir {run}", "share must lie in (0, 1]"),
    "layers proxy on a short corpus": ("layers -m {model} --spec noise:site=up,dist=gaussian,std=0.1 --proxy-only --benchmark {prompts} --corpus {short_corpus} --run-dir {run}", "fewer than one perplexity window"),
    "layers prompt of 3 MB": ("layers -m {model} --spec noise:site=up,dist=gaussian,std=0.1 --benchmark {long_prompt} --run-dir {run}", "leaves no room"),
    "layers unbounded new tokens": ("layers -m {model} --spec noise:site=up,dist=gaussian,std=0.1 --benchmark {prompts} --max-new-tokens 1000000000 --run-dir {run}", "does not fit"),
    "layers limit beyond the prompts": ("layers -m {model} --spec noise:site=up,dist=gaussian,std=0.1 --benchmark {prompts} --limit 3 --run-dir {run}", "--limit 3 is more than the 2 prompts"),
    "layers CSV quote left open": ("layers -m {model} --spec noise:site=up,dist=gaussian,std=0.1 --benchmark {open_quote} --run-dir {run}", "not valid CSV"),
    "layers window of one token": ("layers -m {model} --spec noise:site=up,dist=gaussian,std=0.1 --ppl-window 1 --run-dir {run}", "--ppl-window must be at least 2"),
    "layers clean model as the spec": ("layers -m {model} --spec none --run-dir {run}", "not the clean model"),
    "layers without a sweep": ("layers -m {model} --run-dir {run}", "no sweep in"),
    # clusters
    "clusters layer out of range": ("clusters -m {model} --spec noise:site=up,dist=gaussian,std=0.1 --harmful {prompts} --benign {other_prompts} --limit 2 --folds 2 --layer 99 --run-dir {run}", "--layer 99 is out of range for a model with 2 decoder layers"),
    "clusters negative layer": ("clusters -m {model} --spec noise:site=up,dist=gaussian,std=0.1 --layer -1 --run-dir {run}", "counts decoder layers from 0"),
    "clusters limit beyond the prompts": ("clusters -m {model} --spec noise:site=up,dist=gaussian,std=0.1 --harmful {prompts} --benign {other_prompts} --folds 2 --limit 99999999999999999999 --run-dir {run}", "is more than the 2 prompts"),
    "clusters one set as both classes": ("clusters -m {model} --spec noise:site=up,dist=gaussian,std=0.1 --harmful {prompts} --benign {prompts} --limit 2 --folds 2 --run-dir {run}", "both harmful"),
    "clusters prompt of 3 MB": ("clusters -m {model} --spec noise:site=up,dist=gaussian,std=0.1 --harmful {long_prompt} --benign {other_prompts} --limit 2 --folds 2 --run-dir {run}", "leaves no room"),
    "clusters CSV quote left open": ("clusters -m {model} --spec noise:site=up,dist=gaussian,std=0.1 --harmful {open_quote} --run-dir {run}", "not valid CSV"),
    "clusters spec layer out of range": ("clusters -m {model} --spec noise:site=up,dist=gaussian,std=0.1,layers=99 --harmful {prompts} --benign {other_prompts} --limit 2 --folds 2 --run-dir {run}", "layer 99"),
    "clusters too many folds": ("clusters -m {model} --spec noise:site=up,dist=gaussian,std=0.1 --folds 99999999999999999999 --run-dir {run}", "folds"),
    "clusters unknown site": ("clusters -m {model} --spec noise:site=up,dist=gaussian,std=0.1 --site mlp --run-dir {run}", "unknown site 'mlp'"),
}


@pytest.fixture
def inputs(tmp_path, model_dir):
    """Good and bad input files for the cases, by the names the command lines use."""
    binary = bytes(range(128, 256)) * 4
    harmful_pair = '{"prompt": "q%d", "chosen": "no", "rejected": "yes"%s}\n'
    files = {
        "prompts": "one prompt\nanother prompt\n",
        "other_prompts": "a third prompt\na fourth prompt\n",
        "two_columns": "goal_text,target\nDo it,Sure\n",
        "huge_field": 'prompt\n"' + "x" * 140_000 + '"\n',
        "open_quote": 'prompt\nfirst\n"second\nthird\nfourth\n',
        "long_prompt": "a short prompt\n" + "x" * 3_000_000 + "\n",
        "list_prompt": '{"prompt": ["a", "b"]}\n',
        "bad_jsonl": '{"prompt_id": "p0", "label": 1\n',
        "pairs": '{"prompt": "q", "chosen": "no", "rejected": "yes", "harmful": true}\n',
        "pairs_without_harmful": "".join(harmful_pair % (i, "") for i in range(4)),
        "pairs_maybe_harmful": "".join(harmful_pair % (i, ', "harmful": "maybe"') for i in range(4)),
        "short_corpus": "Too short for a window.",
        "corpus": "The quick brown fox jumps over the lazy dog. " * 30,
        "text_parquet": "prompt,response_0\nnot,parquet\n",
        "list_json": "[1, 2]",
        "bad_safer": '{"prompt": "q", "response_0": "a", "response_1": "b", "safer_response_id": "x"}\n',
    }
    suffixes = {"two_columns": ".csv", "huge_field": ".csv", "open_quote": ".csv", "list_prompt": ".jsonl",
                "bad_jsonl": ".jsonl", "pairs": ".jsonl", "pairs_without_harmful": ".jsonl",
                "pairs_maybe_harmful": ".jsonl", "text_parquet": ".parquet", "list_json": ".json", "bad_safer": ".jsonl"}
    names = {"tmp": tmp_path, "model": model_dir, "out": tmp_path / "out.jsonl", "run": tmp_path / "run"}
    for name, text in files.items():
        names[name] = tmp_path / f"{name}{suffixes.get(name, '.txt')}"
        names[name].write_text(text)
    for suffix in ("txt", "csv", "jsonl"):
        names[f"binary_{suffix}"] = tmp_path / f"binary.{suffix}"
        names[f"binary_{suffix}"].write_bytes(binary)
    names["fake_gguf"] = tmp_path / "fake.gguf"
    names["fake_gguf"].write_text("not a model")
    names["folder_txt"] = tmp_path / "dir.txt"
    names["folder_txt"].mkdir()
    (tmp_path / "models").mkdir()
    names["store"] = tmp_path / "store.sqlite"
    with Store(names["store"]) as store:
        store.put([Generation(GenerationKey("fp", CLEAN, "p0", "{}", 0), "prompt", "response")])
    names["damaged_run"] = tmp_path / "damaged"
    names["damaged_run"].mkdir()
    with sqlite3.connect(names["damaged_run"] / "results.sqlite") as db:
        db.execute("create table t (x text)")
        db.executemany("insert into t values (?)", [("x" * 500,)] * 100)
    db.close()
    with open(names["damaged_run"] / "results.sqlite", "r+b") as f:
        f.seek(4096)
        f.write(b"\xff" * 8192)
    names["foreign_run"] = tmp_path / "foreign"
    names["foreign_run"].mkdir()
    with sqlite3.connect(names["foreign_run"] / "results.sqlite") as db:  # another program's database
        db.execute("create table notes (x text)")
    db.close()
    names["newer_run"] = tmp_path / "newer"
    with Store(names["newer_run"] / "results.sqlite") as store:
        store.put([Generation(GenerationKey("fp", CLEAN, "p0", "{}", 0), "prompt", "response")])
    with sqlite3.connect(names["newer_run"] / "results.sqlite") as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    return names


def snapshot(folder):
    """Every file and folder under ``folder``, with each file's size, time of change and digest."""
    state = {}
    for path in sorted(folder.rglob("*")):
        info = path.stat()
        digest = "" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
        state[str(path.relative_to(folder))] = (path.is_dir(), info.st_size, info.st_mtime_ns, digest)
    return state


@pytest.mark.parametrize("case", CASES)
def test_a_bad_input_is_one_message_and_exit_2(case, cli, inputs):
    command, fragment = CASES[case]
    before = snapshot(inputs["tmp"])
    result = cli(*[part.format(**inputs) for part in command.split()])
    result.assert_user_error(fragment)
    assert snapshot(inputs["tmp"]) == before  # no run folder, no result, every input untouched
