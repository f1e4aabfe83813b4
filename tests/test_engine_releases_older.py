"""The rule files of the older engine releases (vllm-0.30.0 .. 0.32.0, sglang-0.5.19 .. 0.5.22) against what each
release's own LoRA loader did on the fixtures.

The outcomes are recorded, not re-run here: tests/engine_proof/truth/<engine>-<version>.json holds, per fixture, what
the proof harness (tests/engine_proof/vllm_0_33_0.py, sglang_0_5_23.py) measured when run on that release's released
wheel (issue 24 research, its runs 4-runs):

- `original`: the fixture adapter through the release: a load error, or exact / dropped / wrong per PEFT module.
  `predict("<engine>==<version>", adapter, base)` must say the same (as tests/engine_proof/common.py
  check_prediction does for the installed release);
- `layout`: lora-convert's `normalize --layout` output of the release the runs used for it (the file's `layout_of`)
  through the release. Predicting that output for the release must agree on whether it loads: the older releases
  fail some outputs the newer one loads (SGLang <= 0.5.22 the DSA indexer, <= 0.5.21 Gemma-3-VL's text layers,
  <= 0.5.20 gate_up_proj on shared-expert MoE bases).

And `lora-convert engines diff vllm==0.30.0 vllm==0.34.0` shows exactly the rules the releases differ in.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest

from helpers import case_base_dir, fixture_cases

TRUTH = Path(__file__).parent / "engine_proof" / "truth"
# the releases whose rule files this test proves, oldest first per engine
RELEASES = ("vllm==0.30.0", "vllm==0.31.0", "vllm==0.32.0", "sglang==0.5.19", "sglang==0.5.20", "sglang==0.5.21")
PROVEN = (*RELEASES, "sglang==0.5.22")  # 0.5.22's file gains the DSA-indexer rule its run shows


def _truth(release: str) -> dict:
    engine, version = release.split("==")
    return json.loads((TRUTH / f"{engine}-{version}.json").read_text())


@cache
def truth(release: str) -> dict:
    return _truth(release)


def _rows() -> list[tuple[str, str]]:
    return [(release, case) for release in PROVEN for case in sorted(truth(release)["cases"])]


def test_every_record_is_of_a_fixture():
    """A record names a fixture that exists (a renamed or removed fixture would leave its record unchecked). Fixtures
    added after the runs have no record of these releases yet: `make proof-truth` (tests/engine_proof/runs.py)
    records them where the release can run."""
    for release in PROVEN:
        recorded = set(truth(release)["cases"])
        assert recorded <= set(fixture_cases()), (release, sorted(recorded - set(fixture_cases())))
        assert len(recorded) >= 70, release  # the research's runs covered all 70 fixtures of their time


@cache
def served_base(engine: str, case: str, root: str) -> Path:
    """The base config the release was given for `case`: the fixture base for vLLM; for SGLang the config its proof
    harness writes (tests/engine_proof/sglang_0_5_23.py `_patch_config`: the class SGLang registers, text-only
    Qwen3.5 classes on their text config, released fields transformers 5 drops)."""
    base = case_base_dir(case)
    if engine == "vllm":
        return base
    from engine_proof.sglang_0_5_23 import _model_class, _patch_config

    model_class = _model_class(case)
    out = Path(root) / f"{base.name}-{model_class}"
    if not out.exists():
        out.mkdir(parents=True)
        config = json.loads((base / "config.json").read_text())
        (out / "config.json").write_text(json.dumps(_patch_config(config, model_class)))
    return out


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("served-bases"))


def _skip_unrun(record: dict | None) -> None:
    if record is None or "cannot_run" in record:
        # the release could not build this base in the environment of the run (tests/engine_proof/adaptations.py
        # CANNOT_RUN: SGLang <= 0.5.21 on MiniMax under transformers 5.25), so there is no outcome to compare with
        pytest.skip(f"no recorded outcome: {(record or {}).get('cannot_run', 'not run')}")


@pytest.mark.engine  # every release x fixture against its recorded run: the engine-proof layer, not the unit layer
@pytest.mark.parametrize(("release", "case"), _rows())
def test_prediction_equals_the_releases_outcome_on_the_original_adapter(release, case, bases):
    from engine_proof.common import fixture_adapter
    from lora_convert.pipeline.commands import predict

    engine = release.split("==")[0]
    record = truth(release)["cases"][case]["original"]
    _skip_unrun(record)
    if "cpu_unbuildable" in record:  # the release cannot build this model on a CPU: nothing was loaded
        pytest.skip("the model class cannot be built on a CPU (the release's registry and build error are recorded)")
    predicted = predict(release, fixture_adapter(case), served_base(engine, case, bases))
    if record["load_error"]:
        assert predicted.load_failure, f"{release} fails ({record['load_error']}) but the prediction loads it"
        return
    assert not predicted.load_failure, f"{release} loads it; predicted failure {predicted.load_failure}"
    assert predicted.modules == record["modules"]


@cache
def _layout_output(layout: str, case: str, base: Path, root: str) -> tuple[Path | None, str | None]:
    from engine_proof.common import normalize_layout

    return normalize_layout(case, layout, base, Path(root) / f"{layout.replace('==', '-')}-{case}")


@pytest.mark.engine  # every release x fixture against its recorded run: the engine-proof layer, not the unit layer
@pytest.mark.parametrize(("release", "case"), _rows())
def test_prediction_equals_the_releases_outcome_on_the_layout_output(release, case, bases):
    """Whether the release loads the layout output the runs gave it is what lora-convert predicts for it."""
    from lora_convert.pipeline.commands import predict

    engine = release.split("==")[0]
    record = truth(release)["cases"][case]["layout"]
    _skip_unrun(record)
    if "cpu_unbuildable" in record or "nothing_left" in record:
        pytest.skip("no layout output was loaded (every module refused, or the class cannot be built on a CPU)")
    base = served_base(engine, case, bases)
    out, refusal = _layout_output(truth(release)["layout_of"], case, base, bases)
    assert out is not None, f"the layout of {truth(release)['layout_of']} now refuses every module: {refusal}"
    predicted = predict(release, out, base)
    if record["load_error"]:
        assert predicted.load_failure, f"{release} fails on the output ({record['load_error']}); predicted: loads"
    else:
        assert not predicted.load_failure, f"{release} loads the output; predicted failure {predicted.load_failure}"


# ------------------------------------------------------------------------------------------------ read, not run
# Rules of these releases that no fixture reaches (issue 24 research, table 3a): checked on PEFT-written adapters
# against what the release's code does as read (each rule's `source`).
def _validate_codes(release: str, case: str) -> set[str]:
    from helpers import case_dir
    from lora_convert.pipeline.commands import validate

    report = validate(str(case_dir(case) / "adapter"), base=str(case_base_dir(case)), engine=release, smoke=False)
    return {f.code for f in report.findings if f.code.startswith("engine.")}


@pytest.mark.parametrize("release", ["vllm==0.30.0", "vllm==0.31.0"])
def test_vllm_before_0_32_serves_rank_and_alpha_patterns_at_one_scaling(release):
    # 0.30/0.31's PEFTHelper has no rank_pattern / alpha_pattern field; 0.32 reads both
    assert "engine.vllm.rank-alpha-pattern-ignored" in _validate_codes(release, "v5_deepseek_v3_rank_pattern")
    assert "engine.vllm.rank-alpha-pattern-ignored" not in _validate_codes(
        "vllm==0.32.0", "v5_deepseek_v3_rank_pattern"
    )


@pytest.fixture(scope="module")
def lora_bias_adapter(tmp_path_factory) -> Path:
    """An adapter PEFT writes with lora_bias=True (`...lora_B.bias` tensors) on the v5_llama fixture base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(case_base_dir("v5_llama")), dtype=torch.float32)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_bias=True)
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT starts B (and its bias) at zero: a zero delta would be exact anywhere
                param.normal_()
    out = tmp_path_factory.mktemp("lora-bias")
    peft_model.save_pretrained(str(out))
    return out


def test_vllm_0_31_reads_a_lora_bias_as_b_and_leaves_it_out(lora_bias_adapter):
    from lora_convert.pipeline.commands import predict

    base = case_base_dir("v5_llama")
    served = predict("vllm==0.31.0", lora_bias_adapter, base)  # parses lora_B.bias as B, then lora_B.weight wins
    assert served.load_failure == [] and set(served.modules.values()) == {"wrong"}, served
    for release in ("vllm==0.30.0", "vllm==0.32.0", "vllm==0.34.0"):  # 0.30: unparsable name; 0.32+: refused
        assert predict(release, lora_bias_adapter, base).load_failure == ["bias-rejected"], release


# ------------------------------------------------------------------------------------------------ engines diff
def test_engines_diff_vllm_0_30_to_0_34_shows_the_releases_differences():
    """`lora-convert engines diff vllm==0.30.0 vllm==0.34.0`: the rules whose behaviour differs are exactly the ones
    the runs measured and the code reads differently; the rest differ in the error text 0.30 prints or only in the
    lines they cite."""
    from typer.testing import CliRunner

    from lora_convert.cli import app

    result = CliRunner().invoke(app, ["engines", "diff", "vllm==0.30.0", "vllm==0.34.0", "--format", "json"])
    assert result.exit_code == 0, result.stderr
    diff = {c["id"]: c for c in json.loads(result.stdout)["rules"]}
    behaviour = {
        rule_id: c["change"]
        if c["change"] != "changed"
        else sorted(set(c["fields"]) & {"outcome", "feature", "params"})
        for rule_id, c in diff.items()
    }
    assert {k: v for k, v in behaviour.items() if v} == {
        "prefix-mismatch": ["params"],  # <= 0.32: no text-name fallback on multimodal wrappers (Qwen3.5 dropped)
        "glm4-moe-router-lora": "removed",  # 0.30: GLM4-MoE's router is a plain nn.Linear
        "rank-alpha-pattern-ignored": "removed",  # <= 0.31: one scaling per adapter
        "bias-rejected": ["params"],  # 0.30 and 0.34 both refuse any bias; 0.31 only bias != 'none'
        "transformers-moe-per-expert-lora": "removed",  # 0.34's Transformers backend lists each expert once (f25)
        "mistral4-transformers-moe-per-expert-lora": "removed",  # the same for Mistral-Small-4's text model (fam-mla)
        "gemma4-experts-at-moe": "removed",  # 0.30: Gemma-4's experts sit at layers.N.moe.experts (fam-gemma)
        "fused-3d-on-2d-wrapper": ["params"],  # 0.30: never reached for Gemma-4, whose experts it drops (fam-gemma)
        "gemma4-k-eq-v-value-lora": "removed",  # <= 0.33: k_proj LoRA in the K slice only, not the V (gemma-kv)
    }
    from lora_convert.engines.rules import diff_rules

    params = {
        c["id"]: (c["old"], c["new"]) for c in diff_rules("vllm==0.30.0", "vllm==0.34.0") if c["old"] and c["new"]
    }
    old, new = params["prefix-mismatch"]
    assert old["params"]["wrapper_text_names"] == [] and new["params"]["wrapper_text_names"] == ["model.layers"]
    # the other changed rules differ in their text (the error 0.30 prints) or only in their citations (lines moved)
    message_only = {k for k, v in behaviour.items() if not v and {"message", "fix"} & set(diff[k]["fields"])}
    assert all(set(diff[k]["fields"]) == {"source"} for k, v in behaviour.items() if not v and k not in message_only)
    assert message_only == {
        "kimi-k25-no-lora",  # refused when the runner loads the model, not at config time
        "kimi-linear-no-lora",  # likewise
        "granite-hybrid-experts",  # the same AssertionError for its 3-D keys
        "mixed-expert-ranks",  # torch.stack fails, no rank check
        "modules-to-save-rejected",  # 0.30's refusal text
    }
    assert all(diff[k]["old"]["outcome"] == diff[k]["new"]["outcome"] for k in message_only)
    assert json.loads(result.stdout)["layout"] == []  # the layout is inherited unchanged


@pytest.mark.parametrize(
    ("old", "new", "only_old", "only_new"),
    [
        ("sglang==0.5.22", "sglang==0.5.23", {"dsa-indexer-lora-import-error"}, set()),
        ("sglang==0.5.21", "sglang==0.5.22", {"vision-tower-text-targets", "nvfp4-shared-expert-fused-kernel"}, set()),
        ("sglang==0.5.20", "sglang==0.5.21", {"shared-expert-buffer-width"}, set()),
        ("sglang==0.5.19", "sglang==0.5.20", set(), set()),
        ("vllm==0.32.0", "vllm==0.33.0", set(), set()),
        ("vllm==0.31.0", "vllm==0.32.0", {"rank-alpha-pattern-ignored", "lora-bias-ignored"}, set()),
        # 0.30 refuses a lora_B.bias name outright (bias-rejected); 0.31 misreads it
        ("vllm==0.30.0", "vllm==0.31.0", {"glm4-moe-router-lora", "gemma4-experts-at-moe"}, {"lora-bias-ignored"}),
    ],
)
def test_each_release_step_adds_or_drops_exactly_its_own_rules(old, new, only_old, only_new):
    """Between neighbouring releases the rule sets differ by the rules of one release's own behaviour."""
    from lora_convert.engines.rules import diff_rules

    changes = diff_rules(old, new)
    assert {c["id"] for c in changes if c["change"] == "removed"} == only_old
    assert {c["id"] for c in changes if c["change"] == "added"} == only_new


def _outcome(record: dict):
    if "cpu_unbuildable" in record or "cannot_run" in record:
        return None
    return "load-failure" if record["load_error"] else record["modules"]


def test_vllm_0_30_and_0_34_are_predicted_to_differ_on_exactly_the_fixtures_their_loaders_differ_on():
    """What `engines diff vllm==0.30.0 vllm==0.34.0 ADAPTER` reports, over every fixture: the adapters whose predicted
    outcome differs between the two releases are the ones whose recorded outcome differs."""
    from engine_proof.common import fixture_adapter
    from lora_convert.pipeline.commands import predict

    if not (TRUTH / "vllm-0.34.0.json").exists():
        pytest.skip("no recorded truth of vllm==0.34.0 (tests/engine_proof/runs.py --record writes it)")
    old, new = truth("vllm==0.30.0")["cases"], _truth("vllm==0.34.0")["cases"]
    recorded, predicted = set(), set()
    for case in sorted(set(old) & set(new) & set(fixture_cases())):
        before, after = _outcome(old[case]["original"]), _outcome(new[case]["original"])
        if before is None or after is None:
            continue
        recorded |= {case} if before != after else set()
        was, now = (predict(r, fixture_adapter(case), case_base_dir(case)) for r in ("vllm==0.30.0", "vllm==0.34.0"))
        if ("load-failure" if was.load_failure else was.modules) != (
            "load-failure" if now.load_failure else now.modules
        ):
            predicted.add(case)
    assert recorded >= {"v5_qwen3_5", "v5_qwen3_5_moe"}  # the text-name fallback 0.33 added (measured)
    assert predicted == recorded
