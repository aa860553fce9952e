"""Write the images of ``train.py predict`` (sampling with test-time guidance, e.g. A-STAR) as PNGs plus a JSONL
manifest, crash-safe and resumable."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from comat_lightning.errors import InputError
from comat_lightning.files.atomic import atomic_write, write_bytes_atomically
from comat_lightning.files.images import to_uint8
from comat_lightning.files.record_fields import CONCEPTS

KEY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
MAPS_DIR = "maps"
REQUIRED_FIELDS = ("images", "prompts", "seeds", "keys", "settings")
_MANIFEST_NAME = re.compile(r"manifest(\.rank\d+)?\.jsonl")
_CONCEPT_CHARS = re.compile(r"[^A-Za-z0-9-]+")
_MAX_CONCEPT_CHARS = 48


def check_key(key: Any) -> str:
    """``key`` itself, or ValueError: keys become file names, so they may not hold path separators or anything
    outside ``[A-Za-z0-9._-]``, start with ``.`` (hidden files, ``..``) or ``-``, or be longer than 200."""
    if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
        raise ValueError(
            f"ImageWriter: key {key!r} is not a safe file name: use 1-200 characters from [A-Za-z0-9._-], starting "
            "with a letter or digit (no path separators)"
        )
    return key


def manifest_name(rank: int, world_size: int) -> str:
    """``manifest.jsonl`` for a single process, ``manifest.rank{N}.jsonl`` per rank under several processes."""
    return "manifest.jsonl" if world_size <= 1 else f"manifest.rank{rank}.jsonl"


def read_manifest(path: Path) -> tuple[list[dict[str, Any]], bytes]:
    """The entries of an ImageWriter manifest and its bytes. A last line without its newline that does not parse is a
    partial append (a crash mid-write, possibly inside a UTF-8 character) and is ignored; any other bad line is
    an error naming ``file:line``."""
    raw = path.read_bytes()
    lines = raw.split(b"\n")  # the last item is b"" when the file ends with a newline
    entries = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line.decode("utf-8"))
        except (ValueError, RecursionError) as err:  # not UTF-8, not JSON, an integer too long, nested too deep
            if number == len(lines):
                continue
            raise InputError(f"{path}:{number}: not valid UTF-8 JSON ({err}); fix or delete the line") from err
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str) or not KEY_PATTERN.fullmatch(entry["key"]):
            raise InputError(f'{path}:{number}: not an ImageWriter entry (needs a file-safe string "key")')
        entries.append(entry)
    return entries, raw


def concept_file_stems(concepts: list[str]) -> list[str]:
    """File-name stems for one image's concepts: runs of characters outside ``[A-Za-z0-9-]`` become ``-`` (never
    ``_``, so ``<key>_<stem>`` splits back at its last ``_`` and two keys can never collide), at most 48 characters,
    ``-2``, ``-3``, ... appended to repeats within the image."""
    stems: list[str] = []
    for concept in concepts:
        base = _CONCEPT_CHARS.sub("-", str(concept)).strip("-")[:_MAX_CONCEPT_CHARS].strip("-") or "concept"
        stem, n = base, 1
        while stem in stems:
            n += 1
            stem = f"{base}-{n}"
        stems.append(stem)
    return stems


class ImageWriter(BasePredictionWriter):
    """Write each image that ``predict_step`` returns as ``<output_dir>/<key>.png`` (8-bit RGB) and one line per image
    in ``<output_dir>/manifest.jsonl``: ``{"key", "prompt", "seed", "file", "settings"}`` plus ``"concepts"`` when
    given and ``"maps"`` when written (paths relative to ``output_dir``).

    ``predict_step`` returns a dict: ``images`` (B, 3, H, W) in [0, 1] (clamped; NaN/inf refused), ``prompts``,
    ``seeds`` and ``keys`` (one per image; the key is the file name and the resume id), ``settings`` (JSON,
    copied into every entry), optionally ``concept_maps`` (B, C, h, w) in [0, 1] with ``concepts`` (per image, C
    words). ``None`` or an empty batch writes nothing (e.g. every image of the batch was already done).

    - Resume: :meth:`is_done` (the PNG exists and a manifest lists it) lets ``predict_step`` skip finished images
      before sampling; an image already done that arrives anyway is not rewritten. Start-up repairs the manifest:
      a trailing partial line (a crash mid-append) is dropped, and so are entries whose PNG is gone, so they are
      redone without a duplicate line. Turning ``write_concept_maps`` on for a folder of finished images does not
      add their maps: use a fresh ``output_dir`` or ``overwrite``.
    - ``overwrite``: nothing is skipped; the manifest starts empty (replaced atomically at start-up, so entries of
      images this run does not redo are dropped, their PNGs stay); PNGs are replaced as they are redone.
    - ``write_concept_maps``: ``<output_dir>/maps/<key>_<concept>.png``, 8-bit grayscale (map x 255, no per-map
      renormalisation, so maps compare), upsampled with nearest to the image's H x W so they overlay it; concept
      names are made file-safe by :func:`concept_file_stems`.
    - Crash safety: every PNG goes to a temporary name in its folder, is fsynced, then ``os.replace``-d, so a file
      under its final name is complete; maps, then the image, then its manifest line are written, so a listed image
      has all its files. Each manifest line is one ``write`` + fsync. Leftover temporary files are removed at
      start-up.
    - Several processes (DDP): Lightning's predict sampler gives each rank distinct samples; each rank writes its
      own images and appends to its own ``manifest.rank{N}.jsonl``. All manifests of the folder count as done
      (the number of devices may change between runs); rank 0 also tidies the ones no rank of this run owns. Read
      every ``manifest*.jsonl`` of the folder together. One run per ``output_dir`` at a time.

    ``trainer.predict`` keeps every returned dict (images included) in memory unless ``return_predictions=False``
    (``--return_predictions false`` on the CLI): pass it for long runs.
    """

    def __init__(self, output_dir: str, write_concept_maps: bool = False, overwrite: bool = False):
        super().__init__(write_interval="batch")
        if not isinstance(output_dir, (str, os.PathLike)) or not str(output_dir).strip():
            raise InputError(f"ImageWriter: output_dir must be a non-empty path, got {output_dir!r}")
        self.output_dir = Path(output_dir)
        self.write_concept_maps = write_concept_maps
        self.overwrite = overwrite
        self.rank = 0
        self.world_size = 1
        self.written = 0  # images written by this process in this run
        self.skipped = 0  # images that arrived already done (predict_step did not skip them)
        self.done_at_start = 0  # finished images the folder held when this run started
        self._recorded: Optional[set[str]] = None  # keys listed by a manifest; None until prepare()
        self._warned_no_maps = False

    # -- start-up ---------------------------------------------------------------------------------------------------

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "predict":
            self.prepare(rank=trainer.global_rank, world_size=trainer.world_size)

    def prepare(self, rank: int = 0, world_size: int = 1) -> None:
        """Create ``output_dir``, remove this rank's leftover temporary files, repair (or, with ``overwrite``,
        restart) the manifests this process owns and load which keys are done. ``setup`` calls it; call it
        yourself only to use the writer without a Trainer."""
        self.rank, self.world_size = rank, world_size
        self.written = self.skipped = 0
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise InputError(f"ImageWriter: output_dir '{self.output_dir}' cannot be created: {err}") from err
        if not os.access(self.output_dir, os.W_OK | os.X_OK):
            raise InputError(f"ImageWriter: output_dir '{self.output_dir}' is not writable")
        self._remove_leftovers()
        own = manifest_name(rank, world_size)
        live = {manifest_name(r, world_size) for r in range(world_size)}
        existing = sorted(p.name for p in self.output_dir.iterdir() if _MANIFEST_NAME.fullmatch(p.name))
        # Rank 0 also tidies the manifests of ranks absent from this run (another device count); no one writes them.
        tended = [name for name in existing if name == own or (rank == 0 and name not in live)]
        if self.overwrite:
            for name in tended:
                if name == own:
                    write_bytes_atomically(self.output_dir / own, b"", self._tmp_suffix)
                else:
                    (self.output_dir / name).unlink(missing_ok=True)
            self._recorded = set()
            self.done_at_start = 0
            return
        recorded: set[str] = set()
        for name in existing:
            path = self.output_dir / name
            entries, raw = read_manifest(path)
            if name in tended:
                # Keep finished entries, the last per key; drop the partial trailing line and entries whose PNG
                # is gone (they will be redone and would otherwise appear twice).
                kept = {e["key"]: e for e in entries if (self.output_dir / f"{e['key']}.png").is_file()}
                repaired = b"".join(_manifest_line(e) for e in kept.values())
                if repaired != raw:
                    write_bytes_atomically(path, repaired, self._tmp_suffix)
                entries = list(kept.values())
            recorded.update(e["key"] for e in entries)
        self._recorded = recorded
        self.done_at_start = len(self.done_keys())

    def _remove_leftovers(self) -> None:
        """Temporary files of a process killed mid-write: this rank's, or every rank's for a single process."""
        pattern = f".*{self._tmp_suffix}" if self.world_size > 1 else ".*.tmp-rank*"
        for folder in (self.output_dir, self.output_dir / MAPS_DIR):
            if folder.is_dir():
                for leftover in folder.glob(pattern):
                    leftover.unlink(missing_ok=True)

    @property
    def _tmp_suffix(self) -> str:
        return f".tmp-rank{self.rank}"

    @property
    def manifest_path(self) -> Path:
        """The manifest this process appends to."""
        return self.output_dir / manifest_name(self.rank, self.world_size)

    # -- resume -----------------------------------------------------------------------------------------------------

    def is_done(self, key: str) -> bool:
        """Whether ``<key>.png`` exists and a manifest lists it (with ``overwrite``: written by this run)."""
        check_key(key)
        return key in self._ready() and (self.output_dir / f"{key}.png").is_file()

    def done_keys(self) -> set[str]:
        """Every key :meth:`is_done` holds for."""
        return {key for key in self._ready() if (self.output_dir / f"{key}.png").is_file()}

    def _ready(self) -> set[str]:
        if self._recorded is None:
            raise RuntimeError("ImageWriter: not set up yet; it is set up by trainer.predict (or call prepare())")
        return self._recorded

    # -- writing ----------------------------------------------------------------------------------------------------

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx: int, dataloader_idx: int) -> None:
        self.write_prediction(prediction)

    def on_predict_end(self, trainer, pl_module) -> None:
        rank_zero_info(
            f"ImageWriter: {self.written} images written to {self.output_dir}, which held {self.done_at_start} finished"
            " images at start"
            + (f" (rank 0 of {self.world_size})" if self.world_size > 1 else "")
        )

    def write_prediction(self, prediction: Optional[dict[str, Any]]) -> list[str]:
        """Write one ``predict_step`` result; return the keys written (already-done keys are left as they are)."""
        recorded = self._ready()
        if prediction is None:
            return []
        images, maps, items = _check_prediction(prediction)
        if maps is not None and self.write_concept_maps:
            maps = torch.nn.functional.interpolate(maps, size=images.shape[-2:], mode="nearest")
        elif self.write_concept_maps and images.shape[0] and not self._warned_no_maps:
            self._warned_no_maps = True
            rank_zero_warn("ImageWriter: write_concept_maps is on but predict_step returned no concept_maps")
        written = []
        for i, (key, prompt, seed, concepts) in enumerate(items):
            if self.is_done(key):
                self.skipped += 1
                continue
            entry: dict[str, Any] = {"key": key, "prompt": prompt, "seed": seed, "file": f"{key}.png", "settings": prediction["settings"]}
            if concepts is not None:
                entry[CONCEPTS] = concepts
            if maps is not None and self.write_concept_maps:
                (self.output_dir / MAPS_DIR).mkdir(exist_ok=True)
                entry["maps"] = []
                for stem, grey in zip(concept_file_stems(concepts), to_uint8(maps[i])):
                    rel = f"{MAPS_DIR}/{key}_{stem}.png"
                    self._save_png(grey.numpy(), "L", self.output_dir / rel)
                    entry["maps"].append(rel)
            self._save_png(to_uint8(images[i]).permute(1, 2, 0).contiguous().numpy(), "RGB", self.output_dir / entry["file"])
            self._append_manifest(entry)
            recorded.add(key)
            written.append(key)
            self.written += 1
        return written

    def _save_png(self, array, mode: str, path: Path) -> None:
        from PIL import Image

        with atomic_write(path, self._tmp_suffix) as tmp:
            Image.fromarray(array, mode).save(tmp, format="PNG")

    def _append_manifest(self, entry: dict[str, Any]) -> None:
        line = _manifest_line(entry)
        # One unbuffered O_APPEND write (looped only if the OS writes part of it), then fsync: after a crash the
        # manifest ends with whole lines, or with one partial line that the next start-up drops.
        fd = os.open(self.manifest_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)


def _check_prediction(prediction: Any) -> tuple[torch.Tensor, Optional[torch.Tensor], list[tuple]]:
    """Validate ``predict_step``'s dict; return images and maps (float32, CPU) and (key, prompt, seed, concepts)."""
    if not isinstance(prediction, dict):
        raise TypeError(f"ImageWriter: predict_step must return a dict (or None), got {type(prediction).__name__}")
    missing = [f for f in REQUIRED_FIELDS if f not in prediction]
    if missing:
        raise ValueError(f"ImageWriter: predict_step's dict lacks {missing} (needs {list(REQUIRED_FIELDS)})")
    images = prediction["images"]
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"ImageWriter: 'images' must be a (B, 3, H, W) tensor, got {getattr(images, 'shape', type(images))}")
    images = images.detach().to("cpu", torch.float32)
    batch = images.shape[0]
    for field in ("prompts", "seeds", "keys"):
        if len(prediction[field]) != batch:
            raise ValueError(f"ImageWriter: '{field}' has {len(prediction[field])} items for {batch} images")
    try:
        json.dumps(prediction["settings"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"ImageWriter: 'settings' must be JSON-serialisable ({err})") from err
    keys = [check_key(k) for k in prediction["keys"]]
    if len(set(keys)) != batch:
        raise ValueError(f"ImageWriter: 'keys' repeats within the batch: {keys}")
    if not torch.isfinite(images).all():
        bad = sorted({keys[i] for i in torch.nonzero(~torch.isfinite(images).flatten(1).all(1)).flatten().tolist()})
        raise ValueError(f"ImageWriter: 'images' holds NaN or inf for keys {bad}")
    maps, concepts = prediction.get("concept_maps"), prediction.get(CONCEPTS)
    if maps is not None:
        if not isinstance(maps, torch.Tensor) or maps.ndim != 4 or maps.shape[0] != batch:
            raise ValueError(f"ImageWriter: 'concept_maps' must be a (B, C, h, w) tensor with B={batch}, got {getattr(maps, 'shape', type(maps))}")
        if concepts is None or len(concepts) != batch or any(len(c) != maps.shape[1] for c in concepts):
            raise ValueError(f"ImageWriter: 'concepts' must list {maps.shape[1]} words per image to name 'concept_maps' channels")
        maps = torch.nan_to_num(maps.detach().to("cpu", torch.float32), nan=0.0)  # an all-zero map has NaN after normalising
    if concepts is not None and len(concepts) != batch:
        raise ValueError(f"ImageWriter: 'concepts' has {len(concepts)} items for {batch} images")
    items = [
        (key, str(prediction["prompts"][i]), int(prediction["seeds"][i]), None if concepts is None else [str(c) for c in concepts[i]])
        for i, key in enumerate(keys)
    ]
    return images, maps, items


def _manifest_line(entry: dict[str, Any]) -> bytes:
    return (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")



