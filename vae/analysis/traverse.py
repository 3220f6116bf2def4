"""Latent traversals of a trained two-branch beta-VAE.

* per-dimension sweeps: move one latent dimension over ``anchor +- span x sd``
  with the others fixed, decode image and expression at each step;
* paths between classes: a straight line, or a Gaussian-process path fitted
  through the class centroids in maturation order, from the earliest class
  (myeloblast) to the latest (segmented neutrophil);
* genes ranked by their change along a path (fold change and monotonic trend).

The model only needs the documented API: ``model.decode(z)`` returning an
object with ``image`` (B, 3, S, S), ``mask`` (B, 1, S, S) or None and
``expression_log`` (B, G) (see ``docs/artifacts.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# ----------------------------------------------------------------------------
# decoding
# ----------------------------------------------------------------------------


# a decoded pixel belongs to the cell where the decoded mask probability exceeds this,
# as for the granule counter's cell mask of decoded images (vae.analysis.run.measure)
CELL_MASK_THRESHOLD = 0.5


def cell_masks(masks: np.ndarray) -> np.ndarray:
    """The cell of each decoded mask: probability over :data:`CELL_MASK_THRESHOLD`,
    holes filled.

    A cell's outline encloses no background; a decoded mask sometimes dips under the
    threshold inside the cell (a pale centre), which drew a black hole in the middle of a
    decoded cell (the real chain's path figure, 2026-12-06). 97 % of the real chain's
    training masks hold no hole at all, the rest a few pixels.

    Parameters
    ----------
    masks : (n, S, S) or (S, S) decoded mask probability

    Returns
    -------
    bool array of the same shape
    """
    from scipy import ndimage as ndi

    m = np.asarray(masks) > CELL_MASK_THRESHOLD
    if m.ndim == 2:
        return ndi.binary_fill_holes(m)
    return np.stack([ndi.binary_fill_holes(x) for x in m]) if len(m) else m


def draw_cells(
    images: np.ndarray, masks: np.ndarray | None, background: float | Sequence[float] = 0.0
) -> np.ndarray:
    """Decoded cells as every figure shows cells: the decoded RGB inside the decoded
    cell mask (:func:`cell_masks`: holes filled), ``background`` outside it.

    The one owner of how a decoded cell is drawn (evaluate's reconstructions, the
    traversal strips, ``study.html``, TensorBoard, ``scripts/image_branch_check.py``,
    :meth:`DecodedArrays.cells`). The decoder paints colour over the whole square,
    including a halo where no cell is; the input crops are shown with everything
    outside their mask at 0 (``vae.data.to_batch`` multiplies a crop by its mask), so
    the default background 0 draws decoded cells the way their inputs are drawn.

    Parameters
    ----------
    images : (n, S, S, 3) decoded RGB in [0, 1] (channel-last)
    masks : (n, S, S) decoded mask probability (``model.decode(z).mask``), or None for a
        model without a mask channel (``predict_mask=False``): the images unchanged.
    background : grey level in [0, 1] or an RGB triple for the pixels outside the cell.

    Returns
    -------
    (n, S, S, 3) float in [0, 1]
    """
    img = np.clip(np.asarray(images, dtype=np.float32), 0, 1)
    if masks is None:
        return img
    m = np.asarray(masks)
    if m.shape != img.shape[:-1]:
        raise ValueError(f"draw_cells: masks {m.shape} do not match images {img.shape}")
    bg = np.broadcast_to(np.asarray(background, dtype=np.float32), (3,))
    return np.where(cell_masks(m)[..., None], img, bg).astype(np.float32)


@dataclass
class DecodedArrays:
    """Decoder outputs as NumPy arrays (channel-last images)."""

    images: np.ndarray  # (n, S, S, 3) float in [0, 1], the decoder's RGB over the whole square
    masks: np.ndarray | None  # (n, S, S) probability, or None
    expression: np.ndarray  # (n, G) predicted log1p-normalised expression
    # (n,) the decoded cell's diameter, px of the detector's working frame (a model with a
    # size head, ``vae.size_weight``), else None: the images fill their square whatever
    # the size, so this is the only place the decoded size shows
    diameter: np.ndarray | None = None

    def cells(self, background: float | Sequence[float] = 0.0) -> np.ndarray:
        """(n, S, S, 3) the decoded cells as figures show them (:func:`draw_cells`)."""
        return draw_cells(self.images, self.masks, background)


def image_sources(model) -> list[str]:
    """The image sources ``model``'s decoder reads (``VAEArgs.image_batch_names``, code
    order); [] for a model without them (or without ``args``)."""
    return list(getattr(getattr(model, "args", None), "image_batch_names", None) or [])


def source_code(model, name: str | None, setting: str = "analysis.draw_source") -> int | None:
    """The image source code ``model`` draws ``name`` with (``setting``, named in the
    messages): None for None (the average of the sources).

    Raises
    ------
    ValueError
        ``name`` is not one of the model's sources, or the model has none (it was
        trained without ``vae.image_batch_key``); the message lists what it has.
    """
    if name is None:
        return None
    names = image_sources(model)
    if not names:
        raise ValueError(
            f"{setting}={name!r}: the model has no image sources (trained "
            "without vae.image_batch_key); leave it unset"
        )
    if str(name) not in names:
        raise ValueError(
            f"{setting}={name!r} is not one of the model's image sources: " + ", ".join(names)
        )
    return names.index(str(name))


def decode(
    model,
    z: np.ndarray,
    batch_size: int = 256,
    device: str = "cpu",
    render: bool = True,
    image_batch: np.ndarray | int | None = None,
) -> DecodedArrays:
    """Decode latent codes in batches under ``torch.inference_mode``.

    Parameters
    ----------
    model : module with ``decode(z) -> obj(image, mask, expression_log)``.
    z : (n, d) latent codes; (0, d) gives empty arrays.
    render : a model with a granule, texture or nucleus layer draws the cells (as
        every figure does); False: the decoder's mean image.
    image_batch : (n,) int or int, optional
        Image source code of each row (one int: every row) for a model with image
        sources (``vae.image_batch_key``; -1 unknown, :func:`source_code`); None: every
        cell drawn in the average of the sources. Not passed to a model without sources.
    """
    import torch

    z = np.asarray(z, dtype=np.float32)
    if z.ndim != 2:
        raise ValueError(f"decode: z must be (n, d), got {z.shape}")
    if image_batch is not None and np.ndim(image_batch) == 0:
        image_batch = np.full(len(z), int(image_batch), dtype=np.int64)
    if len(z) == 0:  # empty in, empty out: the shapes of one decoded code
        one = decode(model, np.zeros((1, z.shape[1]), np.float32), batch_size, device, render)
        return DecodedArrays(
            images=one.images[:0],
            masks=None if one.masks is None else one.masks[:0],
            expression=one.expression[:0],
            diameter=None if one.diameter is None else one.diameter[:0],
        )
    imgs, masks, exprs, sizes = [], [], [], []
    # a model with a granule, texture or nucleus layer draws the decoded cells: granules
    # and grain (one noise field for every code, so they stay in place along a path) and
    # a sharp nucleus
    args = getattr(model, "args", None)
    drawn = any(getattr(args, k, False) for k in ("granule_head", "nucleus_head", "texture_head"))
    kw = {"render": True} if drawn and render else {}
    has_sources = bool(image_sources(model))  # else image_batch is not passed on
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(z), batch_size):
            if image_batch is not None and has_sources:
                kw["image_batch"] = torch.from_numpy(
                    np.asarray(image_batch[i : i + batch_size], dtype=np.int64)
                ).to(device)
            dec = model.decode(torch.from_numpy(z[i : i + batch_size]).to(device), **kw)
            # (B, 3, S, S) -> (B, S, S, 3)
            imgs.append(dec.image.float().permute(0, 2, 3, 1).cpu().numpy())
            if dec.mask is not None:
                masks.append(dec.mask.float()[:, 0].cpu().numpy())
            exprs.append(dec.expression_log.float().cpu().numpy())
            if getattr(dec, "size", None) is not None:
                sizes.append(model.diameter_px(dec.size).float().cpu().numpy())
    return DecodedArrays(
        images=np.clip(np.concatenate(imgs), 0, 1),
        masks=np.concatenate(masks) if masks else None,
        expression=np.concatenate(exprs),
        diameter=np.concatenate(sizes) if sizes else None,
    )


# ----------------------------------------------------------------------------
# per-dimension traversals
# ----------------------------------------------------------------------------


def top_dims_by_kl(kl_per_dim: Sequence[float], k: int) -> np.ndarray:
    """Indices of the ``k`` dimensions with the largest KL, largest first."""
    kl = np.asarray(kl_per_dim, dtype=np.float64)
    if kl.ndim != 1 or not np.all(np.isfinite(kl)):
        raise ValueError(f"kl_per_dim must be a finite 1-D array, got {kl!r}")
    return np.argsort(-kl, kind="stable")[: min(k, len(kl))]


def anchor_point(
    z: np.ndarray,
    labels: np.ndarray | None = None,
    cell_ids: np.ndarray | None = None,
    anchor_class: str | None = None,
    anchor_cell: str | None = None,
) -> np.ndarray:
    """The code that traversals start from: one cell, a class mean, or the overall mean.

    Parameters
    ----------
    z : (n, d) latent means.
    labels, cell_ids : (n,) per-row label and id.
    anchor_class : use the mean of rows with this label.
    anchor_cell : use this row (takes precedence).

    Returns
    -------
    (d,) anchor code.
    """
    z = np.asarray(z, dtype=np.float64)
    if anchor_cell is not None:
        ids = np.asarray(cell_ids).astype(str)
        hit = np.flatnonzero(ids == str(anchor_cell))
        if len(hit) == 0:
            raise ValueError(f"anchor_cell={anchor_cell!r} is not a row of the latent table")
        return z[hit[0]]
    if anchor_class is not None:
        lab = np.asarray(labels).astype(str)
        sel = lab == str(anchor_class)
        if not sel.any():
            raise ValueError(
                f"anchor_class={anchor_class!r} not among labels: {sorted({str(x) for x in lab})[:20]}"
            )
        return z[sel].mean(0)
    return z.mean(0)


def nearest_to_mean(z: np.ndarray, candidates: np.ndarray) -> int:
    """Row index (into ``z``, one of ``candidates``) of the code nearest the mean of all
    rows of ``z`` (n, d): a real cell to anchor traversals at, where the mean itself may
    lie between the classes, where no cell is."""
    z = np.asarray(z, dtype=np.float64)
    cand = np.asarray(candidates, dtype=np.int64)
    if cand.size == 0:
        raise ValueError("nearest_to_mean: no candidate rows")
    return int(cand[np.argmin(((z[cand] - z.mean(0)) ** 2).sum(1))])


def sweep_codes(anchor: np.ndarray, dim: int, values: np.ndarray) -> np.ndarray:
    """(n, d) codes of a sweep: ``anchor`` with ``dim`` set to each of ``values``."""
    z = np.repeat(np.asarray(anchor, dtype=np.float64)[None], len(values), 0)
    z[:, dim] = values
    return z


@dataclass
class DimTraversal:
    """One latent dimension swept with the others fixed at the anchor."""

    dim: int
    values: np.ndarray  # (n_steps,) value of z_dim at each step
    offsets: np.ndarray  # (n_steps,) same, in sd units from the anchor
    decoded: DecodedArrays  # n_steps decodings


def supported_range(
    anchor: np.ndarray,
    dim: int,
    sd: np.ndarray,
    z_image: np.ndarray,
    span: float = 3.0,
    k: int = 5,
    quantile: float = 0.99,
    n_grid: int = 121,
) -> tuple[float, float] | None:
    """The stretch of a one-dimension sweep that stays among the crops' codes.

    Moving one latent dim with the others held at the anchor soon leaves the codes any
    crop has (on the demo 5-6 of 9 steps of a +-3 sd sweep did): the decoder then draws
    its extrapolation. This walks ``n_grid`` offsets over ``[-span, span]`` sd and keeps
    the unbroken run of :func:`image_support`-ed ones around the anchor.

    Parameters
    ----------
    anchor : (d,) code the other dims stay at
    dim : the swept dimension
    sd : (d,) scale of each dimension (sd units of the offsets)
    z_image : (m, d) codes of the reference rows with a crop
    span : largest offset tried either way, sd units
    k, quantile : as :func:`image_support`
    n_grid : offsets tried (odd, so 0 is one of them)

    Returns
    -------
    (lo, hi) offsets in sd units, lo <= 0 <= hi, or None when the anchor itself is
    not supported (no stretch to keep).
    """
    grid = np.linspace(-span, span, int(n_grid) | 1)
    mid = len(grid) // 2
    z = sweep_codes(anchor, dim, np.asarray(anchor, np.float64)[dim] + grid * sd[dim])
    ok = image_support(z, z_image, k, quantile).supported
    if not ok[mid]:
        return None
    lo = mid
    while lo > 0 and ok[lo - 1]:
        lo -= 1
    hi = mid
    while hi < len(grid) - 1 and ok[hi + 1]:
        hi += 1
    return float(grid[lo]), float(grid[hi])


def traverse_dims(
    model,
    anchor: np.ndarray,
    dims: Sequence[int],
    sd: np.ndarray,
    span: float = 3.0,
    n_steps: int = 9,
    device: str = "cpu",
    ranges: dict[int, tuple[float, float]] | None = None,
    image_batch: int | None = None,
) -> list[DimTraversal]:
    """Sweep each of ``dims`` over ``anchor[dim] + linspace(-span, span) * sd[dim]``.

    Parameters
    ----------
    model : decodes (see module docstring).
    anchor : (d,) code the others stay at.
    dims : dimensions to sweep.
    sd : (d,) scale of each dimension (e.g. the spread of the latent means).
    span : half-range in sd units.
    n_steps : points per sweep (odd keeps the anchor itself in the middle).
    ranges : dim -> (lo, hi) offsets in sd units that replace ``-span, span`` for that
        dim (e.g. :func:`supported_range`); dims not in it use ``span``.
    image_batch : the image source every step is drawn in (:func:`source_code`); None:
        the average of the sources (a model without sources: ignored).
    """
    anchor = np.asarray(anchor, dtype=np.float64)
    sd = np.asarray(sd, dtype=np.float64)
    if anchor.shape != sd.shape:
        raise ValueError(f"anchor {anchor.shape} and sd {sd.shape} differ")
    out = []
    for dim in dims:
        lo, hi = (ranges or {}).get(int(dim), (-span, span))
        offsets = np.linspace(lo, hi, n_steps)
        z = sweep_codes(anchor, dim, anchor[dim] + offsets * sd[dim])
        out.append(
            DimTraversal(
                dim=int(dim),
                values=z[:, dim].copy(),
                offsets=offsets,
                decoded=decode(model, z, device=device, image_batch=image_batch),
            )
        )
    return out


# ----------------------------------------------------------------------------
# paths through class centroids
# ----------------------------------------------------------------------------


@dataclass
class Centroids:
    """Class centroids of the latent in maturation order."""

    names: list[str]  # classes, earliest first
    points: np.ndarray  # (K, d)
    maturation: np.ndarray  # (K,) mean maturation of each class (NaN if unknown)
    counts: np.ndarray  # (K,) rows per class


def class_centroids(
    z: np.ndarray,
    labels: np.ndarray,
    maturation: np.ndarray | None = None,
    order: Sequence[str] | None = None,
) -> Centroids:
    """Mean code of each class, ordered along maturation.

    Parameters
    ----------
    z : (n, d) latent means.
    labels : (n,) class of each row.
    maturation : (n,) maturation (e.g. simulator t or pseudotime), NaN if unknown.
    order : classes in maturation order. Classes of ``order`` absent from
        ``labels`` are skipped. When None, classes with a known mean
        maturation are sorted by it; classes without one are left out.
    """
    z = np.asarray(z, dtype=np.float64)
    lab = np.asarray(labels).astype(str)
    mat = (
        np.full(len(z), np.nan) if maturation is None else np.asarray(maturation, dtype=np.float64)
    )
    # plain str: numpy 2 prints np.str_('...') in messages; unlabelled rows ("", "nan",
    # :data:`vae.inputs.schema.UNKNOWN_LABELS`) are no class a path can run through
    from vae.inputs.schema import known_labels

    present = {str(x) for x in lab[known_labels(lab)]}
    if order is not None:
        names = [c for c in order if c in present]
    else:
        means = {}
        for c in sorted(present):
            m = mat[lab == c]
            if np.isfinite(m).any():
                means[c] = float(np.nanmean(m))
        names = sorted(means, key=means.get)
    if len(names) < 2:
        raise ValueError(
            f"a path needs at least 2 classes in maturation order; found {names} "
            f"(labels present: {sorted(present)[:20]}; give analysis.path_classes or a "
            f"maturation column)"
        )
    pts, mats, cnt = [], [], []
    for c in names:
        sel = lab == c
        pts.append(z[sel].mean(0))
        m = mat[sel]
        mats.append(float(np.nanmean(m)) if np.isfinite(m).any() else np.nan)
        cnt.append(int(sel.sum()))
    return Centroids(names, np.stack(pts), np.asarray(mats), np.asarray(cnt))


@dataclass
class LatentPath:
    """Points along a path in latent space."""

    kind: str  # "straight" | "gp"
    s: np.ndarray  # (n,) path position in [0, 1]
    points: np.ndarray  # (n, d)
    knots_s: np.ndarray  # (K,) position of each centroid (GP) or of the two ends


def straight_path(start: np.ndarray, end: np.ndarray, n_steps: int) -> LatentPath:
    """``n_steps`` evenly spaced points from ``start`` to ``end`` (both included)."""
    start = np.asarray(start, dtype=np.float64)
    end = np.asarray(end, dtype=np.float64)
    s = np.linspace(0.0, 1.0, n_steps)
    pts = start[None] + s[:, None] * (end - start)[None]
    return LatentPath("straight", s, pts, np.array([0.0, 1.0]))


def gp_path(
    centroids: np.ndarray,
    n_steps: int,
    length_scale: float = 0.3,
    noise: float = 1e-4,
    seed: int = 0,
) -> LatentPath:
    """Smooth path through ordered centroids: a Gaussian process s -> z.

    Each centroid k gets a position s_k in [0, 1] proportional to the
    cumulative chord length between consecutive centroids; a GP with an RBF
    kernel (scikit-learn ``GaussianProcessRegressor``, length scale fitted
    from ``length_scale`` by marginal likelihood) maps s to the code, and is
    evaluated at ``n_steps`` evenly spaced s.

    Parameters
    ----------
    centroids : (K, d) ordered codes, K >= 2.
    n_steps : points on the path.
    length_scale : initial RBF length scale, in units of s.
    noise : GP noise level (small: the path passes close to the centroids).
    """
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import RBF, ConstantKernel

    c = np.asarray(centroids, dtype=np.float64)
    if c.ndim != 2 or len(c) < 2:
        raise ValueError(f"gp_path: need (K >= 2, d) centroids, got {c.shape}")
    seg = np.linalg.norm(np.diff(c, axis=0), axis=1)
    cum = np.r_[0.0, np.cumsum(seg)]
    knots = cum / cum[-1] if cum[-1] > 0 else np.linspace(0, 1, len(c))
    mean = c.mean(0)
    kernel = ConstantKernel(1.0, (1e-3, 1e3)) * RBF(length_scale, (0.05, 10.0))
    gp = GaussianProcessRegressor(
        kernel=kernel, alpha=noise, normalize_y=False, random_state=seed, n_restarts_optimizer=0
    )
    with warnings.catch_warnings():
        # a hyper-parameter at its bound (centroids close together: amplitude at 1e-3) is
        # not a failure here: the path is the GP's posterior mean through the centroids
        warnings.simplefilter("ignore", ConvergenceWarning)
        gp.fit(knots[:, None], c - mean)
    s = np.linspace(0.0, 1.0, n_steps)
    pts = gp.predict(s[:, None]) + mean
    return LatentPath("gp", s, np.asarray(pts), knots)


@dataclass
class PosedCodes:
    """Path steps placed in the poses of real cells (:func:`posed_codes`)."""

    codes: np.ndarray  # (n_steps, k, d) step code + the pose of each of its k nearest cells
    nearest: np.ndarray  # (n_steps, k) row index into the reference cells, nearest first


def posed_codes(
    points: np.ndarray, reported: np.ndarray, single_view: np.ndarray, k: int
) -> PosedCodes:
    """Each path step in the poses of the ``k`` reference cells nearest to it.

    A path step is a mean of pose-free codes (the reported latent averages the
    image expert over the crop's 8 symmetries), and the decoder draws such a code
    in an average pose: the nucleus of a band or a segmented neutrophil turns into a
    ring, the lobes the path is about are gone. A cell's *pose* is the part of its
    single-view code the symmetry average removes, ``single_view - reported``; adding
    it to a step decodes the step's cell in that real cell's orientation. The
    nearest cells (Euclidean, in the reported latent) lend their pose, so a step is
    drawn in poses that cells of its own kind take.

    Parameters
    ----------
    points : (n_steps, d) path codes (pose-free, as the reported latent).
    reported : (m, d) reported (pose-free) codes of the reference cells.
    single_view : (m, d) the same cells' codes from their crop as given (one view).
    k : poses per step, 1 <= k; at most ``m`` are used.

    Returns
    -------
    PosedCodes with ``codes`` (n_steps, min(k, m), d).
    """
    from scipy.spatial.distance import cdist

    pts = np.asarray(points, dtype=np.float64)
    rep = np.asarray(reported, dtype=np.float64)
    one = np.asarray(single_view, dtype=np.float64)
    if rep.shape != one.shape or rep.ndim != 2 or pts.ndim != 2 or pts.shape[1] != rep.shape[1]:
        raise ValueError(
            f"posed_codes: points {pts.shape}, reported {rep.shape} and single_view "
            f"{one.shape} must be (n, d), (m, d), (m, d)"
        )
    if k < 1 or len(rep) == 0:
        raise ValueError(f"posed_codes: need k >= 1 and reference cells (k={k}, m={len(rep)})")
    k = min(int(k), len(rep))
    nearest = np.argsort(cdist(pts, rep), axis=1, kind="stable")[:, :k]  # (n, k)
    pose = one - rep  # (m, d)
    return PosedCodes(pts[:, None, :] + pose[nearest], nearest)


# rows of project_onto_path's distance matrix held at once: 8192 x 200 float64 = 12.5 MiB
PATH_ROWS = 8192


def project_onto_path(z: np.ndarray, path: LatentPath, n_dense: int = 200) -> np.ndarray:
    """Position in [0, 1] of the nearest point of ``path`` to each code.

    The path is linearly interpolated to ``n_dense`` points first.

    Returns
    -------
    (m,) path positions.
    """
    from scipy.spatial.distance import cdist

    z = np.asarray(z, dtype=np.float64)
    sd = np.linspace(0, 1, n_dense)
    dense = np.stack([np.interp(sd, path.s, path.points[:, j]) for j in range(z.shape[1])], 1)
    # PATH_ROWS rows at a time: the (n, n_dense) float64 distances of every row at once
    # were 320 MB at 200k cells; each row's position is the same
    out = np.empty(z.shape[0], sd.dtype)
    for i in range(0, z.shape[0], PATH_ROWS):
        out[i : i + PATH_ROWS] = sd[np.argmin(cdist(z[i : i + PATH_ROWS], dense), axis=1)]
    return out


@dataclass
class ImageSupport:
    """How near each latent point lies to codes the image decoder was trained on.

    distance : (n,) mean Euclidean distance to the ``k`` nearest reference codes
    threshold : the ``quantile`` of the reference codes' own distances to their ``k``
        nearest other reference codes (the spread of the data itself)
    supported : (n,) bool, ``distance <= threshold``
    """

    distance: np.ndarray
    threshold: float
    supported: np.ndarray


def image_support(
    points: np.ndarray, z_image: np.ndarray, k: int = 5, quantile: float = 0.99
) -> ImageSupport:
    """Whether decoded cells at ``points`` are drawn where crops were seen.

    A point of a path through classes that have no crops (e.g. expression-only
    progenitors on real data) is decoded by extrapolation: the image there is the
    decoder's guess, not a cell it learned. The point is *supported* when its mean
    distance to the ``k`` nearest codes of rows with a crop is no larger than what
    ``quantile`` of those rows have to their own ``k`` nearest neighbours.

    Parameters
    ----------
    points : (n, d) latent points (e.g. ``LatentPath.points``)
    z_image : (m, d) codes of the reference rows that have a crop (training rows)
    k : neighbours averaged (capped at ``m - 1``)
    quantile : in (0, 1]; the reference rows' own neighbour distance at this quantile
        is the threshold

    Returns
    -------
    :class:`ImageSupport`; every point unsupported when fewer than 2 reference codes; a
    point with a NaN coordinate unsupported, its distance NaN.
    """
    from sklearn.neighbors import NearestNeighbors

    pts = np.asarray(points, dtype=np.float64)
    ref = np.asarray(z_image, dtype=np.float64)
    ref = ref[np.isfinite(ref).all(1)] if ref.ndim == 2 else ref.reshape(0, pts.shape[1])
    if not 0 < quantile <= 1:
        raise ValueError(f"image_support: quantile must be in (0, 1]; got {quantile}")
    if ref.shape[0] < 2:
        return ImageSupport(np.full(len(pts), np.inf), float("nan"), np.zeros(len(pts), bool))
    kk = max(1, min(int(k), ref.shape[0] - 1))
    nn = NearestNeighbors(n_neighbors=kk + 1).fit(ref)
    own = nn.kneighbors(ref)[0][:, 1:].mean(1)  # column 0 is the row itself
    thr = float(np.quantile(own, quantile))
    # a point without a code (NaN: e.g. a cell lacking that modality) is not supported
    ok = np.isfinite(pts).all(1) if len(pts) else np.zeros(0, bool)
    dist = np.full(len(pts), np.nan)
    if ok.any():
        dist[ok] = nn.kneighbors(pts[ok], n_neighbors=kk)[0].mean(1)
    return ImageSupport(dist, thr, ok & (np.nan_to_num(dist, nan=np.inf) <= thr))


@dataclass
class NeighbourLabels:
    """What the training crops nearest each latent point are.

    label : (n,) str, the commonest label among the ``k`` nearest labelled crops
        (ties: the nearer crop's label); "" when no reference crop is labelled
    share : (n,) float in [0, 1], that label's share of the ``k``
    votes : (n,) str, every label among the ``k`` with its count, commonest first
        (e.g. "Neutrophils 2, eosinophil 1, Basophils 1, lymphocyte 1"); "" as ``label``
    """

    label: np.ndarray
    share: np.ndarray
    votes: np.ndarray | None = None


def neighbour_labels(
    points: np.ndarray, z_image: np.ndarray, labels: np.ndarray, k: int = 5
) -> NeighbourLabels:
    """The labels of the training crops a decoded step is drawn from.

    A path step's picture is learned from the crops around it. On real data the
    path may start at a class with no crops (expression-only progenitors): its
    drawn cell is then whatever crops lie nearest, e.g. neutrophils, and this says
    which. Distances (:func:`image_support`) cannot tell, because the shared code
    places each class centroid among the crops.

    Parameters
    ----------
    points : (n, d) latent points
    z_image : (m, d) codes of the reference crops (training rows with a crop)
    labels : (m,) their labels; rows without a class
        (:data:`vae.inputs.schema.UNKNOWN_LABELS`) are left out
    k : neighbours voted (capped at the number of labelled crops)

    Returns
    -------
    :class:`NeighbourLabels`
    """
    from sklearn.neighbors import NearestNeighbors

    from vae.inputs.schema import known_labels

    pts = np.asarray(points, dtype=np.float64)
    ref = np.asarray(z_image, dtype=np.float64)
    lab = np.asarray(labels).astype(str)
    if ref.shape[0] != lab.shape[0]:
        raise ValueError(f"neighbour_labels: {ref.shape[0]} codes but {lab.shape[0]} labels")
    keep = np.asarray(known_labels(lab), bool)
    if ref.ndim == 2 and ref.shape[0]:
        keep &= np.isfinite(ref).all(1)
    ref, lab = ref[keep], lab[keep]
    n = len(pts)
    if not len(ref) or not n:
        return NeighbourLabels(
            np.full(n, "", dtype=object), np.zeros(n), np.full(n, "", dtype=object)
        )
    kk = max(1, min(int(k), len(ref)))
    idx = NearestNeighbors(n_neighbors=kk).fit(ref).kneighbors(pts)[1]  # nearest first
    out_lab = np.empty(n, dtype=object)
    out_share = np.zeros(n)
    out_votes = np.empty(n, dtype=object)
    for i, row in enumerate(lab[idx]):
        names, first, counts = np.unique(row, return_index=True, return_counts=True)
        order = sorted(range(len(names)), key=lambda j: (-counts[j], first[j]))
        best = order[0]
        out_lab[i], out_share[i] = names[best], counts[best] / kk
        out_votes[i] = ", ".join(f"{names[j]} {counts[j]}" for j in order)
    return NeighbourLabels(out_lab, out_share, out_votes)


def fade_unsupported(images: np.ndarray, supported: np.ndarray, keep: float = 0.35) -> np.ndarray:
    """Images of unsupported steps blended towards white (``keep`` of the image left),
    (n, S, S, 3) float in [0, 1]; supported ones unchanged."""
    out = np.array(images, dtype=np.float64, copy=True)
    sel = ~np.asarray(supported, bool)
    out[sel] = keep * out[sel] + (1.0 - keep)
    return out


# ----------------------------------------------------------------------------
# genes along a path
# ----------------------------------------------------------------------------


def rank_genes(
    expression_log: np.ndarray,
    genes: Sequence[str],
    s: np.ndarray | None = None,
    programs: dict[str, list[str]] | None = None,
):
    """Rank genes by their change along a path.

    Parameters
    ----------
    expression_log : (n_steps, G) decoded log1p-normalised expression along the path.
    genes : (G,) gene names.
    s : (n_steps,) path positions (default: the step index).
    programs : program -> genes, to annotate each gene's program (case-insensitive).

    Returns
    -------
    pandas.DataFrame sorted by ``score`` (descending), columns: ``gene``,
    ``program``, ``log2fc`` (log2 of (end + 1) / (start + 1) on the
    normalised scale), ``spearman`` (monotonic trend with s), ``peak_s``
    (position of the maximum), ``start``, ``end``, ``range`` (max - min of
    log1p values), ``score`` = |spearman| x |log2fc|.
    """
    import pandas as pd
    from scipy import stats

    x = np.asarray(expression_log, dtype=np.float64)
    genes = [str(g) for g in genes]
    if x.ndim != 2 or x.shape[1] != len(genes):
        raise ValueError(f"rank_genes: expression {x.shape} does not match {len(genes)} genes")
    s = np.arange(len(x), dtype=np.float64) if s is None else np.asarray(s, dtype=np.float64)
    lin = np.expm1(np.clip(x, 0, None))
    log2fc = np.log2((lin[-1] + 1) / (lin[0] + 1))
    rho = np.full(x.shape[1], np.nan)
    for g in range(x.shape[1]):
        if np.ptp(x[:, g]) > 0:
            rho[g] = stats.spearmanr(s, x[:, g]).statistic
    prog_of = {}
    for p, gl in (programs or {}).items():
        for g in gl:
            prog_of[str(g).upper()] = p
    df = pd.DataFrame(
        {
            "gene": genes,
            "program": [prog_of.get(g.upper(), "") for g in genes],
            "log2fc": log2fc,
            "spearman": rho,
            "peak_s": s[np.argmax(x, axis=0)],
            "start": x[0],
            "end": x[-1],
            "range": np.ptp(x, axis=0),
            "score": np.nan_to_num(np.abs(rho)) * np.abs(log2fc),
        }
    )
    return df.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)


def match_genes(genes: Sequence[str], wanted: Sequence[str]) -> list[int]:
    """Indices of ``wanted`` genes in ``genes`` (case-insensitive, order of ``wanted``)."""
    upper = {str(g).upper(): i for i, g in enumerate(genes)}
    return [upper[w.upper()] for w in wanted if w.upper() in upper]


def program_scores(
    expression_log: np.ndarray, genes: Sequence[str], programs: dict[str, list[str]]
) -> dict[str, np.ndarray]:
    """Mean log1p expression of each program's genes per row; programs with no match skipped."""
    x = np.asarray(expression_log, dtype=np.float64)
    out = {}
    for p, gl in programs.items():
        idx = match_genes(genes, gl)
        if idx:
            out[p] = x[:, idx].mean(1)
    return out
