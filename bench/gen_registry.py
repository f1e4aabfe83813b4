"""A generated adapter registry for `lora-convert scan`: many small adapters of mixed families, a few planted defects
and a few large adapters, with a manifest of which adapter has which defect.

    .venv/bin/python bench/gen_registry.py /tmp/lc-registry                       # 1,000 small, ~5 % defects
    .venv/bin/python bench/gen_registry.py /tmp/lc-registry --large 3             # plus 3 large (~230 MB each)
    .venv/bin/python bench/gen_registry.py /tmp/small --count 40 --defect-rate 0.25

What it writes under OUT:

  bases/<base>/               the tiny base models of tests/fixtures/data (config.json + model.safetensors)
  adapters/<team>/<name>/     one PEFT adapter each; adapter_config.json's base_model_name_or_path is the absolute
                              path of its base under bases/, so `scan OUT/adapters` checks shapes with no --base
  manifest.json               {"adapters": {relative path: {"source", "family", "defect", "expect", "bytes"}}, ...}

Small adapters are the PEFT-written fixtures (tests/fixtures/data/cases) whose validate verdict is clean, each copy
with its own name and its own values: the factors are scaled by a seeded factor and carry seeded noise, so no two
adapters hold the same bytes (.bin fixtures are copied as they are). Large adapters are bench/gen_adapter.py's
DeepSeek-V3 per-expert / fused-3d adapters (base: the deepseek-v3 preset) of one or two MoE layers (171-460 MB, bf16).

Planted defects are the kinds the suite already builds (tests/test_hostile.py, tests/test_data_scan.py); `expect`
names the finding code that must appear for it. Every other adapter must come out with no error and no warning.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "data"

# Fixture cases that are not clean on their own: validate flags them (DoRA: config.dora; vision towers:
# modules.vision). DoRA comes back below as a planted defect (an unsupported variant, straight from PEFT).
NOT_CLEAN = {"v4_mixtral_dora", "v5_deepseek_v3_dora", "v5_llama_dora", "v5_kimi_k25_vision"}
DORA_SOURCES = ("v5_llama_dora", "v4_mixtral_dora", "v5_deepseek_v3_dora")

# defect kind -> the finding code validate must report for it.
DEFECTS = {
    "nan": "data.nan",  # one NaN in a lora_A
    "inf": "data.inf",  # one +Inf in a lora_B
    "zero-b": "data.zero-b",  # every lora_B all zeros (a never-trained adapter: a warning)
    "missing-b": "pairs.missing-B",  # one module's lora_B dropped
    "rank-mismatch": "rank.a-b-mismatch",  # one lora_A with one rank row fewer than its lora_B
    "rank-zero": "config.rank-not-positive",  # adapter_config.json: "r": 0
    "config-not-json": "config.unreadable",  # adapter_config.json cut in the middle
    "truncated": "files.unreadable",  # adapter_model.safetensors cut short
    "dora": "config.dora",  # a DoRA adapter as PEFT wrote it
}
TENSOR_DEFECTS = ("nan", "inf", "zero-b", "missing-b", "rank-mismatch")
TEAMS = ("search", "support", "ads", "code", "legal", "med", "fin", "edu", "games", "voice")
LARGE = (("per-expert", 1), ("fused-3d", 1), ("per-expert", 2))  # (layout, MoE layers): 230, 171, 460 MB


def clean_cases() -> list[str]:
    cases = sorted(p.name for p in (FIXTURES / "cases").iterdir() if (p / "adapter").is_dir())
    return [c for c in cases if c not in NOT_CLEAN]


def case_base(case: str) -> str:
    return json.loads((FIXTURES / "cases" / case / "case.json").read_text())["base"]


def family_of(case: str) -> str:
    # The fixtures' base folders are <env>_<family> (v4_mixtral, v5_deepseek_v3_noq, v4emu_kimi_k25).
    return case_base(case).split("_", 1)[1]


def load_tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def save_tensors(tensors: dict[str, np.ndarray], path: Path) -> None:
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def vary(tensors: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The same adapter with its own values: one scale for the whole adapter and ~1 % noise on every tensor, so the
    data checks (outliers are judged against the median of a factor kind) see the same picture as the original."""
    scale = np.float32(rng.uniform(0.5, 2.0))
    out = {}
    for key, t in tensors.items():
        if t.dtype.kind == "f" and t.size:
            noise = rng.standard_normal(t.shape).astype(t.dtype) * (np.float32(0.01) * np.abs(t).mean())
            t = (t * scale + noise).astype(t.dtype)
        out[key] = t
    return out


def plant(kind: str, tensors: dict[str, np.ndarray], rng: random.Random) -> None:
    """Apply a tensor-level defect to `tensors` in place."""
    keys = sorted(tensors)
    a_keys = [k for k in keys if ".lora_A." in k]
    b_keys = [k for k in keys if ".lora_B." in k]
    if kind == "nan":
        t = tensors[rng.choice(a_keys)]
        t.reshape(-1)[rng.randrange(t.size)] = np.nan
    elif kind == "inf":
        t = tensors[rng.choice(b_keys)]
        t.reshape(-1)[rng.randrange(t.size)] = np.inf
    elif kind == "zero-b":
        for k in b_keys:
            tensors[k] = np.zeros_like(tensors[k])
    elif kind == "missing-b":
        del tensors[rng.choice(b_keys)]
    elif kind == "rank-mismatch":
        # A 2-D lora_A [r, in] of a per-module (not 3-D expert) LoRA, one row short.
        k = rng.choice([k for k in a_keys if _per_module_a(k)])
        tensors[k] = np.ascontiguousarray(tensors[k][:-1])


def file_defect(kind: str, folder: Path) -> None:
    path = folder / "adapter_config.json"
    if kind == "rank-zero":
        cfg = json.loads(path.read_text())
        cfg["r"] = 0
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    elif kind == "config-not-json":
        text = path.read_text()
        path.write_text(text[: len(text) // 2])
    elif kind == "truncated":
        weights = folder / "adapter_model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) * 2 // 3])


def write_small(out: Path, rel: str, case: str, seed: int, defect: str | None, cache: dict) -> dict:
    src = FIXTURES / "cases" / case / "adapter"
    folder = out / "adapters" / rel
    folder.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str((out / "bases" / case_base(case)).resolve())
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    rng = random.Random(seed)
    st = src / "adapter_model.safetensors"
    if st.exists():
        if case not in cache:
            cache[case] = load_tensors(st)
        tensors = vary(cache[case], np.random.default_rng(seed))
        if defect in TENSOR_DEFECTS:
            plant(defect, tensors, rng)
        save_tensors(tensors, folder / "adapter_model.safetensors")
    else:
        for p in src.iterdir():
            if p.name != "adapter_config.json":
                shutil.copyfile(p, folder / p.name)
    if defect in ("rank-zero", "config-not-json", "truncated"):
        file_defect(defect, folder)
    return {
        "source": f"tests/fixtures/data/cases/{case}",
        "family": family_of(case),
        "defect": defect,
        "expect": DEFECTS[defect] if defect else None,
        "bytes": sum(p.stat().st_size for p in folder.iterdir()),
    }


def write_large(out: Path, rel: str, layout: str, layers: int, seed: int) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from gen_adapter import generate

    folder = out / "adapters" / rel
    info = generate(folder, layout, layers, "bf16", seed)
    return {
        "source": f"bench/gen_adapter.py --layout {layout} --moe-layers {layers} --seed {seed}",
        "family": "deepseek_v3",
        "defect": None,
        "expect": None,
        "bytes": info["bytes"] + (folder / "adapter_config.json").stat().st_size,
    }


def plan(count: int, defect_rate: float, seed: int) -> list[tuple[str, str, int, str | None]]:
    """(relative path, fixture case, seed, defect) of every small adapter: families round-robin, defects spread
    evenly over the kinds and placed at seeded positions."""
    rng = random.Random(seed)
    cases = clean_cases()
    n_bad = round(count * defect_rate)
    kinds = list(DEFECTS)
    defects = [kinds[i % len(kinds)] for i in range(n_bad)] + [None] * (count - n_bad)
    rng.shuffle(defects)
    rows = []
    for i, defect in enumerate(defects):
        case = DORA_SOURCES[i % len(DORA_SOURCES)] if defect == "dora" else cases[i % len(cases)]
        # Tensor defects and truncation are planted in safetensors files (not the .bin fixtures); rank-mismatch
        # needs a 2-D per-module lora_A, which fixtures with only 3-D expert factors lack.
        while defect in (*TENSOR_DEFECTS, "truncated") and not _plantable(case, defect):
            case = cases[(cases.index(case) + 1) % len(cases)]
        team = TEAMS[i % len(TEAMS)]
        rows.append((f"{team}/{case.split('_', 1)[1]}-{i:05d}", case, seed * 1_000_003 + i, defect))
    return rows


def _plantable(case: str, defect: str) -> bool:
    from lora_convert.io.tensor_files import read_safetensors_header

    path = FIXTURES / "cases" / case / "adapter" / "adapter_model.safetensors"
    if not path.exists():
        return False
    return defect != "rank-mismatch" or any(_per_module_a(k) for k in read_safetensors_header(path)[0])


def _per_module_a(key: str) -> bool:
    return ".lora_A." in key and "experts.lora_A" not in key and "base_layer" not in key


def generate_registry(out: Path, count: int = 1000, defect_rate: float = 0.05, large: int = 0, seed: int = 0) -> dict:
    out = out.resolve()
    if (out / "adapters").exists():
        raise SystemExit(f"{out}/adapters exists: pick an empty folder (the manifest must describe every adapter)")
    started = time.perf_counter()
    (out / "bases").mkdir(parents=True, exist_ok=True)
    for base in sorted({case_base(c) for c in clean_cases()} | {case_base(c) for c in DORA_SOURCES}):
        if not (out / "bases" / base).exists():
            shutil.copytree(FIXTURES / "bases" / base, out / "bases" / base)
    adapters: dict[str, dict] = {}
    cache: dict = {}
    for rel, case, s, defect in plan(count, defect_rate, seed):
        adapters[rel] = write_small(out, rel, case, s, defect, cache)
    for j, (layout, layers) in enumerate(LARGE[:large]):
        rel = f"large/deepseek-v3-{layout}-{layers}l-{j}"
        adapters[rel] = write_large(out, rel, layout, layers, seed + j)
    manifest = {
        "count": len(adapters),
        "defects": sum(1 for a in adapters.values() if a["defect"]),
        "bytes": sum(a["bytes"] for a in adapters.values()),
        "seed": seed,
        "codes": DEFECTS,
        "adapters": adapters,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return {k: manifest[k] for k in ("count", "defects", "bytes")} | {
        "out": str(out),
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="registry folder to write (outside the repository, e.g. /tmp/lc-registry)")
    p.add_argument("--count", type=int, default=1000, help="number of small adapters")
    p.add_argument("--defect-rate", type=float, default=0.05, help="share of small adapters with a planted defect")
    p.add_argument("--large", type=int, default=0, choices=range(len(LARGE) + 1), help="large adapters (171-460 MB)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(json.dumps(generate_registry(args.out, args.count, args.defect_rate, args.large, args.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
