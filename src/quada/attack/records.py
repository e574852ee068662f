"""What attacks found, kept beside the generations in the run folder's results store.

Two tables in the same SQLite file as :class:`quada.store.Store` (which must have opened it
first: it owns the schema version), written the way the store writes: keyed by what decides a
row, in transactions, ``INSERT OR IGNORE``, write-ahead log.

- ``attack_prompts``: the adversarial prompt an attack built for one behaviour, keyed by (model
  fingerprint, approximation, attack identity, behaviour id, seed), with its cost and details;
- ``gcg_steps``: every completed GCG step under the same key plus the step number, so an
  interrupted search resumes from its last completed step.

The attack identity is the attack's name with every parameter that decides its prompts
(:func:`attack_identity`); responses and verdicts go to the store's own tables, keyed by the
adversarial prompt's id (:func:`attack_prompt_id`).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import Any

from quada.attack.gcg import GcgStep
from quada.seeds import derived_seed
from quada.store import Database

KEY_COLUMNS = ("model", "approx", "attack", "behaviour", "seed")
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS attack_prompts (model TEXT NOT NULL, approx TEXT NOT NULL, attack TEXT NOT NULL, "
    "behaviour TEXT NOT NULL, seed INTEGER NOT NULL, prompt TEXT NOT NULL, forward_passes INTEGER NOT NULL, "
    "seconds REAL NOT NULL, details TEXT NOT NULL, PRIMARY KEY (model, approx, attack, behaviour, seed)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS gcg_steps (model TEXT NOT NULL, approx TEXT NOT NULL, attack TEXT NOT NULL, "
    "behaviour TEXT NOT NULL, seed INTEGER NOT NULL, step INTEGER NOT NULL, suffix TEXT NOT NULL, loss REAL NOT NULL, "
    "success INTEGER NOT NULL, forward_passes INTEGER NOT NULL, seconds REAL NOT NULL, "
    "PRIMARY KEY (model, approx, attack, behaviour, seed, step)) WITHOUT ROWID",
)


def attack_identity(name: str, parameters: Mapping[str, Any]) -> str:
    """The attack's name and the parameters that decide its prompts, as canonical text."""
    return f"{name} {json.dumps(dict(parameters), sort_keys=True, separators=(',', ':'))}"


def attack_prompt_id(behaviour_id: str, identity: str) -> str:
    """The prompt id of a behaviour's adversarial prompt in the generations table: stable, and
    distinct for every attack identity."""
    return f"{behaviour_id}~{identity.split()[0]}~{derived_seed(identity):08x}"


@dataclass(frozen=True)
class AttackKey:
    """What decides an adversarial prompt."""

    model: str
    approx: str
    attack: str
    behaviour: str
    seed: int


@dataclass(frozen=True)
class AttackPrompt:
    """An adversarial prompt and what finding it cost: the sequences the attacked model ran (scoring
    passes, answers read by a feedback loop) and seconds; ``details`` are the attack's own (e.g. the
    template used, the final target loss; ``attempts``: every prompt of a best-of-N attack)."""

    prompt: str
    forward_passes: int = 0
    seconds: float = 0.0
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def answered(self) -> list[str]:
        """The prompts the model answers for this behaviour: every attempt, or the one prompt."""
        return list(self.details.get("attempts") or [self.prompt])


class AttackRecords(Database):
    """The attack tables of the results store at ``path``."""

    def __init__(self, path: str | Path):
        self._db = sqlite3.connect(Path(path), timeout=30, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        with self._transaction():
            for statement in SCHEMA:
                self._db.execute(statement)

    def prompt(self, key: AttackKey) -> AttackPrompt | None:
        """The stored adversarial prompt of ``key``, or None."""
        where = " AND ".join(f"{c} = ?" for c in KEY_COLUMNS)
        row = self._db.execute(f"SELECT prompt, forward_passes, seconds, details FROM attack_prompts WHERE {where}",
                               astuple(key)).fetchone()
        return None if row is None else AttackPrompt(row[0], row[1], row[2], json.loads(row[3]))

    def put_prompt(self, key: AttackKey, found: AttackPrompt) -> None:
        with self._transaction():
            self._db.execute("INSERT OR IGNORE INTO attack_prompts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             (*astuple(key), found.prompt, found.forward_passes, found.seconds,
                              json.dumps(dict(found.details), sort_keys=True)))

    def steps(self, key: AttackKey) -> list[GcgStep]:
        """The completed GCG steps of ``key``, in order."""
        where = " AND ".join(f"{c} = ?" for c in KEY_COLUMNS)
        rows = self._db.execute(
            f"SELECT step, suffix, loss, success, forward_passes, seconds FROM gcg_steps WHERE {where} ORDER BY step",
            astuple(key)).fetchall()
        return [GcgStep(step, tuple(json.loads(suffix)), loss, bool(success), passes, seconds)
                for step, suffix, loss, success, passes, seconds in rows]

    def put_step(self, key: AttackKey, step: GcgStep) -> None:
        with self._transaction():
            self._db.execute("INSERT OR IGNORE INTO gcg_steps VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             (*astuple(key), step.step, json.dumps(step.suffix), step.loss, int(step.success),
                              step.forward_passes, step.seconds))
