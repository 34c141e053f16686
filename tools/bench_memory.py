"""Peak memory per rank of one training step per model, activation checkpointing off and on.

Tensor-level accounting (MemTracker; FSDPMemTracker for FSDP2 rows on a fake process group) of the trainer's
step run under FakeTensorMode: shapes only, no compute, seconds per configuration. `--validate` reruns small
configurations with real tensors (peaks must agree) and reports their process RSS peak; `--real` measures the
model rows with real tensors (the old RSS measurement, hours on CPUs without bf16). Each configuration runs in
a fresh subprocess. Method and step: DOCS_METHOD below (written into docs/benchmarks.md).

    python tools/bench_memory.py [--batch 16] [--device cpu] [--fsdp 8] [--validate] [--write-docs]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ is not installed
from tools.docs_section import write_docs_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## Model memory (tools/bench_memory.py)"
DEFAULT_MODELS = ("geoaware-unet-44m", "geoaware-unet-200m", "phileo-vit", "vit-upernet-100m", "vit-upernet-300m",
                  "vit-upernet-100m-pretrain")
FSDP_MODELS = ("geoaware-unet-200m", "vit-upernet-300m")
VALIDATE = (("geoaware-unet-tiny", 2), ("phileo-vit-tiny", 2), ("geoaware-unet-44m", 1))
DOWNSTREAM = ("vit-upernet-100m", "vit-upernet-300m")
MB = 1024 * 1024
# MemTracker category -> short name (FSDPMemTracker's sharded/unsharded kinds fold into param/grad)
CATEGORIES = {"Parameter": "param", "Sharded Param": "param", "Unsharded Param": "param_unsharded",
              "Buffer": "buffer", "Gradient": "grad", "Sharded Grad": "grad", "Unsharded Grad": "grad_unsharded",
              "Activation": "act", "Temp": "temp", "Optstate": "opt", "OptState": "opt", "Other": "other",
              "Inputs": "other", "All Gather": "comm", "Reduce Scatter": "comm"}


def _tracker_class(fsdp: bool) -> type:
    """MemTracker (or FSDPMemTracker) keeping only the global peak: the stock per-module peak bookkeeping
    walks every module on every op (minutes for the large models) and feeds nothing this tool reports."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker

    class PeakTracker(FSDPMemTracker if fsdp else MemTracker):
        def _update_peak_stats(self, peak_state) -> None:
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap["Total"]:
                    self._peak_mem[dev] = snap["Total"]
                    self._peak_mem_snap[dev] = dict(snap)

    return PeakTracker


class _NoHook:
    def remove(self) -> None:
        pass


def _make_tracker(model, optimizer, fsdp: bool):
    tracker = _tracker_class(fsdp)(model, optimizer) if fsdp else _tracker_class(fsdp)()
    for param in model.parameters():  # frozen (e.g. sin-cos pos_embed): MemTracker's grad hook would raise
        if not param.requires_grad:
            tracker._param_to_grad_hook_handles[param] = (_NoHook(), _NoHook())
    return tracker


def _autocast(device: str):
    """bf16 autocast as the trainer; for fake CUDA tensors without a GPU, bypass the is-CUDA-available check."""
    import torch

    if device != "cuda" or torch.cuda.is_available():
        return torch.autocast(device, dtype=torch.bfloat16)
    with mock.patch("torch.cuda.amp.common.amp_definitely_not_available", return_value=False), \
            mock.patch("torch.cuda.is_bf16_supported", return_value=True):
        return torch.autocast(device, dtype=torch.bfloat16)


def _flatten(out):
    if isinstance(out, (list, tuple)):
        for item in out:
            yield from _flatten(item)
    elif hasattr(out, "is_floating_point"):
        yield out


def _loss(out, downstream: bool):
    import torch

    if downstream:
        return torch.nn.functional.mse_loss(out.float(), torch.zeros_like(out, dtype=torch.float32))
    return sum(t.float().pow(2).mean() for t in _flatten(out) if t.is_floating_point())


def _build(model_name: str, ac: bool):
    """The model on CPU (real weights: the registry's init needs data), float32, AC applied as the trainer."""
    import torch

    from phileo.models import build
    from training.parallel import checkpoint_blocks

    torch.manual_seed(0)
    model = build(model_name).float()
    if ac:
        checkpoint_blocks(model)
    return model.train()


def _steps(model, optimizer, x, downstream: bool, device: str, steps: int, tracker) -> None:
    import torch

    for _ in range(steps):
        with _autocast(device):
            out = model(x)
        _loss(out, downstream).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if hasattr(tracker, "reset_mod_stats"):
            tracker.reset_mod_stats()  # MemTracker refuses a second root forward otherwise


def _summary(tracker, device: str, params: int) -> dict:
    snap = next((s for dev, s in tracker._peak_mem_snap.items() if dev.type == device), {})
    parts: dict[str, float] = {}
    for key, value in snap.items():
        name = CATEGORIES.get(getattr(key, "value", key))
        if name:
            parts[name] = parts.get(name, 0.0) + value / MB
    return {"params": params, "peak_mb": snap.get("Total", 0) / MB, "parts": parts}


def _to_fake(model, device: str):
    """Swap every parameter and buffer for an empty one on `device` (fake under an active FakeTensorMode).

    `Module.to_empty` cannot do it for every model (some parameters refuse `swap_tensors`); tied tensors stay tied.
    """
    import torch

    memo: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for slots, wrap in ((module._parameters, True), (module._buffers, False)):
            for name, tensor in slots.items():
                if tensor is not None and id(tensor) not in memo:
                    empty = torch.empty_like(tensor, device=device)
                    memo[id(tensor)] = torch.nn.Parameter(empty, tensor.requires_grad) if wrap else empty
                if tensor is not None:
                    slots[name] = memo[id(tensor)]
    return model


def tensor_peak(model_name: str, batch: int, ac: bool, fake: bool = True, device: str = "cpu",
                steps: int = 2) -> dict:
    """Peak tensor memory (MB) of `steps` training steps and its breakdown at the peak, in this process.

    fake=True runs under FakeTensorMode (shapes only, no compute); device "cuda" needs fake=True without a GPU.
    """
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = _build(model_name, ac)
    params = sum(p.numel() for p in model.parameters())
    downstream = model_name in DOWNSTREAM
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    with mode:
        model = _to_fake(model, device) if fake else model.to(device)
        # foreach: what AdamW's default picks for real tensors of that device (fake ones could mislead it)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=device == "cuda")
        x = torch.randn(batch if downstream else 2 * batch, 10, 128, 128, device=device)
        tracker = _make_tracker(model, optimizer, fsdp=False)
        tracker.track_external(model, optimizer, x)
        started = time.perf_counter()
        with tracker:
            _steps(model, optimizer, x, downstream, device, steps, tracker)
    return {**_summary(tracker, device, params), "seconds": time.perf_counter() - started}


def fsdp_peak(model_name: str, batch: int, ac: bool, world_size: int, device: str = "cpu", steps: int = 2) -> dict:
    """Per-rank peak of FSDP2 (fake process group, FakeTensorMode), sharded as training/parallel.py apply_fsdp."""
    import torch
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from training.distributed import World
    from training.parallel import apply_fsdp

    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        model = _build(model_name, ac)
        params = sum(p.numel() for p in model.parameters())
        downstream = model_name in DOWNSTREAM
        world = World(rank=0, world_size=world_size, local_rank=0, device=torch.device(device))
        mesh = init_device_mesh(device, (world_size,))  # outside fake mode: DeviceMesh reads real tensors
        with FakeTensorMode(allow_non_fake_inputs=True), \
                mock.patch("torch.distributed.device_mesh.init_device_mesh", return_value=mesh):
            model = apply_fsdp(_to_fake(model, device), world, mixed_precision=True)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=device == "cuda")
            x = torch.randn(batch if downstream else 2 * batch, 10, 128, 128, device=device)
            tracker = _make_tracker(model, optimizer, fsdp=True)
            tracker.track_inputs((x,))
            started = time.perf_counter()
            with tracker:
                _steps(model, optimizer, x, downstream, device, steps, tracker)
        return {**_summary(tracker, device, params), "seconds": time.perf_counter() - started}
    finally:
        dist.destroy_process_group()


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(spec: dict) -> dict:
    """One configuration in this (fresh) process; real runs also report the RSS peak (VmHWM delta)."""
    import torch

    sys.path.insert(0, str(ROOT))
    import phileo.models  # noqa: F401  (imported before the RSS baseline: the code is not the step's memory)
    import training.parallel  # noqa: F401

    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as file:
        file.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
    base_kb = _rss_kb("VmRSS")
    if spec.get("world_size"):
        result = fsdp_peak(spec["model"], spec["batch"], spec["ac"], spec["world_size"], spec["device"])
    else:
        result = tensor_peak(spec["model"], spec["batch"], spec["ac"], spec["fake"], spec["device"])
    if not spec["fake"]:
        result["rss_mb"] = (_rss_kb("VmHWM") - base_kb) / 1024
    return {**spec, **result, "threads": torch.get_num_threads()}


def run_child(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {**spec, "status": "timeout"}
    if proc.returncode != 0:
        tail = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if line.strip()][-1:]
        return {**spec, "status": "killed (OOM?)" if proc.returncode < 0 else "error", "error": " | ".join(tail)}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {_label(spec)}: {_brief(result)} ({time.perf_counter() - started:.0f} s)", flush=True)
    return {**result, "status": "ok"}


def _label(spec: dict) -> str:
    kind = f"FSDP2 x{spec['world_size']}" if spec.get("world_size") else ("fake" if spec["fake"] else "real")
    return f"{spec['model']} b{spec['batch']} AC {'on' if spec['ac'] else 'off'} {kind} {spec['device']}"


def _brief(result: dict) -> str:
    rss = f", RSS peak {result['rss_mb']:.0f} MB" if "rss_mb" in result else ""
    return f"tensor peak {result['peak_mb']:.1f} MB{rss}"


def _mb(result: dict, key: str = "peak_mb") -> str:
    return f"{result[key]:.0f}" if key in result else result.get("status", "-")


def _parts(result: dict) -> str:
    parts = result.get("parts", {})
    names = ("param", "param_unsharded", "grad", "grad_unsharded", "opt", "act", "temp", "other")
    return ", ".join(f"{name} {parts[name]:.0f}" for name in names if parts.get(name, 0) >= 0.5) or "-"


def _ratio(off: dict, on: dict) -> str:
    return f"{on['peak_mb'] / off['peak_mb']:.2f}" if "peak_mb" in off and "peak_mb" in on else "-"


def table(rows: list[tuple[dict, dict]]) -> str:
    """model | params | AC off peak MB | AC on peak MB | ratio | breakdown of each peak (MB)."""
    lines = ["| model | parallel | params | AC off peak MB | AC on peak MB | ratio on/off | "
             "breakdown at peak, AC off (MB) | breakdown at peak, AC on (MB) |", "|---|---|---|---|---|---|---|---|"]
    for off, on in rows:
        params = off.get("params") or on.get("params")
        parallel = f"FSDP2, {off['world_size']} ranks" if off.get("world_size") else "1 replica (DDP)"
        lines.append(f"| {off['model']} | {parallel} | {f'{params / 1e6:.1f}M' if params else '?'} | {_mb(off)} | "
                     f"{_mb(on)} | {_ratio(off, on)} | {_parts(off)} | {_parts(on)} |")
    return "\n".join(lines)


def validation_table(rows: list[tuple[dict, dict]]) -> str:
    lines = ["| model | batch (crops) | AC | real MemTracker peak MB | fake MemTracker peak MB | fake - real MB | "
             "real process RSS peak MB |", "|---|---|---|---|---|---|---|"]
    for real, fake in rows:
        diff = f"{fake['peak_mb'] - real['peak_mb']:+.3f}" if "peak_mb" in real and "peak_mb" in fake else "-"
        crops = real["batch"] if real["model"] in DOWNSTREAM else 2 * real["batch"]
        peaks = [f"{r['peak_mb']:.2f}" if "peak_mb" in r else r["status"] for r in (real, fake)]
        lines.append(f"| {real['model']} | {real['batch']} ({crops}) | {'on' if real['ac'] else 'off'} | {peaks[0]} | "
                     f"{peaks[1]} | {diff} | {_mb(real, 'rss_mb')} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="crops per step (pretraining forwards 2x: both views)")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="device of the (fake) tensors and autocast; fake cuda needs a GPU for backward")
    parser.add_argument("--fsdp", type=int, default=8, help="world size of the FSDP2 rows (0: none)")
    parser.add_argument("--fsdp-models", nargs="*", default=list(FSDP_MODELS))
    parser.add_argument("--validate", action="store_true", help="real vs fake runs of small configs (minutes)")
    parser.add_argument("--real", action="store_true",
                        help="model rows with real tensors (the old RSS measurement; hours on CPUs without bf16)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per subprocess")
    parser.add_argument("--write-docs", action="store_true", help=f"replace/append '{SECTION}' in {DOCS.name}")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _pair(args: argparse.Namespace, **spec) -> tuple[dict, dict]:
    return tuple(run_child({"fake": not args.real, "device": args.device, **spec, "ac": ac}, args.timeout)
                 for ac in (False, True))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    command = "python tools/bench_memory.py " + " ".join(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    checks = []
    if args.validate:
        for model, batch in VALIDATE:
            for ac in (False, True):
                spec = {"model": model, "batch": batch, "ac": ac, "device": "cpu"}
                checks.append(tuple(run_child({**spec, "fake": fake}, args.timeout) for fake in (False, True)))
        print(validation_table(checks), flush=True)
    rows = [_pair(args, model=model, batch=args.batch) for model in args.models]
    if args.fsdp:
        rows += [_pair(args, model=model, batch=args.batch, world_size=args.fsdp) for model in args.fsdp_models]
    print(table(rows), flush=True)
    elapsed = time.perf_counter() - started
    print(f"\ntotal {elapsed:.0f} s")
    if args.write_docs:
        write_section(args, command.strip(), rows, checks, elapsed)


def _mem_gb() -> float:
    with open("/proc/meminfo") as file:
        return int(file.readline().split()[1]) / 1024 / 1024


def write_section(args: argparse.Namespace, command: str, rows: list, checks: list, elapsed: float) -> None:
    import torch

    body = f"""{SECTION}

Command: `{command}` ({datetime.date.today().isoformat()}, {elapsed / 60:.0f} min), on
{platform.node() or 'this machine'}: {os.cpu_count()} CPU cores, {_mem_gb():.0f} GiB RAM, no GPU
(none was available: there is no measured GPU figure), Python {platform.python_version()}, PyTorch {torch.__version__}.

{DOCS_METHOD}

**Validation** (`--validate`): the same step with real tensors under the same tracker vs FakeTensorMode,
CPU, small batches (batch = crops per view; pretraining models forward both views). The last column is the
real run's process RSS peak (VmHWM minus RSS after imports, before the model is built): allocator caching
and fragmentation, oneDNN/autograd scratch and the runtime's own growth come on top of the tensor figure.

{validation_table(checks) if checks else '(not run)'}

**Peak per rank at batch {args.batch}** ({'real' if args.real else 'fake'} tensors, {args.device} autocast bf16;
MB = MiB; breakdown at the moment of the peak: param = fp32 weights (sharded ones for FSDP2),
param_unsharded = all-gathered bf16 weights, grad, opt = AdamW exp_avg + exp_avg_sq, act = activations
(forward, and AC recompute), temp = backward temporaries, other = the input batch):

{table(rows)}

{DOCS_NOTES}
"""
    write_docs_section(SECTION, body)


DOCS_METHOD = """**Method.** Tensor-level accounting, not process RSS: `torch.distributed._tools.mem_tracker.MemTracker`
(FSDP2 rows: `FSDPMemTracker`) follows every tensor storage created during the step and records the peak of
their sum, with the category of each (its per-module bookkeeping is switched off, only the global peak is
kept). The step runs under `torch._subclasses.fake_tensor.FakeTensorMode`: tensors carry shapes, dtypes and
devices but no data and no kernel runs, so a batch-16 step of a 300M model takes seconds on this CPU instead
of hours (no bf16 units here: the old RSS run of `--real` timed out for every model but the 44M one). Each
(model, AC) is one fresh subprocess. The step is the trainer's: float32 model, activation checkpointing as
training/parallel.py (`apply_activation_checkpointing` on `block_types()`), `torch.autocast(bf16)`, forward,
backward, `clip_grad_norm_`, AdamW step, `zero_grad(set_to_none=True)`; two steps, so the second runs with
the AdamW states allocated. Pretraining models forward (2*batch, 10, 128, 128) (both views in one batch, as
`_forward_backward`) with a sum of mean squares over all outputs standing in for `foundation_loss` (whose
logging `.tolist()` needs data); vit-upernet-100m/300m forward (batch, 10, 128, 128) with an MSE loss."""

DOCS_NOTES = """**Reading the figures.** These are tensor-accounted peaks: what a caching allocator must hold at
least at one moment of the step. A GPU adds the CUDA context (a few hundred MB), cuDNN/cuBLAS workspaces and
allocator fragmentation; the CPU adds what the validation's RSS column shows. The peak falls at the end of the
forward / start of the backward, before gradients exist, so activations dominate every row. No GPU was available
to this task: there is no measured GPU figure.

CPU autocast, not CUDA: fake CUDA tensors can be made without a GPU and the forward runs (CUDA autocast
forced on), but in backward the autograd engine asks the CUDA runtime for a device context (`RuntimeError:
hasPrimaryContext expects a valid device index, but got device_index=0`), so every row uses CPU autocast.
CPU autocast casts convolutions, linear layers and matmuls to bf16 like CUDA autocast, but the two op lists
differ in details, and AdamW's CUDA default (foreach, with temporaries) is not the CPU one; on a GPU machine
`--device cuda` measures with the CUDA path.

FSDP2 rows: `fully_shard` per block + root with bf16 parameters and fp32 reduction, as training/parallel.py
`apply_fsdp`, on a fake process group (`FakeStore`, backend "fake": collectives are no-ops, all ranks alike)
under FakeTensorMode; figures are one rank's. Weights, grads and AdamW states shrink to 1/world size.
Activations are smaller than in the 1-replica rows too, presumably because with bf16 parameters (and inputs
cast to bf16 by the policy) layers that keep fp32 outputs under autocast with fp32 parameters (norms,
parameterised skips) produce bf16 ones; this was not broken down further."""

if __name__ == "__main__":
    main()
