"""The shards of fixture builds are the bytes recorded in tests/data/build_identity.json.

A refactor of sharding/ must not change a single shard byte. The digests were recorded before the
package regrouping; shard sha256 depends on the Blosc2/zstd build as well, so it is compared exactly
when the installed blosc2 is the recorded one, and the content digest (tar member names, meta.json
bytes, decoded array bytes) is compared always. Regenerate only for a deliberate format change:
`python tests/test_build_identity.py` (and say why in the commit).
"""

from __future__ import annotations

import hashlib
import json
import sys
import tarfile
from pathlib import Path

import blosc2
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phileo.schema import ARRAY_EXT, decode_array  # noqa: E402
from tests.conftest import read_manifest, run_shard  # noqa: E402
from tools.majortom_fixture import make_majortom_dataset  # noqa: E402
from tools.phileo_bench_fixture import make_phileo_bench_dataset  # noqa: E402

RECORD = Path(__file__).parent / "data" / "build_identity.json"
BUILDS = {
    "majortom": ("--shard-size", "300KB", "--mix-files", "2"),
    "fasttom": ("--source", "fasttom", "--shard-size", "300KB", "--max-water", "1", "--min-clear", "0"),
    "phileo-bench": ("--source", "phileo-bench", "--task", "roads", "--n-shot", "2"),
}


def content_digest(shard: Path) -> str:
    """sha256 over member names, non-array bytes and decoded array bytes, in tar order."""
    digest = hashlib.sha256()
    with tarfile.open(shard) as tar:
        for member in tar:
            data = tar.extractfile(member).read()
            digest.update(member.name.encode() + b"\0")
            if member.name.endswith("." + ARRAY_EXT):
                array = decode_array(data)
                data = str(array.dtype).encode() + str(array.shape).encode() + array.tobytes()
            digest.update(data)
    return digest.hexdigest()


def build_digests(root: Path) -> dict[str, dict[str, dict[str, str]]]:
    majortom = root / "majortom"
    make_majortom_dataset(majortom, num_files=4, rows_per_file=3)
    fasttom = root / "fasttom"  # FastTOM keeps a quadrant: real-size 1068 px tiles as in its own tests
    make_majortom_dataset(fasttom, num_files=1, rows_per_file=2, tile_size=1068)
    bench = root / "bench"
    make_phileo_bench_dataset(bench, tiles_per_region=2)
    digests = {}
    for name, args in BUILDS.items():
        out = root / f"out-{name}"
        source = {"majortom": majortom, "fasttom": fasttom, "phileo-bench": bench}[name]
        result = run_shard("build", "--input", str(source), "--output", str(out), *args)
        assert result.exit_code == 0, result.output
        shards = sorted(out.rglob("*.tar"))
        assert shards, f"{name}: no shards"
        digests[name] = {shard.relative_to(out).as_posix(): {
            "sha256": hashlib.sha256(shard.read_bytes()).hexdigest(), "content": content_digest(shard)}
            for shard in shards}
        if name != "phileo-bench":
            assert sum(s["samples"] for s in read_manifest(out)["shards"]) > 0
    return digests


@pytest.mark.slow
def test_fixture_builds_give_the_recorded_shards(tmp_path):
    record = json.loads(RECORD.read_text())
    digests = build_digests(tmp_path)
    assert {name: sorted(d) for name, d in digests.items()} == {
        name: sorted(d) for name, d in record["builds"].items()}, "other shard names"
    same_codec = blosc2.__version__ == record["blosc2"]
    for name, shards in digests.items():
        for shard, got in shards.items():
            want = record["builds"][name][shard]
            assert got["content"] == want["content"], f"{name} {shard}: other content"
            if same_codec:
                assert got["sha256"] == want["sha256"], f"{name} {shard}: other bytes"


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        RECORD.write_text(json.dumps({"blosc2": blosc2.__version__, "builds": build_digests(Path(tmp))},
                                     indent=1, sort_keys=True) + "\n")
    print(f"wrote {RECORD}")
