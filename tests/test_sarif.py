"""SARIF 2.1.0 output (`validate --format sarif`, `scan --format sarif`; lora_convert/check/sarif.py): every log
validates against the SARIF 2.1.0 JSON schema (tests/schemas/, cited in its README), rule ids are the finding codes
with the registry's levels, results lie at files that exist (the shard holding each tensor key), and the exit code
is that of the other formats."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import case_base_dir, case_dir, fixture_cases

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "tests" / "schemas" / "sarif-schema-2.1.0.json"
LEVELS = {"error": "error", "warning": "warning", "info": "note"}


def assert_valid(log: dict) -> None:
    import jsonschema

    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    validator = jsonschema.validators.validator_for(schema)(schema)
    problems = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(log)]
    assert not problems, "\n".join(problems[:10])


def located_files(log: dict, cwd: Path) -> list[tuple[Path, list[str]]]:
    """Every (file, logical names) of every result location; relative uris resolved against `cwd` (SRCROOT)."""
    out = []
    for result in log["runs"][0]["results"]:
        for location in result.get("locations", []):
            artifact = location["physicalLocation"]["artifactLocation"]
            if artifact.get("uriBaseId") == "SRCROOT":
                assert not Path(artifact["uri"]).is_absolute() and ".." not in Path(artifact["uri"]).parts
                path = cwd / artifact["uri"]
            else:
                assert artifact["uri"].startswith("file:///"), artifact
                path = Path(artifact["uri"][len("file://") :])
            names = [n["fullyQualifiedName"] for n in location.get("logicalLocations", [])]
            out.append((path, names))
    return out


def check_log(log: dict, reports: list, cwd: Path) -> None:
    """The log's rules, results, levels and locations against the reports it was made from."""
    from lora_convert.codes import ENGINE_PREFIX, REGISTRY
    from lora_convert.io.tensor_files import read_safetensors_header

    assert_valid(log)
    (run,) = log["runs"]
    assert run["tool"]["driver"]["name"] == "lora-convert"
    rules = run["tool"]["driver"]["rules"]
    ids = [r["id"] for r in rules]
    assert ids == sorted(set(ids))
    findings = [(r.adapter, f) for r in reports for f in r.findings]
    assert set(ids) == {f.code for _, f in findings}
    for rule in rules:
        if not rule["id"].startswith(ENGINE_PREFIX):
            entry = REGISTRY[rule["id"]]
            assert rule["shortDescription"]["text"] == entry.meaning
            assert rule["defaultConfiguration"]["level"] == LEVELS[entry.severity.value]
    results = run["results"]
    assert len(results) == len(findings)
    expected = sorted((a, f.code, LEVELS[f.severity.value]) for a, f in findings)
    assert sorted((r["properties"]["adapter"], r["ruleId"], r["level"]) for r in results) == expected
    for result in results:
        assert rules[result["ruleIndex"]]["id"] == result["ruleId"]
        assert result["level"] == rules[result["ruleIndex"]]["defaultConfiguration"]["level"]
    for path, names in located_files(log, cwd):
        assert path.is_file(), path
        if path.suffix == ".safetensors":
            tensors, _ = read_safetensors_header(path)
            assert names and all(n in tensors for n in names), (path, names)


@pytest.mark.slow
def test_every_fixture_report_is_valid_sarif_at_existing_files():
    """Every PEFT-written fixture, validated against its base with an engine: the log validates against the schema,
    each finding is one result with its code's rule and level, and every location is a file that holds its keys."""
    from lora_convert.api import validate_adapter
    from lora_convert.check.sarif import reports_sarif

    reports = []
    for case in fixture_cases():
        adapter = (case_dir(case) / "adapter").relative_to(ROOT)
        reports.append(validate_adapter(str(adapter), base=str(case_base_dir(case)), engine="sglang", smoke=False))
    log = reports_sarif(reports, cwd=ROOT)
    check_log(log, reports, ROOT)
    levels = {r["level"] for r in log["runs"][0]["results"]}
    assert {"error", "warning"} <= levels
    tensor_located = [p for p, _ in located_files(log, ROOT) if p.suffix == ".safetensors"]
    config_located = [p for p, _ in located_files(log, ROOT) if p.name == "adapter_config.json"]
    assert tensor_located and config_located
    assert any(p.name == "adapter_model.bin" for p, _ in located_files(log, ROOT))  # v4_llama_bin's keys


def test_every_registered_code_and_engine_rule_is_a_valid_rule():
    """One rule per code of the registry and per rule of every engine rule file, with its level; a log holding
    them all validates."""
    from lora_convert.check.sarif import SarifAdapter, sarif_log
    from lora_convert.codes import ENGINE_OUTCOMES, REGISTRY, engine_finding, finding
    from lora_convert.engines.rules import load_rules, releases

    findings = [finding(code, f"about {code}") for code in REGISTRY]
    for release in releases():
        findings += [engine_finding(release.engine, r["id"], r["outcome"], "x") for r in load_rules(release.spec)]
    log = sarif_log([SarifAdapter("hub/adapter", None, [f.to_json() for f in findings])])
    assert_valid(log)
    rules = {r["id"]: r for r in log["runs"][0]["tool"]["driver"]["rules"]}
    assert set(rules) == {f.code for f in findings}
    for code, entry in REGISTRY.items():
        assert rules[code]["defaultConfiguration"]["level"] == LEVELS[entry.severity.value]
        assert rules[code]["fullDescription"]["text"].startswith(entry.meaning)
        assert entry.action in rules[code]["help"]["text"]
    described = set()  # a code's SARIF rule is that of the newest release that has it
    for release in reversed(releases()):
        for r in load_rules(release.spec):
            if f"engine.{release.engine}.{r['id']}" in described:
                continue
            described.add(f"engine.{release.engine}.{r['id']}")
            rule = rules[f"engine.{release.engine}.{r['id']}"]
            assert rule["defaultConfiguration"]["level"] == LEVELS[ENGINE_OUTCOMES[r["outcome"]][0].value]
            assert r["source"] in rule["help"]["text"]
    # No local folder: no locations, and the message names the adapter.
    assert all(
        "locations" not in x and x["message"]["text"].startswith("hub/adapter: ") for x in log["runs"][0]["results"]
    )


@pytest.fixture
def cli(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from lora_convert.cli import app

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("LORA_CONVERT_DEBUG", raising=False)

    def run(*args) -> subprocess.CompletedProcess:
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)

    run.workdir = work
    return run


def _copy_case(case: str, dest: Path) -> Path:
    shutil.copytree(case_dir(case) / "adapter", dest)
    return dest


def test_validate_sarif_several_adapters_one_run_same_exit_code(cli):
    """Two adapters (one failing) in one run, relative to the working directory; the exit code is json's and
    human's; two runs print the same bytes."""
    from lora_convert.api import validate_adapter

    work = cli.workdir
    _copy_case("v4_mixtral", work / "adapters" / "mixtral")
    _copy_case("v5_llama", work / "adapters" / "llama")
    args = ["adapters/mixtral", "adapters/llama", "--engine", "sglang", "--no-smoke"]
    bases = {"adapters/mixtral": case_base_dir("v4_mixtral"), "adapters/llama": case_base_dir("v5_llama")}
    codes = {}
    for fmt in ("sarif", "json", "human"):
        codes[fmt] = max(
            cli("validate", a, *args[2:], "--base", b, "--format", fmt).returncode for a, b in bases.items()
        )
    assert codes["sarif"] == codes["json"] == codes["human"] == 1

    both = cli("validate", *args, "--format", "sarif")  # each adapter's own base_model_name_or_path: unresolved
    again = cli("validate", *args, "--format", "sarif")
    assert both.returncode == cli("validate", *args, "--format", "json").returncode == 1
    assert both.stdout == again.stdout
    log = json.loads(both.stdout)
    reports = [validate_adapter(a, engine="sglang", smoke=False) for a in args[:2]]
    check_log(log, reports, work)
    adapters = {r["properties"]["adapter"] for r in log["runs"][0]["results"]}
    assert adapters == {"adapters/mixtral", "adapters/llama"}
    uris = {
        loc["physicalLocation"]["artifactLocation"]["uri"] for r in log["runs"][0]["results"] for loc in r["locations"]
    }
    assert "adapters/mixtral/adapter_config.json" in uris
    assert log["runs"][0]["invocations"] == [{"executionSuccessful": True}]


def test_validate_sarif_ok_adapter_exit_0(cli):
    """A clean adapter: exit 0 as with json, and an empty but valid run."""
    _copy_case("v5_llama", cli.workdir / "llama")
    base = case_base_dir("v5_llama")
    sarif = cli("validate", "llama", "--base", base, "--no-smoke", "--format", "sarif")
    assert sarif.returncode == cli("validate", "llama", "--base", base, "--no-smoke", "--format", "json").returncode
    log = json.loads(sarif.stdout)
    assert_valid(log)
    assert all(r["level"] != "error" for r in log["runs"][0]["results"])
    assert sarif.returncode == 0


def test_a_tensor_finding_lies_at_the_shard_that_holds_its_key(cli):
    """A sharded adapter: each result's location is the shard (from the index) with the tensor keys it holds."""
    from safetensors.numpy import load_file, save_file

    folder = _copy_case("v5_llama_dora", cli.workdir / "sharded")
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    (folder / "adapter_model.safetensors").unlink()
    keys = sorted(tensors)
    halves = {
        "adapter_model-00001-of-00002.safetensors": keys[::2],
        "adapter_model-00002-of-00002.safetensors": keys[1::2],
    }
    weight_map = {}
    for name, part in halves.items():
        save_file({k: tensors[k] for k in part}, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
    (folder / "adapter_model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    result = cli("validate", "sharded", "--base", case_base_dir("v5_llama_dora"), "--no-smoke", "--format", "sarif")
    assert result.returncode == 1, result.stdout + result.stderr
    log = json.loads(result.stdout)
    assert_valid(log)
    dora = [r for r in log["runs"][0]["results"] if r["ruleId"] == "config.dora"]
    assert dora
    shards = set()
    for loc in dora[0]["locations"]:
        uri = loc["physicalLocation"]["artifactLocation"]["uri"]
        names = [n["fullyQualifiedName"] for n in loc["logicalLocations"]]
        assert all(weight_map[n] == Path(uri).name for n in names), (uri, names)
        shards.add(Path(uri).name)
    assert shards == set(halves)  # the magnitude vectors lie in both shards: one location per shard


def test_config_field_lies_at_its_line_and_outside_the_working_directory_is_a_file_uri(cli, tmp_path):
    """A config finding: adapter_config.json at the field's line; an adapter outside the working directory gets
    an absolute file URI (no SRCROOT)."""
    outside = _copy_case("v5_deepseek_v3_rslora", tmp_path / "outside")
    base = case_base_dir("v5_deepseek_v3_rslora")
    result = cli("validate", outside, "--base", base, "--engine", "sglang", "--no-smoke", "--format", "sarif")
    log = json.loads(result.stdout)
    assert_valid(log)
    (rslora,) = [r for r in log["runs"][0]["results"] if r["ruleId"] == "engine.sglang.rslora-ignored"]
    (loc,) = rslora["locations"]
    artifact = loc["physicalLocation"]["artifactLocation"]
    assert artifact == {"uri": (outside / "adapter_config.json").resolve().as_uri()}
    line = loc["physicalLocation"]["region"]["startLine"]
    assert '"use_rslora"' in (outside / "adapter_config.json").read_text().splitlines()[line - 1]
    assert loc["logicalLocations"] == [{"fullyQualifiedName": "use_rslora", "kind": "property"}]


def test_an_adapter_that_cannot_be_validated_is_a_tool_notification(cli):
    """Several adapters, one missing: its error is a tool execution notification (executionSuccessful false) and
    the exit code is that of the other formats (2)."""
    _copy_case("v5_llama", cli.workdir / "llama")
    args = ["llama", "missing", "--no-smoke", "--base", case_base_dir("v5_llama")]
    sarif = cli("validate", *args, "--format", "sarif")
    assert sarif.returncode == cli("validate", *args, "--format", "json").returncode == 2
    log = json.loads(sarif.stdout)
    assert_valid(log)
    (invocation,) = log["runs"][0]["invocations"]
    assert invocation["executionSuccessful"] is False
    (note,) = invocation["toolExecutionNotifications"]
    assert note["level"] == "error" and note["message"]["text"].startswith("missing: not checked: ")


@pytest.mark.slow
def test_scan_sarif_of_a_small_registry(cli):
    """`scan --format sarif`: one run for the registry, valid, one result per finding of every record, located
    at the adapters' files; the exit code is that of --format json; `report REPORT.jsonl --sarif` prints the same."""
    registry = cli.workdir / "registry"
    for case in ("v4_mixtral", "v5_llama_dora", "v4_llama_bin"):
        _copy_case(case, registry / case)
    args = ["scan", "registry", "--engine", "sglang", "--jobs", "1", "--no-data"]
    sarif = cli(*args, "--format", "sarif", "--output", "scan.jsonl")
    as_json = cli(*args, "--format", "json")
    assert sarif.returncode == as_json.returncode == 1
    # The same log from the JSONL report afterwards (`report --sarif`), byte for byte.
    from_report = cli("report", "scan.jsonl", "--sarif")
    assert from_report.returncode == 0 and from_report.stdout == sarif.stdout
    log = json.loads(sarif.stdout)
    assert_valid(log)
    records = json.loads(as_json.stdout)["records"]
    results = log["runs"][0]["results"]
    assert sorted((r["properties"]["adapter"], r["ruleId"]) for r in results) == sorted(
        (rec["id"], f["code"]) for rec in records for f in rec["findings"]
    )
    for path, _ in located_files(log, cli.workdir):
        assert path.is_file() and registry in path.parents, path
    assert any(p.name == "adapter_model.safetensors" for p, _ in located_files(log, cli.workdir))


def test_scan_records_without_keys_or_not_scanned():
    """An old record (findings without keys) is located at the config; an adapter that timed out is a
    notification, not a result."""
    from lora_convert.scan.sarif import records_sarif

    folder = case_dir("v5_llama_dora") / "adapter"
    records = [
        {
            "id": "old",
            "adapter": str(folder),
            "status": "findings",
            "findings": [{"code": "config.dora", "severity": "error", "message": "DoRA."}],
        },
        {
            "id": "slow",
            "adapter": str(folder),
            "status": "timeout",
            "findings": [],
            "error": {"type": "Timeout", "message": "no result after 600 s"},
        },
    ]
    log = records_sarif(records, cwd=ROOT)
    assert_valid(log)
    (result,) = log["runs"][0]["results"]
    assert result["locations"][0]["physicalLocation"]["artifactLocation"]["uri"].endswith(
        "v5_llama_dora/adapter/adapter_config.json"
    )
    (note,) = log["runs"][0]["invocations"][0]["toolExecutionNotifications"]
    assert "slow" in note["message"]["text"] and "timeout" in note["message"]["text"]


@pytest.mark.slow
def test_the_action_writes_one_merged_log_for_code_scanning(tmp_path):
    """The Action's `sarif` input: every validator also writes its log (`validate --sarif`), merged into one run
    with each rule once and correct rule indexes; an adapter the gate could not validate is a notification. The
    annotations and verdicts the gate reads are unchanged."""
    import os
    import sys

    work = tmp_path / "repo"
    _copy_case("v4_mixtral", work / "adapters" / "mixtral")
    _copy_case("v5_llama_dora", work / "adapters" / "dora")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INPUT_", "GITHUB_", "LORA_CONVERT_"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        HF_HUB_OFFLINE="1",
        INPUT_ADAPTERS="adapters/mixtral adapters/dora adapters/missing",
        INPUT_ENGINE="sglang",
        INPUT_ARGS="--no-smoke --no-data",
        INPUT_SARIF="out/results.sarif",
    )
    done = subprocess.run(
        [sys.executable, str(ROOT / "action" / "validate_changed.py")],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # adapters/missing reads as a Hub id that is not cached (offline): exit 3, as validate's own
    assert done.returncode == 3, done.stdout + done.stderr
    assert done.stdout.count("lora-convert validate: FAIL") == 2, done.stdout
    log = json.loads((work / "out" / "results.sarif").read_text())
    assert_valid(log)
    (run,) = log["runs"]
    ids = [r["id"] for r in run["tool"]["driver"]["rules"]]
    assert ids == sorted(set(ids))
    assert {r["properties"]["adapter"] for r in run["results"]} == {"adapters/mixtral", "adapters/dora"}
    for result in run["results"]:
        assert ids[result["ruleIndex"]] == result["ruleId"]
    for path, _ in located_files(log, work):
        assert path.is_file(), path
    (invocation,) = run["invocations"]
    assert invocation["executionSuccessful"] is False
    texts = [n["message"]["text"] for n in invocation["toolExecutionNotifications"]]
    assert any(t.startswith("adapters/missing: not validated: ") for t in texts), texts
    assert not list((work / "out").glob(".*tmp")), "a temporary file was left"


def test_validate_sarif_file_beside_another_format_replaces_only_its_own_log(cli):
    """`--sarif FILE` writes what --format sarif prints, beside any --format; it replaces a previous log of
    lora-convert, never another file (exit 2 before any work, the file untouched)."""
    _copy_case("v5_llama_dora", cli.workdir / "dora")
    args = ["validate", "dora", "--no-smoke", "--no-data", "--engine", "sglang"]
    printed = cli(*args, "--format", "sarif")
    github = cli(*args, "--format", "github", "--sarif", "out.sarif")
    assert github.returncode == printed.returncode == 1
    assert "lora-convert validate: FAIL" in github.stdout
    assert (cli.workdir / "out.sarif").read_text() == printed.stdout
    again = cli(*args, "--sarif", "out.sarif")  # its own previous log: replaced
    assert again.returncode == 1 and (cli.workdir / "out.sarif").read_text() == printed.stdout

    other = cli.workdir / "notes.json"
    other.write_text('{"version": "2.1.0", "runs": [{"tool": {"driver": {"name": "other-tool"}}}]}')
    refused = cli(*args, "--sarif", other)
    assert refused.returncode == 2 and "not a SARIF log written by lora-convert" in refused.stderr
    assert "other-tool" in other.read_text()
    assert cli(*args, "--sarif", cli.workdir / "dora").returncode == 2  # a folder
    assert cli(*args, "--sarif", cli.workdir / "no" / "such" / "x.sarif").returncode == 2
    assert not list(cli.workdir.glob(".*.tmp"))


def test_the_example_workflow_uploads_the_log_the_action_writes():
    import yaml

    workflow = yaml.safe_load((ROOT / "examples" / "ci" / "validate-adapters.yml").read_text())
    job = workflow["jobs"]["validate"]
    action = next(s for s in job["steps"] if s.get("uses", "").startswith("OWNER/lora-convert@"))
    upload = next(s for s in job["steps"] if s.get("uses", "").startswith("github/codeql-action/upload-sarif@"))
    assert upload["with"]["sarif_file"] == action["with"]["sarif"]
    assert upload["if"] == "always()"
    assert workflow["permissions"]["security-events"] == "write"
    assert "sarif" in yaml.safe_load((ROOT / "action.yml").read_text())["inputs"]
