import csv
import json
import signal
import sqlite3
import subprocess
import sys

import pytest

from quada.errors import QuadaError
from quada.store import (
    SCHEMA_VERSION,
    Generation,
    GenerationKey,
    Judgement,
    Store,
    settings_json,
)

SETTINGS = settings_json({"max_new_tokens": 8, "decoding": "greedy", "prompt_format": "paper"})

# A complete run: generate for a clean and an approximated model, then judge every response.
# Each computed chunk prints a line before it is stored, so the test can kill the run mid-way.
RUN = """
import sys, time
from quada.store import Generation, GenerationKey, Judgement, Store

db, delay = sys.argv[1], float(sys.argv[2])
settings = sys.argv[3]
keys = [GenerationKey("fp0123", approx, f"p-{i:03d}", settings, 0) for approx in ("none", "noise:0.1") for i in range(30)]

def generate(chunk):
    time.sleep(delay)
    print("generated", len(chunk), flush=True)
    return [Generation(k, f"prompt {k.prompt_id}", f"{k.approx} answer to {k.prompt_id}") for k in chunk]

def judge(chunk):
    time.sleep(delay)
    print("judged", len(chunk), flush=True)
    return [Judgement(k, k.approx == "none", 0.25 if k.approx == "none" else 0.75, "raw") for k in chunk]

with Store(db) as store:
    generations = store.fill(keys, generate, chunk_size=4)
    store.fill([g.key.judged_by("keyword") for g in generations], judge, chunk_size=4)
print("done", flush=True)
"""


def run(db, delay=0.0):
    return subprocess.Popen(
        [sys.executable, "-c", RUN, str(db), str(delay), SETTINGS], stdout=subprocess.PIPE, text=True
    )


def snapshot(db):
    with Store(db) as store:
        return store.rows(Generation), store.rows(Judgement), store.records()


def key(prompt_id="p-1", approx="none", seed=0):
    return GenerationKey("fp", approx, prompt_id, SETTINGS, seed)


def test_put_get_missing_and_idempotent_writes(tmp_path):
    with Store(tmp_path / "runs" / "results.sqlite") as store:
        rows = [Generation(key("a"), "prompt a", "answer a"), Generation(key("b"), "prompt b", "answer b")]
        assert store.missing([key("a"), key("b"), key("a")]) == [key("a"), key("b")]
        assert store.put(rows) == 2
        assert store.put(rows + [Generation(key("a"), "prompt a", "a different answer")]) == 0
        assert store.get(key("a")) == rows[0]
        assert store.get(key("a", seed=1)) is None
        assert store.missing([key("a"), key("c")]) == [key("c")]
        judgement = Judgement(key("a").judged_by("keyword"), True, 1.0, "reason")
        assert store.put([judgement]) == 1
        assert store.get(key("a").judged_by("keyword")) == judgement
        assert store.get(key("a").judged_by("llm:abc")) is None
        assert store.rows(Generation) == rows


def test_settings_json_is_canonical():
    assert settings_json({"b": 1, "a": "x"}) == settings_json({"a": "x", "b": 1}) == '{"a":"x","b":1}'


def test_a_run_killed_mid_way_resumes_to_the_uninterrupted_result(tmp_path):
    reference = tmp_path / "reference.sqlite"
    assert run(reference).wait(timeout=60) == 0

    interrupted = tmp_path / "interrupted.sqlite"
    worker = run(interrupted, delay=0.05)
    for _ in range(6):  # let six chunks of generations pass, then kill without warning
        assert worker.stdout.readline().startswith("generated")
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=60)
    generations, judgements, _ = snapshot(interrupted)
    assert 0 < len(generations) < 60 and judgements == []

    resumed = run(interrupted)
    output, _ = resumed.communicate(timeout=60)
    assert resumed.returncode == 0
    assert output.count("generated") < 15  # only the missing chunks were computed again
    assert snapshot(interrupted) == snapshot(reference)
    generations, judgements, records = snapshot(interrupted)
    assert len(generations) == 60 and len(judgements) == 60 and len(records) == 60
    with sqlite3.connect(interrupted) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_a_run_that_fails_mid_way_resumes_without_duplicates(tmp_path):
    keys = [key(f"p-{i}") for i in range(10)]
    calls = []

    def flaky(chunk):
        calls.append(chunk)
        if len(calls) == 3:
            raise RuntimeError("injected failure")
        return [Generation(k, "prompt", f"answer {k.prompt_id}") for k in chunk]

    with Store(tmp_path / "r.sqlite") as store:
        with pytest.raises(RuntimeError, match="injected"):
            store.fill(keys, flaky, chunk_size=3)
        assert len(store.rows(Generation)) == 6
        rows = store.fill(keys, flaky, chunk_size=3)
        assert [r.key for r in rows] == keys
        assert calls[3:] == [keys[6:9], keys[9:]]
        with pytest.raises(ValueError, match="one row per key"):
            store.fill([key("new")], lambda chunk: [], chunk_size=3)
    with Store(tmp_path / "r.sqlite") as reopened:
        assert reopened.rows(Generation) == sorted(rows, key=lambda r: r.key.prompt_id)


def test_export_csv_and_json(tmp_path):
    with Store(tmp_path / "r.sqlite") as store:
        store.put([Generation(key("a"), "prompt, with comma", "line one\nline two"), Generation(key("b"), "p", "r")])
        store.put([Judgement(key("a").judged_by("keyword"), False, 0.0, "refusal phrase 'Sorry'")])
        assert store.export(tmp_path / "out" / "results.csv") == 2
        assert store.export(tmp_path / "results.json") == 2
        with pytest.raises(QuadaError, match="unknown export format"):
            store.export(tmp_path / "results.xlsx")
    with open(tmp_path / "out" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["response"] == "line one\nline two" and rows[0]["judge"] == "keyword"
    assert rows[1]["prompt_id"] == "b" and rows[1]["judge"] == ""
    records = json.loads((tmp_path / "results.json").read_text())
    assert records[0]["label"] is False and records[1]["label"] is None
    assert records[0]["versions"]["quada"]


def test_a_database_from_a_newer_schema_is_refused_untouched(tmp_path):
    path = tmp_path / "r.sqlite"
    with Store(path) as store:
        store.put([Generation(key(), "p", "r")])
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(QuadaError, match="newer"):
        Store(path)
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM generations").fetchone()[0] == 1


def test_foreign_files_and_unwritable_locations_are_refused(tmp_path):
    with sqlite3.connect(tmp_path / "other.sqlite") as db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(QuadaError, match="not a quada results store"):
        Store(tmp_path / "other.sqlite")
    (tmp_path / "notes.txt").write_text("not a database, just some text that is long enough " * 40)
    with pytest.raises(QuadaError, match="damaged or not a database"):
        Store(tmp_path / "notes.txt")
    with pytest.raises(QuadaError, match="writable"):
        Store(tmp_path / "notes.txt" / "results.sqlite")


def damaged_store(path):
    """A real store with garbage written over one of its data pages."""
    with Store(path) as store:
        store.put(Generation(key(f"p-{i:03d}"), "prompt " * 20, "response " * 40) for i in range(200))
    with open(path, "r+b") as f:
        f.seek(2 * 4096)
        f.write(bytes(range(256)) * 16)
    return path


def test_a_damaged_store_is_refused_untouched_with_the_way_out(tmp_path):
    path = damaged_store(tmp_path / "results.sqlite")
    before = path.read_bytes()
    with pytest.raises(QuadaError, match=r"results\.sqlite is damaged.*left it as it is.*move it aside.*--run-dir"):
        Store(path)
    assert path.read_bytes() == before


def run_store(path, prompt_ids, approx="none", answer="answer"):
    """A store of one run: a generation and a keyword judgement per prompt."""
    with Store(path) as store:
        store.put(Generation(key(p, approx), f"prompt {p}", f"{answer} {p}") for p in prompt_ids)
        store.put(Judgement(key(p, approx).judged_by("keyword"), True, 1.0, "") for p in prompt_ids)
    return path


def test_the_union_of_two_disjoint_runs_equals_a_store_with_both(tmp_path):
    first = run_store(tmp_path / "first.sqlite", ["p-1", "p-2"])
    second = run_store(tmp_path / "second.sqlite", ["p-3"], approx="noise:0.1")
    both = run_store(run_store(tmp_path / "both.sqlite", ["p-1", "p-2"]), ["p-3"], approx="noise:0.1")
    with Store(tmp_path / "merged.sqlite") as merged:
        assert [merged.merge_from(first), merged.merge_from(second)] == [4, 2]
    assert snapshot(tmp_path / "merged.sqlite") == snapshot(both)


def test_merging_again_adds_nothing_and_keys_stay_unique(tmp_path):
    first = run_store(tmp_path / "first.sqlite", ["p-1", "p-2"])
    overlapping = run_store(tmp_path / "overlapping.sqlite", ["p-2", "p-3"])
    with Store(first) as store:
        assert store.merge_from(overlapping) == 2  # p-3's generation and judgement; p-2 is there already
        assert store.merge_from(overlapping) == 0
        with pytest.raises(QuadaError, match="is the store being merged into"):
            store.merge_from(first)
        generations = store.rows(Generation)
    assert [g.key.prompt_id for g in generations] == ["p-1", "p-2", "p-3"]
    assert snapshot(first) == snapshot(run_store(tmp_path / "all.sqlite", ["p-1", "p-2", "p-3"]))


def test_a_store_that_disagrees_on_a_key_is_refused_whole(tmp_path):
    first = run_store(tmp_path / "first.sqlite", ["p-1", "p-2"])
    other = run_store(tmp_path / "other.sqlite", ["p-2", "p-3", "p-4"], answer="another answer")
    before = snapshot(first)
    with Store(first) as store, pytest.raises(QuadaError, match=(
            r"other\.sqlite disagrees with .*first\.sqlite on 1 generations \(first: GenerationKey\(.*prompt_id='p-2'.*"
            r"another prompt or response.*nothing of it was merged")):
        store.merge_from(other)
    assert snapshot(first) == before  # not even p-3 and p-4, which do not conflict


def test_merging_refuses_a_newer_or_missing_store(tmp_path):
    newer = run_store(tmp_path / "newer.sqlite", ["p-1"])
    with sqlite3.connect(newer) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with Store(tmp_path / "merged.sqlite") as store:
        with pytest.raises(QuadaError, match=f"schema version {SCHEMA_VERSION + 1}, newer"):
            store.merge_from(newer)
        with pytest.raises(QuadaError, match="no results store at"):
            store.merge_from(tmp_path / "absent.sqlite")
        assert store.rows(Generation) == []


def test_measurements_are_kept_by_the_first_writer_and_shared_by_two_runs_in_one_folder(tmp_path):
    path = tmp_path / "results.sqlite"
    with Store(path) as first, Store(path) as second:  # two runs in one folder, both open
        assert first.put_measurement("fp|none|ppl", 5.25) == 5.25
        assert second.put_measurement("fp|noise|ppl", 7.5) == 7.5
        assert second.put_measurement("fp|none|ppl", 5.3) == 5.25  # measured by both: the first stays
        assert first.put_measurement("fp|noise|mc", [True, False]) == [True, False]
    with Store(path) as store:
        assert store.measurements() == {"fp|none|ppl": 5.25, "fp|noise|mc": [True, False], "fp|noise|ppl": 7.5}
        assert store.measurement("fp|other|ppl") is None


def schema_1_store(path):
    """A store as quada wrote it at schema version 1: generations and judgements, no measurements."""
    with Store(path) as store:
        store.put([Generation(key(), "p", "r")])
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE measurements")
        db.execute("PRAGMA user_version = 1")
    db.close()
    return path


def test_a_schema_1_store_is_read_as_it_is_and_upgraded_in_place_when_written(tmp_path):
    path = schema_1_store(tmp_path / "results.sqlite")
    with Store(path, readonly=True) as store:
        assert store.rows(Generation) == [Generation(key(), "p", "r")] and store.measurements() == {}
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    db.close()
    with Store(path) as store:
        assert store.put_measurement("fp|none|ppl", 4.0) == 4.0
        assert store.rows(Generation) == [Generation(key(), "p", "r")]
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()


@pytest.mark.parametrize("readonly", [False, True])
def test_a_foreign_database_is_refused_without_a_byte_written(tmp_path, readonly):
    path = tmp_path / "notes.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE notes (x)")
        db.execute("INSERT INTO notes VALUES ('keep')")
    db.close()
    before = path.read_bytes()
    with pytest.raises(QuadaError, match="not a quada results store"):
        Store(path, readonly=readonly)
    assert path.read_bytes() == before  # not even switched to WAL mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.sqlite"]  # no -wal or -shm beside it


def test_merging_adds_measurements_and_refuses_one_that_disagrees(tmp_path):
    old = schema_1_store(tmp_path / "old.sqlite")
    other = run_store(tmp_path / "other.sqlite", ["p-2"])
    with Store(other) as store:
        store.put_measurement("fp|none|ppl", 6.0)
    with Store(tmp_path / "merged.sqlite") as merged:
        assert merged.merge_from(old) == 1  # a schema-1 store has no measurements to add
        assert merged.merge_from(other) == 3
        assert merged.measurements() == {"fp|none|ppl": 6.0}
    with Store(tmp_path / "third.sqlite") as third:
        third.put_measurement("fp|none|ppl", 6.5)
        with pytest.raises(QuadaError, match="disagrees .* on 1 measurements"):
            third.merge_from(other)
        assert third.measurements() == {"fp|none|ppl": 6.5}
    with sqlite3.connect(old) as db:  # merging only read it
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    db.close()


def test_damage_that_appears_while_a_store_is_open_is_a_user_error(tmp_path):
    path = tmp_path / "results.sqlite"
    store = Store(path)
    store.put(Generation(key(f"p-{i:03d}"), "prompt " * 20, "response " * 40) for i in range(200))
    with sqlite3.connect(path) as other:  # another connection moves every row into the file
        other.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    other.close()
    with open(path, "r+b") as f:  # then the disk garbles the file under the open store
        f.seek(4096)
        f.write(bytes(range(256)) * ((path.stat().st_size - 4096) // 256))
    with pytest.raises(QuadaError, match=r"results\.sqlite is damaged or not a database .*move it aside"):
        store.put([Generation(key("p-new"), "prompt", "response")])
    store.close()


def test_export_to_standard_output_needs_a_format_and_never_goes_to_a_terminal(tmp_path):
    path = run_store(tmp_path / "results.sqlite", ["p-1", "p-2"])
    script = "import sys\nfrom quada.store import Store\nStore(sys.argv[1], readonly=True).export(sys.argv[2], sys.argv[3])\n"
    exported = subprocess.run([sys.executable, "-c", script, str(path), "-", "json"], capture_output=True, text=True)
    assert exported.returncode == 0, exported.stderr
    assert [r["prompt_id"] for r in json.loads(exported.stdout)] == ["p-1", "p-2"]
    with Store(path, readonly=True) as store:
        with pytest.raises(QuadaError, match="give --format csv or --format json"):
            store.export("-")
