"""End-to-end pretraining under torchrun (gloo, CPU) on generated shards of uneven sizes."""

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import torch

from sharding.dataset.tarread import iter_tar_samples
from tests.conftest import read_manifest, run_shard
from tools.majortom_fixture import make_majortom_dataset

K = 2  # crops per tile
SIZES = [1, 2, 3, 4, 5, 6, 7]  # tiles per shard: deliberately uneven


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> Path:
    """7 shards holding 1..7 tiles of 144 px (28 tiles), with a manifest."""
    root = tmp_path_factory.mktemp("uneven")
    make_majortom_dataset(root / "src", num_files=4, rows_per_file=7, tile_size=144)
    assert run_shard("build", "--input", str(root / "src"), "--output", str(root / "built")).exit_code == 0
    samples = [s for shard in read_manifest(root / "built")["shards"]
               for s in iter_tar_samples(root / "built" / shard["url"])]
    out = root / "ds"
    (out / "shards").mkdir(parents=True)
    shards, start = [], 0
    for index, size in enumerate(SIZES):
        name = f"shards/part-{index:02d}.tar"
        with tarfile.open(out / name, "w") as tar:
            for sample in samples[start : start + size]:
                for extension, data in sample.members.items():
                    info = tarfile.TarInfo(f"{sample.key}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, __import__("io").BytesIO(data))
        shards.append({"url": name, "samples": size})
        start += size
    (out / "manifest.json").write_text(json.dumps({"schema": "phileo-shard/1", "shards": shards}))
    return out


def all_keys(dataset: Path) -> list[str]:
    return [s.key for shard in read_manifest(dataset)["shards"] for s in iter_tar_samples(dataset / shard["url"])]


def pretrain_command(dataset: Path, run: Path, ranks: int, *extra: str) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    return [*launcher, "-m", "training.cli", "pretrain", "--shards", str(dataset / "manifest.json"),
            "--out", str(run), "--model", "geoaware-unet-tiny", "--crops-per-tile", str(K), "--batch-size", "2",
            "--num-workers", "2", "--shuffle-buffer", "5", "--record-keys", str(run / "keys"), "--no-amp",
            "--log-every", "1", *extra]


def run_pretrain(dataset: Path, run: Path, ranks: int, *extra: str) -> subprocess.CompletedProcess:
    result = subprocess.run(pretrain_command(dataset, run, ranks, *extra), capture_output=True, text=True,
                            timeout=400, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def recorded(path: Path) -> list[tuple[str, int]]:
    """(tile key, crop index) of every crop a rank trained, from its --record-keys file."""
    return [(key, int(crop)) for key, crop in (line.split() for line in path.read_text().splitlines())]


def audit(run: Path) -> tuple[Counter, list[int], list[dict]]:
    """(times each (tile key, crop index) was trained over all ranks, crops per rank, epoch records)."""
    crops = [recorded(f) for f in sorted((run / "keys").glob("rank*.txt"))]
    epochs = [json.loads(line) for line in (run / "epochs.jsonl").read_text().splitlines()]
    return Counter(pair for rank in crops for pair in rank), [len(rank) for rank in crops], epochs


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 3])
def test_uneven_shards_equal_steps_and_every_tile_k_times(uneven, tmp_path, ranks):
    from click.testing import CliRunner

    from training.cli import main

    run = tmp_path / "run"
    run_pretrain(uneven, run, ranks, "--epochs", "1")
    counts, per_rank, (epoch,) = audit(run)
    assert len(per_rank) == ranks and len(set(per_rank)) == 1  # identical step counts on all ranks
    assert per_rank[0] == epoch["micro_batches"] * 2
    keys = all_keys(uneven)
    assert set(counts.values()) == {1} and {key for key, _ in counts} <= set(keys)  # every crop at most once
    assert len(counts) + epoch["dropped_crops"] == len(keys) * K and epoch["repeated_crops"] == 0
    assert epoch["dropped_crops"] < ranks * 2
    report = CliRunner().invoke(main, ["plan", "--shards", str(uneven / "manifest.json"), "--world-size", str(ranks),
                                       "--num-workers", "2", "--batch-size", "2", "--crops-per-tile", str(K)])
    assert f"steps per rank: {epoch['micro_batches']} optimizer steps" in report.output  # what the trainer did
    assert f"{epoch['dropped_crops']} crops dropped, 0 repeated" in report.output
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == epoch["micro_batches"] and all(m["loss"] == m["loss"] for m in metrics)
    assert (run / "config.json").is_file() and list((run / "checkpoints").glob("ckpt-*.pt"))
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def kill_after_checkpoint(command: list[str], run: Path, step: int, timeout: float = 300) -> None:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if (run / "checkpoints" / f"ckpt-{step:09d}.pt").is_file():
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    # torchrun puts ranks in their own sessions: kill the whole tree, as a scheduler would
    tree = [process.pid] + [child.pid for child in psutil.Process(process.pid).children(recursive=True)]
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()
    psutil.wait_procs([p for p in map(_process_or_none, tree) if p], timeout=30)


def _process_or_none(pid: int):
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


@pytest.mark.slow
@pytest.mark.parametrize("resume_ranks", [2, 1])
def test_sigkill_mid_epoch_then_resume_misses_no_tile(uneven, tmp_path, resume_ranks):
    run = tmp_path / "run"
    kill_after_checkpoint(pretrain_command(uneven, run, 2, "--epochs", "1", "--ckpt-every", "2"), run, step=6)
    run_pretrain(uneven, run, resume_ranks, "--epochs", "1", "--ckpt-every", "2", "--resume")
    counts, _, epochs = audit(run)
    resumed = epochs[-1]
    assert resumed["segment"] == 1 and resumed["world_size"] == resume_ranks and resumed["step"] >= 6
    assert resumed["trained_before_crops"] == resumed["step"] * 2 * 2  # 2 ranks x batch 2 per step
    keys = all_keys(uneven)
    assert set(counts.values()) == {1}  # no crop trained twice, before or after the kill
    assert len(counts) + resumed["dropped_crops"] == len(keys) * K and resumed["dropped_crops"] < resume_ranks * 2


def train_in_process(*args: str):
    from click.testing import CliRunner

    from training.cli import main

    return CliRunner().invoke(main, ["pretrain", *args], catch_exceptions=False)


def test_truncated_shard_is_skipped_and_reported(uneven, tmp_path, caplog):
    broken = tmp_path / "ds"
    __import__("shutil").copytree(uneven, broken)
    shard = broken / "shards" / "part-06.tar"  # 7 tiles
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    common = ["--shards", str(broken), "--model", "geoaware-unet-tiny", "--crops-per-tile", "1", "--batch-size", "4",
              "--num-workers", "0", "--no-amp", "--epochs", "1"]
    caplog.set_level("WARNING")
    result = train_in_process(*common, "--out", str(tmp_path / "ok"), "--max-bad-fraction", "0.9")
    assert result.exit_code == 0, result.output
    assert "part-06.tar" in caplog.text and "skipping bad data" in caplog.text
    strict = train_in_process(*common, "--out", str(tmp_path / "strict"))
    assert strict.exit_code == 1, strict.output
    assert re.search(r"error: \d+ of \d+ planned tiles unreadable \(> --max-bad-fraction 0.01\); bad shards: "
                     r"\S+part-06.tar", strict.output), strict.output


def test_clear_errors_for_bad_flags_and_too_few_shards(uneven, tmp_path):
    base = ["--shards", str(uneven), "--out", str(tmp_path / "r"), "--model", "geoaware-unet-tiny"]
    cases = [(["--model", "nope"], "--model nope: unknown"), (["--batch-size", "0"], "--batch-size 0"),
             (["--crop-size", "127"], "--crop-size 127"), (["--shards", str(tmp_path / "none.tar")], "does not exist"),
             (["--lr", "inf"], "--lr inf: expected a positive finite number"), (["--lr", "nan"], "--lr nan"),
             (["--weight-decay", "inf"], "must be finite"), (["--crop-size", "64"], "cannot take 64 px inputs")]
    for extra, message in cases:
        result = train_in_process(*base, *extra)
        assert result.exit_code == 2 and message in result.output, result.output
    result = train_in_process(*base, "--crops-per-tile", "1", "--batch-size", "32")
    assert result.exit_code == 2 and "error: 28 crops in an epoch: less than 1 batch(es) of 32" in result.output
    assert not (tmp_path / "r" / "checkpoints").exists() or not any((tmp_path / "r" / "checkpoints").iterdir())


@pytest.mark.slow
def test_a_diverging_run_stops_with_the_step_before_a_checkpoint_of_nan_weights(uneven, tmp_path):
    run = tmp_path / "run"
    result = train_in_process("--shards", str(uneven), "--out", str(run), "--model", "geoaware-unet-tiny",
                              "--crops-per-tile", "2", "--batch-size", "4", "--num-workers", "0", "--steps", "6",
                              "--lr", "1e30", "--warmup-steps", "0", "--no-amp", "--ckpt-every", "1")
    assert result.exit_code == 1 and "gradient norm not finite" in result.output, result.output
    step = int(result.output.split("error: step ", 1)[1].split(":", 1)[0])
    assert 1 < step <= 6
    for checkpoint in (run / "checkpoints").glob("*.pt"):  # the ones written before are finite
        state = torch.load(checkpoint, weights_only=True)["model"]
        assert all(torch.isfinite(value).all() for value in state.values() if value.is_floating_point())


@pytest.mark.slow
def test_tiny_model_loss_drops_on_fixture_data(uneven, tmp_path):
    run = tmp_path / "run"
    result = train_in_process("--shards", str(uneven), "--out", str(run), "--model", "geoaware-unet-tiny",
                              "--crops-per-tile", "4", "--batch-size", "4", "--num-workers", "1", "--steps", "50",
                              "--lr", "1e-3", "--warmup-steps", "5", "--no-amp", "--log-every", "1", "--seed", "3")
    assert result.exit_code == 0, result.output
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 50

    def mean(term: str, part: list[dict]) -> float:
        return sum(m[term] for m in part) / len(part)

    # The total is dominated by 100 x the cloud soft cross-entropy, whose floor is the entropy of the
    # (fractional) targets; the learnable terms must drop clearly.
    for term, factor in (("recon", 0.6), ("similarity", 0.6), ("coords", 0.85)):
        first, last = mean(term, metrics[:5]), mean(term, metrics[-5:])
        assert last < factor * first, (term, first, last)


def test_streams_shards_over_http(uneven, tmp_path):
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class QuietHandler(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep test output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(uneven)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/manifest.json"
        run = tmp_path / "run"
        result = train_in_process("--shards", url, "--out", str(run), "--model", "geoaware-unet-tiny",
                                  "--crops-per-tile", "1", "--batch-size", "4", "--num-workers", "1", "--no-amp",
                                  "--epochs", "1", "--record-keys", str(run / "keys"))
        assert result.exit_code == 0, result.output
        trained = [key for key, _ in recorded(run / "keys" / "rank0.txt")]
        assert sorted(trained) == sorted(all_keys(uneven))  # 28 tiles x 1 crop = 7 batches, nothing dropped
    finally:
        server.shutdown()


def test_resume_from_a_checkpoint_at_the_end_of_an_epoch(uneven, tmp_path):
    run = tmp_path / "run"
    common = ["--shards", str(uneven), "--out", str(run), "--model", "geoaware-unet-tiny", "--crops-per-tile", "1",
              "--batch-size", "4", "--num-workers", "0", "--no-amp", "--ckpt-every", "7"]
    assert train_in_process(*common, "--steps", "7").exit_code == 0  # 28 tiles / 4 = 7 steps: one full epoch
    result = train_in_process(*common, "--steps", "9", "--resume")
    assert result.exit_code == 0, result.output
    epochs = [json.loads(line) for line in (run / "epochs.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [0, 1] and epochs[1]["step"] == 7


def test_resume_refuses_a_checkpoint_of_the_older_done_list_and_other_data_in_one_line(uneven, tmp_path):
    run = tmp_path / "run"
    common = ["--shards", str(uneven), "--out", str(run), "--model", "geoaware-unet-tiny", "--crops-per-tile", "1",
              "--batch-size", "4", "--num-workers", "0", "--no-amp", "--ckpt-every", "2"]
    assert train_in_process(*common, "--steps", "2").exit_code == 0
    (checkpoint,) = (run / "checkpoints").glob("ckpt-*.pt")
    state = torch.load(checkpoint, weights_only=True)
    assert state["data_position"]["epoch"] == 0 and state["data_position"]["segments"][0]["batches"] == 2
    assert len(str(state["data_position"])) < 400  # a position, not a list of tiles
    other = train_in_process(*common[:1], str(uneven / "shards" / "part-06.tar"), *common[2:], "--steps", "3",
                             "--resume")
    assert other.exit_code == 2 and "stopped mid-epoch on other data (7 shards)" in other.output, other.output
    state.pop("data_position")
    torch.save(state | {"done": {"shards/part-00.tar": ["key"]}, "in_flight_crops": 0}, checkpoint)
    old = train_in_process(*common, "--steps", "3", "--resume")
    assert old.exit_code == 2 and len(old.output.strip().splitlines()) == 1, old.output
    assert f"{checkpoint} holds the data position of an older phileo-train" in old.output


@pytest.mark.slow
def test_fsdp_trains_checkpoints_resumes_identically_and_exports(uneven, tmp_path):
    import torch

    from phileo.models import build
    from training.checkpoint import load_model_weights
    from training.config import DataConfig, PretrainConfig, RunConfig
    from training.distributed import World
    from training.pretrain import Trainer

    run = tmp_path / "run"
    run_pretrain(uneven, run, 2, "--strategy", "fsdp", "--activation-checkpointing", "--steps", "3",
                 "--ckpt-every", "3")
    sharded = run / "checkpoints" / "ckpt-000000003"
    assert (sharded / "trainer_state.pt").is_file() and list(sharded.glob("*.distcp"))
    weights = load_model_weights(sharded)  # one process, no process group
    plain = build("geoaware-unet-tiny")
    plain.load_state_dict(weights, strict=True)  # original parameter names survive sharding + checkpoint wrappers
    config = PretrainConfig(RunConfig(out=str(run), model="geoaware-unet-tiny", steps=3, resume=True, amp=False),
                            DataConfig(shards=str(uneven), num_workers=0, batch_size=2, crops_per_tile=K))
    trainer = Trainer(config, World(0, 1, 0, torch.device("cpu")))
    trainer.resume()
    assert trainer.step == 3
    for name, tensor in trainer.model.state_dict().items():
        torch.testing.assert_close(tensor, weights[name], rtol=0, atol=0)
    # a sharded checkpoint resumes under DDP too, and training goes on
    run_pretrain(uneven, run, 2, "--strategy", "ddp", "--steps", "5", "--ckpt-every", "5", "--resume")
    assert (run / "checkpoints" / "ckpt-000000005.pt").is_file()
    assert set(load_model_weights(run / "checkpoints" / "ckpt-000000005.pt")) == set(weights)


def test_grad_accum_counts_optimizer_steps(uneven, tmp_path):
    run = tmp_path / "run"
    result = train_in_process("--shards", str(uneven), "--out", str(run), "--model", "geoaware-unet-tiny",
                              "--crops-per-tile", "1", "--batch-size", "4", "--grad-accum", "2", "--num-workers", "0",
                              "--no-amp", "--epochs", "1", "--log-every", "1", "--record-keys", str(run / "keys"))
    assert result.exit_code == 0, result.output
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    (epoch,) = [json.loads(line) for line in (run / "epochs.jsonl").read_text().splitlines()]
    assert epoch["micro_batches"] == 6 and steps == [1, 2, 3]  # 28 crops -> 3 steps of 2 x 4, 4 dropped
    assert len(recorded(run / "keys" / "rank0.txt")) == 24 and epoch["dropped_crops"] == 4


@pytest.mark.parametrize("model", ["phileo-vit-tiny", "vit-upernet-tiny-pretrain"])
def test_vit_family_pretrains_with_the_same_trainer(uneven, tmp_path, model):
    run = tmp_path / "run"
    result = train_in_process("--shards", str(uneven), "--out", str(run), "--model", model, "--crops-per-tile", "1",
                              "--batch-size", "2", "--num-workers", "0", "--no-amp", "--steps", "2", "--log-every", "1")
    assert result.exit_code == 0, result.output
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(math.isfinite(m["loss"]) for m in metrics)


def test_default_learning_rates_follow_the_original_per_family():
    from training.config import OptimConfig

    assert OptimConfig().resolved_lrs("geoaware-unet-44m", 4) == pytest.approx((2e-4, 1e-6))
    assert OptimConfig().resolved_lrs("vit-upernet-100m-pretrain", 4) == pytest.approx((6e-5, 1e-8))
    assert OptimConfig(lr=1e-3, min_lr=0.0).resolved_lrs("phileo-vit", 4) == (1e-3, 0.0)
