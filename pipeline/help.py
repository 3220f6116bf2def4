"""``python -m pipeline --help``: the stages, what each reads and writes, presets, main knobs.

Hydra prints ``hydra.help.template`` (set in ``pipeline/conf/config.yaml`` to the
``${pipeline_help:}`` resolver registered here). The text is built when it is
printed: stage order from :data:`pipeline.runner.ORDER`, presets from the first
``# help:`` comment line of each ``pipeline/conf/preset/*.yaml``, and the current value of every main
setting from the composed config, so ``--help`` after overrides shows them
(``python -m pipeline vae.beta=8 --help``). Hydra's own ``$APP_CONFIG_GROUPS``
placeholder is kept at the end: it lists every group's options.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parent / "conf"

# stage -> (what it does, reads, writes inside outputs/<experiment>/<stage>/)
STAGES: dict[str, tuple[str, str, str]] = {
    "simulate": (
        "synthetic smears + matched expression with known truth",
        "data.simulator.*",
        "smears/ (PNG + COCO annotations.json), expression_raw.h5ad, cells_truth.csv",
    ),
    "segment_train": (
        "train the Mask R-CNN white-cell detector",
        "simulate/smears or data.smear_sources (data=bccd|txl_pbc|segmentation_wbc|real)",
        "model.pt, metrics.json (COCO AP), tb/",
    ),
    "segment": (
        "tiled detection -> filtered, background-free cell crops",
        "segment_train/model.pt + simulate/smears, paths.inputs.smears=DIR or data.segment_sources",
        "cells.h5ad, detections.csv, rejects.csv, rejects.png, contact_sheet.png, overlays/",
    ),
    "expression": (
        "scanpy QC, normalisation, HVGs, PCA/UMAP, gene-program scores",
        "simulate/expression_raw.h5ad, data.expression_file or expression.input_file",
        "expression.h5ad, qc.png, umap.png",
    ),
    "pair": (
        "match crops to expression profiles (pair.mode)",
        "segment/cells.h5ad or pair.crop_sources, expression/expression.h5ad",
        "paired.h5ad, pair_summary.csv, crops.png, rejects.csv",
    ),
    "train": (
        "two-branch beta-VAE (image + expression, product of experts)",
        "pair/paired.h5ad",
        "model.pt, last.pt, latent.h5ad, split.csv, tb/",
    ),
    "evaluate": (
        "held-out metrics of the latent space, UMAPs",
        "train/latent.h5ad, train/model.pt, pair/paired.h5ad",
        "metrics.json, CSV tables, UMAP PNGs, tb/",
    ),
    "traverse": (
        "latent traversals, maturation paths, gene programs, the HTML report",
        "train/latent.h5ad, train/model.pt, pair/paired.h5ad, evaluate/metrics.json",
        "traversal PNGs, gene rankings, report.html, study.html (interactive path)",
    ),
}

# (setting, what it does); the current value is read from the composed config
KNOBS: list[tuple[str, str]] = [
    ("experiment", "run folder: <paths.root>/<experiment>/"),
    # the audit's new user could not tell from --help how to send outputs elsewhere
    ("paths.root", "where run folders go (relative: to the current folder)"),
    ("overwrite", "replace a finished stage folder"),
    ("resume", "continue an interrupted training stage"),
    ("hardware", "cpu | gpu | multi_gpu (group)"),
    ("hardware.torch_threads", "intra-op threads (null: picked from free cores, logged)"),
    ("data.simulator.n_images", "simulated smears"),
    ("segmentation.epochs", "Mask R-CNN epochs"),
    ("segmentation.score_threshold", "keep detections scoring at least this"),
    ("pair.mode", "same_cell | by_label | by_maturation | unpaired | image_only"),
    ("vae.beta", "KL weight of the beta-VAE"),
    ("vae.n_latent", "shared latent dimensions"),
    ("trainer.max_epochs", "VAE epochs at most"),
    ("trainer.max_minutes", "VAE wall-time cap (null: none)"),
    ("analysis.split", "rows of latent.h5ad evaluate/traverse measure (test | all ...)"),
    ("log_level", "INFO | DEBUG | WARNING"),
]

# a group's chosen option is not a config value: read it from Hydra's runtime record
GROUP_VALUES = {"hardware": "hydra.runtime.choices.hardware"}


def _presets() -> list[tuple[str, str]]:
    out = []
    for p in sorted((CONF / "preset").glob("*.yaml")):
        # the preset's "# help: ..." comment line
        lines = [ln[7:].strip() for ln in p.read_text().splitlines() if ln.startswith("# help:")]
        out.append((p.stem, lines[0] if lines else ""))
    return out


def _value(root, key: str) -> str:
    try:
        v = OmegaConf.select(root, GROUP_VALUES.get(key, key), throw_on_missing=False)
    except Exception:  # an interpolation that cannot resolve at --help time
        v = "?"
    return "null" if v is None else str(v)


def help_text(root=None) -> str:
    """The body of ``--help``; ``root`` is the composed config (values of the main knobs).

    Returns
    -------
    str
        Plain text; ``$APP_CONFIG_GROUPS`` is left for Hydra to fill in.
    """
    from pipeline.runner import ORDER

    w = max(len(s) for s in ORDER) + 2
    lines = [
        "python -m pipeline stage=NAME [group=option ...] [key=value ...]",
        "",
        "White blood cells from smears and single-cell expression: a Mask R-CNN crops every",
        "cell, a two-branch beta-VAE encodes crops and profiles into one latent space, and",
        "evaluate/traverse measure and walk it. Docs: README.md and docs/.",
        "",
        "== Stages (stage=NAME; stage=all runs them in this order, simulate only with",
        "   data=synthetic and a later stage reading its smears or expression). Each",
        "   writes outputs/<experiment>/<stage>/ and reads the earlier stages' folders;",
        "   paths.inputs.<artifact>=PATH reads a file instead. ==",
    ]
    for k, name in enumerate(ORDER, 1):
        what, reads, writes = STAGES[name]
        lines += [
            f"  {k}. {name:<{w}}{what}",
            f"     {'':<{w}}reads:  {reads}",
            f"     {'':<{w}}writes: {writes}",
        ]
    lines += [
        "",
        "  Not part of stage=all:",
        f"     {'embed':<{w}}apply a finished study to new smears, crops, cells.h5ad or expression",
        f"     {'':<{w}}reads:  embed.study (a finished experiment) + embed.smears/crops/h5ad/expression",
        f"     {'':<{w}}writes: embed/query.h5ad, samples.csv, samples.html, summary.json, rejects.csv (docs/embed.md)",
    ]
    lines += ["", "== Presets (+preset=NAME) =="]
    lines += [f"  +preset={n:<8}{d}" for n, d in _presets()]
    lines += ["", "== Main settings (current value) =="]
    kw = max(len(k) for k, _ in KNOBS) + 2
    for key, what in KNOBS:
        val = _value(root, key) if root is not None else "?"
        lines.append(f"  {key + '=' + val:<{kw + 12}}{what}")
    lines += [
        "",
        "== Examples ==",
        "  python -m pipeline stage=all +preset=demo            # make demo",
        "  python -m pipeline stage=train vae.beta=8 experiment=b8",
        "  python -m pipeline -m stage=train vae.beta=1,4,16    # sweep: one sub-folder per value",
        "  python -m pipeline stage=train --cfg job             # print the full config",
        "",
        "== Config groups (group=option) ==",
        "$APP_CONFIG_GROUPS",
    ]
    return "\n".join(lines) + "\n"


def register() -> None:
    """Register the ``pipeline_help`` resolver (idempotent) used by ``hydra.help.template``."""
    if not OmegaConf.has_resolver("pipeline_help"):
        OmegaConf.register_new_resolver(
            "pipeline_help", lambda *, _root_: help_text(_root_), use_cache=False
        )
