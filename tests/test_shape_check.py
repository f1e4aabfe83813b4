"""Header-only shape validation on every PEFT-written fixture, and on mutated copies of them.

The fixtures (tests/fixtures/data) were written by PEFT itself on tiny models with transformers 4.57 and 5.23;
INDEX.json records, per module, the in/out PEFT saw. Three independent checks:
1. `check_shapes` finds nothing but vision/router notes on every fixture against its own base config;
2. for every module, the schema's expected (in, out) equals what PEFT recorded;
3. every 2-D weight of every base checkpoint resolves to a schema group with exactly that shape.
Then six mutations of real adapters must each produce exactly the expected finding.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lora_convert.arch.base_config import resolve_base
from lora_convert.arch.schema import bind
from lora_convert.check.shape_check import check_shapes
from lora_convert.findings import Severity
from lora_convert.io.tensor_files import read_safetensors_header
from lora_convert.peft.adapter import LoraModule, load_adapter
from lora_convert.peft.naming import parse_key

DATA = Path(__file__).parent / "fixtures" / "data"
INDEX = json.loads((DATA / "INDEX.json").read_text())  # the fixtures are part of the repo: fail loudly if absent
CASES = sorted(INDEX["cases"])
BASES = sorted(p.name for p in (DATA / "bases").iterdir() if (p / "model.safetensors").exists())

_arch_cache: dict = {}


def arch_for(base: str):
    if base not in _arch_cache:
        _arch_cache[base] = bind(resolve_base(str(DATA / "bases" / base)))
    return _arch_cache[base]


def test_every_fixture_case_is_covered():
    on_disk = sorted(p.name for p in (DATA / "cases").iterdir() if (p / "adapter").is_dir())
    assert on_disk == CASES and len(CASES) >= 40


@pytest.mark.parametrize("case", CASES)
def test_fixture_passes_shape_validation(case):
    meta = INDEX["cases"][case]
    adapter = load_adapter(DATA / "cases" / case / "adapter", strict_config=False)
    arch = arch_for(meta["base"])
    findings = check_shapes(adapter, arch)
    assert [f for f in findings if f.code not in ("modules.vision", "modules.router")] == []
    assert all(f.severity is not Severity.ERROR for f in findings)
    # Every module resolves, and the schema's (in, out) is what PEFT recorded for it.
    recorded = meta["modules"]
    assert len(adapter.modules) == len(recorded)
    for m in adapter.modules:
        peft = recorded[m.module + ".base_layer" * m.base_layer_depth]
        match = arch.resolve(m)
        if m.is_vision:
            assert match is None and arch.vision_module(m.module)
            continue
        assert match is not None, m.module
        assert (match.expected_in, match.expected_out) == (peft["in"], peft["out"]), m.module
        if peft["experts"] is not None:
            assert match.group.experts == peft["experts"]


def test_router_and_vision_notes():
    router = check_shapes(load_adapter(DATA / "cases" / "v4_mixtral" / "adapter"), arch_for("v4_mixtral"))
    assert [(f.code, f.severity) for f in router] == [("modules.router", Severity.INFO)]
    assert all(".block_sparse_moe.gate." in k for k in router[0].keys)
    vision = check_shapes(load_adapter(DATA / "cases" / "v5_kimi_k25_vision" / "adapter"), arch_for("v5_kimi_k25"))
    assert [(f.code, f.severity) for f in vision] == [("modules.vision", Severity.WARNING)]
    assert any("vision_tower" in k for k in vision[0].keys) and any("mm_projector" in k for k in vision[0].keys)


@pytest.mark.parametrize("base", BASES)
def test_base_checkpoint_weights_match_the_schema(base):
    """Every 2-D weight of the tiny base model resolves to its schema group with exactly that shape."""
    arch = arch_for(base)
    tensors, _ = read_safetensors_header(DATA / "bases" / base / "model.safetensors")
    checked = 0
    for key, t in tensors.items():
        if not key.endswith(".weight") or len(t.shape) != 2:
            continue
        # transformers 5.23 saves Kimi-K2.5's text stack as `blocks.N`; the Hub checkpoint uses `layers.N`.
        p = parse_key(key.replace("language_model.model.blocks.", "language_model.model.layers."))
        m = LoraModule(
            module=p.module,
            kind="linear",
            target_name=p.module,
            layer=p.layer,
            expert=p.expert,
            local_name=p.local_name,
            stack_prefix=p.stack_prefix,
            is_vision=p.is_vision,
        )
        loc = arch.locate(m)
        if loc.status == "vision":
            continue
        assert loc.status == "ok", (key, loc.status, loc.detail)
        match = loc.match
        if match.group.kind == "embedding":  # nn.Embedding weight is [vocab, hidden] = [in, out]
            assert list(t.shape) == [match.expected_in, match.expected_out], key
        else:  # nn.Linear weight is [out, in]
            assert list(t.shape) == [match.expected_out, match.expected_in], key
        checked += 1
    # not vacuous: at least the embedding, lm_head and each of the two tiny layers' attention and MLP projections
    assert checked >= 8


# --------------------------------------------------------------------------------------------- mutations
def mutated(tmp_path: Path, case: str, edit) -> Path:
    """Copy a fixture adapter into tmp_path after applying `edit(tensors) -> tensors` with the safetensors library."""
    src = DATA / "cases" / case / "adapter"
    dst = tmp_path / case
    shutil.copytree(src, dst)
    tensors = load_file(str(src / "adapter_model.safetensors"))
    save_file(edit(dict(tensors)), str(dst / "adapter_model.safetensors"))
    return dst


def reshape(key: str, shape: tuple[int, ...]):
    def edit(tensors):
        tensors[key] = np.zeros(shape, dtype=tensors[key].dtype)
        return tensors

    return edit


def rename_module(old: str, new: str):
    def edit(tensors):
        hits = [k for k in tensors if k.startswith(old + ".")]
        assert hits, old
        for k in hits:
            tensors[new + k[len(old) :]] = tensors.pop(k)
        return tensors

    return edit


def findings_for(folder: Path, base: str):
    adapter = load_adapter(folder, strict_config=False)
    return [f for f in adapter.findings + check_shapes(adapter, arch_for(base)) if f.severity is not Severity.INFO]


P = "base_model.model.model.layers"


def test_unmutated_copies_are_clean(tmp_path):
    for case in ("v4_llama", "v4_deepseek_v3", "v5_deepseek_v3"):
        assert findings_for(mutated(tmp_path, case, lambda t: t), INDEX["cases"][case]["base"]) == []


def test_wrong_in_dim(tmp_path):
    key = f"{P}.0.self_attn.q_proj.lora_A.weight"  # [8, 48]: hidden 48
    [f] = findings_for(mutated(tmp_path, "v4_llama", reshape(key, (8, 47))), "v4_llama")
    assert f.code == "shapes.in-features" and f.keys == [key]
    assert f.expected == [8, 48] and f.actual == [8, 47]


def test_wrong_out_dim(tmp_path):
    key = f"{P}.1.self_attn.kv_b_proj.lora_B.weight"  # [4 heads * (16 nope + 24 v) = 160, 8]
    [f] = findings_for(mutated(tmp_path, "v4_deepseek_v3", reshape(key, (161, 8))), "v4_deepseek_v3")
    assert f.code == "shapes.out-features" and f.keys == [key]
    assert f.expected == [160, 8] and f.actual == [161, 8]


def test_rank_differs_between_a_and_b(tmp_path):
    key = f"{P}.0.mlp.down_proj.lora_B.weight"  # [48, 8] -> rank 4
    [f] = findings_for(mutated(tmp_path, "v4_llama", reshape(key, (48, 4))), "v4_llama")
    assert f.code == "rank.a-b-mismatch"  # reported by adapter.py, not repeated by check_shapes
    assert f.expected == 8 and f.actual == 4


def test_layer_past_the_end(tmp_path):
    # v4_llama has 2 layers; move layer 1's q_proj to layer 2.
    folder = mutated(tmp_path, "v4_llama", rename_module(f"{P}.1.self_attn.q_proj", f"{P}.2.self_attn.q_proj"))
    [f] = findings_for(folder, "v4_llama")
    assert f.code == "layers.past-end" and f.actual == 2 and f.expected == "layer < 2"
    assert sorted(f.keys) == [f"{P}.2.self_attn.q_proj.lora_A.weight", f"{P}.2.self_attn.q_proj.lora_B.weight"]


def test_mtp_layer_is_named_as_such(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    cfg = json.loads((DATA / "bases" / "v4_deepseek_v3" / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1
    (base / "config.json").write_text(json.dumps(cfg))
    folder = mutated(
        tmp_path, "v4_deepseek_v3", rename_module(f"{P}.2.self_attn.q_a_proj", f"{P}.3.self_attn.q_a_proj")
    )
    adapter = load_adapter(folder)
    [f] = check_shapes(adapter, bind(resolve_base(str(base))))
    assert f.code == "layers.past-end" and "MTP/NextN" in f.message


def test_expert_past_the_end(tmp_path):
    # 4 routed experts (0..3); rename expert 0 of layer 1 to expert 4.
    folder = mutated(
        tmp_path, "v4_deepseek_v3", rename_module(f"{P}.1.mlp.experts.0.gate_proj", f"{P}.1.mlp.experts.4.gate_proj")
    )
    [f] = findings_for(folder, "v4_deepseek_v3")
    assert f.code == "experts.index-past-end" and f.actual == 4 and f.expected == "expert < 4"
    assert len(f.keys) == 2


def test_expert_lora_on_a_dense_layer(tmp_path):
    # first_k_dense_replace = 1: layer 0 is dense. Move a per-expert module of layer 1 there.
    folder = mutated(
        tmp_path, "v4_deepseek_v3", rename_module(f"{P}.1.mlp.experts.2.up_proj", f"{P}.0.mlp.experts.2.up_proj")
    )
    [f] = findings_for(folder, "v4_deepseek_v3")
    assert f.code == "experts.on-dense-layer" and f.actual == ["attention+dense"]
    assert all(".layers.0.mlp.experts.2.up_proj." in k for k in f.keys)


def test_fused_experts_on_a_dense_layer(tmp_path):
    folder = mutated(tmp_path, "v5_deepseek_v3", rename_module(f"{P}.1.mlp.experts", f"{P}.0.mlp.experts"))
    found = findings_for(folder, "v5_deepseek_v3")
    assert sorted(f.code for f in found) == ["experts.on-dense-layer", "experts.on-dense-layer"]


def test_fused_experts_count_differs(tmp_path):
    # v5 3-D down_proj wrapper: A [E*r, I] = [32, 20], B [H, r*E] = [48, 32]; make it 3 experts.
    def edit(tensors):
        tensors = reshape(f"{P}.1.mlp.experts.lora_A.weight", (24, 20))(tensors)
        return reshape(f"{P}.1.mlp.experts.lora_B.weight", (48, 24))(tensors)

    [f] = findings_for(mutated(tmp_path, "v5_deepseek_v3", edit), "v5_deepseek_v3")
    assert f.code == "shapes.experts"
    assert f.expected == [[32, 20], [48, 32]] and f.actual == [[24, 20], [48, 24]]


def test_module_on_the_wrong_layer_type(tmp_path):
    # Qwen3-Next: layer 0 is linear attention, layer 1 full attention; move a self_attn module to layer 0.
    folder = mutated(tmp_path, "v4_qwen3_next", rename_module(f"{P}.1.self_attn.o_proj", f"{P}.0.self_attn.o_proj"))
    found = findings_for(folder, "v4_qwen3_next")
    assert [f.code for f in found] == ["modules.not-on-layer-type"]
    assert found[0].actual == ["linear_attention+moe"] and "attention layers" in found[0].message


def test_unknown_module(tmp_path):
    folder = mutated(tmp_path, "v4_llama", rename_module(f"{P}.0.self_attn.q_proj", f"{P}.0.self_attn.q_proj_extra"))
    [f] = findings_for(folder, "v4_llama")
    assert f.code == "modules.unknown" and f.actual == "self_attn.q_proj_extra"


def test_all_problems_are_reported_at_once(tmp_path):
    def edit(tensors):
        tensors = reshape(f"{P}.0.self_attn.q_proj.lora_A.weight", (8, 47))(tensors)
        tensors = reshape(f"{P}.0.self_attn.o_proj.lora_B.weight", (47, 8))(tensors)
        return rename_module(f"{P}.1.self_attn.v_proj", f"{P}.9.self_attn.v_proj")(tensors)

    found = findings_for(mutated(tmp_path, "v4_llama", edit), "v4_llama")
    assert sorted(f.code for f in found) == ["layers.past-end", "shapes.in-features", "shapes.out-features"]


def test_top_level_mtp_stack_is_reported_not_crashed_on(tmp_path):
    # Qwen3-Next keeps its MTP head under `mtp.`; move one module there.
    folder = mutated(
        tmp_path,
        "v4_qwen3_next",
        rename_module(f"{P}.1.self_attn.o_proj", "base_model.model.mtp.layers.0.self_attn.o_proj"),
    )
    [f] = findings_for(folder, "v4_qwen3_next")
    assert f.code == "layers.past-end" and "1 LoRA module(s) belong to the multi-token-prediction" in f.message


def test_layer_lists_in_messages_are_spans(tmp_path):
    # the same unknown name on both layers of v4_llama: one finding whose layers read as a span (text.spans)
    edit = rename_module(f"{P}.0.self_attn.q_proj", f"{P}.0.self_attn.q_proj_extra")
    folder = mutated(
        tmp_path,
        "v4_llama",
        lambda t: rename_module(f"{P}.1.self_attn.q_proj", f"{P}.1.self_attn.q_proj_extra")(edit(t)),
    )
    [f] = findings_for(folder, "v4_llama")
    assert f.code == "modules.unknown" and "`self_attn.q_proj_extra` on layer(s) 0-1 is not" in f.message


def test_router_layers_are_spans():
    [f] = check_shapes(load_adapter(DATA / "cases" / "v4_mixtral" / "adapter"), arch_for("v4_mixtral"))
    layers = sorted(
        {m.layer for m in load_adapter(DATA / "cases" / "v4_mixtral" / "adapter").modules if m.layer is not None}
    )
    assert f.code == "modules.router" and f"on layer(s) {layers[0]}-{layers[-1]} (" in f.message


@pytest.mark.parametrize("base", BASES)
def test_resolve_path_answers_as_resolve_does_for_checkpoint_modules(base):
    """`Architecture.resolve_path(module path, 3-D parameter)` -- the question base_checkpoint asks of a checkpoint
    tensor -- gives the match `resolve` gives for the equivalent LoRA module, on every weight of every tiny base
    (2-D weights and 3-D expert parameters), on made-up places (past the end, unknown, MTP) and per expert."""
    arch = arch_for(base)
    tensors, _ = read_safetensors_header(DATA / "bases" / base / "model.safetensors")
    places = {("model.layers.99.mlp.down_proj", None), ("nope.weird", None), ("mtp.layers.0.mlp.experts", "down_proj")}
    for key in tensors:
        module, _, leaf = key.rpartition(".")
        if leaf == "weight":
            places.add((module, None))
        elif module.endswith("experts"):
            places.add((module, leaf))
    for expert in (0, 1, 3, 9):
        places.add((f"model.layers.1.mlp.experts.{expert}.gate_proj", None))
    resolved = 0
    for module, param in sorted(places, key=str):
        p = parse_key(f"base_model.model.{module}.lora_A.weight")
        oracle = LoraModule(
            module=module,
            kind="fused_experts" if param else "linear",
            target_name=module,
            param=param,
            layer=p.layer,
            expert=p.expert,
            local_name=f"{p.local_name}.{param}" if param else p.local_name,
            stack_prefix=p.stack_prefix,
            is_vision=p.is_vision,
        )
        want = arch.resolve(oracle)
        assert arch.resolve_path(module, param) == want, (module, param)
        resolved += want is not None
    assert resolved >= 5  # not vacuous: embedding, lm_head and projections of each tiny base resolve
