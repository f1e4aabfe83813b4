"""`normalize --layout sglang|vllm|peft` on every PEFT-written fixture (docs/engine-layouts.md).

- sglang: the output, run through a model of SGLang 0.5.23's own loader (tests/sglang_loader_sim.py), gives
  exactly the stacked layout, tensor for tensor; and the same model fails on the raw PEFT fixtures where the
  reference says SGLang fails (so the model is faithful and the layout is what makes the difference).
- peft: per-module keys, one rank, scaling folded, all expert projections present; normalized again to
  `stacked` it equals the direct stacked output.
- both: our own reader accepts the output; `validate --engine sglang|vllm` reports no engine problem.
- vllm: every slice of every expert computes what the stacked layout computes (3-D experts for the model classes
  vLLM 0.33 loads that way, per-expert modules otherwise); validate --engine vllm reports nothing on it.
- refusals: what normalize --layout ENGINE refuses is exactly the module groups validate --engine ENGINE reports
  as unservable, on every fixture.
The PEFT logits proof is in test_engine_layouts_peft.py (marked `peft`); the engines' own code in
test_proof_sglang.py and test_proof_vllm.py.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import FAMILIES_BEFORE_ISSUE_14, case_base_dir, case_dir, case_family, fixture_cases
from lora_convert.convert.engine_layouts import REPORT_FILE
from lora_convert.errors import UnsupportedAdapterError
from lora_convert.io.output_folder import MANIFEST_FILE
from sglang_loader_sim import simulate

CASES = fixture_cases()
# Every module of these is refused by the stacked layout already (DoRA), so no layout has anything to write.
NOTHING_LEFT = {"v4_mixtral_dora", "v5_deepseek_v3_dora", "v5_llama_dora"}
# SGLang 0.5.23 has no LoRA path for any module of these (MLA without q_lora_rank).
SGLANG_NOTHING_LEFT = {"v5_deepseek_v3_noq"}


def _normalize(case: str, out: Path, layout: str, drop: bool):
    from lora_convert.pipeline.commands import normalize

    return normalize(
        str(case_dir(case) / "adapter"), out, base=str(case_base_dir(case)), layout=layout, drop_unsupported=drop
    )


_CACHE: dict = {}


# what normalize says when the engine release refuses the base (convert/engine_layouts.refuse_unservable_base)
BASE_REFUSED = "The release refuses the base model"


def produce(case: str, layout: str, root: Path) -> tuple[Path | None, bool, str | None]:
    """(output folder, whether --drop-unsupported was needed, the refusal without it). Cached per session."""
    key = (case, layout)
    if key not in _CACHE:
        out = root / f"{layout}-{case}"
        try:
            _normalize(case, out, layout, False)
            _CACHE[key] = (out, False, None)
        except UnsupportedAdapterError as exc:
            if BASE_REFUSED in exc.message:  # the release refuses the base itself: no layout, no flag changes that
                _CACHE[key] = (None, False, exc.message)
                return _CACHE[key]
            assert "--drop-unsupported" in (exc.hint or ""), exc.hint
            try:
                _normalize(case, out, layout, True)
                _CACHE[key] = (out, True, exc.message)
            except UnsupportedAdapterError as exc2:
                _CACHE[key] = (None, True, exc2.message)
        assert not any(p.name.startswith(f".{out.name}.lora-convert") for p in root.iterdir())
    return _CACHE[key]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("engine-layouts")


def stacked(case: str, drop: bool, root: Path) -> Path:
    out = root / f"stacked-{case}-{drop}"
    if not out.exists():
        _normalize(case, out, "stacked", drop)
    return out


@cache
def base_config(case: str) -> dict:
    return json.loads((case_base_dir(case) / "config.json").read_text())


# ------------------------------------------------------------------------------------------------- sglang
def sglang_key(group_key: str, family: str) -> str:
    """The module path SGLang's normalization ends with for one stacked group (the test's own mapping)."""
    if family == "nemotron_h" and group_key.endswith(".experts.up_proj"):
        return group_key[: -len("up_proj")] + "gate_up_proj"  # non-gated experts are fed to SGLang as gate_proj
    if group_key.endswith(".embeddings") or group_key == "embeddings":
        return group_key[: -len("embeddings")] + "embed_tokens"
    return group_key


def check_sglang_equals_stacked(case: str, out: Path, stacked_dir: Path) -> int:
    tensors = load_file(str(out / "adapter_model.safetensors"))
    config = json.loads((out / "adapter_config.json").read_text())
    report = json.loads((out / REPORT_FILE).read_text())
    sim = simulate(tensors, config, base_config(case))
    assert sim.scaling == 1.0 and config["r"] == config["lora_alpha"] == report["rank"]
    assert not sim.dropped_keys, sim.dropped_keys[:3]
    assert not sim.skipped_expert_keys, sim.skipped_expert_keys[:3]
    layout = json.loads((stacked_dir / "lora_layout.json").read_text())
    ref = load_file(str(stacked_dir / "adapter_model.safetensors"))
    R = layout["rank"]
    assert report["rank"] == R
    family = layout["family"]
    dropped = {d["module"] for d in report["dropped"]}
    partial = {d["module"].split(" ")[0] for d in report["dropped"] if d["module"].endswith("(B/C/dt rows)")}
    expected = {}
    for g in layout["groups"]:
        if g["key"] in dropped:
            continue
        expected[sglang_key(g["key"], family)] = g
    added = {sglang_key(g["group"], family) for g in report["groups"] if g["added_zero_filled"]}
    assert set(sim.modules) == set(expected) | added, (sorted(set(sim.modules) ^ (set(expected) | added)))[:6]
    compared = 0
    for key, mod in sim.modules.items():
        if key in added:
            assert all(torch.count_nonzero(t) == 0 for t in list(mod.experts_A.values()) + list(mod.experts_B.values()))
            continue
        g = expected[key]
        A, B = ref[f"base_model.model.{g['key']}.lora_A.weight"], ref[f"base_model.model.{g['key']}.lora_B.weight"]
        if g["experts"]:
            assert sorted(mod.experts_A) == sorted(mod.experts_B) == list(range(g["experts"])), key
            for e in range(g["experts"]):
                assert torch.equal(mod.experts_A[e], A[e].float()), (key, e)
                assert torch.equal(mod.experts_B[e], B[e].float()), (key, e)
            compared += 1
            continue
        rows_a, rows_b = mod.A.shape[0], mod.B.shape[0]
        assert torch.equal(mod.A, A[:rows_a].float()), key
        assert torch.equal(mod.B, B[:rows_b].float()), key
        if rows_a < A.shape[0]:  # Nemotron-H mamba in_proj: SGLang holds z | x only
            assert g["group"] == "in_proj" and family == "nemotron_h"
            lost = [s for s in g["slices"] if s["out_offset"] >= rows_b]
            delta = [
                B[s["out_offset"] : s["out_offset"] + s["out_features"]].double() @ A[i * R : (i + 1) * R].double()
                for i, s in enumerate(g["slices"])
                if s in lost
            ]
            if g["key"] not in partial:
                assert all(torch.count_nonzero(d) == 0 for d in delta), (
                    "B/C/dt rows carry a delta but were not reported"
                )
        compared += 1
    return compared


# tests/sglang_loader_sim.py models SGLang's loader for the families it was written for (from sglang-loader.md,
# before issue 14); the families added since are held to SGLang's own loader only (tests/test_proof_sglang.py).
SIMULATED_CASES = [c for c in CASES if case_family(c) in FAMILIES_BEFORE_ISSUE_14]


@pytest.mark.parametrize("case", SIMULATED_CASES)
def test_sglang_loader_turns_the_output_into_the_stacked_layout(case, root):
    out, drop, refusal = produce(case, "sglang", root)
    if out is None:
        assert case in NOTHING_LEFT | SGLANG_NOTHING_LEFT, refusal
        return
    assert check_sglang_equals_stacked(case, out, stacked(case, drop, root)) > 0


# What SGLang 0.5.23 does with the raw PEFT adapter (sglang-loader.md): the exception type and a message fragment.
RAW_FAILURES = {
    "v5_deepseek_v3_q_a_only": (AssertionError, "does not match"),  # R3: kv_a zero-filled with q_a's shape
    "v5_deepseek_v3_noq": (KeyError, "v_proj"),  # R1: q_proj without v_proj
    "v5_qwen3_5_vl": (KeyError, "v_proj"),  # R1: q_proj without v_proj
    "v5_llama_regex": (ValueError, "Only 'all' or 'all-linear'"),  # regex target_modules
    "v5_qwen3_5": (NotImplementedError, "in_proj_"),  # HF two-way GDN / in_proj_b,a
    "v4_mixtral": (NotImplementedError, "get_hidden_dim"),  # router / w1 targets
    "v4emu_nemotron_h": (AssertionError, "does not match"),  # R5: HF mamba in_proj not split
    "v5_nemotron_h": (AssertionError, "does not match"),
    "v5_deepseek_v3": (ValueError, "Cannot find target module"),  # PEFT 3-D experts
    "v5_deepseek_v3_rank_pattern": (ValueError, "kv_a_proj_with_mqa"),  # R3: kv_a without q_a stays unfused
    "v5_kimi_k25_vision": (ValueError, "Only 'all'"),
}


@pytest.mark.parametrize("case", sorted(RAW_FAILURES))
def test_simulated_loader_fails_on_raw_fixtures_where_sglang_does(case, root):
    kind, fragment = RAW_FAILURES[case]
    adapter = case_dir(case) / "adapter"
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    with pytest.raises(kind, match=fragment if kind is not KeyError else None) as info:
        simulate(tensors, config, base_config(case))
    if kind is KeyError:
        assert fragment in str(info.value)
    out, drop, _ = produce(case, "sglang", root)
    if out is not None:  # the sglang layout of the same adapter loads
        simulate(
            load_file(str(out / "adapter_model.safetensors")),
            json.loads((out / "adapter_config.json").read_text()),
            base_config(case),
        )


def test_simulated_loader_silently_loses_what_the_layout_keeps(root):
    """Silent failures of the raw adapters: one-sided experts skipped, rsLoRA served sqrt(r) too weak."""
    case = "v4_deepseek_v3_gate_only"
    adapter = case_dir(case) / "adapter"
    raw = simulate(
        load_file(str(adapter / "adapter_model.safetensors")),
        json.loads((adapter / "adapter_config.json").read_text()),
        base_config(case),
    )
    assert raw.skipped_expert_keys  # FusedMoE is not wrapped without down_proj: expert LoRA never applied
    out, _, _ = produce(case, "sglang", root)
    assert not simulate(
        load_file(str(out / "adapter_model.safetensors")),
        json.loads((out / "adapter_config.json").read_text()),
        base_config(case),
    ).skipped_expert_keys
    case = "v5_llama_rslora"
    adapter = case_dir(case) / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    raw = simulate(load_file(str(adapter / "adapter_model.safetensors")), cfg, base_config(case))
    assert raw.scaling == cfg["lora_alpha"] / cfg["r"]  # not alpha / sqrt(r): rsLoRA is ignored
    ref = load_file(str(stacked(case, False, root) / "adapter_model.safetensors"))
    key = "model.layers.0.self_attn.qkv_proj"
    got = raw.modules[key].B
    want = ref[f"base_model.model.{key}.lora_B.weight"].float()
    ratio = float(want.norm() / got.norm())
    assert abs(ratio - cfg["r"] ** 0.5) < 1e-4  # served sqrt(r) times too weak
    out, _, _ = produce(case, "sglang", root)
    assert check_sglang_equals_stacked(case, out, stacked(case, False, root)) > 0


def test_sglang_layout_names(root):
    out, _, _ = produce("v4_mixtral", "sglang", root)
    keys = load_file(str(out / "adapter_model.safetensors")).keys()
    config = json.loads((out / "adapter_config.json").read_text())
    assert not any(".w1." in k or ".w2." in k or ".w3." in k for k in keys)
    assert "base_model.model.model.layers.0.block_sparse_moe.experts.3.up_proj.lora_A.weight" in keys
    assert config["target_modules"] == sorted(config["target_modules"]) and not {"w1", "w2", "w3", "gate"} & set(
        config["target_modules"]
    )
    out, _, _ = produce("v5_qwen3_5", "sglang", root)
    keys = load_file(str(out / "adapter_model.safetensors")).keys()
    for part in "qkvz":
        assert f"base_model.model.model.language_model.layers.0.linear_attn.in_proj_{part}.lora_A.weight" in keys
    out, _, _ = produce("v5_nemotron_h", "sglang", root)
    keys = load_file(str(out / "adapter_model.safetensors")).keys()
    report = json.loads((out / REPORT_FILE).read_text())
    assert not any("mixer.in_proj" in k or "experts.0.up_proj" in k for k in keys)
    assert "base_model.model.backbone.layers.1.mixer.experts.0.gate_proj.lora_A.weight" in keys
    assert any(
        d["code"] == "engine.sglang.nemotron-in-proj-bcdt-dropped" and "%" in d["reason"] for d in report["dropped"]
    )
    out, _, _ = produce("v5_deepseek_v3_experts_down_only", "sglang", root)
    report = json.loads((out / REPORT_FILE).read_text())
    assert [g["group"] for g in report["groups"] if g["added_zero_filled"]] == [
        "model.layers.1.mlp.experts.gate_up_proj",
        "model.layers.2.mlp.experts.gate_up_proj",
    ]


def test_nemotron_in_proj_is_refused_with_the_share_lost(tmp_path):
    with pytest.raises(UnsupportedAdapterError) as info:
        _normalize("v5_nemotron_h", tmp_path / "out", "sglang", False)
    assert "B/C/dt" in info.value.message and "%" in info.value.message and "--drop-unsupported" in info.value.hint
    assert not (tmp_path / "out").exists()


def test_nemotron_in_proj_with_zero_bcdt_rows_is_split_exactly(tmp_path, root):
    """A mamba in_proj whose B/C/dt rows are zero is written as gate_proj + x_proj, and SGLang's R5 refuses nothing."""
    from safetensors.torch import save_file

    case = "v5_nemotron_h"
    src = case_dir(case) / "adapter"
    tensors = load_file(str(src / "adapter_model.safetensors"))
    cfg = base_config(case)
    inner = cfg["mamba_num_heads"] * cfg["mamba_head_dim"]
    key = next(k for k in tensors if k.endswith("mixer.in_proj.lora_B.weight"))
    tensors[key][2 * inner :] = 0
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file(tensors, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    from lora_convert.pipeline.commands import normalize

    normalize(str(adapter), tmp_path / "sglang", base=str(case_base_dir(case)), layout="sglang")
    normalize(str(adapter), tmp_path / "stacked", base=str(case_base_dir(case)))
    keys = load_file(str(tmp_path / "sglang" / "adapter_model.safetensors")).keys()
    assert "base_model.model.backbone.layers.0.mixer.x_proj.lora_A.weight" in keys
    assert check_sglang_equals_stacked(case, tmp_path / "sglang", tmp_path / "stacked") > 0
    report = json.loads((tmp_path / "sglang" / REPORT_FILE).read_text())
    assert report["target_modules"] == "all-linear"  # Nemotron's literal up_proj target exists only by auto-detection


def check_all_expert_projections(adapter) -> None:
    """vLLM's pack_moe: every expert of an adapted MoE layer has gate, up and down (non-gated: up and down)."""
    by_layer: dict[int, dict[int, set[str]]] = {}
    for m in adapter.modules:
        if m.expert is not None:
            by_layer.setdefault(m.layer, {}).setdefault(m.expert, set()).add(m.leaf)
    for layer, experts in by_layer.items():
        sets = {frozenset(s) for s in experts.values()}
        assert len(sets) == 1, (layer, sets)
        (leaves,) = sets
        assert leaves in ({"gate_proj", "up_proj", "down_proj"}, {"w1", "w2", "w3"}, {"up_proj", "down_proj"}), (
            layer,
            leaves,
        )
        assert sorted(experts) == list(range(len(experts)))


# ---------------------------------------------------------------------------------------- reader + smoke
# Our reader does not know SGLang's own split names for these (schemas have no aliases for them); see the docs.
SMOKE_CASES = [
    "v4_llama",
    "v5_deepseek_v3",
    "v4emu_kimi_k25",
    "v5_mixtral",
    "v5_qwen3_5",
    "v4emu_nemotron_h",
    "v5_qwen3_5_moe",
]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["sglang", "peft"])
@pytest.mark.parametrize("case", SMOKE_CASES)
def test_our_reader_and_smoke_accept_the_output(case, layout, root):
    from lora_convert.pipeline.commands import smoke

    out, drop, _ = produce(case, layout, root)
    report = smoke(str(out), base=str(case_base_dir(case)), device="cpu", tokens=8, layers="all")
    assert report.groups and report.ok, [(g.key, g.problems) for g in report.groups if not g.ok]


# ---------------------------------------------------------------------------------------------- validate
@pytest.mark.parametrize("layout", ["sglang", "vllm"])
@pytest.mark.parametrize("case", CASES)
def test_validate_engine_reports_nothing_on_the_matching_layout(case, layout, root):
    from lora_convert.pipeline.commands import validate

    out, drop, refusal = produce(case, layout, root)
    if out is None:
        return
    from lora_convert.engines.rules import BASE_FEATURES, load_rules

    report = validate(str(out), base=str(case_base_dir(case)), engine=layout, data_scan=True, smoke=False)
    # rules on the base's quantization are properties of the base, which no layout changes (a base the release
    # refuses whatever the adapter, vLLM and bitsandbytes, leaves no output at all: produce's BASE_REFUSED)
    of_the_base = {f"engine.{layout}.{r['id']}" for r in load_rules(layout) if r["feature"] in BASE_FEATURES}
    engine = [
        f
        for f in report.findings
        if f.code.startswith("engine.") and f.severity.value in ("error", "warning") and f.code not in of_the_base
    ]
    assert not engine, [(f.code, f.message[:160]) for f in engine]


# ------------------------------------------------------------------------------------------------ misc
def _embedding_adapter(tmp_path):
    from helpers import write_adapter

    cfg = base_config("v5_llama")
    V, H = cfg["vocab_size"], cfg["hidden_size"]
    g = torch.Generator().manual_seed(0)
    tensors = {
        "base_model.model.model.embed_tokens.lora_embedding_A": torch.randn(4, V, generator=g),
        "base_model.model.model.embed_tokens.lora_embedding_B": torch.randn(H, 4, generator=g),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, H, generator=g),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(64, 4, generator=g),
    }
    return write_adapter(
        tmp_path / "emb", tensors, {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "q_proj"]}
    )


def test_embedding_lora_in_both_layouts(tmp_path):
    from lora_convert.pipeline.commands import normalize

    adapter = _embedding_adapter(tmp_path)
    base = str(case_base_dir("v5_llama"))
    for layout in ("sglang", "peft", "stacked"):
        normalize(str(adapter), tmp_path / layout, base=base, layout=layout)
    keys = load_file(str(tmp_path / "peft" / "adapter_model.safetensors")).keys()
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys  # PEFT's on-disk embedding names
    sim = simulate(
        load_file(str(tmp_path / "sglang" / "adapter_model.safetensors")),
        json.loads((tmp_path / "sglang" / "adapter_config.json").read_text()),
        base_config("v5_llama"),
    )
    assert "model.embed_tokens" in sim.modules and not sim.dropped_keys  # kept: embed_tokens is a target
    assert check_sglang_equals_stacked("v5_llama", tmp_path / "sglang", tmp_path / "stacked") == 2


@pytest.mark.parametrize("layout", ["sglang", "vllm", "peft"])
def test_same_input_same_bytes_and_cli(layout, tmp_path):
    import hashlib

    from typer.testing import CliRunner

    from lora_convert.cli import app

    case = "v4_deepseek_v3_gate_only"
    digests = []
    for name in ("one", "two"):
        result = CliRunner().invoke(
            app,
            [
                "normalize",
                str(case_dir(case) / "adapter"),
                "-o",
                str(tmp_path / name),
                "--base",
                str(case_base_dir(case)),
                "--layout",
                layout,
                "--format",
                "json",
            ],
        )
        assert result.exit_code == 0, result.output
        digests.append(
            {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((tmp_path / name).iterdir())}
        )
    assert digests[0] == digests[1]
    assert set(digests[0]) == {
        "adapter_model.safetensors",
        "adapter_config.json",
        REPORT_FILE,
        MANIFEST_FILE,
    }  # no lora_layout.json
    assert json.loads((tmp_path / "one" / MANIFEST_FILE).read_text()) == {
        "format": "lora-convert/output",
        "version": 1,
        "layout": layout,
        "files": ["adapter_config.json", "adapter_model.safetensors", REPORT_FILE],
    }
    doc = json.loads(result.stdout[result.stdout.index("{") :])
    assert doc["layout"] == layout and doc["added_zero_filled_groups"]  # the experts' down side was added
    # a module group the engine cannot serve is refused, and nothing is written; PEFT applies every module
    refusing = {"sglang": "v4_mixtral", "vllm": "v5_deepseek_v3_all_linear", "peft": "v5_deepseek_v3_all_linear"}[
        layout
    ]
    refused = CliRunner().invoke(
        app,
        [
            "normalize",
            str(case_dir(refusing) / "adapter"),
            "-o",
            str(tmp_path / "r"),
            "--base",
            str(case_base_dir(refusing)),
            "--layout",
            layout,
        ],
    )
    if layout == "peft":
        assert refused.exit_code == 0 and (tmp_path / "r").is_dir(), refused.output
    else:
        assert refused.exit_code == 1 and not (tmp_path / "r").exists(), refused.output


@pytest.mark.parametrize(
    "case, layout", [("v4_deepseek_v3_gate_only", "sglang"), ("v4_deepseek_v3_gate_only", "peft"), ("v5_llama", "peft")]
)
def test_progress_total_is_the_bytes_written(case, layout, tmp_path):
    """Engine layouts write per-module cuts (and added expert sides), not the stacked groups: the total and the
    advances must count what is written."""

    class Recorder:
        def __init__(self):
            self.total, self.advances = None, []

        def start(self, total_bytes):
            assert self.total is None and not self.advances
            self.total = total_bytes

        def advance(self, nbytes):
            self.advances.append(nbytes)

    rec = Recorder()
    out = tmp_path / "out"
    from lora_convert.pipeline.commands import normalize

    result = normalize(
        str(case_dir(case) / "adapter"),
        out,
        base=str(case_base_dir(case)),
        layout=layout,
        progress=rec,
        drop_unsupported=True,
    )
    data = out / "adapter_model.safetensors"
    header = int.from_bytes(data.read_bytes()[:8], "little")
    assert rec.total == result.bytes_out == data.stat().st_size - 8 - header
    assert sum(rec.advances) == rec.total
    # One advance per group written (the report lists them, added zero-filled expert sides included).
    assert len(rec.advances) == len(json.loads((out / REPORT_FILE).read_text())["groups"])
    assert all(n > 0 for n in rec.advances)


# ------------------------------------------------------------------------------------------------ vllm
def stacked_deltas(folder: Path) -> dict[tuple, np.ndarray]:
    """(group key, slice name, expert) -> B_slice @ A_slice in float64, from a stacked output (any rank)."""
    layout = json.loads((folder / "lora_layout.json").read_text())
    R = layout["rank"]
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    out = {}
    for g in layout["groups"]:
        A = tensors[f"base_model.model.{g['key']}.lora_A.weight"].double().numpy()
        B = tensors[f"base_model.model.{g['key']}.lora_B.weight"].double().numpy()
        for i, sl in enumerate(g["slices"]):
            rows = slice(sl["out_offset"], sl["out_offset"] + sl["out_features"])
            for e in range(g["experts"] or 1):
                a, b = (A[e], B[e]) if g["experts"] else (A, B)
                out[(g["key"], sl["name"], e)] = b[rows] @ a[i * R : (i + 1) * R]
    return out


@pytest.mark.parametrize("layout", ["vllm", "peft"])
@pytest.mark.parametrize("case", CASES)
def test_layout_computes_the_stacked_delta(case, layout, root, tmp_path):
    """Normalized again to stacked, the vllm / peft output computes every kept slice's delta of the direct stacked
    output (its rank may be 2R: a 3-D gate_up of two A factors), and added groups are zero. One rank, scales folded,
    no patterns; routed experts 3-D where that loader takes them (peft: always; vllm: is_3d_moe_weight classes),
    otherwise per expert with all projections (vLLM's pack_moe)."""
    from lora_convert.peft.adapter import load_adapter
    from lora_convert.pipeline.commands import normalize

    out, drop, refusal = produce(case, layout, root)
    if out is None:
        nothing_left = NOTHING_LEFT | (VLLM_NOTHING_LEFT if layout == "vllm" else set())
        assert case in nothing_left or BASE_REFUSED in (refusal or ""), refusal
        return
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] and not config["rank_pattern"] and not config["alpha_pattern"]
    assert not config["use_rslora"]
    adapter = load_adapter(str(out))
    assert not [f for f in adapter.findings if f.severity.value == "error"]
    assert all(m.rank == config["r"] or m.param for m in adapter.modules)
    base_config = json.loads((case_base_dir(case) / "config.json").read_text())
    classes = set(base_config.get("architectures") or [])
    experts = any(m.expert is not None or m.param for m in adapter.modules)
    three_d = experts and (layout == "peft" or bool(classes & VLLM_3D_CLASSES))
    assert adapter.expert_layout in (("fused-3d",) if three_d else ("none", "per-expert-2d")), adapter.expert_layout
    # full-path `<module>.weight` entries are 2-D modules (peft layout: see the target_modules check below)
    assert bool([t for t in config.get("target_parameters") or () if not t.endswith(".weight")]) == three_d
    if not three_d:
        check_all_expert_projections(adapter)
    # 2-D modules named by full path in target_parameters (peft layout: a name PEFT would re-target) are not targets
    by_path = {m.module for m in adapter.modules if f"{m.module}.weight" in (config.get("target_parameters") or ())}
    targets = [m for m in adapter.modules if not m.param and m.module not in by_path]
    # in a multimodal wrapper, whose vision tower's projections may share the leaf names, the peft layout names
    # every module in full (test_engine_layouts_peft.py's reload of v5_gemma4_vl fails without it)
    in_full = [t for t in config["target_modules"] if "." in t]
    assert not in_full or (layout == "peft" and "text_config" in base_config), in_full
    assert sorted(config["target_modules"]) == sorted({m.module if in_full else m.leaf for m in targets})
    again = tmp_path / "again"
    # the stacked layout leaves the peft layout's vision modules out (test_peft_layout_writes_vision_tower_...)
    vision = any(m.is_vision for m in adapter.modules)
    assert vision == (
        layout == "peft" and any(m.is_vision for m in load_adapter(str(case_dir(case) / "adapter")).modules)
    )
    # a v_proj the vllm layout writes as a copy of k_proj where the base has none (gemma4-k-eq-v-value-lora, checked
    # in test_engine_gemma4_k_eq_v.py) is no module of the schema: the comparison leaves those copies out
    out = _without_value_copies(out, tmp_path / "without-copies") if layout == "vllm" else out
    normalize(str(out), again, base=str(case_base_dir(case)), drop_unsupported=vision)
    got, want = stacked_deltas(again), stacked_deltas(stacked(case, drop or vision, root))
    report = json.loads((out / REPORT_FILE).read_text())
    dropped = {d["module"].split(" (")[0] for d in report["dropped"]}
    for key, delta in want.items():
        if key[0] in dropped:
            continue
        np.testing.assert_allclose(got[key], delta, rtol=0, atol=1e-12 + 1e-6 * np.abs(delta).max(), err_msg=str(key))
    for key in set(got) - set(want):
        assert not np.any(got[key]), key  # groups the layout added (the other expert side) are zero


def _without_value_copies(out, folder):
    """`out`, or a copy of it without the v_proj modules whose LoRA factors equal their layer's k_proj's."""
    import shutil

    from safetensors.torch import save_file

    tensors = load_file(str(out / "adapter_model.safetensors"))
    copies = [
        key
        for key in tensors
        if ".v_proj.lora_" in key
        and (k := tensors.get(key.replace(".v_proj.", ".k_proj."))) is not None
        and torch.equal(tensors[key], k)
    ]
    if not copies:
        return out
    shutil.copytree(out, folder)
    save_file({k: v for k, v in tensors.items() if k not in copies}, str(folder / "adapter_model.safetensors"))
    return folder


VLLM_3D_CLASSES = {"Qwen3_5MoeForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration", "GptOssForCausalLM"}
# vLLM 0.33.0 serves nothing of these exactly: no LoRA for Kimi-K2.5 or Kimi-Linear (kimi-linear-no-lora); no
# MiniMax-Text-01 class at all (removed).
VLLM_NOTHING_LEFT = {
    "v4emu_kimi_k25",
    "v5_kimi_k25",
    "v5_kimi_k25_vision",
    "v5_kimi_linear",
    "v5_minimax",
    "v5_minimax_experts",
}


@pytest.mark.parametrize("layout", ["sglang", "vllm"])
@pytest.mark.parametrize("case", CASES)
def test_normalize_refuses_exactly_what_validate_reports(case, layout, root):
    """One rule set: the groups `normalize --layout E` refuses are the groups `validate --engine E` reports as
    unservable (same codes, same source modules), on every fixture."""
    from lora_convert.check.engine import planned_group_refusals
    from lora_convert.pipeline.commands import validate

    out, drop, refusal = produce(case, layout, root)
    report = validate(
        str(case_dir(case) / "adapter"), base=str(case_base_dir(case)), engine=layout, data_scan=False, smoke=False
    )
    reported = {f.code for f in report.findings if f.code.startswith(f"engine.{layout}.")}
    if out is None:
        assert refusal, case
        return
    doc = json.loads((out / REPORT_FILE).read_text())
    refused_codes = {d["code"] for d in doc["dropped"] if d["code"].startswith(f"engine.{layout}.")}
    refused_keys = {k for d in doc["dropped"] if d["code"].startswith(f"engine.{layout}.") for k in d["keys"]}
    assert refused_codes <= reported, sorted(refused_codes - reported)
    from lora_convert.pipeline.prepared import prepare

    prepared = prepare(str(case_dir(case) / "adapter"), base=str(case_base_dir(case)))
    adapter = prepared.adapter
    planned, why_not = planned_group_refusals(layout, prepared)
    assert why_not is None, why_not
    validate_keys = {k for r in planned for m in adapter.modules if m.module in r.modules for k in m.keys}
    validate_codes = {r.finding.code for r in planned}
    # rows a cut leaves out (partially served groups) are reported by their own feature rule, not a group rule
    assert {c for c in refused_codes if not _is_row_rule(c)} == validate_codes, (refused_codes, validate_codes)
    row_keys = {k for d in doc["dropped"] if _is_row_rule(d["code"]) for k in d["keys"]}
    assert refused_keys - row_keys == validate_keys, sorted((refused_keys - row_keys) ^ validate_keys)[:4]


def _is_row_rule(code: str) -> bool:
    return code.endswith("-bcdt-dropped")


# ------------------------------------------------------------------------------ vision tower and projector
def test_peft_layout_writes_vision_tower_and_projector_modules(tmp_path):
    """PEFT applies vision-tower and projector LoRA, so `--layout peft` writes it, without --drop-unsupported: every
    such module of the original at the path PEFT applied it at, one rank R, its scaling folded into B (the PEFT
    proof, test_engine_layouts_peft.py, reloads it with PEFT and compares the deltas)."""
    from lora_convert.peft.adapter import load_adapter

    case = "v5_kimi_k25_vision"
    out = tmp_path / "peft"
    _normalize(case, out, "peft", False)
    original = load_adapter(str(case_dir(case) / "adapter"))
    vision = [m for m in original.modules if m.is_vision]
    assert {m.module.split(".")[1] for m in vision} == {"vision_tower", "mm_projector"}
    src = load_file(str(case_dir(case) / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(out / "adapter_model.safetensors"))
    config = json.loads((out / "adapter_config.json").read_text())
    R = config["r"]
    for m in vision:
        a, b = got[f"base_model.model.{m.module}.lora_A.weight"], got[f"base_model.model.{m.module}.lora_B.weight"]
        assert a.shape == (R, m.in_features) and b.shape == (m.out_features, R), m.module
        want = m.scaling * src[m.lora_B.key].double() @ src[m.lora_A.key].double()
        torch.testing.assert_close(b.double() @ a.double(), want, rtol=1e-6, atol=1e-7, msg=m.module)
    assert {m.module for m in vision} <= set(config["target_modules"])  # in full, in a multimodal wrapper
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["dropped"] == []
    assert {g["group"] for g in report["groups"]} >= {m.module for m in vision}


@pytest.mark.parametrize("layout", ["stacked", "sglang", "vllm"])
def test_layouts_for_the_text_path_still_refuse_vision_modules(layout, tmp_path):
    with pytest.raises(UnsupportedAdapterError, match="vision-tower or projector"):
        _normalize("v5_kimi_k25_vision", tmp_path / layout, layout, False)


@pytest.mark.parametrize(
    "case, layout",
    [
        ("v5_kimi_k25_vision", "stacked"),
        ("v5_kimi_k25_vision", "sglang"),
        ("v5_llama_dora", "peft"),
        ("v5_kimi_k25_vision", "vllm"),
        ("v4_mixtral", "sglang"),
    ],
)
def test_refusal_hints_name_the_file_the_layout_writes(case, layout, tmp_path):
    """A refusal's hint says where --drop-unsupported lists what it leaves out: a file this layout writes (the
    stacked layout's lora_layout.json, an engine layout's report), never another layout's file."""
    from lora_convert.convert.output_config import listing_file

    with pytest.raises(UnsupportedAdapterError) as refused:
        _normalize(case, tmp_path / "refused", layout, False)
    other = {"lora_layout.json", REPORT_FILE} - {listing_file(layout)}
    assert listing_file(layout) in refused.value.hint and not any(f in refused.value.hint for f in other)
    try:
        _normalize(case, tmp_path / "out", layout, True)
    except UnsupportedAdapterError:  # nothing left to write (vLLM serves nothing of a Kimi-K2.5 base)
        assert case in VLLM_NOTHING_LEFT | NOTHING_LEFT
        return
    listed = json.loads((tmp_path / "out" / listing_file(layout)).read_text())["dropped"]
    assert listed and all(d["keys"] for d in listed)


def test_listing_file_is_the_file_each_layout_writes():
    from helpers import OUTPUT_LAYOUTS
    from lora_convert.convert.output_config import listing_file

    assert [(layout, listing_file(layout)) for layout, _ in OUTPUT_LAYOUTS] == OUTPUT_LAYOUTS
    assert listing_file("sglang==0.5.23") == REPORT_FILE
