"""Read torch.distributed.checkpoint directories without running code from them.

torch's own reader unpickles `.metadata` with plain `pickle.load`, and its load planners read
non-tensor items with `torch.load(weights_only=False)`: a planted checkpoint directory (`--init
DIR`, a resumed run directory) could run any command. Here `.metadata` is unpickled by an
unpickler that only builds DCP's own metadata classes (and torch dtypes, sizes, layouts and
paths), and byte items load with `weights_only=True`, like every other checkpoint of this project.
A directory whose metadata asks for anything else is refused with CheckpointError.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from training.config import CheckpointError

_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
     ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, where: str):
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str):
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in _METADATA_CLASSES or is_dtype:
            return super().find_class(module, name)
        raise CheckpointError(f"{self.where}: asks for {module}.{name}, which no checkpoint metadata holds; "
                              "not loaded")


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose `.metadata` is read by the restricted unpickler."""

    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            try:
                metadata = _MetadataUnpickler(stream, str(path)).load()
            except (pickle.UnpicklingError, EOFError, AttributeError, TypeError) as error:
                raise CheckpointError(f"{path}: not a checkpoint's metadata ({error})") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _load_bytes(planner: DefaultLoadPlanner, read_item, value) -> None:
    loaded = torch.load(value, weights_only=True)  # torch's planners use weights_only=False here
    if planner.flatten_state_dict:
        set_element(planner.original_state_dict, planner.mappings[read_item.dest_index.fqn], loaded)
    else:
        planner.state_dict[read_item.dest_index.fqn] = loaded


class SafeLoadPlanner(DefaultLoadPlanner):
    load_bytes = _load_bytes


class _SafeEmptyPlanner(_EmptyStateDictLoadPlanner):
    load_bytes = _load_bytes


def _reader(path: Path) -> SafeFileSystemReader:
    """A reader of `path` whose metadata was checked here, so a refusal is a plain CheckpointError
    (inside dcp.load it would come wrapped in a CheckpointException of every rank)."""
    reader = SafeFileSystemReader(str(path))
    reader.read_metadata()
    return reader


def load_into(state: dict, path: Path) -> None:
    """dcp.load of `state` from `path` (any number of ranks), safely."""
    dcp.load(state, storage_reader=_reader(path), planner=SafeLoadPlanner())


def load_whole(path: Path) -> dict:
    """Every item of the checkpoint at `path`, in this one process (fine-tuning, export), safely."""
    state: dict = {}
    # as torch's dcp_to_torch_save (format_utils.py) gathers it, with the safe reader and planner
    _load_state_dict(state, storage_reader=_reader(path), planner=_SafeEmptyPlanner(), no_dist=True)
    return state
