"""A whole simulated data set: smears + COCO ground truth + paired expression.

:func:`simulate_image` renders image ``k`` and the expression of its white
cells from random streams seeded by ``(seed, k)``, so image ``k`` is the same
whatever ``n_images`` is. :func:`write_dataset` writes the artifacts of
``stage=simulate`` (see docs/artifacts.md) to the paths it is given.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.simulator.expression import (
    GenePanel,
    make_gene_panel,
    n_program_genes,
    simulate_counts,
)
from pipeline.simulator.morphology import KIND_GROUPS, MAX_DIAMETER_FACTOR
from pipeline.simulator.render import SmearParams, render_smear
from pipeline.simulator.tables import expression_anndata, truth_table
from segmentation.io import encode_mask, write_h5ad


class SimulatorSettingError(ValueError):
    """A simulator setting is out of range; ``setting`` names the field."""

    def __init__(self, setting: str, value: Any, requirement: str):
        self.setting = setting
        self.value = value
        self.requirement = requirement
        super().__init__(f"{setting}={value} {requirement}")


_SMEAR = SmearParams()  # the image defaults


@dataclass(frozen=True)
class SimulatorParams:
    """All simulator settings; field names match ``data.simulator`` in the config.

    See :class:`pipeline.simulator.render.SmearParams` for the image settings.
    """

    n_images: int = 24
    # image settings: defaults owned by SmearParams
    image_size: tuple[int, int] = (_SMEAR.height, _SMEAR.width)  # (H, W) px
    wbc_per_image: tuple[int, int] = _SMEAR.wbc_per_image  # inclusive range
    rbc_density: float = _SMEAR.rbc_density  # red-cell area / field area (overlaps counted twice)
    platelets_per_image: tuple[int, int] = _SMEAR.platelets_per_image
    wbc_diameter_px: float = _SMEAR.mature_diameter  # diameter of a mature neutrophil, px
    kind_weights: dict[str, float] = field(default_factory=lambda: dict(_SMEAR.kind_weights))
    touching_fraction: float = _SMEAR.touching_fraction  # P(a WBC is placed touching another)
    stain_jitter: float = _SMEAR.stain_jitter  # log-normal sd of per-image stain per channel
    illumination_jitter: float = _SMEAR.illumination_jitter  # relative sd of the white balance
    noise_std: float = _SMEAR.noise_std  # Gaussian pixel noise, 0-255 units
    blur_sigma: float = _SMEAR.blur_sigma  # optical blur, px
    n_genes: int = 240  # >= 111 (the program genes); the rest are noise genes
    mean_library_size: float = 2000.0  # median total counts per cell
    library_size_sd: float = 0.35  # log-normal sd of the library size
    nb_dispersion: float = 5.0  # NB inverse dispersion (larger = less noise)
    dropout: float = 0.1  # extra zero-inflation probability
    val_fraction: float = 0.2  # share of images in split "val"
    # image k uses default_rng([seed, k]): independent of n_images. The config's
    # data.simulator.seed is null by default = the top-level seed (stage=simulate)
    seed: int = 0

    @classmethod
    def from_mapping(cls, d: dict[str, Any]) -> SimulatorParams:
        """Build from a plain dict (e.g. the resolved ``data.simulator`` config)."""
        d = dict(d)
        for k in ("image_size", "wbc_per_image", "platelets_per_image"):
            if k in d:
                v = d[k]
                if not isinstance(v, (list, tuple)) or len(v) != 2:
                    raise SimulatorSettingError(k, v, "must be a list of two integers")
                d[k] = (int(v[0]), int(v[1]))
        if "kind_weights" in d:
            d["kind_weights"] = {str(k): float(v) for k, v in dict(d["kind_weights"]).items()}
        unknown = set(d) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise SimulatorSettingError(sorted(unknown)[0], "?", "is not a simulator setting")
        return cls(**d)

    def smear_params(self) -> SmearParams:
        return SmearParams(
            height=self.image_size[0],
            width=self.image_size[1],
            wbc_per_image=self.wbc_per_image,
            rbc_density=self.rbc_density,
            platelets_per_image=self.platelets_per_image,
            mature_diameter=self.wbc_diameter_px,
            kind_weights=dict(self.kind_weights),
            touching_fraction=self.touching_fraction,
            stain_jitter=self.stain_jitter,
            illumination_jitter=self.illumination_jitter,
            noise_std=self.noise_std,
            blur_sigma=self.blur_sigma,
        )

    def validate(self) -> None:
        """Raise :class:`SimulatorSettingError` on the first bad setting."""

        def need(ok: bool, name: str, requirement: str) -> None:
            if not ok:
                raise SimulatorSettingError(name, _fmt(getattr(self, name)), requirement)

        need(self.n_images >= 0, "n_images", "must be >= 0")
        need(self.wbc_diameter_px >= 16, "wbc_diameter_px", "must be >= 16 px")
        min_side = int(math.ceil(2 * MAX_DIAMETER_FACTOR * self.wbc_diameter_px))
        need(
            min(self.image_size) >= min_side,
            "image_size",
            f"is too small: each side must be >= {min_side} px (2x the largest cell "
            f"diameter at wbc_diameter_px={self.wbc_diameter_px:g})",
        )
        lo, hi = self.wbc_per_image
        need(0 <= lo <= hi, "wbc_per_image", "must be [low, high] with 0 <= low <= high")
        lo, hi = self.platelets_per_image
        need(0 <= lo <= hi, "platelets_per_image", "must be [low, high] with 0 <= low <= high")
        need(0 <= self.rbc_density <= 1, "rbc_density", "must be in [0, 1]")
        bad = sorted(set(self.kind_weights) - set(KIND_GROUPS))
        need(not bad, "kind_weights", f"has unknown keys {bad}; valid: {list(KIND_GROUPS)}")
        w = list(self.kind_weights.values())
        need(
            all(x >= 0 for x in w) and sum(w) > 0,
            "kind_weights",
            "must be >= 0 with a positive sum",
        )
        need(0 <= self.touching_fraction <= 1, "touching_fraction", "must be in [0, 1]")
        for name in ("stain_jitter", "illumination_jitter", "noise_std", "blur_sigma"):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        need(
            self.n_genes >= n_program_genes(),
            "n_genes",
            f"must be >= {n_program_genes()} (the genes of the expression programs)",
        )
        need(self.mean_library_size > 0, "mean_library_size", "must be > 0")
        need(self.library_size_sd >= 0, "library_size_sd", "must be >= 0")
        need(self.nb_dispersion > 0, "nb_dispersion", "must be > 0")
        need(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        need(0 <= self.val_fraction < 1, "val_fraction", "must be in [0, 1)")
        # the config's null is resolved to the top-level seed before this (stage=simulate)
        need(isinstance(self.seed, int) and self.seed >= 0, "seed", "must be an integer >= 0")


def _fmt(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def assign_splits(n_images: int, val_fraction: float, seed: int) -> list[str]:
    """``train``/``val`` per image: round(n * val_fraction) val images (>= 1 when
    n >= 2 and val_fraction > 0), chosen by a permutation seeded by ``seed``."""
    n_val = int(round(n_images * val_fraction))
    if val_fraction > 0 and n_images >= 2:
        n_val = min(max(n_val, 1), n_images - 1)
    order = np.random.default_rng([seed, 15485863]).permutation(n_images)
    split = ["train"] * n_images
    for i in order[:n_val]:
        split[int(i)] = "val"
    return split


@dataclass
class SimulatedImage:
    """Image ``index``: pixels, COCO image/annotation records and counts."""

    index: int
    file_name: str
    image: np.ndarray  # (H, W, 3) uint8
    coco_image: dict[str, Any]
    annotations: list[dict[str, Any]]  # COCO records with the ground-truth fields
    counts: np.ndarray  # (n_cells, G) int
    n_unplaced: int = 0  # requested white cells that found no free spot


def mask_bbox(mask: np.ndarray) -> list[float]:
    """COCO ``[x, y, w, h]`` of a non-empty (H, W) bool mask (w = x_max - x_min + 1)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    x0, y0 = int(cols[0]), int(rows[0])
    return [float(x0), float(y0), float(cols[-1] - x0 + 1), float(rows[-1] - y0 + 1)]


def cell_id(index: int, j: int) -> str:
    """Id of white cell ``j`` of image ``index``, e.g. ``sim0003_c02``."""
    return f"sim{index:04d}_c{j:02d}"


def simulate_image(
    params: SimulatorParams, panel: GenePanel, index: int, split: str
) -> SimulatedImage:
    """Render image ``index`` and simulate its cells' expression.

    Annotation ids are ``image_id * 1000 + j + 1`` so they do not depend on
    other images; ``image_id = index + 1``.
    """
    sp = params.smear_params()
    smear = render_smear(sp, np.random.default_rng([params.seed, index]))
    image_id = index + 1
    file_name = f"sim_{index:04d}.png"
    anns = []
    for j, c in enumerate(smear.cells):
        rle = encode_mask(c.mask)
        x, y, w, h = mask_bbox(c.mask)
        m = c.morph
        anns.append(
            {
                "id": image_id * 1000 + j + 1,
                "image_id": image_id,
                "category_id": 1,
                "bbox": [x, y, w, h],
                "area": int(c.mask.sum()),
                "segmentation": rle,
                "iscrowd": 0,
                "cell_id": cell_id(index, j),
                "kind": m.kind,
                "lineage": m.lineage,
                "t": None if math.isnan(m.t) else round(m.t, 6),
                "granule_density": round(c.granule_density, 6),
                "azurophilic_density": round(m.azurophilic, 6),
                "azurophilic_granules": int(c.azurophilic_granules),
                "specific_density": round(m.specific, 6),
                "eosinophilic_density": round(m.eosinophilic, 6),
                "lobes": int(m.lobes),
                "diameter": round(c.diameter, 3),
                "truncated": bool(c.truncated),
                "nucleus_area": int(c.nucleus_mask.sum()),
                "nucleus_segmentation": encode_mask(c.nucleus_mask),
            }
        )
    counts = simulate_counts(
        panel,
        [c.morph.kind for c in smear.cells],
        [None if math.isnan(c.morph.t) else c.morph.t for c in smear.cells],
        np.random.default_rng([params.seed, index, 1]),
        mean_library_size=params.mean_library_size,
        library_sd=params.library_size_sd,
        dispersion=params.nb_dispersion,
        dropout=params.dropout,
    )
    h, w = params.image_size
    return SimulatedImage(
        index=index,
        file_name=file_name,
        image=smear.image,
        coco_image={
            "id": image_id,
            "file_name": file_name,
            "width": w,
            "height": h,
            "split": split,
        },
        annotations=anns,
        counts=counts,
        n_unplaced=smear.n_requested - len(smear.cells),
    )


@dataclass
class WriteSummary:
    """What :func:`write_dataset` wrote."""

    n_images: int
    n_cells: int
    n_genes: int
    kind_counts: dict[str, int]
    n_unplaced: int = 0  # white cells dropped for lack of space (see Smear.n_requested)


def write_dataset(
    params: SimulatorParams,
    smears_dir: Path,
    expression_path: Path,
    table_path: Path,
    progress: Callable[[Iterable[int]], Iterable[int]] = lambda it: it,
) -> WriteSummary:
    """Simulate ``params.n_images`` images and write every artifact.

    Parameters
    ----------
    smears_dir
        Folder (created) for ``sim_XXXX.png`` and ``annotations.json``.
    expression_path
        ``.h5ad`` of raw counts, one row per white cell.
    table_path
        CSV of the per-cell ground truth.
    progress
        Wraps the image index iterator (e.g. ``tqdm``).
    """
    from PIL import Image

    params.validate()
    panel = make_gene_panel(params.n_genes, params.seed)
    splits = assign_splits(params.n_images, params.val_fraction, params.seed)
    smears_dir = Path(smears_dir)
    smears_dir.mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    counts: list[np.ndarray] = []
    n_unplaced = 0
    for k in progress(range(params.n_images)):
        sim = simulate_image(params, panel, k, splits[k])
        Image.fromarray(sim.image).save(smears_dir / sim.file_name, compress_level=1)
        images.append(sim.coco_image)
        annotations.extend(sim.annotations)
        counts.append(sim.counts)
        n_unplaced += sim.n_unplaced
    coco = {
        "info": {"description": "wbc-pipeline synthetic smears", "simulator": asdict(params)},
        "images": images,
        "categories": [{"id": 1, "name": "wbc", "supercategory": "cell"}],
        "annotations": annotations,
    }
    (smears_dir / "annotations.json").write_text(json.dumps(coco, default=list))
    table = truth_table(images, annotations)
    table.to_csv(table_path, index=False)
    allc = np.concatenate(counts) if counts else np.zeros((0, params.n_genes), dtype=np.int64)
    adata = expression_anndata(table, allc, panel, params)
    write_h5ad(adata, expression_path)
    return WriteSummary(
        n_images=len(images),
        n_cells=len(annotations),
        n_genes=int(allc.shape[1]),
        kind_counts={k: int(v) for k, v in table["kind"].value_counts().items()},
        n_unplaced=n_unplaced,
    )
