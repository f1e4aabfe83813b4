"""The `config` check: what adapter_config.json says (its parse findings, variants, DoRA, bias, modules_to_save,
patterns) and added tokens against the base vocabulary."""

from __future__ import annotations

from lora_convert.check.context import MAX_KEYS, Check, CheckContext, Outcome, adapter_findings
from lora_convert.codes import finding
from lora_convert.findings import Finding
from lora_convert.peft.adapter import ModuleKind


def run(ctx: CheckContext) -> Outcome:
    return Outcome(
        adapter_findings(ctx, "config") + config_findings(ctx.adapter) + vocab_findings(ctx.adapter, ctx.text_config)
    )


CHECK = Check("config", run)


def config_findings(adapter) -> list[Finding]:
    """What adapter_config.json asks for that engines cannot serve as plain LoRA (config.rslora comes from peft/config.py)."""
    return [f for rule in _CONFIG_RULES for f in rule(adapter)]


def _dora(adapter) -> list[Finding]:
    cfg = adapter.config
    dora = [m for m in adapter.modules if m.magnitude is not None]
    if not (cfg.use_dora or dora):
        return []
    return [
        finding(
            "config.dora",
            f"DoRA adapter (use_dora={cfg.use_dora}, {len(dora)} lora_magnitude_vector tensor(s)): its delta is "
            "m * (W + sBA) / ||W + sBA||, which depends on the base weights, so it is not a plain LoRA delta. "
            "SGLang and vLLM reject DoRA adapters and lora-convert cannot convert one exactly.",
            keys=[m.magnitude.key for m in dora[:MAX_KEYS]] or ["use_dora"],
            expected="use_dora: false",
            actual=True,
            fix="Merge the DoRA adapter into the base model (PEFT merge_and_unload), or retrain with use_dora=False.",
        )
    ]


def _variants(adapter) -> list[Finding]:
    cfg = adapter.config
    return [
        finding(
            "config.unsupported-variant",
            f"{name} is set: {description}. The tensors do not mean a plain LoRA delta, and no serving engine computes "
            "this variant.",
            keys=[name],
            actual=cfg.raw.get(name),
            fix="Merge the adapter into the base model, or retrain as plain LoRA.",
        )
        for name, description in cfg.variants.items()
    ]


def _lora_bias(adapter) -> list[Finding]:
    bias_keys = [m.lora_bias.key for m in adapter.modules if m.lora_bias is not None]
    if not (adapter.config.lora_bias or bias_keys):
        return []
    return [
        finding(
            "config.lora-bias",
            f"lora_bias is set ({len(bias_keys)} lora_B.bias tensor(s)): vLLM rejects it and SGLang reads the bias as a B "
            "factor.",
            keys=bias_keys[:MAX_KEYS] or ["lora_bias"],
            expected=False,
            actual=True,
            fix="lora-convert normalize ADAPTER -o OUT --drop-unsupported (drops the bias; the delta then differs).",
        )
    ]


def _bias(adapter) -> list[Finding]:
    bias = adapter.config.bias
    if bias == "none":
        return []
    return [
        finding(
            "config.bias",
            f"bias={bias!r}: the adapter trained the base model's biases; those tensors are full module biases, "
            "which engines reject (vLLM) or ignore (SGLang).",
            keys=["bias"],
            expected="none",
            actual=bias,
        )
    ]


def _modules_to_save(adapter) -> list[Finding]:
    modules = adapter.config.modules_to_save
    if not modules:
        return []
    return [
        finding(
            "config.modules-to-save",
            f"modules_to_save={modules}: whole copies of these modules were trained and saved; they are not "
            "LoRA, and vLLM rejects them while SGLang ignores them.",
            keys=["modules_to_save"],
            expected=None,
            actual=modules,
            fix="Merge them into the base model, or normalize with --drop-unsupported to leave them out.",
        )
    ]


def _fan_in_fan_out(adapter) -> list[Finding]:
    if not adapter.config.fan_in_fan_out:
        return []
    return [
        finding(
            "config.fan-in-fan-out",
            "fan_in_fan_out is true: the base layers are Conv1D (GPT-2 style, weight stored [in, out]); engines apply "
            "LoRA to nn.Linear layers and do not transpose the delta.",
            keys=["fan_in_fan_out"],
            expected=False,
            actual=True,
        )
    ]


def _trainable_tokens(adapter) -> list[Finding]:
    tti = adapter.config.trainable_token_indices
    if tti in (None, [], {}):
        return []
    return [
        finding(
            "config.trainable-tokens",
            f"trainable_token_indices is set ({str(tti)[:80]}): the adapter also replaces embedding rows of those tokens; "
            "serving engines do not apply trainable-token deltas.",
            keys=["trainable_token_indices"],
            actual=tti,
        )
    ]


def _targets(adapter) -> list[Finding]:
    """No targets at all (and none rejected as invalid), or a regex string SGLang does not take."""
    cfg = adapter.config
    targets_invalid = {"target_modules", "target_parameters"} & set(cfg.invalid)
    if cfg.target_modules is None and not cfg.target_parameters and adapter.modules and not targets_invalid:
        return [
            finding(
                "config.no-targets",
                "adapter_config.json has neither target_modules nor target_parameters; "
                "engines infer the targets from it.",
                keys=["target_modules"],
            )
        ]
    if isinstance(cfg.target_modules, str) and cfg.target_modules not in ("all", "all-linear"):
        return [
            finding(
                "config.regex-targets",
                f"target_modules is the regex {cfg.target_modules!r}; SGLang accepts only "
                "'all'/'all-linear' as a string.",
                keys=["target_modules"],
                actual=cfg.target_modules,
            )
        ]
    return []


def _patterns(adapter) -> list[Finding]:
    cfg = adapter.config
    if not cfg.has_patterns:
        return []
    return [
        finding(
            "config.patterns",
            f"rank_pattern {cfg.rank_pattern or '{}'} / alpha_pattern {cfg.alpha_pattern or '{}'}: modules have their own "
            "rank or scaling (PEFT applies them; check --engine for engines that do not).",
            keys=["rank_pattern", "alpha_pattern"],
        )
    ]


# in the order their findings are reported
_CONFIG_RULES = (
    _dora,
    _variants,
    _lora_bias,
    _bias,
    _modules_to_save,
    _fan_in_fan_out,
    _trainable_tokens,
    _targets,
    _patterns,
)


def vocab_findings(adapter, text_config: dict) -> list[Finding]:
    """Added tokens: a vocab-sized embedding/lm_head LoRA wider than the base vocab, or added_tokens.json."""
    vocab = text_config.get("vocab_size") if isinstance(text_config.get("vocab_size"), int) else None
    out = _wide_vocab_findings(adapter, vocab) if vocab is not None else []
    if adapter.added_tokens:
        out.append(_added_tokens_finding(sorted(adapter.added_tokens.values()), vocab))
    return out


def _vocab_widths(adapter) -> list[tuple[str, int, list[str]]]:
    """(module, vocabulary rows it covers, keys) of each embedding and lm_head LoRA."""
    widths = []
    for mod in adapter.modules:
        if mod.layer is not None or mod.lora_A is None or mod.lora_B is None:
            continue
        if mod.kind == ModuleKind.EMBEDDING or mod.leaf in ("embed_tokens", "embeddings", "word_embeddings", "wte"):
            widths.append((mod.module, mod.lora_A.shape[-1], mod.keys))
        elif mod.leaf in ("lm_head", "output", "unembed_tokens"):
            widths.append((mod.module, mod.lora_B.shape[0], mod.keys))
    return widths


def _wide_vocab_findings(adapter, vocab: int) -> list[Finding]:
    return [
        finding(
            "tokens.added",
            f"{module} LoRA covers {width} vocabulary rows but the base vocab_size is {vocab}: the adapter was "
            f"trained with {width - vocab} added token(s). SGLang rejects such adapters and vLLM requires the "
            "embedding LoRA to match the base vocabulary.",
            keys=keys,
            expected=vocab,
            actual=width,
            fix=_RESIZE_FIX,
        )
        for module, width, keys in _vocab_widths(adapter)
        if width > vocab
    ]


def _added_tokens_finding(ids: list[int], vocab: int | None) -> Finding:
    """added_tokens.json (ids sorted): unchecked without a vocab size, else beyond it or within it."""
    if vocab is None:
        return finding(
            "tokens.added-unchecked",
            f"added_tokens.json lists {len(ids)} token(s) (ids {ids[0]}..{ids[-1]}); without the base vocab size it "
            "is unknown whether they extend the vocabulary. SGLang rejects adapters that add tokens.",
            keys=["added_tokens.json"],
            actual=len(ids),
            fix="Pass --base so the ids can be checked.",
        )
    beyond = [i for i in ids if i >= vocab]
    if not beyond:
        return finding(
            "tokens.added-within-vocab",
            f"added_tokens.json lists {len(ids)} token(s), all inside the base vocab_size {vocab}.",
            keys=["added_tokens.json"],
        )
    return finding(
        "tokens.added",
        f"added_tokens.json adds {len(beyond)} token(s) with ids >= the base vocab_size {vocab} "
        f"(first {beyond[0]}); the base model has no embedding rows for them. SGLang rejects such adapters.",
        keys=["added_tokens.json"],
        expected=f"< {vocab}",
        actual=beyond[:10],
        fix=_RESIZE_FIX,
    )


_RESIZE_FIX = "Serve a base model resized to the new vocabulary (merge the adapter), or retrain without added tokens."
