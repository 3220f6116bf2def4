"""How much cell-type information can the VAE's image encoder pull from these crops at all?

A reference for issue 9's image-latent targets: the same ``ImageEncoder``
(architecture, widths, masked input) trained **supervised** on the labelled crops
of a ``paired.h5ad`` (cross-entropy of a linear head on its mean, no decoder, no
KL), with the trainer's augmentations, on the same seeded train+val / test split
as ``stage=train`` (``vae.data.stratified_split``; rows of one ``obs['specimen']``
stay together). It prints the test accuracy of the head and the kNN(15) accuracy
of the encoder's mean (the number ``scripts/image_branch_check.py`` reports for a
VAE as ``knn_image``), next to raw-pixel PCA, and writes JSON.

    .venv/bin/python scripts/image_encoder_ceiling.py outputs/real/pair/paired.h5ad \\
        [--rotate 0.1] [--image-input stain] [--epochs 40] [--seed 0] [--out ceiling.json] \\
        [--encoder resnet18 [--backbone-weights DETECTOR.pt]] [--pseudo-weight 1] \\
        [--normalise source] [--adversarial-source 0.1]

``--pseudo-weight`` adds FixMatch on the crops without a label, ``--normalise source``
Reinhard colour normalisation per ``obs['image_source']``, ``--adversarial-source`` a
source classifier through gradient reversal (DANN); none of the three helped (5 seeds,
docs/vae.md, "Unlabelled crops, stain normalisation, source-blind codes").

``--encoder resnet18`` trains :class:`vae.backbone.ResNetImageEncoder` (as
``vae.image_encoder=resnet18``), from ``--backbone-weights`` when given (as
``vae.image_backbone_weights``).

The last line reads ``supervised encoder: head A.AAA | kNN K.KKK | pixel PCA P.PPP``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _reinhard_by_source(d, source) -> None:
    """In place: each source's cell pixels moved to the mean / sd (CIELAB) of all cells."""
    import torch

    from vae.stain import lab_stats, match_stain

    rows = np.flatnonzero(d.has_image.numpy().astype(bool))
    crops = d.crops[rows].permute(0, 2, 3, 1).numpy()  # (N, S, S, 3) uint8
    m = d.masks[rows, 0].numpy().astype(bool)
    out = match_stain(crops, m, *lab_stats(crops, m), groups=source[rows])
    out[~m] = 0
    d.crops[rows] = torch.as_tensor(out).permute(0, 3, 1, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("paired", type=Path)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--rotate", type=float, default=0.0, help="as trainer.rotate")
    ap.add_argument("--stain-jitter", type=float, default=0.3, help="as trainer.stain_jitter")
    ap.add_argument("--image-input", default="rgb", help="as vae.image_input (rgb | stain)")
    ap.add_argument("--seed", type=int, default=0, help="as seed (split and init)")
    ap.add_argument("--encoder", default="conv", help="as vae.image_encoder (conv | resnet18)")
    ap.add_argument(
        "--channels",
        default="16,32,64,64",
        help="conv encoder widths, one per /2 (as vae.encoder_channels)",
    )
    ap.add_argument(
        "--backbone-weights", type=Path, default=None, help="as vae.image_backbone_weights"
    )
    ap.add_argument(
        "--pseudo-weight",
        type=float,
        default=0.0,
        help="FixMatch-style term on the crops without a label (0: off)",
    )
    ap.add_argument("--pseudo-threshold", type=float, default=0.95)
    ap.add_argument(
        "--normalise",
        default="none",
        choices=["none", "source"],
        help="source: Reinhard colour normalisation of each obs['image_source'] to the "
        "mean / sd (CIELAB, cell pixels) of all crops",
    )
    ap.add_argument(
        "--adversarial-source",
        type=float,
        default=0.0,
        help="weight of a source classifier on the code through gradient reversal (DANN; "
        "0: off): the code is pushed to forget which data set a crop came from",
    )
    ap.add_argument(
        "--contrastive",
        type=float,
        default=0.0,
        help="weight of a SimCLR term (NT-Xent between two augmented views of each crop, "
        "labelled and unlabelled) on the encoder's mean",
    )
    ap.add_argument("--contrastive-temperature", type=float, default=0.2)
    ap.add_argument(
        "--supcon",
        type=float,
        default=0.0,
        help="weight of a supervised contrastive term (Khosla et al. 2020): two augmented "
        "views of each labelled crop of the batch, every crop of the same label a positive",
    )
    ap.add_argument(
        "--label-smoothing",
        type=float,
        default=0.0,
        help="label smoothing of the supervised cross-entropy (noisy labels: BCCD labels "
        "whole images, not cells)",
    )
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import anndata as ad
    import torch
    import torch.nn.functional as F
    from image_branch_check import _knn  # the kNN(15) the VAE's knn_image is scored with

    from pipeline.stages.train import split_groups
    from vae.data import (
        UNKNOWN_LABEL,
        augment_dihedral,
        augment_rotate,
        augment_stain,
        from_anndata,
        stratified_split,
    )
    from vae.losses import view_contrast_loss
    from vae.model import ImageEncoder

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    adata = ad.read_h5ad(args.paired)
    d = from_anndata(adata, str(args.paired))
    lab = d.labels.numpy()
    if args.normalise == "source":
        _reinhard_by_source(d, adata.obs["image_source"].astype(str).to_numpy())
    groups = split_groups(adata.obs, "specimen", args.paired)  # as stage=train splits
    split = stratified_split(lab, 0.15, 0.15, args.seed, groups=groups)
    known = np.asarray(d.label_names)[lab] != UNKNOWN_LABEL  # unlabelled crops: not scored
    rows = d.has_image.numpy().astype(bool) & known
    fit = np.flatnonzero(rows & (split != "test"))
    test = np.flatnonzero(rows & (split == "test"))
    # crops without a label (train+val side only): FixMatch's unlabelled pool
    unl = np.flatnonzero(d.has_image.numpy().astype(bool) & ~known & (split != "test"))
    n_classes = len(d.label_names)

    from sklearn.decomposition import PCA

    pix = (d.crops.float() / 255 * d.masks.float()).flatten(1).numpy()
    pca = PCA(16, random_state=0).fit(pix[fit])
    pc = pca.transform(pix)
    pca_knn = _knn(pc[fit], lab[fit], pc[test], lab[test])

    if args.encoder == "resnet18":
        from vae.backbone import ResNetImageEncoder, load_backbone

        enc = ResNetImageEncoder(d.crop_size, 24)
        if args.backbone_weights:
            load_backbone(enc, args.backbone_weights)
    else:
        channels = [int(c) for c in args.channels.split(",")]
        enc = ImageEncoder(d.crop_size, channels, 24, "residual", args.image_input)
    head = torch.nn.Linear(24, n_classes)
    src_names, src_code = np.unique(adata.obs["image_source"].astype(str), return_inverse=True)
    src_head = torch.nn.Sequential(
        torch.nn.Linear(24, 32), torch.nn.ReLU(), torch.nn.Linear(32, len(src_names))
    )

    class _Reverse(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            return -g

    proj = torch.nn.Sequential(torch.nn.Linear(24, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    params = [*enc.parameters(), *head.parameters(), *src_head.parameters(), *proj.parameters()]
    opt = torch.optim.AdamW(params, 1e-3, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()

    def encode() -> np.ndarray:
        enc.eval()
        with torch.no_grad():
            out = []
            for j in range(0, d.n, 256):
                img = d.crops[j : j + 256].float() / 255
                m = d.masks[j : j + 256].float()
                out.append(enc(img * m, m)[0])
        enc.train()
        return torch.cat(out).numpy()

    def views(rows: torch.Tensor, rotate: float, stain: float) -> torch.Tensor:
        """Projected codes of one augmented view of ``rows`` (the contrastive terms)."""
        vi, vm = d.crops[rows].float() / 255, d.masks[rows].float()
        vi, vm = augment_dihedral(vi, vm, gen)
        if rotate > 0:
            vi, vm, _ = augment_rotate(vi, vm, gen, rotate)
        vi = augment_stain(vi, stain, gen) * vm
        return proj(enc(vi, vm)[0])

    history = []
    for ep in range(args.epochs):
        perm = fit[np.random.default_rng(args.seed * 1000 + ep).permutation(fit.size)]
        for i in range(0, perm.size, 64):
            idx = torch.as_tensor(perm[i : i + 64])
            img, m = d.crops[idx].float() / 255, d.masks[idx].float()
            img, m = augment_dihedral(img, m, gen)
            if args.rotate > 0:
                img, m, _ = augment_rotate(img, m, gen, args.rotate)
            img = augment_stain(img, args.stain_jitter, gen) * m
            mu = enc(img, m)[0]
            loss = F.cross_entropy(
                head(mu), torch.as_tensor(lab[idx.numpy()]), label_smoothing=args.label_smoothing
            )
            if args.adversarial_source > 0:
                # labelled and unlabelled crops alike: a source head learns the data set,
                # the reversed gradient makes the encoder hide it
                u = torch.as_tensor(unl[torch.randint(unl.size, (64,), generator=gen).numpy()])
                ui, um = d.crops[u].float() / 255, d.masks[u].float()
                ui, um = augment_dihedral(ui, um, gen)
                ui = augment_stain(ui, args.stain_jitter, gen) * um
                z_all = torch.cat([mu, enc(ui, um)[0]])
                s_all = torch.as_tensor(
                    np.concatenate([src_code[idx.numpy()], src_code[u.numpy()]])
                )
                loss = loss + args.adversarial_source * F.cross_entropy(
                    src_head(_Reverse.apply(z_all)), s_all
                )
            if args.pseudo_weight > 0 and unl.size:
                # FixMatch (Sohn et al. 2020): the head's confident call on a weak view
                # (flips only) is the target for a strong view (flips, stain, rotation)
                u = torch.as_tensor(unl[torch.randint(unl.size, (128,), generator=gen).numpy()])
                ui, um = d.crops[u].float() / 255, d.masks[u].float()
                wi, wm = augment_dihedral(ui, um, gen)
                with torch.no_grad():
                    p = head(enc(wi * wm, wm)[0]).softmax(1)
                conf, target = p.max(1)
                si, sm = augment_dihedral(ui, um, gen)
                si, sm, _ = augment_rotate(si, sm, gen, max(args.rotate, 0.1))
                si = augment_stain(si, max(args.stain_jitter, 0.3), gen) * sm
                lu = F.cross_entropy(head(enc(si, sm)[0]), target, reduction="none")
                loss = loss + args.pseudo_weight * (lu * (conf >= args.pseudo_threshold)).mean()
            if args.contrastive > 0:
                # SimCLR (Chen et al. 2020): two strong views of each crop (labelled and
                # unlabelled, train side only) should find each other among the batch
                pool = np.concatenate([fit, unl])
                u = torch.as_tensor(pool[torch.randint(pool.size, (64,), generator=gen).numpy()])
                za, zb = (
                    views(u, max(args.rotate, 0.1), max(args.stain_jitter, 0.3)) for _ in "ab"
                )
                loss = loss + args.contrastive * view_contrast_loss(
                    za, zb, args.contrastive_temperature
                )
            if args.supcon > 0:
                zz = F.normalize(
                    torch.cat([views(idx, args.rotate, args.stain_jitter) for _ in "ab"]), dim=1
                )
                yy = torch.as_tensor(lab[idx.numpy()]).repeat(2)
                sim = zz @ zz.T / args.contrastive_temperature
                eye = torch.eye(len(yy), dtype=torch.bool)
                sim = sim.masked_fill(eye, float("-inf"))
                logp = sim.log_softmax(1)
                pos = (yy[:, None] == yy[None, :]) & ~eye
                lsc = -(logp.masked_fill(~pos, 0).sum(1) / pos.sum(1).clamp_min(1))
                loss = loss + args.supcon * lsc.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        if (ep + 1) % 10 == 0 or ep + 1 == args.epochs:
            z = encode()
            with torch.no_grad():
                acc = float((head(torch.as_tensor(z[test])).argmax(1).numpy() == lab[test]).mean())
            history.append(
                {"epoch": ep + 1, "head": acc, "knn": _knn(z[fit], lab[fit], z[test], lab[test])}
            )
            print(
                f"epoch {ep + 1}: head {acc:.3f} kNN {history[-1]['knn']:.3f} "
                f"({time.time() - t0:.0f} s)",
                flush=True,
            )
    res = {
        "paired": str(args.paired),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "n_fit": int(fit.size),
        "n_test": int(test.size),
        "majority": float(np.bincount(lab[test]).max() / test.size),
        "pixel_pca_knn": pca_knn,
        "head": history[-1]["head"],
        "knn": history[-1]["knn"],
        "history": history,
    }
    # default under outputs/ (git-ignored), not the working directory
    out = args.out or Path("outputs") / "image_encoder_ceiling.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(
        f"supervised encoder: head {res['head']:.3f} | kNN {res['knn']:.3f} | "
        f"pixel PCA {pca_knn:.3f}"
    )


if __name__ == "__main__":
    main()
