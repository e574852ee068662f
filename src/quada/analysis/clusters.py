"""Finding 3 of the paper: harmful activations cluster, and approximation moves them toward benign.

The paper (Zhang et al., arXiv 2502.00840, section 4, PAPER.md) shows harmful (AdvBench) and
benign prompts forming separable clusters in activation space, with harmful points drifting
toward the benign ones under approximation; layer, pooling and projection are not published. Here
they are options: the activation of any decoder layer at the residual stream (the layer's output)
or at one of the approximation sites, pooled over the prompt's last token or its mean, captured
with the clean model and under an approximation (by default the MVA of `quada sweep`).

Separability: silhouette (Rousseeuw 1987), cross-validated linear-probe accuracy and the distance
between the class centroids. Drift: the mean cosine of harmful points to the benign centroid of
the same condition (up = the classes merge), and the share of harmful points that a probe trained
on *clean* activations calls benign under approximation (up = the approximated model's harmful
prompts look benign to what separated them before).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.manifold import TSNE
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from quada.analysis.sweep import approximation_or_mva
from quada.approx import as_spec
from quada.approx.sites import SITES, capturing, resolve_decoder
from quada.chat import PROMPT_FORMATS, format_prompt
from quada.data import load_benchmark, subset
from quada.devices import check_device, check_dtype
from quada.engine.plan import approximated, check_specs_fit
from quada.errors import QuadaError, check_seed
from quada.fingerprint import model_fingerprint
from quada.measures.batching import POOLINGS, padded_batch, pool_prompt_activations
from quada.measures.generate import check_prompts_fit
from quada.measures.scoring import pad_id_of
from quada.models import DEFAULT_MODEL, load
from quada.report.clusters import RESULTS_FILE, ClusterMetrics, ClustersResult
from quada.report.story import write_story
from quada.runs import (
    atomic_writer,
    check_apart,
    jsonable,
    open_run_dir,
    progress_bar,
    write_json,
)
from quada.store import CLEAN

RESIDUAL = "residual"
CAPTURE_SITES = (RESIDUAL, *SITES)
HARMFUL, BENIGN = 1, 0  # probe labels


@dataclass
class ClustersConfig:
    """What `quada clusters` measures; every field has a CLI option of the same name; ``approximation``
    is ``spec`` parsed (once, here)."""

    model: str = DEFAULT_MODEL
    device: str = "auto"  # where the model runs: auto, cpu, cuda or cuda:N
    dtype: str = "auto"  # the number format it runs in (see quada.devices.DTYPES)
    spec: str | None = None  # the approximation; None = the MVA of the sweep in run_dir
    layer: int | None = None  # decoder layer; None = the middle one
    site: str = RESIDUAL  # the layer's output, or an approximation site: qkv, gate_up, o, down, act
    pooling: str = "last"  # last prompt token or mean over the prompt
    harmful: str = "advbench"
    benign: str = "quada-benign"
    limit: int | None = 64  # prompts per class (seeded subsets); None = all
    prompt_format: str = "paper"
    folds: int = 5  # cross-validation folds of the probe
    seed: int = 0
    run_dir: Path = field(default_factory=lambda: Path("runs") / "sweep")

    def __post_init__(self):
        self.device = check_device(self.device)
        self.dtype = check_dtype(self.dtype)
        if self.spec == CLEAN:
            raise QuadaError("--spec must be an approximation, not the clean model")
        self.approximation = None if self.spec is None else as_spec(self.spec)
        if self.approximation is not None:
            self.spec = str(self.approximation)
        if self.site not in CAPTURE_SITES:
            raise QuadaError(f"unknown site {self.site!r}; choose one of {', '.join(CAPTURE_SITES)}")
        if self.pooling not in POOLINGS:
            raise QuadaError(f"unknown pooling {self.pooling!r}; choose one of {', '.join(POOLINGS)}")
        if self.prompt_format not in PROMPT_FORMATS:
            raise QuadaError(f"unknown prompt format {self.prompt_format!r}; choose one of: {', '.join(PROMPT_FORMATS)}")
        if self.layer is not None and self.layer < 0:
            raise QuadaError(f"--layer counts decoder layers from 0, got {self.layer}")
        if self.folds < 2:
            raise QuadaError(f"folds must be at least 2 for cross-validation, got {self.folds}")
        if self.limit is not None and self.limit < self.folds:
            raise QuadaError(f"limit {self.limit} leaves fewer prompts per class than the {self.folds} folds; raise --limit or lower --folds")
        check_seed(self.seed)
        self.run_dir = Path(self.run_dir)

    def inputs(self) -> list[tuple[str, str]]:
        """What the analysis reads by option: the model and the prompt files."""
        return [("--model", self.model), ("--harmful", self.harmful), ("--benign", self.benign)]


# --------------------------------------------------------------------------- capture


@torch.inference_mode()
def pooled_activations(
    model, tokenizer, prompts: Sequence[str], layer: int, site: str = RESIDUAL, pooling: str = "last",
    prompt_format: str = "paper", batch_size: int = 8,
) -> np.ndarray:
    """``[len(prompts), width]`` activations of decoder ``layer`` at ``site`` (``residual``: the
    layer's output hidden state), pooled over each templated prompt: its ``last`` token (where the
    response begins) or the ``mean`` over its tokens. A hook captures the tensor while the prompts
    run; under an approximation it sees the approximated tensor."""
    decoder = resolve_decoder(model)
    if not 0 <= layer < len(decoder.layers):
        raise QuadaError(f"layer {layer} is out of range for a model with {len(decoder.layers)} decoder layers; use 0..{len(decoder.layers) - 1}")
    if site == RESIDUAL:
        module, kind = decoder.layers[layer].layer, "output"
    else:
        module, kind = decoder.layers[layer].tap(site)
    encoded = [tokenizer(format_prompt(tokenizer, p, prompt_format), add_special_tokens=False)["input_ids"] for p in prompts]
    captured: list[torch.Tensor] = []
    pooled = []
    with capturing({site: (module, kind)}, lambda _site, tensor: captured.append(tensor.float())):
        for start in range(0, len(encoded), batch_size):
            # Right padding: the model's default positions are then the prompts' own.
            input_ids, mask = padded_batch(encoded[start : start + batch_size], pad_id_of(tokenizer), side="right")
            captured.clear()
            model(input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device), logits_to_keep=1)
            pooled.append(pool_prompt_activations(captured[0].cpu(), mask, pooling))
    return torch.cat(pooled).numpy()


# --------------------------------------------------------------------------- pure metrics


def silhouette(points: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette (Rousseeuw, J. Comput. Appl. Math. 20:53, 1987) with Euclidean distances:
    s(i) = (b(i) - a(i)) / max(a(i), b(i)), a(i) the mean distance from i to the other points of
    its class, b(i) the smallest mean distance from i to the points of another class; s(i) = 0
    for a point alone in its class."""
    points, labels = np.asarray(points, dtype=float), np.asarray(labels)
    distances = np.sqrt(np.maximum(((points[:, None] - points[None]) ** 2).sum(-1), 0))
    classes = np.unique(labels)
    if len(classes) < 2:
        raise ValueError("silhouette needs at least two classes")
    scores = np.zeros(len(points))
    for i in range(len(points)):
        own = labels == labels[i]
        if own.sum() == 1:
            continue
        a = distances[i, own].sum() / (own.sum() - 1)
        b = min(distances[i, labels == c].mean() for c in classes if c != labels[i])
        scores[i] = (b - a) / max(a, b) if max(a, b) > 0 else 0.0
    return float(scores.mean())


def _probe():
    # Standardised features: residual streams have a few huge dimensions that would dominate.
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))


def _folds(folds: int, seed: int) -> StratifiedKFold:
    return StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)


def probe_predictions(points: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Out-of-fold predictions of a logistic-regression probe (stratified, shuffled folds)."""
    return cross_val_predict(_probe(), points, labels, cv=_folds(folds, seed))


def probe_accuracy(points: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """Cross-validated accuracy of a logistic-regression probe separating the classes."""
    return float(np.mean(probe_predictions(points, labels, folds, seed) == np.asarray(labels)))


def centroid_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Euclidean distance between the means of two point sets."""
    return float(np.linalg.norm(np.mean(a, axis=0) - np.mean(b, axis=0)))


def mean_cosine_to(points: np.ndarray, centroid: np.ndarray) -> float:
    """Mean cosine similarity of the rows of ``points`` to ``centroid``."""
    points, centroid = np.asarray(points, dtype=float), np.asarray(centroid, dtype=float)
    return float(np.mean(points @ centroid / (np.linalg.norm(points, axis=1) * np.linalg.norm(centroid))))


def called_benign(clean_points: np.ndarray, clean_labels: np.ndarray, harmful_points: np.ndarray) -> float:
    """Share of ``harmful_points`` that a probe trained on all the clean points labels benign."""
    probe = _probe().fit(clean_points, clean_labels)
    return float(np.mean(probe.predict(harmful_points) == BENIGN))


def cluster_metrics(condition: str, harmful: np.ndarray, benign: np.ndarray, clean_harmful: np.ndarray,
                    clean_benign: np.ndarray, folds: int, seed: int) -> ClusterMetrics:
    """All metrics of one condition; the clean activations train the probe that judges drift."""
    points = np.concatenate([harmful, benign])
    labels = np.array([HARMFUL] * len(harmful) + [BENIGN] * len(benign))
    predictions = probe_predictions(points, labels, folds, seed)
    if condition == CLEAN:  # the clean probe on clean points: out of fold, so not trained on them
        drift = float(np.mean(predictions[: len(harmful)] == BENIGN))
    else:
        clean_labels = np.array([HARMFUL] * len(clean_harmful) + [BENIGN] * len(clean_benign))
        drift = called_benign(np.concatenate([clean_harmful, clean_benign]), clean_labels, harmful)
    return ClusterMetrics(
        condition, silhouette(points, labels), float(np.mean(predictions == labels)),
        centroid_distance(harmful, benign), mean_cosine_to(harmful, benign.mean(0)), drift,
    )


# --------------------------------------------------------------------------- the analysis


def _cache_path(run_dir: Path, *parts) -> Path:
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:24]
    return run_dir / "activations" / f"{digest}.npy"


def _cached(path: Path, compute) -> np.ndarray:
    """Activations are kept as .npy files named by what decides them: a rerun loads them."""
    if path.is_file():
        return np.load(path)
    values = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path, "wb") as f:
        np.save(f, values)
    return values


def _embeddings(groups: dict[str, np.ndarray], seed: int) -> tuple[dict, dict]:
    """2-D PCA (fitted on the clean points, so both conditions share the clean axes) and t-SNE
    (one embedding of every point) coordinates per group."""
    names = list(groups)
    stacked = np.concatenate([groups[n] for n in names])
    clean = np.concatenate([groups[n] for n in names if n.endswith(f"|{CLEAN}")])
    pca = PCA(n_components=2, random_state=seed).fit(clean)
    scaled = StandardScaler().fit_transform(stacked)
    tsne = TSNE(n_components=2, perplexity=min(30.0, (len(stacked) - 1) / 3), init="pca", random_state=seed).fit_transform(scaled)
    bounds = np.cumsum([0] + [len(groups[n]) for n in names])
    return ({n: pca.transform(groups[n]).tolist() for n in names},
            {n: tsne[bounds[i] : bounds[i + 1]].tolist() for i, n in enumerate(names)})


def clusters(config: ClustersConfig, progress: bool = True) -> ClustersResult:
    """Capture activations clean and approximated, measure separability and drift, write the report."""
    check_apart(config.inputs(), run_dirs=[("--run-dir", config.run_dir)])
    harmful = subset(load_benchmark(config.harmful), config.limit, config.seed)
    benign = subset(load_benchmark(config.benign), config.limit, config.seed)
    if min(len(harmful), len(benign)) < config.folds:
        raise QuadaError(f"{min(len(harmful), len(benign))} prompts in a class are fewer than the {config.folds} folds; lower --folds")
    shared = {p.text.strip() for p in harmful} & {p.text.strip() for p in benign}
    if shared:
        raise QuadaError(
            f"{len(shared)} prompt(s) are both harmful ({config.harmful}) and benign ({config.benign}), e.g. "
            f"{min(shared)[:60]!r}; the classes must not share prompts: give other --harmful or --benign prompts"
        )
    approximation = approximation_or_mva(config.approximation, config.run_dir)
    spec = str(approximation)
    model, tokenizer = load(config.model, dtype=config.dtype, device=config.device)
    check_specs_fit(model, [approximation])
    num_layers = len(resolve_decoder(model).layers)
    layer = num_layers // 2 if config.layer is None else config.layer
    if layer >= num_layers:
        raise QuadaError(f"--layer {layer} is out of range for a model with {num_layers} decoder layers; use 0..{num_layers - 1}")
    check_prompts_fit(model, tokenizer, [*harmful, *benign], config.prompt_format, 0)
    open_run_dir(config.run_dir)
    fingerprint = model_fingerprint(model)
    activations: dict[str, np.ndarray] = {}
    with progress_bar(progress) as bar:
        task = bar.add_task("activations", total=4)
        for condition in (CLEAN, approximation):
            for name, prompts in (("harmful", harmful), ("benign", benign)):
                path = _cache_path(config.run_dir, fingerprint, condition, layer, config.site, config.pooling,
                                   config.prompt_format, config.seed, *[p.id for p in prompts])

                def capture(prompts=prompts, condition=condition):
                    with approximated(model, condition, tokenizer, config.seed):
                        return pooled_activations(model, tokenizer, [p.text for p in prompts], layer, config.site,
                                                  config.pooling, config.prompt_format)

                activations[f"{name}|{condition}"] = _cached(path, capture)
                bar.advance(task)
    clean_h, clean_b = activations[f"harmful|{CLEAN}"], activations[f"benign|{CLEAN}"]
    metrics = [cluster_metrics(c, activations[f"harmful|{c}"], activations[f"benign|{c}"], clean_h, clean_b,
                               config.folds, config.seed) for c in (CLEAN, spec)]
    pca, tsne = _embeddings(activations, config.seed)
    write_json(config.run_dir / RESULTS_FILE, {
        "config": jsonable(asdict(config)), "fingerprint": fingerprint, "spec": spec, "layer": layer,
        "summary": _summary(config, spec, layer, fingerprint, len(harmful), len(benign)),
        "metrics": [asdict(m) for m in metrics], "pca": pca, "tsne": tsne,
    })
    md, html = write_story(config.run_dir)
    return ClustersResult(config, spec, layer, metrics, pca, tsne, md, html)


def _summary(config, spec, layer, fingerprint, n_harmful, n_benign) -> str:
    return (
        f"Activations of {config.model} (fingerprint {fingerprint}) at layer {layer}, site {config.site}, "
        f"{config.pooling} pooling; {n_harmful} prompts of {config.harmful} and {n_benign} of {config.benign} "
        f"(seed {config.seed}, prompt format {config.prompt_format}); clean and under {spec}."
    )
