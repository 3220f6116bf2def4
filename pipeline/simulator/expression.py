"""Negative-binomial expression of simulated white cells, driven by (kind, t).

Each gene belongs to one program. A program has an activity in [0, 1] that
is a fixed function of the cell's kind and maturation ``t``
(:func:`program_activity`); a gene's log-mean is its baseline plus its
amplitude times the activity of its program. Counts are drawn as
Gamma-Poisson (negative binomial) around ``library_size * share`` and then
dropped out at random.

Programs along the neutrophil lineage (t = 0 myeloblast ... 1 segmented):

- ``progenitor`` (CD34, KIT, MYB, ...): high at t = 0, decays (e-fold 0.12).
- ``proliferation`` (MKI67, TOP2A, ...): on until the myelocyte, off after t ~ 0.45.
- ``primary_granule`` (MPO, ELANE, AZU1, PRTN3, CTSG, ...): Gaussian peak at
  t = 0.25 (promyelocyte), sd 0.12.
- ``specific_granule`` (LTF, CAMP, LCN2, CEACAM8, ...): peak at t = 0.5
  (myelocyte/metamyelocyte), sd 0.13.
- ``tertiary_granule`` (MMP9, ...): peak at t = 0.72 (band), sd 0.12.
- ``mature`` (CXCR2, FCGR3B, MME, ...): sigmoid rising at t = 0.75; highest at t = 1.
- ``myeloid`` (SPI1, CEBPA, ...): all myeloid cells.
- ``lymphocyte``, ``monocyte``, ``eosinophil``: that kind only.
- ``housekeeping`` (ACTB, GAPDH, ...): high, constant; ``noise``: constant, low.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.simulator.morphology import KINDS, lineage_of
from vae.inputs.schema import GRANULE_PROGRAMS

PROGRAM_GENES: dict[str, tuple[str, ...]] = {
    "progenitor": ("CD34", "KIT", "MYB", "FLT3", "SOX4", "PROM1", "SPINK2", "ERG", "MEIS1", "CD38"),
    "proliferation": ("MKI67", "TOP2A", "CDK1", "CCNB1", "PCNA", "MCM2", "TYMS", "H2AZ1"),
    # the granule programs start with the shared definition (vae.inputs.schema)
    "primary_granule": (
        *GRANULE_PROGRAMS["primary"],
        "MS4A3",
        "CST7",
        "RNASE2",
        "SRGN",
        "CEBPE",
    ),
    "specific_granule": (
        *GRANULE_PROGRAMS["specific"],
        "MMP8",
        "CHI3L1",
        "OLFM4",
        "CRISP3",
        "BPI",
        "CEACAM6",
    ),
    "tertiary_granule": (*GRANULE_PROGRAMS["tertiary"], "ARG1", "CD177", "ADAM8", "MMP25", "SLPI"),
    "mature": (
        "CXCR2",
        "FCGR3B",
        "MME",
        "CXCR1",
        "FPR1",
        "SELL",
        "CSF3R",
        "S100A8",
        "S100A9",
        "FPR2",
        "IL1R2",
        "MNDA",
    ),
    "myeloid": ("SPI1", "CEBPA", "CEBPB", "ITGAM", "LYZ", "FCER1G", "TYROBP"),
    "lymphocyte": (
        "CD3E",
        "CD3D",
        "CD2",
        "CD79A",
        "MS4A1",
        "CD19",
        "IL7R",
        "CCR7",
        "LTB",
        "NKG7",
        "GZMA",
        "CD247",
    ),
    "monocyte": (
        "CD14",
        "CSF1R",
        "FCGR3A",
        "CD68",
        "VCAN",
        "FCN1",
        "CST3",
        "LGALS2",
        "MAFB",
        "IRF8",
        "CX3CR1",
        "MS4A7",
    ),
    "eosinophil": ("CLC", "PRG2", "EPX", "RNASE3", "IL5RA", "CCR3", "SIGLEC8", "ALOX15"),
    "housekeeping": (
        "ACTB",
        "GAPDH",
        "B2M",
        "RPLP0",
        "RPL13A",
        "EEF1A1",
        "TPT1",
        "MALAT1",
        "PTMA",
        "TMSB4X",
        "HSP90AB1",
        "PPIA",
        "UBC",
        "YWHAZ",
        "TBP",
        "HPRT1",
    ),
}

# real human genes without a role here, used to fill n_genes
NOISE_GENES: tuple[str, ...] = tuple(
    """
RPL3 RPL4 RPL5 RPL6 RPL7 RPL7A RPL8 RPL9 RPL10 RPL10A RPL11 RPL12 RPL14 RPL15 RPL17
RPL18 RPL18A RPL19 RPL21 RPL22 RPL23 RPL23A RPL24 RPL26 RPL27 RPL27A RPL28 RPL29 RPL30
RPL31 RPL32 RPL34 RPL35 RPL35A RPL36 RPL37 RPL37A RPL38 RPL39 RPL41 RPS2 RPS3 RPS3A RPS4X
RPS5 RPS6 RPS7 RPS8 RPS9 RPS10 RPS11 RPS12 RPS13 RPS14 RPS15 RPS15A RPS16 RPS17 RPS18
RPS19 RPS20 RPS21 RPS23 RPS24 RPS25 RPS26 RPS27 RPS27A RPS28 RPS29 EIF1 EIF3A EIF4A1
EIF4G2 NACA BTF3 NPM1 HNRNPA1 HNRNPK SRSF3 SRSF7 SNRPD2 SF3B1 PABPC1 DDX5 DDX17 CALM2
CFL1 PFN1 MYL6 ARPC2 ARPC3 CAPZB TUBA1B TUBB VIM LMNA ANXA1 ANXA2 LGALS1 S100A4 S100A6
S100A10 S100A11 TMSB10 FTL FTH1 SOD1 PRDX1 TXN GSTP1 UQCRH COX4I1 COX7C ATP5F1E ATP5MC2
NDUFA4 NDUFB9 SDHB CYCS CHCHD2 MT-CO1 PSMA7 PSMB1 PSMD4 UBB UBA52 SQSTM1 HSPA8 HSPA5 CANX
CALR PDIA3 P4HB SSR4 SEC61B RAB7A ARF1 RACK1 YBX1 SERF2 H3-3B JUND FOS JUN EGR1 IER2 DUSP1
KLF6 ZFP36 NFKBIA TSC22D3 CD74 HLA-A HLA-B HLA-C HLA-E CD44 CD52 CD53 PTPRC LAPTM5 CORO1A
ARHGDIB RAC2 LCP1 MYO1G SELPLG ITGB2 GMFG SH3BGRL3 EMP3 CD37 GLIPR2 OAZ1 ENO1 PGK1 TPI1
LDHA ALDOA PKM GPI NME2 ATP6V0E1 ATP6V1F VAMP8 SNX3 TMBIM6 GABARAP MYL12A ARL6IP1 SET
""".split()
)

PROGRAMS: tuple[str, ...] = tuple(PROGRAM_GENES) + ("noise",)


def _gauss(t: float, mu: float, sd: float) -> float:
    return math.exp(-0.5 * ((t - mu) / sd) ** 2)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def program_activity(kind: str, t: float | None) -> dict[str, float]:
    """Activity (0..1) of every program in a cell of ``kind`` at maturation ``t``."""
    a = dict.fromkeys(PROGRAMS, 0.0)
    a["housekeeping"] = 1.0
    lineage = lineage_of(kind)
    if lineage == "neutrophil":
        t = float(t)  # type: ignore[arg-type]
        a["progenitor"] = math.exp(-t / 0.12)
        a["proliferation"] = _sigmoid((0.45 - t) / 0.05)
        a["primary_granule"] = _gauss(t, 0.25, 0.12)
        a["specific_granule"] = _gauss(t, 0.50, 0.13)
        a["tertiary_granule"] = _gauss(t, 0.72, 0.12)
        a["mature"] = _sigmoid((t - 0.75) / 0.07)
        a["myeloid"] = 1.0
    elif kind == "lymphocyte":
        a["lymphocyte"] = 1.0
    elif kind == "monocyte":
        a["monocyte"] = 1.0
        a["myeloid"] = 1.0
    elif kind == "eosinophil":
        a["eosinophil"] = 1.0
        a["myeloid"] = 0.6
        a["specific_granule"] = 0.1
    return a


@dataclass(frozen=True)
class GenePanel:
    """The simulated genes: names (G,), program per gene (G,), baseline and
    amplitude of the log-mean (G,), natural-log units."""

    genes: np.ndarray
    program: np.ndarray
    baseline: np.ndarray
    amplitude: np.ndarray

    def programs(self) -> dict[str, list[str]]:
        """Program name -> its genes."""
        return {
            p: [str(g) for g in self.genes[self.program == p]]
            for p in dict.fromkeys(self.program.tolist())
        }


def n_program_genes() -> int:
    """Number of genes in the named programs (the smallest allowed n_genes)."""
    return sum(len(g) for g in PROGRAM_GENES.values())


def make_gene_panel(n_genes: int, seed: int) -> GenePanel:
    """Program genes first, then noise genes up to ``n_genes``.

    Baselines and amplitudes are drawn once per ``seed``. Noise genes beyond
    the list of real symbols are named ``NOISE0001``...
    """
    if n_genes < n_program_genes():
        raise ValueError(f"n_genes={n_genes} must be >= {n_program_genes()} (the program genes)")
    rng = np.random.default_rng([seed, 104729])
    genes: list[str] = []
    prog: list[str] = []
    for p, gs in PROGRAM_GENES.items():
        genes += gs
        prog += [p] * len(gs)
    n_noise = n_genes - len(genes)
    noise = list(NOISE_GENES[:n_noise])
    noise += [f"NOISE{i:04d}" for i in range(1, n_noise - len(noise) + 1)]
    genes += noise
    prog += ["noise"] * n_noise
    program = np.array(prog)
    G = len(genes)
    baseline = rng.normal(-1.0, 0.8, size=G)  # log-mean when the program is off
    amplitude = rng.uniform(2.5, 4.0, size=G)
    baseline[program == "housekeeping"] = rng.normal(
        3.0, 0.5, size=(program == "housekeeping").sum()
    )
    amplitude[program == "housekeeping"] = 0.0
    baseline[program == "noise"] = rng.normal(0.5, 1.0, size=n_noise)
    amplitude[program == "noise"] = 0.0
    return GenePanel(
        genes=np.array(genes, dtype=object),
        program=program,
        baseline=baseline,
        amplitude=amplitude,
    )


def mean_profile(panel: GenePanel, kind: str, t: float | None) -> np.ndarray:
    """Expected share of each gene in the library, (G,), summing to 1."""
    act = program_activity(kind, t)
    a = np.array([act[p] for p in panel.program])
    logm = panel.baseline + panel.amplitude * a
    m = np.exp(logm - logm.max())
    return m / m.sum()


def simulate_counts(
    panel: GenePanel,
    kinds: list[str],
    ts: list[float | None],
    rng: np.random.Generator,
    mean_library_size: float = 2000.0,
    library_sd: float = 0.35,
    dispersion: float = 5.0,
    dropout: float = 0.1,
) -> np.ndarray:
    """Raw counts (N, G) for cells of the given kinds and maturations.

    Parameters
    ----------
    panel
        Genes and their programs (:func:`make_gene_panel`).
    kinds, ts
        Per cell: kind (one of ``KINDS``) and t (None outside the lineage).
    rng
        Random source (seed it per image for reproducibility).
    mean_library_size
        Median total count per cell; log-normal with sd ``library_sd``.
    dispersion
        NB inverse dispersion theta: variance = mu + mu^2 / theta.
    dropout
        Probability that an entry is additionally set to zero.
    """
    n, g = len(kinds), len(panel.genes)
    if n == 0:
        return np.zeros((0, g), dtype=np.int64)
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"unknown kind {k!r}; valid: {', '.join(KINDS)}")
    share = np.stack([mean_profile(panel, k, t) for k, t in zip(kinds, ts)])  # (N, G)
    lib = mean_library_size * np.exp(rng.normal(0.0, library_sd, size=(n, 1)))
    mu = share * lib
    lam = rng.gamma(shape=dispersion, scale=mu / dispersion)
    counts = rng.poisson(lam)
    if dropout > 0:
        counts[rng.random(counts.shape) < dropout] = 0
    return counts
