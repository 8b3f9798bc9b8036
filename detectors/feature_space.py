"""Detectors that read the penultimate features of a model trained on the suspect data.

Poisons that work through the model tend to leave a trace in its representation: a direction
they share (spectral signature), a small separate cluster inside their labelled class
(activation clustering), or neighbours of another class (deep k-NN).
"""

from __future__ import annotations

import math

import numpy as np

from infusion_audit.registry import DETECTORS

from .base import AuditContext, Detector, check_choice, per_class_top_mask


@DETECTORS.register("spectral-signature")
class SpectralSignature(Detector):
    """Tran et al. 2018: per class, squared projection of centred features on the top singular vector.

    `centre=False` projects the raw features instead, as ART's SpectralSignatureDefense does
    (its singular vector comes from centred features, its scores from uncentred ones); kept as an
    option for comparison. With `normalise`, a document's score is divided by its class's mean
    score so scores from different classes share one scale for a global ranking; the per-class
    flag rule (top multiplier·ε·n_c of each class) is unaffected.
    """

    needs = frozenset({"features"})
    knowledge = "model"

    def __init__(self, multiplier: float = 1.5, centre: bool = True, normalise: bool = True):
        if multiplier <= 0:
            raise ValueError("multiplier must be > 0")
        self.multiplier = multiplier
        self.centre = centre
        self.normalise = normalise

    def score(self, context: AuditContext) -> np.ndarray:
        feats, labels = context.features(), context.labels
        scores = np.zeros(len(labels))
        for c in np.unique(labels):
            idx = np.flatnonzero(labels == c)
            if len(idx) < 2:
                continue
            rows = feats[idx].astype(np.float64)
            centred = rows - rows.mean(0)
            _, _, vt = np.linalg.svd(centred, full_matrices=False)
            top = vt[0]
            s = ((centred if self.centre else rows) @ top) ** 2
            if self.normalise:
                s = s / max(s.mean(), 1e-300)
            scores[idx] = s
        return scores

    def flag(self, scores: np.ndarray, context: AuditContext) -> np.ndarray:
        return per_class_top_mask(scores, context.labels, context, self.multiplier)


@DETECTORS.register("activation-clustering")
class ActivationClustering(Detector):
    """Chen et al. 2018: per class, PCA to a few dimensions, 2-means; a small or well-separated cluster is suspect.

    `criterion` decides whether a class holds a poison cluster: "size" (smaller cluster holds at
    most `size_threshold` of the class), "silhouette" (small AND silhouette > `silhouette_threshold`,
    ART's silhouette-scores analysis), "size-or-silhouette", or "smaller" (the smaller cluster of
    every class, ART's default). The score ranks every document by tanh of its position along the
    axis from the large to the small cluster centre (0 on the boundary, positive on the small side),
    plus 2 when its class is judged poisoned: flagged documents rank above all others.
    """

    needs = frozenset({"features"})
    knowledge = "model"
    CRITERIA = ("size", "silhouette", "size-or-silhouette", "smaller")

    def __init__(self, n_dims: int = 10, criterion: str = "size", size_threshold: float = 0.35,
                 silhouette_threshold: float = 0.1, n_init: int = 10, seed: int = 0,
                 silhouette_sample: int = 2000):
        check_choice("criterion", criterion, self.CRITERIA)
        self.n_dims = n_dims
        self.criterion = criterion
        self.size_threshold = size_threshold
        self.silhouette_threshold = silhouette_threshold
        self.n_init = n_init
        self.seed = seed
        self.silhouette_sample = silhouette_sample

    def _is_poisoned_class(self, relative_size: float, silhouette: float) -> bool:
        small = relative_size <= self.size_threshold
        separated = silhouette > self.silhouette_threshold
        return {"size": small, "silhouette": small and separated, "size-or-silhouette": small or separated,
                "smaller": True}[self.criterion]

    def score(self, context: AuditContext) -> np.ndarray:
        from sklearn.cluster import KMeans
        from sklearn.decomposition import PCA
        from sklearn.metrics import silhouette_score

        feats, labels = context.features(), context.labels
        scores = np.zeros(len(labels))
        self.decision_ = np.zeros(len(labels), dtype=bool)
        classes = {}
        for c in np.unique(labels):
            idx = np.flatnonzero(labels == c)
            rows = feats[idx].astype(np.float64)
            if len(idx) < 4 or np.allclose(rows, rows[0]):
                continue
            dims = min(self.n_dims, rows.shape[1], len(idx) - 1)
            reduced = PCA(dims, random_state=self.seed).fit_transform(rows) if rows.shape[1] > dims else rows
            km = KMeans(2, n_init=self.n_init, random_state=self.seed).fit(reduced)
            sizes = np.bincount(km.labels_, minlength=2)
            if sizes.min() == 0:
                continue
            small = int(np.argmin(sizes))
            silhouette = float(silhouette_score(reduced, km.labels_, sample_size=min(len(idx), self.silhouette_sample),
                                                random_state=self.seed))
            relative = float(sizes[small] / len(idx))
            poisoned = self._is_poisoned_class(relative, silhouette)
            c_small, c_big = km.cluster_centers_[small], km.cluster_centers_[1 - small]
            axis = c_small - c_big
            d_big = ((reduced - c_big) ** 2).sum(1)
            d_small = ((reduced - c_small) ** 2).sum(1)
            position = (d_big - d_small) / (2 * max(float(axis @ axis), 1e-300))
            scores[idx] = np.tanh(position) + (2.0 if poisoned else 0.0)
            self.decision_[idx] = poisoned & (km.labels_ == small)
            classes[int(c)] = {"relative_size": round(relative, 4), "silhouette": round(silhouette, 4),
                               "poisoned": bool(poisoned)}
        self.details_ = {"classes": classes}
        return scores

    def flag(self, scores: np.ndarray, context: AuditContext) -> np.ndarray:
        """The members of the small cluster of every class judged poisoned."""
        return self.decision_.copy()


@DETECTORS.register("knn-label")
class KNNLabel(Detector):
    """Peri et al. 2020 deep k-NN: a document whose label is not the plurality among its feature-space neighbours.

    Memory is O(N·k): scikit-learn's NearestNeighbors searches in blocks, never an N x N matrix.
    `k` defaults to twice the expected number of poisons per class (at least 5). The score is the
    fraction of neighbours that carry another label.
    """

    needs = frozenset({"features"})
    data_kinds = frozenset({"image"})  # a text corpus has no labels to disagree with
    knowledge = "model"

    def __init__(self, k: int | None = None, metric: str = "euclidean"):
        if k is not None and k < 1:
            raise ValueError("k must be >= 1")
        self.k = k
        self.metric = metric

    def neighbours(self, context: AuditContext) -> int:
        if self.k is not None:
            return self.k
        per_class = context.expected_fraction * len(context) / max(1, context.num_classes)
        return max(5, int(math.ceil(2 * per_class)))

    def score(self, context: AuditContext) -> np.ndarray:
        from sklearn.neighbors import NearestNeighbors

        feats, labels = context.features(), context.labels
        k = min(self.neighbours(context), len(labels) - 1)
        index = NearestNeighbors(n_neighbors=k + 1, metric=self.metric).fit(feats)
        _, nbrs = index.kneighbors(feats)
        nbrs = _drop_self(nbrs)
        neighbour_labels = labels[nbrs]
        agree = (neighbour_labels == labels[:, None]).sum(1)
        counts = np.zeros((len(labels), int(labels.max()) + 1), dtype=np.int64)
        np.add.at(counts, (np.repeat(np.arange(len(labels)), k), neighbour_labels.ravel()), 1)
        self.decision_ = agree < counts.max(1)
        self.details_ = {"k": k}
        return 1.0 - agree / k

    def flag(self, scores: np.ndarray, context: AuditContext) -> np.ndarray:
        return self.decision_.copy()


def _drop_self(nbrs: np.ndarray) -> np.ndarray:
    """Remove each row's own index from its k+1 neighbours (duplicates may list it anywhere, or not at all)."""
    n, width = nbrs.shape
    is_self = nbrs == np.arange(n)[:, None]
    drop = np.where(is_self.any(1), is_self.argmax(1), width - 1)
    keep = np.ones_like(nbrs, dtype=bool)
    keep[np.arange(n), drop] = False
    return nbrs[keep].reshape(n, width - 1)
