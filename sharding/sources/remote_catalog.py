"""Catalogs of remote MajorTOM inputs, and of any input planned from a metadata.parquet.

`--input` may be `s3://bucket/prefix` or `hf://datasets/Major-TOM/Core-S2L2A` (listed:
`images/*.parquet`, else `*.parquet`, with `metadata.parquet` beside them applied as for a
local directory), one parquet URL, or a `.txt` / `.json` list of parquet URLs (relative
entries resolve against the list's URL). Plain HTTP has no listing: give one of the last two,
or `--metadata`. Without metadata every file's footer and id columns are read (one ranged GET
per row group); with `--metadata URL` the plan comes from its rows alone and no source file is
opened while planning (sharding/sources/metadata_catalog.py): each unit reads its files' footers.
With `--metadata`, `--input` (optional) is the dataset root that parquet_url paths are rebased
onto (the part after `/images/` goes under `<input>/images/`, else the file name under `<input>/`),
so a mirror (S3, a local copy) is read instead of the URLs in the metadata.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pyarrow as pa

from sharding.errors import InputError
from sharding.sources.majortom_catalog import Catalog, list_majortom, list_parquet_file, parquet_files
from sharding.sources.metadata_catalog import apply_metadata, catalog_from_metadata
from sharding.sources.remote import (
    RemoteUnavailable,
    filesystem,
    hide_credentials,
    is_remote,
    read_bytes,
    scrub,
    with_retries,
)

log = logging.getLogger(__name__)


def list_source(input_path: str | None, metadata: str | None) -> Catalog:
    """The catalog of any majortom input: local, remote, or planned from a metadata.parquet alone."""
    if metadata:
        source = pa.BufferReader(_read_small(metadata, "--metadata")) if is_remote(metadata) else metadata
        if not is_remote(metadata) and not os.path.isfile(metadata):
            raise InputError(f"--metadata {metadata}: no such file")
        try:
            return catalog_from_metadata(source, input_path)
        except (pa.ArrowException, ValueError, KeyError) as error:
            raise InputError(f"--metadata {metadata}: not a MajorTOM metadata.parquet ({error})") from error
    if not input_path:
        raise InputError("--input: required unless --metadata is given")
    if not is_remote(input_path):
        catalog = list_majortom(input_path)
        beside = Path(input_path) / "metadata.parquet"
        if catalog.layout == "parquet" and beside.is_file():
            apply_metadata(beside, {path.name: str(path) for path in parquet_files(Path(input_path))}, catalog)
        return catalog
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
