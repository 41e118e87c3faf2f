"""FeatInv-Viz (spec §10.9, §10.10) as pure functions: concept parts of feature maps, attenuation, heat
maps, interpolation and spatial composition. No Ray, no models: `viz_stage.py` runs them with FeatInv.

Concepts. FeatInv-Viz splits each feature vector φ (the C-vector at one position of a map) into parts
φ = Σ_i P_i φ + P_rest φ, projections onto mutually orthogonal linear subspaces: one per concept and
their orthogonal complement (the remainder). The paper finds the subspaces with MCD (multi-dimensional
concept discovery, Vielhaben et al. 2023), which is in neither code base. `decompose` is a documented,
reproducible stand-in — subspace clustering of the feature vectors:

1. every vector of every map, (N, C), divided by its L2 norm (zero vectors are left out): concepts are
   directions, so a vector's magnitude does not decide its cluster;
2. k-means with k = n_concepts (`scipy.cluster.vq.kmeans2`, k-means++ initialisation from
   `numpy.random.default_rng(seed)`); clusters are ordered by size, largest first (ties: the cluster of
   the earliest vector first), so concept 0 is the most common direction;
3. per cluster, the top-`rank` right singular vectors of its (uncentred) unit vectors: the linear
   subspace through the origin that holds most of the cluster's energy;
4. `orthonormalise`: a QR factorisation of the stacked bases in concept order, so concept i keeps the
   directions of its subspace not already in concepts 0..i−1 (Gram–Schmidt order). The subspaces are
   then mutually orthogonal and the parts sum exactly to φ.

What it is not: MCD clusters with sparse subspace clustering and picks each subspace's dimension
from the data; here k and the rank are given and the clustering is k-means on directions.

User bases (`load_concepts`): a `.npy` holding (n_concepts, rank, C) or (n_concepts, C) (rank 1), or
a `.safetensors` file holding one such tensor, or one (rank_i, C) or (C,) tensor per concept (in the
order of their names); they go through the same `orthonormalise`.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

UNAFFECTED_BELOW = 0.33  # the paper's display threshold on the normalised heat map


@dataclass(frozen=True)
class Concepts:
    """Mutually orthogonal concept subspaces of R^C: `bases[i]` is (rank_i, C) with orthonormal rows."""

    bases: tuple[np.ndarray, ...]

    @property
    def channels(self) -> int:
        return self.bases[0].shape[1]

    def __len__(self) -> int:
        return len(self.bases)

    def stacked(self) -> np.ndarray:
        """(Σ rank_i, C): every basis vector, concept after concept (what `concepts.npy` holds when ranks are equal)."""
        return np.concatenate(self.bases)


def orthonormalise(bases: Sequence[np.ndarray], what: str = "concept bases") -> Concepts:
    """Mutually orthogonal, orthonormal bases spanning, concept by concept, what each adds to the earlier
    ones (QR of the stacked bases in order). A concept whose vectors lie (numerically) in the span of
    the earlier ones is an error: it would get no subspace."""
    bases = [np.atleast_2d(np.asarray(b, np.float64)) for b in bases]
    if not bases or any(b.ndim != 2 or b.shape[0] == 0 for b in bases):
        raise ValueError(f"{what}: expected one or more (rank, C) bases, got shapes {[b.shape for b in bases]}")
    channels = bases[0].shape[1]
    if any(b.shape[1] != channels for b in bases):
        raise ValueError(f"{what}: the bases have different dimensions {[b.shape[1] for b in bases]}")
    ranks = [b.shape[0] for b in bases]
    if sum(ranks) > channels:
        raise ValueError(f"{what}: {sum(ranks)} basis vectors in total cannot be orthogonal in dimension {channels}")
    q, r = np.linalg.qr(np.concatenate(bases).T)  # columns of q: Gram–Schmidt of the vectors in order
    scale = np.abs(np.diag(r))
    norms = np.linalg.norm(np.concatenate(bases), axis=1)
    starts = np.cumsum([0, *ranks])
    for i in range(len(bases)):
        block = slice(starts[i], starts[i + 1])
        # A vector that adds (almost) nothing new: its R diagonal is tiny relative to its own length.
        if np.any(scale[block] <= 1e-8 * np.maximum(norms[block], 1e-300)):
            raise ValueError(f"{what}: concept {i} is (nearly) linearly dependent on itself or on concepts 0..{i - 1}")
    return Concepts(tuple(q[:, starts[i]:starts[i + 1]].T.copy() for i in range(len(bases))))


def feature_vectors(maps: np.ndarray) -> np.ndarray:
    """(N, C, H, W) maps -> (N·H·W, C): the vector at every position of every map."""
    maps = np.asarray(maps)
    return maps.transpose(0, 2, 3, 1).reshape(-1, maps.shape[1])


def decompose(vectors: np.ndarray, n_concepts: int, rank: int, seed: int = 0) -> Concepts:
    """Concept subspaces of (N, C) feature vectors by k-means on their directions + per-cluster SVD
    (the module docstring has the algorithm)."""
    from scipy.cluster.vq import ClusterError, kmeans2

    vectors = np.asarray(vectors, np.float64)
    norms = np.linalg.norm(vectors, axis=1)
    units = vectors[norms > 0] / norms[norms > 0, None]
    if n_concepts * rank > vectors.shape[1]:
        raise ValueError(f"n_concepts × rank = {n_concepts} × {rank} exceeds the {vectors.shape[1]} channels")
    if len(units) < n_concepts:
        raise ValueError(f"{len(units)} non-zero feature vectors cannot form {n_concepts} concepts (n_concepts)")
    try:
        _, labels = kmeans2(units, n_concepts, iter=50, minit="++", missing="raise", rng=np.random.default_rng(seed))
    except ClusterError as e:
        raise ValueError(f"k-means with n_concepts={n_concepts} left a cluster empty ({e}): use fewer concepts "
                         "or another seed") from None
    first = {c: int(np.argmax(labels == c)) for c in range(n_concepts)}
    order = sorted(range(n_concepts), key=lambda c: (-int(np.sum(labels == c)), first[c]))
    bases = []
    for c in order:
        members = units[labels == c]
        if len(members) < rank:
            raise ValueError(f"concept cluster of {len(members)} feature vectors cannot span rank {rank} (rank)")
        bases.append(np.linalg.svd(members, full_matrices=False)[2][:rank])
    return orthonormalise(bases, "decomposition")


def load_concepts(data: bytes, name: str, channels: int) -> Concepts:
    """User concept bases from the bytes of a `.npy` or `.safetensors` file called `name` (see the module
    docstring for the layouts), checked against the layer's `channels`."""
    if name.endswith(".npy"):
        array = np.load(io.BytesIO(data), allow_pickle=False)  # no pickles: a bases file runs no code
        bases = list(array[:, None, :] if array.ndim == 2 else array) if array.ndim in (2, 3) else [array]
    elif name.endswith(".safetensors"):
        from safetensors.numpy import load

        tensors = load(data)
        if len(tensors) == 1 and next(iter(tensors.values())).ndim == 3:
            bases = list(next(iter(tensors.values())))
        else:
            bases = [np.atleast_2d(tensors[k]) for k in sorted(tensors)]
    else:
        raise ValueError(f"concept bases {name}: expected a .npy or .safetensors file")
    if not bases or any(b.ndim != 2 for b in bases):
        raise ValueError(f"concept bases {name}: expected (n_concepts, rank, C) or (n_concepts, C), "
                         f"got bases of shapes {[b.shape for b in bases]}")
    found = {b.shape[1] for b in bases}
    if found != {channels}:
        raise ValueError(f"concept bases {name} have dimension {sorted(found)}, but the layer's feature vectors "
                         f"have {channels} channels")
    return orthonormalise(bases, f"concept bases {name}")


def parts(phi: np.ndarray, concepts: Concepts) -> np.ndarray:
    """φ (..., C, H, W) -> (n_concepts + 1, ..., C, H, W): P_i φ for each concept, then the remainder
    φ − Σ_i P_i φ (the projection onto the orthogonal complement), at every position."""
    phi = np.asarray(phi, np.float64)
    if phi.ndim < 3 or phi.shape[-3] != concepts.channels:
        raise ValueError(f"feature map of shape {phi.shape}: expected (..., {concepts.channels}, H, W)")
    out = [np.einsum("rc,...chw,rd->...dhw", b, phi, b) for b in concepts.bases]  # B^T B φ per position
    out.append(phi - np.sum(out, axis=0))
    return np.stack(out)


def attenuate(phi: np.ndarray, concepts: Concepts, concept: int, factor: float = 0.25) -> np.ndarray:
    """φ' = Σ_{i≠c} P_i φ + P_rest φ + factor·P_c φ at every position (the paper: factor 0.25)."""
    if not 0 <= concept < len(concepts):
        raise ValueError(f"concept {concept}: there are {len(concepts)} concepts")
    split = parts(phi, concepts)
    return split.sum(axis=0) - (1 - factor) * split[concept]


def heat_map(recon_a: Sequence[np.ndarray], recon_b: Sequence[np.ndarray],
             threshold: float = UNAFFECTED_BELOW) -> tuple[np.ndarray, np.ndarray]:
    """Where two sets of reconstructions (uint8 (S, S, 3), the same seeds in the same order) differ.

    Per seed i: Δ_i = √Σ_RGB (a_i − b_i)² per pixel; then the per-pixel median over seeds (numpy's:
    the mean of the two middle values for an even count), min–max normalised to [0, 1]. Returns
    (heat (S, S) float, unaffected (S, S) bool: heat < threshold). When every pixel has the same
    median distance (max = min, e.g. nothing changed) the heat map is all zero and every pixel is
    unaffected: no pixel changed more than another."""
    if len(recon_a) != len(recon_b) or not recon_a:
        raise ValueError(f"heat_map: expected the same non-zero number of images per side, got {len(recon_a)} "
                         f"and {len(recon_b)}")
    shapes = {np.shape(x) for x in (*recon_a, *recon_b)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3 or next(iter(shapes))[-1] != 3:
        raise ValueError(f"heat_map: expected RGB images (S, S, 3) of one shape, got shapes {sorted(shapes)}")
    median = np.median(np.stack([pixel_distance(a, b) for a, b in zip(recon_a, recon_b, strict=True)]), axis=0)
    low, high = median.min(), median.max()
    heat = np.zeros_like(median) if high == low else (median - low) / (high - low)
    return heat, heat < threshold


def interpolate(phi_a: np.ndarray, phi_b: np.ndarray, alpha: float) -> np.ndarray:
    """φ_α = (1 − α)·φ_A + α·φ_B, α in [0, 1] (α = 0 gives φ_A and α = 1 gives φ_B exactly)."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha={alpha}: must lie in [0, 1]")
    if np.shape(phi_a) != np.shape(phi_b):
        raise ValueError(f"interpolate: maps of shapes {np.shape(phi_a)} and {np.shape(phi_b)}")
    return (1 - alpha) * phi_a + alpha * phi_b


def check_region(region: Sequence[int], grid: tuple[int, int], what: str = "region") -> tuple[int, int, int, int]:
    """(row0, row1, col0, col1), half-open, non-empty and inside a (H, W) feature grid; else ValueError."""
    if len(region) != 4:
        raise ValueError(f"{what} {list(region)}: expected [row0, row1, col0, col1]")
    r0, r1, c0, c1 = (int(v) for v in region)
    h, w = grid
    if not (0 <= r0 < r1 <= h and 0 <= c0 < c1 <= w):
        raise ValueError(f"{what} {[r0, r1, c0, c1]} (rows [row0, row1), columns [col0, col1)) is empty or outside "
                         f"the {h}×{w} feature grid")
    return r0, r1, c0, c1


def central_region(grid: tuple[int, int]) -> tuple[int, int, int, int]:
    """The default composition region: the central half of each axis, [⌊H/4⌋, H − ⌊H/4⌋) (and the same for W)."""
    h, w = grid
    return h // 4, h - h // 4, w // 4, w - w // 4


def compose(phi_a: np.ndarray, phi_b: np.ndarray, region: Sequence[int]) -> np.ndarray:
    """A (C, H, W) map that is φ_A with `region` (row0, row1, col0, col1; feature grid, half-open) taken from φ_B."""
    if np.shape(phi_a) != np.shape(phi_b) or np.ndim(phi_a) != 3:
        raise ValueError(f"compose: expected two (C, H, W) maps of one shape, got {np.shape(phi_a)} and {np.shape(phi_b)}")
    r0, r1, c0, c1 = check_region(region, np.shape(phi_a)[1:])
    out = np.array(phi_a, copy=True)
    out[:, r0:r1, c0:c1] = phi_b[:, r0:r1, c0:c1]
    return out


def region_pixels(region: Sequence[int], grid: tuple[int, int], size: int) -> np.ndarray:
    """(size, size) bool: the pixels of a size×size image whose centre falls in the grid region (pixel
    (y, x) covers grid coordinates ((y + ½)·H/size, (x + ½)·W/size))."""
    r0, r1, c0, c1 = check_region(region, grid)
    rows = (np.arange(size) + 0.5) * grid[0] / size
    cols = (np.arange(size) + 0.5) * grid[1] / size
    return ((rows >= r0) & (rows < r1))[:, None] & ((cols >= c0) & (cols < c1))[None, :]


def pixel_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-pixel Euclidean RGB distance of two uint8 (S, S, 3) images, on the 0–255 scale."""
    return np.sqrt(((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2).sum(-1))


def region_influence(composed: Sequence[np.ndarray], base: Sequence[np.ndarray], inside: np.ndarray) -> dict[str, float]:
    """The mean per-pixel RGB distance between reconstructions of the composed map and of A (same seeds),
    over all seeds, inside the region's pixels and outside them (None where there are no such pixels)."""
    distance = np.stack([pixel_distance(c, b) for c, b in zip(composed, base, strict=True)])

    def mean(where: np.ndarray) -> float | None:
        return float(distance[:, where].mean()) if where.any() else None

    return {"change_inside": mean(inside), "change_outside": mean(~inside)}
