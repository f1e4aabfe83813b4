"""The GGUF proof: lora-convert's `--layout gguf` output, loaded by llama.cpp itself, reproduces PEFT's logits.

For each case: the fixture's tiny base is converted to GGUF (f32) by llama.cpp's own `convert_hf_to_gguf.py` (from
the llama-cpp-python sdist, tests/gguf_proof/llama_cpp_build.py), with the smallest valid tokenizer beside it (a
SentencePiece model trained here on synthetic words: the converter needs one, the logits never see it); the
fixture's PEFT adapter is written with `normalize --layout gguf`; llama.cpp (llama-cpp-python, f32 KV cache, in a
subprocess: tests/gguf_proof/run_llama.py) runs both on the fixture's input_ids, and its logits are compared with
PEFT's recorded ones (tests/fixtures/README.md, `logits::adapted`). Exact means a maximum relative error within
1e-4. Cross-check: llama.cpp's own `convert_lora_to_gguf.py` on the same adapter, run the same way, gives the same
logits as our file. A case lora-convert refuses is listed with its reason.

`python tests/gguf_proof/proof.py [--write docs/formats.md]` runs every case and prints (or rewrites) the GGUF table
of docs/formats.md; tests/test_gguf_proof.py runs the same cases and compares the table.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

import lora_convert
from lora_convert.errors import LoraConvertError
from lora_convert.text import generated_doc_main, replace_generated_section

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import llama_cpp_build  # noqa: E402  (this folder is not a package on every import path)

DATA = HERE.parent / "fixtures" / "data"
DOC = HERE.parent.parent / "docs" / "formats.md"
RELEASED_KEYS = HERE / "released_config_keys.json"  # config keys released checkpoints carry (see its _note)
TOLERANCE = 1e-4  # relative: max |logits - reference| / max |reference|
SECTION = ("<!-- gguf-proof -->\n", "<!-- /gguf-proof -->")  # the markers of the GGUF table in docs/formats.md
# The fixture cases of the families lora-convert writes for llama.cpp (lora_convert/convert/gguf_architectures.json),
# then ones that test a refusal: DoRA, trainable tokens, bases llama.cpp cannot take, modules llama.cpp never applies
# LoRA to, and families not proven (gguf_architectures.json `not_proven` says why).
PROVEN = (
    "v5_llama",
    "v4_llama",
    "v5_llama_rslora",
    "v5_llama_regex",
    "v5_qwen3",
    "v5_phi3",
    "v4_mixtral",
    "v5_mixtral",
    "v5_ministral3",
    "v5_olmo3",
    "v5_seed_oss",
    "v5_glm4",
    "v5_glm4_moe",
    "v5_glm4_moe_experts",
    "v5_granitemoe",
    "v5_gpt_oss",
    "v5_gpt_oss_experts",
    "v5_qwen3_moe_sparse",
    "v5_qwen2_moe_sparse",
    "v5_olmoe_mha",
    "v5_deepseek_v3_experts_down_only",
    "v5_deepseek_v3_experts_gate_up_only",
    "v5_deepseek_v3_gguf",
    "v5_qwen3_next_gguf",
    # bases in the form llama.cpp takes, beside the issue-14/25 ones it cannot (refused below); in
    # fixtures/data/outside_proof/ (make_fixtures.py issue26_gguf_cases)
    "v5_dots1_mha",
    "v5_ernie4_5_moe_gguf",
    "v5_nemotron_h_gguf",
    "v5_granitemoehybrid_gguf",
    "v5_minimax_m2_gguf",
    "v5_gemma3_text_gguf",
    # issue-25 families: LFM2-MoE, Falcon-H1 and Gemma-4 on bases in their released form (make_fixtures.py
    # issue26_gguf_cases), Jamba on its issue-25 case
    "v5_lfm2_moe_gguf",
    "v5_falcon_h1_gguf",
    "v5_gemma4_text_gguf",
    "v5_jamba",
)
REFUSED = (
    "v5_llama_dora",
    "v5_llama_trainable_tokens",
    "v5_qwen3_moe",
    "v5_qwen2_moe",
    "v5_olmoe",
    "v5_deepseek_v3",
    "v5_qwen3_next",
    "v5_granitemoe_experts",
    "v5_gemma3_text",
    "v5_glm4_moe_lite",
    "v5_llama4_text",
    "v5_minimax",
    "v5_minimax_m2",
    "v5_nemotron_h",
    "v5_granitemoehybrid",
    "v5_dots1",
    "v5_ernie4_5_moe",
    "v5_lfm2_moe",
    "v5_falcon_h1",
    "v5_gemma4_text",
    # families whose llama.cpp conversion nothing proves yet (gguf_architectures.json does not list them; its
    # not_proven says why where known: llama.cpp's converter lacks the architecture, or PyPI's gguf does)
    "v5_phimoe",
    "v5_exaone_moe",
    "v5_glm_moe_dsa",
    "v5_mistral4",
    "v5_mistral_large4",
    "v5_deepseek_v4",
    "v5_olmo_hybrid",
    "v5_qwen3_omni_moe",
    "v5_kimi_linear",
    "v5_hy_v3",
    "v5_bailing_hybrid",
)
CASES = PROVEN + REFUSED
# why llama.cpp's own convert_lora_to_gguf.py gives other logits than PEFT's (and ours) on a case, as measured
CROSS_DIFFERS = {
    "v5_llama_rslora": "it reads lora_alpha only",
    # its lora_b rows of q_proj/k_proj are written in transformers' order, the base's reordered by the RoPE
    # permutation (conversion/llama.py:260-264); permuted once more they equal ours
    "v5_granitemoehybrid_gguf": "its attn_q/attn_k lora_b rows are not reordered as the base's",
}


@dataclass(frozen=True)
class Row:
    family: str
    case: str
    direction: str
    outcome: str
    exact: bool | None  # None: refused by lora-convert (with its reason in `outcome`)
    error: float | None = None  # max relative error against PEFT
    cross: float | None = None  # max relative difference from llama.cpp's own convert_lora_to_gguf.py output
    effect: float | None = None  # how far the adapter moves PEFT's logits (relative): what the error is small against


def llama_cpp_tree() -> Path:
    tree = llama_cpp_build.llama_cpp_tree()
    if tree is None:
        raise RuntimeError("llama.cpp is not built: run `make llama-cpp` (tests/gguf_proof/llama_cpp_build.py)")
    return tree


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def tiny_tokenizer(dest: Path) -> None:
    """A SentencePiece model (BPE, 64 pieces, identity normalization) at dest: what convert_hf_to_gguf.py reads for a
    Llama, Qwen or Phi-3 vocabulary; the converter pads it to the config's vocab_size with [PAD] tokens."""
    import sentencepiece as spm

    words = [" ".join(f"w{i}{j}" for j in range(20)) for i in range(200)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(words),
        model_writer=model,
        vocab_size=64,  # at most the config's vocab_size (Phi-3's converter does not truncate)
        model_type="bpe",
        # looked up by text when llama.cpp loads the vocabulary: the newline byte piece (any SPM vocabulary) and, for a
        # model named like Phi-3, <|endoftext|> (vendor/llama.cpp src/llama-vocab.cpp:3118-3127)
        user_defined_symbols=["<0x0A>", "<|endoftext|>"],
        character_coverage=1.0,
        normalization_rule_name="identity",
        minloglevel=2,
        num_threads=1,
    )
    dest.write_bytes(model.getvalue())


def base_gguf(base: str, work: Path) -> tuple[Path, Path]:
    """(the HF folder with a tokenizer, the GGUF f32 that convert_hf_to_gguf.py made of it), made once per base."""
    hf, out = work / "hf" / base, work / "gguf" / f"{base}.gguf"
    if out.exists():
        return hf, out
    shutil.rmtree(hf, ignore_errors=True)  # an earlier attempt that failed
    hf.mkdir(parents=True)
    os.symlink(DATA / "bases" / base / "model.safetensors", hf / "model.safetensors")
    config = json.loads((DATA / "bases" / base / "config.json").read_text())
    released = json.loads(RELEASED_KEYS.read_text())["model_types"].get(config.get("model_type"), {})
    (hf / "config.json").write_text(json.dumps({**config, **released.get("keys", {})}, indent=2))
    tiny_tokenizer(hf / "tokenizer.model")
    out.parent.mkdir(exist_ok=True)
    tree = llama_cpp_tree()
    cmd = [sys.executable, str(HERE / "convert_base.py"), str(tree), str(hf), "--outtype", "f32", "--outfile", str(out)]
    _run(cmd, f"convert_hf_to_gguf.py on {base}")
    return hf, out


def llama_logits(model: Path, lora: Path | None, ids: list[int], work: Path) -> np.ndarray:
    """llama.cpp's logits of every position (run_llama.py, in its own process: a crash is an exit status here)."""
    out = work / "logits.npy"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(HERE / "run_llama.py"), str(model), str(lora or "-"), ",".join(map(str, ids)), str(out)]
    site = llama_cpp_build.site_dir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        raise RuntimeError(f"llama.cpp on {model.name} + {lora and lora.name} failed ({how}):\n{proc.stderr[-2000:]}")
    return np.load(out)


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def case_dir(case: str) -> Path:
    """A fixture case's folder: cases/, or outside_proof/ (cases the engine proof does not run)."""
    inside = DATA / "cases" / case
    return inside if inside.is_dir() else DATA / "outside_proof" / case


def family_of(case: str) -> str:
    """The schema family the case's base binds to."""
    from lora_convert.arch.base_config import config_from_mapping
    from lora_convert.arch.schema import bind

    meta = json.loads((case_dir(case) / "case.json").read_text())
    config = json.loads((DATA / "bases" / meta["base"] / "config.json").read_text())
    return bind(config_from_mapping(config)).family


def prove(case: str, work: Path) -> Row:
    """One case, PEFT -> GGUF (see the module docstring)."""
    meta = json.loads((case_dir(case) / "case.json").read_text())
    family = family_of(case)
    direction = "PEFT -> GGUF"
    adapter = case_dir(case) / "adapter"
    base_dir = DATA / "bases" / meta["base"]
    out = work / "out" / case
    shutil.rmtree(out, ignore_errors=True)
    try:
        lora_convert.normalize_adapter(adapter, out, base=base_dir, layout="gguf")
    except LoraConvertError as exc:
        reason = exc.message if len(exc.message) <= 600 else exc.message[:597] + "..."
        return Row(family, case, direction, f"refused: {reason}", None)
    hf, model = base_gguf(meta["base"], work)
    ref = load_file(str(case_dir(case) / "reference.safetensors"))
    ids = [int(t) for t in ref["logits::input_ids"].reshape(-1)]
    want = ref["logits::adapted"].reshape(len(ids), -1)
    base_error = rel_error(llama_logits(model, None, ids, work), ref["logits::base"].reshape(len(ids), -1))
    got = llama_logits(model, out / "adapter.gguf", ids, work)
    error = rel_error(got, want)
    cross = _cross_check(adapter, hf, got, ids, model, work)
    exact = error <= TOLERANCE and base_error <= TOLERANCE
    outcome = f"exact (max rel err < {_bound(error)})" if exact else f"MISMATCH (max rel err {error:.1e})"
    if cross is None:
        outcome += "; convert_lora_to_gguf.py refuses this adapter"
    elif cross == math.inf:
        outcome += "; llama.cpp does not load convert_lora_to_gguf.py's file"
    elif cross > 1e-5:
        why = CROSS_DIFFERS.get(case, "not explained")
        outcome += f"; convert_lora_to_gguf.py's file differs (max rel {cross:.0e}): {why}"
    effect = rel_error(want, ref["logits::base"].reshape(len(ids), -1))
    return Row(family, case, direction, outcome, exact, error, cross, effect)


def _cross_check(adapter: Path, hf: Path, ours: np.ndarray, ids: list[int], model: Path, work: Path) -> float | None:
    """The max relative difference between our file's logits and those of llama.cpp's own convert_lora_to_gguf.py
    output; None where that converter refuses the adapter, inf where llama.cpp does not load what it wrote."""
    theirs = work / "theirs.gguf"
    tree = llama_cpp_tree()
    cmd = [sys.executable, str(tree / "convert_lora_to_gguf.py"), "--base", str(hf), "--outtype", "f32"]
    proc = subprocess.run([*cmd, "--outfile", str(theirs), str(adapter)], capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    try:
        return rel_error(llama_logits(model, theirs, ids, work), ours)
    except RuntimeError:  # written, but llama.cpp does not load it (run_llama.py's exit 3)
        return math.inf


def _bound(error: float) -> str:
    """The power of ten just above `error` (1e-06): a table that does not change with the last digits."""
    return f"{10.0 ** math.ceil(math.log10(error)):.0e}" if error > 0 else "1e-12"


def table(rows: list[Row]) -> str:
    lines = ["| family | fixture | direction | outcome |", "|---|---|---|---|"]
    lines += [f"| {r.family} | {r.case} | {r.direction} | {r.outcome.replace('|', '/')} |" for r in rows]
    return "\n".join(lines) + "\n"


def all_rows(work: Path) -> list[Row]:
    return [prove(case, work) for case in CASES]


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="gguf-proof-") as work:
        rows = all_rows(Path(work))
    for r in rows:
        print(f"{r.case}: error {r.error} cross {r.cross} effect {r.effect}", file=sys.stderr)
    text = table(rows)
    return generated_doc_main(
        argv,
        lambda: text,
        lambda doc: replace_generated_section(doc, *SECTION, text),
        "python tests/gguf_proof/proof.py [--write docs/formats.md]",
    )


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
