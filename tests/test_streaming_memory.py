"""normalize streams: it holds a bounded number of groups' tensors at a time (issues 5, 16; no timings here).

A small DeepSeek-V3-shaped adapter (tiny dimensions, 12 MoE layers x 8 experts, both PEFT expert layouts) is
normalized with the source reads and the group builder instrumented:

- every tensor `Adapter.read_many` returns is tracked with a weakref finalizer, so the bytes of source tensors
  alive at any moment are known: with the read/build/write pipeline (lora_convert.convert.group_tensors) at depth
  d, at most d consecutive groups' sources are alive at once (one group without the pipeline), and none after;
- the reused read arenas and output buffers (`ReadArena`, `GroupBuffers`) hold at most d times the largest
  group's sources and its A and B, a small fraction of the adapter.
"""

from __future__ import annotations

import gc
import json
import math
import threading
import weakref

import pytest
import torch
from safetensors.torch import save_file

from lora_convert.arch.base_config import find_preset
from lora_convert.convert import group_tensors
from lora_convert.io.tensor_files import read_runs, run_span
from lora_convert.peft.adapter import Adapter
from lora_convert.pipeline import commands as pipeline_commands

# Whole normalize runs under a memory watch: not the unit layer (`make test-fast` skips this module).
pytestmark = pytest.mark.slow

H, I, E, R, LAYERS = 64, 32, 8, 4, 12
P = "base_model.model.model.layers"
ATTN = {
    "q_a_proj": (H, 48),
    "q_b_proj": (48, 2 * 24),
    "kv_a_proj_with_mqa": (H, 32 + 8),
    "kv_b_proj": (32, 2 * 32),
    "o_proj": (2 * 16, H),
}


def _base(tmp_path):
    cfg = dict(find_preset("deepseek-v3")["config"])
    cfg.pop("quantization_config", None)
    cfg.update(
        hidden_size=H,
        moe_intermediate_size=I,
        intermediate_size=4 * H,
        n_routed_experts=E,
        q_lora_rank=48,
        kv_lora_rank=32,
        num_attention_heads=2,
        num_key_value_heads=2,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        first_k_dense_replace=0,
        num_hidden_layers=LAYERS,
        vocab_size=256,
    )
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _adapter(tmp_path, layout: str):
    g = torch.Generator().manual_seed(0)
    t = {}

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(torch.bfloat16)

    for L in range(LAYERS):
        for name, (fi, fo) in ATTN.items():
            t[f"{P}.{L}.self_attn.{name}.lora_A.weight"] = rnd(R, fi)
            t[f"{P}.{L}.self_attn.{name}.lora_B.weight"] = rnd(fo, R)
        if layout == "fused-3d":
            t[f"{P}.{L}.mlp.experts.base_layer.lora_A.weight"] = rnd(E * R, H)
            t[f"{P}.{L}.mlp.experts.base_layer.lora_B.weight"] = rnd(2 * I, R * E)
            t[f"{P}.{L}.mlp.experts.lora_A.weight"] = rnd(E * R, I)
            t[f"{P}.{L}.mlp.experts.lora_B.weight"] = rnd(H, R * E)
        else:
            for j in range(E):
                for proj, (fi, fo) in (("gate_proj", (H, I)), ("up_proj", (H, I)), ("down_proj", (I, H))):
                    t[f"{P}.{L}.mlp.experts.{j}.{proj}.lora_A.weight"] = rnd(R, fi)
                    t[f"{P}.{L}.mlp.experts.{j}.{proj}.lora_B.weight"] = rnd(fo, R)
    folder = tmp_path / layout
    folder.mkdir()
    cfg = {
        "peft_type": "LORA",
        "r": R,
        "lora_alpha": 2 * R,
        "base_model_name_or_path": "deepseek-ai/DeepSeek-V3",
        "target_modules": list(ATTN) + ([] if layout == "fused-3d" else ["gate_proj", "up_proj", "down_proj"]),
    }
    if layout == "fused-3d":
        cfg["target_parameters"] = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(t, str(folder / "adapter_model.safetensors"))
    return folder, sum(v.numel() * v.element_size() for v in t.values())


def _nbytes(tensor) -> int:
    return tensor.nbytes


class LiveSources:
    """Bytes of the source tensors handed out by Adapter.read_many that are still referenced (threads included)."""

    def __init__(self):
        self.live = 0
        self.peak = 0
        self.lock = threading.Lock()

    def track(self, tensor):
        n = _nbytes(tensor)
        with self.lock:
            self.live += n
            self.peak = max(self.peak, self.live)
        weakref.finalize(tensor, self._release, n)
        return tensor

    def _release(self, n):
        with self.lock:
            self.live -= n


def _instances(monkeypatch, cls):
    made = []
    original_init = cls.__init__

    def init(self):
        original_init(self)
        made.append(self)

    monkeypatch.setattr(cls, "__init__", init)
    return made


@pytest.mark.parametrize("depth", [0, 1, 2, 3])
@pytest.mark.parametrize("layout", ["per-expert", "fused-3d"])
def test_normalize_holds_a_bounded_number_of_groups(tmp_path, monkeypatch, layout, depth):
    """Sources of at most `depth` groups (one with the pipeline off) alive at once; reused read arenas and output
    buffers no larger than `depth` times the largest group's; every source read once, with its group."""
    monkeypatch.setattr(group_tensors, "PIPELINE_DEPTH", depth)
    base = _base(tmp_path)
    folder, adapter_bytes = _adapter(tmp_path, layout)
    sources = LiveSources()
    reads: list[list[str]] = []
    original_read_many = Adapter.read_many

    def read_many(self, keys, arena=None):
        reads.append(list(keys))
        return {k: sources.track(v) for k, v in original_read_many(self, keys, arena).items()}

    monkeypatch.setattr(Adapter, "read_many", read_many)
    groups = []
    original_build = group_tensors.build_group_tensors

    def build(plan, group, dtype_tag, read, *args, **kwargs):
        keys = group_tensors.group_source_keys(group)
        infos = [plan.adapter.index.tensors[k] for k in keys]
        span = sum((run_span(r) + 63) // 64 * 64 for r in read_runs(infos))
        A, B = original_build(plan, group, dtype_tag, read, *args, **kwargs)
        groups.append((group.key, sum(i.nbytes for i in infos), span, _nbytes(A), _nbytes(B)))
        return A, B

    monkeypatch.setattr(group_tensors, "build_group_tensors", build)
    buffers = _instances(monkeypatch, group_tensors.GroupBuffers)
    arenas = _instances(monkeypatch, group_tensors.ReadArena)

    result = pipeline_commands.normalize(str(folder), tmp_path / "out", base=str(base))

    assert len(groups) == LAYERS * 6 and result.tensors_written == 2 * len(groups)
    # Each group's sources were read once, together, in group order.
    assert [set(r) for r in reads] == [set(group_tensors.group_source_keys(g)) for g in result.plan.groups], (
        "sources were not read once per group, in order"
    )
    gc.collect()
    assert sources.live == 0, "source tensors outlive the normalize that read them"
    out_bytes = sum(g[3] + g[4] for g in groups)
    largest_group = max(g[3] + g[4] for g in groups)
    # The test only means something if the adapter is many groups large.
    assert out_bytes >= 10 * largest_group and adapter_bytes >= 10 * max(g[1] for g in groups)
    in_flight = max(depth, 1)
    window = max(sum(g[1] for g in groups[i : i + in_flight]) for i in range(len(groups)))
    assert sources.peak <= window, (
        f"{sources.peak} bytes of sources alive at once; {in_flight} consecutive groups hold at most {window}"
    )
    held_buffers = sum(raw.nbytes for b in buffers for raw in b._raw.values())
    bound = in_flight * (max(g[3] for g in groups) + max(g[4] for g in groups))
    assert held_buffers <= bound, (
        f"output buffers hold {held_buffers} bytes; {in_flight} x the largest A + B is {bound}"
    )
    held_arenas = sum(a.nbytes for a in arenas)
    assert held_arenas <= in_flight * max(g[2] for g in groups)
    assert held_arenas + held_buffers < adapter_bytes / 2  # the small test adapter is only ~12 groups deep
    assert math.isclose(result.bytes_out, out_bytes)
