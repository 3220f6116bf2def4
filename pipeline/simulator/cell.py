"""One white cell drawn in optical-density space: nucleus skeleton, chromatin, granules.

Used by :mod:`pipeline.simulator.render`, which places the cells on a smear.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pipeline.simulator.morphology import (
    Morphology,
)


def rgb_to_od(rgb: tuple[float, ...]) -> np.ndarray:
    """Optical density (3,) of a transmitted RGB colour (0-255, on white)."""
    c = np.clip(np.asarray(rgb, dtype=np.float64), 1.0, 255.0) / 255.0
    return -np.log(c)


# ----------------------------------------------------------------------------
# one white cell
# ----------------------------------------------------------------------------


@dataclass
class CellPatch:
    """A white cell drawn on a square patch centred on the cell centre.

    ``alpha`` (S, S) coverage in [0, 1]; ``od`` (S, S, 3) optical density;
    ``mask``/``nucleus`` (S, S) bool; ``half`` = (S - 1) / 2 so that patch
    pixel (i, j) sits at image (cy - half + i, cx - half + j).
    """

    alpha: np.ndarray
    od: np.ndarray
    mask: np.ndarray
    nucleus: np.ndarray
    half: int
    # large dark azurophilic granules actually drawn (a Poisson draw around the density's
    # expectation): what a perfect granule counter would read off the image
    azurophilic_granules: int = 0


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-sd, spatially correlated noise (Gaussian-filtered white noise)."""
    n = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    sd = n.std()
    return n / sd if sd > 0 else n


@dataclass
class NucleusSkeleton:
    """The nucleus as a union of discs, in px relative to the cell centre.

    ``points`` (P, 2) as (x, y), ``radii`` (P,), ``lobe`` (P,) the lobe of each
    disc (all 0 for a single nucleus), ``centres`` (L, 2) lobe centres.
    """

    points: np.ndarray
    radii: np.ndarray
    lobe: np.ndarray
    centres: np.ndarray

    @property
    def n_lobes(self) -> int:
        return len(self.centres)


# lobes closer than this (px, edge to edge) could merge in an 8-connected mask
MIN_LOBE_GAP = 2.5


def _nucleus_skeleton(m: Morphology, rc: float, rng: np.random.Generator) -> NucleusSkeleton:
    """Discs whose union is the nucleus of ``m`` in a cell of radius ``rc``.

    A single nucleus is a tube along an arc (round -> kidney -> band as the
    arc angle grows and the tube thins). A lobed nucleus is ``m.lobes``
    slightly elongated lobes along an arc, each at least
    :data:`MIN_LOBE_GAP` px from every other.
    """
    area = m.nucleus_fraction * math.pi * rc**2
    r_eq = math.sqrt(area / math.pi)
    rot = rng.uniform(0, 2 * math.pi)
    if m.lobes == 1:
        w = m.width_ratio * r_eq
        length = max(0.0, (area - math.pi * w**2) / (2 * w))
        span = math.radians(m.span_deg) * rng.uniform(0.92, 1.08)
        s = np.linspace(0.0, 1.0, 32)
        if span > 1e-3 and length > 0:
            radius = length / span
            phi = -span / 2 + s * span
            pts = np.stack([radius * np.cos(phi), radius * np.sin(phi)], axis=1)
        else:
            pts = np.stack([(s - 0.5) * length, np.zeros_like(s)], axis=1)
        # slightly tapered ends for kidney/band shapes
        radii = w * (1.0 - 0.12 * np.abs(2 * s - 1) ** 2 * min(1.0, span / math.pi))
        lobe = np.zeros(len(s), dtype=int)
    else:
        n = m.lobes
        # each lobe: 3 discs along the arc tangent -> half-length 1.3 w, half-width 0.85 w
        w_l = math.sqrt(area / (n * math.pi * 1.1))
        size = w_l * rng.uniform(0.9, 1.1, size=n)
        gap = max(MIN_LOBE_GAP + 0.5, 0.25 * w_l)
        chords = 1.3 * (size[:-1] + size[1:]) + gap
        span = math.radians(min(75.0 * (n - 1), 250.0))
        radius = float(np.median(chords)) / (2 * math.sin(span / (n - 1) / 2))
        steps = 2 * np.arcsin(np.clip(chords / (2 * radius), 0, 1))
        phi = np.concatenate([[0.0], np.cumsum(steps)])
        phi = phi - phi.mean()
        rad = radius + rng.uniform(-0.15, 0.15, size=n) * w_l  # irregular placement
        cen = np.stack([rad * np.cos(phi), rad * np.sin(phi)], axis=1)
        tang = np.stack([-np.sin(phi), np.cos(phi)], axis=1)
        tilt = rng.uniform(-0.35, 0.35, size=n)  # lobes not exactly along the arc
        ct, st = np.cos(tilt), np.sin(tilt)
        tang = np.stack([tang[:, 0] * ct - tang[:, 1] * st, tang[:, 0] * st + tang[:, 1] * ct], 1)
        offs = np.array([-0.45, 0.0, 0.45])
        pts = (
            cen[:, None, :] + offs[None, :, None] * size[:, None, None] * tang[:, None, :]
        ).reshape(-1, 2)
        radii = np.repeat(0.85 * size, 3) * np.tile([0.92, 1.0, 0.92], n)
        lobe = np.repeat(np.arange(n), 3)
    shift = pts.mean(axis=0)
    c, si = math.cos(rot), math.sin(rot)
    rmat = np.array([[c, si], [-si, c]])
    ang = rng.uniform(0, 2 * math.pi)
    offset = m.eccentricity * rc * np.array([math.cos(ang), math.sin(ang)])
    pts = (pts - shift) @ rmat + offset
    # keep the nucleus inside the cell
    extent = float(np.max(np.linalg.norm(pts, axis=1) + radii))
    if extent > 0.88 * rc:
        f = 0.88 * rc / extent
        pts = pts * f
        radii = radii * f
    n_l = int(lobe.max()) + 1
    if n_l > 1:  # re-open gaps between lobes that the fit may have narrowed
        for _ in range(3):
            for i in range(n_l):
                for j in range(i + 1, n_l):
                    a, b = lobe == i, lobe == j
                    dd = np.linalg.norm(pts[a][:, None] - pts[b][None], axis=2)
                    gap_ij = dd - radii[a][:, None] - radii[b][None]
                    excess = MIN_LOBE_GAP - float(gap_ij.min())
                    if excess > 0:
                        radii[a | b] = np.maximum(radii[a | b] - excess / 2 - 0.05, 0.5)
    centres = np.stack([pts[lobe == i].mean(axis=0) for i in range(n_l)])
    return NucleusSkeleton(points=pts, radii=radii, lobe=lobe, centres=centres)


def draw_cell(m: Morphology, diameter: float, rng: np.random.Generator) -> CellPatch:
    """Draw one white cell of morphology ``m`` and ``diameter`` px on its own patch."""
    rc = diameter / 2
    half = int(math.ceil(rc * 1.12)) + 2
    size = 2 * half + 1
    ax = np.arange(size, dtype=np.float64) - half
    yy, xx = np.meshgrid(ax, ax, indexing="ij")
    dist = np.hypot(yy, xx)
    theta = np.arctan2(yy, xx)

    # cell outline: circle with small low-order harmonics
    rho = np.full_like(dist, rc)
    for k in (2, 3, 4):
        rho += rc * rng.uniform(0, 0.025) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    alpha = np.clip(rho - dist + 0.5, 0.0, 1.0)
    mask = alpha >= 0.5

    # nucleus: union of discs along its centre line
    skel = _nucleus_skeleton(m, rc, rng)
    pts, radii = skel.points, skel.radii
    # (P, S, S) distance to each disc edge -> (S, S) signed distance
    d = np.hypot(yy[None] - pts[:, 1, None, None], xx[None] - pts[:, 0, None, None])
    sd = np.min(d - radii[:, None, None], axis=0)
    a_nuc = np.clip(0.5 - sd, 0.0, 1.0) * alpha
    nucleus = (sd < 0) & mask

    od_cyto = rgb_to_od(m.cytoplasm_rgb)
    od_nuc = rgb_to_od(m.nucleus_rgb)
    # cytoplasm: slightly thicker in the middle, faint texture
    thick = 0.85 + 0.15 * np.clip(1 - (dist / rc) ** 2, 0, 1)
    cyto = thick * (1 + 0.06 * _smooth_noise(rng, dist.shape, 2.0))
    od = cyto[..., None] * od_cyto

    # chromatin: clumps (texture amplitude grows with maturation), nucleoli
    chrom = 1 + m.chromatin_clump * _smooth_noise(rng, dist.shape, m.clump_sigma)
    n_nucleoli = rng.poisson(m.nucleoli) if m.nucleoli > 0 else 0
    if n_nucleoli and nucleus.any():
        iy, ix = np.nonzero(nucleus)
        pick = rng.integers(0, iy.size, size=n_nucleoli)
        r_eq = math.sqrt(m.nucleus_fraction) * rc
        for p in pick:
            r_nl = r_eq * rng.uniform(0.10, 0.16)
            inside = np.hypot(yy - ax[iy[p]], xx - ax[ix[p]]) < r_nl
            chrom = np.where(inside, chrom * 0.55, chrom)
    chrom = np.clip(chrom, 0.25, None)
    od = od * (1 - a_nuc[..., None]) + (chrom[..., None] * od_nuc) * a_nuc[..., None]
    if skel.n_lobes > 1:  # thin chromatin filaments between lobes (drawn, not in the mask)
        for i in range(skel.n_lobes - 1):
            p, q = skel.centres[i], skel.centres[i + 1]
            v = q - p
            tt = np.clip(((xx - p[0]) * v[0] + (yy - p[1]) * v[1]) / (v @ v), 0, 1)
            dseg = np.hypot(xx - (p[0] + tt * v[0]), yy - (p[1] + tt * v[1]))
            a_f = np.clip(0.9 - dseg, 0, 1) * 0.8 * (~nucleus) * alpha
            od = od * (1 - a_f[..., None]) + a_f[..., None] * od_nuc

    cyto_only = mask & ~nucleus
    area_c = float(cyto_only.sum())
    grains = np.zeros((size, size, 3))

    def scatter(where: np.ndarray, count: float, sigma: float, rgb, strength: float) -> int:
        """Draw Poisson(``count``) granules on ``where``; return how many were drawn."""
        n = rng.poisson(count) if count > 0 else 0
        iy, ix = np.nonzero(where)
        if n == 0 or iy.size == 0:
            return 0
        pick = rng.integers(0, iy.size, size=n)
        img = np.zeros((size, size))
        np.add.at(img, (iy[pick], ix[pick]), rng.uniform(0.7, 1.3, size=n))
        # unit peak per granule: Gaussian of sd sigma integrates to 2 pi sigma^2
        img = ndimage.gaussian_filter(img, sigma) * (2 * math.pi * sigma**2)
        grains[...] += np.minimum(img, 1.6)[..., None] * (strength * rgb_to_od(rgb))
        return int(n)

    # large dark azurophilic granules (over the whole cell, nucleus included)
    n_azu = scatter(mask, m.azurophilic * 0.05 * float(mask.sum()), 1.0, (95, 25, 105), 0.9)
    # fine lilac specific granules (cytoplasm only)
    scatter(cyto_only, m.specific * 0.22 * area_c, 0.6, (185, 130, 185), 0.55)
    # eosinophil: coarse orange-red granules packing the cytoplasm
    scatter(cyto_only, m.eosinophilic * 0.08 * area_c, 1.3, (228, 112, 105), 0.7)
    od = od + grains * alpha[..., None]

    n_vac = rng.poisson(m.vacuoles) if m.vacuoles > 0 else 0
    if n_vac and cyto_only.any():
        iy, ix = np.nonzero(cyto_only)
        for p in rng.integers(0, iy.size, size=n_vac):
            inside = np.hypot(yy - ax[iy[p]], xx - ax[ix[p]]) < rc * rng.uniform(0.05, 0.09)
            od = np.where((inside & cyto_only)[..., None], od * 0.35, od)
    return CellPatch(
        alpha=alpha, od=od, mask=mask, nucleus=nucleus, half=half, azurophilic_granules=n_azu
    )


# ----------------------------------------------------------------------------
# background: red cells and platelets
# ----------------------------------------------------------------------------
