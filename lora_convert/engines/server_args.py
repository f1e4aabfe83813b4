"""The serving engine's own command-line flags, as input to `validate --engine E --server-args "..."`.

What each release's flags are -- names, types, defaults, and what each changes when an adapter loads, with the
release's file:line -- is data: `lora_convert/engines/<engine>-server-args.json`, one file per engine with one entry
per release. An entry either lists its `flags` or `extends` a neighbouring release and lists only what differs
(`flags_changed`: by name, the fields given replace the parent's, always with a `source` citing its own lines;
`flags_removed`; `flags_added`), as the rule files do (lora_convert/engines/rules.py).

Parsing follows the engine's argparse: `--flag VALUE`, `--flag=VALUE`, booleans as `--flag` / `--no-flag`, lists as
the words up to the next flag; a repeated flag keeps its last value. A flag this release does not know is an error
when its name is about LoRA (it contains `lora`), naming the known ones; any other (`--port`, `--dtype`, the model
path) does not change how an adapter loads and is accepted and ignored (listed once in the `server-args.flags`
note). Values are type-checked against the release's choices (a UsageError, exit 2).

Flags given this way are the whole command line: a LoRA flag not given has the release's default. Without
--server-args validate also assumes the defaults (a server started with only --enable-lora) -- the rules themselves
are written for them (vLLM's `max-lora-rank` rule: `needs-flag` above the default 16). What each flag's value does
to the adapter is `effects` below, one finding code per effect (lora_convert/codes.py, area "server flags").
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from lora_convert.codes import finding
from lora_convert.engines.rules import ENGINE_PACKAGE, EngineRelease, engine_info, resolve_engine
from lora_convert.errors import UsageError
from lora_convert.findings import Finding
from lora_convert.io import shipped_data
from lora_convert.io.dtypes import TORCH_DTYPE_NAMES
from lora_convert.io.shipped_data import ANY, STRING, Choice, ListOf, MapOf, Object, check, fail
from lora_convert.io.small_files import read_small_text

TYPES = ("int", "float", "bool", "choice", "list", "text")
# What a flag does to one adapter (the `effect` of each flag in the data):
EFFECTS = (
    "max_rank",  # a rank above the value: the adapter is refused
    "target_modules",  # modules not listed: dropped (vLLM) or the adapter refused (SGLang), params.outcome
    "lora_dtype",  # the buffers' dtype: the adapter's factors are cast
    "fully_sharded",  # with TP > 1, MoE LoRA A is sliced along the rank
    "tp",  # the tensor-parallel size (the sharding check, --tp)
    "enable",  # LoRA on at all: validate assumes it is
    "multi_adapter",  # slots, eviction: only matters when several adapters share the server
    "none",  # kernels, chunking: no effect on what is applied
    "unmodelled",  # changes what loads in ways the rules do not describe: a warning when set
)
_FLAG_FIELDS = {
    "type": Choice(TYPES),
    "choices": ListOf(ANY),
    "min": ANY,
    "default": ANY,
    "effect": Choice(EFFECTS),
    "params": MapOf(ANY),
    "aliases": ListOf(STRING),
    "source": STRING,
}
_FLAG = Object(
    required={
        "name": STRING,
        "type": _FLAG_FIELDS["type"],
        "default": ANY,
        "effect": _FLAG_FIELDS["effect"],
        "source": STRING,
    },
    optional={k: v for k, v in _FLAG_FIELDS.items() if k not in ("type", "default", "effect", "source")},
    label="name",
)
_CHANGE = Object(
    required={"name": STRING, "source": STRING},
    optional={k: v for k, v in _FLAG_FIELDS.items() if k != "source"},
    label="name",
)
_RELEASE = Object(
    required={"version": STRING},
    optional={
        "flags": ListOf(_FLAG),
        "extends": STRING,
        "flags_changed": ListOf(_CHANGE),
        "flags_removed": ListOf(Object(required={"name": STRING, "source": STRING}, label="name")),
        "flags_added": ListOf(_FLAG),
    },
    label="version",
)
FILE_SPEC = Object(required={"engine": STRING, "releases": ListOf(_RELEASE)})


@dataclass(frozen=True)
class ServerFlag:
    """One flag of one release: its name, how its value is read, its default and what it changes."""

    name: str
    type: str
    default: Any
    effect: str
    source: str
    choices: tuple = ()
    min: int | None = None
    params: dict = field(default_factory=dict, hash=False)
    aliases: tuple[str, ...] = ()


def _file_name(engine: str) -> str:
    return f"{engine}-server-args.json"


@cache
def release_flags(release: EngineRelease) -> dict[str, ServerFlag]:
    """name -> ServerFlag of one release (its `extends` chain resolved). A release with a rule file but no entry here
    is a SchemaError naming the file: every described release says what its flags are."""
    file = f"engines/{_file_name(release.engine)}"
    doc = check(
        shipped_data.read_resource(resources.files(ENGINE_PACKAGE).joinpath(_file_name(release.engine)), file),
        FILE_SPEC,
        file,
    )
    if doc["engine"] != release.engine:
        raise fail(file, "engine", f"expected {release.engine!r} (the file name and its contents must agree)")
    entries = {e["version"]: (i, e) for i, e in enumerate(doc["releases"])}
    if release.version not in entries:
        raise fail(file, "releases", f"expected an entry for {release.spec} (it has a rule file), got none")
    return {f["name"]: _flag(f) for f in _resolve(entries, release.version, (), file)}


def _resolve(entries: dict, version: str, seen: tuple, file: str) -> list[dict]:
    i, entry = entries[version]
    where = f"releases[{i}] ({version})"
    if "extends" not in entry:
        if "flags" not in entry:
            raise fail(file, where, "expected `flags` or `extends`, got neither")
        return entry["flags"]
    parent = entry["extends"]
    if parent not in entries or parent in (*seen, version):
        raise fail(file, f"{where}.extends", f"expected another release of this file, not in a cycle, got {parent!r}")
    flags = {f["name"]: f for f in _resolve(entries, parent, (*seen, version), file)}
    for key in ("flags_removed", "flags_changed"):
        for j, change in enumerate(entry.get(key, [])):
            if change["name"] not in flags:
                raise fail(file, f"{where}.{key}[{j}].name", f"expected a flag of {parent}, got {change['name']!r}")
            flags[change["name"]] = None if key == "flags_removed" else {**flags[change["name"]], **change}
    for j, added in enumerate(entry.get("flags_added", [])):
        if flags.get(added["name"]):
            raise fail(file, f"{where}.flags_added[{j}].name", f"expected a flag {parent} lacks, got {added['name']!r}")
        flags[added["name"]] = added
    return [f for f in flags.values() if f]


def _flag(raw: dict) -> ServerFlag:
    return ServerFlag(
        name=raw["name"],
        type=raw["type"],
        default=raw["default"],
        effect=raw["effect"],
        source=raw["source"],
        choices=tuple(raw.get("choices", ())),
        min=raw.get("min"),
        params=dict(raw.get("params", {})),
        aliases=tuple(raw.get("aliases", ())),
    )


# ------------------------------------------------------------------------------------------------ parsing
@dataclass(frozen=True)
class ServerArgs:
    """The flags a server of one engine release was started with: those given, and the release's defaults."""

    release: EngineRelease
    label: str  # "vLLM 0.34.0"
    flags: dict[str, ServerFlag] = field(hash=False)
    given: dict[str, Any] = field(hash=False)  # flag name -> value, as given (after type checks)
    ignored: tuple[str, ...] = ()  # words of the command line that are not about LoRA

    def value(self, name: str) -> Any:
        return self.given[name] if name in self.given else self.flags[name].default

    def by_effect(self, effect: str) -> ServerFlag | None:
        return next((f for f in self.flags.values() if f.effect == effect), None)

    @property
    def tp(self) -> int | None:
        """The tensor-parallel size given (None: not given)."""
        flag = self.by_effect("tp")
        return self.given.get(flag.name) if flag else None

    def replaced_rules(self) -> set[str]:
        """Rule ids whose assumption about a flag's default the given flags replace (vLLM's `max-lora-rank`: the
        rank limit is now known, and `rank-above-max` below decides)."""
        return {f.params["replaces_rule"] for f in self.flags.values() if f.params.get("replaces_rule")}

    def to_json(self) -> dict[str, Any]:
        return {"release": self.release.spec, "given": dict(self.given), "ignored": list(self.ignored)}


def parse_server_args(engine: str, text: str | None = None, file: str | Path | None = None) -> ServerArgs | None:
    """The server flags of `text` (one command line) or `file` (the same, over lines; `#` starts a comment) for the
    engine release `engine` names; None when neither is given. Raises UsageError (exit 2) on both, an unreadable
    file, words that are not valid shell words, an unknown LoRA flag or a value of the wrong type."""
    words = server_args_words(text, file)
    if words is None:
        return None
    if engine in (None, "", "none"):
        raise UsageError(
            "--server-args / --server-args-file describe the flags of a serving engine, but no --engine was given.",
            hint="Add --engine vllm or --engine sglang (or ENGINE==VERSION) to check what that server does.",
        )
    where = "--server-args" if file is None else f"--server-args-file {file}"
    release = resolve_engine(engine)
    flags = release_flags(release)
    given, ignored = _read_words(words, flags, release, where)
    return ServerArgs(release, engine_info(release.spec)["label"], flags, given, tuple(ignored))


def server_args_words(text: str | None = None, file: str | Path | None = None) -> list[str] | None:
    """The words of the server's command line given as `text` or in `file` (`#` comments there); None: neither."""
    if text is None and file is None:
        return None
    if text is not None and file is not None:
        raise UsageError("Give the server's flags once: --server-args or --server-args-file, not both.")
    where = "--server-args"
    if file is not None:
        where = f"--server-args-file {file}"
        text = read_small_text(Path(file), UsageError, hint="Pass a text file holding the server's flags.")
    try:
        return shlex.split(text or "", comments=file is not None)
    except ValueError as exc:
        raise UsageError(f"{where}: not valid shell words ({exc}): {text!r}.") from None


def _read_words(words: list[str], flags: dict[str, ServerFlag], release, where: str):
    names = {alias: f for f in flags.values() for alias in (f.name, *f.aliases)}
    given: dict[str, Any] = {}
    ignored: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if not word.startswith("-") or word == "-":
            ignored.append(word)  # `serve`, the model path: not about LoRA
            continue
        name, eq, inline = word.partition("=")
        negated = name.startswith("--no-") and names.get("--" + name[5:]) is not None
        flag = names.get("--" + name[5:]) if negated else names.get(name)
        if flag is None:
            if "lora" in name.lower():
                known = ", ".join(sorted(flags))
                raise UsageError(
                    f"{where}: {name} is not a LoRA flag of {release.spec} (its LoRA flags: {known}). A flag "
                    f"about LoRA that this release does not know cannot be left out of the verdict.",
                    hint="Check the spelling against `vllm serve --help` / `python -m sglang.launch_server --help` of "
                    "the release you serve, or name that release with --engine ENGINE==VERSION.",
                )
            values = [] if eq else _values_after(words, i)
            i += len(values)
            ignored.append(" ".join([word, *values]))
            continue
        if flag.type == "bool":
            given[flag.name] = _bool(flag, inline if eq else None, negated, where)
            continue
        values = [inline] if eq else _values_after(words, i)
        i += 0 if eq else len(values)
        given[flag.name] = _typed(flag, values, where, name)
    return given, ignored


def _values_after(words: list[str], i: int) -> list[str]:
    """The words from `i` up to the next flag (a negative number is a value, not a flag)."""
    out = []
    while i < len(words) and not (words[i].startswith("-") and not _is_number(words[i])):
        out.append(words[i])
        i += 1
    return out


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


def _bad(flag: ServerFlag, name: str, expected: str, got: Any, where: str) -> UsageError:
    return UsageError(
        f"{where}: {name} expects {expected}, got {got!r} ({flag.source}).",
        hint=f"Give {flag.name} a value the engine accepts, as you start the server with it.",
    )


def _bool(flag: ServerFlag, inline: str | None, negated: bool, where: str) -> bool:
    if inline is None:
        return not negated
    if negated or inline.lower() not in ("true", "false"):
        raise _bad(flag, flag.name, "no value (or --no-" + flag.name[2:] + ")", inline, where)
    return inline.lower() == "true"


def _typed(flag: ServerFlag, values: list[str], where: str, name: str) -> Any:
    if flag.type == "list":
        if not values:
            raise _bad(flag, name, "one or more names", "nothing", where)
        bad = [v for v in values if flag.choices and v not in flag.choices]
        if bad:
            raise _bad(flag, name, "names among " + ", ".join(map(str, flag.choices)), " ".join(bad), where)
        return tuple(values)
    if len(values) != 1:
        raise _bad(flag, name, "one value", " ".join(values) or "nothing", where)
    raw = values[0]
    value: Any = raw
    if flag.type in ("int", "float") or (flag.type == "choice" and flag.choices and isinstance(flag.choices[0], int)):
        try:
            value = float(raw) if flag.type == "float" else int(raw)
        except ValueError:
            raise _bad(flag, name, "a number" if flag.type == "float" else "an integer", raw, where) from None
    if flag.choices and value not in flag.choices:
        raise _bad(flag, name, "one of " + ", ".join(map(str, flag.choices)), raw, where)
    if flag.min is not None and value < flag.min:
        raise _bad(flag, name, f"a number >= {flag.min}", raw, where)
    return value


# ------------------------------------------------------------------------------------------------ effects
@dataclass
class ServerEffect:
    """One finding the server's flags cause: its outcome for the prediction (an ENGINE_OUTCOMES key, or None for a
    note) and the PEFT module paths it is about (empty: the adapter as a whole)."""

    finding: Finding
    outcome: str | None
    modules: list[str] = field(default_factory=list)


def effects(args: ServerArgs, adapter, tp: int | None = None, classes: tuple[str, ...] = ()) -> list[ServerEffect]:
    """What the given flags (and the defaults of those not given) do to `adapter` (lora_convert.peft.adapter.Adapter);
    `tp`: the tensor-parallel size in effect (--tp or the flags'); `classes`: the base config's `architectures` (the
    model class whose packed-module mapping vLLM matches targets with). The first is always the note naming the
    flags."""
    out = [_flags_note(args)]
    for flag in args.flags.values():
        value = args.value(flag.name)
        if flag.effect == "max_rank" and value is not None:
            out += _rank_above_max(args, flag, value, adapter)
        elif flag.effect == "target_modules" and value is not None:
            out += _targets(args, flag, value, adapter, classes)
        elif flag.effect == "lora_dtype" and value not in (None, "auto"):
            out += _dtype(args, flag, value, adapter)
        elif flag.effect == "fully_sharded" and value and (tp or 1) > 1:
            out += _fully_sharded(args, flag, tp, adapter)
        elif flag.effect == "enable" and args.given.get(flag.name) is False:
            out.append(_disabled(args, flag))
        elif flag.effect == "unmodelled" and flag.name in args.given and value != flag.default:
            out.append(_unmodelled(args, flag, value))
    return out


def _label(args: ServerArgs, flag: ServerFlag) -> str:
    return f"{args.label} {flag.name} {_show(args.value(flag.name))}"


def _show(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _flags_note(args: ServerArgs) -> ServerEffect:
    given = ", ".join(f"{n} {_show(v)}" if v is not True else n for n, v in args.given.items()) or "none"
    multi = sorted(n for n, f in args.flags.items() if f.effect == "multi_adapter" and n in args.given)
    parts = [
        f"{args.label} server flags: given {given}; every other LoRA flag has the release's default.",
        f" Ignored (not about LoRA): {', '.join(args.ignored)}." if args.ignored else "",
        f" {', '.join(multi)} only matter when several adapters share the server; one adapter loads the same."
        if multi
        else "",
    ]
    return ServerEffect(finding("server-args.flags", "".join(parts)), None)


def _adapter_rank(flag: ServerFlag, adapter) -> int:
    ranks = [adapter.config.r or 0]
    if flag.params.get("rank_pattern"):
        ranks += [int(r) for r in (getattr(adapter.config, "rank_pattern", None) or {}).values()]
    return max(ranks)


def _rank_above_max(args: ServerArgs, flag: ServerFlag, limit: int, adapter) -> list[ServerEffect]:
    rank = _adapter_rank(flag, adapter)
    if rank <= limit:
        return []
    wanted = next((c for c in flag.choices if c >= rank), rank)
    message = (
        f"[{args.label}: load-failure] The adapter's rank is {rank}, above {flag.name} {limit}"
        f"{'' if flag.name in args.given else ' (the default)'}: the server refuses to load it (source: {flag.source})."
    )
    return [
        ServerEffect(
            finding(
                "server-args.rank-above-max",
                message,
                keys=["r"],
                expected=f"<= {limit}",
                actual=rank,
                fix=f"Start the server with {flag.name} {wanted}",
            ),
            "load-failure",
        )
    ]


def _leaf(module) -> str:
    if module.expert is not None or module.kind == "fused_experts":
        return "experts"  # the engine's MoE layer: one module for every expert
    return module.module.rsplit(".", 1)[-1]


def packed_mapping(flag: ServerFlag, classes: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """The packed-module mapping vLLM matches `--lora-target-modules` with: the base class's own
    `packed_modules_mapping` (params.packed_by_class, read from the release's model files), else the flag's default
    `packed`."""
    by_class = flag.params.get("packed_by_class", {})
    found = next((by_class[c] for c in classes if c in by_class), None)
    return found["packed"] if found is not None else flag.params.get("packed", {})


def _targets(args: ServerArgs, flag: ServerFlag, targets: tuple, adapter, classes=()) -> list[ServerEffect]:
    listed = set(targets)
    if flag.params.get("outcome") == "load-failure":  # SGLang: the adapter's normalized targets must all be listed
        return _targets_refused(args, flag, listed, adapter)
    packed = packed_mapping(flag, classes)
    parent = {child: p for p, children in packed.items() for child in children}

    def served(module) -> bool:
        leaf = _leaf(module)
        family = {leaf, parent.get(leaf, leaf), *packed.get(parent.get(leaf, leaf), [])}
        return bool(family & listed) or module.module in listed

    excluded = [m for m in adapter.modules if not served(m)]
    if not excluded:
        return []
    names = sorted({_leaf(m) for m in excluded})
    message = (
        f"[{args.label}: dropped] {len(excluded)} module(s) ({', '.join(names)}) are not in {flag.name} "
        f"{_show(targets)}: the server does not wrap them with LoRA, and their weights load without error and are "
        f"never applied (source: {flag.source})."
    )
    fix = f"Start the server with {flag.name} {' '.join(sorted(listed | set(names)))}, or leave the flag out"
    keys = [k for m in excluded for k in m.keys]
    return [
        ServerEffect(
            finding(
                "server-args.target-excluded", message, keys=keys[:50], expected="applied", actual="dropped", fix=fix
            ),
            "dropped",
            [m.module for m in excluded],
        )
    ]


def _normalized_targets(names, normalize: dict) -> set[str]:
    """Target names as SGLang normalizes them (get_normalized_target_modules): each name's last dotted component,
    renamed by `normalize` (q_proj -> qkv_proj, ...)."""
    return {normalize.get(n.rsplit(".", 1)[-1], n.rsplit(".", 1)[-1]) for n in names}


def _targets_refused(args: ServerArgs, flag: ServerFlag, listed: set, adapter) -> list[ServerEffect]:
    """SGLang compares the adapter's own `target_modules` (adapter_config.json, normalized) with the flag's list
    (normalized the same way), not the modules the adapter holds: a list that is not a subset refuses the adapter.
    With the flag given, an adapter whose target_modules is `all-linear` / `all` is not checked at all, and `all` in
    the flag allows everything."""
    declared = adapter.config.target_modules
    if "all" in listed or not isinstance(declared, list):
        return []  # a string other than all-linear/all is refused whatever the flags (the rules' regex-targets)
    normalize = flag.params.get("normalize", {})
    server = _normalized_targets(listed, normalize)
    missing = sorted(_normalized_targets(declared, normalize) - server)
    if not missing:
        return []
    message = (
        f"[{args.label}: load-failure] The adapter's target_modules {', '.join(missing)} are not in {flag.name} "
        f"{_show(tuple(sorted(listed)))} (adapter_config.json's names, as the server normalizes them): it refuses "
        f"the adapter (source: {flag.source})."
    )
    return [
        ServerEffect(
            finding(
                "server-args.target-refused",
                message,
                expected=f"a subset of {sorted(server)}",
                actual=missing,
                fix=f"Start the server with {flag.name} {' '.join(sorted(server | set(missing)))} (or all)",
            ),
            "load-failure",
        )
    ]


def _dtype(args: ServerArgs, flag: ServerFlag, value: str, adapter) -> list[ServerEffect]:
    dtypes = sorted(
        {TORCH_DTYPE_NAMES.get(t.dtype, t.dtype) for m in adapter.modules for t in (m.lora_A, m.lora_B) if t}
    )
    others = [d for d in dtypes if d != value]
    if not others:
        return []
    message = (
        f"{args.label} {flag.name} {value}: the adapter's {', '.join(others)} factors are rounded to {value} as they "
        f"load (source: {flag.source})."
    )
    return [ServerEffect(finding("server-args.lora-dtype", message, expected=value, actual=", ".join(others)), None)]


def _fully_sharded(args: ServerArgs, flag: ServerFlag, tp: int, adapter) -> list[ServerEffect]:
    experts = [m for m in adapter.modules if (m.expert is not None or m.kind == "fused_experts")]
    bad = [m for m in experts if (m.rank or m.config_rank) % tp]
    if not bad:
        return []
    ranks = sorted({m.rank or m.config_rank for m in bad})
    message = (
        f"[{args.label}: load-failure] {flag.name} with tensor-parallel size {tp}: the MoE LoRA A factors are "
        f"split along the rank, and rank(s) {', '.join(map(str, ranks))} of {len(bad)} expert module(s) do not divide "
        f"by {tp} (an assertion fails as the adapter loads; source: {flag.source})."
    )
    keys = [k for m in bad for k in m.keys]
    return [
        ServerEffect(
            finding(
                "server-args.sharded-rank",
                message,
                keys=keys[:50],
                expected=f"a multiple of {tp}",
                actual=ranks,
                fix=f"Leave out {flag.name}, or use a rank that divides by {tp}",
            ),
            "load-failure",
            [m.module for m in bad],
        )
    ]


def _disabled(args: ServerArgs, flag: ServerFlag) -> ServerEffect:
    message = (
        f"[{args.label}: load-failure] --no-{flag.name[2:]}: the server runs without LoRA and loads no adapter "
        f"(source: {flag.source})."
    )
    return ServerEffect(
        finding(
            "server-args.lora-disabled", message, expected=True, actual=False, fix=f"Start the server with {flag.name}"
        ),
        "load-failure",
    )


def _unmodelled(args: ServerArgs, flag: ServerFlag, value: Any) -> ServerEffect:
    message = (
        f"{_label(args, flag)} changes what the server loads in a way these rules do not describe; the verdict "
        f"assumes its default ({flag.default}) (source: {flag.source})."
    )
    return ServerEffect(finding("server-args.unmodelled", message, expected=flag.default, actual=_show(value)), None)
