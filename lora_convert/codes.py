"""The registry of finding codes: the one place where a code's severity, meaning and advice are written.

Every check builds its findings through `finding(code, message, ...)`, which takes the severity from here, so a
code means the same thing (and fails CI the same way) wherever it is reported. A code that is not registered is a
bug in lora-convert (`InternalError`), not a problem of the adapter. Engine findings
(`engine.<engine>.<rule id>`) are named by the rule files in `lora_convert/engines/`; their severity follows
from the rule's outcome through `ENGINE_OUTCOMES`.

The codes section of docs/validate.md is generated from this module (`python -m lora_convert.codes --write
docs/validate.md`, or `make docs`); tests/test_codes.py fails when the file differs. Codes are stable
identifiers that CI users match on: never rename one, add a new one.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from lora_convert.errors import InternalError
from lora_convert.findings import Finding, Severity
from lora_convert.text import generated_doc_main, replace_generated_section

ERROR, WARNING, INFO = Severity.ERROR, Severity.WARNING, Severity.INFO


@dataclass(frozen=True)
class Code:
    code: str
    severity: Severity
    meaning: str  # what the finding says about the adapter
    action: str  # what to do about it ("" when nothing needs doing)
    # normalize decides it module by module (refuses those modules, or with --drop-unsupported leaves them out,
    # listed), so it does not stop normalize before planning (lora_convert/convert/blockers.py)
    per_module: bool = False
    # the finding is about PEFT's per-module layout (2-D factors, one rank per module); a stacked output
    # (lora_layout.json) has 3-D, rank-padded tensors on purpose, so there it says nothing about the adapter and its
    # layout file is checked instead (the `layout.*` codes)
    peft_layout: bool = False
    # the feature of the engine rules (lora_convert/engines/features) that is about what this code reports, when
    # normalize refuses those modules in every layout, before any engine rule (lora_convert/convert/plan.py; with
    # --drop-unsupported it leaves them out): `normalize --layout E` therefore refuses what E's rules on that
    # feature are about (lora_convert/engines/rules.py layout_treatment)
    refused_feature: str | None = None


# Flags after a code's four fields in the table below: each sets the Code field of its name.
PER_MODULE = "per_module"
PEFT_LAYOUT = "peft_layout"


@dataclass(frozen=True)
class Area:
    name: str
    checks: str  # what the checks of this area look at
    codes: tuple[Code, ...]
    # the check of `validate` (lora_convert/check/validate.py CHECKS) that reports this area's findings, among them
    # those made while the adapter was read; None: reported outside the checks (reading the files, resolving the
    # base, inspect)
    check: str | None = None


def _area(name: str, checks: str, *codes: tuple, check: str | None = None) -> Area:
    return Area(name, checks, tuple(Code(*c[:4], **dict(_flag(f) for f in c[4:])) for c in codes), check)


def _flag(flag: str | tuple[str, str]) -> tuple[str, object]:
    """A flag after a code's four fields: a field name (set to True) or a (field name, value) pair."""
    return flag if isinstance(flag, tuple) else (flag, True)


def refuses_feature(feature: str) -> tuple[str, str]:
    """The flag of a code whose modules normalize refuses in every layout: see Code.refused_feature."""
    return ("refused_feature", feature)


AREAS: tuple[Area, ...] = (
    _area(
        "files",
        "safetensors headers (strictly: length, JSON object, dtypes, offsets inside the file, no overlap, bytes = "
        "shape x dtype, no control characters), shard index, `.bin` only through safe unpickling, no link out of the "
        "adapter folder",
        (
            "files.unreadable",
            ERROR,
            "An adapter file is malformed or unsafe to read; nothing else is checked.",
            "Save the adapter again (PEFT save_pretrained, safetensors).",
        ),
    ),
    _area(
        "config",
        "`adapter_config.json` present, JSON, right types, `r > 0`, `lora_alpha`, `peft_type`, valid pattern regexes; "
        "LoRA variants no engine computes; DoRA; `lora_bias`, `bias`, `modules_to_save`, `fan_in_fan_out`, "
        "`trainable_token_indices`; regex `target_modules`; rank/alpha patterns; rsLoRA",
        (
            "config.unreadable",
            ERROR,
            "adapter_config.json is missing, empty or not JSON; nothing else is checked.",
            "Save the adapter again with PEFT's save_pretrained.",
        ),
        (
            "config.not-an-object",
            ERROR,
            "adapter_config.json holds JSON that is not an object.",
            "Save the adapter again; the config is one object of fields.",
        ),
        (
            "config.missing-field",
            ERROR,
            "A required field (`r`, `lora_alpha`) is missing.",
            "Add the value the adapter was trained with.",
        ),
        ("config.peft-type-assumed", WARNING, "`peft_type` is missing; LORA is assumed.", 'Add "peft_type": "LORA".'),
        ("config.wrong-type", ERROR, "A field has the wrong JSON type or an unknown value.", "Fix the field."),
        (
            "config.rank-not-positive",
            ERROR,
            "`r` or a `rank_pattern` value is not a positive integer.",
            "Set the rank the adapter was trained with (lora_A's rows).",
        ),
        (
            "config.alpha-not-positive",
            ERROR,
            "`lora_alpha` or an `alpha_pattern` value is zero or negative.",
            "Set the lora_alpha the adapter was trained with.",
        ),
        ("config.not-lora", ERROR, "`peft_type` names another PEFT method; lora-convert handles LoRA only.", ""),
        (
            "config.bad-pattern",
            ERROR,
            "A `rank_pattern`/`alpha_pattern` key is not a valid regex.",
            "Fix the key; PEFT matches it as a regex against module names.",
        ),
        (
            "config.unsupported-variant",
            ERROR,
            "A LoRA variant is set whose tensors do not mean a plain LoRA delta.",
            "Merge the adapter into the base model, or retrain as plain LoRA.",
        ),
        (
            "config.dora",
            ERROR,
            "DoRA: the delta depends on the base weights; engines reject it and it cannot be converted exactly.",
            "Merge into the base model (PEFT merge_and_unload), or retrain with use_dora=False.",
            refuses_feature("dora"),
        ),
        (
            "config.lora-bias",
            ERROR,
            "`lora_bias` is set: vLLM rejects it and SGLang reads the bias as a B factor.",
            "normalize --drop-unsupported drops the bias (the delta then differs).",
            refuses_feature("bias"),
        ),
        ("config.bias", WARNING, '`bias` is not "none": trained base biases that engines reject or ignore.', ""),
        (
            "config.modules-to-save",
            WARNING,
            "`modules_to_save`: whole module copies, not LoRA.",
            "Merge them into the base, or normalize with --drop-unsupported.",
        ),
        (
            "config.fan-in-fan-out",
            WARNING,
            "`fan_in_fan_out`: Conv1D base layers; engines do not transpose the delta.",
            "",
        ),
        (
            "config.trainable-tokens",
            WARNING,
            "`trainable_token_indices`: embedding-row deltas engines do not apply.",
            "",
        ),
        (
            "config.no-targets",
            WARNING,
            "Neither `target_modules` nor `target_parameters`; engines infer targets from them.",
            "Add target_modules.",
        ),
        (
            "config.regex-targets",
            INFO,
            "`target_modules` is a regex; SGLang accepts only 'all'/'all-linear' as a string.",
            "",
        ),
        (
            "config.patterns",
            INFO,
            "`rank_pattern`/`alpha_pattern`: modules have their own rank or scaling.",
            "Check --engine for engines that ignore them.",
        ),
        ("config.rslora", INFO, "`use_rslora`: each module's scaling is lora_alpha / sqrt(r).", ""),
        ("config.added-tokens-unreadable", WARNING, "added_tokens.json is not a JSON object of token -> id.", ""),
        check="config",
    ),
    _area(
        "tokens",
        "a vocabulary-sized embedding / lm_head LoRA wider than the base vocab, `added_tokens.json` ids past it",
        (
            "tokens.added",
            ERROR,
            "The adapter adds tokens the base vocabulary does not have.",
            "Serve a base resized to the new vocabulary (merge the adapter), or retrain without added tokens.",
            refuses_feature("added_tokens"),
        ),
        (
            "tokens.added-unchecked",
            WARNING,
            "added_tokens.json lists tokens, and without the base vocab size it is "
            "unknown whether they extend the vocabulary.",
            "Pass --base.",
        ),
        ("tokens.added-within-vocab", INFO, "added_tokens.json lists tokens, all inside the base vocabulary.", ""),
        check="config",
    ),
    _area(
        "mlx",
        "an mlx-lm adapter (docs/formats.md): factors in mlx-lm's orientation, `lora_parameters.scale` against "
        "`alpha`, the adapted layers against `num_layers`",
        (
            "mlx.factors-peft-orientation",
            ERROR,
            "An mlx-lm adapter holds a factor pair in PEFT's orientation (lora_a [r, in], lora_b [out, r]) instead of "
            "mlx-lm's (lora_a [in, r], lora_b [r, out]): mlx-lm refuses it, or, where the shapes are square, computes "
            "another function.",
            "Transpose both factors when writing the file (lora-convert normalize --layout mlx writes them right).",
        ),
        (
            "mlx.orientation-unknown",
            WARNING,
            "A factor pair of an mlx-lm adapter is square in every dimension (in = out = r), so its shapes cannot say "
            "whether it is in mlx-lm's orientation or transposed.",
            "Check how the file was written.",
        ),
        (
            "mlx.scale-looks-like-alpha",
            WARNING,
            "mlx-lm's `scale` is the final multiplier (PEFT's alpha/r); this config also has an `alpha` equal to it, so "
            "the trained alpha was probably copied into `scale`, which applies it r times over.",
            "Set scale = alpha / rank (and remove alpha), or check the training config.",
        ),
        (
            "mlx.layers-outside-num-layers",
            ERROR,
            "The adapter holds layers outside the last `num_layers` decoder layers, where mlx-lm creates no LoRA "
            "layer: load_adapters raises ('not an adapter parameter in the model').",
            "Set num_layers to cover every adapted layer (lora-convert normalize --layout mlx does).",
        ),
        check="config",
    ),
    _area(
        "gguf",
        "a GGUF LoRA adapter (adapter.gguf, docs/formats.md) against the --base config: its GGUF architecture and "
        "the sizes its metadata and tensors name",
        (
            "gguf.base-mismatch",
            ERROR,
            "The GGUF adapter was written for another base: its `general.architecture` (or a size in its metadata, or "
            "a block past the base's last layer) is not what the GGUF converter makes of the --base config. The "
            "runtime's adapter loader refuses it on that base (it checks general.architecture), or applies it to "
            "other weights.",
            "Pass the --base the adapter was trained on, or convert the PEFT adapter again against this base.",
        ),
        check="config",
    ),
    _area(
        "keys",
        "names outside PEFT's grammar, a leftover adapter-name segment (`lora_A.default.weight`), full weights, the "
        "same key in two shards, no tensors, no `base_model.model.` prefix, vision-tower / projector modules, layers "
        "past `num_hidden_layers` (MTP), unknown modules",
        ("keys.unparseable", ERROR, "A tensor name is not a PEFT LoRA key.", ""),
        (
            "keys.adapter-name-segment",
            WARNING,
            "Keys keep the adapter-name segment (`lora_A.default.weight`); vLLM rejects them.",
            "lora-convert normalize writes the keys without it.",
        ),
        (
            "keys.full-weight",
            ERROR,
            "A whole module weight or bias (modules_to_save, bias), not a LoRA factor.",
            "Merge it into the base, or normalize with --drop-unsupported.",
            PER_MODULE,
            refuses_feature("full_weights"),
        ),
        (
            "keys.base-layer-copy",
            INFO,
            "PEFT's copy of a wrapped layer's base weight (`<module>.base_layer.weight`, written for embedding "
            "layers), not a LoRA factor.",
            "Nothing, unless the vocabulary was resized; normalize with --drop-unsupported leaves it out.",
            PER_MODULE,
        ),
        (
            "keys.trainable-tokens",
            WARNING,
            "PEFT's trainable-token rows (`trainable_tokens_delta`), not a LoRA factor.",
            "Merge them into the base, or normalize with --drop-unsupported.",
            PER_MODULE,
            refuses_feature("trainable_tokens"),
        ),
        ("keys.duplicate", ERROR, "The same key or factor is stored twice.", ""),
        ("keys.empty", ERROR, "The adapter files hold no tensors.", "Save the adapter again."),
        ("keys.no-peft-prefix", WARNING, "Keys lack PEFT's `base_model.model.` prefix.", ""),
        (
            "modules.vision",
            WARNING,
            "LoRA on a vision tower or multimodal projector; text-only serving drops it.",
            "normalize --drop-unsupported (text-only serving), or normalize --layout peft, which writes it",
            PER_MODULE,
            refuses_feature("vision_modules"),
        ),
        (
            "modules.unknown",
            ERROR,
            "Not a LoRA-able module of the base architecture.",
            "Check that --base is the adapter's base model.",
            PER_MODULE,
        ),
        (
            "modules.not-on-layer-type",
            ERROR,
            "A module on a layer of the wrong type (e.g. self_attn on a linear-attention layer).",
            "Check that --base is the adapter's base model.",
        ),
        ("modules.router", INFO, "LoRA on an MoE router; some engines do not apply it.", ""),
        (
            "modules.layout-copy",
            INFO,
            "A module lora-convert's engine layout writes a second time under the name the engine reads (the folder's "
            "manifest names the layout), checked to repeat the copied module's factors exactly.",
            "",
        ),
        (
            "modules.peft-cannot-apply",
            WARNING,
            "LoRA on a module PEFT itself cannot apply (the schema's `peft_cannot_apply` says why): PEFT fails or "
            "serves a different delta there; `normalize --layout peft` refuses it, the other layouts keep it.",
            "normalize --layout peft --drop-unsupported (leaves it out), another layout, or retrain without it",
            PER_MODULE,
        ),
        (
            "layers.past-end",
            ERROR,
            "Modules on layers past num_hidden_layers (MTP/NextN); engines fail on them.",
            "normalize --drop-unsupported",
            PER_MODULE,
            refuses_feature("layers_past_end"),
        ),
        check="keys",
    ),
    _area(
        "pairs and ranks",
        "A without B and B without A; rank of A vs B vs `r` / `rank_pattern`; 3-D expert factors that are not E x r",
        ("pairs.missing-A", ERROR, "A module has lora_B but no lora_A.", "Save the adapter again, or drop the module."),
        ("pairs.missing-B", ERROR, "A module has lora_A but no lora_B.", "Save the adapter again, or drop the module."),
        ("rank.a-b-mismatch", ERROR, "lora_A and lora_B of a module have different ranks.", "", PEFT_LAYOUT),
        (
            "rank.config-mismatch",
            ERROR,
            "The tensors' rank differs from `r` / `rank_pattern`; PEFT would refuse.",
            "Fix r / rank_pattern in adapter_config.json.",
            PEFT_LAYOUT,
        ),
        ("rank.fused-experts", ERROR, "3-D expert factors whose rows/columns are not E x r.", "", PEFT_LAYOUT),
        ("shapes.not-2d", ERROR, "A LoRA factor that is not 2-D.", "", PEFT_LAYOUT),
        check="pairs",
    ),
    _area(
        "shapes",
        "every module against the architecture schema of the base (`schemas/*.json`), each mismatch with expected and "
        "actual shape; an error when the shapes could not be checked at all (no base, a base that does not resolve, a "
        "family without a schema)",
        (
            "shapes.in-features",
            ERROR,
            "lora_A's in-dim is not the module's input width.",
            "Check that --base is the adapter's base model.",
        ),
        (
            "shapes.out-features",
            ERROR,
            "lora_B's out-dim (or a DoRA magnitude's length) is not the module's output width.",
            "Check that --base is the adapter's base model.",
        ),
        (
            "shapes.experts",
            ERROR,
            "A 3-D expert LoRA holds a different number of experts than the base.",
            "Check that --base is the adapter's base model.",
        ),
        (
            "shapes.unchecked",
            ERROR,
            "The shapes could not be checked against a base model.",
            "Pass --base, or add a schema for the family; --allow-unchecked accepts the adapter unchecked.",
        ),
        (
            "shapes.unchecked-allowed",
            WARNING,
            "The shapes could not be checked, accepted with --allow-unchecked (still fails under --strict).",
            "Pass --base, or add a schema for the family.",
        ),
        check="shapes",
    ),
    _area(
        "MoE",
        "experts missing in a layer, projections missing for some experts, expert index past the end, expert LoRA on "
        "a dense layer, 3-D wrapper parameters",
        ("experts.missing", WARNING, "Some layers have LoRA on only some routed experts.", ""),
        (
            "experts.missing-projection",
            WARNING,
            "Some experts lack projections other experts of the layer have; vLLM requires all three.",
            "",
        ),
        (
            "experts.index-past-end",
            ERROR,
            "An expert index at or past the base's expert count.",
            "Check that --base is the adapter's base model.",
        ),
        (
            "experts.on-dense-layer",
            ERROR,
            "Routed-expert LoRA on a layer without routed experts.",
            "Check that --base is the adapter's base model.",
        ),
        ("experts.unknown-parameter", ERROR, "A 3-D LoRA wrapper whose parameter target_parameters does not name.", ""),
        ("experts.parameter-guessed", WARNING, "A 3-D expert LoRA's parameter was inferred from the shapes.", ""),
        check="moe",
    ),
    _area(
        "data",
        "NaN and Inf (count and first flat index), a B that is all zero (the module is a no-op), integer/bool factors, "
        "float64, mixed dtypes, a tensor whose RMS is more than 100x above or below the median of its factor kind",
        ("data.nan", ERROR, "NaN values in a tensor.", "Re-export from a checkpoint saved before training diverged."),
        (
            "data.inf",
            ERROR,
            "Infinite values in a tensor.",
            "Re-export from a checkpoint saved before training diverged.",
        ),
        (
            "data.zero-b",
            WARNING,
            "lora_B tensors that are all zero: those modules are no-ops.",
            "Check that the adapter was saved after training.",
        ),
        (
            "data.zero-fill",
            INFO,
            "All-zero lora_B tensors that lora-convert normalize wrote on purpose (zero fills "
            "listed in its lora_convert_report.json or lora_layout.json).",
            "",
        ),
        ("data.integer-dtype", ERROR, "Integer or bool factors.", "Re-export with floating-point factors."),
        ("data.float64", WARNING, "float64 factors: twice the size for no gain.", "normalize --dtype float32"),
        ("data.mixed-dtypes", WARNING, "The adapter mixes float dtypes.", ""),
        ("data.fp8", INFO, "8-bit float factors: low precision for LoRA.", ""),
        ("data.magnitude-outlier", WARNING, "A tensor's RMS is far from the median of its factor kind.", ""),
        check="data",
    ),
    _area(
        "sharding",
        "with `--tp`/`--ep`: column-parallel output and row-parallel input dimensions, attention / linear-attention / "
        "state-space head counts, KV heads (split or replicated), expert counts over `--ep`, `--ep` dividing `--tp`",
        ("sharding.tp", ERROR, "A dimension or head count does not divide by the tensor-parallel size.", ""),
        ("sharding.ep", ERROR, "Experts do not divide over --ep, or --ep does not divide --tp.", ""),
        check="sharding",
    ),
    _area(
        "smoke",
        "a forward pass through the kernels compared with PEFT's float64 reference",
        ("smoke.group", ERROR, "A stacked group's forward differs from PEFT's reference.", ""),
        ("smoke.slice", ERROR, "One slice of a group differs from PEFT's reference.", ""),
        ("smoke.passed", INFO, "Every group matched PEFT's reference.", ""),
        ("smoke.skipped", INFO, "The smoke forward did not run by default here (the message says why).", ""),
        (
            "smoke.not-installed",
            INFO,
            "The default smoke forward did not run: torch or triton (the `[smoke]` extra) is not installed.",
            "`pip install 'lora-convert[smoke]'` to run it; `--smoke` without them exits 3 (unless --allow-unchecked).",
        ),
        (
            "smoke.unchecked",
            ERROR,
            "--smoke asked for the forward pass and it could not run on this adapter (a stacked output, no base "
            "architecture, errors found before it); on a machine that cannot run it (no torch/triton, no CUDA for "
            "--device cuda), --smoke exits 3 instead.",
            "The message says why; --allow-unchecked accepts the adapter without this check.",
        ),
        (
            "smoke.unchecked-allowed",
            WARNING,
            "--smoke asked for the forward pass and it did not run (on this adapter or on this machine), accepted "
            "with --allow-unchecked (still fails under --strict).",
            "The message says why.",
        ),
        check="smoke",
    ),
    _area(
        "engine rules",
        "with `--engine`: whether that release's rules could be evaluated at all (they need a valid config, and "
        "their module-group rules a base to plan against and an adapter that can be planned)",
        (
            "engine-rules.unchecked",
            ERROR,
            "The engine's rules were not all evaluated: what it would do with the adapter is unknown.",
            "The message says why; --allow-unchecked accepts the adapter without this check.",
        ),
        (
            "engine-rules.unchecked-allowed",
            WARNING,
            "The engine's rules were not all evaluated, accepted with --allow-unchecked (still fails under --strict).",
            "The message says why.",
        ),
        check="engine",
    ),
    _area(
        "server flags",
        "with `--engine` and `--server-args` / `--server-args-file`: what the server's own flags (names, types and "
        "defaults of that release: lora_convert/engines/<engine>-server-args.json) do to the adapter; each message "
        "cites the release's code",
        ("server-args.flags", INFO, "The flags given, those ignored (not about LoRA) and the defaults assumed.", ""),
        (
            "server-args.rank-above-max",
            ERROR,
            "The adapter's rank is above --max-lora-rank (given, or the release's default): the server refuses it.",
            "Start the server with a larger --max-lora-rank.",
        ),
        (
            "server-args.target-excluded",
            ERROR,
            "Modules not in vLLM's --lora-target-modules are not wrapped: they load and are never applied (dropped).",
            "List them in --lora-target-modules, or leave the flag out.",
        ),
        (
            "server-args.target-refused",
            ERROR,
            "Modules not in SGLang's --lora-target-modules (normalized): the server refuses the adapter.",
            "List them in --lora-target-modules (or `all`).",
        ),
        (
            "server-args.sharded-rank",
            ERROR,
            "--fully-sharded-loras with tensor parallelism splits MoE LoRA A along the rank; a rank that does not "
            "divide by the TP size fails to load.",
            "Leave out --fully-sharded-loras, or use a rank the TP size divides.",
        ),
        (
            "server-args.lora-dtype",
            INFO,
            "--lora-dtype rounds the adapter's factors to another dtype as they load.",
            "",
        ),
        (
            "server-args.lora-disabled",
            ERROR,
            "The flags turn LoRA off (--no-enable-lora): the server loads no adapter.",
            "Start the server with --enable-lora.",
        ),
        (
            "server-args.unmodelled",
            WARNING,
            "A LoRA flag set that changes what loads in a way the rules do not describe; the verdict assumes its "
            "default.",
            "Check the verdict against the server, or leave the flag at its default.",
        ),
        check="engine",
    ),
    _area(
        "stacked outputs",
        "every group of `lora_layout.json` against the tensors",
        ("layout.unknown", ERROR, "lora_layout.json does not describe a lora-convert stacked layout.", ""),
        ("layout.invalid", ERROR, "lora_layout.json lacks a positive rank, a groups list or a group key.", ""),
        ("layout.rank-mismatch", ERROR, "lora_layout.json's rank differs from adapter_config.json's r.", ""),
        ("layout.missing-tensor", ERROR, "A group's tensor is not in the file.", ""),
        ("layout.shape", ERROR, "A tensor's shape differs from what lora_layout.json implies.", ""),
        ("layout.unlisted-tensor", ERROR, "Tensors lora_layout.json does not describe.", ""),
        check="shapes",
    ),
    _area(
        "base",
        "the base could not be resolved (the checks that need it are named), or has no schema (warnings; the "
        "unchecked shapes are `shapes.unchecked`); a shipped preset stands in for it (a note)",
        ("base.unresolved", WARNING, "No base model resolved; the checks that need one are named.", "Pass --base."),
        (
            "base.unsupported",
            WARNING,
            "The base's family has no architecture schema.",
            "`lora-convert schemas list` shows the supported families.",
        ),
        (
            "base.preset",
            INFO,
            "A shipped preset stands in for the base asked for: the Hub could not be reached for that repo id, or "
            "the adapter's base_model_name_or_path is one of the preset's hub_ids.",
            "Pass --base with the base model's folder or config.json to check against the exact config.",
        ),
        (
            "base.checkpoint-shape",
            ERROR,
            "A tensor of the base's checkpoint (a local folder or Hub cache snapshot; quantized tensors mapped back "
            "to their logical shape) disagrees with the shape config.json and the schema give.",
            "Check that config.json (and its quantization_config) belongs to these weights.",
        ),
        (
            "base.checkpoint-missing-shard",
            WARNING,
            "model.safetensors.index.json names a shard the base folder does not hold; its tensors are unchecked.",
            "Download the base again, or point --base at a complete copy.",
        ),
        (
            "base.checkpoint-unreadable",
            WARNING,
            "The base's shard index or a shard header cannot be read; those tensors are unchecked.",
            "",
        ),
    ),
    _area(
        "quantized bases",
        "the base's `quantization_config` (top level or in the wrapper's `text_config`): the scheme per module "
        "family, from lora_convert/arch/quantization.json (docs/quantization.md); LoRA shapes stay the logical ones",
        (
            "quant.scheme",
            INFO,
            "The base is quantized: the scheme of each module family, and the checkpoint index checked (if any).",
            "",
        ),
        (
            "quant.unknown-scheme",
            INFO,
            "The base's quant_method is not one lora-convert describes: its checkpoint tensors are not mapped back "
            "to logical shapes.",
            "",
        ),
    ),
    _area(
        "inspect",
        "`lora-convert inspect` only: config features serving engines refuse or misserve (validate reports them as "
        "`config.dora`, `config.patterns`, `config.unsupported-variant`)",
        ("serving.dora", WARNING, "A DoRA adapter: engines reject it.", "Run validate for the full check."),
        (
            "serving.patterns",
            WARNING,
            "rank/alpha patterns: engines that ignore them serve wrong scales.",
            "lora-convert normalize folds them into the tensors.",
        ),
        ("serving.unsupported-variant", WARNING, "A LoRA variant no serving engine computes.", ""),
    ),
)

# What a serving engine does with a feature of the adapter (the `outcome` of a rule in lora_convert/engines/*.json)
# and the severity of the finding `engine.<engine>.<rule id>` it becomes.
ENGINE_OUTCOMES: dict[str, tuple[Severity, str]] = {
    "exact": (INFO, "served exactly as PEFT computes it"),
    "wrong": (ERROR, "loads and serves a different delta (e.g. a wrong scale)"),
    "load-failure": (ERROR, "the engine refuses the adapter or fails at the first request"),
    "dropped": (ERROR, "loads, but trained LoRA is silently not applied"),
    "ignored": (
        WARNING,
        "served with the base weights: parts engines do not adapt (vision towers, MTP layers, "
        "routers, whole-module copies) or a server setting that turns them off",
    ),
    "needs-flag": (INFO, "loads only with a server flag the message names"),
}

REGISTRY: dict[str, Code] = {c.code: c for area in AREAS for c in area.codes}
if len(REGISTRY) != sum(len(area.codes) for area in AREAS):  # pragma: no cover - a duplicate in the table above
    raise InternalError("lora_convert/codes.py registers a code twice.")
ENGINE_PREFIX = "engine."
# The codes a stacked output's findings leave out (Code.peft_layout).
PEFT_LAYOUT_CODES = frozenset(c.code for c in REGISTRY.values() if c.peft_layout)
# The engine rule features whose modules normalize refuses in every layout (Code.refused_feature).
NORMALIZE_REFUSED_FEATURES = frozenset(c.refused_feature for c in REGISTRY.values() if c.refused_feature)
_CHECK_OF = {c.code: area.check for area in AREAS for c in area.codes}


def check_of(code: str) -> str | None:
    """The check of `validate` that reports findings of a registered `code` (Area.check); an unregistered one is a
    bug."""
    if code not in _CHECK_OF:
        raise InternalError(f"Finding code {code!r} is not registered in lora_convert/codes.py.")
    return _CHECK_OF[code]


def severity(code: str) -> Severity:
    """The severity of a registered code; an unregistered one is a bug."""
    entry = REGISTRY.get(code)
    if entry is None:
        raise InternalError(f"Finding code {code!r} is not registered in lora_convert/codes.py.")
    return entry.severity


def decided_per_module(code: str) -> bool:
    """Whether normalize decides findings of `code` module by module (Code.per_module) rather than stopping."""
    entry = REGISTRY.get(code)
    return entry is not None and entry.per_module


def finding(code: str, message: str, **kw: Any) -> Finding:
    """A Finding with the registered severity of `code` (keys, expected, actual, fix as keywords)."""
    return Finding(code, severity(code), message, **kw)


def engine_finding(engine: str, rule_id: str, outcome: str, message: str, **kw: Any) -> Finding:
    """The finding `engine.<engine>.<rule_id>` of a fired engine rule; its severity follows from the outcome."""
    entry = ENGINE_OUTCOMES.get(outcome)
    if entry is None:
        raise InternalError(
            f"Engine rule {engine}/{rule_id} has outcome {outcome!r}, which lora_convert/codes.py "
            f"does not know (one of {', '.join(ENGINE_OUTCOMES)})."
        )
    return Finding(f"{ENGINE_PREFIX}{engine}.{rule_id}", entry[0], message, **kw)


# ------------------------------------------------------------------------------------------- the generated docs
BEGIN_MARKER = "<!-- codes: generated by `python -m lora_convert.codes --write docs/validate.md`; do not edit -->"
END_MARKER = "<!-- /codes -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown() -> str:
    """The codes section of docs/validate.md: the areas, then every code with its severity, meaning and advice."""
    lines = ["| area | what is checked | codes |", "|---|---|---|"]
    for area in AREAS:
        lines.append(f"| {area.name} | {_cell(area.checks)} | {', '.join(f'`{c.code}`' for c in area.codes)} |")
    lines.append(
        "| engine | with `--engine`: what that engine would do with each feature of the adapter | "
        "`engine.sglang.<rule>`, `engine.vllm.<rule>` |"
    )
    lines += [
        "",
        "Every code has one severity, wherever it is reported:",
        "",
        "| code | severity | what it means | what to do |",
        "|---|---|---|---|",
    ]
    for area in AREAS:
        for c in area.codes:
            lines.append(f"| `{c.code}` | {c.severity.value} | {_cell(c.meaning)} | {_cell(c.action) or '-'} |")
    lines += [
        "",
        "An engine finding `engine.<engine>.<rule>` takes its severity from the rule's outcome:",
        "",
        "| outcome | severity | what the engine does |",
        "|---|---|---|",
    ]
    for outcome, (sev, meaning) in ENGINE_OUTCOMES.items():
        lines.append(f"| `{outcome}` | {sev.value} | {_cell(meaning)} |")
    return "\n".join(lines) + "\n"


def render_into(text: str) -> str:
    """`text` (docs/validate.md) with the part between the markers replaced by `markdown()`."""
    return replace_generated_section(text, BEGIN_MARKER, END_MARKER, "\n" + markdown())


def main(argv: list[str]) -> int:
    usage = "python -m lora_convert.codes [--markdown | --write docs/validate.md]"
    return generated_doc_main(argv, markdown, render_into, usage)


if __name__ == "__main__":  # pragma: no cover - a maintenance command
    raise SystemExit(main(sys.argv[1:]))
