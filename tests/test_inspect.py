"""inspect on every PEFT-written fixture: module counts, ranks and scalings agree with PEFT's own layers."""

import json

import pytest
from typer.testing import CliRunner

from helpers import case_dir, case_meta, fixture_cases
from lora_convert.adapter import load_adapter
from lora_convert.cli import app
from lora_convert.inspect import build_report

CASES = fixture_cases()


def peft_name(mod: dict) -> str:
    # PEFT's nested ParamWrappers live at `<module>.base_layer...`; our module path strips those wrappers.
    return mod["module"] + ".base_layer" * mod.get("base_layer_depth", 0)


@pytest.mark.parametrize("case", CASES)
def test_inspect_matches_peft_layers(case):
    meta = case_meta(case)
    report = build_report(load_adapter(str(case_dir(case) / "adapter"), strict_config=False))
    ours = {}
    for mod in report["modules"]:
        ours[mod["module"] + ".base_layer" * mod["base_layer_depth"]] = mod
    assert set(ours) == set(meta["modules"]), f"{case}: module sets differ"
    for name, peft in meta["modules"].items():
        mine = ours[name]
        assert mine["rank"] == peft["r"], name
        assert mine["scaling"] == pytest.approx(peft["scaling"], rel=1e-9), name
        assert mine["in_features"] == peft["in"] and mine["out_features"] == peft["out"], name
        if peft.get("param") and mine["kind"] == "linear":
            # a 2-D parameter targeted through target_parameters (a router's `gate.weight`): PEFT matches its
            # rank/alpha patterns against `<module>.weight`
            assert mine["target_name"] == f"{mine['module']}.{peft['param']}", name
        elif peft.get("param"):
            assert mine["param"] == peft["param"], name
            assert mine["experts"] == peft["experts"], name


def test_inspect_cli_json_and_human():
    case = next(c for c in CASES if "deepseek" in c)
    runner = CliRunner()
    result = runner.invoke(app, ["inspect", str(case_dir(case) / "adapter"), "--format", "json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["schema_version"] == 1 and doc["module_count"] == len(case_meta(case)["modules"])
    human = runner.invoke(app, ["inspect", str(case_dir(case) / "adapter")])
    assert human.exit_code == 0 and "expert layout" in human.stdout


def test_inspect_missing_folder_is_usage_error():
    result = CliRunner().invoke(app, ["inspect", "./definitely/not/here"])
    assert result.exit_code == 2
    assert "Error:" in result.stderr and "Traceback" not in result.stderr


def test_leftover_adapter_name_on_a_peft_fixture(tmp_path):
    """Re-save a PEFT-written adapter with `.default.` kept in every key (as some exporters do): the same
    modules, ranks and scalings come out, plus the warning."""
    import shutil

    from safetensors.torch import load_file, save_file

    case = "v5_deepseek_v3_rank_pattern"
    src = case_dir(case) / "adapter"
    dst = tmp_path / "with-default"
    dst.mkdir()
    shutil.copy(src / "adapter_config.json", dst / "adapter_config.json")
    tensors = load_file(str(src / "adapter_model.safetensors"))
    renamed = {k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"): v
               for k, v in tensors.items()}
    assert renamed.keys() != tensors.keys()
    save_file(renamed, str(dst / "adapter_model.safetensors"))
    plain = build_report(load_adapter(str(src)))
    kept = build_report(load_adapter(str(dst)))
    strip = lambda mods: [{k: v for k, v in m.items() if k != "keys"} for m in mods]  # noqa: E731
    assert strip(kept["modules"]) == strip(plain["modules"])
    assert "keys.adapter-name-segment" in {f["code"] for f in kept["findings"]}
