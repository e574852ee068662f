"""Identify what produced a result: a cheap model fingerprint and the package versions."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform

FINGERPRINT_SAMPLES = 256
RECORDED_PACKAGES = ("quada", "torch", "transformers", "tokenizers", "numpy")


def model_fingerprint(model) -> str:
    """16 hex digits identifying a model's weights and configuration, computed in milliseconds.

    Hashes the configuration (without its local path) and, for every parameter in name order, its
    name, shape, dtype and 256 evenly strided values. Two checkpoints that differ anywhere but in
    unsampled entries get different fingerprints; the same weights loaded from another folder get
    the same one. Take it from the clean model: an approximation that rewrites weights (e.g.
    SmoothQuant's folding) would change it while applied.
    """
    config = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version"):
        config.pop(volatile, None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, parameter in sorted(model.named_parameters()):
        flat = parameter.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // FINGERPRINT_SAMPLES)][:FINGERPRINT_SAMPLES]
        digest.update(f"{name}:{tuple(parameter.shape)}:{parameter.dtype}".encode())
        digest.update(sample.float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def package_versions() -> dict[str, str]:
    """Python and the versions of the packages that decide a result ("absent" if not installed)."""
    versions = {"python": platform.python_version()}
    for package in RECORDED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "absent"
    return versions
