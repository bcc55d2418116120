"""Duplicate detection, cheapest first: exact (normalised hash), near (MinHash/LSH), semantic (embeddings).

Every detector keeps the first occurrence (lowest index) and reports each later copy with the
index it duplicates and the similarity that convicted it, so a report can say "duplicate of #17".

- Exact: NFKC, lower case, whitespace collapsed; blake2b of prompt + response.
- Near: word 3-gram shingles; MinHash (datasketch, 128 permutations) into an LSH index whose
  threshold sits 0.1 below the verification threshold (recall), then every candidate pair is
  verified by the *exact* Jaccard of the two shingle sets, so a pair is only called a duplicate if
  its true Jaccard ≥ `threshold` (default 0.8). One streaming pass: each text is compared with the
  texts kept before it, then inserted; memory is the LSH index (~1 KB per kept text).
- Semantic (SemDeDup, Abbas et al. 2023): within each k-means cluster of the normalised
  embeddings, a text whose cosine to an earlier kept text of the same cluster is ≥ `threshold`
  is a duplicate. Comparing inside clusters keeps the cost near n·(cluster size) instead of n²;
  pairs split across two clusters are missed (the paper's trade-off too).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Iterable, Sequence

import numpy as np

from unitrain.errors import MissingPackageError

_WS = re.compile(r"\s+")
_NON_WORD = re.compile(r"[^\w]+")


def normalize_text(s: str) -> str:
    return _WS.sub(" ", unicodedata.normalize("NFKC", s).lower()).strip()


def exact_duplicates(texts: Iterable[tuple[int, str]]) -> dict[int, int]:
    """{index: index of its first occurrence} for every repeat among (index, text) pairs."""
    first: dict[bytes, int] = {}
    dups = {}
    for i, t in texts:
        key = hashlib.blake2b(normalize_text(t).encode("utf-8"), digest_size=16).digest()
        if key in first:
            dups[i] = first[key]
        else:
            first[key] = i
    return dups


def shingles(text: str, n: int = 3) -> set[str]:
    """Word n-grams of the text with punctuation dropped; a text shorter than n words is one shingle."""
    words = _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).lower()).split()
    if len(words) <= n:
        return {" ".join(words)}
    return {" ".join(words[k:k + n]) for k in range(len(words) - n + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def near_duplicates(texts: Iterable[tuple[int, str]], *, threshold: float = 0.8, num_perm: int = 128,
                    seed: int = 1) -> dict[int, tuple[int, float]]:
    """{index: (kept index it duplicates, exact Jaccard)} for texts whose shingle Jaccard ≥ threshold."""
    try:
        from datasketch import MinHash, MinHashLSH
    except ImportError:
        raise MissingPackageError("datasketch", "Near-duplicate detection (MinHash)", extra="select") from None
    lsh = MinHashLSH(threshold=max(0.3, threshold - 0.1), num_perm=num_perm)
    template = MinHash(num_perm=num_perm, seed=seed)
    kept_text: dict[int, str] = {}
    dups = {}
    for i, t in texts:
        sh = shingles(t)
        m = template.copy()
        m.update_batch([s.encode("utf-8") for s in sh])
        best, best_j = None, 0.0
        for j in sorted(lsh.query(m)):  # sorted: ties resolve to the earliest text, run to run
            jac = jaccard(sh, shingles(kept_text[j]))
            if jac > best_j:
                best, best_j = j, jac
        if best is not None and best_j >= threshold:
            dups[i] = (best, best_j)
        else:
            lsh.insert(i, m)
            kept_text[i] = t
    return dups


def embedding_duplicates(emb: np.ndarray, labels: np.ndarray, *, threshold: float = 0.95,
                         block: int = 2048) -> dict[int, tuple[int, float]]:
    """{row: (earlier kept row, cosine)} inside each cluster; rows of `emb` are L2-normalised.

    Rows are visited in index order per cluster; a row is a duplicate if its best cosine with the
    rows kept so far in its cluster is ≥ threshold. Similarities are computed `block` rows at a
    time against the cluster, so memory stays at block × cluster size floats.
    """
    dups = {}
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < 2:
            continue
        x = emb[members]
        kept = np.ones(len(members), dtype=bool)
        for b0 in range(0, len(members), block):
            sims = x[b0:b0 + block] @ x.T  # (block × m)
            for r in range(sims.shape[0]):
                k = b0 + r
                if k == 0:
                    continue
                prev = sims[r, :k] * kept[:k] - 2.0 * (~kept[:k])  # dropped rows can't convict
                j = int(np.argmax(prev))
                if prev[j] >= threshold:
                    kept[k] = False
                    dups[int(members[k])] = (int(members[j]), float(prev[j]))
    return dups


def cluster(emb: np.ndarray, *, n_clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """k-means labels and each row's cosine distance to its centroid (Sorscher et al.'s prototype metric)."""
    try:
        from sklearn.cluster import KMeans  # installed with sentence-transformers (the `select` extra)
    except ImportError:
        raise MissingPackageError("scikit-learn", "Clustering embeddings for data selection", extra="select") from None

    n_clusters = max(1, min(n_clusters, len(emb)))
    km = KMeans(n_clusters=n_clusters, n_init=1, max_iter=50, random_state=seed).fit(emb)
    centers = km.cluster_centers_ / np.maximum(np.linalg.norm(km.cluster_centers_, axis=1, keepdims=True), 1e-12)
    dist = 1.0 - np.einsum("ij,ij->i", emb, centers[km.labels_])
    return km.labels_.astype(np.int64), dist.astype(np.float32)


def default_n_clusters(n: int) -> int:
    """√n clusters (≥ 1, ≤ 1000): ~√n members each, so within-cluster dedup costs ~n^1.5 dot products."""
    return int(max(1, min(1000, round(np.sqrt(n)))))


def pair_similarity(texts: Sequence[str], i: int, j: int) -> float:
    """Exact shingle Jaccard of two texts (for reports and tests)."""
    return jaccard(shingles(texts[i]), shingles(texts[j]))
