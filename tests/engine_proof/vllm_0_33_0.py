"""vLLM 0.33.0's own LoRA loading, run on its CPU platform, for the PEFT-written fixtures.

`load(case, adapter_dir, base_dir)` builds vLLM's real model class for the fixture base (from its config.json,
`load_format="dummy"`: the LoRA path never reads base weights), wraps it with vLLM's `LRUCacheWorkerLoRAManager`
/ `LRUCacheLoRAModelManager` through the V1 model runner's own `lora_model_runner_mixin.load_lora_model` (its
SupportsLoRA check first), and
loads the adapter with `LRUCacheWorkerLoRAManager.add_adapter`: `PEFTHelper.from_local_dir` + `validate_legal`,
`LoRAModel.from_local_checkpoint` (expected-module check, name mapping, rank/alpha patterns),
`_validate_moe_lora_format`, the manager's `add_adapter` (packing: `pack`, `pack_moe`, `_stack_moe_lora_weights`)
and `activate_adapter` (`set_lora` into every layer's LoRA buffers). Any exception on that path, building the
engine config and the model included, is the `load_error` ("ExcType: message").

The deltas are then read back from slot 0 of every LoRA layer's buffers (scaling is already folded into B by
vLLM's `optimize()`): B @ A in float64, cut back to the PEFT modules by vLLM's own packed-module lists (slice i of
`qkv_proj` is `q_proj`, ...; position k of an `experts` list is expert k // 3, projection w1/w2/w3), shaped like
PEFT's reference (3-D `[E, out, in]` for a ParamWrapper on a 3-D expert parameter, `gate_up_proj` = w1 rows then
w3 rows). Module names go from the PEFT name to the vLLM name with vLLM's own `parse_fine_tuned_lora_name` and the
model's `hf_to_vllm_mapper` rename mapper, plus the manager's text-name fallback for multimodal wrappers. Where the
base reads a module's output twice (Gemma-4 `attention_k_eq_v`: the keys are also the values), the slice vLLM
computes the second read from is read too (`read_second_reads`, classified by common.classify).

Dropped although a buffer exists: `kv_b_proj` of MLA models (DeepSeek-V3). vLLM wraps it
(`ColumnParallelLinearWithLoRA`), `set_lora` fills the buffer, and every nn.Module path to it
(`self_attn.kv_b_proj`, `self_attn.mla_attn.kv_b_proj`, ...) is rewired to the wrapper. But the MLA attention's
backend impl (not an nn.Module) keeps the unwrapped layer it was given at construction, and it is the only caller:
prefill (`forward_mha`) calls `impl.kv_b_proj`, decode uses W_UK/W_UV split once from its weight. Decided on the
built model by identity (`mla_bypassed_modules`): a wrapper whose base layer is what an attention impl holds is
never read. (DeepseekV2Attention, the non-MLA class, would call the wrapper; with use_mla it is not built.)

Stubs (each is GPU-only machinery; vLLM's LoRA logic itself is never patched):

1. `VLLM_TARGET_DEVICE=cpu`: selects vLLM's `CpuPlatform` (the CUDA wheel otherwise finds no platform). On it
   `PIN_MEMORY` is False (`is_pin_memory_available()`); we also set the module-level `PIN_MEMORY` of
   `vllm.lora.lora_model`, `lora_weights`, `model_manager` to False to be sure nothing pins.
2. MoE kernel stand-in. `FusedMoEWithLoRA.__init__` (vllm/lora/layers/fused_moe.py:65-88) requires the routed
   experts' quant method to own a modular `FusedMoEKernel` whose experts support LoRA (on CUDA: Triton's
   `TritonExperts`). The CPU quant method has none ("Old-style modular kernel not supported."). We give each
   `RoutedExperts.quant_method` a `FusedMoEKernel` built with `object.__new__` whose impl is a
   `FusedMoEKernelModularImpl` holding a stand-in experts object (`supports_lora() -> True`, the layer's
   `moe_config`). The proof reads buffers; it never runs the MoE forward.
3. `FusedMoEWithLoRA.set_mapping` (fused_moe.py:449-459): the base part (`BaseLayerWithLoRA.set_mapping`, which
   stores the punica wrapper) runs; the Triton LoRA context (`_build_lora_context` / `set_lora_context` on the
   fused experts) is skipped.
4. `FusedMoEConfig.__post_init__` refuses `is_act_and_mul=False` (non-gated MoE: Nemotron-H) unless the platform is
   CUDA/ROCm/XPU (vllm/model_executor/layers/fused_moe/config.py:1410-1415). Inside that module only,
   `current_platform.is_xpu()` answers True; that module uses `is_xpu` for nothing else. Without this, Nemotron-H
   cannot be built on a CPU at all; on a GPU the check passes.
5. `torchvision`: when it is not importable (it is a torch-version-locked binary), a meta-path finder serves
   `torchvision` and every `torchvision.*` submodule as an empty stub package, so that transformers' / vLLM's VL
   processor modules (Qwen2-VL's image processor, imported by the Qwen3.5 / Qwen3-VL model files) import. No
   image is processed.
7. The model registry inspects a model class in a subprocess "to avoid initializing CUDA"
   (vllm/model_executor/models/registry.py:1122-1125); here it runs in this process
   (`registry._run_in_subprocess = lambda fn: fn()`), so stubs 4-5 apply to it too. There is no CUDA to avoid.
8. Config fields that released checkpoints carry but transformers 5's config classes drop, which vLLM reads
   unguarded (`_RELEASED_FIELDS`, as `hf_overrides`): MiniMax-M2 `rotary_dim`/`scoring_func`, Qwen3-VL-MoE
   `norm_topk_prob`. None is a LoRA target.
9. Model classes vLLM cannot build on a CPU (`CPU_UNBUILDABLE`: DeepSeek-V3.2's sparse attention) are not stubbed
   into existence: their rows record the registry entry and the CPU build error, which the proof asserts.
10. OLMo-Hybrid's gated DeltaNet layer registers a Triton scratch allocator for the current device when it is built
   (model_executor/layers/mamba/gdn/olmo_gdn_linear_attn.py:181 in 0.33.0-0.34.0, :168-169 in 0.30-0.32) through
   `triton.set_allocator`, a GPU API the CPU triton lacks. Inside that module only, `set_triton_allocator` does
   nothing: the allocator serves only the TMA kernels of the GDN forward, which the proof never runs.
6. Distributed state: a real one-process gloo group on 127.0.0.1 (`init_distributed_environment`,
   `initialize_model_parallel(1, 1)`), not a stub.

Script mode: `python tests/engine_proof/vllm_0_33_0.py --truth OUT.json [CASE ...]` writes the truth table
({case: {"original": ..., "peft_layout": ..., "vllm_layout": ...}}; each entry is {"load_error": str} or
{"modules": {peft_module: exact|dropped|wrong}}).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import types
from pathlib import Path

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if __name__ == "__main__":  # script mode: make `helpers` and `engine_proof` importable
    # tests/ only, never the repository root (tests/test_import_path.py): lora_convert comes from the install.
    sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

import numpy as np  # noqa: E402

from engine_proof.common import EngineLoad, to_param_layout, value_copies  # noqa: E402
from helpers import case_base_dir, case_meta, fixture_cases  # noqa: E402

VLLM_VERSION = "0.33.0"
MAX_LORA_RANK = 64  # one of vLLM's MaxLoRARanks; above every fixture rank (rank_pattern included)


def _error(exc: BaseException) -> str:
    """ "ExcType: message"; a bare assert gets the innermost vLLM frame (path inside the wheel:line) as its message."""
    text = str(exc)
    if not text:
        import traceback

        frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/vllm/" in f.filename]
        if frames:
            path = frames[-1].filename
            text = f"at vllm/{path.split('/vllm/', 1)[1]}:{frames[-1].lineno}: {frames[-1].line}"
    return f"{type(exc).__name__}: {text}"


# ------------------------------------------------------------------------------------------------ stubs
_STUBS_DONE = False


def _stub_torchvision() -> None:
    try:
        import torchvision  # noqa: F401

        return
    except Exception:
        pass

    class _Any:
        def __init__(self, *a, **k):
            pass

        def __call__(self, *a, **k):
            return self

        def __getattr__(self, name):
            return _Any()

    def stub_attr(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Any()

    class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        """Serves `torchvision` and any `torchvision.*` submodule as an empty stub package."""

        def find_spec(self, fullname, path=None, target=None):
            if fullname == "torchvision" or fullname.startswith("torchvision."):
                return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
            return None

        def create_module(self, spec):
            mod = types.ModuleType(spec.name)
            mod.__getattr__ = stub_attr  # type: ignore[attr-defined]
            mod.__file__ = f"<stub {spec.name}>"
            mod.__path__ = []
            mod.__version__ = "0.0.0"
            return mod

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, _Finder())


def _install_stubs() -> None:
    global _STUBS_DONE
    if _STUBS_DONE:
        return
    _stub_torchvision()

    import vllm.lora.lora_model as lora_model_mod
    import vllm.lora.lora_weights as lora_weights_mod
    import vllm.lora.model_manager as model_manager_mod
    import vllm.model_executor.layers.fused_moe.config as moe_config_mod
    from vllm.lora.layers.base import BaseLayerWithLoRA
    from vllm.lora.layers.fused_moe import FusedMoEWithLoRA

    for mod in (lora_model_mod, lora_weights_mod, model_manager_mod):
        mod.PIN_MEMORY = False

    real_platform = moe_config_mod.current_platform

    class _NonGatedOk:
        """`current_platform` as seen by fused_moe/config.py only: is_xpu() is True (stub 4)."""

        def __getattr__(self, name):
            return getattr(real_platform, name)

        def is_xpu(self) -> bool:
            return True

    moe_config_mod.current_platform = _NonGatedOk()

    import vllm.model_executor.models.registry as registry_mod

    registry_mod._run_in_subprocess = lambda fn: fn()  # stub 7: inspect model classes in this process

    def set_mapping(self, punica_wrapper):  # stub 3: no Triton LoRA context
        BaseLayerWithLoRA.set_mapping(self, punica_wrapper)

    FusedMoEWithLoRA.set_mapping = set_mapping

    import vllm.model_executor.layers.mamba.gdn.olmo_gdn_linear_attn as olmo_gdn

    olmo_gdn.set_triton_allocator = lambda device: None  # stub 10: no GPU scratch allocator on a CPU

    _STUBS_DONE = True


class _StandInExperts:
    """Stands in for the CUDA/Triton fused-MoE experts object (stub 2); only answers what LoRA setup asks."""

    def __init__(self, moe_config):
        self.moe_config = moe_config

    def supports_lora(self) -> bool:
        return True

    def activation_format(self):
        return None


def _give_moe_kernels(model) -> None:
    from vllm.model_executor.layers.fused_moe import MoERunner
    from vllm.model_executor.layers.fused_moe.modular_kernel import FusedMoEKernel, FusedMoEKernelModularImpl

    for module in model.modules():
        if not isinstance(module, MoERunner):
            continue
        quant_method = module.routed_experts.quant_method
        if getattr(quant_method, "moe_kernel", None) is not None:
            continue
        impl = object.__new__(FusedMoEKernelModularImpl)
        impl.prepare_finalize = None
        impl.fused_experts = _StandInExperts(module.moe_config)
        impl.shared_experts = None
        kernel = object.__new__(FusedMoEKernel)
        kernel.impl = impl
        quant_method.moe_kernel = kernel


# ------------------------------------------------------------------------------------------------ engine
_DIST_DONE = False


def _init_distributed(vllm_config) -> None:
    global _DIST_DONE
    if _DIST_DONE:
        return
    import socket

    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # No model config: initialize_model_parallel then creates the expert-parallel group too (it skips it for a
    # dense model), so one process group serves every base, dense or MoE.
    with set_current_vllm_config(VllmConfig(parallel_config=vllm_config.parallel_config)):
        parallel_state.init_distributed_environment(
            world_size=1,
            rank=0,
            local_rank=0,
            distributed_init_method=f"tcp://127.0.0.1:{port}",
            backend="gloo",
        )
        parallel_state.initialize_model_parallel(1, 1, backend="gloo")
    _DIST_DONE = True


# Config fields every released checkpoint of a family carries but transformers 5's config class drops, and which
# vLLM reads unguarded (none is a LoRA target): MiniMax-M2 `rotary_dim` (vllm/model_executor/models/minimax_m2.py:274;
# 64 of head_dim 128 on the Hub, the head_dim here) and `scoring_func` (:99, "sigmoid" on the Hub); Qwen3-VL-MoE's
# text `norm_topk_prob` (true on the Hub).
_RELEASED_FIELDS = {
    "minimax_m2": {"scoring_func": "sigmoid"},
    "qwen3_vl_moe_text": {"norm_topk_prob": True},
}


def _hy_v3_fields(cfg) -> dict:
    """HY-V3's released config names what transformers 5 calls moe_intermediate_size and mlp_layer_types
    `expert_hidden_dim` and `first_k_dense_replace` (vllm/model_executor/models/hy_v3.py:144, :391-393 read them
    unguarded) and carries `route_norm` (:187; a routing flag, no LoRA target): derived from the fixture's config."""
    types = list(getattr(cfg, "mlp_layer_types", None) or [])
    dense = next((i for i, t in enumerate(types) if t != "dense"), len(types))
    return {"expert_hidden_dim": cfg.moe_intermediate_size, "first_k_dense_replace": dense, "route_norm": True}


def _kimi_linear_fields(cfg) -> dict:
    """Kimi-Linear's released config carries `mla_use_nope: true` (the preset lora_convert/arch/presets/
    kimi-linear-48b-a3b-instruct.json cites it); transformers 5 drops it, vLLM's own KimiLinearConfig defaults it to
    False (vllm/transformers_utils/configs/kimi_linear.py:47 in 0.30.0) and its CUDA class asserts it
    (vllm/models/kimi_k3/nvidia/model.py:940 in 0.30.0). A rope switch of the MLA layer, no LoRA target."""
    return {"mla_use_nope": True}


def _exaone_moe_fields(cfg) -> dict:
    """EXAONE-MoE's released configs from K-EXAONE 2.0 on carry the per-layer window list `sliding_windows` (vLLM
    0.32.0's exaone_moe.py:231-233 says the earlier ones have only the scalar `sliding_window`); 0.30.0-0.31.0 read
    it unguarded (vllm/model_executor/models/exaone_moe.py:230), transformers 5 does not write it. Derived from the
    fixture's `layer_types` and `sliding_window` (a full-attention layer's entry is unused: :233-234 set no window
    there). An attention window, no LoRA target. exaone (issue 25)."""
    window = cfg.sliding_window
    return {"sliding_windows": [window if t == "sliding_attention" else None for t in cfg.layer_types]}


# fam-misc, engproof, exaone (issue 25)
_DERIVED_FIELDS = {"hy_v3": _hy_v3_fields, "kimi_linear": _kimi_linear_fields, "exaone_moe": _exaone_moe_fields}


def _released_fields(hf_config):
    """`hf_overrides` for EngineArgs: `_RELEASED_FIELDS` where the config lacks them, `_DERIVED_FIELDS` always (top
    level and text_config)."""
    for cfg in (hf_config, getattr(hf_config, "text_config", None)):
        fields = dict(_RELEASED_FIELDS.get(getattr(cfg, "model_type", None), {}))
        derive = _DERIVED_FIELDS.get(getattr(cfg, "model_type", None))
        # derived fields are the fixture's own values under the released names: they replace the defaults of a
        # release's own config class (vLLM 0.30-0.31's HYV3Config, expert_hidden_dim=1536 at
        # vllm/transformers_utils/configs/hy_v3.py:127 in 0.30.0), which would size the expert buffers wrong
        for key, value in (derive(cfg) if derive is not None else {}).items():
            setattr(cfg, key, value)
        if fields and not hasattr(cfg, "rotary_dim") and getattr(cfg, "model_type", None) == "minimax_m2":
            cfg.rotary_dim = cfg.head_dim
        for key, value in fields.items():
            if not hasattr(cfg, key):
                setattr(cfg, key, value)
    return hf_config


def _prefix_caching(args) -> bool | None:
    """None (the release's default), except off for a hybrid MLA model (Kimi-Linear): vLLM's CPU platform turns
    prefix caching off for MLA models (vllm/platforms/cpu.py:481-490 in 0.30.0), but only after the hybrid-model
    config has set mamba_block_size to the prefix-caching block size (vllm/model_executor/models/config.py:622-649),
    so 0.30.0-0.32.0 then refuse their own pair of settings (`--mamba-block-size can only be set with
    --enable-prefix-caching`, vllm/config/vllm.py:3196-3208 in 0.30.0) before building the model. Asked for off up
    front, the config reaches the state the CPU platform forces, mamba_block_size = max_model_len
    (config.py:650-657). Prefix caching is no part of the LoRA path. engproof (issue 25)."""
    model = args.create_model_config()
    return False if model.use_mla and model.is_hybrid else None


class _Engine:
    """One fixture base in vLLM: config, model with LoRA layers, worker LoRA manager (or the error)."""

    def __init__(self, base_dir: Path):
        self.error: str | None = None
        self.worker = None
        self.manager = None
        self.next_id = 1
        try:
            self._build(base_dir)
        except Exception as exc:  # noqa: BLE001 - the engine's refusal is the result
            self.error = _error(exc)

    def _build(self, base_dir: Path) -> None:
        import torch
        from vllm.config import set_current_vllm_config
        from vllm.engine.arg_utils import EngineArgs
        from vllm.model_executor.model_loader.utils import initialize_model
        from vllm.v1.worker.lora_model_runner_mixin import LoRAModelRunnerMixin

        _install_stubs()
        args = EngineArgs(
            model=str(base_dir),
            skip_tokenizer_init=True,
            dtype="float32",
            enforce_eager=True,
            enable_lora=True,
            max_lora_rank=MAX_LORA_RANK,
            max_loras=1,
            max_cpu_loras=1,
            max_model_len=64,
            max_num_seqs=4,
            max_num_batched_tokens=64,
            load_format="dummy",
            hf_overrides=_released_fields,
        )
        args.enable_prefix_caching = _prefix_caching(args)
        config = args.create_engine_config()
        _init_distributed(config)
        torch.set_default_dtype(torch.float32)
        with set_current_vllm_config(config), torch.device("cpu"):
            model = initialize_model(config)
            _give_moe_kernels(model)
            # the model runner's own LoRA set-up: its SupportsLoRA check, then the worker's LoRA manager
            runner = LoRAModelRunnerMixin()
            runner.load_lora_model(model, config, torch.device("cpu"))
            self.worker = runner.lora_manager
        self.manager = self.worker._adapter_manager
        self.config = config
        mapper = getattr(model, "hf_to_vllm_mapper", None)
        self.mapper = mapper.get_rename_mapper() if mapper is not None else None

    def load(self, adapter_dir: Path) -> str | None:
        from vllm.config import set_current_vllm_config
        from vllm.lora.request import LoRARequest

        self.worker.remove_all_adapters()
        lora_id = self.next_id
        self.next_id += 1
        request = LoRARequest(f"proof-{lora_id}", lora_id, str(adapter_dir))
        try:
            with set_current_vllm_config(self.config):
                self.worker.add_adapter(request)
        except Exception as exc:  # noqa: BLE001
            self.worker.remove_all_adapters()
            return _error(exc)
        return None


_ENGINES: dict[str, _Engine] = {}


def engine(base_dir: Path) -> _Engine:
    key = str(Path(base_dir).resolve())
    if key not in _ENGINES:
        _ENGINES[key] = _Engine(Path(base_dir))
    return _ENGINES[key]


# ------------------------------------------------------------------------------------------------ reading back
def _f64(t) -> np.ndarray:
    return t.detach().to("cpu").double().numpy()


def _ba(b, a) -> np.ndarray:
    return _f64(b) @ _f64(a)


def _linear_slice(module, i: int) -> np.ndarray:
    """Slot 0, slice i of a linear LoRA layer: B[out_i, r] @ A[r, in]."""
    return _ba(module.lora_b_stacked[i][0, 0], module.lora_a_stacked[i][0, 0])


def _expert_deltas(module) -> dict[str, np.ndarray]:
    """Slot 0 of a MoE LoRA layer as {"w1"|"w2"|"w3": [E, out, in]} (3-D wrapper: "w13" = w1 rows + w3 rows)."""
    from vllm.lora.layers import FusedMoE3DWithLoRA

    def stack(b, a):
        return np.stack([_ba(b[0, e], a[0, e]) for e in range(a.shape[1])])

    out = {"w2": stack(module.w2_lora_b_stacked[0], module.w2_lora_a_stacked[0])}
    w13 = stack(module.w13_lora_b_stacked[0], module.w13_lora_a_stacked[0])
    if isinstance(module, FusedMoE3DWithLoRA):
        inter = w13.shape[1] // 2
        out["w1"], out["w3"] = w13[:, :inter], w13[:, inter:]
    else:
        out["w1"] = w13
        if len(module.w13_lora_a_stacked) == 2:
            out["w3"] = stack(module.w13_lora_b_stacked[1], module.w13_lora_a_stacked[1])
    return out


def _interleaved_w13(module) -> bool:
    """Whether a MoE LoRA layer's base computes with w13 rows interleaved (gate 0::2, up 1::2)."""
    base = getattr(module, "base_layer", module)
    config = getattr(base, "moe_config", None)
    activation = getattr(config, "activation", None)
    return getattr(activation, "value", activation) == "swigluoai"


def mla_bypassed_modules(eng: _Engine) -> set[str]:
    """LoRA-wrapped modules that vLLM's MLA attention never calls: their base layer is what the attention backend's
    impl holds (`impl.kv_b_proj`, given at construction, mla_attention.py:594), so neither the prefill
    (`forward_mha` calls `self.kv_b_proj`, mla_attention.py:3252) nor the decode (W_UK/W_UV split once from
    `kv_b_proj.weight`, mla_attention.py:1270) sees the LoRA. The manager's alias rewiring (model_manager.py:526-541)
    only reaches nn.Module attributes, and the impl is not an nn.Module."""
    bypassed_bases = set()
    for module in eng.manager.model.modules():
        impl = getattr(module, "impl", None)
        held = getattr(impl, "kv_b_proj", None)
        if held is not None:
            bypassed_bases.add(id(held))
    return {
        name
        for name, wrapper in eng.manager.modules.items()
        if id(getattr(wrapper, "base_layer", None)) in bypassed_bases
    }


def _vllm_name(eng: _Engine, peft_module: str) -> str:
    from vllm.lora.utils import parse_fine_tuned_lora_name

    name = peft_module.removesuffix(".base_layer")
    return parse_fine_tuned_lora_name(f"base_model.model.{name}.lora_A.weight", eng.mapper)[0]


def _candidates(eng: _Engine, vname: str) -> list[str]:
    """vname, then the multimodal language-model names whose text-only name is vname (the manager's fallback)."""
    mm = eng.manager
    out = [vname]
    # the text-name fallback (`_get_text_lora_names`, model_manager.py:1267-1287 in 0.33.0) exists from 0.33 on;
    # 0.30-0.32 have none, so there is no other candidate name there
    if getattr(mm, "supports_mm", False) and hasattr(mm, "_get_text_lora_names"):
        prefix = mm.mm_mapping.language_model[0].rstrip(".") + "."
        for full in (prefix + vname, prefix + vname.removeprefix("model.")):
            if vname in mm._get_text_lora_names(full):
                out.append(full)
    return out


def _locate(eng: _Engine, vname: str):
    """(holder module name, slice index or None) for a vLLM sub-module name, or None."""
    mm = eng.manager
    for name in _candidates(eng, vname):
        if name in mm.modules:
            return name, None
        for packed, subs in mm.packed_modules.items():
            if name in subs:
                return packed, subs.index(name)
    return _locate_renamed_block(eng, vname) or _locate_restacked(eng, vname)


def _locate_restacked(eng: _Engine, vname: str):
    """The same module under the base's own layer-stack name (`model.layers.N.<rest>` for a PEFT name
    `model.language_model.layers.N.<rest>`: an adapter trained on a VL class, whose `--layout vllm` output is
    renamed to a text-only base's stack): the unique vLLM module ending in `layers.N.<rest>`. Its buffer says
    whether vLLM applied the adapter there (zero for the original adapter, whose names vLLM never matches)."""
    at = vname.find("layers.")
    if at <= 0:
        return None
    tail = "." + vname[at:]
    mm = eng.manager
    hits = [n for n in mm.modules if n.endswith(tail)]
    hits += [(p, k) for p, subs in mm.packed_modules.items() for k, n in enumerate(subs) if n.endswith(tail)]
    if len(hits) != 1:
        return None
    return hits[0] if isinstance(hits[0], tuple) else (hits[0], None)


def _locate_renamed_block(eng: _Engine, vname: str):
    """The same module when vLLM names the block between `layers.N.` and the leaf differently from the checkpoint
    (transformers 5 Mixtral `mlp.experts` / `mlp.gate` = vLLM `block_sparse_moe.experts` / `.gate`): the unique
    vLLM module with the same `...layers.N.` prefix and the same tail after the block name. Reading the buffer of
    that module is what tells whether vLLM applied the adapter there (zero: dropped)."""
    parts = vname.split(".")
    if "layers" not in parts:
        return None
    block = parts.index("layers") + 2  # index of the block name (mlp / block_sparse_moe / mixer ...)
    # then a container inside the block (HY-V3: transformers 5 `mlp.shared_experts` = vLLM's `mlp.shared_mlp`,
    # vllm/model_executor/models/hy_v3.py:163-171 in 0.33.0), tried only where the block name alone finds nothing
    for i in range(block, len(parts) - 1):
        found = _renamed_at(eng, vname, parts, i)
        if found is not None:
            return found
    return None


def _renamed_at(eng: _Engine, vname: str, parts: list[str], i: int):
    """The unique vLLM module (or packed member) named like `vname` except for its component `i`, or None."""
    prefix, tail = ".".join(parts[:i]) + ".", "." + ".".join(parts[i + 1 :])
    mm = eng.manager
    hits = [n for n in mm.modules if n.startswith(prefix) and n.endswith(tail) and n.count(".") == vname.count(".")]
    if len(hits) == 1:
        return hits[0], None
    hits = [
        (packed, k)
        for packed, subs in mm.packed_modules.items()
        for k, n in enumerate(subs)
        if n.startswith(prefix) and n.endswith(tail) and n.count(".") == vname.count(".")
    ]
    return hits[0] if len(hits) == 1 else None


def read_deltas(case: str, eng: _Engine) -> dict[str, np.ndarray]:
    from vllm.lora.layers import FusedMoEWithLoRA, LogitsProcessorWithLoRA, VocabParallelEmbeddingWithLoRA

    modules = case_meta(case)["modules"]
    bypassed = mla_bypassed_modules(eng)
    cache: dict[str, dict[str, np.ndarray]] = {}
    deltas: dict[str, np.ndarray] = {}
    for peft_module, info in modules.items():
        found = _locate(eng, _vllm_name(eng, peft_module))
        if found is None:
            continue
        holder, index = found
        if holder in bypassed:  # a buffer exists, but the forward never reads it (MLA kv_b_proj)
            continue
        module = eng.manager.modules.get(holder)
        if module is None:
            continue
        if isinstance(module, FusedMoEWithLoRA):
            if holder not in cache:
                cache[holder] = _expert_deltas(module)
            experts = cache[holder]
            if index is None:  # a 3-D ParamWrapper on the experts' fused parameter
                param = info.get("param")
                if param == "gate_up_proj":
                    if "w3" not in experts:
                        continue
                    # w1 rows then w3 rows re-form the wrapper's w13 rows, which are in the base w13's order: gate
                    # then up, or interleaved where the layer's activation reads them so (gpt-oss `swigluoai`,
                    # vllm/model_executor/layers/fused_moe/activation.py:30-34), the checkpoint's own order.
                    w13 = np.concatenate([experts["w1"], experts["w3"]], axis=1)
                    deltas[peft_module] = to_param_layout(w13, info, engine_interleaved=_interleaved_w13(module))
                elif param == "up_proj":  # non-gated (Nemotron-H): w1 is up_proj
                    deltas[peft_module] = to_param_layout(experts["w1"], info)
                elif param == "down_proj":
                    deltas[peft_module] = to_param_layout(experts["w2"], info)
                continue
            per_expert = len(eng.manager.packed_modules[holder]) // experts["w2"].shape[0]
            expert, proj = divmod(index, per_expert)
            key = ("w1", "w2", "w3")[proj]
            if key in experts:
                deltas[peft_module] = experts[key][expert]
            continue
        if isinstance(module, VocabParallelEmbeddingWithLoRA):  # A [vocab, r] per slot, B [hidden, r]: row x of
            # A @ B.T is what the lookup of token x adds (vllm/lora/layers/vocab_parallel_embedding.py forward)
            deltas[peft_module] = _f64(module.lora_a_stacked[0]) @ _f64(module.lora_b_stacked[0, 0]).T
            continue
        if isinstance(module, LogitsProcessorWithLoRA):  # one tensor per buffer, not one per slice: slot 0's
            # B [vocab, r] @ A [r, hidden] (vllm/lora/layers/logits_processor.py create_lora_weights)
            deltas[peft_module] = _ba(module.lora_b_stacked[0, 0], module.lora_a_stacked[0, 0])
            continue
        if not hasattr(module, "lora_a_stacked"):
            continue
        n_slices = len(module.lora_a_stacked)
        subs = eng.manager.packed_modules.get(holder, [])
        if index is None:  # one checkpoint module; a multi-slice layer (mamba in_proj) is all slices stacked
            deltas[peft_module] = np.concatenate([_linear_slice(module, i) for i in range(n_slices)])
            continue
        if n_slices == len(subs):
            deltas[peft_module] = _linear_slice(module, index)
            continue
        # Fewer packed members than slices (GDN in_proj_qkvz = in_proj_qkv (Q, K, V slices) + in_proj_z):
        # vLLM's `expand_packed_lora` cuts each member's B into consecutive slices by rows, so the member is
        # a row range of all slices stacked: the first `out` rows for the first member, the last for the last.
        full = np.concatenate([_linear_slice(module, i) for i in range(n_slices)])
        rows = int(info["out"])
        if index == 0:
            deltas[peft_module] = full[:rows]
        elif index == len(subs) - 1:
            deltas[peft_module] = full[-rows:]
    return deltas


def load(case: str, adapter_dir: Path, base_dir: Path) -> EngineLoad:
    eng = engine(base_dir)
    if eng.error is not None:
        return EngineLoad(load_error=eng.error)
    error = eng.load(Path(adapter_dir))
    if error is not None:
        return EngineLoad(load_error=error)
    return EngineLoad(deltas=read_deltas(case, eng), second_reads=read_second_reads(case, eng))


def read_second_reads(case: str, eng: _Engine) -> dict[str, np.ndarray]:
    """For each module of `common.value_copies` (a Gemma-4 k_proj whose output is also the value), slot 0 of the
    slice vLLM computes the stood-in module from: the `v_proj` position of the model class's packed mapping for the
    fused layer (qkv_proj = [q_proj, k_proj, v_proj]), whatever the layer packs into it (0.34.0 packs k_proj there
    on such layers: gemma4.py:456, `lora_packed_modules`; 0.30-0.33 look for a v_proj the adapter lacks). A module
    vLLM wraps on its own (a class it serves with the Transformers backend, Gemma4UnifiedForCausalLM) is read twice
    by transformers' own forward, so its one delta is both reads."""
    out = {}
    for module, stand_in in value_copies(case).items():
        found = _locate(eng, _vllm_name(eng, module))
        if found is None:
            continue
        holder = found[0]
        if found[1] is None:
            layer = eng.manager.modules.get(holder)
            if layer is not None and hasattr(layer, "lora_a_stacked") and len(layer.lora_a_stacked) == 1:
                out[module] = _linear_slice(layer, 0)
            continue
        layer = eng.manager.modules.get(holder)
        members = eng.manager.packed_modules_mapping.get(holder.rsplit(".", 1)[-1], [])
        leaf = stand_in.rsplit(".", 1)[-1]
        if layer is not None and hasattr(layer, "lora_a_stacked") and leaf in members:
            out[module] = _linear_slice(layer, members.index(leaf))
    return out


# ------------------------------------------------------------------------------------------------ truth table
# Model classes vLLM 0.33.0 cannot build on its CPU platform at all, with the registry entry the rules' sources
# cite and the refusal the CPU platform gives. DeepSeek-V3.2's DSA attention: `CpuPlatform.get_attn_backend_cls`
# raises for sparse attention (vllm/platforms/cpu.py:154-155); letting it pick the dense CPU MLA backend instead
# does not help either (its impl rejects the indexer's `topk_indices_buffer`), and on CUDA the registry entry is
# another module (vllm/models/deepseek_v32/__init__.py:17-33). For these the proof records, measured in this
# process, the registry entry and the build error, and asserts both (common.check_cpu_unbuildable); the rules for
# them are read from the code, not run.
CPU_UNBUILDABLE = {
    "DeepseekV32ForCausalLM": {
        "registry": ["vllm.models.deepseek_v32", "DeepseekV32ForCausalLM"],
        "build_error": "NotImplementedError: Sparse Attention is not supported on CPU.",
    },
    # GLM-5 (glm_moe_dsa): the same DSA model code (vllm/models/deepseek_v32/__init__.py: an alias of
    # DeepseekV32ForCausalLM on CUDA, deepseek_v2.GlmMoeDsaForCausalLM elsewhere), refused the same way on a CPU
    "GlmMoeDsaForCausalLM": {
        "registry": ["vllm.models.deepseek_v32", "GlmMoeDsaForCausalLM"],
        "build_error": "NotImplementedError: Sparse Attention is not supported on CPU.",
    },
}


def _architecture(base: Path) -> str | None:
    import json

    config = json.loads((Path(base) / "config.json").read_text())
    return (config.get("architectures") or [None])[0]


def cpu_unbuildable_record(base: Path, arch: str) -> dict:
    """What this process measures for a model class in CPU_UNBUILDABLE: vLLM's registry entry and the build error."""
    from vllm.model_executor.models.registry import ModelRegistry

    entry = ModelRegistry.models.get(arch)
    return {
        "cpu_unbuildable": {
            "architecture": arch,
            "registry": [getattr(entry, "module_name", None), getattr(entry, "class_name", None)],
            "build_error": engine(base).error,
            "expected": CPU_UNBUILDABLE[arch],
        }
    }


def truth_row(case: str, workdir: Path) -> dict:
    """The record tests/test_proof_vllm.py compares (tests/engine_proof/common.py `truth_record` contract): the
    original adapter through vLLM, and lora-convert's `--layout vllm` output through vLLM (or, for a model class
    vLLM cannot build on a CPU, what is measured instead: `cpu_unbuildable_record`)."""
    from engine_proof.common import fixture_adapter, layout_record, normalize_layout, original_record

    base = case_base_dir(case)
    arch = _architecture(base)
    if arch in CPU_UNBUILDABLE:
        _install_stubs()
        record = cpu_unbuildable_record(base, arch)
        return {"served_base": str(base), "original": record, "layout": record}
    row = {"served_base": str(base), "original": original_record(case, load(case, fixture_adapter(case), base))}
    out, refusal = normalize_layout(case, "vllm", base, workdir / f"vllm-{case}")
    row["layout"] = layout_record(case, out, refusal, None if out is None else load(case, out, base))
    return row


def main(argv: list[str]) -> int:
    import argparse
    import json
    import time

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--truth", type=Path, required=True, help="write the truth table (JSON) here")
    parser.add_argument("--workdir", type=Path, required=True, help="layout outputs are written here")
    parser.add_argument("cases", nargs="*", help="fixture cases (default: all)")
    args = parser.parse_args(argv)
    cases = args.cases or fixture_cases()
    table = {}
    start = time.time()
    for case in cases:
        t0 = time.time()
        table[case] = truth_row(case, args.workdir)
        print(f"{case}: {time.time() - t0:.1f}s", file=sys.stderr)
    args.truth.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"{len(cases)} cases in {time.time() - start:.0f}s -> {args.truth}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
