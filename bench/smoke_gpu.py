"""Smoke forward on a GPU over a synthetic adapter with DeepSeek-V3's real dimensions.

Generates (or reuses) a PEFT adapter with bench/gen_adapter.py (hidden 7168, moe_intermediate_size 2048, 256
experts, q_lora_rank 1536, kv_lora_rank 512, rank 16, bf16), runs `lora_convert.pipeline.commands.smoke` on CUDA over
every layer, and reports:

- groups per second and GB of (stacked) adapter per second for the whole smoke run;
- where the time goes (run_smoke's phases): on a GPU, reading each source tensor into pinned memory, copying it to
  the GPU once, building the stacked tensors there, the kernels and the float64 reference (the full 61-layer case
  with start-up and the Triton cache cold and warm is bench/smoke_gpu_full.py);
- the kernels' achieved bandwidth (stacked A+B bytes per kernel second) against the machine's own copy
  bandwidths: device-to-device (torch clone) and host-to-device (pageable, as smoke does it, and pinned).

    python bench/smoke_gpu.py /tmp/lc-bench/ds4 --moe-layers 4 --layout fused-3d [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def copy_bandwidths(nbytes: int = 1 << 30) -> dict[str, float]:
    """GB/s of a device-to-device clone and of host-to-device copies from pageable and pinned memory."""
    import torch

    def timed(fn, reps=5):
        fn()
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        return best

    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    pageable = torch.empty(nbytes, dtype=torch.uint8)
    pageable.fill_(1)
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    d2d = timed(lambda: dev.clone())
    h2d_pageable = timed(lambda: pageable.to("cuda"))
    h2d_pinned = timed(lambda: pinned.to("cuda", non_blocking=True))
    gb = nbytes / 1e9
    # A clone reads and writes every byte: count both, as for the kernels' bytes moved.
    return {"d2d_clone_GBps": 2 * gb / d2d, "h2d_pageable_GBps": gb / h2d_pageable, "h2d_pinned_GBps": gb / h2d_pinned}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapter", type=Path, help="adapter folder (generated if absent)")
    p.add_argument("--moe-layers", type=int, default=4)
    p.add_argument("--layout", choices=["per-expert", "fused-3d"], default="fused-3d")
    p.add_argument("--tokens", type=int, default=160)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 3
    if not (args.adapter / "adapter_config.json").exists():
        sys.path.insert(0, str(HERE))
        from gen_adapter import generate

        started = time.perf_counter()
        generate(args.adapter, args.layout, args.moe_layers)
        print(f"generated {args.adapter} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    size = sum(f.stat().st_size for f in args.adapter.iterdir() if f.suffix == ".safetensors")

    from lora_convert.pipeline.commands import smoke

    smoke(
        str(args.adapter), base="deepseek-v3", device="cuda", tokens=args.tokens, layers="3"
    )  # warm-up: compile kernels
    report = smoke(str(args.adapter), base="deepseek-v3", device="cuda", tokens=args.tokens, layers="all")
    phases = report.phases
    kernel_s = phases.get("kernels", 0.0)
    to_device_s = phases.get("to_device", 0.0)
    bw = copy_bandwidths()
    result = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "layout": args.layout,
        "moe_layers": args.moe_layers,
        "adapter_bytes": size,
        "stacked_bytes_to_device": report.bytes_to_device,
        "groups": len(report.groups),
        "ok": report.ok,
        "seconds": report.seconds,
        "phases": phases,
        "groups_per_s": len(report.groups) / report.seconds,
        "adapter_GB_per_s": size / 1e9 / report.seconds,
        "kernel_GBps": report.bytes_to_device / 1e9 / kernel_s if kernel_s else None,
        "to_device_GBps": report.bytes_to_device / 1e9 / to_device_s if to_device_s else None,
        "to_device_over_kernels": to_device_s / kernel_s if kernel_s else None,
        **bw,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
