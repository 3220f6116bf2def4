"""White-cell kinds and their morphology as a function of (kind, maturation t).

The neutrophil lineage is one continuous axis ``t`` in [0, 1]; the six
classical stage names are equal-width bins of ``t`` (:func:`stage_of`).
Every visual property of a simulated cell comes from :func:`morphology`, a
deterministic function of ``(kind, t)`` (plus the mature-neutrophil diameter
that sets the scale), so maturation can be read back from the pixels:

=====================  ==========================================================
property               along t (myeloblast -> segmented neutrophil)
=====================  ==========================================================
diameter               1.3x (myeloblast) -> 1.5x (promyelocyte, the largest cell
                       of the series) -> 1.29x (myelocyte) -> 1.0x
                       ``mature_diameter`` (segmented)
nucleus area fraction  0.72 -> 0.36 of the cell area
nucleus shape          round -> oval/eccentric -> kidney -> band (horseshoe)
                       -> 2..5 separate lobes (more lobes for larger t;
                       2 / 3 / 4 / 5 in 35 / 43 / 19 / 3 % of the stage)
chromatin              pale, fine, with nucleoli -> dark, clumped
cytoplasm              basophilic blue -> pale pink/lilac
azurophilic granules   large, dark purple; none in the myeloblast but its last
                       tenth, a steep rise to a peak at the promyelocyte, then
                       a slower fall (diluted by the myelocyte's divisions)
specific granules      fine, lilac; sigmoid rise from the myelocyte on
=====================  ==========================================================

Lymphocytes, monocytes and eosinophils have fixed morphologies (``t`` is NaN).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vae.inputs.schema import MATURATION_ORDER

LINEAGE_KINDS = MATURATION_ORDER  # the six lineage stages, earliest first
OTHER_KINDS = ("lymphocyte", "monocyte", "eosinophil")
KINDS = LINEAGE_KINDS + OTHER_KINDS
# kind_weights keys: the lineage as a whole, then the other kinds
KIND_GROUPS = ("neutrophil_lineage",) + OTHER_KINDS

# t bin edges of the six lineage stages (equal width)
STAGE_EDGES = np.linspace(0.0, 1.0, len(LINEAGE_KINDS) + 1)

# cell diameter / mature_diameter at knots of t: myeloblasts ~15.5 um, promyelocytes ~18
# um (the largest cells of the series), then shrinking to ~12 um segmented neutrophils
# (values at the stage centres 1/12, 3/12, ...). From the myelocyte on they are the
# earlier linear 1.5 - 0.5 t: a band drawn 5 % smaller has a horseshoe thin enough for
# the lobe counter to cut in two at 64 px (tests/vae/test_nucleus_layer.py)
DIAMETER_KNOTS = (0.0, 1 / 12, 3 / 12, 5 / 12, 7 / 12, 9 / 12, 11 / 12, 1.0)
DIAMETER_FACTORS = (
    1.28,
    1.3,
    1.5,
    1.5 - 2.5 / 12,
    1.5 - 3.5 / 12,
    1.5 - 4.5 / 12,
    1.5 - 5.5 / 12,
    1.0,
)
# largest cell relative to mature_diameter (the promyelocyte, +5% size jitter)
MAX_DIAMETER_FACTOR = max(DIAMETER_FACTORS) * 1.05


def stage_of(t: float) -> str:
    """Stage name of maturation ``t`` in [0, 1] (equal-width bins)."""
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"maturation t={t} outside [0, 1]")
    i = min(int(np.searchsorted(STAGE_EDGES, t, side="right")) - 1, len(LINEAGE_KINDS) - 1)
    return LINEAGE_KINDS[i]


def lineage_of(kind: str) -> str:
    """``neutrophil`` for the six lineage stages, else the kind itself."""
    if kind in LINEAGE_KINDS:
        return "neutrophil"
    if kind in OTHER_KINDS:
        return kind
    raise ValueError(f"unknown kind {kind!r}; valid: {', '.join(KINDS)}")


# share of segmented neutrophils with 2, 3, 4, 5 lobes in normal blood (an Arneth-like
# count: 3 lobes commonest, 5 rare; more than ~5 % with 5 or more is hypersegmentation,
# a sign of B12 / folate deficiency, so an even 25 % each drew a pathological smear)
LOBE_SHARES = ((2, 0.35), (3, 0.43), (4, 0.19), (5, 0.03))
_LOBE_EDGES = np.cumsum([share for _, share in LOBE_SHARES])


def lobes_of(t: float) -> int:
    """Nucleus lobe count of a lineage cell: 1 before the segmented stage, then 2..5,
    more lobes for larger ``t``, in the shares of :data:`LOBE_SHARES` over the stage."""
    t_seg = STAGE_EDGES[-2]
    if t < t_seg:
        return 1
    frac = (t - t_seg) / (1.0 - t_seg)
    k = int(np.searchsorted(_LOBE_EDGES, frac, side="right"))
    return LOBE_SHARES[min(k, len(LOBE_SHARES) - 1)][0]


def _interp(t: float, knots: tuple[float, ...], values: tuple[float, ...]) -> float:
    return float(np.interp(t, knots, values))


def _lerp(a: tuple[float, ...], b: tuple[float, ...], f: float) -> tuple[float, ...]:
    return tuple(x + (y - x) * f for x, y in zip(a, b))


def azurophilic_density(t: float) -> float:
    """Relative density (0..1) of large azurophilic granules: peak at the promyelocyte.

    A Gaussian of two widths: a steep rise (sd 0.05) leaves myeloblasts nearly
    agranular (at most 0.06 at the stage's end: a type II blast's few granules),
    a slower fall (sd 0.11) thins them through the myelocyte.
    """
    sd = 0.05 if t < 0.25 else 0.11
    return float(math.exp(-(((t - 0.25) / sd) ** 2)))


def drawn_granule_density(count: np.ndarray, diameter: np.ndarray) -> np.ndarray:
    """Azurophilic granules the renderer drew per 100 px^2 of the cell, (n,).

    ``count`` (n,) the drawn granules (truth column ``azurophilic_granules``, a Poisson
    draw of mean ``0.05 x azurophilic x mask area``), ``diameter`` (n,) the drawn
    diameter in px (truth column ``diameter``). The density a perfect granule counter
    would read (the granule counter reports granules per 100 px^2 too): its rank
    agreement with :func:`azurophilic_density` is the ceiling of any image measure.
    """
    count = np.asarray(count, float)
    diameter = np.asarray(diameter, float)
    return 100.0 * count / (math.pi / 4.0 * diameter**2)


def specific_density(t: float) -> float:
    """Relative density (0..1) of fine specific granules: rises from the myelocyte on."""
    return float(1.0 / (1.0 + math.exp(-(t - 0.40) / 0.04)))


@dataclass(frozen=True)
class Morphology:
    """Rendering recipe of one white cell (all lengths in px, colours RGB 0-255).

    Colours are the transmitted colour of the structure at full stain, on a
    white background; the renderer converts them to optical densities.
    """

    kind: str
    lineage: str
    t: float  # NaN outside the neutrophil lineage
    diameter: float  # px, before per-cell jitter
    nucleus_fraction: float  # nucleus area / cell area
    lobes: int  # 1 = single nucleus
    span_deg: float  # arc angle of the nucleus centre line (0 = round)
    width_ratio: float  # nucleus half-width / radius of an equal-area disc
    eccentricity: float  # nucleus centre offset / cell radius
    nucleus_rgb: tuple[float, float, float]
    chromatin_clump: float  # relative amplitude of the chromatin texture
    clump_sigma: float  # px, size of chromatin clumps
    nucleoli: float  # expected number of nucleoli (pale spots)
    cytoplasm_rgb: tuple[float, float, float]
    azurophilic: float  # density of large dark granules (0..1)
    specific: float  # density of fine granules (0..1)
    eosinophilic: float  # density of large orange granules (0..1)
    vacuoles: float  # expected number of cytoplasmic vacuoles

    @property
    def granule_density(self) -> float:
        """Ground-truth granule density: sum of the three granule densities."""
        return self.azurophilic + self.specific + self.eosinophilic


def morphology(kind: str, t: float | None, mature_diameter: float) -> Morphology:
    """Morphology of a cell of ``kind`` (at maturation ``t`` for the lineage).

    Parameters
    ----------
    kind
        One of :data:`KINDS`. For a lineage kind ``t`` is required and must
        fall in that kind's bin (see :func:`stage_of`).
    t
        Maturation in [0, 1] for the neutrophil lineage, ``None`` otherwise.
    mature_diameter
        Diameter of a segmented neutrophil in px; sets the scale of every cell.
    """
    lineage = lineage_of(kind)
    D = float(mature_diameter)
    if lineage == "neutrophil":
        if t is None or not np.isfinite(t):
            raise ValueError(f"kind={kind} needs a maturation t in [0, 1]")
        if stage_of(t) != kind:
            raise ValueError(f"t={t} is a {stage_of(t)}, not a {kind}")
        tk = (0.0, 1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0)
        lobes = lobes_of(t)
        return Morphology(
            kind=kind,
            lineage=lineage,
            t=float(t),
            diameter=D * _interp(t, DIAMETER_KNOTS, DIAMETER_FACTORS),
            nucleus_fraction=0.72 - 0.36 * t,
            lobes=lobes,
            span_deg=_interp(t, (0.0, 0.35, 0.55, 0.70, 5 / 6, 1.0), (0, 10, 120, 220, 235, 235)),
            width_ratio=_interp(t, tk, (1.0, 0.97, 0.85, 0.62, 0.46, 0.36, 0.36)),
            eccentricity=_interp(t, tk, (0.04, 0.10, 0.18, 0.16, 0.08, 0.04, 0.04)),
            nucleus_rgb=_lerp((152, 132, 215), (88, 62, 170), t),
            chromatin_clump=0.12 + 0.38 * t,
            clump_sigma=1.6 - 0.6 * t,
            nucleoli=max(0.0, 2.5 * (1 - t / 0.25)),
            cytoplasm_rgb=_lerp((128, 160, 222), (232, 200, 220), min(1.0, t / 0.8)),
            azurophilic=azurophilic_density(t),
            specific=specific_density(t),
            eosinophilic=0.0,
            vacuoles=0.0,
        )
    if t is not None and np.isfinite(t):
        raise ValueError(f"kind={kind} has no maturation t (got t={t})")
    nan = float("nan")
    if kind == "lymphocyte":
        return Morphology(
            kind=kind,
            lineage=lineage,
            t=nan,
            diameter=D * 0.72,
            nucleus_fraction=0.80,
            lobes=1,
            span_deg=0.0,
            width_ratio=1.0,
            eccentricity=0.08,
            nucleus_rgb=(70, 50, 155),
            chromatin_clump=0.35,
            clump_sigma=1.3,
            nucleoli=0.0,
            cytoplasm_rgb=(150, 185, 235),
            azurophilic=0.05,
            specific=0.0,
            eosinophilic=0.0,
            vacuoles=0.0,
        )
    if kind == "monocyte":
        return Morphology(
            kind=kind,
            lineage=lineage,
            t=nan,
            diameter=D * 1.3,
            nucleus_fraction=0.48,
            lobes=1,
            span_deg=150.0,
            width_ratio=0.72,
            eccentricity=0.12,
            nucleus_rgb=(125, 100, 190),
            chromatin_clump=0.22,
            clump_sigma=2.2,
            nucleoli=0.0,
            cytoplasm_rgb=(175, 175, 215),
            azurophilic=0.0,
            specific=0.25,
            eosinophilic=0.0,
            vacuoles=3.0,
        )
    # eosinophil: bilobed nucleus, cytoplasm packed with large orange granules
    return Morphology(
        kind=kind,
        lineage=lineage,
        t=nan,
        diameter=D * 1.05,
        nucleus_fraction=0.34,
        lobes=2,
        span_deg=120.0,
        width_ratio=0.5,
        eccentricity=0.05,
        nucleus_rgb=(88, 60, 165),
        chromatin_clump=0.35,
        clump_sigma=1.2,
        nucleoli=0.0,
        cytoplasm_rgb=(238, 205, 190),
        azurophilic=0.0,
        specific=0.0,
        eosinophilic=1.0,
        vacuoles=0.0,
    )
