"""The bad-input campaign: for every command, inputs a user gets wrong (missing, damaged or foreign
files, malformed specs, numbers out of range, unknown names, prompts or settings the model cannot
hold, an output that is one of the inputs) end in one message that names the problem, exit code 2
and no traceback, with nothing written or modified: no run folder, no result, not a byte of the
inputs.

Each case is ``(command line, fragment of the message)``, the command line split as a shell would
(``''`` is an empty argument); ``{name}`` fields are filled from the ``inputs`` fixture (bad files
and a tiny model made for the test). Every path, number and spec parameter of every command has a
case: a command or option added without one fails ``test_every_parameter_has_a_case``."""

import hashlib
import os
import shlex
import shutil
import sqlite3

import pytest
import typer

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
    "alpha above one": ("vet -m {model} --alpha 2 --run-dir {run}", "--alpha is an error rate"),
    "no concurrency": ("vet -m {model} --max-concurrency 0 --run-dir {run}", "--max-concurrency must be at least 1"),
    "prompted judge without its prompt": ("vet -m {model} --judges keyword,prompted --run-dir {run}", "--judge-prompt FILE"),
    "judge prompt without a response field": ("vet -m {model} --judges keyword,prompted --judge-prompt {prompts} --run-dir {run}",
                                              "the judge prompt has no field for the request"),
    "calibrate a binary judge prompt": ("judge calibrate --judges prompted --judge-prompt {binary_txt}", "not UTF-8"),
    "calibrate three answer words": ("judge calibrate --judges guard --judge-answers a,b,c", "--judge-answers takes two"),
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
    "vet only a grading judge": ("vet -m {model} --judges harmfulness --run-dir {run}", "(keyword, refusal-keyword, refusal, llm, uplift, guard, prompted); harmfulness adds only a mean grade"),
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
    # no command writes over its own input: same file, symlink, hard link, a folder replaced whole
    "export over its own store": ("results export --db {store} --out {store} --format csv", "--out {store} is --db {store}"),
    "export through a symlink to its store": ("results export --db {store} --out {store_link}", "is --db"),
    "requantize over its source": ("requantize {gguf} {gguf} --type Q4_0", "OUT {gguf} is SOURCE"),
    "requantize over a hard link of its source": ("requantize {gguf} {gguf_hard_link} --type Q4_0", "is SOURCE"),
    "merge into one of its stores": ("results merge {store} {store}", "OUT {store} is STORES"),
    "generate over its prompt file": ("generate -m {model} --prompts {prompts} --out {prompts}", "is --prompts"),
    "pku pairs over their own file": ("pairs --source pku --file {pairs_out}/pairs.jsonl --out {pairs_out}", "is --file"),
    "pairs over their harmful prompts": ("pairs -m {model} --harmful {pairs_out}/heldout-harmful.jsonl --out {pairs_out}", "is --harmful"),
    "align over its own model": ("align -m {align_run}/model --pairs {pairs} --skip-eval --tau 1 --out {align_run}", "a folder that this command replaces whole, is --model"),
    "arms over an arm": ("results arms --arm quada={align_run} --out {align_run}", "a folder that this command replaces whole, is --arm"),
    "vet over its report": ("vet -m {model} --benchmark {report_run}/report.md --judges keyword --run-dir {report_run}", "is report.md, a file that this command writes in --run-dir"),
    "sweep over its report": ("sweep -m {model} --benchmark {report_run}/report.md --run-dir {report_run}", "a file that this command writes"),
    "layers over its report": ("layers -m {model} --spec bolt --benchmark {report_run}/report.md --run-dir {report_run}", "a file that this command writes"),
    "clusters over its report": ("clusters -m {model} --spec bolt --harmful {report_run}/report.md --run-dir {report_run}", "a file that this command writes"),
    "attack over its report": ("attack -m {model} --attack direct --judges keyword --benchmark {report_run}/report.md --run-dir {report_run}", "a file that this command writes"),
    # training data that survives truncation; searches that would not finish
    "align pairs cut away by --max-length": ("align -m {model} --pairs {pairs_without_harmful} --skip-eval --tau 1 --max-length 64 --out {run}", "--max-length 64 leaves no pair to train on: the prompt of each of the 4 pairs"),
    "align without a harmful pair for the regularizer": ("align -m {model} --pairs {harmless_pairs} --skip-eval --tau 1 --out {run}", "no harmful pair is left to train on"),
    "attack autodan at the paper's budget": ("attack -m {model} --attack autodan --elite 99 --run-dir {run}", "204,800 prompts"),
    # accepted before, refused now
    "vet the same noise twice": ("vet -m {model} -a paper:bolt+paper:bolt --judges keyword --run-dir {run}", "twice; give each part once"),
    "vet only a refusal judge": ("vet -m {model} --judges refusal-keyword --run-dir {run}", "holds only refusal judges"),
    "sweep only a refusal judge": ("sweep -m {model} --judges refusal-keyword --run-dir {run}", "holds only refusal judges"),
    "calibrate no judge": ("judge calibrate --judges ''", "--judges names no judge"),
    "calibrate only commas": ("judge calibrate --judges ,", "--judges names no judge"),
    "calibrate on one labelled item": ("judge calibrate --judges keyword --labelled {one_label} --measure refusal", "1 labelled item(s), 1 labelled 1 and 0 labelled 0: too few"),
    "calibrate a CSV row with extra fields": ("judge calibrate --judges keyword --labelled {extra_fields} --measure refusal", "has 4 fields in the row that ends at line 3, where the header names 3"),
    "sweep grid of one point thrice": ("sweep -m {model} --grid 0,0,0 --run-dir {run}", "gives the strength 0 more than once"),
    "sweep grid with an empty entry": ("sweep -m {model} --grid 0.1,,0.2 --run-dir {run}", "--grid '0.1,,0.2' has an empty entry"),
    "sweep grid of the clean model only": ("sweep -m {model} --grid clean --run-dir {run}", "holds no strength above 0"),
    "deployment of a truncated gguf": ("vet -m {model} -d llamacpp:{truncated_gguf} --judges keyword --run-dir {run}", "llama.cpp cannot load"),
    # generate, approx profile
    "generate zero batch size": ("generate -m {model} --prompts {prompts} --out {out} --batch-size 0", "--batch-size"),
    "generate zero prompts": ("generate -m {model} --prompts {prompts} --out {out} --limit 0", "--limit"),
    "profile a missing model": ("approx profile -m {tmp}/models/absent --spec bolt", "does not exist"),
    "profile bad layers": ("approx profile -m {model} --spec bolt --layers a", "bad layer selection 'a'"),
    "profile zero prompts": ("approx profile -m {model} --spec bolt --limit 0", "--limit"),
    # vet, sweep, clusters
    "vet negative questions": ("vet -m {model} --questions -1 --run-dir {run}", "questions must be 0"),
    "sweep unknown spec": ("sweep -m {model} --spec nosuch --run-dir {run}", "unknown approximation 'nosuch'"),
    "sweep unknown parameter": ("sweep -m {model} --parameter nosuch --run-dir {run}", "unknown option 'nosuch'"),
    "sweep variant twice": ("sweep -m {model} -V bolt -V bolt --run-dir {run}", "repeat a spec"),
    "clusters missing model": ("clusters -m {tmp}/models/absent --spec bolt --harmful {prompts} --benign {other_prompts} --limit 2 --folds 2 --run-dir {run}", "does not exist"),
    "clusters binary benign prompts": ("clusters -m {model} --spec bolt --benign {binary_txt} --run-dir {run}", "not UTF-8"),
    "clusters zero prompts": ("clusters -m {model} --spec bolt --limit 0 --run-dir {run}", "limit 0 leaves fewer prompts"),
    "clusters negative seed": ("clusters -m {model} --spec bolt --seed -1 --run-dir {run}", "seed"),
    "clusters run folder on a file": ("clusters -m {model} --spec bolt --harmful {prompts} --benign {other_prompts} --limit 2 --folds 2 --run-dir {prompts}", "choose another --run-dir"),
    # attack
    "attack zero steps": ("attack -m {model} --attack gcg --steps 0 --run-dir {run}", "--steps"),
    "attack zero candidates": ("attack -m {model} --attack gcg --candidates 0 --run-dir {run}", "--candidates"),
    "attack zero topk": ("attack -m {model} --attack gcg --topk 0 --run-dir {run}", "--topk"),
    "attack zero suffix tokens": ("attack -m {model} --attack gcg --suffix-tokens 0 --run-dir {run}", "--suffix-tokens"),
    "attack zero generations": ("attack -m {model} --attack autodan --generations 0 --run-dir {run}", "--generations"),
    "attack zero population": ("attack -m {model} --attack autodan --population 0 --run-dir {run}", "--population"),
    "attack zero elites": ("attack -m {model} --attack autodan --elite 0 --run-dir {run}", "--elite"),
    "attack zero queries": ("attack -m {model} --attack dra --queries 0 --run-dir {run}", "--queries"),
    "attack zero attempts": ("attack -m {model} --attack past-tense --attempts 0 --run-dir {run}", "--attempts"),
    "attack zero shots": ("attack -m {model} --attack many-shot --shots 0 --run-dir {run}", "--shots"),
    "attack empty target": ("attack -m {model} --attack gcg --target '' --run-dir {run}", "--target is empty"),
    "attack missing mutator": ("attack -m {model} --attack autodan --budget cpu-small --judges keyword --mutator {tmp}/models/absent --run-dir {run}", "does not exist"),
    "attack missing rewriter": ("attack -m {model} --attack past-tense --budget cpu-small --judges keyword --rewriter {tmp}/models/absent --run-dir {run}", "does not exist"),
    # align
    "align zero pairs": ("align -m {model} --pairs {pairs} --skip-eval --tau 1 --max-pairs 0 --out {run}", "--max-pairs"),
    "align negative pairs seed": ("align -m {model} --pairs {pairs} --skip-eval --tau 1 --pairs-seed -1 --out {run}", "--pairs-seed"),
    "align unknown sweep spec": ("align -m {model} --pairs {pairs} --tau 1 --sweep-spec nosuch --out {run}", "unknown approximation 'nosuch'"),
    "align unknown sweep parameter": ("align -m {model} --pairs {pairs} --tau 1 --sweep-parameter nosuch --out {run}", "unknown option 'nosuch'"),
    "align sweep grid with an empty entry": ("align -m {model} --pairs {pairs} --tau 1 --sweep-grid 0,,0.1 --out {run}", "has an empty entry"),
    "align zero sweep prompts": ("align -m {model} --pairs {pairs} --tau 1 --sweep-limit 0 --out {run}", "--sweep-limit"),
    "align evaluation folder on a file": ("align -m {model} --pairs {pairs} --tau 1 --judges keyword --before-dir {prompts} --out {run}", "--before-dir {prompts}/vet lies where a file is"),
    "align missing baseline": ("align -m {model} --pairs {pairs} --tau 1 --judges keyword --baseline {tmp}/absent --out {run}", "holds no finished `quada align` model"),
    "align unknown perturbation": ("align -m {model} --pairs {pairs} --skip-eval --perturbation nosuch --out {run}", "unknown approximation 'nosuch'"),
    "align negative reg lambda": ("align -m {model} --pairs {pairs} --skip-eval --tau 1 --reg-lambda -1 --out {run}", "reg_lambda"),
    "align zero lora rank": ("align -m {model} --pairs {pairs} --skip-eval --tau 1 --lora-r 0 --out {run}", "lora_r"),
    "align zero learning rate": ("align -m {model} --pairs {pairs} --skip-eval --tau 1 --learning-rate 0 --out {run}", "learning_rate"),
    "align zero steps": ("align -m {model} --pairs {pairs} --skip-eval --tau 1 --max-steps 0 --out {run}", "--max-steps"),
    "align zero accumulation": ("align -m {model} --pairs {pairs} --skip-eval --tau 1 --grad-accum 0 --out {run}", "--grad-accum"),
    "align max length of a token": ("align -m {model} --pairs {pairs} --skip-eval --tau 1 --max-length 1 --out {run}", "max_length"),
    "align zero save steps": ("align -m {model} --pairs {pairs} --skip-eval --tau 1 --save-steps 0 --out {run}", "--save-steps"),
    "align zero log steps": ("align -m {model} --pairs {pairs} --skip-eval --tau 1 --log-steps 0 --out {run}", "--log-steps"),
    # pairs from the model
    "pairs missing model": ("pairs -m {tmp}/models/absent --out {run}", "does not exist"),
    "pairs unknown perturbation": ("pairs -m {model} --perturbation nosuch --out {run}", "unknown approximation 'nosuch'"),
    "pairs binary harmful prompts": ("pairs -m {model} --harmful {binary_txt} --out {run}", "not UTF-8"),
    "pairs binary benign prompts": ("pairs -m {model} --benign {binary_txt} --out {run}", "not UTF-8"),
    "pairs nothing held out": ("pairs -m {model} --heldout 0 --out {run}", "heldout must be at least 1"),
    "pairs no benign held out": ("pairs -m {model} --benign-heldout 0 --out {run}", "benign-heldout must be at least 1"),
    "pairs zero prompts": ("pairs -m {model} --limit 0 --out {run}", "limit must be at least 1"),
    "pairs zero benign prompts": ("pairs -m {model} --benign-limit 0 --out {run}", "benign-limit must be at least 1"),
    "pairs zero attempts": ("pairs -m {model} --attempts 0 --out {run}", "attempts must be at least 1"),
    "pairs unknown heavy approximation": ("pairs -m {model} --heavy nosuch --out {run}", "unknown approximation 'nosuch'"),
    "pairs missing rejected model": ("pairs --source generic -m {model} --rejected-model {tmp}/models/absent --out {run}", "does not exist"),
    "pairs zero new tokens": ("pairs -m {model} --max-new-tokens 0 --out {run}", "max-new-tokens must be at least 1"),
    "pairs negative seed": ("pairs -m {model} --seed -1 --out {run}", "seed"),
    "pairs onto a file": ("pairs --source pku --file {pku} --out {prompts}", "choose another --out"),
    # results and judges
    "arms of a missing run": ("results arms --arm quada={tmp}/absent --out {tmp}/arms", "does not exist"),
    "agreement without a store": ("judge agreement --db {tmp}/absent.sqlite", "no results store"),
    "calibrate a missing labelled file": ("judge calibrate --judges keyword --labelled {tmp}/absent.csv --measure refusal", "does not exist"),
    "calibrate with a missing judge model": ("judge calibrate --judges llm --judge-model {tmp}/models/absent --labelled {one_label} --measure harm", "does not exist"),
}

# The options that several evaluating commands share: a bad value and a fragment of its message. Every
# command of BASES that has the option gets a case: its base command line, then the option.
SHARED = {
    "--model": ("{tmp}/models/absent", "does not exist"),
    "--benchmark": ("{binary_txt}", "not UTF-8"),
    "--benign": ("{binary_txt}", "not UTF-8"),
    "--corpus": ("{binary_txt}", "not UTF-8"),
    "--judge-model": ("{tmp}/models/absent --judges llm", "does not exist"),
    "--approx": ("nosuch", "unknown approximation 'nosuch'"),
    "--limit": ("0", "must be at least 1 (or omitted for all), got 0"),  # vet spells it --max-prompts
    "--benign-limit": ("0", "--benign-limit"),
    "--judge-prompt": ("{binary_txt} --judges keyword,prompted", "not UTF-8"),
    "--judge-answers": ("unsafe --judges keyword,guard", "--judge-answers takes two different words"),
    "--max-new-tokens": ("0", "--max-new-tokens"),
    "--seed": ("-1", "seed"),
    "--ppl-window": ("1", "--ppl-window must be at least 2"),
    "--ppl-windows": ("0", "--ppl-windows"),
    "--ppl-bound": ("nan", "--ppl-bound"),
    "--ray-address": ("auto", "--executor ray"),
    "--workers": ("0", "--workers"),
    "--cpus-per-worker": ("0", "--cpus-per-worker"),
    "--gpus-per-worker": ("-1", "--gpus-per-worker"),
    "--judge-workers": ("-1", "--judge-workers"),
    "--placement-timeout": ("0", "--placement-timeout"),
    "--run-dir": ("{prompts}", "choose another --run-dir"),
}
BASES = {
    "vet": "vet -m {model} --judges keyword --run-dir {run}",
    "sweep": "sweep -m {model} --run-dir {run}",
    "layers": "layers -m {model} --spec bolt --run-dir {run}",
    "attack": "attack -m {model} --attack direct --judges keyword --run-dir {run}",
    "align": "align -m {model} --pairs {pairs} --tau 1 --judges keyword --out {run}",
}
# Parameters that take a name from a fixed list (or a flag-like word), not a path, a number or a spec.
NAMES = {"--device", "--dtype", "--judges", "--refusal-judge", "--prompt-format", "--executor", "--api-key-env",
         "--site", "--pooling", "--source", "--benign-rejected", "--perturb-layers", "--reference",
         "--preference-loss", "--reg-pooling", "--budget", "--attack", "--format", "--type", "--measure"}
# The case that gives each positional argument a bad value.
ARGUMENTS = {("requantize", "source"): "requantize a fake gguf", ("requantize", "out"): "requantize over its source",
             ("results merge", "out"): "merge into a foreign database", ("results merge", "stores"): "merge from a damaged store"}


def commands(group=None, words=()):
    """``(command words, click command)`` of every command of the ``quada`` app."""
    from quada.cli import app

    group = group or typer.main.get_command(app)
    for name, command in group.commands.items():
        if getattr(command, "commands", None):
            yield from commands(command, (*words, name))
        else:
            yield (*words, name), command


def parameters():
    """``(command, name, option spellings, argument)`` of every parameter that takes a path, a number or
    a spec: every parameter but the flags and the options of :data:`NAMES`."""
    for words, command in commands():
        for param in command.params:
            argument = param.param_type_name == "argument"
            if not getattr(param, "is_flag", False) and not NAMES & set(param.opts):
                yield " ".join(words), param.name, tuple(param.opts), argument


for command, _, spellings, _ in list(parameters()):
    option = next((o for o in spellings if o in SHARED), None)
    if command in BASES and option:
        value, fragment = SHARED[option]
        base = BASES[command].replace("-m {model} ", "") if option == "--model" else BASES[command]
        CASES.setdefault(f"{command} {option} {value}", (f"{base} {option} {value}", fragment))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, model_dir):
    """Good and bad input files for the cases, by the names the command lines use (made once: every
    case checks that it leaves them as they were)."""
    from quada.testing import save_tiny_gguf

    tmp_path = tmp_path_factory.mktemp("inputs")
    binary = bytes(range(128, 256)) * 4
    harmful_pair = '{"prompt": "q%d", "chosen": "no", "rejected": "yes"%s}\n'
    pku_row = '{"prompt": "q", "response_0": "a", "response_1": "b", "safer_response_id": 1}\n'
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
        "pku": pku_row,
        "harmless_pairs": "".join(harmful_pair % (i, ', "harmful": false') for i in range(4)),
        "one_label": '{"prompt": "q", "response": "I cannot help.", "label": 1}\n',
        "extra_fields": "prompt,response,label\nq,I cannot help.,1\nq2,Sure.,0,a field too many\n",
    }
    suffixes = {"two_columns": ".csv", "huge_field": ".csv", "open_quote": ".csv", "list_prompt": ".jsonl",
                "bad_jsonl": ".jsonl", "pairs": ".jsonl", "pairs_without_harmful": ".jsonl",
                "pairs_maybe_harmful": ".jsonl", "text_parquet": ".parquet", "list_json": ".json", "bad_safer": ".jsonl",
                "pku": ".jsonl", "harmless_pairs": ".jsonl", "one_label": ".jsonl", "extra_fields": ".csv"}
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
    # Inputs where a command would write: a GGUF and a hard link of it, a symlink to a store, a pairs
    # folder that holds its inputs, a run folder whose report is a prompt file, a run with its model.
    names["gguf"] = save_tiny_gguf(tmp_path / "tiny.gguf")
    names["gguf_hard_link"] = tmp_path / "hard-link.gguf"
    os.link(names["gguf"], names["gguf_hard_link"])
    names["truncated_gguf"] = tmp_path / "truncated.gguf"
    names["truncated_gguf"].write_bytes(names["gguf"].read_bytes()[:200_000])
    names["store_link"] = tmp_path / "store-link.csv"
    names["store_link"].symlink_to(names["store"])
    names["pairs_out"] = tmp_path / "pairs-out"
    names["pairs_out"].mkdir()
    (names["pairs_out"] / "pairs.jsonl").write_text(pku_row)
    (names["pairs_out"] / "heldout-harmful.jsonl").write_text(files["prompts"])
    names["report_run"] = tmp_path / "report-run"
    names["report_run"].mkdir()
    (names["report_run"] / "report.md").write_text(files["prompts"])
    names["align_run"] = tmp_path / "align-run"
    shutil.copytree(model_dir, names["align_run"] / "model")
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
    result = cli(*[part.format(**inputs) for part in shlex.split(command)])
    result.assert_user_error(fragment.format(**inputs))
    # One message: quada's "error:" line, or the usage error typer draws in an "Error" box.
    assert result.stderr.count("error:") + result.stderr.count("─ Error ─") == 1, result.stderr
    assert snapshot(inputs["tmp"]) == before  # no run folder, no result, every input untouched


def test_every_parameter_has_a_case():
    """Each path, number and spec parameter of each command is given a bad value by some case."""
    missing = []
    for command, name, spellings, argument in parameters():
        if argument:
            covered = ARGUMENTS.get((command, name)) in CASES
        else:
            covered = any(shlex.split(line)[: len(command.split())] == command.split()
                          and set(spellings) & set(shlex.split(line)) for line, _ in CASES.values())
        if not covered:
            missing.append(f"{command} {spellings[0]}")
    assert not missing, f"parameters without a bad-input case: {', '.join(missing)}"


def test_a_failed_write_is_reported_not_the_failure_of_its_cleanup(cli, inputs, tmp_path, monkeypatch):
    """On a read-only file system llama.cpp cannot write its output and the cleanup cannot remove the
    partial file either: the message is llama.cpp's failure, not a traceback of the cleanup's."""
    from quada.backends.llamacpp import llama_cpp_module

    unlink = os.unlink

    def read_only(path, *args, **kwargs):
        if str(path).endswith(".partial"):
            raise OSError(30, "Read-only file system", str(path))
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(llama_cpp_module(), "llama_model_quantize", lambda *args: 1)
    monkeypatch.setattr(os, "unlink", read_only)
    cli("requantize", inputs["gguf"], tmp_path / "out.gguf", "--type", "Q4_0").assert_user_error(
        f"llama.cpp could not quantize {inputs['gguf']} to Q4_0")
    assert not (tmp_path / "out.gguf").exists()


def test_a_composition_is_told_the_fixed_order_its_parts_apply_in(cli, inputs):
    result = cli("vet", "-m", inputs["model"], "-a", "teal:sparsity=0.5+paper:bolt", "--judges", "keyword",
                 "--benchmark", inputs["prompts"], "--benign", inputs["other_prompts"], "--limit", 2,
                 "--benign-limit", 2, "--corpus", inputs["short_corpus"], "--run-dir", inputs["run"])
    result.assert_user_error("fewer than one perplexity window")  # a later bad input ends the run
    assert ("warning: teal:sparsity=0.5 + noise:site=up,dist=gaussian,std=0.042 + noise:site=down,dist=laplace,"
            "scale=0.036: teal and noise both change layer 0") in result.stderr
    assert ("here teal:sparsity=0.5, then noise:site=up,dist=gaussian,std=0.042, then noise:site=down,dist=laplace,"
            "scale=0.036") in result.stderr
