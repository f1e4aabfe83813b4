"""`normalize --layout gguf`: the plan written as the one GGUF LoRA file (adapter.gguf) llama.cpp loads and applies
exactly on the base's GGUF made by llama.cpp's own convert_hf_to_gguf.py (docs/formats.md).

llama.cpp's adapter loader (llama-cpp-python 0.3.36, vendor/llama.cpp/src/llama-adapter.cpp) requires
`general.type` = "adapter" (:205-208), `general.architecture` equal to the base's (:210-214), `adapter.type` =
"lora" (:216-219); reads one `adapter.lora.alpha` for the whole file (:221); pairs every `<base tensor>.lora_a`
with its `.lora_b` and refuses any other suffix (:274-297), a pair missing a side (:328-330), a base tensor the
model lacks (:333-336) and shapes other than lora_a ne [in, r] and lora_b ne [r, out] (:364-371), i.e. PEFT's own
A [r, in] and B [out, r] in row-major order. Applied as `scale * alpha / r * B (A x)` with r = lora_b's ne[0]
(src/llama-graph.cpp:1540-1549, llama-adapter.h:52-56). So the file carries the `peft` layout's modules (one rank
R, each module's PEFT scaling folded into B) under gguf-py's own TensorNameMap names for the base's llama.cpp
architecture, with alpha = R: every module's scale is exactly 1. Where llama.cpp's converter reorders a weight's
output rows (Llama's q/k RoPE permutation), B's rows are reordered the same way; where it multiplies a weight's
output rows by constants of the config (muP multipliers folded into the weights), B's rows are multiplied by the same
constants, so B A x is scaled exactly as the base's W x. Routed experts are llama.cpp's
stacked `ffn_{gate,up,down}_exps` pairs: lora_a [E, R, in] and lora_b [E, out, R] per slice (the loader's shape
check reads ne[0] and ne[1] only, :364-371; applied per selected expert with ggml_mul_mat_id,
src/llama-graph.cpp:1574-1592), written after the dense modules, one expert group at a time.

Architecture knowledge (base model_type -> llama.cpp architecture, row reorderings, the converter's renames of a
weight's path before gguf-py names it, the tensors llama.cpp never applies a LoRA pair on, the base forms it cannot
convert or load, as schema expressions over the config, why a model type is not proven) is data:
lora_convert/convert/gguf_architectures.json. Refused, named: model types it does not list (with the reason where it
records one), a base of a form llama.cpp cannot take (the whole adapter), modules on a tensor llama.cpp never
applies LoRA to, embedding LoRA (llama.cpp applies token_embd's pair transposed, and lora-convert has not proven it),
and any module gguf-py's TensorNameMap has no llama.cpp tensor for (vision modules among them).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np

from lora_convert.arch import expr
from lora_convert.convert import engine_layouts, factors
from lora_convert.convert.engine_layouts import LayoutGroup, LayoutPlan, Refused
from lora_convert.convert.group_tensors import iter_group_tensors
from lora_convert.convert.layout_rules import GGUF_LAYOUT, PEFT_LAYOUT
from lora_convert.convert.plan import DroppedModule, Plan, PlannedGroup
from lora_convert.errors import SchemaError, UnsupportedAdapterError
from lora_convert.io.gguf_file import ggml_type, import_gguf
from lora_convert.io.safetensors_writer import TensorSpec
from lora_convert.io.shipped_data import BOOL, STRING, ListOf, MapOf, Object, load_shipped
from lora_convert.text import refused_listing

GGUF_FILE = "adapter.gguf"
DATA_FILE = "gguf_architectures.json"
REFUSED_CODE = "layout.gguf-unsupported"
# a base form llama.cpp cannot convert or load: a config list field that is non-empty, two config fields that differ,
# or a schema expression over the config that is true (`each_layer`: for some layer index i)
_BASE_FORM = Object(
    required={"reason": STRING},
    optional={"non_empty": STRING, "differs": ListOf(STRING, non_empty=True), "when": STRING, "each_layer": BOOL},
)
_SPEC = Object(
    required={
        "llama_cpp": STRING,
        "model_types": MapOf(
            Object(
                required={"architecture": STRING, "row_permutations": MapOf(ListOf(STRING, non_empty=True))},
                optional={
                    "source": STRING,
                    "refused_tensors": MapOf(STRING),
                    "refused_bases": ListOf(_BASE_FORM),
                    "path_renames": ListOf(ListOf(STRING, non_empty=True)),
                    "row_scales": MapOf(ListOf(ListOf(STRING, non_empty=True), non_empty=True)),
                    "refused_wrapped": STRING,
                },
            )
        ),
    },
    optional={"not_proven": MapOf(STRING)},
)


@dataclass(frozen=True)
class GgufModelType:
    architecture: str  # llama.cpp's general.architecture (a gguf-py MODEL_ARCH name)
    row_permutations: dict[str, tuple[str, ...]]  # gguf tensor kind -> config fields naming its head count (first set)
    refused_tensors: dict[str, str] = field(default_factory=dict)  # gguf tensor kind -> why no LoRA pair reaches it
    refused_bases: tuple[dict, ...] = ()  # base forms llama.cpp cannot convert or load (_BASE_FORM)
    # (regex, replacement): the converter's own renames of a weight's path before its TensorNameMap lookup
    path_renames: tuple[tuple[str, str], ...] = ()
    # gguf tensor kind -> ((rows, factor), ...): consecutive row blocks the converter multiplies by `factor`, both
    # schema expressions over the config (`out`: the weight's output rows)
    row_scales: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    refused_wrapped: str | None = None  # why a base whose text model sits in a wrapper (VL) is refused, if it is


@cache
def _data() -> dict[str, Any]:
    return load_shipped("lora_convert.convert", DATA_FILE, _SPEC, f"convert/{DATA_FILE}")


def not_proven() -> dict[str, str]:
    """Base config `model_type` -> why llama.cpp is not proven on it (DATA_FILE `not_proven`), where known."""
    return dict(_data().get("not_proven", {}))


def not_proven_reason(model_type: object) -> str | None:
    return not_proven().get(model_type) if isinstance(model_type, str) else None


@cache
def gguf_model_types() -> dict[str, GgufModelType]:
    """Base config `model_type` -> what llama.cpp makes of it (DATA_FILE)."""
    data = _data()
    return {
        model_type: GgufModelType(
            d["architecture"],
            {k: tuple(v) for k, v in d["row_permutations"].items()},
            dict(d.get("refused_tensors", {})),
            tuple(d.get("refused_bases", ())),
            tuple((rx, to) for rx, to in d.get("path_renames", ())),
            {k: tuple((rows, factor) for rows, factor in v) for k, v in d.get("row_scales", {}).items()},
            d.get("refused_wrapped"),
        )
        for model_type, d in data["model_types"].items()
    }


@dataclass(frozen=True)
class GgufTensor:
    """One lora_a or lora_b of the file: the `peft` layout's tensor `key`, written as `name`."""

    key: str
    name: str
    heads: int | None = None  # lora_b only: reorder its rows as llama.cpp's converter reorders the base's
    row_scale: tuple[float, ...] | None = None  # lora_b only: multiply its rows as the converter multiplies the base's


@dataclass(frozen=True)
class ExpertGroup:
    """A routed-expert group written as llama.cpp's stacked pairs: `names[i]` (the base tensor) for slice i."""

    group: PlannedGroup
    names: tuple[str, ...]


@dataclass(frozen=True)
class GgufLayout:
    layout: LayoutPlan  # the settled `peft` layout of the dense groups: modules, refusals, drops
    architecture: str
    tensors: tuple[GgufTensor, ...]
    experts: tuple[ExpertGroup, ...] = ()
    notes: tuple[str, ...] = ()
    dropped: tuple[Any, ...] = field(default=())

    def tensor_specs(self, dtype: str) -> list[TensorSpec]:
        shapes = {s.name: s for s in self.layout.tensor_specs(dtype)}
        specs = [TensorSpec(t.name, dtype, shapes[t.key].shape) for t in self.tensors]
        R = self.layout.rank
        for eg in self.experts:
            g = eg.group
            for sl, name in zip(g.slices, eg.names, strict=True):
                specs.append(TensorSpec(f"{name}.lora_a", dtype, (g.experts, R, g.in_features)))
                specs.append(TensorSpec(f"{name}.lora_b", dtype, (g.experts, sl.out_features, R)))
        return specs

    def metadata(self) -> dict[str, Any]:
        gguf = import_gguf()
        return {
            gguf.Keys.General.TYPE: "adapter",
            gguf.Keys.Adapter.TYPE: "lora",
            # alpha = r of every tensor: llama.cpp's scale alpha / r is exactly 1, the PEFT scaling being in B already
            gguf.Keys.Adapter.LORA_ALPHA: float(self.layout.rank),
            gguf.Keys.General.NAME: "lora-convert",
        }

    def report_json(self) -> dict[str, Any]:
        doc = self.layout.report_json()
        doc.update(layout=GGUF_LAYOUT, engine="llama.cpp", architecture=self.architecture, file=GGUF_FILE)
        doc["tensors"] = {t.key: t.name for t in self.tensors}
        doc["expert_tensors"] = {eg.group.key: list(eg.names) for eg in self.experts}
        doc["notes"] = list(self.notes)
        return doc

    def summary(self) -> dict[str, Any]:
        return {
            "layout": GGUF_LAYOUT,
            "engine": "llama.cpp",
            "architecture": self.architecture,
            "file": GGUF_FILE,
            "modules_written": len(self.tensors) // 2 + sum(len(eg.names) for eg in self.experts),
            "notes": list(self.notes),
        }


def plan_gguf_layout(plan: Plan, dtype: str, *, drop_unsupported: bool = False) -> GgufLayout:
    """Everything `iter_gguf_tensors` will write, decided from the plan: names, refusals, drops."""
    config = dict(getattr(plan.arch, "config", None) or {})
    model_type = config.get("model_type")
    target = gguf_model_types().get(model_type) if isinstance(model_type, str) else None
    if target is None:
        listed = ", ".join(sorted(gguf_model_types()))
        why = not_proven_reason(model_type)
        raise UnsupportedAdapterError(
            f"--layout gguf: lora-convert has not proven llama.cpp on model_type {model_type!r} (family "
            f"{plan.family!r})" + (f": {why}." if why else f"; proven: {listed}."),
            hint="Write --layout peft (every module's scale folded into B, r = lora_alpha: right for llama.cpp's own "
            "convert_lora_to_gguf.py, which reads lora_alpha only) and convert that with convert_lora_to_gguf.py.",
        )
    if target.refused_wrapped and getattr(plan.arch, "wrapped", False):
        raise UnsupportedAdapterError(
            f"--layout gguf: llama.cpp cannot take this {model_type} base in its wrapper: {target.refused_wrapped}.",
            hint="Write --layout peft or stacked for this base.",
        )
    _refuse_base_form(target, config, model_type)
    if ggml_type(dtype) is None:
        raise UnsupportedAdapterError(
            f"--layout gguf: llama.cpp has no {dtype} tensor type for LoRA factors.",
            hint="Pass --dtype fp32, fp16 or bf16.",
        )
    lp = engine_layouts.verify_layout(engine_layouts.plan_layout(plan, PEFT_LAYOUT))
    names = _name_map(target, plan)
    # the zero-filled expert sides the `peft` layout adds (its engines need both) add nothing here
    groups = [lg for lg in lp.groups if not lg.added]
    experts = {
        id(lg.group): ExpertGroup(lg.group, tuple(_expert_names(lg, names))) for lg in groups if lg.group.experts
    }
    refused = [r for lg in groups if (r := _refusal(lg, names, target, experts)) is not None]
    if refused and not drop_unsupported:
        listing = refused_listing((r.group.key, r.reason) for r in refused)
        raise UnsupportedAdapterError(
            f"--layout gguf: {len(refused)} module group(s) cannot be applied exactly by llama.cpp: {listing}.",
            hint="Pass --drop-unsupported to leave them out (listed in lora_convert_report.json and on stderr; the "
            "served adapter then differs from the trained one), or use --layout peft / stacked.",
        )
    refused_ids = {id(r.group) for r in refused}
    kept = [lg for lg in groups if id(lg.group) not in refused_ids]
    dense = tuple(lg for lg in kept if not lg.group.experts)
    # experts leave the `peft` layout (written here, stacked); its rank is then the plan's: R for every tensor
    lp = dataclasses.replace(lp, groups=dense, refused=(*lp.refused, *refused), out_rank=0)
    # settle_layout refuses a layout with nothing left; experts alone are something here
    lp = engine_layouts.settle_layout(lp, drop_unsupported=True) if dense or not kept else _settle_experts_only(lp)
    tensors = tuple(_tensors(lp, names, target, config, model_type))
    stacked = tuple(experts[id(lg.group)] for lg in kept if lg.group.experts)
    note = f"written for llama.cpp architecture {target.architecture!r} (general.architecture), alpha = rank"
    return GgufLayout(lp, target.architecture, tensors, stacked, (note,), lp.dropped)


def _refuse_base_form(target: GgufModelType, config: dict, model_type: str) -> None:
    """Raises where the base itself is a form llama.cpp cannot convert or load (DATA_FILE `refused_bases`): no
    adapter on it can be applied by llama.cpp at all."""
    for form in target.refused_bases:
        if "non_empty" in form:
            hit = bool(config.get(form["non_empty"]))
            what = f"{form['non_empty']} = {config.get(form['non_empty'])!r}"
        elif "when" in form:
            hit = _form_holds(form, config)
            what = ", ".join(f"{f} = {config.get(f)!r}" for f in sorted(expr.names_in(form["when"]) - {"i"}))
        else:
            values = [config.get(f) for f in form["differs"]]
            hit = len(set(map(repr, values))) > 1
            what = ", ".join(f"{f} = {v!r}" for f, v in zip(form["differs"], values, strict=True))
        if hit:
            raise UnsupportedAdapterError(
                f"--layout gguf: llama.cpp cannot take this {model_type} base ({what}): {form['reason']}",
                hint="Write --layout peft or stacked for this base; no GGUF LoRA can be applied to it by llama.cpp.",
            )


def _form_holds(form: dict, config: dict) -> bool:
    """Whether a `when` base form is true of the config (for some layer i with `each_layer`); one the config cannot
    answer (a field it lacks in arithmetic) counts as true: the base is refused, not guessed about."""
    layers = range(int(config.get("num_hidden_layers") or 0)) if form.get("each_layer") else (None,)
    try:
        return any(expr.evaluate(form["when"], config, **({} if i is None else {"i": i})) for i in layers)
    except SchemaError:
        return True


def _settle_experts_only(lp: LayoutPlan) -> LayoutPlan:
    """settle_layout's drops (the plan's, then each refused group's) for a layout whose every kept group is routed
    experts, which settle_layout would refuse as empty."""
    dropped = list(lp.plan.dropped)
    for r in lp.refused:
        keys = sorted({k for s in r.group.slices for k in (s.source_keys() or [])})
        dropped.append(DroppedModule(r.group.key, keys, r.reason, r.code))
    return dataclasses.replace(lp, dropped=tuple(dropped), settled=True)


@dataclass(frozen=True)
class _Names:
    """gguf-py's TensorNameMap for the base's architecture, and the converter's renames tried before it."""

    table: Any
    renames: tuple[tuple[re.Pattern, str], ...]

    def get(self, path: str) -> str | None:
        """llama.cpp's name of the base weight a module adapts (`blk.0.attn_q.weight`), or None."""
        for tried in (path, *(rx.sub(to, path) for rx, to in self.renames)):
            if (name := self.table.get_name(tried + ".weight", try_suffixes=(".weight",))) is not None:
                return name
        return None


def _name_map(target: GgufModelType, plan: Plan) -> _Names:
    gguf = import_gguf()
    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == target.architecture)
    config = dict(getattr(plan.arch, "config", None) or {})
    blocks = int(config.get("num_hidden_layers") or 0) or 1 + max((g.layer or 0) for g in plan.groups)
    renames = tuple((re.compile(rx), to) for rx, to in target.path_renames)
    return _Names(gguf.TensorNameMap(arch, blocks), renames)


def _expert_names(lg: LayoutGroup, names: _Names) -> Iterator[str]:
    """Each slice's llama.cpp tensor (`blk.0.ffn_gate_exps.weight`), "" where TensorNameMap has none. Tried: the
    slice under the group's container, under the adapter's own experts module (a PEFT 3-D parameter's module:
    transformers 5's `mlp.experts`), and the adapter's per-expert modules with the expert index left out (Mixtral's
    `block_sparse_moe.experts.J.w1` -> `block_sparse_moe.experts.w1`)."""
    g = lg.group
    for sl in g.slices:
        tried = [f"{g.key.rsplit('.', 1)[0]}.{sl.name}"]
        if sl.fused_source is not None:
            tried.append(f"{sl.fused_source.module.module}.{sl.name}")
        for e, ref in sorted(sl.expert_sources.items()):
            tried.append(ref.module.module.replace(f".experts.{e}.", ".experts.", 1))
        yield next((n for n in map(names.get, tried) if n), "")


def _refusal(lg: LayoutGroup, names: _Names, target: GgufModelType, experts: dict) -> Refused | None:
    architecture = target.architecture
    g = lg.group
    if any(m.embedding for m in lg.modules):
        why = "embedding LoRA: llama.cpp applies token_embd's pair transposed, not proven by lora-convert"
    elif g.experts:
        missing = [sl.name for sl, n in zip(g.slices, experts[id(g)].names, strict=True) if not n]
        # the stacked writer scales no rows: an expert tensor the converter scales is refused, not written unscaled
        scaled = [n for n in experts[id(g)].names if n and _kind(n) in target.row_scales]
        if not missing and not scaled:
            return None
        why = (
            f"gguf-py's TensorNameMap has no llama.cpp {architecture} expert tensor for {', '.join(missing)}"
            if missing
            else f"llama.cpp's converter scales the rows of {', '.join(scaled)}, which lora-convert does not for experts"
        )
    else:
        found = {m.path: names.get(m.path) for m in lg.modules}
        missing = [path for path, n in found.items() if n is None]
        kinds = [_kind(n) for n in found.values() if n is not None]
        absent = [target.refused_tensors[k] for k in kinds if k in target.refused_tensors]
        if missing:
            why = f"gguf-py's TensorNameMap has no llama.cpp {architecture} tensor for {', '.join(missing)}"
        elif absent:
            why = absent[0]
        else:
            return None
    return Refused(g, why, REFUSED_CODE)


def _kind(name: str) -> str:
    """`blk.0.attn_kv_b.weight` -> `attn_kv_b`."""
    return name.split(".")[-2]


def _tensors(
    lp: LayoutPlan, names: _Names, target: GgufModelType, config: dict, model_type: str
) -> Iterator[GgufTensor]:
    for lg, m in lp.modules():
        name = names.get(m.path)
        kind = _kind(name)
        fields = target.row_permutations.get(kind, ())
        heads = next((config[f] for f in fields if isinstance(config.get(f), int)), None)
        start, stop = lg.out_rows(m)
        scale = _row_scale(target.row_scales.get(kind), config, stop - start, f"{model_type} {kind}")
        yield GgufTensor(m.a_key, f"{name}.lora_a")
        yield GgufTensor(m.b_key, f"{name}.lora_b", heads, scale)


def _row_scale(blocks: tuple[tuple[str, str], ...] | None, config: dict, out: int, what: str) -> tuple | None:
    """The factor of each output row the converter multiplies the base weight by (DATA_FILE `row_scales`), or None.
    A config that cannot answer, or blocks that do not cover the rows, refuses: a guessed factor is a wrong adapter."""
    if not blocks:
        return None
    factors_of_rows: list[float] = []
    try:
        for rows, factor in blocks:
            n, f = expr.evaluate(rows, config, out=out), expr.evaluate(factor, config, out=out)
            factors_of_rows += [float(f)] * int(n)
    except (SchemaError, TypeError, ValueError) as exc:
        problem = f"the base config cannot give them ({exc})"
    else:
        if len(factors_of_rows) == out:
            return tuple(factors_of_rows)
        problem = f"they cover {len(factors_of_rows)} rows, the weight has {out}"
    raise UnsupportedAdapterError(
        f"--layout gguf: llama.cpp's converter multiplies the {what} weight's rows by config constants, and {problem}.",
        hint="Write --layout peft for this base; its GGUF conversion is not the one lora-convert has proven.",
    )


def _permute_rows(b: np.ndarray, heads: int) -> np.ndarray:
    """B's rows in the order llama.cpp's converter puts the base weight's rows: each head's (2, head_dim/2) rows
    as (head_dim/2, 2) (vendor/llama.cpp conversion/llama.py:176-181)."""
    out, rank = b.shape
    return b.reshape(heads, 2, out // heads // 2, rank).swapaxes(1, 2).reshape(out, rank)


def iter_gguf_tensors(
    gl: GgufLayout, dtype_tag: str, progress=None, *, allow_non_finite: bool = False
) -> Iterator[tuple[str, Any]]:
    """(name, tensor) in `tensor_specs` order: the `peft` layout's tensors, renamed, B's rows reordered where the
    base's are."""
    by_key = {t.key: t for t in gl.tensors}
    if gl.layout.groups:
        for key, tensor in engine_layouts.iter_layout_tensors(
            gl.layout, dtype_tag, progress=progress, allow_non_finite=allow_non_finite
        ):
            t = by_key[key]
            if t.row_scale is not None:  # in transformers' row order, where the converter multiplies them
                scale = np.asarray(t.row_scale, dtype=np.float64)[:, None]
                tensor = (tensor.astype(np.float64) * scale).astype(tensor.dtype)
            yield t.name, (tensor if t.heads is None else _permute_rows(tensor, t.heads))
    R = gl.layout.plan.rank
    groups = [eg.group for eg in gl.experts]
    built = iter_group_tensors(gl.layout.plan, groups, dtype_tag, allow_non_finite=allow_non_finite)
    for eg, (g, A, B) in zip(gl.experts, built, strict=True):
        group_bytes = 0
        for i, (sl, name) in enumerate(zip(g.slices, eg.names, strict=True)):
            # slice i's A-block and B rows of every expert: [E, R, in] and [E, out_i, R] (views of the group)
            a, b = A[:, factors.a_rows(i, R)], B[:, factors.span_rows([sl])]
            group_bytes += a.nbytes + b.nbytes
            yield f"{name}.lora_a", a
            yield f"{name}.lora_b", b
        if progress is not None:
            progress.advance(group_bytes)
        del A, B


def gguf_files(gl: GgufLayout) -> dict[str, str]:
    return {engine_layouts.REPORT_FILE: json.dumps(gl.report_json(), indent=2) + "\n"}
