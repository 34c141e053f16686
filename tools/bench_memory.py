"""Peak host memory of one training step per model, activation checkpointing off and on (CPU).

Every (model, AC) configuration runs in a FRESH subprocess so peaks never mix. The child builds the
model (CPU, float32), applies activation checkpointing as training/parallel.py does
(`apply_activation_checkpointing(model, check_fn=isinstance(m, block_types()))`) when asked, then runs one
step as the trainer does: bf16 autocast on CPU, forward, backward, AdamW step. Pretraining models
forward both views in one batch, input (2*batch, 10, 128, 128) (training/pretrain.py `_forward_backward`),
with a sum of mean squares over every output tensor as a stand-in loss; downstream models
(vit-upernet-100m/300m) forward (batch, 10, 128, 128) with an MSE loss on the output. It reports the
peak RSS (VmHWM, /proc/self/status) minus the RSS right after imports, and the step time.

OOM guard: each configuration first runs at --probe-batch. The activation part of its peak (peak minus
the static params + grads + 2 AdamW states = params*16 bytes) is scaled linearly to --batch; the full
batch is measured only if that estimate stays under --max-gb and the scaled step time under the timeout.
Otherwise the row is marked "extrapolated". Each child is killed after --timeout seconds ("timeout").

    python tools/bench_memory.py [--batch 16] [--models ...] [--write-docs]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ is not installed
from tools.docs_section import write_docs_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## Model memory (tools/bench_memory.py)"
DEFAULT_MODELS = ("geoaware-unet-44m", "geoaware-unet-200m", "phileo-vit", "vit-upernet-100m", "vit-upernet-300m",
                  "vit-upernet-100m-pretrain")
DOWNSTREAM = ("vit-upernet-100m", "vit-upernet-300m")
MB = 1024 * 1024


def rss_kb(field: str) -> int:
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_hwm() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs); silently a no-op if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
    except OSError:
        pass


def child(model_name: str, ac: bool, batch: int) -> dict:
    """One configuration, in this (fresh) process. Returns a JSON-able dict."""
    import torch

    sys.path.insert(0, str(ROOT))
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    from phileo.models import build
    from training.parallel import block_types

    torch.manual_seed(0)
    reset_hwm()
    base_kb = rss_kb("VmRSS")
    model = build(model_name).float()
    params = sum(p.numel() for p in model.parameters())
    if ac:
        apply_activation_checkpointing(model, check_fn=lambda module: isinstance(module, block_types()))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    downstream = model_name in DOWNSTREAM
    n = batch if downstream else 2 * batch
    x = torch.randn(n, 10, 128, 128)
    started = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    if downstream:
        loss = torch.nn.functional.mse_loss(out.float(), torch.zeros_like(out, dtype=torch.float32))
    else:
        tensors = [out] if isinstance(out, torch.Tensor) else list(_flatten(out))
        loss = sum(t.float().pow(2).mean() for t in tensors if t.is_floating_point())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    step_s = time.perf_counter() - started
    peak_kb = rss_kb("VmHWM")
    return {"model": model_name, "ac": ac, "batch": batch, "params": params, "base_mb": base_kb / 1024,
            "peak_mb": (peak_kb - base_kb) / 1024, "step_s": step_s, "threads": torch.get_num_threads()}


def _flatten(out):
    if isinstance(out, (list, tuple)):
        for item in out:
            yield from _flatten(item)
    elif hasattr(out, "is_floating_point"):
        yield out


def run_child(model: str, ac: bool, batch: int, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", model, "--ac", str(int(ac)),
           "--batch", str(batch)]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "wall_s": time.perf_counter() - started}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        status = "killed (OOM?)" if proc.returncode < 0 else "error"
        return {"status": status, "rc": proc.returncode, "error": " | ".join(tail)}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["status"] = "ok"
    result["wall_s"] = time.perf_counter() - started
    return result


def measure(model: str, ac: bool, args: argparse.Namespace) -> dict:
    """Probe at --probe-batch, then measure --batch if it fits the memory / time guard, else extrapolate."""
    # downstream heads hold BatchNorm on 1x1 pooled maps: batch 1 cannot train them
    probe_batch = max(args.probe_batch, 2) if model in DOWNSTREAM else args.probe_batch
    probe = run_child(model, ac, probe_batch, args.timeout)
    print(f"  {model} AC={'on' if ac else 'off'} probe batch {probe_batch}: {_brief(probe)}", flush=True)
    if probe["status"] != "ok" or args.batch == probe_batch:
        return {**probe, "kind": "measured" if probe["status"] == "ok" else probe["status"]}
    scale = args.batch / probe_batch
    static_mb = probe["params"] * 16 / MB  # fp32 params + grads + AdamW exp_avg + exp_avg_sq
    act_mb = max(probe["peak_mb"] - static_mb, 0.0)
    est = {**probe, "batch": args.batch, "peak_mb": static_mb + act_mb * scale, "step_s": probe["step_s"] * scale,
           "kind": f"extrapolated from batch {probe_batch}"}
    if est["peak_mb"] > args.max_gb * 1024 or est["step_s"] * 1.5 > args.timeout:
        why = "memory" if est["peak_mb"] > args.max_gb * 1024 else "time"
        print(f"    -> batch {args.batch} skipped ({why} guard): extrapolated {est['peak_mb']:.0f} MB, "
              f"{est['step_s']:.0f} s", flush=True)
        return est
    full = run_child(model, ac, args.batch, args.timeout)
    print(f"  {model} AC={'on' if ac else 'off'} batch {args.batch}: {_brief(full)}", flush=True)
    if full["status"] == "ok":
        return {**full, "kind": "measured"}
    return {**est, "kind": f"{est['kind']} (batch {args.batch}: {full['status']})"}


def _brief(result: dict) -> str:
    if result["status"] != "ok":
        return f"{result['status']} {result.get('error', '')}".strip()
    return f"peak {result['peak_mb']:.0f} MB, step {result['step_s']:.1f} s, {result['params'] / 1e6:.1f}M params"


def table(rows: list[tuple[str, dict, dict]], batch: int) -> str:
    lines = [f"| model | params | param+optim MB | AC off peak MB | AC on peak MB | ratio on/off | "
             f"step s (off / on) | measured/extrapolated (batch {batch}) |",
             "|---|---|---|---|---|---|---|---|"]
    for model, off, on in rows:
        params = off.get("params") or on.get("params")
        popt = f"{params * 12 / MB:.0f}" if params else "?"
        peak = [f"{r['peak_mb']:.0f}" if "peak_mb" in r else r["status"] for r in (off, on)]
        ratio = f"{on['peak_mb'] / off['peak_mb']:.2f}" if "peak_mb" in off and "peak_mb" in on else "-"
        step = " / ".join(f"{r['step_s']:.1f}" if "step_s" in r else "-" for r in (off, on))
        kinds = {off.get("kind", off["status"]), on.get("kind", on["status"])}
        kind = kinds.pop() if len(kinds) == 1 else f"off: {off.get('kind')}; on: {on.get('kind')}"
        pstr = f"{params / 1e6:.1f}M" if params else "?"
        lines.append(f"| {model} | {pstr} | {popt} | {peak[0]} | {peak[1]} | {ratio} | {step} | {kind} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="crops per step (pretraining forwards 2x: both views)")
    parser.add_argument("--probe-batch", type=int, default=2, help="batch of the first, small run of each config")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--max-gb", type=float, default=16.0, help="run --batch only if the estimate is below this")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per subprocess")
    parser.add_argument("--write-docs", action="store_true", help=f"replace/append '{SECTION}' in {DOCS.name}")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--ac", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, bool(args.ac), args.batch)))
        return
    command = "python tools/bench_memory.py " + " ".join(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    rows = []
    for model in args.models:
        off = measure(model, False, args)
        on = measure(model, True, args)
        rows.append((model, off, on))
        print(table(rows, args.batch), flush=True)  # partial table after every model
        if args.write_docs:  # after every model, so an interrupted run still leaves its rows
            write_section(args, command, rows, done=len(rows) == len(args.models))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


def write_section(args: argparse.Namespace, command: str, rows: list, done: bool) -> None:
    result = table(rows, args.batch)
    if not done:
        result += f"\n\n(partial: {len(rows)} of {len(args.models)} models done when this was written)"
    threads = next((r.get("threads") for _, off, on in rows for r in (off, on) if "threads" in r), "?")
    body = f"""{SECTION}

Command: `{command.strip()}` ({datetime.date.today().isoformat()}), on {platform.node() or 'this machine'}:
{os.cpu_count()} CPU cores ({threads} torch threads), {_mem_gb():.0f} GiB RAM, no GPU, {platform.python_version()},
with another benchmark process running concurrently (step times are noisy).

**CPU figures.** One training step per (model, activation checkpointing) in a fresh subprocess: CPU float32
model, `torch.autocast("cpu", dtype=torch.bfloat16)`, backward, AdamW step. Pretraining models forward
(2*batch, 10, 128, 128) (both views in one batch, as `_forward_backward`) with a sum of mean squares over all
outputs as the loss; vit-upernet-100m/300m forward (batch, 10, 128, 128) with an MSE on the output.
"Peak MB" = VmHWM minus RSS right after imports (includes the model, gradients and AdamW states);
"param+optim MB" = params * 4 bytes * 3 (weights + 2 AdamW states). AC = `apply_activation_checkpointing`
on `block_types()` as training/parallel.py. GPU figures need a lent GPU; none was available.

OOM/time guard: each config ran first at batch {args.probe_batch}; the batch-{args.batch} figure is measured only
if the linear estimate stayed under {args.max_gb:g} GB and the step fitted the {args.timeout:g} s per-process
timeout. **Extrapolated** rows: static (params * 16 bytes: weights, grads, 2 AdamW states) plus
(probe peak - static) * {args.batch}/{args.probe_batch}, step time scaled by the same factor. These are rough: the
allocator's RSS is not linear at small batch, and the probe's single step includes first-call (oneDNN) warm-up,
so extrapolated step times overstate; treat extrapolated figures as order-of-magnitude.

{result}
"""
    write_docs_section(SECTION, body)


def _mem_gb() -> float:
    with open("/proc/meminfo") as file:
        return int(file.readline().split()[1]) / 1024 / 1024


if __name__ == "__main__":
    main()
