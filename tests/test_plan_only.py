"""Plan, then execute: every layout is decided from headers, config and schema before a byte is written.

- No planner reads tensor data: with `Adapter.read` raising, the stacked plan and every engine layout plan are
  built for every fixture; the only data reads are the explicit verification step (`verify_layout`), and only for
  a cut that leaves rows out of the output (the mamba in_proj's B/C/dt rows under SGLang).
- Planning returns new objects: the stacked plan is the same before and after an engine layout is planned.
- `--dry-run` shows exactly what is written (tensor names, dtypes, shapes, files), every drop, and every refusal.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import case_base_dir, case_dir, fixture_cases
from lora_convert.cli import app
from lora_convert.convert import engine_layouts
from lora_convert.errors import UnsupportedAdapterError
from lora_convert.io.tensor_files import read_safetensors_header
from lora_convert.peft.adapter import Adapter
from lora_convert.pipeline.commands import normalize, plan_normalize

CASES = fixture_cases()
NOTHING_CONVERTIBLE = {"v4_mixtral_dora", "v5_deepseek_v3_dora", "v5_llama_dora"}  # every module is DoRA


class DataRead(AssertionError):
    pass


@pytest.fixture
def no_data(monkeypatch):
    def refuse(self, key):
        raise DataRead(f"tensor data read while planning: {key}")

    monkeypatch.setattr(Adapter, "read", refuse)


def _plan(case: str):
    return plan_normalize(str(case_dir(case) / "adapter"), base=str(case_base_dir(case)), drop_unsupported=True)


def _snapshot(plan) -> str:
    return json.dumps(plan.layout_json(), sort_keys=True)


@pytest.mark.parametrize("case", [c for c in CASES if c not in NOTHING_CONVERTIBLE])
def test_no_layout_planner_reads_tensor_data(case, no_data):
    plan = _plan(case)
    before = _snapshot(plan)
    for layout in engine_layouts.rule_layouts():
        lp = engine_layouts.plan_layout(plan, layout)
        specs = lp.tensor_specs("F32")
        assert len(specs) == 2 * sum(len(lg.modules) for lg in lp.groups)
        # only a cut that leaves slices with a source out of the output needs a look at the data
        for check in lp.checks:
            assert layout == "sglang" and check.group.kind == "mamba", (case, check.group.key)
            assert any(not check.group.slices[i].is_zero_filled for i in check.slices)
        if not lp.checks:  # then the whole decision, drops included, needs no data
            try:
                settled = engine_layouts.settle_layout(engine_layouts.verify_layout(lp), drop_unsupported=True)
            except UnsupportedAdapterError as exc:  # nothing left to write: decided without data as well
                assert "nothing is left" in exc.message
                continue
            assert settled.settled and settled.tensor_specs("F32")
    assert _snapshot(plan) == before, "planning a layout changed the stacked plan"


def test_only_the_mamba_rows_need_the_verification_step(no_data):
    plan = _plan("v5_nemotron_h")
    lp = engine_layouts.plan_layout(plan, "sglang")
    assert [c.group.name for c in lp.checks] and all(c.group.name == "in_proj" for c in lp.checks)
    with pytest.raises(DataRead):
        engine_layouts.verify_layout(lp)
    with pytest.raises(ValueError, match="verified"):
        engine_layouts.settle_layout(lp)


@pytest.mark.parametrize("layout", ["stacked", "peft"])
def test_dry_run_reads_no_data(layout, no_data):
    for case in ("v5_deepseek_v3", "v4_mixtral", "v5_nemotron_h", "v5_qwen3_5"):
        result = normalize(
            str(case_dir(case) / "adapter"),
            None,
            base=str(case_base_dir(case)),
            layout=layout,
            dry_run=True,
            drop_unsupported=True,
        )
        assert result.output is None and result.specs and result.bytes_out == sum(s.nbytes for s in result.specs)


def _cli(*argv: str):
    return CliRunner().invoke(app, ["normalize", *argv])


@pytest.mark.parametrize(
    "case, layout",
    [
        ("v5_deepseek_v3", "stacked"),
        ("v4_deepseek_v3_gate_only", "sglang"),
        ("v4_mixtral", "peft"),
        ("v5_nemotron_h", "sglang"),
        ("v5_qwen3_5", "peft"),
    ],
)
def test_dry_run_shows_exactly_what_is_written(case, layout, tmp_path):
    args = [
        str(case_dir(case) / "adapter"),
        "--base",
        str(case_base_dir(case)),
        "--layout",
        layout,
        "--drop-unsupported",
        "--format",
        "json",
    ]
    dry = _cli(*args, "--dry-run")
    assert dry.exit_code == 0, dry.output
    planned = json.loads(dry.stdout[dry.stdout.index("{") :])
    out = tmp_path / "out"
    wet = _cli(*args, "-o", str(out))
    assert wet.exit_code == 0, wet.output
    written = json.loads(wet.stdout[wet.stdout.index("{") :])
    infos, _ = read_safetensors_header(out / "adapter_model.safetensors")
    assert [t["name"] for t in planned["tensors"]] == list(infos)  # the same tensors, in the same order
    for t in planned["tensors"]:
        assert (t["dtype"], t["shape"]) == (infos[t["name"]].dtype, list(infos[t["name"]].shape)), t["name"]
    written_files = sorted(p.name for p in out.iterdir())
    assert sorted(planned["files"] + ["adapter_model.safetensors", "lora_convert_manifest.json"]) == written_files
    assert planned["dropped"] == written["dropped"] and planned["bytes_out"] == written["bytes_out"]
    assert [line for line in dry.stderr.splitlines() if line.startswith("dropped ")] == [
        line for line in wet.stderr.splitlines() if line.startswith("dropped ")
    ]


def test_dry_run_text_lists_every_tensor():
    case = "v4_deepseek_v3_gate_only"
    result = _cli(str(case_dir(case) / "adapter"), "--base", str(case_base_dir(case)), "--layout", "peft", "--dry-run")
    assert result.exit_code == 0, result.output
    api = normalize(str(case_dir(case) / "adapter"), None, base=str(case_base_dir(case)), layout="peft", dry_run=True)
    for spec in api.specs:
        assert f"{spec.name}  {spec.dtype}  {list(spec.shape)}" in result.stdout


@pytest.mark.parametrize(
    "case, fragments",
    [
        ("v4_mixtral", ["model.layers.0.block_sparse_moe.gate", "MoE router LoRA", "--drop-unsupported"]),
        ("v5_nemotron_h", ["mixer.in_proj", "B/C/dt rows carry", "%"]),  # decided by the verification step
    ],
)
def test_a_planned_refusal_appears_in_the_dry_run(case, fragments, tmp_path, monkeypatch):
    import lora_convert.convert.normalize as normalize_module

    def no_writing(*args, **kwargs):
        raise AssertionError("the refusal must come before anything is written")

    monkeypatch.setattr(normalize_module, "write_folder", no_writing)
    args = [str(case_dir(case) / "adapter"), "--base", str(case_base_dir(case)), "--layout", "sglang"]
    dry = _cli(*args, "--dry-run")
    assert dry.exit_code == 1
    for fragment in fragments:
        assert fragment in dry.output, (fragment, dry.output)
    wet = _cli(*args, "-o", str(tmp_path / "out"))  # the same refusal, before any folder exists
    assert wet.exit_code == 1 and wet.output == dry.output
    assert not list(Path(tmp_path).iterdir())
    dropped = _cli(*args, "--dry-run", "--drop-unsupported", "--format", "json")
    assert dropped.exit_code == 0, dropped.output
    doc = json.loads(dropped.stdout[dropped.stdout.index("{") :])
    assert {d["code"] for d in doc["dropped"]} & {
        "engine.sglang.router-lora",
        "engine.sglang.nemotron-in-proj-bcdt-dropped",
    }
    assert any(line.startswith("dropped ") for line in dropped.stderr.splitlines())
