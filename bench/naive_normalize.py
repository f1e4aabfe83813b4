"""The peer baseline: what load-time normalizers do, written as plainly as they write it.

Load the whole adapter with `safetensors.torch.load_file`, build the stacked tensors of docs/stacked-layout.md
with torch.cat / torch.stack (scaling folded into B in float32), and `save_file` the lot. Every input tensor and
every output tensor is in memory at the end, so peak memory is about twice the adapter. It handles only what
bench/gen_adapter.py writes (DeepSeek-V3 MLA attention + routed experts, per-expert or 3-D, one global scaling).

    .venv/bin/python bench/naive_normalize.py ADAPTER_DIR OUT_DIR
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path


def main(src: Path, out: Path) -> int:
    import torch
    from safetensors.torch import load_file, save_file

    cfg = json.loads((src / "adapter_config.json").read_text())
    s = cfg["lora_alpha"] / cfg["r"]
    sd = load_file(str(src / "adapter_model.safetensors"))
    P = "base_model.model.model.layers"
    layers = sorted({int(m.group(1)) for k in sd for m in [re.match(rf"{re.escape(P)}\.(\d+)\.", k)] if m})
    result: dict[str, torch.Tensor] = {}

    def fold(b: torch.Tensor) -> torch.Tensor:
        return (b.float() * s).to(b.dtype)

    def put(key: str, a: torch.Tensor, b: torch.Tensor) -> None:
        result[f"base_model.model.model.layers.{key}.lora_A.weight"] = a.contiguous()
        result[f"base_model.model.model.layers.{key}.lora_B.weight"] = b.contiguous()

    for L in layers:
        att = f"{P}.{L}.self_attn"
        a = lambda m, att=att: sd[f"{att}.{m}.lora_A.weight"]  # noqa: E731
        b = lambda m, att=att: sd[f"{att}.{m}.lora_B.weight"]  # noqa: E731
        put(
            f"{L}.self_attn.fused_qkv_a_proj_with_mqa",
            torch.cat([a("q_a_proj"), a("kv_a_proj_with_mqa")]),
            fold(torch.cat([b("q_a_proj"), b("kv_a_proj_with_mqa")])),
        )
        for m in ("q_b_proj", "kv_b_proj", "o_proj"):
            put(f"{L}.self_attn.{m}", a(m), fold(b(m)))
        ex = f"{P}.{L}.mlp.experts"
        if f"{ex}.lora_A.weight" in sd:  # PEFT 3-D: A [E*r, in] expert-major, B [out, r*E] rank-major

            def unfuse(prefix: str):
                A, B = sd[f"{prefix}.lora_A.weight"], sd[f"{prefix}.lora_B.weight"]
                r = cfg["r"]
                E = A.shape[0] // r
                return A.reshape(E, r, -1), B.reshape(B.shape[0], r, E).permute(2, 0, 1)

            a_gu, b_gu = unfuse(f"{ex}.base_layer")
            put(f"{L}.mlp.experts.gate_up_proj", torch.cat([a_gu, a_gu], dim=1), fold(b_gu))
            a_d, b_d = unfuse(ex)
            put(f"{L}.mlp.experts.down_proj", a_d, fold(b_d))
        else:
            experts = defaultdict(dict)
            for k in sd:
                m = re.match(rf"{re.escape(ex)}\.(\d+)\.(\w+)\.lora_([AB])\.weight$", k)
                if m:
                    experts[int(m.group(1))][(m.group(2), m.group(3))] = sd[k]
            order = sorted(experts)
            put(
                f"{L}.mlp.experts.gate_up_proj",
                torch.stack([torch.cat([experts[e][("gate_proj", "A")], experts[e][("up_proj", "A")]]) for e in order]),
                fold(
                    torch.stack(
                        [torch.cat([experts[e][("gate_proj", "B")], experts[e][("up_proj", "B")]]) for e in order]
                    )
                ),
            )
            put(
                f"{L}.mlp.experts.down_proj",
                torch.stack([experts[e][("down_proj", "A")] for e in order]),
                fold(torch.stack([experts[e][("down_proj", "B")] for e in order])),
            )
    out.mkdir(parents=True, exist_ok=True)
    save_file(result, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
