"""The bad-input campaign: for every command, inputs a user gets wrong (missing or damaged files,
malformed specs, numbers out of range, unknown names) end in one message that names the problem,
exit code 2 and no traceback, before any model work and with no result written.

Each case is ``(command line, fragment of the message)``; ``{name}`` fields are filled from the
``inputs`` fixture (bad files and a tiny model made for the test)."""

import sqlite3

import pytest

from quada.store import CLEAN, Generation, GenerationKey, Store

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
    "zero prompts": ("vet -m {model} --limit 0 --run-dir {run}", "--limit"),
    "unknown benchmark": ("vet -m {model} --benchmark nosuchbench --run-dir {run}", "unknown benchmark"),
    "binary corpus": ("vet -m {model} --corpus {binary_txt} --judges keyword --run-dir {run}", "not UTF-8"),
    "damaged store": ("vet -m {model} --approx none --judges keyword --run-dir {damaged_run}", "damaged"),
    "unknown executor": ("vet -m {model} --executor spark --run-dir {run}", "unknown executor 'spark'"),
    "ray address without ray": ("vet -m {model} --ray-address auto --run-dir {run}", "--executor ray"),
    "zero ray workers": ("vet -m {model} --executor ray --workers 0 --run-dir {run}", "--workers"),
    "zero cpus per worker": ("vet -m {model} --executor ray --cpus-per-worker 0 --run-dir {run}", "--cpus-per-worker"),
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
    "align onto a file": ("align -m {model} --pairs {pairs} --judges keyword --out {prompts}", "--out"),
}


@pytest.fixture
def inputs(tmp_path, model_dir):
    """Good and bad input files for the cases, by the names the command lines use."""
    binary = bytes(range(128, 256)) * 4
    files = {
        "prompts": "one prompt\nanother prompt\n",
        "two_columns": "goal_text,target\nDo it,Sure\n",
        "huge_field": 'prompt\n"' + "x" * 140_000 + '"\n',
        "list_prompt": '{"prompt": ["a", "b"]}\n',
        "bad_jsonl": '{"prompt_id": "p0", "label": 1\n',
        "pairs": '{"prompt": "q", "chosen": "no", "rejected": "yes", "harmful": true}\n',
    }
    suffixes = {"two_columns": ".csv", "huge_field": ".csv", "list_prompt": ".jsonl", "bad_jsonl": ".jsonl", "pairs": ".jsonl"}
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
    return names


@pytest.mark.parametrize("case", CASES)
def test_a_bad_input_is_one_message_and_exit_2(case, cli, inputs):
    command, fragment = CASES[case]
    before = sorted(p.name for p in inputs["tmp"].iterdir())
    result = cli(*[part.format(**inputs) for part in command.split()])
    result.assert_user_error(fragment)
    assert not (inputs["out"].exists() or (inputs["run"] / "results.sqlite").exists())
    assert sorted(p.name for p in inputs["tmp"].iterdir() if p.name != "run") == [b for b in before if b != "run"]
