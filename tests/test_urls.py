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


def test_credentials_are_redacted_from_urls_and_messages():
    from phileo.urls import redact, redact_text, secrets_in

    assert redact("http://user:pw-123@host:8/list.txt") == "http://host:8/list.txt"
    assert redact("https://h/x.parquet?X-Amz-Signature=abc&part=2&token=t0k") == "https://h/x.parquet?part=2"
    for plain in ("s3://bucket/prefix", "/data/x.tar", "https://h/x.tar?part=2", "shards/a.tar"):
        assert redact(plain) == plain
    assert secrets_in("http://user:pw-123@host/x?sig=s1g") == ["user:pw-123", "pw-123", "s1g"]
    message = "--shards https://u:hunter22@h/m.json: not readable (https://h/m.json?access_token=zzz9: 403)"
    assert redact_text(message) == "--shards https://h/m.json: not readable (https://h/m.json: 403)"


def test_the_trainer_never_saves_nor_prints_credentials(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from training.cli import main
    from training.config import DataConfig, PretrainConfig, RunConfig

    url = "https://user:hunter22@127.0.0.1:9/ds/manifest.json?token=t0ken99"
    saved = PretrainConfig(RunConfig(out="r"), DataConfig(shards=url)).to_dict()
    assert saved["data"]["shards"] == "https://127.0.0.1:9/ds/manifest.json"
    monkeypatch.setenv("PHILEO_REMOTE_RETRIES", "0")
    result = CliRunner().invoke(main, ["pretrain", "--shards", url, "--output", str(tmp_path / "r")])
    assert result.exit_code == 2 and "127.0.0.1:9/ds/manifest.json" in result.output
    assert "hunter22" not in result.output and "t0ken99" not in result.output
