"""A CPU model of SGLang 0.5.23's LoRA adapter loading, written from ../shared/reference/sglang-loader.md.

It takes what SGLang takes -- the adapter's tensors by key and its adapter_config.json -- plus the base's
config.json, and runs the loader's steps in order:

- `_process_weight` (§1.2): full keys kept, `layers\\.(\\d+)\\.` files a key under a layer (IndexError past
  num_hidden_layers, vision `layers.N` included), keys without a layer dropped unless embed_tokens/lm_head;
- `get_normalized_target_modules` (§1.3): last dotted component, the q/k/v, gate/up, q_a/kv_a map, a string
  other than all/all-linear is a ValueError;
- `_normalize_weights` (§2), per layer, in SGLang's order: R1 q/k/v -> qkv_proj (k missing: zeros_like(v); v
  missing: KeyError; pre-merged A repeated x3), R4 w1/w3/w2 renames (keys only), R5 mamba gate_proj + x_proj ->
  in_proj, R6 in_proj_q/k/v/z -> in_proj_qkvz (all four or nothing), R2 gate/up -> gate_up_proj (up missing:
  zeros_like(gate), or c=1 rename for non-gated experts), R3 q_a + kv_a -> fused_qkv_a_proj_with_mqa with the
  0.5.23 bug (kv_a missing: zeros_like(q_a));
- startup (§1.1, §6): every normalized target needs a `get_hidden_dim` entry (§5) or NotImplementedError;
  FusedMoE is wrapped only when gate_up_proj and down_proj are both targets (§7.1.8);
- the pool copy (§4, §6): `get_target_module_name` (longest target substring, ValueError if none), expert id
  from `experts\\.(\\d+)\\.`, the `<target>_moe` buffer (KeyError if it does not exist), exact shape asserts
  against `[c*r, in]` / `[out, r]` with (in, out) from get_hidden_dim and r = config `r`, and scaling =
  lora_alpha / r from the top level only (rsLoRA and rank/alpha patterns ignored).

The result holds, per normalized module, the tensors as they sit in the pool: A `[c*r, in]` and B `[out, r]`
times the scaling (for experts, one pair per expert). Exceptions are the ones SGLang raises, with its messages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

_LAYER = re.compile(r"layers\.(\d+)\.")
_EXPERT = re.compile(r"experts\.(\d+)\.")

_NORMALIZE = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
    "out_proj": "out_proj",
    "embed_tokens": "embed_tokens",
    "vocab_emb": "embed_tokens",
    "embeddings": "embed_tokens",
    "word_embeddings": "embed_tokens",
    "lm_head": "lm_head",
    "output": "lm_head",
    "unembed_tokens": "lm_head",
    "q_a_proj": "fused_qkv_a_proj_with_mqa",
    "kv_a_proj_with_mqa": "fused_qkv_a_proj_with_mqa",
    "wq_b": "indexer.wq_b",
    "wk": "indexer.wk",
    "weights_proj": "indexer.weights_proj",
}
_SUPPORTED = {  # a model's supported_lora_modules (auto-detection under "all"/"all-linear")
    "qwen3_5": ["qkv_proj", "o_proj", "out_proj", "in_proj_qkvz", "gate_up_proj", "down_proj", "lm_head"],
    "nemotron_h": [
        "qkv_proj",
        "o_proj",
        "out_proj",
        "in_proj",
        "up_proj",
        "gate_up_proj",
        "down_proj",
        "fc1_latent_proj",
        "fc2_latent_proj",
    ],
    "default": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"],
}


def get_normalized_target_modules(target_modules) -> set[str]:
    if isinstance(target_modules, str):
        if target_modules not in ("all", "all-linear"):
            raise ValueError("Only 'all' or 'all-linear' can be used as the string for target module")
        return {"all"}
    return {_NORMALIZE.get(t.rsplit(".", 1)[-1], t.rsplit(".", 1)[-1]) for t in target_modules}


def get_target_module_name(name: str, targets: set[str]) -> str:
    hits = [t for t in targets if t in name]
    if not hits:
        raise ValueError(f"Cannot find target module name for {name} in {targets}")
    return max(hits, key=len)


# ---------------------------------------------------------------------------------------------- the model
class SGLangModel:
    """What the loader asks the base model: layer count, MoE layers and gating, get_hidden_dim (§5)."""

    def __init__(self, base_config: dict):
        cfg = base_config.get("text_config") if isinstance(base_config.get("text_config"), dict) else base_config
        self.c = cfg
        mt = cfg.get("model_type", "")
        self.family = "qwen3_5" if mt.startswith("qwen3_5") else "nemotron_h" if mt == "nemotron_h" else "default"
        self.model_type = mt
        if self.family == "nemotron_h":
            self.types = list(
                cfg.get("layers_block_type")
                or [
                    {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}[ch]
                    for ch in cfg["hybrid_override_pattern"]
                ]
            )
            self.types = [{"linear_attention": "mamba", "full_attention": "attention"}.get(t, t) for t in self.types]
            self.num_layers = len(self.types)
        else:
            self.num_layers = cfg["num_hidden_layers"]
        self.num_experts = cfg.get("num_experts") or cfg.get("num_local_experts") or cfg.get("n_routed_experts") or 0

    def get(self, key, default=None):
        value = self.c.get(key)
        return default if value is None else value

    def is_moe_layer(self, layer: int) -> bool:
        if not self.num_experts:
            return False
        if self.family == "nemotron_h":
            return self.types[layer] == "moe"
        if self.get("first_k_dense_replace") is not None:  # DeepSeek/Kimi _is_layer_sparse
            return layer >= self.c["first_k_dense_replace"] and layer % self.get("moe_layer_freq", 1) == 0
        return True  # Qwen3-MoE, Qwen3-Next, Qwen3.5-MoE, Mixtral: every layer (mlp_only_layers ignored)

    def is_gated(self, layer: int) -> bool:
        return self.family != "nemotron_h"

    def stacked_multiply(self, name: str) -> int:
        if self.family == "nemotron_h" and name == "gate_up_proj_moe":
            return 1
        return {
            "qkv_proj": 3,
            "in_proj_qkvz": 4,
            "gate_up_proj": 2,
            "gate_up_proj_moe": 2,
            "gate_up_proj_shared_moe": 2,
            "in_proj": 2,
            "fused_qkv_a_proj_with_mqa": 2,
        }.get(name, 1)

    def has_dense_mlp_buffer(self) -> bool:
        return not self.num_experts or bool(
            self.get("shared_expert_intermediate_size", 0) or self.get("n_shared_experts", 0)
        )

    def get_hidden_dim(self, name: str, layer: int) -> tuple[int, int]:
        g = self.get
        h, H = g("hidden_size"), g("num_attention_heads")
        KV = g("num_key_value_heads", H)
        d = g("head_dim", h // H)
        V = g("vocab_size")
        if self.family == "qwen3_5":
            kd = g("linear_key_head_dim") * g("linear_num_key_heads")
            vd = g("linear_value_head_dim") * g("linear_num_value_heads")
            width = (
                g("shared_expert_intermediate_size")
                if self.model_type in ("qwen3_5_moe_text", "qwen4_exp_text")
                else g("intermediate_size")
            )
            table = {
                "qkv_proj": (h, d * (H * (2 if g("attn_output_gate", True) else 1) + 2 * KV)),
                "o_proj": (H * d, h),
                "out_proj": (vd, h),
                "in_proj_qkvz": (h, 2 * kd + 2 * vd),
                "gate_up_proj": (h, 2 * width) if width else None,
                "down_proj": (width, h) if width else None,
                "gate_up_proj_moe": (h, 2 * g("moe_intermediate_size", 0)),
                "down_proj_moe": (g("moe_intermediate_size", 0), h),
                "embed_tokens": (V, h),
                "lm_head": (h, V),
            }
        elif self.family == "nemotron_h":
            im = g("mamba_num_heads") * g("mamba_head_dim")
            S = g("moe_shared_expert_intermediate_size", 0) * g("n_shared_experts", 1)
            hm = g("moe_latent_size") or h
            kind = self.types[layer]
            table = {
                "qkv_proj": (h, d * (H + 2 * KV)),
                "o_proj": (d * H, h),
                "out_proj": (im, h),
                "in_proj": (h, 2 * im),
                "x_proj": (h, im),
                "gate_up_proj": (h, 2 * im)
                if kind == "mamba"
                else (h, 2 * S)
                if kind == "moe"
                else (h, 2 * g("intermediate_size")),
                "up_proj": (h, S) if kind == "moe" else (h, g("intermediate_size")),
                "down_proj": (S, h) if kind == "moe" else (g("intermediate_size"), h),
                "gate_up_proj_moe": (hm, g("moe_intermediate_size")),
                "down_proj_moe": (g("moe_intermediate_size"), hm),
                "fc1_latent_proj": (h, hm),
                "fc2_latent_proj": (hm, h),
                "embed_tokens": (V, h),
                "lm_head": (h, V),
            }
        else:
            inter = g("intermediate_size")
            if (
                g("first_k_dense_replace") is not None
                and layer >= g("first_k_dense_replace")
                and layer % g("moe_layer_freq", 1) == 0
            ):
                inter = g("moe_intermediate_size") * g("n_shared_experts", 0)
            if self.model_type == "qwen3_next" and g("shared_expert_intermediate_size"):
                # the memory pool sizes the shared-expert buffers from the real layer (issue 12, proven with
                # SGLang 0.5.23's own code in tests/test_proof_sglang.py), not from intermediate_size
                inter = g("shared_expert_intermediate_size")
            moe_i = g("moe_intermediate_size") or g("intermediate_size")
            nope, rope = g("qk_nope_head_dim", 0), g("qk_rope_head_dim", 0)
            table = {
                "qkv_proj": (h, d * (H + 2 * KV)),
                "o_proj": ((g("v_head_dim") or d) * H, h),
                "gate_up_proj": (h, 2 * inter),
                "down_proj": (inter, h),
                "fused_qkv_a_proj_with_mqa": (h, g("q_lora_rank", 0) + g("kv_lora_rank", 0) + rope),
                "q_b_proj": (g("q_lora_rank"), H * (nope + rope)),
                "kv_b_proj": (g("kv_lora_rank"), H * (nope + g("v_head_dim", 0))),
                "gate_up_proj_moe": (h, 2 * moe_i),
                "down_proj_moe": (moe_i, h),
                "embed_tokens": (V, h),
                "lm_head": (h, V),
            }
        dims = table.get(name)
        if dims is None:
            raise NotImplementedError(f"get_hidden_dim not implemented for {name}")
        return dims


# ------------------------------------------------------------------------------------------ normalization
def _is_a(name: str) -> bool:
    return "lora_A" in name


def normalize_qkv_proj(w: dict, names: list[str]) -> None:
    has_k = any("k_proj" in n for n in names)
    for name in list(w):
        if "q_proj" in name:
            k_name, v_name = name.replace("q_proj", "k_proj"), name.replace("q_proj", "v_proj")
            v = w[v_name]  # KeyError when v_proj is missing (sglang-loader.md R1)
            k = w[k_name] if k_name in w else (torch.zeros_like(v) if not has_k else w[k_name])
            w[name.replace("q_proj", "qkv_proj")] = torch.cat([w.pop(name), k, v], 0)
            w.pop(k_name, None)
            w.pop(v_name)
        elif "qkv_proj" in name and _is_a(name) and name in names and w[name].dim() == 2:  # pre-merged
            w[name] = w[name].repeat(3, 1)


def rename_expert_w_to_proj(w: dict) -> None:
    for name in list(w):
        for old, new in ((".w1.", ".gate_proj."), (".w3.", ".up_proj."), (".w2.", ".down_proj.")):
            if old in name:
                w[name.replace(old, new)] = w.pop(name)
                break


def normalize_in_proj(w: dict) -> None:
    for name in list(w):
        if "gate_proj" in name and name in w:
            x_name = name.replace("gate_proj", "x_proj")
            if x_name in w:
                w[name.replace("gate_proj", "in_proj")] = torch.cat([w.pop(name), w.pop(x_name)], 0)


def normalize_in_proj_qkvz(w: dict, names: list[str]) -> None:
    for name in list(w):
        if "in_proj_q." in name:
            parts = [name.replace("in_proj_q.", f"in_proj_{p}.") for p in "qkvz"]
            if all(p in w for p in parts):
                w[name.replace("in_proj_q.", "in_proj_qkvz.")] = torch.cat([w.pop(p) for p in parts], 0)
        elif "in_proj_qkvz" in name and _is_a(name) and name in names:  # pre-merged
            t = w[name]
            w[name] = torch.cat([t] * 4, t.dim() - 2)


def normalize_gate_up_proj(w: dict, names: list[str], model: SGLangModel, layer: int) -> None:
    for name in list(w):
        if name not in w:
            continue
        if "gate_proj" in name:
            up_name = name.replace("gate_proj", "up_proj")
            gate = w.pop(name)
            up = w.get(up_name)
            if up is None or up.numel() == 0:
                w.pop(up_name, None)
                if re.search(r"\.experts\.", name) and not model.is_gated(layer):
                    w[name.replace("gate_proj", "gate_up_proj")] = gate  # non-gated experts: c = 1
                    continue
                up = torch.zeros_like(gate)
            else:
                w.pop(up_name)
            w[name.replace("gate_proj", "gate_up_proj")] = torch.cat([gate, up], gate.dim() - 2)
        elif "gate_up_proj" in name and _is_a(name) and name in names:  # pre-merged: always x2 (7.1.7)
            t = w[name]
            w[name] = torch.cat([t, t], t.dim() - 2)


def normalize_fused_qkv_a_proj(w: dict) -> None:
    for name in list(w):
        if "q_a_proj" in name:
            kv_name = name.replace("q_a_proj", "kv_a_proj_with_mqa")
            q_a = w.pop(name)
            kv = w.pop(kv_name) if kv_name in w else torch.zeros_like(q_a)  # the 0.5.23 bug (R3, 7.1.1)
            w[name.replace("q_a_proj", "fused_qkv_a_proj_with_mqa")] = torch.cat([q_a, kv], 0)


# ------------------------------------------------------------------------------------------------ driver
@dataclass
class SimModule:
    key: (
        str  # normalized module path, `base_model.model.` and the factor removed; experts: `experts.{e}.` -> `experts.`
    )
    target: str  # the pool buffer: qkv_proj, gate_up_proj_moe, ...
    layer: int | None
    A: torch.Tensor | None = None  # dense: [c*r, in]
    B: torch.Tensor | None = None  # dense: [out, r], scaling applied
    experts_A: dict[int, torch.Tensor] = field(default_factory=dict)
    experts_B: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class SimResult:
    modules: dict[str, SimModule]
    scaling: float
    targets: set[str]
    dropped_keys: list[str]  # silently dropped by _process_weight (no layers.N., not an embedding)
    skipped_expert_keys: list[str]  # FusedMoE not wrapped (one expert side only)


def _strip(name: str) -> tuple[str, str]:
    """(module path, factor) of a key, `base_model.model.` removed."""
    path = name[len("base_model.model.") :] if name.startswith("base_model.model.") else name
    for factor in (".lora_embedding_A", ".lora_embedding_B", ".lora_A.weight", ".lora_B.weight"):
        if path.endswith(factor):
            return path[: -len(factor)], factor
    return path, ""


def simulate(tensors: dict[str, torch.Tensor], adapter_config: dict, base_config: dict) -> SimResult:
    """Load an adapter the way SGLang 0.5.23 does. Raises what SGLang raises."""
    assert str(adapter_config.get("peft_type", "")).lower() == "lora"
    if adapter_config.get("use_dora"):
        raise ValueError("LoRA serving currently doesn't support DoRA adapters")
    model = SGLangModel(base_config)
    r, alpha = adapter_config["r"], adapter_config["lora_alpha"]
    scaling = alpha / r
    targets = get_normalized_target_modules(adapter_config.get("target_modules") or [])
    layers: dict[int, dict[str, torch.Tensor]] = {}
    top: dict[str, torch.Tensor] = {}
    dropped = []
    for name, tensor in tensors.items():  # _process_weight
        name = name.replace("unembed_tokens", "lm_head")
        m = _LAYER.search(name)
        if m:
            layer = int(m.group(1))
            if layer >= model.num_layers:
                raise IndexError(f"list index out of range (layer {layer} of {model.num_layers})")
            layers.setdefault(layer, {})[name] = tensor.float()
        elif "embed_tokens" in name or "lm_head" in name:
            module = "embed_tokens" if "embed_tokens" in name else "lm_head"
            if "all" in targets or module in targets:
                top[name] = tensor.float()
            else:
                dropped.append(name)
        else:
            dropped.append(name)
    for layer, w in layers.items():  # _normalize_weights, in SGLang's order
        names = list(w)
        normalize_qkv_proj(w, names)
        rename_expert_w_to_proj(w)
        normalize_in_proj(w)
        normalize_in_proj_qkvz(w, names)
        normalize_gate_up_proj(w, names, model, layer)
        normalize_fused_qkv_a_proj(w)
    # startup: the target set and its buffers
    if "all" in targets:
        targets = set(_SUPPORTED.get(model.family, _SUPPORTED["default"]))
    for t in sorted(targets):
        for layer in range(model.num_layers):
            model.get_hidden_dim(t, layer)
    fused_moe_wrapped = bool(model.num_experts) and {"gate_up_proj", "down_proj"} <= targets
    moe_buffers = {f"{t}_moe" for t in ("gate_up_proj", "down_proj")} if fused_moe_wrapped else set()
    modules: dict[str, SimModule] = {}
    skipped = []
    for layer, w in sorted(layers.items()):  # the pool copy, at first scheduling
        for name, tensor in sorted(w.items()):
            path, factor = _strip(name)
            target = get_target_module_name(name, targets)
            em = _EXPERT.search(name)
            is_expert = em is not None and "shared_experts." not in name
            if is_expert:
                if not fused_moe_wrapped:
                    skipped.append(name)
                    continue
                buffer = f"{target}_moe"
                if buffer not in moe_buffers:
                    raise KeyError(buffer)
                e = int(em.group(1))
                if e >= model.num_experts:
                    raise IndexError(f"expert {e} of {model.num_experts}")
                key = path.replace(f"experts.{e}.", "experts.")
            else:
                buffer = target
                if target in ("gate_up_proj", "down_proj") and not model.has_dense_mlp_buffer():
                    raise KeyError(target)
                key = path
            fan_in, fan_out = model.get_hidden_dim(buffer, layer)
            c = model.stacked_multiply(buffer)
            want = (c * r, fan_in) if "lora_A" in factor or "embedding_A" in factor else (fan_out, r)
            if tuple(tensor.shape) != want:
                raise AssertionError(
                    f"LoRA buffer shape {list(want)} does not match weight shape {list(tensor.shape)}."
                )
            mod = modules.setdefault(key, SimModule(key=key, target=buffer, layer=layer))
            is_a = "_A" in factor
            value = tensor if is_a else tensor * scaling
            if is_expert:
                (mod.experts_A if is_a else mod.experts_B)[e] = value
            elif is_a:
                mod.A = value
            else:
                mod.B = value
    for name, tensor in sorted(top.items()):
        path, factor = _strip(name)
        target = "embed_tokens" if "embed_tokens" in name else "lm_head"
        mod = modules.setdefault(path, SimModule(key=path, target=target, layer=None))
        if "_A" in factor:
            mod.A = tensor
        else:
            mod.B = tensor * scaling
    return SimResult(
        modules=modules, scaling=scaling, targets=targets, dropped_keys=dropped, skipped_expert_keys=skipped
    )
