"""Reading a user's inputs into AnnData, for :class:`vae.api.Study` (the public class).

:class:`StudyReadMixin` holds :meth:`vae.api.Study.read` (an ``.h5ad``, an expression
file, a folder of crops or of smears), :meth:`vae.api.Study.read_blocks` (an expression
file a block of rows at a time) and the checks around them (a file read whole that
cannot fit in memory, a detector changed since the study was loaded), with how the
study's training crops were cut (:meth:`vae.api.Study.training_crops`,
:class:`TrainingCrops`), which decides how new crops and smears are cut
(:meth:`vae.api.Study.crop_masks_for`, :data:`CROP_MASKS`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from segmentation.io import MANIFEST
from segmentation.schema import SCALE_SPREAD
from vae.study_common import StudyError, _file_stamp, log

# how crops and smears are cut for the model (Study.read's crop_masks, embed.crop_masks):
# auto = as the study's training crops (Study.training_crops: detector where they were
# masked, whole where they were unmasked squares, detector where it cannot be told) |
# detector = each cell cut out with the detector's instance mask (a crop folder: its
# centre cell) | whole = unmasked (a crop image whole; a smear's cell as its square box)
CROP_MASKS = ("auto", "detector", "whole")
# a study's training crops whole (unmasked) when more than this share of its paired rows'
# masks read whole (vae.inputs.query.whole_masks), else masked: a tie keeps the
# detector's cut, the behaviour before the study's cut was read
WHOLE_CROPS_SHARE = 0.5


def _available_memory() -> int | None:
    """Bytes of memory available now (Linux ``MemAvailable``), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reader_error(e) -> StudyError:
    """An expression reader's error, naming the :meth:`Study.read` argument of its field."""
    hint = {
        "expression.orientation": " (Study.read: orientation=...)",
        "expression.counts_layer": " (Study.read: counts_layer=...)",
    }.get(e.field, "")
    return StudyError(str(e) + hint)


@dataclass(frozen=True)
class TrainingCrops:
    """How a study's training crops were made (:meth:`Study.training_crops`).

    ``kind``: ``masked`` (each cell cut out with its instance mask, the background painted
    ``pair.background_value``: ``stage=segment``'s cells, ``segmentation_wbc``, ``coco``),
    ``whole`` (unmasked squares, background and red cells in view: ``pair.crop_sources``
    of kind ``image_folder``) or None (not known: no paired data, no record of the pair
    run; or no crop at all). ``evidence``: what it was read from, for the log.
    ``whole_share``: the share of the paired rows' masks read that are whole squares
    (None where read from the pair run's record)."""

    kind: str | None
    evidence: str
    whole_share: float | None = None

    @property
    def crop_masks(self) -> str:
        """The ``crop_masks`` that reads new cells like these: ``whole`` for unmasked
        crops, else ``detector`` (also where not known: the reading before 2026-12-06)."""
        return "whole" if self.kind == "whole" else "detector"

    @property
    def what(self) -> str:
        """The cut in a few words (``unmasked square crops`` ...)."""
        return {"whole": "unmasked square crops", "masked": "crops masked to the cell"}.get(
            str(self.kind), "crops of an unknown cut"
        )

    def describe(self) -> str:
        """The cut, what it shows and where it was read, for the log."""
        shows = {
            "whole": "background and red cells in view; ",
            "masked": "background blacked out; ",
        }.get(str(self.kind), "")
        return f"{self.what} ({shows}{self.evidence})"


# what each crop_masks does to the cells of a crop folder / of a smear
_CROP_MASKS_READS = {
    ("crops", "detector"): "each crop's centre cell cut out by the detector's mask",
    ("crops", "whole"): "each crop image whole, unmasked",
    ("smears", "detector"): "each cell cut out by the detector's mask",
    ("smears", "whole"): "each cell as its square box, unmasked",
}


class StudyReadMixin:
    """The reading of inputs of :class:`vae.api.Study`: paths to AnnData.

    Relies on these attributes of :class:`vae.api.Study` (set by its ``__init__``):
    ``config`` (``pair.background_value``), ``gene_names``, ``crop_size``,
    ``pair_crop_size``, ``device``, ``segmentation_model`` and ``_detector_stamp`` (the
    detector and its file as loaded), ``_paired_candidates`` (where the study's paired
    data may be), and the caches ``_training_crops`` (None until read),
    ``_crop_masks_said`` (set) and ``_read_whole`` (dict).
    """

    def training_crops(self) -> TrainingCrops:
        """How the crops the study was trained on were made: masked to the cell or whole
        unmasked squares (:class:`TrainingCrops`), read once.

        The paired data it was trained on (its own ``pair/paired.h5ad``, else the one its
        checkpoint names) holds it in its masks: ``pair.crop_sources`` of kind
        ``image_folder`` give every crop an all-True mask (the file read whole as the
        cell), every other kind the cell's instance mask
        (:func:`vae.inputs.query.paired_masks`: 256 image rows spread over the table).
        Whole more than :data:`WHOLE_CROPS_SHARE` of them: ``whole``. Without readable
        paired data, the pair run's record (``manifest.json`` beside it: the kinds of
        its ``pair.crop_sources``) says it where every source is of one cut. Neither:
        ``kind`` None (studies of any age: nothing new is needed from the study).

        Returns
        -------
        TrainingCrops
            ``kind`` (``"masked"``, ``"whole"`` or None: not known, or a study without
            crops), ``evidence`` (what it was read from, for the log) and
            ``whole_share`` (float in [0, 1], the share of the paired rows' masks read
            that are whole squares; None where read from the pair run's record). Read
            once per study and cached.
        """
        if self._training_crops is not None:
            return self._training_crops
        from vae.inputs.query import paired_masks

        found = None
        for p in self._paired_candidates:
            if not p.is_file():
                continue
            try:
                got = paired_masks(p)
            except (OSError, KeyError, ValueError, TypeError) as e:
                log.info("%s: its masks cannot be read (%s)", p, e)
                continue
            if got is None:  # a study without crops (expression only): nothing to match
                found = TrainingCrops(None, f"{p} holds no crop")
                break
            share = got.share
            kind = "whole" if share > WHOLE_CROPS_SHARE else "masked"
            found = TrainingCrops(
                kind,
                f"the masks of {p}: {got.whole} of {got.n} image rows read are whole squares",
                share,
            )
            if 0.05 < share < 0.95:
                log.warning(
                    "the study's training crops are mixed: %d of %d read in %s are unmasked "
                    "squares, the others masked to the cell; new cells are read as the "
                    "most (%s)",
                    got.whole,
                    got.n,
                    p,
                    kind,
                )
            break
        if found is None:
            found = self._training_crops_by_manifest()
        self._training_crops = found
        return found

    def _training_crops_by_manifest(self) -> TrainingCrops:
        """:meth:`training_crops` from the pair run's ``manifest.json`` (the kinds of its
        ``pair.crop_sources``), where the paired data are gone."""
        for p in self._paired_candidates:
            man = p.parent / MANIFEST
            try:
                rec = json.loads(man.read_text())
            except (OSError, ValueError):
                continue
            if not isinstance(rec, dict) or rec.get("stage") != "pair":
                continue
            sources = ((rec.get("config") or {}).get("pair") or {}).get("crop_sources") or []
            kinds = {str((src or {}).get("kind")) for src in sources if isinstance(src, dict)}
            if not kinds:
                continue
            said = f"{man}: pair.crop_sources of kind {', '.join(sorted(kinds))}"
            if kinds == {"image_folder"}:
                return TrainingCrops("whole", said)
            if "image_folder" not in kinds:
                return TrainingCrops("masked", said)
            return TrainingCrops(None, f"{said} (unmasked and masked; their shares unknown)")
        return TrainingCrops(
            None,
            "no paired data of the study to read its crops' masks from "
            f"({', '.join(map(str, self._paired_candidates)) or 'none recorded'}) and no "
            "record of its pair run",
        )

    def crop_masks_for(self, kind: str, crop_masks: str | None = "auto", setting: str = "") -> str:
        """The cut (``detector`` / ``whole``) that ``crop_masks`` gives the cells of a
        ``kind`` (``crops`` / ``smears``) input, said in the log once per study.

        ``auto`` (or None) follows :meth:`training_crops`: a study trained on unmasked
        square crops reads a crop folder whole and a smear's cells as their square boxes,
        unmasked; a masked one (or one whose crops cannot be told) the detector's masks
        (an info line says which and why). Given another cut than the study's training
        crops, a warning names ``setting`` (default ``crop_masks``) and what follows:
        the cells look unlike the study's training crops and most come out atypical.

        Parameters
        ----------
        kind : str
            The input's kind: ``"crops"`` (a crop folder) or ``"smears"`` (whole smears
            the detector segments); only the log's wording depends on it.
        crop_masks : str or None, default ``"auto"``
            ``"auto"`` (None reads the same), ``"detector"`` or ``"whole"``
            (:data:`CROP_MASKS`).
        setting : str, default ``""``
            The setting's name as the user gave it, for the messages (``""``:
            ``crop_masks``; ``stage=embed`` passes ``embed.crop_masks``).

        Returns
        -------
        str
            ``"detector"`` (each cell cut out with the detector's instance mask) or
            ``"whole"`` (unmasked: a crop image whole, a smear's cell as its square box).

        Raises
        ------
        StudyError
            ``crop_masks`` not one of :data:`CROP_MASKS`.
        """
        if crop_masks is None:
            crop_masks = "auto"
        if crop_masks not in CROP_MASKS:
            raise StudyError(f"crop_masks={crop_masks!r}; valid: {', '.join(CROP_MASKS)}")
        setting = setting or "crop_masks"
        study = self.training_crops()
        use = study.crop_masks if crop_masks == "auto" else crop_masks
        key = (kind, use)
        if key in self._crop_masks_said:
            return use
        self._crop_masks_said.add(key)
        reads = _CROP_MASKS_READS.get((kind, use), use)
        if crop_masks == "auto":
            log.info(
                "%s: %s=auto reads %s (%s), as the study's training crops: %s",
                kind,
                setting,
                reads,
                use,
                study.describe(),
            )
        elif study.kind is not None and use != study.crop_masks:
            premasked = (
                " (crops already cut out on the background value are found so and keep "
                "their own mask under the default)"
                if kind == "crops" and use == "whole"
                else ""
            )
            log.warning(
                "%s=%s reads %s %s, but the study was trained on %s: cells will look unlike "
                "the study's training crops and most will be called unclassified (atypical)"
                "%s. Leave %s unset (auto) to read them as the study's training crops",
                setting,
                use,
                kind,
                f"as {reads}",
                study.describe(),
                premasked,
                setting,
            )
        return use

    def read(
        self,
        path: str | Path,
        kind: str = "auto",
        background: int | None = None,
        segment_settings: Any = None,
        detector_kwargs: dict | None = None,
        estimate_cell_px: float | None = None,
        refine_scale: bool | None = None,
        estimate_scale: bool | None = None,
        scale_spread: float | None = SCALE_SPREAD,
        crop_masks: str | None = "auto",
        orientation: str = "auto",
        counts_layer: str | None = None,
    ):
        """Read one input into an AnnData (a folder's unreadable items in ``uns["rejects"]``).

        Parameters
        ----------
        path : ``.h5ad`` (cells.h5ad, paired.h5ad, expression), expression
            file (10x, CSV/TSV...), a folder of crops or of smears
        kind : ``auto`` (h5ad / expression file by suffix, a 10x matrix folder or Cell
            Ranger output folder as expression, other folders as crops), ``h5ad``,
            ``expression``, ``crops``, ``smears``
        orientation : for ``expression``: ``auto`` (default) tells which axis holds the
            genes from the model's gene names (a table or AnnData with them on the rows
            is transposed / refused as :func:`vae.inputs.expression.read_expression`
            says), ``cells_by_genes`` or ``genes_by_cells`` to say it
            (``expression.orientation`` of stage=embed)
        counts_layer : for ``expression``: where the raw counts are when not in ``X``
            or ``layers["counts"]``: a layer's name, or ``".raw"``
            (``expression.counts_layer`` of stage=embed, as for stage=expression).
            Without it, integer counts in ``.raw`` holding every gene of ``X`` are used
            (scanpy's usual layout: log-normalised ``X``, counts in ``.raw.X``)
        background : pixel value outside the mask (default: the study's ``pair.background_value``)
        crop_masks : for ``crops`` and ``smears``: how each cell is cut for the model.
            ``auto`` (default; None alike) as the study's training crops were
            (:meth:`training_crops`, :meth:`crop_masks_for`): ``whole`` for a study
            trained on unmasked square crops (``pair.crop_sources`` of kind
            ``image_folder``), else ``detector``. ``detector``: the study's detector
            finds the cell of each crop and keeps it with its instance mask, as
            ``stage=segment`` masks a crop folder
            (:func:`vae.inputs.query.segment_crop_folder`; a crop with no cell at its
            centre is a reject row), and cuts each smear cell out with its mask.
            ``whole``: a crop image is taken whole as the cell; a smear cell is cut as
            its square box with its surroundings, unmasked
            (:func:`vae.inputs.query.square_cells`). A cut other than the study's
            training crops' is warned of: on the real chain's (masked) test crops
            label transfer 0.849 masked by the detector vs 0.604 whole, five seeds
            (docs/embed.md, "Crop folders: what the mask buys"); an unmasked study
            called 24 of 24 detector-masked cells unclassified (atypical)
        segment_settings, detector_kwargs, estimate_cell_px : for ``smears`` and
            ``crops`` read by the detector
            (:func:`vae.inputs.query.segment_smear_folder`; ``estimate_cell_px``
            measures each image's magnification from its white cells, else red cells)
        refine_scale : when the scale is estimated: the detector's own confident white
            boxes refine each image's estimate (one more detector pass where they
            disagree; :func:`segmentation.magnification.refine_scale`); None (default):
            as the detector asks (the shipped one: on;
            :func:`segmentation.shipped.wants_scale_refinement`)
        estimate_scale : for ``smears`` without ``estimate_cell_px``: None (default)
            measures the magnification when the detector asks for it (the shipped one)
        scale_spread : when the scale is estimated, each image's estimate is held
            within this factor of the median estimate of the images of its
            (sub-)folder and pixel size (one microscope); 1: the median for all;
            None: each image on its own

        Returns
        -------
        AnnData; the reject rows of unreadable images are in ``uns["rejects"]``
        (list of dicts with ``input``, ``item``, ``reason``).
        """
        import anndata as ad

        from segmentation.magnification import RefineSettings
        from vae.inputs import query as Q

        p = Path(path)
        if not p.exists():
            raise StudyError(f"{p}: no such file or folder")
        if kind == "auto":
            from vae.inputs.expression import is_10x_folder

            if p.is_dir():  # a 10x folder read as crops gave 0 cells and no reject
                kind = "expression" if is_10x_folder(p) else "crops"
            else:
                kind = "h5ad" if p.suffix == ".h5ad" else "expression"
        bg = int(
            (self.config.get("pair") or {}).get("background_value", 0)
            if background is None
            else background
        )
        if kind == "h5ad":
            try:
                a = ad.read_h5ad(p)
            except Exception as e:  # noqa: BLE001
                raise StudyError(f"{p}: cannot read h5ad ({e})") from e
            a.uns["rejects"] = []
            return a
        if kind == "expression":
            from vae.inputs.expression import ExpressionInputError, counts_from, read_expression

            self.check_whole_read_fits(p, orientation)
            try:
                # the axes told by the model's own genes: the granule programs' few genes
                # (the default) may be absent from a query that holds every model gene
                a = read_expression(p, orientation=orientation, known_genes=self.gene_names)
                if counts_layer:
                    a = counts_from(a, counts_layer, str(p))
            except ExpressionInputError as e:
                raise _reader_error(e) from e
            a.uns["rejects"] = []
            return a
        if kind not in ("crops", "smears"):
            raise StudyError(f"kind={kind!r}; valid: auto, h5ad, expression, crops, smears")
        if crop_masks is not None and crop_masks not in CROP_MASKS:
            raise StudyError(f"crop_masks={crop_masks!r}; valid: {', '.join(CROP_MASKS)}")
        if not p.is_dir():
            raise StudyError(
                f"{p}: kind={kind!r} reads a folder of images (sub-folders = samples); this "
                "is a file: give the folder that holds it"
            )
        crop_masks = self.crop_masks_for(kind, crop_masks)
        if kind == "crops" and crop_masks == "whole":
            # each crop held at the model's side as it is read (20k crops: 3.85 -> 2.75
            # GiB peak); the resize prepare() would do later, so the same values
            model_crops = Q.ModelCrops(self.pair_crop_size, self.crop_size, bg)
            a, rej = Q.read_crop_folder(p, self.pair_crop_size, bg, model_crops=model_crops)
        else:
            from segmentation.io import UnsafeCheckpointError
            from segmentation.shipped import shipped_detector

            try:
                if self.segmentation_model is None:  # no study detector: the shipped one
                    self.segmentation_model = shipped_detector()
                    self._detector_stamp = _file_stamp(self.segmentation_model)
                self._check_detector_unchanged()
                if kind == "crops":
                    read = Q.segment_crop_folder
                else:  # a study trained on unmasked squares: each cell's square, unmasked
                    read = partial(Q.segment_smear_folder, unmasked=crop_masks == "whole")
                a, rej = read(
                    p,
                    self.segmentation_model,
                    settings=segment_settings,
                    device=self.device,
                    detector_kwargs=detector_kwargs,
                    estimate_cell_px=estimate_cell_px,
                    refine=RefineSettings() if refine_scale else refine_scale,  # None: as saved
                    estimate_scale=estimate_scale,
                    scale_spread=scale_spread,
                    model_crops=Q.ModelCrops(self.pair_crop_size, self.crop_size, bg),
                )
            except (RuntimeError, UnsafeCheckpointError) as e:
                raise StudyError(str(e)) from e
        a.uns["rejects"] = rej
        return a

    def check_whole_read_fits(self, path: Path, orientation: str = "auto") -> None:
        """Refuse an expression file read whole (:meth:`read`) that cannot fit in the
        memory available, with what to do: an OOM kill says nothing. The least it takes:
        the file read whole (:func:`vae.inputs.expression.whole_read_size`: an ``.h5ad``
        or 10x ``.h5``'s matrices as stored, a 10x matrix folder's entries, a table's
        values) and the model's genes of every cell made dense (float64 values, float32
        ``x`` and counts: 16 bytes a value).

        The advice follows why the file is read whole: where :meth:`read_blocks` gave
        None for it, the reason it found (a table's cells are counted on the axis it
        found too); else, for a file :meth:`read_blocks` may read by rows, that method.

        Parameters
        ----------
        path : an expression file or 10x matrix folder that :meth:`read` reads whole
        orientation : as :meth:`read` (a table's cells are its rows or its columns)

        Raises
        ------
        StudyError
            It does not fit: the message names the file, what it takes, what is
            available and what to give instead. A format not estimated passes.
        """
        from vae.inputs.expression import whole_read_size

        why = self._read_whole_why(path, orientation)
        if orientation == "auto" and why is not None:
            orientation = why.orientation  # the axis the table's names gave
        size, avail = whole_read_size(path, orientation), _available_memory()
        if size is None or avail is None:
            return
        need = size.need + size.cells * len(self.gene_names) * 16
        if need <= avail:
            return
        raise StudyError(
            f"{path}: read whole it takes at least {need / 2**30:.1f} GiB ({size.cells} "
            f"cells; {size.what}: {size.need / 2**30:.1f} GiB), more than the "
            f"{avail / 2**30:.1f} GiB available. {self._whole_read_fix(path, orientation, why)} "
            "(docs/embed.md, 'Large expression files')"
        )

    def _read_whole_why(self, path, orientation: str):
        """Why :meth:`read_blocks` last read ``path`` whole (a
        :class:`vae.inputs.expression.ReadWhole`), or None: not asked, asked with another
        orientation, or the file changed since."""
        got = self._read_whole.get(str(path))
        if got is None or got[0] != orientation or got[1] != _file_stamp(path):
            return None
        return got[2]

    @staticmethod
    def _whole_read_fix(path, orientation: str, why) -> str:
        """What to do about a file too large to read whole, by why it is read whole
        (``why``: a :class:`vae.inputs.expression.ReadWhole` or None, see
        :meth:`check_whole_read_fits`)."""
        from vae.inputs.expression import is_table, row_blocks_unsupported

        p = Path(path)
        if why is None and row_blocks_unsupported(p, orientation) is None:
            # Study.read: this file may be read by rows, which Study.read never does
            return (
                "Study.read reads a file whole; Study.read_blocks reads an .h5ad, a 10x .h5 "
                "or a table of cells as rows a block of rows at a time: blocks = "
                "st.read_blocks(path); parts = [st.embed(b, 'query', whole=blocks) for b in "
                "blocks] (None, and the log says why, where the file must be read whole)"
            )
        if p.is_dir():
            return (
                "A 10x matrix folder is read whole; an .h5ad or Cell Ranger's "
                "filtered_feature_bc_matrix.h5 is read a block of rows at a time: give that "
                "file, or convert the folder once (scanpy: sc.read_10x_mtx(FOLDER)"
                ".write_h5ad('query.h5ad'), which holds its entries only) and set "
                "embed.expression=query.h5ad"
            )
        if not is_table(p):
            return (
                "An .h5ad whose X, layers and .raw are stored as CSR (or dense), cells x "
                "genes, is read and embedded a block of rows at a time: write it so "
                "(anndata: adata.X = scipy.sparse.csr_matrix(adata.X); adata.write_h5ad(...))"
            )
        rows = "A table of cells as rows is read a block of rows at a time; this one is read whole"
        if why is None or why.reason == "genes_as_rows":  # why None: genes_by_cells said
            detail = f"expression.orientation={orientation}" if why is None else str(why)
            return f"{rows} ({detail}): write it with cells as rows, or as a CSR .h5ad"
        if why.reason == "mixed_ids":
            return (
                f"{rows}: its cell ids read as numbers in some blocks and as text in others "
                f"({why}), so read by blocks they would not be the ids the whole table "
                "gives: make every id text (e.g. prefix 'c': c001 for 001) and it is read "
                "by blocks"
            )
        if why.reason in ("text_value", "unparsed"):
            return (
                f"{rows}: it holds {why}; read whole it is refused for that too: correct "
                "the table (numbers only, one field a gene on every row)"
            )
        if why.reason == "counts_layer":
            return f"{rows}: {why}: a table has no layer, unset expression.counts_layer"
        return f"{rows} ({why}): write it with cells as rows and numbers only, or as a CSR .h5ad"

    def read_blocks(
        self,
        path: str | Path,
        orientation: str = "auto",
        counts_layer: str | None = None,
        rows: int | None = None,
    ):
        """An ``.h5ad``, 10x ``.h5`` or CSV / TSV expression file as blocks of rows, for
        :meth:`embed` a block at a time (``embed(block, source, whole=blocks)``), or None
        where the file is read whole by :meth:`read` instead (another format, a table
        with genes as rows; see :func:`vae.inputs.expression.row_blocks_unsupported`).

        Only ``obs`` and ``var`` are held whole: a block holds its rows of ``X``, of every
        layer and of ``.raw`` (all genes), the reading :meth:`read` with
        ``kind="expression"`` gives of them. Peak memory goes with the block, not the
        file (docs/embed.md, "Large expression files"). A table is parsed once here (its
        row names and each column's value tests) and once more as its blocks are read.

        Parameters
        ----------
        path : the expression file
        orientation, counts_layer : as :meth:`read`
        rows : cells a block (default
            :data:`vae.inputs.expression.EMBED_BLOCK_ROWS`; a wide table's blocks hold at
            most :data:`vae.inputs.expression.TABLE_BLOCK_VALUES` values)

        Returns
        -------
        :class:`vae.inputs.expression.H5adRowBlocks` (or its 10x ``.h5`` kind, or
        :class:`vae.inputs.expression.CsvRowBlocks`; iterable of AnnData blocks;
        ``n_obs``, ``obs``, ``var``) or None. Why it is None is logged and kept for
        :meth:`check_whole_read_fits` of the same file (its advice follows it).
        Iterating a table's blocks raises
        :class:`vae.inputs.expression.ExpressionInputError` where the table changed
        since this first pass.
        """
        from vae.inputs.expression import (
            CsvRowBlocks,
            ExpressionInputError,
            H5adRowBlocks,
            ReadWhole,
            TenxH5RowBlocks,
            is_table,
            row_blocks_unsupported,
        )

        self._read_whole.pop(str(path), None)
        stamp = _file_stamp(path)

        def whole(why: ReadWhole) -> None:
            # kept for check_whole_read_fits, whose refusal says what to do about it; a
            # copy: the raised one's traceback holds the reader's frames (a block of values)
            kept = ReadWhole(str(why), reason=why.reason, orientation=why.orientation)
            self._read_whole[str(path)] = (orientation, stamp, kept)

        why = row_blocks_unsupported(path, orientation)
        if why is not None:
            log.debug("%s: read whole (%s)", path, why)
            return whole(
                ReadWhole(
                    why,
                    reason="genes_as_rows" if orientation == "genes_by_cells" else "layout",
                    orientation=orientation,
                )
            )
        if is_table(path):
            if counts_layer:  # a table has no layer: read whole, which says so
                return whole(
                    ReadWhole(f"expression.counts_layer={counts_layer}", reason="counts_layer")
                )
            try:
                return CsvRowBlocks(
                    path, orientation=orientation, known_genes=self.gene_names, rows=rows
                )
            except ReadWhole as e:
                log.info("%s: read whole (%s)", path, e)
                return whole(e)
            except ExpressionInputError as e:
                raise _reader_error(e) from e
        reader = TenxH5RowBlocks if str(path).lower().endswith(".h5") else H5adRowBlocks
        try:
            return reader(
                path,
                orientation=orientation,
                known_genes=self.gene_names,
                counts_layer=counts_layer,
                rows=rows,
            )
        except ExpressionInputError as e:
            raise _reader_error(e) from e

    def _check_detector_unchanged(self) -> None:
        """Raise when the detector file is gone or changed since the study was loaded."""
        seg, was = self.segmentation_model, self._detector_stamp
        if seg is None or was is None:
            return
        now = _file_stamp(seg)
        if now == was:
            return
        what = (
            "is gone (being rewritten by stage=segment_train?)"
            if now is None
            else "changed since this study was loaded (retrained or replaced)"
        )
        raise StudyError(
            f"segmentation model={seg}: {what}; load the study again (Study.load) to read "
            f"images with the detector it has now"
        )

    def _as_adata(self, data, kind: str):
        return self.read(data, kind) if isinstance(data, str | Path) else data
