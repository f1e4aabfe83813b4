"""normalize streams: it never holds more than one group's tensors at a time (issue 5; no timings here).

A small DeepSeek-V3-shaped adapter (tiny dimensions, 12 MoE layers x 8 experts, both PEFT expert layouts) is
normalized with the source reads and the group builder instrumented:

- every tensor `Adapter.read` returns is tracked with a weakref finalizer, so the bytes of source tensors alive
  at any moment are known;
- `build_group_tensors` is wrapped: no source tensor may be alive when a group starts or after it is built (so
  sources never pile up across groups), and while a group is built the live source bytes stay within that
  group's own source bytes;
- the reusable output buffers (`GroupBuffers`) may hold at most the largest group's A and B, a small fraction of
  the adapter.
"""

from __future__ import annotations

import json
import math
import weakref

import pytest
import torch
from safetensors.torch import save_file

from lora_convert.arch.base_config import find_preset
from lora_convert.convert import group_tensors
from lora_convert.convert import normalize as normalize_module
from lora_convert.peft.adapter import Adapter

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
    """Bytes of the source tensors handed out by Adapter.read that are still referenced."""

    def __init__(self):
        self.live = 0
        self.peak_in_group = 0

    def track(self, tensor):
        n = _nbytes(tensor)
        self.live += n
        self.peak_in_group = max(self.peak_in_group, self.live)
        weakref.finalize(tensor, self._release, n)
        return tensor

    def _release(self, n):
        self.live -= n


@pytest.mark.parametrize("layout", ["per-expert", "fused-3d"])
def test_normalize_holds_one_group_at_a_time(tmp_path, monkeypatch, layout):
    base = _base(tmp_path)
    folder, adapter_bytes = _adapter(tmp_path, layout)
    sources = LiveSources()
    original_read = Adapter.read
    monkeypatch.setattr(Adapter, "read", lambda self, key: sources.track(original_read(self, key)))

    groups = []
    original_build = group_tensors.build_group_tensors

    def build(plan, group, dtype_tag, read, *args, **kwargs):
        assert sources.live == 0, f"source tensors of an earlier group are still alive when {group.key} starts"
        sources.peak_in_group = 0
        keys = {
            k for sl in group.slices for src in sl.sources() for k in (src.module.lora_A.key, src.module.lora_B.key)
        }
        group_source_bytes = sum(plan.adapter.index.tensors[k].nbytes for k in keys)
        A, B = original_build(plan, group, dtype_tag, read, *args, **kwargs)
        assert sources.live == 0, f"{group.key}: source tensors outlive the group that read them"
        assert sources.peak_in_group <= group_source_bytes, (
            f"{group.key}: {sources.peak_in_group} bytes of sources alive at once, more than the group's own {group_source_bytes}"
        )
        groups.append((group.key, _nbytes(A) + _nbytes(B), group_source_bytes, _nbytes(A), _nbytes(B)))
        return A, B

    monkeypatch.setattr(group_tensors, "build_group_tensors", build)
    buffers = []
    original_init = group_tensors.GroupBuffers.__init__

    def init(self):
        original_init(self)
        buffers.append(self)

    monkeypatch.setattr(group_tensors.GroupBuffers, "__init__", init)

    result = normalize_module.normalize(str(folder), tmp_path / "out", base=str(base))

    assert len(groups) == LAYERS * 6 and result.tensors_written == 2 * len(groups)
    out_bytes = sum(g[1] for g in groups)
    largest_group = max(g[1] for g in groups)
    largest_step = max(g[1] + g[2] for g in groups)
    # The test only means something if the adapter is many groups large.
    assert out_bytes >= 10 * largest_group and adapter_bytes >= 10 * largest_step
    held = sum(raw.nbytes for b in buffers for raw in b._raw.values())
    bound = max(g[3] for g in groups) + max(g[4] for g in groups)  # the largest A plus the largest B
    assert held <= bound, f"output buffers hold {held} bytes; the largest A and B are {bound} together"
    assert math.isclose(result.bytes_out, out_bytes)
