"""Issue 25 item 3, what PEFT itself cannot apply: each schema's `peft_cannot_apply` agrees with what PEFT 0.21.2 does
when asked to target that module on the fixture base, and an adapter written by another tool (mlx-lm) with LoRA on
such a module is reported by validate and refused, named, by `normalize --layout peft` only."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import helpers

BASES = helpers.FIXTURES / "bases"
# The kinds of schema group where PEFT's support depends on the module class transformers builds (routers) or on the
# model type (Mamba mixers, peft/tuners/tuners_utils.py:145-163).
KINDS = ("router", "mamba")
NOT_FOUND = "raises NoMatchingPeftModuleError"  # no module of the base has that name


def _families_and_groups() -> list[tuple[tuple[str, ...], str, str, bool]]:
    """(the family's fixture bases, family, group path, has peft_cannot_apply) for every router or Mamba group of
    every schema family that has a fixture base."""
    from lora_convert.arch.schema import schema_for_config
    from lora_convert.errors import BaseConfigError

    bases: dict[str, list[str]] = {}
    schemas = {}
    for base in sorted(BASES.glob("v5_*")):
        try:
            schema = schema_for_config(json.loads((base / "config.json").read_text()))
        except BaseConfigError:  # a base no schema claims has no group to check
            continue
        bases.setdefault(schema.family, []).append(base.name)
        schemas[schema.family] = schema
    return [
        (tuple(bases[family]), family, group.path, bool(group.peft_cannot_apply))
        for family, schema in sorted(schemas.items())
        for group in schema.groups
        if group.kind in KINDS
    ]


def _peft_applies(base: str, leaf: str) -> str:
    """What PEFT does with a LoRA (init_lora_weights=False: non-zero B) of every module named `leaf` of the base, as
    `--layout peft` names it in target_modules: 'applies' (the logits change) or how it fails."""
    import peft
    import torch
    import transformers

    config = json.loads((BASES / base / "config.json").read_text())
    cls = getattr(transformers, (config.get("architectures") or [""])[0], transformers.AutoModelForCausalLM)
    model = cls.from_pretrained(str(BASES / base), dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    with torch.no_grad():
        want = model(ids).logits.clone()
    torch.manual_seed(0)
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=[leaf], init_lora_weights=False)
    try:
        adapted = peft.get_peft_model(model, lora).eval()
        with torch.no_grad():
            got = adapted(ids).logits
    except (ValueError, AttributeError, TypeError, RuntimeError) as exc:
        return f"raises {type(exc).__name__}: {str(exc)[:160]}"
    return "applies" if float((got - want).abs().max()) > 1e-6 else "applies nothing"


@pytest.mark.peft
@pytest.mark.slow
def test_peft_cannot_apply_is_what_peft_does():
    """For each router and Mamba group: PEFT raises or applies nothing exactly where the schema says
    `peft_cannot_apply`, and applies LoRA where it does not (e.g. the routers PEFT re-targets onto their weight)."""
    pytest.importorskip("peft")
    wrong = []
    for bases, family, path, cannot in _families_and_groups():
        for base in bases:  # a family's dense or text-only base may lack the group: its next base has it
            outcome = _peft_applies(base, path.rsplit(".", 1)[-1])
            if not outcome.startswith(NOT_FOUND):
                break
        if (outcome != "applies") != cannot:
            wrong.append(f"{family} {path} on {base}: PEFT {outcome}; schema peft_cannot_apply={cannot}")
    assert not wrong, "\n".join(wrong)


# ------------------------------------------------------------------------- an adapter mlx-lm wrote
@pytest.fixture(scope="module")
def mlx_router_adapters(tmp_path_factory):
    """mlx-lm-trained adapters (its own linear_to_lora_layers) that adapt a module PEFT cannot apply: Granite-MoE's
    router (PEFT would leave it out without a word) and Nemotron-H's Mamba out_proj (PEFT would raise)."""
    pytest.importorskip("mlx_lm")
    import mlx_proof

    work = tmp_path_factory.mktemp("peft-cannot")
    made = {}
    for case in ("v5_granitemoe", "v5_nemotron_h"):
        params = {**mlx_proof.MLX_TRAINED[case]}
        params["keys"] = [*params["keys"], *mlx_proof.PEFT_CANNOT_APPLY[case]]
        base = mlx_proof.DATA / "bases" / mlx_proof.case_info(case)["base"]
        mbase = mlx_proof.mlx_base(base, work / f"{case}-base")
        made[case] = (mlx_proof.mlx_trained_adapter(mbase, work / case, params), base)
    return made


@pytest.mark.mlx
@pytest.mark.slow
@pytest.mark.parametrize("case", ["v5_granitemoe", "v5_nemotron_h"])
def test_validate_reports_an_mlx_adapter_module_peft_cannot_apply(mlx_router_adapters, case):
    import mlx_proof
    from lora_convert.pipeline.commands import validate

    adapter, base = mlx_router_adapters[case]
    report = validate(str(adapter), base=str(base), smoke=False)
    flagged = [f for f in report.findings if f.code == "modules.peft-cannot-apply"]
    module = mlx_proof.PEFT_CANNOT_APPLY[case][0]
    assert len(flagged) == 1, [f.code for f in report.findings]
    message = flagged[0].message
    assert module.rsplit(".", 1)[-1] in message and "--layout peft refuses" in message, message
    assert flagged[0].keys and all(module in k for k in flagged[0].keys), flagged[0].keys


@pytest.mark.mlx
@pytest.mark.slow
@pytest.mark.parametrize("case", ["v5_granitemoe", "v5_nemotron_h"])
def test_normalize_layout_peft_refuses_it_named_and_other_layouts_keep_it(mlx_router_adapters, case, tmp_path):
    """`normalize --layout peft` exits 1 (README: modules normalize refuses), names the module and why, writes
    nothing; `--drop-unsupported` leaves exactly those modules out; the stacked layout keeps them."""
    import mlx_proof
    from lora_convert.pipeline.commands import normalize

    adapter, base = mlx_router_adapters[case]
    module = mlx_proof.PEFT_CANNOT_APPLY[case][0]
    out = tmp_path / "peft"
    cmd = [sys.executable, "-m", "lora_convert", "normalize", str(adapter), "-o", str(out), "--base", str(base)]
    run = subprocess.run([*cmd, "--layout", "peft"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, (run.returncode, run.stderr)
    assert module in run.stderr and "PEFT itself cannot apply" in run.stderr and "Traceback" not in run.stderr
    assert not out.exists()
    kept = normalize(str(adapter), tmp_path / "kept", base=str(base), layout="peft", drop_unsupported=True)
    assert {d.code for d in kept.dropped} == {"modules.peft-cannot-apply"}, kept.dropped
    assert all(d.module.endswith(module) for d in kept.dropped), kept.dropped
    stacked = normalize(str(adapter), tmp_path / "stacked", base=str(base))
    assert not stacked.dropped and any(g.name.endswith(module.rsplit(".", 1)[-1]) for g in stacked.plan.groups)
