"""validate on the PEFT-written fixtures: no error on any of them (DoRA: the documented error), and mutations of
them reported with the right code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_convert.pipeline.commands import validate as validate_spec

DATA = Path(__file__).parent / "fixtures" / "data"
CASES = sorted(p.name for p in (DATA / "cases").iterdir() if (p / "adapter").is_dir())
P = "base_model.model.model.layers"


def base_of(case: str) -> str:
    return str(DATA / "bases" / json.loads((DATA / "cases" / case / "case.json").read_text())["base"])


def validate(case_or_folder, case=None, **kw):
    folder = case_or_folder if isinstance(case_or_folder, Path) else DATA / "cases" / case_or_folder / "adapter"
    kw.setdefault("smoke", False)
    return validate_spec(str(folder), base=base_of(case or case_or_folder), **kw)


@pytest.mark.parametrize("case", CASES)
def test_every_fixture_validates_without_error(case):
    report = validate(case)
    errors = [(f.code, f.message) for f in report.errors]
    if "dora" in case:
        assert [c for c, _ in errors] == ["config.dora"], errors
        assert not report.ok
    else:
        assert errors == [] and report.ok, errors
    assert report.base is not None and report.summary["family"]
    assert "shapes" in report.summary["checks"]["run"] and "data" in report.summary["checks"]["run"]


def mutated(tmp_path: Path, case: str, edit) -> Path:
    dst = tmp_path / case
    shutil.copytree(DATA / "cases" / case / "adapter", dst)
    tensors = load_file(str(dst / "adapter_model.safetensors"))
    save_file(edit(dict(tensors)), str(dst / "adapter_model.safetensors"))
    return dst


def rename(old, new):
    def edit(t):
        for k in [k for k in t if k.startswith(old + ".")]:
            t[new + k[len(old) :]] = t.pop(k)
        return t

    return edit


def reshape(key, shape):
    def edit(t):
        t[key] = torch.zeros(shape, dtype=t[key].dtype)
        return t

    return edit


def drop(key):
    def edit(t):
        del t[key]
        return t

    return edit


def poison(key):
    def edit(t):
        t[key] = t[key].clone()
        t[key].view(-1)[2] = float("nan")
        return t

    return edit


MUTATIONS = [
    ("v4_llama", reshape(f"{P}.0.self_attn.q_proj.lora_A.weight", (8, 47)), "shapes.in-features"),
    ("v4_deepseek_v3", reshape(f"{P}.1.self_attn.kv_b_proj.lora_B.weight", (161, 8)), "shapes.out-features"),
    ("v4_llama", reshape(f"{P}.0.mlp.down_proj.lora_B.weight", (48, 4)), "rank.a-b-mismatch"),
    ("v4_llama", rename(f"{P}.1.self_attn.q_proj", f"{P}.2.self_attn.q_proj"), "layers.past-end"),
    (
        "v4_deepseek_v3",
        rename(f"{P}.1.mlp.experts.0.gate_proj", f"{P}.1.mlp.experts.4.gate_proj"),
        "experts.index-past-end",
    ),
    (
        "v4_deepseek_v3",
        rename(f"{P}.1.mlp.experts.2.up_proj", f"{P}.0.mlp.experts.2.up_proj"),
        "experts.on-dense-layer",
    ),
    ("v4_llama", drop(f"{P}.0.self_attn.v_proj.lora_B.weight"), "pairs.missing-B"),
    ("v4_llama", drop(f"{P}.0.self_attn.v_proj.lora_A.weight"), "pairs.missing-A"),
    ("v4_llama", poison(f"{P}.1.mlp.up_proj.lora_B.weight"), "data.nan"),
]


@pytest.mark.parametrize("case, edit, code", MUTATIONS, ids=[m[2] for m in MUTATIONS])
def test_mutations_are_reported_with_their_code(tmp_path, case, edit, code):
    report = validate(mutated(tmp_path, case, edit), case)
    assert code in {f.code for f in report.errors}, [(f.code, f.message) for f in report.findings]
    assert not report.ok


def test_missing_expert_projection_is_a_warning(tmp_path):
    report = validate(
        mutated(tmp_path, "v4_deepseek_v3", drop_module(f"{P}.1.mlp.experts.3.down_proj")), "v4_deepseek_v3"
    )
    assert "experts.missing-projection" in {f.code for f in report.warnings}


def drop_module(prefix):
    def edit(t):
        for k in [k for k in t if k.startswith(prefix + ".")]:
            del t[k]
        return t

    return edit


def test_fixture_json_document_via_cli():
    from typer.testing import CliRunner

    from lora_convert.cli import app

    case = "v5_llama"
    result = CliRunner().invoke(
        app,
        ["validate", str(DATA / "cases" / case / "adapter"), "--base", base_of(case), "--format", "json", "--no-smoke"],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["ok"] and doc["summary"]["family"] == "llama" and doc["summary"]["errors"] == 0


@pytest.mark.parametrize("case", ["v4_deepseek_v3", "v5_deepseek_v3", "v5_qwen3_5", "v4_mixtral"])
def test_stacked_outputs_validate_against_their_layout(tmp_path, case):
    from lora_convert.pipeline.commands import normalize

    out = tmp_path / "stacked"
    normalize(str(DATA / "cases" / case / "adapter"), out, base=base_of(case))
    report = validate(out, case)
    assert report.ok, [(f.code, f.message) for f in report.errors]
    assert report.summary["adapter"]["layout"] == "stacked"
    # tamper: one B loses a row
    layout = json.loads((out / "lora_layout.json").read_text())
    key = f"base_model.model.{layout['groups'][0]['key']}.lora_B.weight"
    tensors = load_file(str(out / "adapter_model.safetensors"))
    tensors[key] = tensors[key][..., :-1, :].contiguous()
    save_file(tensors, str(out / "adapter_model.safetensors"))
    bad = validate(out, case)
    assert "layout.shape" in {f.code for f in bad.errors}
