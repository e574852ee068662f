"""The attacker's sampled rewrites (seeded) and the attack report's cost columns and paired,
prompt-clustered comparisons."""


from quada.attack.llm import sample_reply
from quada.attack.report import (
    AttackCell,
    budget_table,
    comparison_table,
    summary_table,
)
from quada.measures.generate import GenerationSettings, generate
from quada.stats.metrics import proportion


def test_sampled_replies_are_seeded_and_a_tiny_nucleus_is_greedy(tiny):
    model, tokenizer = tiny

    def reply(seed, top_p=1.0):
        return sample_reply(model, tokenizer, "Rewrite this", "plain", 12, 1.0, top_p, seed)

    assert reply(1) == reply(1) and len({reply(s) for s in range(4)}) > 1
    greedy = generate(model, tokenizer, ["Rewrite this"], GenerationSettings(max_new_tokens=12), progress=False)[0]
    assert reply(1, top_p=1e-6) == reply(2, top_p=1e-6) == greedy


def cell(model, approx, attack, outcomes, queries=(1, 1, 1, 1)):
    return AttackCell(model=model, fingerprint=model, approx=approx, attack=attack, identity=attack, benchmark="b",
                      seed=0, n=4, asr={"keyword": proportion([bool(o) for o in outcomes])}, forward_passes=0,
                      seconds=0.0, target_reached=None, queries=list(queries), search_seconds=[0.5] * 4,
                      budget="at most 20 queries" if attack == "dra" else "", stopped=0.5 if attack == "dra" else None,
                      behaviours=["p1", "p2", "p3", "p4"], outcomes={"keyword": list(outcomes)})


def test_the_report_pairs_by_prompt_and_pools_models_with_prompts_as_clusters():
    cells = [cell("m1", "none", "direct", [0, 0, 0, 1]), cell("m1", "none", "dra", [1, 1, 0, 1], (3, 1, 20, 2)),
             cell("m2", "none", "direct", [0, 0, 0, 0]), cell("m2", "none", "dra", [1, 0, 0, 0], (1, 20, 20, 20))]
    _, rows = comparison_table(cells)
    dra_vs_direct = next(r for r in rows if r[0].startswith("dra vs direct"))
    assert "m1: +50.0 (2 vs 0, p = 0.5)" in dra_vs_direct[2] and "m2: +25.0 (1 vs 0, p = 1)" in dra_vs_direct[2]
    # Pooled: prompt p1 flips on both models (sum 2), p2 on one (1): 2 of 4 sign patterns as extreme.
    assert dra_vs_direct[3].startswith("+37.5 (3 vs 0, p = 0.5, 4 prompt clusters x 2 models)")
    assert any(r[0] == "dra, none: m1 vs m2" and r[3] == "-" for r in rows)
    columns, summary = summary_table(cells)
    costs = dict(zip(columns, next(r for r in summary if r[0] == "m2" and r[2] == "dra")))
    assert costs["queries per behaviour (mean, max)"] == "15.2, 20" and costs["stopped by its rule %"] == "50"
    _, budgets = budget_table(cells)
    assert budgets == [["dra", "at most 20 queries", "at most 20 queries", budgets[0][3], budgets[0][4]]]


def test_runs_on_other_subsets_of_the_prompts_pair_on_the_prompts_they_share():
    from dataclasses import replace

    first = [cell("m1", "none", "direct", [0, 0, 0, 1]), cell("m1", "none", "dra", [1, 1, 0, 1])]
    # A later `--limit 2` run: the bare request again on p1 (same outcome) and p5, and AutoDAN on both.
    second = [replace(cell("m1", "none", "direct", [0, 1, 0, 0]), n=2, behaviours=["p1", "p5"],
                      outcomes={"keyword": [0, 1]}),
              replace(cell("m1", "none", "autodan", [1, 1, 0, 0]), n=2, behaviours=["p1", "p5"],
                      outcomes={"keyword": [1, 1]})]
    rows = {r[0]: r for r in comparison_table(first + second)[1]}
    assert rows["dra vs direct, none"][2] == "m1: +50.0 (2 vs 0, p = 0.5)"  # on p1-p4, not on the later subset
    assert rows["autodan vs direct, none"][2] == "m1: +50.0 (1 vs 0, p = 1)"  # on p1 and p5
    # Another seed is another set of prompts: never paired with the first, and named in the label.
    other_seed = [replace(c, seed=1) for c in first]
    labels = [r[0] for r in comparison_table(first + other_seed)[1]]
    assert labels == ["dra vs direct, none (b, seed 0)", "dra vs direct, none (b, seed 1)"]
    # DRA with two budgets on the same prompts: each compared with the bare request under its own identity.
    longer = replace(cell("m1", "none", "dra", [1, 1, 1, 1]), identity='dra {"queries":20}')
    labels = [r[0] for r in comparison_table([*first, longer])[1]]
    assert labels == ["dra vs direct, none", 'dra {"queries":20} vs direct, none']
