"""Bad input files through the command line: one message naming the file and the fix, exit code 2,
no traceback, and no file of the user's changed."""

import json

import pytest

from quada.store import CLEAN, Generation, GenerationKey, Judgement, Store

NOT_UTF8 = bytes(range(128, 256)) * 8  # no valid UTF-8 sequence


def damage(db):
    """Write garbage over a data page of a store file, as a failing disk would."""
    with open(db, "r+b") as f:
        f.seek(2 * 4096)
        f.write(bytes(range(256)) * 16)


def write(path, content: str | bytes):
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


@pytest.mark.parametrize(
    "name, content, fragments",
    [
        ("p.txt", NOT_UTF8, ["p.txt is not UTF-8 text", "save it as UTF-8"]),
        ("p.csv", NOT_UTF8, ["p.csv is not UTF-8 text"]),
        ("p.jsonl", NOT_UTF8, ["p.jsonl is not UTF-8 text"]),
        ("p.txt", "prompt\n".encode("utf-16-le"), ["holds NUL bytes"]),
        ("p.csv", 'prompt\n"open quote\n' + "x" * 140_000 + "\n", ["is not valid CSV in the row that starts at line 2", "double quote left open"]),
        ("p.csv", "question,answer\nWhy?,Because\n", ["no 'prompt' column", "question, answer"]),
        ("p.jsonl", json.dumps({"prompt": ["a", "b"]}) + "\n", ['"prompt" is', "not a string"]),
    ],
)
def test_generate_names_what_is_wrong_with_the_prompt_file(cli, tmp_path, name, content, fragments):
    prompts = write(tmp_path / name, content)
    cli("generate", "-m", "never-loaded", "-p", prompts, "-o", tmp_path / "o.jsonl").assert_user_error(*fragments)
    assert not (tmp_path / "o.jsonl").exists()


def test_a_folder_given_as_a_prompt_file_is_called_a_folder(cli, tmp_path):
    (tmp_path / "dir.txt").mkdir()
    cli("generate", "-m", "never-loaded", "-p", tmp_path / "dir.txt", "-o", tmp_path / "o.jsonl").assert_user_error(
                      "dir.txt is a folder, not a file")


def test_approx_profile_rejects_a_binary_prompt_file(cli, tmp_path):
    prompts = write(tmp_path / "p.txt", NOT_UTF8)
    cli("approx", "profile", "-m", "never-loaded", "-s", "bolt", "-p", prompts).assert_user_error("p.txt is not UTF-8 text")


def test_align_rejects_a_binary_pairs_file(cli, tmp_path):
    pairs = write(tmp_path / "pairs.jsonl", NOT_UTF8)
    cli("align", "--pairs", pairs, "--out", tmp_path / "out").assert_user_error("pairs file", "is not UTF-8 text")
    assert not (tmp_path / "out").exists()


def test_vet_rejects_a_binary_corpus_before_loading_the_model(cli, tmp_path):
    prompts = write(tmp_path / "p.txt", "Say hi\nName a colour\n")
    corpus = write(tmp_path / "corpus.txt", NOT_UTF8)
    result = cli("vet", "-m", "never-loaded", "-a", "none", "--benchmark", prompts, "--benign", prompts,
                   "--corpus", corpus, "--judges", "keyword", "--run-dir", tmp_path / "run")
    result.assert_user_error("corpus file", "corpus.txt is not UTF-8 text")


def test_generate_rejects_a_fake_gguf_file(cli, tmp_path):
    prompts = write(tmp_path / "p.txt", "Say hi\n")
    fake = write(tmp_path / "model.gguf", "just some text, renamed\n")
    cli("generate", "-m", fake, "-p", prompts, "-o", tmp_path / "o.jsonl").assert_user_error("is not a valid GGUF file")


@pytest.mark.parametrize(
    "name, content, fragments",
    [
        ("human.csv", NOT_UTF8, ["human label file", "is not UTF-8 text"]),
        ("human.jsonl", NOT_UTF8, ["human label file", "is not UTF-8 text"]),
        ("human.jsonl", '{"prompt_id": "p0", "label": 1}\n{"prompt_id": "p1", label: 0}\n', ["line 2 is not valid JSON"]),
        ("human.csv", 'prompt_id,label\np0,1\n"p1\n' + "x" * 140_000 + "\n", ["is not valid CSV in the row that starts at line 3"]),
        ("human.csv", "prompt_id,label\nadvbench-0001,1\nadvbench-0002,0\n",
         ["no common items between the human labels and the stored judgements", "(approx, prompt_id)", "'advbench-0001'"]),
    ],
)
def test_judge_agreement_names_what_is_wrong_with_the_human_labels(cli, judged_store, tmp_path, name, content, fragments):
    human = write(tmp_path / name, content)
    cli("judge", "agreement", "--db", judged_store, "--human", human).assert_user_error(*fragments)


def test_judge_agreement_without_two_judges_on_common_items_is_an_error(cli, tmp_path):
    db = tmp_path / "results.sqlite"
    with Store(db) as store:
        harmful, benign = (GenerationKey("fp", CLEAN, prompt_id, "{}", 0) for prompt_id in ("h0", "b0"))
        store.put([Generation(harmful, "h", "r"), Generation(benign, "b", "r")])
        store.put([Judgement(harmful.judged_by("keyword"), True, 1.0, ""),
                   Judgement(benign.judged_by("refusal-keyword"), False, 0.0, "")])
    cli("judge", "agreement", "--db", db).assert_user_error("no common items between the judges keyword, refusal-keyword")
    cli("judge", "agreement", "--db", db, "--judges", "keyword").assert_user_error("agreement needs two judges")


def test_results_export_refuses_a_damaged_store_and_leaves_it_alone(cli, judged_store, tmp_path):
    damage(judged_store)
    before = judged_store.read_bytes()
    cli("results", "export", "--db", judged_store, "--out", tmp_path / "x.csv").assert_user_error(
                      "is damaged", "left it as it is", "move it aside")
    assert judged_store.read_bytes() == before
    assert not (tmp_path / "x.csv").exists()


def test_vet_refuses_a_damaged_store_and_leaves_it_alone(cli, model_dir, tmp_path):
    run = tmp_path / "run"
    db = run / "results.sqlite"
    with Store(db) as store:
        store.put(Generation(GenerationKey("fp", CLEAN, f"p{i:03d}", "{}", 0), "prompt " * 20, "response " * 40)
                  for i in range(200))
    damage(db)
    before = db.read_bytes()
    prompts = write(tmp_path / "p.txt", "Say hi\nName a colour\n")
    corpus = write(tmp_path / "corpus.txt", "Some plain text to measure. " * 50)
    result = cli("vet", "-m", model_dir, "-a", "none", "--judges", "keyword", "--benchmark", prompts,
                   "--benign", prompts, "--corpus", corpus, "--run-dir", run)
    result.assert_user_error("is damaged", "move it aside", "--run-dir")
    assert db.read_bytes() == before
