"""Fast adaptation: score every expert of a bundle on the client's images.

A higher score means "this expert's source data is more relevant to my task". Each scorer
is one function registered in ``nds._registry.SCORERS``:

- ``linear``: mean stratified cross-validated accuracy of a logistic-regression probe on
  the expert's frozen features (needs labels). The NDS paper's "domain confusion"-free
  proxy for transfer: features that separate the client's classes came from similar data.
- ``rotation``: the expert's rotation-prediction accuracy on the client's images (all four
  rotations; no labels needed). The paper's self-supervised score.
- ``rotation-prob``: the mean probability the expert gives the right rotation (a soft
  accuracy: less noisy on a few images). No labels needed.
- ``logme``: LogME evidence (You et al., ICML 2021) of the labels given the features: a
  Bayesian linear model's marginal likelihood, per class one-hot target, averaged. No
  cross-validation, so cheaper than ``linear``; needs labels.
- ``features``: no expert runs. The client embeds its images with the index's public
  extractor; each image votes for the clusters of its nearest rows of the bundle's reference
  sample (``cluster_stats``: a few members per cluster) and cluster k scores its mean share
  of the votes (equal priors). Works when the client's images come from a collection the
  server never indexed; needs no labels.
- ``combined``: ``features`` and ``rotation-prob`` of the same images as one product of
  evidence (``combine_evidence``): the features' votes, moved by an expert's rotation score only
  as far as it stands out of the noise of this many images. Needs no labels.

The images are decoded once (``nds.client.images.load_client_images``; again at the bundle's
``input_size`` where its experts were trained at another size than the corpus's 32 px, by
``client_images_at``) and, for the rotation scorers, preprocessed and rotated once for all experts;
each expert then runs over them in batches under ``torch.inference_mode``. On a GPU (``device``:
--device, $NDS_DEVICE, else auto) the prepared batches are uploaded once and every expert runs
there; on the CPU nothing changes.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from nds._registry import SCORERS
from nds.config import IMAGE_SIZE
from nds.errors import InvalidInputError
from nds.formats.bundle import load_bundle
from nds.models import experts

if TYPE_CHECKING:
    from nds.client.images import ClientData

log = logging.getLogger(__name__)

#: Images per forward pass. Measured on 2 cores (32 px RotNetSmall): 64-512 images cost
#: ~0.14 ms each, 1,024 images 0.31 ms each (activations fall out of cache), so the four
#: rotations of 64 images (256 inputs) go through together.
BATCH_SIZE = 256
ROTATION_BATCH = 64
#: Torch threads while scoring. Measured on the 2-core machine beside other jobs, K=50 x 1,000
#: images (benchmarks/client_scoring.py): rotation 14.6 s with one thread, 117 s with two
#: (intra-op threads spin when the cores are shared; these convolutions are tiny).
SCORING_THREADS = 1
#: At most this many cross-validation folds for the linear probe (fewer for tiny classes).
MAX_FOLDS = 5
#: Probe settings: lbfgs converges on standardised 128-d features within ~100 steps;
#: 200 leaves slack and bounds the cost per expert.
PROBE_C = 1.0
PROBE_MAX_ITER = 200
#: LogME fixed-point iterations and relative tolerance on lambda = alpha / beta
#: (the reference implementation's values: it converges in a handful of steps).
LOGME_MAX_ITER = 11
LOGME_TOL = 1e-3


@dataclass(frozen=True)
class ScoreResult:
    """scores: (K,) float64, one per expert; seconds_per_expert: (K,) float64."""

    scores: np.ndarray
    seconds_per_expert: np.ndarray
    mode: str
    bundle: dict


# --------------------------------------------------------------------------- helpers


def compute_features(model, images: np.ndarray, *, batch_size: int = BATCH_SIZE, device=None) -> np.ndarray:
    """Frozen expert features of ``images: (n, s, s, 3) uint8`` -> (n, feature_dim) float32.

    device: where ``model`` is (None: the CPU).
    """
    import torch

    model.eval()
    out = []
    with torch.inference_mode():
        for s in range(0, len(images), batch_size):
            x = experts.preprocess(images[s : s + batch_size])
            if device is not None:
                out.append(model.features(x.to(device, non_blocking=True)).float().cpu().numpy())
            else:
                out.append(model.features(x).numpy())
    return np.concatenate(out).astype(np.float32, copy=False)


def _label_codes(labels, mode: str) -> tuple[np.ndarray, list[str]]:
    """labels: (n,) str or None -> codes (n,) int, class names; InvalidInputError if unusable for ``mode``."""
    if labels is None:
        raise InvalidInputError(
            f"mode {mode!r} needs labelled images: arrange them in one subfolder per class "
            "(or give an .npz with 'labels'), or use --mode rotation, which needs no labels"
        )
    names, codes = np.unique(np.asarray(labels).astype(str), return_inverse=True)
    if len(names) < 2:
        raise InvalidInputError(
            f"mode {mode!r} needs at least 2 classes, got only {names.tolist()}; "
            "add images of other classes or use --mode rotation"
        )
    return codes.astype(np.int64), names.tolist()


def _n_folds(codes: np.ndarray, names: list[str]) -> int:
    counts = np.bincount(codes, minlength=len(names))
    smallest = int(counts.min())
    if smallest < 2:
        lonely = [names[i] for i in np.flatnonzero(counts < 2)]
        raise InvalidInputError(
            f"mode 'linear' cross-validates, so every class needs >= 2 images; class(es) {lonely[:5]} "
            "have only one: add images to them, drop them, or use --mode logme / rotation"
        )
    return min(MAX_FOLDS, smallest)


# --------------------------------------------------------------------------- scorers
# Each registers as mode -> scorer(model, images (n, s, s, 3) uint8, labels (n,) str | None, *, seed) -> float,
# s the bundle's input_size; score_experts passes ``device=`` too when the model is on a GPU.


@SCORERS.register("linear")
def score_linear(model, images: np.ndarray, labels, *, seed: int = 0, device=None) -> float:
    """Mean stratified k-fold accuracy of a logistic-regression probe on frozen features.

    images: (n, s, s, 3) uint8; labels: (n,) str. k = min(5, smallest class size) >= 2.
    Deterministic for a given seed.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    codes, names = _label_codes(labels, "linear")
    folds = _n_folds(codes, names)
    feats = compute_features(model, images, device=device).astype(np.float64)
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=PROBE_C, max_iter=PROBE_MAX_ITER, solver="lbfgs"))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    with _one_blas_thread(), warnings.catch_warnings():
        # An unconverged probe after PROBE_MAX_ITER steps is still a fair relative score.
        warnings.simplefilter("ignore", ConvergenceWarning)
        accuracy = cross_val_score(probe, feats, codes, cv=cv, scoring="accuracy")
    return float(accuracy.mean())


def _one_blas_thread():
    """BLAS on one thread: the probes are tiny (n x 128), and a multi-threaded OpenBLAS on a
    busy 2-core machine spins: 5-fold CV of one probe took 20 s instead of 0.26 s here."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def rotated_batches(images: np.ndarray) -> list[tuple[object, object]]:
    """The client's images, preprocessed and rotated ONCE for every expert (ROTATION_BATCH per pass)."""
    return list(experts.rotated_batches(images, batch_size=ROTATION_BATCH))


@SCORERS.register("rotation")
def score_rotation(model, images: np.ndarray, labels=None, *, seed: int = 0, prepared=None, device=None) -> float:
    """Share of the four rotations of ``images: (n, s, s, 3) uint8`` the expert predicts right.

    prepared: ``rotated_batches(images)``, shared by all experts (made here if None).
    """
    return float(experts.rotation_accuracy(model, images, batch_size=ROTATION_BATCH, batches=prepared, device=device))


@SCORERS.register("rotation-prob")
def score_rotation_prob(model, images: np.ndarray, labels=None, *, seed: int = 0, prepared=None,
                        device=None) -> float:
    """Mean probability the expert gives the right rotation of ``images`` (arguments as ``score_rotation``)."""
    return float(experts.rotation_confidence(model, images, batch_size=ROTATION_BATCH, batches=prepared,
                                             device=device))


#: Scorers that run every expert on the client's images rotated four ways (prepared once).
ROTATION_SCORERS = (score_rotation, score_rotation_prob)


def compute_logme(features: np.ndarray, codes: np.ndarray) -> float:
    """LogME (You et al. 2021): mean per-class log evidence per sample.

    features: (n, d) float; codes: (n,) int class ids. Each class's one-hot target gets a
    Bayesian linear regression y = f w + noise, w ~ N(0, 1/alpha), noise ~ N(0, 1/beta);
    alpha and beta are set by the MacKay fixed point, and the log marginal likelihood
    divided by n is averaged over classes. Higher = labels better explained by features.
    """
    f = np.asarray(features, dtype=np.float64)
    n, d = f.shape
    # Eigen-decomposition of f^T f once; every class reuses it.
    sigma, v = np.linalg.eigh(f.T @ f)
    sigma = np.clip(sigma, 0.0, None)
    tiny = np.finfo(np.float64).tiny
    evidences = []
    for c in np.unique(codes):
        y = (codes == c).astype(np.float64)
        proj = v.T @ (f.T @ y)  # (d,)
        alpha, beta = 1.0, 1.0
        for _ in range(LOGME_MAX_ITER):
            lam = alpha / beta
            gamma = float((sigma / (sigma + lam)).sum())
            m = v @ (proj * beta / (alpha + beta * sigma))
            alpha_de = max(float(m @ m), tiny)
            beta_de = max(float(((y - f @ m) ** 2).sum()), tiny)
            alpha = gamma / alpha_de if gamma > 0 else 1.0
            beta = max(n - gamma, tiny) / beta_de
            if abs(alpha / beta - lam) / lam < LOGME_TOL:
                break
        evidence = (
            d / 2.0 * np.log(alpha)
            + n / 2.0 * np.log(beta)
            - 0.5 * np.sum(np.log(alpha + beta * sigma))
            - beta / 2.0 * beta_de
            - alpha / 2.0 * alpha_de
            - n / 2.0 * np.log(2 * np.pi)
        )
        evidences.append(evidence / n)
    return float(np.mean(evidences))


@SCORERS.register("logme")
def score_logme(model, images: np.ndarray, labels, *, seed: int = 0, device=None) -> float:
    """LogME evidence of ``labels: (n,) str`` given the expert's features of ``images``."""
    codes, _ = _label_codes(labels, "logme")
    feats = compute_features(model, images, device=device)
    with _one_blas_thread():
        return compute_logme(feats, codes)


#: Client images per extractor pass of the ``features`` scorer (what the extract stage uses).
EXTRACT_BATCH = 128


def compute_feature_scores(stats, features: np.ndarray) -> np.ndarray:
    """(K,) float64 in [0, 1], summing to 1: each cluster's mean share of the images' nearest-neighbour votes.

    stats: ``nds.index.cluster_stats.ClusterStats``; features: (n, F) raw extractor output.
    Equal priors, so a big cluster gains nothing from its size.
    """
    return stats.votes(features).mean(axis=0)


#: ``log_scores`` exponent: at the server's default temperature the selection weighs cluster k
#: by p_k ** SHARPNESS (normalised). Measured on the small index (real selection path, 8 tasks x
#: 3 seeds, 5 shots; related-domain share of a 5 % selection, `combined`): p itself (1) spread
#: the budget thin (lcd-digits 0.68, emoji 0.94, icons 0.74), 3 -> 0.80 / 1.00 / 0.98, 8 -> 0.89 /
#: 1.00 / 1.00. (Raw shares in [0, 1] scored alike at the top but, once a chosen cluster was
#: used up, spread the rest evenly: animals fell to 0.83 with 10 shots; 1.00 here.)
SHARPNESS = 8.0


def log_scores(p: np.ndarray, n_images: int) -> np.ndarray:
    """(K,) scores ``SHARPNESS * T0 * log(p + eps)`` of a distribution ``p`` over the clusters
    (T0: the server's default temperature; eps = 1 / (4 n_images K)).

    The server weighs cluster k by softmax(score / T): at T = T0 that is p ** SHARPNESS
    normalised, so the mixture follows p's order all the way down, not only to its first choice
    (raw shares in [0, 1] under T = 0.02 leave every cluster below the top few at about the same
    weight); T = SHARPNESS * T0 gives p itself. eps keeps a cluster p gives nothing reachable.
    """
    from nds.select.request import DEFAULT_TEMPERATURE

    p = np.asarray(p, dtype=np.float64)
    return SHARPNESS * DEFAULT_TEMPERATURE * np.log(p + 1.0 / (4 * max(int(n_images), 1) * len(p)))


@SCORERS.register("features")
def score_features(bundle: dict, images: np.ndarray, labels=None, *, seed: int = 0, device=None) -> np.ndarray:
    """Scores of every cluster at once from the bundle's ``cluster_stats`` (no expert is loaded).

    images: (n, 32, 32, 3) uint8, embedded with the extractor the stats name, at their input size.
    """
    from nds.index.cluster_stats import ClusterStats
    from nds.models.device import is_cpu
    from nds.models.extractors import load_extractor
    from nds.params import ExtractParams

    stats = ClusterStats.from_bundle(bundle)
    extractor = load_extractor(ExtractParams(extractor=stats.extractor, image_size=stats.image_size))
    if device is not None and not is_cpu(device):
        extractor = extractor.to(device)
    feats = np.concatenate([extractor(images[s:s + EXTRACT_BATCH]) for s in range(0, len(images), EXTRACT_BATCH)])
    return log_scores(compute_feature_scores(stats, feats), len(images))


#: Scorers that score the whole bundle at once from bundle.json, without running the experts.
BUNDLE_SCORERS = (score_features,)


#: Weight of the rotation evidence against the features' log vote share in ``combined``. Measured
#: on the small index (be022a70; real selection path, 3 seeds, related-domain share of a 5 %
#: selection, colour-textured digits / seven-segment digits at 5 shots, seven-segment at 10;
#: every other task, in-domain ones included, 1.00 throughout unless said). With the mean
#: probability of the right rotation: 0.5 -> 0.42 / 0.95, 0.93; 1 -> 0.62 / 0.95, 0.97;
#: 2 -> 0.72 / 0.96, 0.96; 3 -> 0.77 / 0.96, 0.74; 4 -> 0.79 / 0.74, 0.67 (animals 0.92). With
#: hard accuracy (the former rule) 0.5 -> 0.48 / 0.93, 0.77; 1 -> 0.80 / 0.73, 0.64 (animals
#: 0.89 at 10 shots): its noise wins sooner. A per-image paired z or the log-likelihood of the
#: right rotation did worse (log-likelihood: 0.00 / 0.07 at 0.5; confident mistakes dominate).
ROTATION_WEIGHT = 2.0
#: z beyond which more images add no rotation evidence (3 standard errors: the lead is real).
#: z grows with sqrt(n), and past that point what is left is the experts' own preferences
#: (an expert that reads a photo's orientation better than its neighbour), not relevance:
#: uncapped, 200 in-domain images per client (20 per class, 10 % selection) took animals to
#: 0.94 and glyphs to 0.91 (features alone 1.00); with 20 shots per class, animals 0.96 -> 1.00
#: capped. z never reached 3 on the cross-domain tasks at 5 shots, so those figures are the same.
ROTATION_Z_CAP = 3.0
#: Floor of r * (1 - r) in the rotation score's standard error: an expert at 0 % or 100 %
#: on a few images is not infinitely sure.
ROTATION_VAR_FLOOR = 0.05


def combine_evidence(rotation: np.ndarray, features: np.ndarray, n_images: int) -> np.ndarray:
    """(K,) ``log_scores`` of a product of the two scorers' evidence per cluster.

    rotation: (K,) ``rotation-prob`` scores on the 4 * n_images rotated images (``rotation``
    accuracies work alike, but noisier); features: (K,) ``features``
    scores of the same images (``log_scores`` of the vote shares). Cluster k gets
    log(vote share_k + eps) + ROTATION_WEIGHT * z_k, z_k = (rotation_k - median) / its binomial
    standard error, capped at +-ROTATION_Z_CAP, normalised over the clusters. Rotation thus counts by how far an expert
    stands out of the noise of this many images: with 50 images a chance-level spread (the
    usual case for a collection the index has never seen) barely moves the features' choice,
    while a clear winner (an expert that reads the client's orientation) does.
    """
    from nds.select.request import DEFAULT_TEMPERATURE

    rot = np.asarray(rotation, np.float64)
    n = 4 * max(int(n_images), 1)
    se = np.sqrt(np.maximum(rot * (1 - rot), ROTATION_VAR_FLOOR) / n)
    z = np.clip((rot - np.median(rot)) / se, -ROTATION_Z_CAP, ROTATION_Z_CAP)
    logit = np.asarray(features, np.float64) / (SHARPNESS * DEFAULT_TEMPERATURE) + ROTATION_WEIGHT * z
    p = np.exp(logit - logit.max())
    return log_scores(p / p.sum(), n_images)


@SCORERS.register("combined")
def score_combined(rotation: np.ndarray, features: np.ndarray, n_images: int) -> np.ndarray:
    """The ``combined`` scores from the (K,) ``rotation`` and ``features`` scores of the same ``n_images``."""
    return combine_evidence(rotation, features, n_images)


#: Modes whose scores are ``log_scores`` of a distribution over the clusters.
LOG_SCORE_MODES = ("features", "combined")
#: Scorers made of other scorers' results: mode -> the modes they combine.
COMPOSITE_SCORERS = {score_combined: ("rotation-prob", "features")}


def needs_labels(mode: str) -> bool:
    """Whether scorer ``mode`` needs the client's labels (the rotation and bundle scorers, and
    composites of them, do not)."""
    scorer = SCORERS[mode]
    if scorer in COMPOSITE_SCORERS:
        return any(needs_labels(part) for part in COMPOSITE_SCORERS[scorer])
    return scorer not in (*ROTATION_SCORERS, *BUNDLE_SCORERS)


# --------------------------------------------------------------------------- entry point


def score_experts(
    bundle_dir: Path,
    data: "ClientData",
    *,
    mode: str = "rotation",
    seed: int = 0,
    progress: bool = True,
    threads: int | None = SCORING_THREADS,
    device: str | None = None,
) -> ScoreResult:
    """Score every expert in ``bundle_dir`` on the client's images with scorer ``mode``.

    data: ClientData from ``nds.client.images.load_client_images`` (images (n, 32, 32, 3) uint8);
        the experts see them at the bundle's ``input_size`` (``client_images_at``).
    Returns ScoreResult with scores (K,) in bundle order and the seconds each expert took.
    threads: torch threads while scoring (None: leave torch's setting).
    device: auto | cpu | cuda | cuda:N (None: $NDS_DEVICE, else auto).
    """
    from tqdm.auto import tqdm

    from nds.client.images import client_images_at
    from nds.models.device import is_cpu, pick_device

    if mode not in SCORERS:
        raise InvalidInputError(f"unknown scoring mode {mode!r}; choose one of: {', '.join(SCORERS.names())}")
    scorer = SCORERS[mode]
    images = np.asarray(data.images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise InvalidInputError(f"client images must be uint8 (n, 32, 32, 3), got {images.dtype} {images.shape}; "
                                "load them with nds.client.images.load_client_images")
    if len(images) == 0:
        raise InvalidInputError("no client images to score; give at least a few images per class")
    if scorer in COMPOSITE_SCORERS:
        parts = [score_experts(bundle_dir, data, mode=m, seed=seed, progress=progress, threads=threads, device=device)
                 for m in COMPOSITE_SCORERS[scorer]]
        return ScoreResult(np.asarray(scorer(*(p.scores for p in parts), len(images)), dtype=np.float64),
                           sum(p.seconds_per_expert for p in parts), mode, parts[0].bundle)
    if needs_labels(mode):  # fail on the labels before any expert runs
        codes, names = _label_codes(data.labels, mode)
        if scorer is score_linear:
            _n_folds(codes, names)
    dev = pick_device(device)
    bundle = load_bundle(Path(bundle_dir), verify=True)
    size = bundle.get("input_size")
    sizes = range(experts.MIN_INPUT_SIZE, experts.MAX_INPUT_SIZE + 1)
    if isinstance(size, bool) or not isinstance(size, int) or size not in sizes:
        raise InvalidInputError(f"bundle input size {size!r} is not one this nds scores at "
                                f"({experts.MIN_INPUT_SIZE}..{experts.MAX_INPUT_SIZE} px); "
                                "update nds to the version that made the bundle")
    if scorer in BUNDLE_SCORERS:  # the extractor resizes the corpus-format images itself
        return _score_bundle(scorer, bundle, images, data.labels, mode=mode, seed=seed, threads=threads, device=dev)
    images = client_images_at(data, size, progress=progress)
    # One decoded, preprocessed (and for rotation: rotated) pass of the images for all experts.
    prepared = {"prepared": rotated_batches(images)} if scorer in ROTATION_SCORERS else {}
    if not is_cpu(dev):  # the prepared batches go up once; every expert runs on the device
        if prepared:
            prepared["prepared"] = [(x.to(dev), y.to(dev)) for x, y in prepared["prepared"]]
        prepared["device"] = dev
    scores, seconds = [], []
    t_all = time.perf_counter()
    with experts.torch_threads(threads):
        for entry in tqdm(bundle["experts"], desc=f"score experts ({mode})", unit="expert", disable=not progress,
                          leave=False):
            t0 = time.perf_counter()
            model, _ = experts.load_expert(Path(bundle_dir) / entry["file"], expected_sha256=entry["sha256"])
            if not is_cpu(dev):
                model = model.to(dev)
            scores.append(scorer(model, images, data.labels, seed=seed, **prepared))
            seconds.append(time.perf_counter() - t0)
            log.debug("expert %s: %s score %.4f in %.2fs", entry.get("expert"), mode, scores[-1], seconds[-1])
    result = ScoreResult(np.asarray(scores, dtype=np.float64), np.asarray(seconds, dtype=np.float64), mode, bundle)
    best = int(np.argmax(result.scores))
    log.info("scored %d experts (%s) on %d images at %d px in %.1fs; best expert %d (%.4f)",
             len(scores), mode, len(images), size, time.perf_counter() - t_all, best, result.scores[best])
    return result


def _score_bundle(scorer, bundle: dict, images: np.ndarray, labels, *, mode: str, seed: int, threads, device
                  ) -> ScoreResult:
    from nds.models.device import is_cpu

    t0 = time.perf_counter()
    with experts.torch_threads(threads):
        scores = np.asarray(scorer(bundle, images, labels, seed=seed, device=None if is_cpu(device) else device),
                            dtype=np.float64)
    seconds = time.perf_counter() - t0
    if scores.shape != (bundle["k"],) or not np.isfinite(scores).all():
        raise InvalidInputError(f"scorer {mode!r} gave {scores.shape} scores for a bundle of {bundle['k']} experts")
    log.info("scored %d clusters (%s) on %d images in %.1fs; best %d (%.4f)", len(scores), mode, len(images),
             seconds, int(np.argmax(scores)), scores.max())
    return ScoreResult(scores, np.full(len(scores), seconds / len(scores)), mode, bundle)
