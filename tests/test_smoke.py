"""The smoke forward: passes on every normalized fixture, and catches each kind of tampering by name."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from helpers import case_base_dir, case_dir, fixture_cases
from lora_convert.cli import app
from lora_convert.pipeline.commands import smoke as smoke_spec

SMOKE_CASES = [c for c in fixture_cases() if "dora" not in c and "vision" not in c]


def smoke(case, **kw):
    return smoke_spec(
        str(case_dir(case) / "adapter"), base=str(case_base_dir(case)), device=kw.pop("device", "cpu"), **kw
    )


@pytest.mark.slow
@pytest.mark.parametrize("case", SMOKE_CASES)
def test_smoke_passes_on_every_fixture(case):
    report = smoke(case)
    assert report.groups, "nothing was checked"
    failures = [
        (g.key, g.problems, [(s.name, s.problem) for s in g.slices if s.problem]) for g in report.groups if not g.ok
    ]
    assert report.ok, failures


def normalized(case, tmp_path):
    from lora_convert.pipeline.commands import normalize

    out = tmp_path / "stacked"
    normalize(str(case_dir(case) / "adapter"), out, base=str(case_base_dir(case)))
    return out


def tamper(out, edit):
    path = out / "adapter_model.safetensors"
    tensors = load_file(str(path))
    layout = json.loads((out / "lora_layout.json").read_text())
    edit(tensors, layout)
    save_file(tensors, str(path), metadata={"format": "pt"})


def smoke_stacked(case, out):
    return smoke_spec(
        str(out), original=str(case_dir(case) / "adapter"), base=str(case_base_dir(case)), device="cpu", layers="all"
    )


def failing(report):
    return {(g.key, s.name) for g in report.groups for s in g.slices if s.problem} | {
        (g.key, None) for g in report.groups if g.problems
    }


def first_group(layout, name):
    return next(g for g in layout["groups"] if g["group"] == name)


@pytest.mark.slow
def test_stacked_output_passes_with_original(tmp_path):
    case = "v5_deepseek_v3"
    out = normalized(case, tmp_path)
    report = smoke_stacked(case, out)
    assert report.ok and len(report.groups) == len(json.loads((out / "lora_layout.json").read_text())["groups"])


@pytest.mark.slow
def test_swapped_slices_are_caught(tmp_path):
    case = "v4_deepseek_v3"
    out = normalized(case, tmp_path)
    state = {}

    def swap(tensors, layout):
        g = first_group(layout, "gate_up_proj")
        gate, up = g["slices"]
        assert gate["out_features"] == up["out_features"]
        B = tensors[f"base_model.model.{g['key']}.lora_B.weight"]
        n = gate["out_features"]
        B[:n], B[n : 2 * n] = B[n : 2 * n].clone(), B[:n].clone()
        state["key"] = g["key"]

    tamper(out, swap)
    bad = failing(smoke_stacked(case, out))
    assert {(state["key"], "gate_proj"), (state["key"], "up_proj")} <= bad


@pytest.mark.slow
def test_doubled_scale_is_caught(tmp_path):
    case = "v4_deepseek_v3"
    out = normalized(case, tmp_path)
    state = {}

    def double(tensors, layout):
        g = first_group(layout, "fused_qkv_a_proj_with_mqa")
        kv = g["slices"][1]
        B = tensors[f"base_model.model.{g['key']}.lora_B.weight"]
        B[kv["out_offset"] : kv["out_offset"] + kv["out_features"]] *= 2
        state["key"] = g["key"]

    tamper(out, double)
    bad = failing(smoke_stacked(case, out))
    assert bad == {(state["key"], "kv_a_proj_with_mqa")}


@pytest.mark.slow
def test_expert_factors_from_the_neighbour_are_caught(tmp_path):
    case = "v4_deepseek_v3"
    out = normalized(case, tmp_path)
    state = {}

    def neighbour(tensors, layout):
        g = first_group(layout, "experts.gate_up_proj")
        A = tensors[f"base_model.model.{g['key']}.lora_A.weight"]
        A[1] = A[2].clone()
        state["key"] = g["key"]

    tamper(out, neighbour)
    bad = failing(smoke_stacked(case, out))
    assert {(state["key"], "gate_proj"), (state["key"], "up_proj")} <= bad
    assert all(key == state["key"] for key, _ in bad)


@pytest.mark.slow
def test_3d_b_read_expert_major_is_caught(tmp_path):
    """A normalizer that reads PEFT's rank-major 3-D B as expert-major passes every shape check."""
    from lora_convert.peft.adapter import load_adapter

    case = "v5_deepseek_v3"
    out = normalized(case, tmp_path)
    adapter = load_adapter(str(case_dir(case) / "adapter"))
    state = {}

    def expert_major(tensors, layout):
        g = first_group(layout, "experts.down_proj")
        (sl,) = g["slices"]
        source_b = next(k for k in sl["source"] if k.endswith("lora_B.weight"))
        b = torch.from_numpy(adapter.read(source_b))  # [out, r*E], rank-major on disk
        E, r = g["experts"], sl["rank"]
        wrong = b.reshape(b.shape[0], E, r).permute(1, 0, 2) * sl["scaling"]  # read as if expert-major
        B = tensors[f"base_model.model.{g['key']}.lora_B.weight"]
        B[:, :, :r] = wrong.to(B.dtype)
        state["key"] = g["key"]

    tamper(out, expert_major)
    assert (state["key"], "down_proj") in failing(smoke_stacked(case, out))


def test_zero_filled_slice_must_stay_untouched(tmp_path):
    case = "v5_deepseek_v3_q_a_only"
    out = normalized(case, tmp_path)
    state = {}

    def fill(tensors, layout):
        g = first_group(layout, "fused_qkv_a_proj_with_mqa")
        kv = g["slices"][1]
        assert kv["source"] is None
        B = tensors[f"base_model.model.{g['key']}.lora_B.weight"]
        R = layout["rank"]
        A = tensors[f"base_model.model.{g['key']}.lora_A.weight"]
        A[R : 2 * R] = 0.01
        B[kv["out_offset"] : kv["out_offset"] + kv["out_features"]] = 0.01
        state["key"] = g["key"]

    tamper(out, fill)
    assert (state["key"], "kv_a_proj_with_mqa") in failing(smoke_stacked(case, out))


def test_nan_never_passes(tmp_path):
    case = "v4_llama"
    out = normalized(case, tmp_path)

    def poison(tensors, layout):
        g = layout["groups"][0]
        tensors[f"base_model.model.{g['key']}.lora_B.weight"][0, 0] = float("nan")

    tamper(out, poison)
    assert not smoke_stacked(case, out).ok


@pytest.mark.slow
def test_cli_reports_and_exit_codes(tmp_path):
    case = "v4_llama"
    runner = CliRunner()
    ok = runner.invoke(
        app,
        [
            "smoke",
            str(case_dir(case) / "adapter"),
            "--base",
            str(case_base_dir(case)),
            "--device",
            "cpu",
            "--format",
            "json",
        ],
    )
    assert ok.exit_code == 0, ok.output
    doc = json.loads(ok.stdout)
    assert doc["ok"] and doc["interpreter"] and doc["tokens"] == 160
    out = normalized(case, tmp_path)
    tamper(out, lambda t, l: t[f"base_model.model.{l['groups'][0]['key']}.lora_B.weight"].mul_(3))
    bad = runner.invoke(
        app,
        [
            "smoke",
            str(out),
            "--original",
            str(case_dir(case) / "adapter"),
            "--base",
            str(case_base_dir(case)),
            "--device",
            "cpu",
        ],
    )
    assert bad.exit_code == 1 and "FAIL" in bad.stdout
    need_original = runner.invoke(app, ["smoke", str(out), "--device", "cpu"])
    assert need_original.exit_code == 2 and "--original" in need_original.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_cuda_without_gpu_is_an_environment_error():
    case = "v4_llama"
    result = CliRunner().invoke(
        app, ["smoke", str(case_dir(case) / "adapter"), "--base", str(case_base_dir(case)), "--device", "cuda"]
    )
    assert result.exit_code == 3 and "CUDA" in result.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", SMOKE_CASES)
def test_smoke_on_gpu(case):
    report = smoke(case, device="cuda", layers="all")
    assert report.device == "cuda" and not report.interpreter and report.ok


def _device_build_matches_normalize(case, sources_for):
    """The stacked tensors the GPU path builds from the source factors (smoke/device.py, torch) are byte for byte
    the ones normalize writes (convert/group_tensors.py, numpy), for every group and dtype of the fixture."""
    from lora_convert.convert.group_tensors import build_group_tensors, group_source_keys, output_dtype
    from lora_convert.pipeline.commands import plan_normalize
    from lora_convert.smoke.device import build_group_on_device
    from lora_convert.smoke.staging import to_torch

    plan = plan_normalize(str(case_dir(case) / "adapter"), base=str(case_base_dir(case)), drop_unsupported=True)
    checked = 0
    for tag in sorted({output_dtype(plan, "keep"), "F32", "BF16"}):
        for group in plan.groups:
            want_a, want_b = build_group_tensors(plan, group, tag, plan.adapter.read)
            sources = sources_for(plan, group_source_keys(group))
            got_a, got_b = build_group_on_device(plan, group, tag, sources)
            for key in group_source_keys(group):  # the build never writes into the sources the reference reads
                fresh = to_torch(plan.adapter.read(key))
                assert torch.equal(sources(key).cpu().view(torch.uint8), fresh.view(torch.uint8)), key
            for want, got in ((want_a, got_a), (want_b, got_b)):
                want_t = to_torch(want)
                assert got.dtype == want_t.dtype and tuple(got.shape) == tuple(want_t.shape), group.key
                # compared as raw bits: NaN == NaN, and -0.0 != 0.0
                bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[want_t.element_size()]
                assert torch.equal(got.cpu().view(bits), want_t.view(bits)), (case, tag, group.key)
            checked += 1
    assert checked


class _CpuSources:
    """DeviceSources' interface (`device`, key -> tensor) over CPU tensors: the build without a GPU."""

    device = "cpu"

    def __init__(self, plan, keys):
        from lora_convert.smoke.staging import to_torch

        self.tensors = {k: to_torch(plan.adapter.read(k)) for k in keys}

    def __call__(self, key):
        return self.tensors[key]


@pytest.mark.parametrize("case", SMOKE_CASES)
def test_device_build_equals_normalize_bytes(case):
    _device_build_matches_normalize(case, _CpuSources)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", SMOKE_CASES)
def test_device_build_on_gpu_equals_normalize_bytes(case):
    from lora_convert.smoke.device import DeviceSources
    from lora_convert.smoke.timer import PhaseTimer

    def sources_for(plan, keys):
        sources = DeviceSources(plan.adapter.index, plan.adapter.read, "cuda", PhaseTimer(cuda=True))
        sources.load(keys)
        return sources

    _device_build_matches_normalize(case, sources_for)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_smoke_copies_each_source_once():
    case = "v5_deepseek_v3"
    report = smoke(case, device="cuda", layers="all")
    from lora_convert.convert.group_tensors import group_source_keys
    from lora_convert.pipeline.commands import plan_normalize

    plan = plan_normalize(str(case_dir(case) / "adapter"), base=str(case_base_dir(case)), drop_unsupported=True)
    keys = {k for g in plan.groups for k in group_source_keys(g)}
    source_bytes = sum(plan.adapter.index.tensors[k].nbytes for k in keys)
    assert report.ok and "build" in report.phases
    # every source once (each padded to 64 bytes in the pinned buffer), and no stacked tensor on top
    assert source_bytes <= report.bytes_to_device <= source_bytes + 64 * len(keys)


def test_layers_that_select_nothing_are_refused_not_a_pass(tmp_path):
    """`--layers 1` on an adapter with LoRA on layer 0 only checked no group: that is never `PASS: 0/0`."""
    from helpers import write_adapter

    g = torch.Generator().manual_seed(0)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {
        f"{prefix}.lora_A.weight": torch.randn(4, 16, generator=g),
        f"{prefix}.lora_B.weight": torch.randn(16, 4),
    }
    adapter = write_adapter(tmp_path / "ad", tensors, {"target_modules": ["q_proj"]})
    base = tmp_path / "base"
    base.mkdir()
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 16,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 4,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "vocab_size": 100,
    }
    (base / "config.json").write_text(json.dumps(config))
    args = ["smoke", str(adapter), "--base", str(base), "--device", "cpu"]
    refused = CliRunner().invoke(app, [*args, "--layers", "1"])
    assert refused.exit_code == 2, refused.output
    assert "PASS" not in refused.stdout and "--layers" in refused.stderr and "0" in refused.stderr
    checked = CliRunner().invoke(app, [*args, "--layers", "0"])
    assert checked.exit_code == 0 and "PASS: 1/1" in checked.stdout, checked.output
