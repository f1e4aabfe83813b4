"""normalize on every PEFT-written fixture: each slice of the stacked output computes PEFT's own delta.

The expected deltas are PEFT's `get_delta_weight` for each module, recorded by tests/fixtures/make_fixtures.py
when PEFT wrote the adapter; nothing here recomputes them from the adapter with our own rules.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import case_base_dir, case_dir, case_meta, fixture_cases, orient_reference
from lora_convert.errors import UnsupportedAdapterError, UsageError
from lora_convert.peft.naming import parse_key

# Fixtures that normalize must refuse without --drop-unsupported, and the code of the refusal.
REFUSED = {"dora": "config.dora", "vision": "modules.vision", "trainable_tokens": "keys.trainable-tokens"}


def refused_code(case: str) -> str | None:
    return next((code for marker, code in REFUSED.items() if marker in case), None)


CASES = fixture_cases()
CONVERTIBLE = [c for c in CASES if refused_code(c) is None]


def run_normalize(case: str, out: Path, **kw):
    from lora_convert.pipeline.commands import normalize

    return normalize(str(case_dir(case) / "adapter"), out, base=str(case_base_dir(case)), **kw)


def peft_module_name(key: str) -> tuple[str, int | None]:
    p = parse_key(key)
    return p.module + ".base_layer" * p.base_layer_depth, p.expert


def expected_rows(reference: dict, slices: list[dict], expert: int | None, experts: int | None):
    """PEFT's delta for each slice: consecutive slices listing the same source keys split its rows in order."""
    out = []
    consumed: dict[tuple, int] = {}
    for s in slices:
        if s["source"] is None:
            out.append(None)
            continue
        if experts and expert is not None:
            # the keys of this expert (per-expert 2-D) or the one 3-D pair
            keys = [k for k in s["source"] if parse_key(k).expert in (None, expert)]
            if all(parse_key(k).expert is None for k in keys):
                name, _ = peft_module_name(keys[0])
                full = reference[f"{name}::delta_weight"]
                full = full[expert] if full.dim() == 3 else full
            else:
                if not keys:
                    out.append(None)
                    continue
                name, _ = peft_module_name(keys[0])
                full = reference[f"{name}::delta_weight"]
        else:
            name, _ = peft_module_name(s["source"][0])
            full = reference[f"{name}::delta_weight"]
        if "source_rows" in s:  # an interleaved merged source: the slice's rows are every step-th row
            out.append(full[slice(*s["source_rows"])].double())
            continue
        ident = (tuple(s["source"]), expert)
        start = consumed.get(ident, 0)
        out.append(full[start : start + s["out_features"]].double())
        consumed[ident] = start + s["out_features"]
    return out


def check_output_against_peft(case: str, out: Path) -> int:
    layout = json.loads((out / "lora_layout.json").read_text())
    tensors = load_file(str(out / "adapter_model.safetensors"))
    reference = orient_reference(case, load_file(str(case_dir(case) / "reference.safetensors")))
    R = layout["rank"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == R and config["lora_alpha"] == R and not config["use_rslora"]
    assert not config["rank_pattern"] and not config["alpha_pattern"]
    checked = 0
    for g in layout["groups"]:
        A = tensors[f"base_model.model.{g['key']}.lora_A.weight"].double()
        B = tensors[f"base_model.model.{g['key']}.lora_B.weight"].double()
        c = len(g["slices"])
        E = g["experts"]
        assert A.shape == ((E, c * R, g["in_features"]) if E else (c * R, g["in_features"]))
        assert B.shape[-2] == sum(s["out_features"] for s in g["slices"]) and B.shape[-1] == R
        for e in range(E) if E else [None]:
            a = A[e] if E else A
            b = B[e] if E else B
            for i, (s, want) in enumerate(zip(g["slices"], expected_rows(reference, g["slices"], e, E), strict=True)):
                rows = slice(s["out_offset"], s["out_offset"] + s["out_features"])
                got = b[rows] @ a[i * R : (i + 1) * R]
                if want is None or (E and e in (g.get("missing_experts") or [])):
                    assert torch.count_nonzero(b[rows]) == 0 and torch.count_nonzero(a[i * R : (i + 1) * R]) == 0, (
                        g["key"],
                        s["name"],
                        e,
                    )
                    continue
                rel = (got - want).norm() / want.norm().clamp_min(1e-30)
                assert rel <= 1e-5, f"{case} {g['key']} slice {s['name']} expert {e}: relative error {rel:.2e}"
                # padding beyond the slice's own rank is exactly zero
                assert torch.count_nonzero(a[i * R + s["rank"] : (i + 1) * R]) == 0
                assert torch.count_nonzero(b[rows, s["rank"] :]) == 0
                checked += 1
    return checked


@pytest.mark.parametrize("case", CONVERTIBLE)
def test_every_slice_matches_peft(case, tmp_path):
    run_normalize(case, tmp_path / "out")
    assert check_output_against_peft(case, tmp_path / "out") > 0


@pytest.mark.parametrize("case", [c for c in CASES if refused_code(c)])
def test_refused_fixtures(case, tmp_path):
    with pytest.raises(UnsupportedAdapterError) as info:
        run_normalize(case, tmp_path / "out")
    assert "--drop-unsupported" in info.value.hint
    assert not (tmp_path / "out").exists()
    meta = case_meta(case)
    convertible_left = [
        m
        for m, info in meta["modules"].items()
        if not info.get("dora") and "vision" not in m and "mm_projector" not in m
    ]
    if not convertible_left:
        # every module is refused: dropping them all leaves nothing to write, which is an error too
        with pytest.raises(UnsupportedAdapterError, match="All .* were dropped"):
            run_normalize(case, tmp_path / "dropped", drop_unsupported=True)
        assert not (tmp_path / "dropped").exists()
        return
    result = run_normalize(case, tmp_path / "dropped", drop_unsupported=True)
    layout = json.loads((tmp_path / "dropped" / "lora_layout.json").read_text())
    assert {d["code"] for d in layout["dropped"]} >= {refused_code(case)}
    assert result.plan.dropped
    assert check_output_against_peft(case, tmp_path / "dropped") > 0


def test_bf16_output_within_bf16_tolerance(tmp_path):
    case = CONVERTIBLE[0]
    run_normalize(case, tmp_path / "bf16", dtype="bf16")
    tensors = load_file(str(tmp_path / "bf16" / "adapter_model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    # re-check numerically with the bf16 tolerance by upcasting and comparing to the fp32 output
    run_normalize(case, tmp_path / "fp32", dtype="fp32")
    ref = load_file(str(tmp_path / "fp32" / "adapter_model.safetensors"))
    for key, value in tensors.items():
        rel = (value.double() - ref[key].double()).norm() / ref[key].double().norm().clamp_min(1e-30)
        assert rel <= 1e-2, key


def test_same_input_same_bytes(tmp_path):
    case = CONVERTIBLE[0]
    digests = []
    for name in ("one", "two"):
        run_normalize(case, tmp_path / name)
        digests.append(
            {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((tmp_path / name).iterdir())}
        )
    assert digests[0] == digests[1]


def test_input_is_not_modified(tmp_path):
    case = CONVERTIBLE[0]
    folder = case_dir(case) / "adapter"
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    run_normalize(case, tmp_path / "out")
    assert before == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def test_existing_output_needs_force_and_force_replaces_only_our_output(tmp_path):
    from lora_convert.io.output_folder import MANIFEST_FILE

    case = CONVERTIBLE[0]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(UsageError, match="not empty"):
        run_normalize(case, out)
    with pytest.raises(UsageError, match="keep.txt"):  # not a previous output: --force does not touch it either
        run_normalize(case, out, force=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "user data"
    (out / "keep.txt").unlink()
    run_normalize(case, out)
    with pytest.raises(UsageError, match="not empty"):
        run_normalize(case, out)
    run_normalize(case, out, force=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["adapter_config.json", "adapter_model.safetensors", LAYOUT, MANIFEST_FILE]
    )
    assert json.loads((out / MANIFEST_FILE).read_text())["files"] == [
        "adapter_config.json",
        "adapter_model.safetensors",
        LAYOUT,
    ]


LAYOUT = "lora_layout.json"


class RecordingProgress:
    """A WriteProgress that records its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def start(self, total_bytes: int) -> None:
        self.calls.append(("start", total_bytes))

    def advance(self, nbytes: int) -> None:
        self.calls.append(("advance", nbytes))


def safetensors_data_bytes(path: Path) -> int:
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    return path.stat().st_size - 8 - header_len


def test_progress_total_is_known_first_and_advances_sum_to_it(tmp_path):
    case = CONVERTIBLE[0]
    progress = RecordingProgress()
    result = run_normalize(case, tmp_path / "out", progress=progress)
    kinds = [k for k, _ in progress.calls]
    assert kinds[0] == "start" and kinds.count("start") == 1
    assert kinds.count("advance") == len(result.plan.groups)  # one advance per group, by that group's bytes
    total = progress.calls[0][1]
    assert total == result.bytes_out == safetensors_data_bytes(tmp_path / "out" / "adapter_model.safetensors")
    assert sum(n for k, n in progress.calls if k == "advance") == total
    assert all(n > 0 for _, n in progress.calls)


def test_cli_progress_bar_has_the_plan_total_in_bytes(tmp_path):
    """The CLI's bar (a spinner while planning, then bytes with a total) fed by a real run."""
    import io

    from rich.console import Console

    from lora_convert.cli.normalize_cmd import _NormalizeProgress

    bar = _NormalizeProgress(Console(file=io.StringIO(), force_terminal=True))
    bar.planning()
    assert bar._status is not None
    result = run_normalize(CONVERTIBLE[0], tmp_path / "out", progress=bar)
    assert bar._status is None  # the spinner gave way to the bar when writing started
    task = bar._bar.tasks[0]
    assert task.total == task.completed == result.bytes_out
    bar.close()
    assert bar._bar is None


def test_rank_below_largest_is_an_error(tmp_path):
    with pytest.raises(UsageError, match="below"):
        run_normalize(CONVERTIBLE[0], tmp_path / "out", rank=1)


def test_padding_to_a_larger_rank_stays_exact(tmp_path):
    case = CONVERTIBLE[0]
    run_normalize(case, tmp_path / "out", rank=24)
    assert json.loads((tmp_path / "out" / "lora_layout.json").read_text())["rank"] == 24
    assert check_output_against_peft(case, tmp_path / "out") > 0


def test_interrupted_run_leaves_no_output(tmp_path, monkeypatch):
    from lora_convert.convert import group_tensors

    real = group_tensors.build_group_tensors
    calls = {"n": 0}

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(group_tensors, "build_group_tensors", interrupting)
    with pytest.raises(KeyboardInterrupt):
        run_normalize(CONVERTIBLE[0], tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _base_config(case: str) -> dict:
    return json.loads((case_base_dir(case) / "config.json").read_text())


def test_kv_a_less_deepseek_gets_kv_width_zero_fill(tmp_path):
    case = "v5_deepseek_v3_q_a_only"
    cfg = _base_config(case)
    run_normalize(case, tmp_path / "out")
    tensors = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    layout = json.loads((tmp_path / "out" / "lora_layout.json").read_text())
    R = layout["rank"]
    fused = [g for g in layout["groups"] if g["group"] == "fused_qkv_a_proj_with_mqa"]
    assert fused
    for g in fused:
        B = tensors[f"base_model.model.{g['key']}.lora_B.weight"]
        # q_lora_rank + kv_lora_rank + qk_rope_head_dim rows, never 2 x q_lora_rank (the bug this tool prevents)
        assert B.shape == (cfg["q_lora_rank"] + cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"], R)
        kv = g["slices"][1]
        assert kv["name"] == "kv_a_proj_with_mqa" and kv["source"] is None
        assert kv["out_features"] == cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]
        assert torch.count_nonzero(B[cfg["q_lora_rank"] :]) == 0


def test_rank_pattern_module_is_padded_and_exact(tmp_path):
    case = "v5_deepseek_v3_rank_pattern"
    meta = case_meta(case)
    ranks = {info["r"] for info in meta["modules"].values()}
    assert len(ranks) > 1, "the fixture must mix ranks"
    run_normalize(case, tmp_path / "out")
    layout = json.loads((tmp_path / "out" / "lora_layout.json").read_text())
    assert layout["rank"] == max(ranks)
    assert {s["rank"] for g in layout["groups"] for s in g["slices"] if s["source"]} == ranks
    assert check_output_against_peft(case, tmp_path / "out") > 0


@pytest.mark.parametrize("case", [c for c in CONVERTIBLE if "rslora" in c])
def test_rslora_is_exact_with_alpha_equal_rank(case, tmp_path):
    meta = case_meta(case)
    assert meta["lora_config"].get("use_rslora")
    run_normalize(case, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] and config["use_rslora"] is False
    assert check_output_against_peft(case, tmp_path / "out") > 0


@pytest.mark.slow
def test_killed_subprocess_leaves_no_output(tmp_path):
    """A real interruption: SIGTERM while the writer is streaming leaves neither output nor temp folder."""
    import os
    import signal
    import subprocess
    import sys
    import time

    # A synthetic adapter big enough (~250 MB of output) that the write takes a while on any machine.
    H, I, layers, r = 2048, 5632, 8, 16
    tensors = {}
    g = torch.Generator().manual_seed(0)
    for layer in range(layers):
        for name, (inp, out) in {"gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}.items():
            tensors[f"base_model.model.model.layers.{layer}.mlp.{name}.lora_A.weight"] = torch.randn(
                r, inp, generator=g
            )
            tensors[f"base_model.model.model.layers.{layer}.mlp.{name}.lora_B.weight"] = torch.randn(
                out, r, generator=g
            )
    from helpers import write_adapter

    adapter = write_adapter(
        tmp_path / "big", tensors, {"r": r, "lora_alpha": r, "target_modules": ["gate_proj", "up_proj", "down_proj"]}
    )
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "architectures": ["LlamaForCausalLM"],
                "hidden_size": H,
                "intermediate_size": I,
                "num_hidden_layers": layers,
                "num_attention_heads": 16,
                "num_key_value_heads": 8,
                "vocab_size": 1000,
            }
        )
    )
    out = tmp_path / "out"
    cli = Path(sys.executable).parent / "lora-convert"
    proc = subprocess.Popen(
        [str(cli), "normalize", str(adapter), "-o", str(out), "--base", str(base), "--dtype", "fp32", "--rank", "512"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    temp = None
    while time.monotonic() < deadline and proc.poll() is None:
        temps = [p for p in tmp_path.iterdir() if p.name.startswith(".out.lora-convert-tmp")]
        if temps and (temps[0] / "adapter_model.safetensors").exists():
            temp = temps[0]
            break
        time.sleep(0.005)
    assert temp is not None, "the run finished before it could be interrupted"
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert not out.exists()
    assert not temp.exists()


def test_a_preset_standing_in_for_the_adapters_base_is_noted(tmp_path):
    """The adapter's Hub base id is one of a shipped preset's hub_ids: normalize plans against the preset, and says
    so (stderr, and `notes` in the JSON) as validate does with `base.preset`; a preset named by --base is no note."""
    from typer.testing import CliRunner

    from helpers import write_adapter
    from lora_convert.cli import app

    # One q_proj pair of Llama-3.1-8B's shapes (hidden 4096), named by the Hub id the preset lists.
    g = torch.Generator().manual_seed(0)
    folder = write_adapter(
        tmp_path / "adapter",
        {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 4096, generator=g),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(4096, 4, generator=g),
        },
        {"base_model_name_or_path": "meta-llama/Llama-3.1-8B"},
    )
    runner = CliRunner()
    human = runner.invoke(app, ["normalize", str(folder), "-o", str(tmp_path / "out")])
    assert human.exit_code == 0, human.output
    stderr = " ".join(human.stderr.split())
    assert "note: " in stderr and "meta-llama/Llama-3.1-8B" in stderr and "shipped preset llama-3.1-8b" in stderr
    assert "meta-llama/Llama-3.1-8B" not in human.stdout  # a log line, not data

    dry = runner.invoke(app, ["normalize", str(folder), "--dry-run", "--format", "json"])
    assert dry.exit_code == 0, dry.output
    [note] = json.loads(dry.stdout)["notes"]
    assert "meta-llama/Llama-3.1-8B" in note and "llama-3.1-8b" in note

    named = runner.invoke(app, ["normalize", str(folder), "--base", "llama-3.1-8b", "--dry-run", "--format", "json"])
    assert named.exit_code == 0, named.output
    assert json.loads(named.stdout)["notes"] == []
    assert "shipped preset" not in named.stderr
