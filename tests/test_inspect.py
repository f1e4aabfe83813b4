"""inspect on every PEFT-written fixture: module counts, ranks and scalings agree with PEFT's own layers."""

import json

import pytest
from typer.testing import CliRunner

from helpers import case_dir, case_meta, fixture_cases
from lora_convert.cli import app
from lora_convert.peft.adapter import load_adapter
from lora_convert.pipeline.inspect_report import build_report

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
    renamed = {
        k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"): v
        for k, v in tensors.items()
    }
    assert renamed.keys() != tensors.keys()
    save_file(renamed, str(dst / "adapter_model.safetensors"))
    plain = build_report(load_adapter(str(src)))
    kept = build_report(load_adapter(str(dst)))
    strip = lambda mods: [{k: v for k, v in m.items() if k != "keys"} for m in mods]  # noqa: E731
    assert strip(kept["modules"]) == strip(plain["modules"])
    assert "keys.adapter-name-segment" in {f["code"] for f in kept["findings"]}


# ---- a bad adapter_config.json is shown as such, with exit 1, instead of numbers invented from the tensors ------
EXAMPLE_ADAPTER = (
    __import__("pathlib").Path(__file__).resolve().parent.parent / "examples" / "tiny-deepseek-v3" / "adapter"
)


def _example_with(tmp_path, mutate) -> str:
    import shutil

    folder = tmp_path / "adapter"
    shutil.copytree(EXAMPLE_ADAPTER, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config = mutate(config)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return str(folder)


def _set(key, value):
    def mutate(cfg):
        cfg[key] = value
        return cfg

    return mutate


def _drop(key):
    def mutate(cfg):
        del cfg[key]
        return cfg

    return mutate


# (mutation, the field, words that must appear: the key, what was expected, what the file holds)
BAD_CONFIGS = {
    "array": (lambda cfg: [1, 2], "r", ["JSON object", "an array", "[1, 2]"]),
    "r-zero": (_set("r", 0), "r", ["`r`", "positive integer", "0"]),
    "r-negative": (_set("r", -8), "r", ["`r`", "positive integer", "-8"]),
    "r-string": (_set("r", "8"), "r", ["`r`", "positive integer", '"8"', "a string"]),
    "r-float": (_set("r", 8.0), "r", ["`r`", "positive integer", "8.0", "a number"]),
    "r-bool": (_set("r", True), "r", ["`r`", "positive integer", "true", "a boolean"]),
    "r-missing": (_drop("r"), "r", ["`r`"]),
    "alpha-string": (_set("lora_alpha", "16"), "lora_alpha", ["`lora_alpha`", "positive number", '"16"']),
    "alpha-zero": (_set("lora_alpha", 0), "lora_alpha", ["`lora_alpha`", "0"]),
    "targets-number": (
        _set("target_modules", 5),
        "target_modules",
        ["`target_modules`", "list of module names", "5", "an integer"],
    ),
    "targets-non-strings": (
        _set("target_modules", ["q_b_proj", 7]),
        "target_modules",
        ["`target_modules`", '["q_b_proj", 7]'],
    ),
    "rank-pattern-list": (
        _set("rank_pattern", ["q_b_proj"]),
        "rank_pattern",
        ["`rank_pattern`", "an object", "an array"],
    ),
    "rank-pattern-zero": (
        _set("rank_pattern", {"q_b_proj": 0}),
        "rank_pattern",
        ["`rank_pattern.q_b_proj`", "positive integer", "0"],
    ),
    "alpha-pattern-string": (
        _set("alpha_pattern", {"q_b_proj": "4"}),
        "alpha_pattern",
        ["`alpha_pattern.q_b_proj`", "positive number", '"4"'],
    ),
    "alpha-pattern-negative": (
        _set("alpha_pattern", {"q_b_proj": -4}),
        "alpha_pattern",
        ["`alpha_pattern.q_b_proj`", "-4"],
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_inspect_json_shows_the_config_error(tmp_path, name):
    mutate, field_name, words = BAD_CONFIGS[name]
    folder = _example_with(tmp_path, mutate)
    result = CliRunner().invoke(app, ["inspect", folder, "--format", "json"])
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout)  # still one JSON document on stdout
    cfg = doc["config"]
    assert doc["ok"] is False and cfg["valid"] is False and field_name in cfg["invalid_fields"]
    assert cfg[field_name] is None, "an invalid field must not be shown with a made-up value"
    message = " ".join(e["message"] for e in cfg["errors"])
    for word in words:
        assert word in message, (word, message)
    assert all(e["expected"] is not None and e["keys"] for e in cfg["errors"])
    assert doc["tensors"] == 20 and doc["module_count"] == 10  # the tensors are still listed, from the headers
    assert result.stderr.startswith("Error:") and "Hint:" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_inspect_human_shows_the_config_error(tmp_path, name):
    mutate, field_name, words = BAD_CONFIGS[name]
    folder = _example_with(tmp_path, mutate)
    result = CliRunner().invoke(app, ["inspect", folder])
    assert result.exit_code == 1, result.output
    out = result.stdout
    assert "adapter_config.json is invalid" in out
    for word in words:
        assert word in out, (word, out)
    if field_name in ("r", "lora_alpha", "rank_pattern", "alpha_pattern"):
        assert f"{field_name}=invalid" in out
    assert "self_attn.q_b_proj" in out  # the module table is still there
    assert result.stderr.startswith("Error:") and "Hint:" in result.stderr and "Traceback" not in result.stderr


def test_inspect_with_invalid_rank_shows_no_invented_rank_or_scaling(tmp_path):
    folder = _example_with(tmp_path, _set("r", "8"))
    doc = json.loads(CliRunner().invoke(app, ["inspect", folder, "--format", "json"]).stdout)
    by_name = {(m["module"], m["param"]): m for m in doc["modules"]}
    # kv_a_proj_with_mqa has no rank_pattern entry: its config rank and scaling would need `r`
    kv_a = by_name[("model.layers.0.self_attn.kv_a_proj_with_mqa", None)]
    assert kv_a["rank"] == 8 and kv_a["config_rank"] is None and kv_a["scaling"] is None
    # layer 1's q_b_proj is named by rank_pattern (12), so its rank and scaling are known
    q_b = by_name[("model.layers.1.self_attn.q_b_proj", None)]
    assert q_b["config_rank"] == 12 and q_b["scaling"] == pytest.approx(16 / 12)
    assert not [f for f in doc["findings"] if f["code"].startswith("rank.")]
    assert "r=8" not in CliRunner().invoke(app, ["inspect", folder]).stdout


def test_inspect_warnings_alone_exit_0(tmp_path):
    folder = _example_with(tmp_path, _drop("peft_type"))
    result = CliRunner().invoke(app, ["inspect", folder, "--format", "json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["ok"] and doc["config"]["valid"] and "config.peft-type-assumed" in {f["code"] for f in doc["findings"]}


def test_inspect_exits_1_on_tensor_errors_too(tmp_path):
    # r=4 while the tensors have rank 8: the adapter has errors (the README's row 1) though the config is well-formed
    folder = _example_with(tmp_path, _set("r", 4))
    result = CliRunner().invoke(app, ["inspect", folder, "--format", "json"])
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["config"]["valid"] and "rank.config-mismatch" in {f["code"] for f in doc["findings"]}
    assert result.stderr.startswith("Error:") and "rank.config-mismatch" in result.stderr


def test_inspect_of_a_stacked_output_is_clean(tmp_path):
    """A stacked output's 3-D, rank-padded tensors are its layout, not PEFT errors."""
    out = tmp_path / "stacked"
    base = EXAMPLE_ADAPTER.parent / "base"
    made = CliRunner().invoke(app, ["normalize", str(EXAMPLE_ADAPTER), "--base", str(base), "-o", str(out)])
    assert made.exit_code == 0, made.output
    result = CliRunner().invoke(app, ["inspect", str(out), "--format", "json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["stacked"] and doc["ok"]
    assert not [f for f in doc["findings"] if f["severity"] == "error"]
