import importlib.util
from pathlib import Path

from quada.analysis.sweep import SweepConfig, SweepPoint, SweepResult, most_vulnerable
from quada.stats.metrics import Estimate

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "sweep.py"
spec = importlib.util.spec_from_file_location("sweep_benchmark", SCRIPT)
benchmark = importlib.util.module_from_spec(spec)
spec.loader.exec_module(benchmark)


def result(strengths, asr):
    points = [SweepPoint(s, "none" if s == 0 else f"s={s}", Estimate(a, a, a, 10), 10.0) for s, a in zip(strengths, asr)]
    return SweepResult(SweepConfig(), points, 10.0, most_vulnerable(points, 10.0, 1.5), None, None, None)


def test_final_step_is_the_gap_from_the_mva_to_its_nearest_neighbour():
    refined = result([0, 0.05, 0.0625, 0.075, 0.0875, 0.1], [0, 0.2, 0.5, 0.7, 0.6, 0.4])
    assert benchmark.final_step(refined) == 0.0125
    at_the_edge = result([0, 0.1, 0.2], [0, 0.1, 0.9])
    assert benchmark.final_step(at_the_edge) == 0.1


def test_the_dense_grid_spans_the_range_at_the_final_step():
    assert benchmark.dense_grid(0.0, 0.2, 0.025) == (0.0, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.175, 0.2)
    assert len(benchmark.dense_grid(0.0, 0.2, 0.00625)) == 33
