"""Synthetic DeepSeek-V3 LoRA adapters in PEFT's on-disk format, for the benchmarks in bench/run_bench.py.

Three shapes of adapter (see docs/benchmarks.md):

  per-expert  transformers-4 layout: `...mlp.experts.J.{gate,up,down}_proj.lora_{A,B}.weight`, A [r, in], B [out, r]
  fused-3d    transformers-5 layout (`target_parameters`): `mlp.experts.base_layer.lora_A` [E*r, H] /
              `lora_B` [2I, r*E] = gate_up_proj and `mlp.experts.lora_A` [E*r, I] / `lora_B` [H, r*E] = down_proj
  stress      the key-count case: the real 61 layers x 256 experts, per-expert, with tiny dimensions
              (~94,000 tensors); it comes with its own tiny deepseek_v3 config.json (written to OUT-base/) because
              the real preset's shapes would not match

Full-size adapters use DeepSeek-V3's real dimensions (hidden 7168, moe_intermediate_size 2048, 256 experts,
q_lora_rank 1536, kv_lora_rank 512) at rank 16. `--moe-layers N` writes layers 3..3+N-1 (layers 0-2 are dense
in DeepSeek-V3), each with MLA attention LoRA (q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj) and
LoRA on every routed expert.

Values are random normals (seeded, so a rerun writes the same bytes), scaled like a trained adapter (A ~ 1/sqrt(in),
B ~ 1e-3) so the data scan sees no outliers. Tensors are produced one at a time and streamed to disk with
lora_convert's StreamingSafetensorsWriter, in the order `safetensors.torch.save_file` uses (sorted by name), so
the generator stays small in memory whatever size it writes.

    .venv/bin/python bench/gen_adapter.py /tmp/lc-bench/pe9 --layout per-expert --moe-layers 9
    .venv/bin/python bench/gen_adapter.py /tmp/lc-bench/stress --layout stress
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

# DeepSeek-V3 (lora_convert/arch/presets/deepseek-v3.json)
REAL = dict(
    hidden=7168,
    moe_inter=2048,
    experts=256,
    q_lora=1536,
    kv_lora=512,
    heads=128,
    nope=128,
    rope=64,
    v=128,
    first_dense=3,
    layers=61,
    rank=16,
)
# The stress case: the real layer and expert counts, tiny everything else.
TINY = dict(
    hidden=64,
    moe_inter=32,
    experts=256,
    q_lora=48,
    kv_lora=32,
    heads=2,
    nope=16,
    rope=8,
    v=16,
    first_dense=0,
    layers=61,
    rank=4,
)

PREFIX = "base_model.model.model.layers"
ATTENTION = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")


def attention_shapes(d: dict) -> dict[str, tuple[int, int]]:
    """(in, out) of each MLA projection."""
    H = d["hidden"]
    return {
        "q_a_proj": (H, d["q_lora"]),
        "q_b_proj": (d["q_lora"], d["heads"] * (d["nope"] + d["rope"])),
        "kv_a_proj_with_mqa": (H, d["kv_lora"] + d["rope"]),
        "kv_b_proj": (d["kv_lora"], d["heads"] * (d["nope"] + d["v"])),
        "o_proj": (d["heads"] * d["v"], H),
    }


def tensor_plan(d: dict, layout: str, layers: list[int]) -> list[tuple[str, tuple[int, int], int]]:
    """(key, shape, fan_in) of every tensor; fan_in sets the scale of the random values."""
    r, H, I, E = d["rank"], d["hidden"], d["moe_inter"], d["experts"]
    out: list[tuple[str, tuple[int, int], int]] = []

    def linear(module: str, fan_in: int, fan_out: int, rank: int = r) -> None:
        out.append((f"{module}.lora_A.weight", (rank, fan_in), fan_in))
        out.append((f"{module}.lora_B.weight", (fan_out, rank), 0))

    for L in layers:
        for name, (fi, fo) in attention_shapes(d).items():
            linear(f"{PREFIX}.{L}.self_attn.{name}", fi, fo)
        if layout == "fused-3d":
            # gate_up_proj [E, 2I, H] is registered first, so it is the inner wrapper (`base_layer`).
            out.append((f"{PREFIX}.{L}.mlp.experts.base_layer.lora_A.weight", (E * r, H), H))
            out.append((f"{PREFIX}.{L}.mlp.experts.base_layer.lora_B.weight", (2 * I, r * E), 0))
            out.append((f"{PREFIX}.{L}.mlp.experts.lora_A.weight", (E * r, I), I))
            out.append((f"{PREFIX}.{L}.mlp.experts.lora_B.weight", (H, r * E), 0))
        else:
            for j in range(E):
                base = f"{PREFIX}.{L}.mlp.experts.{j}"
                linear(f"{base}.gate_proj", H, I)
                linear(f"{base}.up_proj", H, I)
                linear(f"{base}.down_proj", I, H)
    # safetensors.torch.save_file orders tensors by dtype, then name: PEFT files are in name order.
    out.sort(key=lambda t: t[0])
    return out


def adapter_config(d: dict, layout: str) -> dict:
    """adapter_config.json as peft 0.21 writes it (the key set of the PEFT-written tests/fixtures/data/cases)."""
    targets = list(ATTENTION)
    target_parameters = None
    if layout == "fused-3d":
        target_parameters = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    else:
        targets += ["gate_proj", "up_proj", "down_proj"]
    return {
        "alora_invocation_tokens": None,
        "alpha_pattern": {},
        "arrow_config": None,
        "auto_mapping": None,
        "base_model_name_or_path": "deepseek-ai/DeepSeek-V3",
        "bias": "none",
        "corda_config": None,
        "ensure_weight_tying": False,
        "eva_config": None,
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "kasa_config": None,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": 2 * d["rank"],
        "lora_bias": False,
        "lora_dropout": 0.0,
        "lora_ga_config": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "monteclora_config": None,
        "peft_type": "LORA",
        "peft_version": "0.21.2",
        "qalora_group_size": 16,
        "r": d["rank"],
        "rank_pattern": {},
        "revision": None,
        "target_modules": targets,
        "target_parameters": target_parameters,
        "task_type": "CAUSAL_LM",
        "trainable_token_indices": None,
        "use_bdlora": None,
        "use_dora": False,
        "use_qalora": False,
        "use_rslora": False,
        "velora_config": None,
    }


def tiny_base_config(d: dict) -> dict:
    """A deepseek_v3 config.json with the stress case's tiny dimensions and the real layer/expert counts."""
    from lora_convert.arch.base_config import find_preset

    config = dict(find_preset("deepseek-v3")["config"])
    config.pop("quantization_config", None)
    config.update(
        {
            "hidden_size": d["hidden"],
            "moe_intermediate_size": d["moe_inter"],
            "intermediate_size": 4 * d["hidden"],
            "n_routed_experts": d["experts"],
            "q_lora_rank": d["q_lora"],
            "kv_lora_rank": d["kv_lora"],
            "num_attention_heads": d["heads"],
            "num_key_value_heads": d["heads"],
            "qk_nope_head_dim": d["nope"],
            "qk_rope_head_dim": d["rope"],
            "v_head_dim": d["v"],
            "first_k_dense_replace": d["first_dense"],
            "num_hidden_layers": d["layers"],
            "vocab_size": 1024,
        }
    )
    return config


def generate(out: Path, layout: str, moe_layers: int, dtype: str = "bf16", seed: int = 0) -> dict:
    import torch

    from lora_convert.io.dtypes import numpy_dtype
    from lora_convert.io.safetensors_writer import StreamingSafetensorsWriter, TensorSpec

    if layout == "stress":
        d, tensor_layout = TINY, "per-expert"
        layers = list(range(d["first_dense"], d["layers"]))
    else:
        d, tensor_layout = REAL, layout
        layers = list(range(d["first_dense"], d["first_dense"] + moe_layers))
        if layers and layers[-1] >= d["layers"]:
            raise SystemExit(f"DeepSeek-V3 has only {d['layers'] - d['first_dense']} MoE layers")
    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    tag = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}[dtype]
    plan = tensor_plan(d, tensor_layout, layers)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(
        json.dumps(adapter_config(d, tensor_layout), indent=2, sort_keys=True) + "\n"
    )
    if layout == "stress":
        base = out.parent / f"{out.name}-base"
        base.mkdir(exist_ok=True)
        (base / "config.json").write_text(json.dumps(tiny_base_config(d), indent=2) + "\n")
    specs = [TensorSpec(key, tag, shape) for key, shape, _ in plan]
    writer = StreamingSafetensorsWriter(out / "adapter_model.safetensors", specs, metadata={"format": "pt"})
    # One thread: with two, every small op pays a thread-pool wake-up that costs more than the op (7168x16
    # tensors were 20x slower on the 2-core machine).
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    try:
        for key, shape, fan_in in plan:
            # One tensor alive at a time. A like kaiming-uniform's scale, B small and non-zero (a trained adapter).
            scale = 1.0 / math.sqrt(fan_in) if fan_in else 1e-3
            t = torch.randn(shape, generator=gen, dtype=torch.float32).mul_(scale).to(tdtype)
            # The writer takes numpy (the core has no torch); the raw bytes are viewed as the tag's numpy dtype.
            raw = t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()]).numpy()
            writer.write(key, raw.view(numpy_dtype(tag)))
            del t, raw
        writer.close()
    except BaseException:
        writer.abort()
        raise
    size = (out / "adapter_model.safetensors").stat().st_size
    return {
        "path": str(out),
        "layout": layout,
        "moe_layers": len(layers) if layout != "stress" else 0,
        "tensors": len(plan),
        "bytes": size,
        "params": sum(math.prod(s) for _, s, _ in plan),
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "out", type=Path, help="adapter folder to write (keep it outside the repository, e.g. /tmp/lc-bench/...)"
    )
    p.add_argument("--layout", choices=["per-expert", "fused-3d", "stress"], required=True)
    p.add_argument("--moe-layers", type=int, default=4, help="number of MoE layers (3..3+N-1); ignored for stress")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(json.dumps(generate(args.out, args.layout, args.moe_layers, args.dtype, args.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
