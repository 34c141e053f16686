"""phileo/urls.py: URLs from dataset files are data; only readable schemes, never out of the dataset root."""

from __future__ import annotations

import pytest

from phileo.urls import UnsafeURLError, check_readable, inside_root, url_scheme


def test_schemes():
    assert url_scheme("https://h/x.tar") == "https" and url_scheme("pipe:curl x") == "pipe"
    assert url_scheme("/data/x.tar") is None and url_scheme("shards/x.tar") is None
    for url in ("/data/x.tar", "file:///data/x.tar", "http://h/x.tar", "HTTPS://h/x.tar", "s3://b/x.tar"):
        assert check_readable(url, "list.txt line 1") == url
    for url in ("pipe:curl -s http://h/x.tar", "gs://b/x.tar", "javascript:alert(1)"):
        with pytest.raises(UnsafeURLError, match=r"^list.txt line 1: .* URLs are never followed"):
            check_readable(url, "list.txt line 1")


def test_recorded_urls_stay_inside_the_dataset_root():
    assert inside_root("/data/ds", "shards/000000-0000.tar", "m") == "/data/ds/shards/000000-0000.tar"
    assert inside_root("https://h/ds/", "shards/./a.tar", "m") == "https://h/ds/shards/a.tar"
    assert inside_root("/data/ds", "shards/../shards/a.tar", "m") == "/data/ds/shards/a.tar"
    for bad in ("/etc/passwd", "../other/x.tar", "shards/../../x.tar", "pipe:rm -rf /", "https://evil/x.tar",
                "..", "", "shards\\..\\..\\x"):
        with pytest.raises(UnsafeURLError, match=r"^manifest.json shards\[3\]: "):
            inside_root("/data/ds", bad, "manifest.json shards[3]")
