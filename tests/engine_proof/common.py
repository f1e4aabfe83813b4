"""What an engine harness returns, and how a module's delta is classified against PEFT's own reference.

An engine harness (sglang_0_5_23.py, vllm_0_33_0.py) loads one adapter folder onto one fixture base with the
engine's own, unmodified LoRA loading code and returns an `EngineLoad`:

- `load_error`: the engine refused the adapter or failed while loading it (exception type and message), or None;
- `deltas`: for every PEFT module (the names of `case.json` `modules` / the `<module>::delta_weight` keys of the
  fixture's reference.safetensors) the delta the engine would ADD to that module's base weight, as float64
  `[out, in]` (`[E, out, in]` for a 3-D expert parameter, like the reference), computed from what the engine holds
  after loading (its LoRA buffers, scaling included), with fused engine modules (qkv_proj, gate_up_proj,
  stacked experts) cut back into the base's modules by rows. A module the engine holds no LoRA for is absent;
- `second_reads`: for a module whose output the base model reads twice (`value_copies`: Gemma-4's key projection
  that is also the value), the delta the engine adds where the second read happens (vLLM: the V slice of the fused
  qkv_proj), which PEFT's semantics make the module's own delta too.

`classify` turns that into one word per PEFT module: exact / dropped / wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from helpers import case_dir

# fp32 data, fp64 arithmetic on both sides: what is left is the fp32 rounding of the factors (measured ~1e-7).
EXACT_RTOL = 1e-5


@dataclass
class EngineLoad:
    load_error: str | None = None
    deltas: dict[str, np.ndarray] = field(default_factory=dict)
    second_reads: dict[str, np.ndarray] = field(default_factory=dict)


def value_copies(case: str) -> dict[str, str]:
    """{PEFT module: the module it stands in for} where the fixture's base reads one projection's output twice.
    Gemma-4 `attention_k_eq_v` (transformers==5.25.0 transformers/models/gemma4/modeling_gemma4.py:1154, 1178-1182,
    1218): a full-attention layer below the KV-shared ones has no v_proj and takes `value_states = key_states`, so
    under PEFT the k_proj LoRA delta reaches the values as well as the keys."""
    import json

    from helpers import case_base_dir, case_meta

    config = json.loads((case_base_dir(case) / "config.json").read_text())
    text = config.get("text_config") or config
    if not text.get("attention_k_eq_v"):
        return {}
    first_shared = text["num_hidden_layers"] - (text.get("num_kv_shared_layers") or 0)
    full = {i for i, kind in enumerate(text.get("layer_types") or ()) if kind == "full_attention" and i < first_shared}
    out = {}
    for module in case_meta(case)["modules"]:
        head, _, leaf = module.rpartition(".")
        layer = head.split("layers.", 1)[-1].split(".", 1)[0] if "layers." in head else ""
        if leaf == "k_proj" and layer.isdigit() and int(layer) in full:
            out[module] = f"{head}.v_proj"
    return out


@cache
def reference_deltas(case: str) -> dict[str, np.ndarray]:
    """PEFT's own delta per module (`get_delta_weight`, scaling included), float64."""
    ref = load_file(str(case_dir(case) / "reference.safetensors"))
    suffix = "::delta_weight"
    return {k[: -len(suffix)]: v.astype(np.float64) for k, v in ref.items() if k.endswith(suffix)}


def to_param_layout(delta, info: dict, engine_interleaved: bool = False):
    """An engine's delta for a 3-D expert parameter, given as `[E, out, in]` in the engine's own output order, in
    the layout of the parameter itself, which is how reference.safetensors stores PEFT's delta (case.json:
    `param_shape`, `forward_contracts` 1 = stored `[E, in, out]`, `gate_up_rows` "interleaved" = gate at outputs
    0::2 and up at 1::2, as gpt-oss stores them). A gate_up delta's rows are gate then up, unless
    `engine_interleaved`: the engine computes with the checkpoint's interleaved rows itself."""
    if delta is None or delta.ndim != 3:
        return delta
    if info.get("gate_up_rows") == "interleaved" and not engine_interleaved:
        half = delta.shape[1] // 2
        mixed = np.empty_like(delta)
        mixed[:, 0::2], mixed[:, 1::2] = delta[:, :half], delta[:, half:]
        delta = mixed
    if info.get("forward_contracts") == 1:
        delta = np.ascontiguousarray(delta.transpose(0, 2, 1))
    return delta


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    if got.shape != want.shape:
        return float("inf")
    scale = float(np.linalg.norm(want))
    return float(np.linalg.norm(got - want)) / (scale if scale > 0 else 1.0)


def classify(case: str, load: EngineLoad) -> dict[str, str]:
    """PEFT module -> "exact" | "dropped" | "wrong" (every reference module; a zero engine delta is "dropped"). A
    module of `value_copies` is exact only when the engine adds PEFT's delta at both reads of its output, dropped
    when at neither, else wrong (the keys adapted, the values not)."""
    copies = value_copies(case)
    out = {}
    for module, want in reference_deltas(case).items():
        verdicts = {_verdict(load.deltas.get(module), want)}
        if module in copies:
            verdicts.add(_verdict(load.second_reads.get(module), want))
        out[module] = verdicts.pop() if len(verdicts) == 1 else "wrong"
    return out


def _verdict(got: np.ndarray | None, want: np.ndarray) -> str:
    if got is None or not np.any(got):
        return "dropped"
    return "exact" if relative_error(got, want) <= EXACT_RTOL else "wrong"


def fixture_adapter(case: str) -> Path:
    return case_dir(case) / "adapter"


def normalize_layout(case: str, layout: str, base: Path, out: Path) -> tuple[Path | None, str | None]:
    """lora-convert's `--layout LAYOUT --drop-unsupported` output for a fixture against `base` (the base the engine
    is given), or (None, the refusal) when nothing is left to write. What was dropped is in the output's report."""
    from lora_convert.errors import UnsupportedAdapterError
    from lora_convert.pipeline.commands import normalize

    try:
        # the layout of the release that runs it, not of the newest one lora-convert describes
        release = layout if "==" in layout or layout in ("stacked", "peft") else f"{layout}==installed"
        normalize(str(fixture_adapter(case)), out, base=str(base), layout=release, drop_unsupported=True)
    except UnsupportedAdapterError as exc:
        return None, f"UnsupportedAdapterError: {exc.message}"
    return out, None


def original_record(case: str, load: EngineLoad) -> dict:
    """What an engine did with the ORIGINAL adapter: its load error, or the verdict of every PEFT module."""
    if load.load_error is not None:
        return {"load_error": load.load_error}
    return {"load_error": None, "modules": classify(case, load)}


def layout_record(case: str, out: Path | None, refusal: str | None, load: EngineLoad | None) -> dict:
    """What an engine did with lora-convert's layout output for `case`: nothing to load (`nothing_left`: every
    module refused), a load error, or the verdict of every module it holds plus the modules whose rows the layout
    cut away (`rows_cut`, listed as partially dropped in the output's report)."""
    if out is None:
        return {"nothing_left": refusal or "refused"}
    if load.load_error is not None:
        return {"load_error": load.load_error}
    verdicts = classify(case, load)
    held = {m: v for m, v in verdicts.items() if v != "dropped"}
    return {
        "load_error": None,
        "held": held,
        "rows_cut": sorted(rows_cut(out)),
        # modules the layout wrote (not listed as dropped in its report) that the engine does not apply
        "not_applied": sorted(set(verdicts) - reported_dropped(out) - set(held)),
    }


def reported_dropped(out: Path) -> set[str]:
    """Modules (PEFT names) a layout output's report lists as dropped, wholly or by rows."""
    import json

    from lora_convert.convert.engine_layouts import REPORT_FILE

    report = json.loads((out / REPORT_FILE).read_text())
    return {k[len("base_model.model.") :].rsplit(".lora_", 1)[0] for d in report["dropped"] for k in d["keys"]}


def rows_cut(out: Path) -> set[str]:
    """Modules (PEFT names) of a layout output whose rows the layout left out, from its report."""
    import json

    from lora_convert.convert.engine_layouts import REPORT_FILE

    report = json.loads((out / REPORT_FILE).read_text())
    return {
        k[len("base_model.model.") :].rsplit(".lora_", 1)[0]
        for d in report["dropped"]
        if d["module"].endswith(" rows)")
        for k in d["keys"]
    }


def check_cpu_unbuildable(record: dict) -> None:
    """For a model class the engine cannot build on a CPU (the harness says why): what was measured instead is
    what the rules assume, i.e. the engine's registry maps the architecture to the class whose code the rules cite,
    and building it on the CPU fails with exactly the known refusal."""
    got = record["cpu_unbuildable"]
    assert got["registry"] == got["expected"]["registry"], got
    assert got["build_error"] == got["expected"]["build_error"], got


def check_cannot_run(record: dict) -> None:
    """For a fixture a release is declared unable to run on in this environment (adaptations.CANNOT_RUN): the error
    the harness got is the declared one, not another failure."""
    got = record["cannot_run"]
    assert got["error"].startswith(got["expected"]), got


def check_layout(engine: str, record: dict) -> None:
    """(a) of the proof: the engine loads the layout output, and every module it holds is exact, except modules
    whose rows the layout cut away (which must then not be exact). Nothing may make it fail to load: what a release
    cannot serve, its layout refuses (its planned_group rules, and a base it refuses whatever the adapter,
    lora_convert.convert.engine_layouts.refuse_unservable_base), which leaves `nothing_left` when nothing remains.

    The record's `not_applied` (modules the layout wrote that the engine does not apply) is recorded, not yet
    asserted: it is non-empty for the SGLang Qwen3-Next / Qwen3.5 cases (o_proj of the gated attention) whose cause
    is not yet traced; on SGLang 0.5.19-0.5.20, which refuse those cases' MLP and expert modules, that o_proj is all
    the output holds, so the engine holds nothing of it."""
    if "cpu_unbuildable" in record:
        check_cpu_unbuildable(record)
        return
    if "cannot_run" in record:
        check_cannot_run(record)
        return
    if "nothing_left" in record:  # every module refused: nothing for the engine to load
        return
    assert record["load_error"] is None, f"{engine} failed on its layout: {record['load_error']}"
    held = record["held"]
    assert held or record["not_applied"], f"{engine} holds no module of its layout output"
    cut = set(record["rows_cut"])
    bad = {m: v for m, v in held.items() if v != "exact" and m not in cut}
    assert not bad, bad
    assert all(held.get(m) != "exact" for m in cut)


def check_prediction(release: str, case: str, row: dict, served_base: Path) -> None:
    """(b) of the proof: what the release did with the original adapter is what `validate --engine RELEASE`
    predicts (on `served_base`, the base the release was given)."""
    from lora_convert.pipeline.commands import predict

    engine = release.partition("==")[0]
    truth = row["original"]
    if "cpu_unbuildable" in truth:
        check_cpu_unbuildable(truth)
        return
    if "cannot_run" in truth:
        check_cannot_run(truth)
        return
    # the rules of the release that ran, not the newest one lora-convert describes
    predicted = predict(release, fixture_adapter(case), served_base)
    # the module-group rules need a plan; an adapter that cannot be planned (all DoRA) is predicted by the rest
    assert predicted.load_failure or predicted.unchecked is None, predicted.unchecked
    if truth.get("load_error"):
        assert predicted.load_failure, f"{engine} fails ({truth['load_error']}) but the prediction loads it"
        return
    assert not predicted.load_failure, f"{engine} loads it; predicted failure {predicted.load_failure}"
    assert predicted.modules == truth["modules"]
