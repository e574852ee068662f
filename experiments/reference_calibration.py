"""Write the reference calibrations that ship with quada (src/quada/bundled/calibration/): the built-in
judges calibrated on this machine against their default labelled sets, both halves, so that a vet
with the same judge (model, dtype, question, threshold) prints its held-out figures without judging
the labelled set first. Each file records the quada and torch versions and the processor.

    python experiments/reference_calibration.py --judges keyword,refusal-keyword,llm [--dtype auto]

Run it when a judge, its labelled set or the calibration code changes (the file names are the cache
keys, which change with them); stale files are never read, because their keys no longer match.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, replace

from quada.defaults import DEFAULT_JUDGE_MODEL
from quada.devices import check_dtype, resolve_device
from quada.judging import make_judge
from quada.judging.calibration import DEFAULT_SETS, REFERENCE_DIR, cache_path, calibrate
from quada.runs import write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--judges", default="keyword,refusal-keyword,llm")
    parser.add_argument("--judge-model", default=DEFAULT_JUDGE_MODEL)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    device = resolve_device("auto")
    for name in args.judges.split(","):
        judge = make_judge(name, model_source=args.judge_model, device=device, dtype=check_dtype(args.dtype))
        labelled_set = DEFAULT_SETS[judge.measure]
        calibration = calibrate(judge, labelled_set)
        if calibration.reference:
            print(f"{name}: the shipped reference is current ({labelled_set})")
            continue
        path = REFERENCE_DIR / cache_path(judge.identity, calibration.items_sha256).name
        REFERENCE_DIR.mkdir(parents=True, exist_ok=True)
        write_json(path, asdict(replace(calibration, reference=False)))
        print(f"{name}: held-out kappa {calibration.held_out.kappa.value:.2f} on {labelled_set} -> {path}")


if __name__ == "__main__":
    main()
