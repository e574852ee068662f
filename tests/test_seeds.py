from quada.defense.quada import noise_seed
from quada.seeds import derived_seed


def test_derived_seeds_are_the_ones_runs_drew_before():
    # Pinned: a resumed training must draw the noise that an older, interrupted run of the same step drew.
    assert noise_seed(0, 5, 1) == 788802775
    assert noise_seed(3, 0, 0) == 3516041204


def test_a_derived_seed_depends_on_every_part_and_fits_32_bits():
    seeds = {derived_seed(seed, name, i) for seed in (0, 1) for name in ("a", "b") for i in range(3)}
    assert len(seeds) == 12
    assert all(0 <= s < 2**32 for s in seeds)
    assert derived_seed(1, "a") == derived_seed("1", "a")  # parts count as their text
