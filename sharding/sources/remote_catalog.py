"""Catalogs of remote MajorTOM inputs, and of any input planned from a metadata.parquet.

`--input` may be `s3://bucket/prefix` or `hf://datasets/Major-TOM/Core-S2L2A` (listed:
`images/*.parquet`, else `*.parquet`, with `metadata.parquet` beside them applied as for a
local directory), one parquet URL, or a `.txt` / `.json` list of parquet URLs (relative
entries resolve against the list's URL). Plain HTTP has no listing: give one of the last two,
or `--metadata`. Without metadata every file's footer and id columns are read (one ranged GET
per row group); with `--metadata URL` the plan comes from its rows: Filters apply first, and
then only the footers of files holding a kept row are read (for est_bytes), never an id column.
With `--metadata`, `--input` (optional) is the dataset root that parquet_url paths are rebased
onto (the part after `/images/` goes under `<input>/images/`, else the file name under `<input>/`),
so a mirror (S3, a local copy) is read instead of the URLs in the metadata.
"""

from __future__ import annotations

import json
import logging
import os
import re
import urllib.parse
from collections.abc import Callable
from datetime import datetime

import pyarrow as pa
import pyarrow.parquet as pq

from sharding.errors import InputError
from sharding.sources.majortom_catalog import (
    METADATA_VALUES,
    REQUIRED_COLUMNS,
    Catalog,
    _row_bytes,
    apply_metadata,
    list_majortom,
    list_parquet_file,
    make_row,
    metadata_problem,
    reject,
)
from sharding.sources.remote import (
    RemoteUnavailable,
    filesystem,
    hide_credentials,
    is_remote,
    open_parquet,
    read_bytes,
    scrub,
    with_retries,
)

log = logging.getLogger(__name__)

METADATA_COLUMNS = ["product_id", "grid_cell", "timestamp", "cloud_cover", "nodata", "centre_lat", "centre_lon",
                    "parquet_url", "parquet_row"]


def list_source(input_path: str | None, metadata: str | None,
                kept_rows: Callable[[Catalog], list[dict]]) -> Catalog:
    """The catalog of any majortom input: local, remote, or planned from metadata.

    `kept_rows(catalog)` (the planner's filters) tells which metadata rows will be built: only their
    files' footers are read. Sources list and read; deciding what to keep stays with the planner."""
    if metadata:
        return catalog_from_metadata(metadata, input_path, kept_rows)
    if not input_path:
        raise InputError("--input: required unless --metadata is given")
    if not is_remote(input_path):
        return list_majortom(input_path)
    files, metadata_url = remote_files(input_path)
    catalog = Catalog()
    for url in files:
        list_parquet_file(url, catalog)
    if metadata_url:
        table_source = pa.BufferReader(read_bytes(metadata_url))
        apply_metadata(table_source, {os.path.basename(url): url for url in files}, catalog)
    return catalog


def _read_small(path: str, flag: str) -> bytes:
    try:
        if is_remote(path):
            return read_bytes(path)
        with open(path, "rb") as file:
            return file.read()
    except (OSError, RemoteUnavailable) as error:
        raise InputError(f"{flag} {path}: cannot be read ({type(error).__name__}: {scrub(str(error))})") from None


def remote_files(input_url: str) -> tuple[list[str], str | None]:
    """(parquet URLs, metadata.parquet URL or None) of a remote --input."""
    base = input_url.rstrip("/")
    if base.endswith(".parquet"):
        return [base], None
    if base.endswith((".txt", ".json")):
        text = _read_small(base, "--input").decode()
        entries = json.loads(text) if base.endswith(".json") else [
            line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise InputError(f"--input {input_url}: expected a JSON list of parquet URLs")
        folder = base.rsplit("/", 1)[0]
        return [hide_credentials(e) if is_remote(e) else f"{folder}/{e}" for e in entries], None
    if base.startswith(("http://", "https://")):
        raise InputError(f"--input {input_url}: HTTP has no listing; give a .parquet URL, a .txt/.json list "
                         "of parquet URLs, or --metadata")
    try:
        listed = with_retries(base, "list", lambda: _list_parquet(base))
    except FileNotFoundError as error:  # hf://: no such repository or revision
        raise InputError(f"--input {input_url}: {scrub(str(error))}") from None
    if listed is None:
        raise InputError(f"--input {input_url}: no images/*.parquet or *.parquet found")
    return listed


def _list_parquet(base: str) -> tuple[list[str], str | None] | None:
    scheme = base.split("://", 1)[0] + "://"
    fs = filesystem(base)
    fs.invalidate_cache()
    for pattern in (f"{base}/images/*.parquet", f"{base}/*.parquet"):
        found = sorted(scheme + p for p in fs.glob(pattern) if not p.endswith("/metadata.parquet"))
        if found:
            try:  # not fs.exists: that answers False for a 503 too, and the build would drop the metadata
                fs.info(f"{base}/metadata.parquet")
            except FileNotFoundError:
                return found, None
            return found, f"{base}/metadata.parquet"
    return None


_HUB_FILE_URL = re.compile(r"^https://(?:huggingface\.co|hf\.co)/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


def hub_file_url(url: str) -> str:
    """A Hub download URL (`https://huggingface.co/datasets/ORG/NAME/resolve/REV/PATH`, as MajorTOM's
    metadata.parquet names its files) as `hf://datasets/ORG/NAME[@REV]/PATH`: read through
    huggingface_hub (HF_ENDPOINT, HF_TOKEN, ranged reads at the endpoint) instead of plain HTTP to
    huggingface.co. Any other URL is returned unchanged."""
    match = _HUB_FILE_URL.match(url)
    if match is None:
        return url
    repo, revision, path = match.groups()
    revision = urllib.parse.unquote(revision)
    return f"hf://datasets/{repo}{'' if revision == 'main' else '@' + revision}/{path}"


def rebase(parquet_url: str, root: str | None) -> str:
    """Where to read a metadata parquet_url: itself (a Hub URL through hf://), or the same images/ path
    under `root`."""
    if not root:
        return hub_file_url(parquet_url)
    tail = parquet_url.split("/images/", 1)[1] if "/images/" in parquet_url else f"{os.path.basename(parquet_url)}"
    prefix = "images/" if "/images/" in parquet_url else ""
    return f"{root.rstrip('/')}/{prefix}{tail}"


def _product_datetime(product_id: str, timestamp: str) -> str:
    """`YYYYMMDDTHHMMSS`: the product id's sensing time field, else the metadata timestamp."""
    parts = product_id.split("_")
    if len(parts) > 2 and len(parts[2]) == 15 and parts[2][8] == "T":
        return parts[2]
    return datetime.fromisoformat(str(timestamp).replace("Z", "")).strftime("%Y%m%dT%H%M%S")


def catalog_from_metadata(metadata: str, root: str | None, kept_rows: Callable[[Catalog], list[dict]]) -> Catalog:
    """Rows from metadata.parquet; footers read only for files with a row in `kept_rows(catalog)`."""
    try:
        table = pq.read_table(pa.BufferReader(_read_small(metadata, "--metadata")), columns=METADATA_COLUMNS)
    except (pa.ArrowException, ValueError) as error:
        raise InputError(f"--metadata {metadata}: not a MajorTOM metadata.parquet ({error})") from error
    catalog = Catalog()
    entries = sorted(table.to_pylist(), key=lambda e: (rebase(e["parquet_url"], root), e["parquet_row"]))
    for entry in entries:
        url, number = rebase(entry["parquet_url"], root), int(entry["parquet_row"])
        try:
            row = make_row(url, url, number, entry["product_id"], entry["grid_cell"],
                           _product_datetime(entry["product_id"], entry["timestamp"]), 0)
        except ValueError as error:
            catalog.rejected.append(reject(url, number, f"metadata.parquet: {error}"))
            continue
        problem = metadata_problem(entry, row)
        if problem is not None:
            catalog.rejected.append(reject(url, number, problem, row["key"]))
            continue
        row.update({k: float(entry[k]) for k in METADATA_VALUES})
        catalog.rows.append(row)
    kept = kept_rows(catalog)
    needed = sorted({row["source_file"] for row in kept})
    log.info("metadata %s: %d rows, %d pass the filters, in %d files", metadata, len(catalog.rows), len(kept),
             len(needed))
    sizes = {url: _file_row_bytes(url, catalog) for url in needed}
    catalog.rows = [row for row in catalog.rows if sizes.get(row["source_file"], 0) is not None]
    for row in catalog.rows:
        per_row = sizes.get(row["source_file"]) or []
        row["est_bytes"] = per_row[row["source_row"]] if row["source_row"] < len(per_row) else 0
    return catalog


def _file_row_bytes(url: str, catalog: Catalog) -> list[int] | None:
    """Compressed bytes per row from the footer; None (rows rejected) when the file is unusable."""
    try:
        parquet, _ = open_parquet(url)
    except (OSError, ValueError) as error:
        rows = [r for r in catalog.rows if r["source_file"] == url]
        catalog.rejected.extend(reject(url, r["source_row"], f"unreadable parquet file: {error}", r["key"])
                                for r in rows)
        return None
    missing = [name for name in REQUIRED_COLUMNS if name not in parquet.schema_arrow.names]
    if missing:
        catalog.rejected.extend(reject(url, r["source_row"], f"missing column(s) {', '.join(missing)}", r["key"])
                                for r in catalog.rows if r["source_file"] == url)
        return None
    return _row_bytes(parquet)
