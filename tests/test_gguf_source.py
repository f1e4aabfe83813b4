"""Reading a GGUF LoRA back as an adapter (lora_convert/peft/gguf_source.py): `normalize --layout gguf` and
llama.cpp's own convert_lora_to_gguf.py output, read against --base, give PEFT's own per-module deltas
(reference.safetensors, recorded by PEFT when it wrote the fixture); what cannot be mapped exactly is refused, named;
an adapter made for another base is the `gguf.base-mismatch` error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import helpers
from lora_convert.errors import AdapterFormatError, UnsupportedAdapterError, UsageError

gguf = pytest.importorskip("gguf")

CASES = [
    "v5_llama",
    "v5_qwen3",
    "v5_phi3",
    "v4_mixtral",
    "v5_olmo3",
    "v5_seed_oss",
    "v5_glm4",
    "v5_granitemoe",
    "v5_gpt_oss",
    "v5_ministral3",
    # make_fixtures.py issue26_gguf_cases (outside_proof/)
    "v5_gemma3_text_gguf",
    "v5_granitemoehybrid_gguf",
    "v5_gemma4_text_gguf",
]
# transformers 5's 3-D experts: PEFT records one delta per 3-D parameter; the file reads back per expert
EXPERT_3D_CASES = [
    "v5_glm4_moe_experts",
    "v5_gpt_oss_experts",
    "v5_qwen3_moe_sparse",
    "v5_qwen2_moe_sparse",
    "v5_olmoe_mha",
    "v5_deepseek_v3_experts_down_only",
    "v5_deepseek_v3_experts_gate_up_only",
    "v5_dots1_mha",
    "v5_ernie4_5_moe_gguf",
    "v5_minimax_m2_gguf",
    "v5_lfm2_moe_gguf",
    "v5_jamba",
    # not v5_nemotron_h_gguf: the reader does not undo the converter's renames (gguf_architectures.json path_renames)
    # and refuses its shared-expert and attention tensors, named
]


def case_dir(case: str) -> Path:
    """A fixture case's folder: cases/, or outside_proof/ (issue26_gguf_cases: outside the engine proof)."""
    inside = helpers.case_dir(case)
    return inside if inside.is_dir() else helpers.FIXTURES / "outside_proof" / case


def case_base_dir(case: str) -> Path:
    return helpers.FIXTURES / "bases" / json.loads((case_dir(case) / "case.json").read_text())["base"]


def write_gguf(case: str, out: Path) -> Path:
    import lora_convert

    lora_convert.normalize_adapter(case_dir(case) / "adapter", out, base=case_base_dir(case), layout="gguf")
    return out / "adapter.gguf"


def worst_delta_error(adapter_spec, case: str, *, dense_only: bool = False) -> float:
    """The largest relative difference between the read adapter's per-module deltas (B A scaling) and PEFT's."""
    from lora_convert.pipeline.prepared import prepare

    adapter = prepare(adapter_spec, base=str(case_base_dir(case))).adapter
    reference = load_file(str(case_dir(case) / "reference.safetensors"))
    want_modules = {k.split("::")[0] for k in reference if k.endswith("::delta_weight")}
    modules = adapter.modules
    if not dense_only:
        assert {m.module for m in modules} == want_modules
    else:  # only the modules PEFT recorded 2-D deltas for; the others are per-expert blocks of 3-D ones
        modules = [m for m in modules if m.module in want_modules and reference[f"{m.module}::delta_weight"].ndim == 2]
    worst = 0.0
    for m in modules:
        delta = adapter.index.read(m.lora_B.key) @ adapter.index.read(m.lora_A.key) * m.scaling
        want = reference[f"{m.module}::delta_weight"]
        assert float(np.abs(want).max()) > 0, m.module
        worst = max(worst, float(np.abs(delta - want).max() / np.abs(want).max()))
    return worst


@pytest.fixture(scope="module")
def llama_file(tmp_path_factory) -> Path:
    """v5_llama written by `normalize --layout gguf` (q/k rows reordered for llama.cpp)."""
    return write_gguf("v5_llama", tmp_path_factory.mktemp("gguf") / "out")


def rewrite(src: Path, dst: Path, *, architecture: str | None = None, extra: dict | None = None, tensors=()) -> Path:
    """A copy of the GGUF file `src` (written by the tool) with another architecture, extra metadata or extra tensors."""
    reader = gguf.GGUFReader(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    writer = gguf.GGUFWriter(dst, architecture or fields["general.architecture"])
    for key, value in {**fields, **(extra or {})}.items():
        if key == "general.architecture":
            continue
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data))
    for name, array in tensors:
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


@pytest.mark.slow  # three normalize runs (~1 s on 2 cores)
@pytest.mark.parametrize("case", CASES)
def test_gguf_round_trip_reproduces_peft_deltas(case, tmp_path):
    """PEFT -> --layout gguf -> read back: every module's delta is PEFT's; -> --layout peft: the same files as
    --layout peft of the original."""
    import lora_convert

    written = write_gguf(case, tmp_path / "gguf")
    assert worst_delta_error(written.parent, case) <= 1e-6
    lora_convert.normalize_adapter(written, tmp_path / "back", base=case_base_dir(case), layout="peft")
    lora_convert.normalize_adapter(
        case_dir(case) / "adapter", tmp_path / "direct", base=case_base_dir(case), layout="peft"
    )
    back, direct = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("back", "direct"))
    assert sorted(back) == sorted(direct)
    for key, want in direct.items():
        np.testing.assert_allclose(back[key], want, rtol=0, atol=1e-6 * float(np.abs(want).max()), err_msg=key)
    configs = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("back", "direct")]
    assert {k: configs[0][k] for k in ("r", "lora_alpha")} == {k: configs[1][k] for k in ("r", "lora_alpha")}


@pytest.mark.parametrize("case", EXPERT_3D_CASES)
def test_stacked_experts_read_back_write_the_same_file(case, tmp_path):
    """PEFT -> --layout gguf -> read back (each stacked ffn_*_exps pair as per-expert modules) -> --layout gguf:
    the same tensors (llama.cpp reproduces PEFT's logits from the first file: tests/test_gguf_proof.py); the 2-D
    modules' deltas are PEFT's."""
    import lora_convert

    written = write_gguf(case, tmp_path / "gguf")
    assert worst_delta_error(written.parent, case, dense_only=True) <= 1e-6
    lora_convert.normalize_adapter(written, tmp_path / "again", base=case_base_dir(case), layout="gguf")
    first, again = (gguf.GGUFReader(p) for p in (written, tmp_path / "again" / "adapter.gguf"))
    want = {t.name: np.array(t.data) for t in first.tensors}
    got = {t.name: np.array(t.data) for t in again.tensors}
    assert sorted(got) == sorted(want) and any("_exps." in name for name in want)
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=0, atol=1e-6 * float(np.abs(value).max()), err_msg=name)


def test_a_tensor_llama_cpp_never_applies_is_refused_on_read(tmp_path):
    """A deepseek2 file with an attn_q_a pair (llama.cpp's graph multiplies by attn_q_a without LoRA): refused,
    with the reason, rather than read as a module llama.cpp never applied."""
    from lora_convert.pipeline.prepared import prepare

    case = "v5_deepseek_v3_experts_down_only"
    written = write_gguf(case, tmp_path / "gguf")
    q_a = [("blk.1.attn_q_a.weight.lora_a", np.ones((8, 48), np.float32))]
    q_a.append(("blk.1.attn_q_a.weight.lora_b", np.ones((32, 8), np.float32)))
    extra = rewrite(written, tmp_path / "q.gguf", tensors=q_a)
    with pytest.raises(
        UnsupportedAdapterError, match=r"blk\.1\.attn_q_a\.weight\.lora_a \(llama.cpp's deepseek2 graph"
    ):
        prepare(extra, base=str(case_base_dir(case)))


def test_b_rows_the_writer_scaled_are_refused_on_read(tmp_path):
    """Falcon-H1: the writer multiplies B's rows by the muP factors llama.cpp's converter folds into the weights; the
    reader does not divide them back, so those tensors are refused, named, rather than read as other deltas."""
    from lora_convert.pipeline.prepared import prepare

    case = "v5_falcon_h1_gguf"
    written = write_gguf(case, tmp_path / "gguf")
    with pytest.raises(
        UnsupportedAdapterError, match=r"blk\.0\.ssm_in\.weight\.lora_a \(lora-convert does not read back"
    ):
        prepare(written, base=str(case_base_dir(case)))


@pytest.mark.gguf
@pytest.mark.slow  # llama.cpp's converter in a subprocess (~4-7 s each on 2 cores)
@pytest.mark.parametrize("case", ["v5_llama", "v5_phi3", "v4_mixtral"])
def test_llama_cpps_own_converter_output_reads_back_to_peft_deltas(case, tmp_path):
    """The real tool: convert_lora_to_gguf.py (llama.cpp vendored in llama-cpp-python 0.3.36, alpha = lora_alpha,
    per-module r) on the PEFT fixture; read back, each module's delta is PEFT's."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "gguf_proof"))
    import llama_cpp_build

    try:
        tree = llama_cpp_build.wait_for_build(45 * 60) / "llama.cpp"
    except RuntimeError as exc:
        if os.environ.get("LORA_CONVERT_REQUIRE_PROOF"):
            pytest.fail(f"needs llama.cpp built (LORA_CONVERT_REQUIRE_PROOF=1): {exc}")
        pytest.skip(f"llama.cpp could not be built here (`make llama-cpp` says why): {exc}"[:500])
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").symlink_to(case_base_dir(case) / "config.json")
    out = tmp_path / "theirs.gguf"
    cmd = [sys.executable, str(tree / "convert_lora_to_gguf.py"), "--base", str(hf), "--outtype", "f32"]
    proc = subprocess.run(
        [*cmd, "--outfile", str(out), str(case_dir(case) / "adapter")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert worst_delta_error(out, case) <= 1e-6


def test_unpermute_undoes_the_writers_row_order():
    from lora_convert.convert.gguf_layout import _permute_rows
    from lora_convert.peft.gguf_source import unpermute_rows

    b = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)
    for heads in (1, 2, 4, 8):
        assert not heads > 1 or not np.array_equal(_permute_rows(b, heads), b)
        np.testing.assert_array_equal(unpermute_rows(_permute_rows(b, heads), heads), b)


def test_detection_a_file_or_a_folder_with_one_adapter_gguf(llama_file, tmp_path):
    from lora_convert.peft.gguf_source import gguf_adapter_file

    assert gguf_adapter_file(llama_file) == llama_file
    assert gguf_adapter_file(llama_file.parent) == llama_file
    assert gguf_adapter_file(case_dir("v5_llama") / "adapter") is None  # PEFT's folder
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (two / name).write_bytes(llama_file.read_bytes())
    assert gguf_adapter_file(two) is None  # which one is meant is not for lora-convert to guess


def test_without_base_is_a_usage_error(llama_file):
    from lora_convert.pipeline.prepared import prepare

    with pytest.raises(UsageError, match="GGUF LoRA adapter") as raised:
        prepare(llama_file)
    assert "Pass --base" in raised.value.hint


def test_a_gguf_that_is_no_lora_adapter_is_refused(llama_file, tmp_path):
    from lora_convert.pipeline.prepared import prepare

    model = rewrite(llama_file, tmp_path / "model.gguf", extra={"general.type": "model"})
    with pytest.raises(AdapterFormatError, match="not a GGUF LoRA adapter"):
        prepare(model, base=str(case_base_dir("v5_llama")))


def test_activated_lora_is_refused_named(llama_file, tmp_path):
    from lora_convert.pipeline.prepared import prepare

    alora = rewrite(llama_file, tmp_path / "a.gguf", extra={"adapter.alora.invocation_tokens": 5})
    with pytest.raises(UnsupportedAdapterError, match="adapter.alora.invocation_tokens"):
        prepare(alora, base=str(case_base_dir("v5_llama")))


def test_a_tensor_no_base_module_answers_to_is_refused_named(llama_file, tmp_path):
    from lora_convert.pipeline.prepared import prepare

    norm = [("blk.0.attn_norm.weight.lora_a", np.ones((8, 48), np.float32))]
    norm.append(("blk.0.attn_norm.weight.lora_b", np.ones((48, 8), np.float32)))
    extra = rewrite(llama_file, tmp_path / "n.gguf", tensors=norm)
    with pytest.raises(UnsupportedAdapterError, match=r"blk\.0\.attn_norm\.weight\.lora_a \(no single base module\)"):
        prepare(extra, base=str(case_base_dir("v5_llama")))


def test_a_base_without_proven_llama_cpp_names_is_refused(llama_file):
    from lora_convert.pipeline.prepared import prepare

    with pytest.raises(UnsupportedAdapterError, match="has not proven llama.cpp's names"):
        prepare(llama_file, base=str(case_base_dir("v5_llama4_text")))


@pytest.mark.slow  # a validate run (~0.5 s)
def test_another_architecture_is_a_base_mismatch_error(llama_file, tmp_path):
    import lora_convert

    qwen = rewrite(llama_file, tmp_path / "q" / "adapter.gguf", architecture="qwen3", extra={"qwen3.block_count": 9})
    report = lora_convert.validate_adapter(qwen.parent, base=case_base_dir("v5_llama"), smoke=False)
    found = {(f.code, str(f.actual)) for f in report.findings}
    assert ("gguf.base-mismatch", "qwen3") in found and ("gguf.base-mismatch", "9") in found
    assert not report.ok
    with pytest.raises(UnsupportedAdapterError, match="qwen3"):
        lora_convert.normalize_adapter(qwen, tmp_path / "o", base=case_base_dir("v5_llama"), layout="peft")
    good = lora_convert.validate_adapter(llama_file, base=case_base_dir("v5_llama"), smoke=False)
    assert good.ok and not [f for f in good.findings if f.code.startswith("gguf.")]
