"""The base model's quantization and its checkpoint index: what `validate` says about the base itself.

Two things, both from config and headers only:

- `quantization_findings`: the base's `quantization_config` (top level or inside the wrapper's text config) read
  through lora_convert/arch/quantization.json, reported per module family as the info finding `quant.scheme`
  (`quant.unknown-scheme` for a scheme lora-convert does not know). LoRA shapes stay the logical ones whatever the
  storage, so nothing else changes.
- `checkpoint_findings`: when the base is a local folder or a Hub cache snapshot holding `model.safetensors` or
  `model.safetensors.index.json` + shards, every shard's HEADER is read (no tensor data), one shard at a time, and
  each tensor that the architecture schema knows is checked: a quantized one through its scheme's stored form
  (packed int32, fp4 blocks, ...) mapped back to the logical shape, a plain one as [out, in]. A disagreement is
  `base.checkpoint-shape`; a shard the index names that is not there is `base.checkpoint-missing-shard`; a header
  that cannot be read is `base.checkpoint-unreadable`. Memory stays bounded by one shard's header (the index of a
  DeepSeek-V3-size checkpoint names ~90,000 tensors over 163 shards; only counts and a few examples are kept).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lora_convert.arch.quantization import BaseQuantization, base_quantization
from lora_convert.codes import finding
from lora_convert.errors import LoraConvertError
from lora_convert.findings import Finding
from lora_convert.io.small_files import read_small_json
from lora_convert.io.tensor_files import read_safetensors_header

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_EXAMPLES = 5
MAX_KEYS = 50
# suffixes of tensors that are never a module's weight: nothing to check
_NOT_WEIGHTS = ("bias", "e_score_correction_bias")


def base_findings(base_cfg, arch) -> list[Finding]:
    """Every finding about the base itself: its quantization (quant.*) and its checkpoint index (base.checkpoint-*)."""
    if base_cfg is None:
        return []
    quant = base_quantization(base_cfg.config, getattr(arch, "config", None) or base_cfg.text_config)
    checked, problems = checkpoint_findings(base_cfg, arch, quant)
    return quantization_findings(quant, arch, checked.summary()) + problems


def quantization_findings(quant: BaseQuantization | None, arch, summary: str = "") -> list[Finding]:
    """`quant.scheme` (or `quant.unknown-scheme`) for a quantized base; nothing for an unquantized one."""
    if quant is None:
        return []
    if not quant.known:
        return [
            finding(
                "quant.unknown-scheme",
                f"The base is quantized with quant_method {quant.method!r} ({quant.where}), a scheme "
                "lora-convert does not describe: the adapter is checked against the logical shapes, and the "
                "checkpoint's quantized tensors are not mapped back to them.",
                keys=[quant.where],
                actual=quant.method,
            )
        ]
    parts = []
    if arch is not None:
        for kind, texts in quant.families(arch).items():
            parts.append(f"{kind.replace('_', ' ')}: {' / '.join(texts)}")
    per_family = "; ".join(parts) if parts else "the family has no schema, so modules are not classified"
    message = (
        f"Base quantized ({quant.label}; {quant.where}). Per module family: {per_family}. LoRA is trained and "
        "checked against the logical (dequantized) shapes; `--engine` says what each engine does with LoRA over "
        "this scheme."
    )
    if summary:
        message += " " + summary
    return [
        finding(
            "quant.scheme",
            message,
            keys=[quant.where],
            actual=quant.label,
            expected="logical shapes",
            fix=("Sources: " + " | ".join(quant.sources)) if quant.sources else None,
        )
    ]


# --------------------------------------------------------------------------------------------- the checkpoint
@dataclass
class CheckpointCheck:
    files: list[Path] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    tensors: int = 0
    checked: int = 0
    quantized: int = 0
    wrong: list[str] = field(default_factory=list)  # messages, at most MAX_EXAMPLES
    wrong_keys: list[str] = field(default_factory=list)
    wrong_count: int = 0

    def summary(self) -> str:
        if not self.files and not self.missing:
            return ""
        return (
            f"Checkpoint index: {self.checked} of {self.tensors} tensor(s) in {len(self.files)} shard(s) checked "
            f"against the schema ({self.quantized} quantized, mapped back to logical shapes)."
        )


def checkpoint_files(folder: Path | None) -> tuple[list[Path], list[str], str | None]:
    """(shards present, shard names missing, why the index could not be read) of a base folder."""
    if folder is None or not folder.is_dir():
        return [], [], None
    index = folder / INDEX_FILE
    if index.is_file():
        try:  # a FIFO, an LFS pointer, bad or too deeply nested JSON, not an object: the reader's one message
            doc = read_small_json(index, LoraConvertError)
        except LoraConvertError as exc:
            return [], [], f"shard index cannot be read: {exc.message.rstrip('.')}"
        weight_map = doc.get("weight_map")
        if not isinstance(weight_map, dict):
            return [], [], f"shard index {index} has no `weight_map` object of tensor -> shard file"
        names = sorted({str(v) for v in weight_map.values()})
        present, missing = [], []
        for name in names:
            path = folder / name
            if "/" in name or "\\" in name or name.startswith("."):  # stay inside the folder
                missing.append(name)
            elif path.is_file():
                present.append(path)
            else:
                missing.append(name)
        return present, missing, None
    single = folder / SINGLE_FILE
    return ([single] if single.is_file() else []), [], None


def checkpoint_findings(base_cfg, arch, quant: BaseQuantization | None) -> tuple[CheckpointCheck, list[Finding]]:
    folder = getattr(base_cfg, "folder", None) if base_cfg is not None else None
    files, missing, why = checkpoint_files(folder)
    result = CheckpointCheck(files=files, missing=missing)
    out: list[Finding] = []
    if why:
        out.append(finding("base.checkpoint-unreadable", f"The base's {why}.", keys=[INDEX_FILE]))
    if missing:
        out.append(
            finding(
                "base.checkpoint-missing-shard",
                f"{INDEX_FILE} in {folder} names {len(missing)} shard(s) that are not there "
                f"({', '.join(missing[:MAX_EXAMPLES])}{' ...' if len(missing) > MAX_EXAMPLES else ''}): an engine "
                "cannot load this base, and the tensors in them were not checked.",
                keys=missing[:MAX_KEYS],
                expected="every shard of the index",
                actual=f"{len(missing)} missing",
                fix="Download the base again (all shards), or point --base at a complete copy.",
            )
        )
    if arch is None or not files:
        return result, out
    checker = _Checker(arch, quant)
    for path in files:  # one header at a time: memory stays at one shard's header
        try:
            infos, _ = read_safetensors_header(path)
        except LoraConvertError as exc:
            result.unreadable.append(f"{path.name}: {exc.message}")
            continue
        for info in infos.values():
            result.tensors += 1
            checker.check(info.key, info.shape, info.dtype, result)
        del infos
    for text in result.unreadable:
        out.append(
            finding("base.checkpoint-unreadable", f"A shard header of the base cannot be read: {text.rstrip('.')}.")
        )
    if result.wrong_count:
        more = f" (+{result.wrong_count - len(result.wrong)} more)" if result.wrong_count > len(result.wrong) else ""
        out.append(
            finding(
                "base.checkpoint-shape",
                f"{result.wrong_count} tensor(s) of the base checkpoint in {folder} disagree with the shapes "
                f"config.json and the {arch.family} schema give: " + "; ".join(result.wrong) + more + ". The "
                "adapter is checked against the config's shapes, which this checkpoint does not have.",
                keys=result.wrong_keys[:MAX_KEYS],
                expected="the schema's logical shapes",
                actual=f"{result.wrong_count} tensor(s) differ",
                fix="Check that config.json belongs to these weights (and that quantization_config describes them).",
            )
        )
    return result, out


class _Checker:
    """Maps checkpoint tensor names to the schema's groups (the architecture caches per place) and checks their
    shapes."""

    def __init__(self, arch, quant: BaseQuantization | None):
        self.arch = arch
        self.quant = quant if quant is not None and quant.known else None
        self.suffixes = self.quant.suffixes() if self.quant is not None else []

    def check(self, key: str, shape, dtype: str, result: CheckpointCheck) -> None:
        split = self._split(key, dtype)
        if split is None:
            return
        module, param, role, form, bound = split
        place = self._place(module, param)
        if place is None:
            return
        n_out, n_in, experts, kind = place
        if form is None:  # a plain weight: [out, in] (an embedding [in, out]; a 3-D parameter either way)
            result.checked += 1
            stored = tuple(shape)
            if param is not None:
                ok = stored in ((experts, n_out, n_in), (experts, n_in, n_out))
                want = f"[{experts}, {n_out}, {n_in}] or [{experts}, {n_in}, {n_out}]"
            else:
                want_shape = (n_in, n_out) if kind == "embedding" else (n_out, n_in)
                ok = stored == want_shape
                want = f"[{want_shape[0]}, {want_shape[1]}]"
            if not ok:
                self._wrong(result, key, f"{key} is {list(stored)} ({dtype}), the schema says {want}")
            return
        check = self.quant.check(key, role, form, bound, shape, dtype, n_out, n_in, experts)
        result.checked += 1
        if role == "main":
            result.quantized += 1
        if not check.ok:
            logical = f" = logical {list(check.logical)}" if check.logical else ""
            what = "stored" if role == "main" else "companion"
            self._wrong(
                result,
                key,
                f"{key} is {list(check.stored)} ({dtype}, {bound.label}){logical}; for the schema's logical "
                f"[{n_out}, {n_in}] the {what} shape is {list(check.expected)}",
            )

    @staticmethod
    def _wrong(result: CheckpointCheck, key: str, text: str) -> None:
        result.wrong_count += 1
        if len(result.wrong) < MAX_EXAMPLES:
            result.wrong.append(text)
        if len(result.wrong_keys) < MAX_KEYS:
            result.wrong_keys.append(key)

    def _split(self, key: str, dtype: str):
        """(module path, 3-D parameter or None, role, form or None, scheme or None), or None for a tensor that is
        no module weight (norms, biases, buffers)."""
        for suffix, form, bound, role in self.suffixes:
            if form.experts_3d:
                if key.endswith(suffix) and "." in key:
                    module, _, leaf = key[: -len(suffix)].rpartition(".")
                    if module.endswith("experts") and leaf:
                        if role == "main" and form.dtypes and dtype not in form.dtypes:
                            continue
                        return module, leaf, role, form, bound
                continue
            if key.endswith("." + suffix):
                if role == "main" and form.dtypes and dtype not in form.dtypes:
                    continue
                return key[: -len(suffix) - 1], None, role, form, bound
        module, _, leaf = key.rpartition(".")
        if leaf == "weight":
            return module, None, "plain", None, None
        if module.endswith("experts") and leaf not in _NOT_WEIGHTS and not leaf.endswith("_bias"):
            return module, leaf, "plain", None, None  # a 3-D expert parameter stored as such
        return None

    def _place(self, module: str, param: str | None):
        """(n_out, n_in, experts, kind) of the schema's place for a checkpoint module, or None."""
        try:
            match = self.arch.resolve_path(module, param)
        except (LoraConvertError, ValueError):
            return None
        if match is None:
            return None
        n_in, n_out = match.widths  # the weight's own widths, not those of PEFT's (possibly swapped) factors
        return (n_out, n_in, match.group.experts, match.group.kind)
