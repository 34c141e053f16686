"""PhilEO Bench downstream input: `.npy` files in directories, zip archives or multi-part zips.

Files are named `{region}_{tile}_{split}_{kind}.npy` (region without "_", tile may hold "_").
They may sit in a directory tree, in `.zip` archives (in any subfolder of the archive), or in
multi-part archives `name.zip.001, name.zip.002, ...` (byte-wise splits of one zip), which are
read through one concatenating seekable file object: nothing is ever unpacked to disk.

Arrays are read streaming, one row (= one patch, 128 x 128 or 224 x 224) at a time: `np.load(mmap_mode="r")`
for plain files; for zip members the npy header is parsed and rows are read from the member
stream (stored or deflated). A file is never loaded whole.
"""

from __future__ import annotations

import bisect
import io
import logging
import math
import os
import re
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from phileo.phileo_bench import REGIONS, SPLITS, TASKS, bucket_of
from sharding.errors import InputError

log = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("s2", "label_roads", "label_building", "label_lc", "label_coords", "label_kg")
NAME_RE = re.compile(r"^(?P<region>[^_]+)_(?P<tile>.+)_(?P<split>" + "|".join(SPLITS) + r")_(?P<kind>"
                     + "|".join(KINDS) + r")\.npy$")
_PART_RE = re.compile(r"^(?P<stem>.+\.zip)\.(?P<number>\d+)$")
_KIND_TO_TASK = {kind: task for task, (_, kind) in TASKS.items()}


class NpyReadError(Exception):
    """An npy file (or zip member) cannot be read: bad header, truncated data, broken archive."""


@dataclass(frozen=True)
class NpyRef:
    """Where one npy file is: a plain `path`, or `member` of the zip made of `parts` (one or several files)."""

    display: str  # stable, location-independent name: "x.npy" or "archive.zip/sub/x.npy"
    path: str = ""
    parts: tuple[str, ...] = ()
    member: str = ""

    @property
    def name(self) -> str:
        return self.display.rsplit("/", 1)[-1]

    def to_json(self) -> dict:
        return {"display": self.display, "path": self.path, "parts": list(self.parts), "member": self.member}

    @classmethod
    def from_json(cls, data: dict) -> NpyRef:
        return cls(data["display"], data["path"], tuple(data["parts"]), data["member"])


@dataclass
class TileFiles:
    """The files of one `{region}_{tile}_{split}`: s2, its labels by task, coords; `rows` of the s2 file."""

    region: str
    tile: str
    split: str
    s2: NpyRef
    rows: int = 0
    key_offset: int = 0  # index of row 0 in the concatenation of the region's split files
    labels: dict[str, NpyRef] = field(default_factory=dict)
    coords: NpyRef | None = None
    row_shape: tuple[int, ...] = ()  # of the s2 file: (S, S, 10) for a patch of S x S pixels

    @property
    def bucket(self) -> str:
        return bucket_of(self.region)

    @property
    def patch_size(self) -> int | None:
        """S when the s2 rows are square (S, S, C) images, else None (the unit rejects such a file)."""
        shape = self.row_shape
        return shape[0] if len(shape) == 3 and shape[0] == shape[1] else None

    def to_json(self) -> dict:
        return {"region": self.region, "tile": self.tile, "split": self.split, "s2": self.s2.to_json(),
                "rows": self.rows, "key_offset": self.key_offset,
                "labels": {task: ref.to_json() for task, ref in sorted(self.labels.items())},
                "coords": self.coords.to_json() if self.coords else None, "row_shape": list(self.row_shape)}

    @classmethod
    def from_json(cls, data: dict) -> TileFiles:
        return cls(data["region"], data["tile"], data["split"], NpyRef.from_json(data["s2"]), data["rows"],
                   data["key_offset"], {t: NpyRef.from_json(r) for t, r in data["labels"].items()},
                   NpyRef.from_json(data["coords"]) if data["coords"] else None, tuple(data.get("row_shape", ())))


def parse_name(name: str) -> dict[str, str] | None:
    """`{region}_{tile}_{split}_{kind}.npy` -> its fields; None if the name is not of that form."""
    match = NAME_RE.match(name)
    return match.groupdict() if match else None


# ---------------------------------------------------------------- multi-part archives


class MultiPartFile(io.RawIOBase):
    """Read-only, seekable view of files concatenated byte-wise (`name.zip.001`, `.002`, ...)."""

    def __init__(self, paths: Sequence[str]):
        super().__init__()
        self._files = [open(path, "rb") for path in paths]  # noqa: SIM115 (closed in close())
        sizes = [os.fstat(file.fileno()).st_size for file in self._files]
        self._starts = [0]
        for size in sizes:
            self._starts.append(self._starts[-1] + size)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._starts[-1]}[whence]
        if base + offset < 0:
            raise OSError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer) -> int:
        if self._pos >= self._starts[-1]:
            return 0
        part = bisect.bisect_right(self._starts, self._pos) - 1
        file = self._files[part]
        file.seek(self._pos - self._starts[part])
        count = min(len(buffer), self._starts[part + 1] - self._pos)
        read = file.readinto(memoryview(buffer)[:count])
        self._pos += read
        return read

    def close(self) -> None:
        for file in self._files:
            file.close()
        super().close()


def open_archive(parts: Sequence[str]) -> zipfile.ZipFile:
    """A ZipFile over one zip or over the parts of a byte-wise split zip."""
    if len(parts) == 1:
        return zipfile.ZipFile(parts[0])
    return zipfile.ZipFile(io.BufferedReader(MultiPartFile(parts), buffer_size=1 << 16))  # small: streams interleave


# ---------------------------------------------------------------- listing the input


def _group_parts(paths: list[Path]) -> list[tuple[str, tuple[str, ...]]]:
    """[(archive display name, parts in order)] for `name.zip.NNN` files; gaps are an InputError."""
    groups: dict[Path, list[tuple[int, Path]]] = {}
    for path in paths:
        match = _PART_RE.match(path.name)
        groups.setdefault(path.with_name(match["stem"]), []).append((int(match["number"]), path))
    archives = []
    for stem, numbered in sorted(groups.items()):
        numbered = sorted(set(numbered))
        numbers = [number for number, _ in numbered]
        if numbers != list(range(numbers[0], numbers[0] + len(numbers))):
            raise InputError(f"--input {stem}: multi-part archive has parts {numbers}, expected consecutive parts")
        archives.append((str(stem), tuple(str(path) for _, path in numbered)))
    return archives


def _collect(inputs: Sequence[str]) -> tuple[list[tuple[str, str]], list[tuple[str, tuple[str, ...]]]]:
    """([(display, npy path)], [(archive display, parts)]) from files and directories given as --input."""
    plain, archives, part_files = [], [], []
    for text in inputs:
        root = Path(text)
        if root.is_dir():
            for path in sorted(p for p in root.rglob("*") if p.is_file()):
                relative = path.relative_to(root).as_posix()
                if path.name.endswith(".npy"):
                    plain.append((relative, str(path)))
                elif path.name.endswith(".zip"):
                    archives.append((relative, (str(path),)))
                elif _PART_RE.match(path.name):
                    part_files.append(path)
        elif root.is_file() and root.name.endswith(".npy"):
            plain.append((root.name, str(root)))
        elif root.is_file() and root.name.endswith(".zip"):
            archives.append((root.name, (str(root),)))
        elif root.is_file() and _PART_RE.match(root.name):
            stem = _PART_RE.match(root.name)["stem"]
            part_files.extend(p for p in root.parent.iterdir() if (m := _PART_RE.match(p.name)) and m["stem"] == stem)
        elif not root.exists():
            raise InputError(f"--input {text}: no such file or directory")
        else:
            raise InputError(f"--input {text}: expected a directory, .npy, .zip or .zip.001 file")
    for stem, parts in _group_parts(part_files):
        base = Path(stem)
        display = base.name
        for text in inputs:
            if Path(text).is_dir() and base.is_relative_to(Path(text)):
                display = base.relative_to(Path(text)).as_posix()
        archives.append((display, parts))
    return plain, sorted(set(archives))


def scan_inputs(inputs: Sequence[str]) -> tuple[list[tuple[dict[str, str], NpyRef]], list[str]]:
    """([(name fields, ref)] of every PhilEO Bench npy file, [displays of ignored .npy files]).

    InputError for a missing input, an unreadable archive, an unknown region or a file name
    present twice.
    """
    plain, archives = _collect(inputs)
    refs = [NpyRef(display, path=path) for display, path in plain]
    for display, parts in archives:
        try:
            with open_archive(parts) as archive:
                members = [info.filename for info in archive.infolist() if not info.is_dir()]
        except (OSError, zipfile.BadZipFile) as error:
            raise InputError(f"--input {display}: not a readable zip archive ({error})") from error
        refs.extend(NpyRef(f"{display}/{member}", parts=parts, member=member)
                    for member in members if member.endswith(".npy"))
    found, ignored, seen = [], [], {}
    for ref in refs:
        fields = parse_name(ref.name)
        if fields is None:
            ignored.append(ref.display)
            continue
        if fields["region"] not in REGIONS:
            raise InputError(f"{ref.display}: unknown PhilEO Bench region {fields['region']!r}; expected one of "
                             f"{', '.join(REGIONS)}")
        if ref.name in seen:
            raise InputError(f"{ref.name} is in the input twice: {seen[ref.name]} and {ref.display}")
        seen[ref.name] = ref.display
        found.append((fields, ref))
    if ignored:
        log.warning("ignored %d .npy files not named {region}_{tile}_{split}_{kind}.npy, e.g. %s",
                    len(ignored), ignored[0])
    return found, ignored


def group_tiles(found: list[tuple[dict[str, str], NpyRef]]) -> tuple[list[TileFiles], list[dict]]:
    """Tiles (sorted by s2 name, with row counts and key offsets) and file-level rejects."""
    groups: dict[tuple[str, str, str], dict[str, NpyRef]] = {}
    for fields, ref in found:
        groups.setdefault((fields["region"], fields["tile"], fields["split"]), {})[fields["kind"]] = ref
    tiles, rejected = [], []
    with ExitStack() as stack:
        archives: dict = {}
        for (region, tile, split), kinds in groups.items():
            if "s2" not in kinds:
                rejected.extend({"file": ref.display, "row": None, "key": None, "split": split,
                                 "reason": f"no {region}_{tile}_{split}_s2.npy for this label file"}
                                for kind, ref in sorted(kinds.items()) if kind != "label_kg")
                continue
            labels = {_KIND_TO_TASK[kind]: ref for kind, ref in kinds.items() if kind in _KIND_TO_TASK}
            entry = TileFiles(region, tile, split, kinds["s2"], labels=labels, coords=kinds.get("label_coords"))
            try:
                with ExitStack() as member_stack:
                    stream = open_npy(entry.s2, member_stack, archives, stack)
                    entry.rows, entry.row_shape = stream.rows, stream.row_shape
            except NpyReadError as error:
                rejected.append({"file": entry.s2.display, "row": None, "key": None, "split": split,
                                 "reason": f"unreadable s2 file: {error}"})
                continue
            tiles.append(entry)
    tiles.sort(key=lambda t: t.s2.name)
    offsets: dict[tuple[str, str], int] = {}
    for entry in tiles:
        entry.key_offset = offsets.get((entry.region, entry.split), 0)
        offsets[(entry.region, entry.split)] = entry.key_offset + entry.rows
    return tiles, rejected


def common_patch_size(tiles: list[TileFiles]) -> int | None:
    """The one patch size of the s2 files (None if none is square); a mix is an InputError naming a file.

    One build holds one patch size: the benchmark keeps its 128 px and 224 px sets in separate
    folders (training_script.py data_path_128_10m / data_path_224_10m / data_path_224_30m).
    """
    first = next((tile for tile in tiles if tile.patch_size is not None), None)
    for tile in tiles:
        if tile.patch_size is not None and tile.patch_size != first.patch_size:
            raise InputError(f"{tile.s2.display}: {tile.patch_size} x {tile.patch_size} px patches, but "
                             f"{first.s2.display} has {first.patch_size} x {first.patch_size}; give each patch "
                             "size (e.g. the 128 px and 224 px sets) to its own build")
    return first.patch_size if first else None


# ---------------------------------------------------------------- reading arrays


class NpyStream:
    """Shape/dtype of one npy file and its rows, read in increasing order, one at a time."""

    def __init__(self, ref: NpyRef, shape: tuple[int, ...], dtype: np.dtype, source):
        self.ref, self.shape, self.dtype, self._source = ref, shape, dtype, source

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self.shape[1:]

    def iter_rows(self, rows: Sequence[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (row, array) for `rows` (increasing; None = all). NpyReadError when the data ends early."""
        wanted = range(self.rows) if rows is None else rows
        if isinstance(self._source, np.ndarray):  # memory map: rows are views, read when used
            for row in wanted:
                yield row, self._source[row]
            return
        yield from self._stream_rows(wanted)

    def _stream_rows(self, wanted: Sequence[int]) -> Iterator[tuple[int, np.ndarray]]:
        row_bytes = self.dtype.itemsize * math.prod(self.row_shape)
        position = 0
        for row in wanted:
            if not 0 <= row < self.rows or row < position:
                raise ValueError(f"{self.ref.display}: row {row} out of order or range")
            try:
                if row > position:
                    self._skip((row - position) * row_bytes)
                data = _read_exactly(self._source, row_bytes)
            except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:
                raise NpyReadError(f"{self.ref.display}: row {row}: {error}") from error
            if len(data) < row_bytes:
                raise NpyReadError(f"{self.ref.display}: data ends in row {row} (truncated file)")
            position = row + 1
            yield row, np.frombuffer(data, dtype=self.dtype).reshape(self.row_shape)

    def _skip(self, count: int) -> None:
        while count > 0:
            skipped = len(self._source.read(min(count, 1 << 24)))
            if skipped == 0:
                raise EOFError("data ends early (truncated file)")
            count -= skipped


def _read_exactly(file, count: int) -> bytes:
    chunks, left = [], count
    while left > 0:
        chunk = file.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_header(file, display: str) -> tuple[tuple[int, ...], np.dtype]:
    try:
        version = np.lib.format.read_magic(file)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(file)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(file)
        else:
            raise ValueError(f"npy format version {version} is not supported")
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise NpyReadError(f"{display}: not a readable npy file ({error})") from error
    if fortran and len(shape) > 1:
        raise NpyReadError(f"{display}: Fortran-order arrays cannot be streamed from an archive")
    return tuple(shape), dtype


def open_npy(ref: NpyRef, stack: ExitStack, archives: dict | None = None,
             archive_stack: ExitStack | None = None) -> NpyStream:
    """Open `ref` for streaming; the member is closed by `stack`, archives cached in `archives` by
    `archive_stack` (default `stack`). Plain files are memory-mapped (closed when unreferenced)."""
    if not ref.parts:
        try:
            array = np.load(ref.path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:
            raise NpyReadError(f"{ref.display}: not a readable npy file ({error})") from error
        if array.ndim == 0:
            raise NpyReadError(f"{ref.display}: a 0-d array, expected rows")
        return NpyStream(ref, array.shape, array.dtype, array)
    archives = {} if archives is None else archives
    try:
        if ref.parts not in archives:
            archives[ref.parts] = (archive_stack or stack).enter_context(open_archive(ref.parts))
        member = stack.enter_context(archives[ref.parts].open(ref.member))
    except (OSError, KeyError, zipfile.BadZipFile, zlib.error) as error:
        raise NpyReadError(f"{ref.display}: cannot open the archive member ({error})") from error
    shape, dtype = _read_header(member, ref.display)
    if not shape:
        raise NpyReadError(f"{ref.display}: a 0-d array, expected rows")
    if dtype.hasobject:
        raise NpyReadError(f"{ref.display}: object arrays are not supported")
    return NpyStream(ref, shape, dtype, member)
