"""SGLang 0.5.23's own LoRA loading code, run on a CPU on one fixture adapter (see common.py for the contract).

What runs is SGLang's, unmodified: `ModelConfig.from_server_args` + the default model loader build SGLang's model class
for the base (config.json + model.safetensors), then `LoRAManager(...)` is created exactly as
`ModelRunner.init_lora_manager` creates it for a server started with `--lora-paths a=<adapter>` and no
`--lora-target-modules` / `--max-lora-rank` (so targets and rank are inferred from the adapter, as in production):
`LoRAConfig` + `validate_new_adapter`, `LoRAAdapter.initialize_weights` (key parsing, `_normalize_weights`),
`init_lora_shapes`, `init_lora_modules` (wrapping), `init_memory_pool` (buffers from `get_hidden_dim`),
`update_lora_info`; then `fetch_new_loras` (`LoRAMemoryPool.prepare_lora_batch` -> `load_lora_weight_to_buffer`, with
its shape asserts) and `LoRAManager.prepare_lora_batch` on a one-request extend batch. Any exception on that path is
the `load_error`.

Deltas (float64 `[out, in]`, cut into PEFT's modules by the wrapper's own output offsets):
- dense modules: SGLang's apply path. `wrapper.apply_lora(zeros, I)` on the `torch_native` backend with an identity
  input (one request of `max(in)` tokens; the scaling is the batch's `scalings[slot]`), transposed. For
  `ReplicatedLinearWithLoRA` with one projection (Nemotron-H `fc1/fc2_latent_proj`) the wrapper passes
  `output_offset=` where the torch_native backend wants `output_offset_cpu=` (a TypeError that only this backend
  hits; the CUDA backends accept it), so the harness calls `run_lora_a_sgemm` + `run_lora_b_sgemm` of the same
  backend itself with the wrapper's own buffers and offsets.
- routed experts (`FusedMoEWithLoRA`): read from the memory pool's `*_moe` buffers of slot 0 the way
  `lora_moe_runners._add_lora_gate_up_delta` / `_add_lora_down_delta` slice them (gated: A rows `[0:R]`/`[R:2R]`,
  B rows `[:I]`/`[I:]`; non-gated: whole; shared-outer: expert 0 expanded), `B @ A` (the pool already multiplied B
  by the adapter scaling at copy time, mem_pool.py). The `fused_moe_lora` Triton kernel under TRITON_INTERPRET=1
  would need a routed token batch per expert and is slow on two cores; reading the buffers is the documented
  fallback. Expert LoRA counts only when SGLang wrapped the layer's FusedMoE (it needs both gate_up_proj and
  down_proj targets); buffers of an unwrapped layer are never read by any forward and count as dropped.
- a PEFT module that maps to no wrapped SGLang module is absent (dropped).

Stubs (only what needs a GPU or a native kernel; none touches LoRA logic):
- `SGLANG_USE_CPU_ENGINE=1`: SGLang's own CPU platform switch (no CUDA device probing).
- `sgl_kernel`, `tvm_ffi` where absent (native kernel packages) and `torchvision` (its CPU wheel would pull another
  torch): import-time stand-ins whose attributes are inert classes. torchvision is stubbed after transformers has
  decided it is absent, so transformers keeps its no-torchvision paths.
- `torch.ops.sgl_kernel.<op>`: the CPU ops the model files bind at import (fused_sigmoid_mul_cpu, ...), as callables
  that raise if ever called (no forward of the base model runs); other names stay absent so
  `register_fake_if_exists` skips them.
- pinned memory: `pin_memory=True` is dropped (`torch.tensor`/`empty`/... and `Tensor.pin_memory`) because a
  CPU-only torch has no pinned allocator; the LoRA wrappers allocate their offset tensors pinned.
- a one-process gloo process group and SGLang's model-parallel groups (TP=EP=PP=1).
- The CPU engine's `adjust_config_with_unaligned_cpu_tp` (pads MLP widths to multiples of 32 on the CPU device) is
  not called: the GPU engine does not pad, and padding would change every MLP/expert LoRA shape.
- Server args: `device=cpu`, `dtype=float32`, `lora_backend=torch_native`, `max_loras_per_batch=1`,
  `mamba_radix_cache_strategy=no_buffer` + `disable_overlap_schedule=True` (the default `extra_buffer` needs a
  GPU platform for Mamba state snapshots; cache settings only, GDN/Mamba layers are built the same),
  `disable_shared_experts_fusion=True` (what every SGLang DeepSeek/Kimi LoRA test sets; without it SGLang fuses the
  shared expert into the routed experts on CUDA and the shared-expert LoRA has no module).
- `torch.cuda.get_device_capability` answers (9, 0) while the server args of a DSA base (DeepSeek-V3.2) are
  resolved: that resolution asks the GPU's capability on the CPU engine too (model_hook.py:339-341) and only picks
  DSA kernel defaults (`_publish_for`).
- Base folders are used through a COPY (`_base_copy`) where config fields SGLang needs are added; see
  `_patch_config`. No added field touches a LoRA target. The issue-14 families and Kimi-K2.5 are built with
  `load_format=dummy` (`_DUMMY`): the LoRA path never reads base weights.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import re
import sys
import tempfile
import traceback
import types
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/ (helpers) when run as a script
sys.path.insert(0, str(HERE))

from common import EngineLoad, fixture_adapter, reference_deltas, to_param_layout  # noqa: E402

from helpers import case_base_dir, case_meta, fixture_cases  # noqa: E402

SGLANG_VERSION = "0.5.23"

# --------------------------------------------------------------------------------------------- process set-up
_KERNEL_OPS = (  # torch.ops.sgl_kernel names the model files bind at import time (never called here)
    "fused_sigmoid_mul_cpu",
    "fused_qk_gemma_rmsnorm_cpu",
    "fused_qk_gemma_rmsnorm_with_gate_cpu",
    "fused_qkvzba_split_reshape_cat_contiguous_cpu",
    "fused_qkvzba_split_reshape_cat_cpu",
    "fused_input_proj_cpu",
    "shared_expert_cpu",
    "weight_packed_linear",
)
# tvm_ffi is a plain CPU wheel (apache-tvm-ffi) that `make setup` installs for vLLM's xgrammar; where it is present
# the real one is used (xgrammar, which SGLang then imports too, needs its real functions).
_STUB_PACKAGES = ("torchvision", "sgl_kernel") + (() if importlib.util.find_spec("tvm_ffi") else ("tvm_ffi",))


class _InertMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _InertMeta(name, (), {"__init__": lambda self, *a, **k: None})


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _InertMeta(name, (), {"__init__": lambda self, *a, **k: None, "__call__": lambda self, *a, **k: None})
        setattr(self, name, value)
        return value


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in _STUB_PACKAGES:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


class _KernelOps(types.ModuleType):
    def __getattr__(self, name):
        if name not in _KERNEL_OPS:
            raise AttributeError(name)

        def op(*args, **kwargs):
            raise NotImplementedError(f"torch.ops.sgl_kernel.{name} is stubbed by the harness (CPU kernel)")

        return op


def _no_pinned_memory(torch):
    import functools

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            if kwargs.get("pin_memory"):
                kwargs["pin_memory"] = False
            return fn(*args, **kwargs)

        return inner

    for name in ("tensor", "empty", "zeros", "ones", "full", "arange", "as_tensor", "empty_like", "zeros_like"):
        setattr(torch, name, wrap(getattr(torch, name)))
    torch.Tensor.pin_memory = lambda self, *a, **k: self


def sglang_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("sglang") is not None


_STATE: dict = {}


def _setup_process():
    if _STATE.get("ready"):
        return
    os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    import logging

    import transformers.utils.import_utils as tf_imports

    tf_imports.is_torchvision_available()  # decided (absent) before the stub exists
    if not any(isinstance(f, _StubFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _StubFinder())
    import torch

    if not isinstance(getattr(torch.ops, "sgl_kernel", None), _KernelOps):
        torch.ops.sgl_kernel = _KernelOps("sgl_kernel")
    _no_pinned_memory(torch)
    logging.getLogger("sglang").setLevel(logging.ERROR)
    _STATE["ready"] = True


def _publish(server_args):
    from sglang.srt import runtime_context
    from sglang.srt.distributed import parallel_state

    if hasattr(runtime_context, "SpawnRanks"):
        runtime_context.publish(server_args, role="test", ranks=runtime_context.SpawnRanks(world_rank=0))
    else:  # 0.5.19-0.5.20: no SpawnRanks, publish() takes no `ranks` (runtime_context.py:1465 / :1571)
        runtime_context.publish(server_args, role="test")
    parallel = runtime_context.get_parallel()
    # 0.5.19 has no override_permanently: its world group is read from parallel_state itself (runtime_context.py:378)
    if parallel_state._WORLD is not None and hasattr(parallel, "override_permanently"):
        parallel.override_permanently(world_group=parallel_state._WORLD)


def _publish_for(server_args, base: Path):
    """`_publish`; for a DSA base (DeepSeek-V3.2: `index_topk` in its config) with `torch.cuda.get_device_capability`
    answering (9, 0) meanwhile: SGLang's server-arg resolution for DSA models asks the GPU's compute capability on
    every non-NPU/XPU platform, the CPU engine included (sglang/srt/arg_groups/model_hook.py:339-341), and the
    answer only picks DSA kernel defaults (kv-cache dtype, split backend), none of which touches LoRA."""
    import torch

    config = json.loads((base / "config.json").read_text())
    if "index_topk" not in config and "index_topk" not in (config.get("text_config") or {}):
        _publish(server_args)
        return
    real = torch.cuda.get_device_capability
    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
    try:
        _publish(server_args)
    finally:
        torch.cuda.get_device_capability = real


def _init_dist(server_args):
    import socket

    import torch
    from sglang.srt.distributed.parallel_state import (
        init_distributed_environment,
        initialize_model_parallel,
        model_parallel_is_initialized,
    )

    if not torch.distributed.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        init_distributed_environment(
            world_size=1, rank=0, local_rank=0, backend="gloo", distributed_init_method=f"tcp://127.0.0.1:{port}"
        )
    if not model_parallel_is_initialized():
        initialize_model_parallel(backend="gloo")


# ------------------------------------------------------------------------------------------------ base models
# transformers -> SGLang name. PhiMoE: transformers 5 calls the class PhimoeForCausalLM; the released checkpoints
# (and the fixture's base config) say PhiMoEForCausalLM, SGLang's registered name (sglang/srt/models/phimoe.py:558)
_ARCH = {
    "Kimi_K25ForConditionalGeneration": "KimiK25ForConditionalGeneration",
    "PhimoeForCausalLM": "PhiMoEForCausalLM",
}
_TEXT_ONLY = {"Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM"}
# Released DeepSeek-V3 / Kimi configs carry these; transformers 5 drops them and SGLang reads them unguarded.
_DEEPSEEK_FIELDS = {"moe_layer_freq": 1, "topk_method": "noaux_tc", "scoring_func": "sigmoid", "ep_size": 1}
# Released MiniMax-M2 configs (MiniMaxAI/MiniMax-M2 config.json) carry these router fields; transformers 5's
# MiniMaxM2Config drops them and SGLang's minimax_m2.py:550 reads `scoring_func` unguarded. `rotary_dim` (the
# rotary width, 64 of head_dim 128 on the Hub) defaults to head_dim here: not a LoRA target either.
_MINIMAX_M2_FIELDS = {"scoring_func": "sigmoid"}
_DEEPSEEK_YARN = {"rope_type": "deepseek_yarn", "factor": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
# text configs served by SGLang's DeepSeek-V2 MLA code (LongCat-Flash's LongcatFlashDecoderLayer builds
# DeepseekV2AttentionMLA too: sglang/srt/models/longcat_flash.py:364-392)
_DEEPSEEK_MLA_TYPES = ("deepseek_v3", "deepseek_v32", "deepseek_v2", "kimi_k2", "glm_moe_dsa", "longcat_flash")


def _hy_v3_released_fields(cfg: dict) -> None:
    """HY-V3's released config carries `first_k_dense_replace` and `route_norm`, which transformers 5 writes as
    `mlp_layer_types` and drops (sglang/srt/models/hunyuan_v3.py:125 reads route_norm unguarded, :397 takes
    first_k_dense_replace with default 0, which would make the dense layer 0 MoE); neither is a LoRA target.
    fam-misc (issue 25)."""
    types = list(cfg.get("mlp_layer_types") or [])
    cfg.setdefault("first_k_dense_replace", next((i for i, t in enumerate(types) if t != "dense"), len(types)))
    cfg.setdefault("route_norm", True)


def _exaone_moe_released_fields(cfg: dict) -> None:
    """LG's EXAONE-MoE config (K-EXAONE, the ExaoneMoE class SGLang ported) marks its MoE layers with the list
    `is_moe_layer`, which SGLang reads unguarded (sglang/srt/models/exaone_moe.py:497 in 0.5.23, :498 in 0.5.22);
    transformers 5 writes the same pattern as `mlp_layer_types` ('sparse' = MoE, transformers==5.23.0
    models/exaone_moe/modeling_exaone_moe.py:336-337). Not a LoRA target. exaone (issue 25)."""
    cfg.setdefault("is_moe_layer", [t == "sparse" for t in cfg.get("mlp_layer_types") or []])


def _patch_config(config: dict, model_class: str) -> dict:
    """The config SGLang 0.5.23 is given for one case (none of these fields is a LoRA target):
    - `architectures` = the case's model class, spelled as SGLang registers it (Kimi-K2.5);
    - text-only Qwen3.5 classes on a composite (VL) checkpoint: the text config alone, as transformers loads it for
      `Qwen3_5ForCausalLM` (SGLang picks its text-only classes by this architecture name);
    - DeepSeek-V3 / Kimi / GLM-5 (glm_moe_dsa) text configs: a `deepseek_yarn` rope with factor 1 (the identity scaling), because
      SGLang's CPU rope factory (`get_rope_cpu`) supports only that rope type; the GPU factory takes the default rope.
      And `_DEEPSEEK_FIELDS` (router/MoE fields every released DeepSeek-V3/Kimi config has; transformers 5 drops
      them and SGLang's `deepseek_v2.py` reads them unguarded);
    - Qwen3-Next / Qwen3.5: `full_attention_interval` from `layer_types` (released configs carry both);
    - MiniMax-M2: `_MINIMAX_M2_FIELDS` and `rotary_dim` (released configs carry them; transformers 5 drops them);
    - Nemotron-H: transformers 5 writes `layers_block_type` as linear_attention/full_attention; SGLang's
      NemotronHConfig accepts mamba/attention/mlp/moe (same layers, older spelling);
    - Kimi-K2.5 (v5): SGLang's KimiK25 vision config wants the remote-code field names (`vt_hidden_size`,
      `init_pos_emb_*`, `text_hidden_size`); copied from the transformers names. The vision tower is never a LoRA
      target in SGLang (its `should_apply_lora`), and its weights are not loaded (load_format=dummy, `_DUMMY`).
    """
    config = json.loads(json.dumps(config))
    if model_class in _TEXT_ONLY and "text_config" in config:
        text = config["text_config"]
        text.setdefault("tie_word_embeddings", config.get("tie_word_embeddings", False))
        config = text
    config["architectures"] = [_ARCH.get(model_class, model_class)]
    for cfg in (config, config.get("text_config") or {}):
        if cfg.get("model_type") in _DEEPSEEK_MLA_TYPES:
            theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))
            cfg["rope_scaling"] = dict(_DEEPSEEK_YARN, original_max_position_embeddings=cfg["max_position_embeddings"])
            cfg["rope_parameters"] = dict(cfg["rope_scaling"], rope_theta=theta)
            cfg["rope_theta"] = theta
            for key, value in _DEEPSEEK_FIELDS.items():
                cfg.setdefault(key, value)
        types_ = cfg.get("layer_types")
        if isinstance(types_, list) and "full_attention" in types_ and "full_attention_interval" not in cfg:
            cfg["full_attention_interval"] = types_.index("full_attention") + 1
        if cfg.get("model_type") == "hy_v3":
            _hy_v3_released_fields(cfg)
        if cfg.get("model_type") == "exaone_moe":
            _exaone_moe_released_fields(cfg)
        if cfg.get("model_type") == "minimax_m2":
            for key, value in _MINIMAX_M2_FIELDS.items():
                cfg.setdefault(key, value)
            cfg.setdefault("rotary_dim", cfg.get("head_dim"))
        if cfg.get("model_type") == "nemotron_h":
            spelling = {"linear_attention": "mamba", "full_attention": "attention"}
            for key in ("layers_block_type", "mtp_layers_block_type"):
                if isinstance(cfg.get(key), list):
                    cfg[key] = [spelling.get(t, t) for t in cfg[key]]
    vision = config.get("vision_config")
    if config.get("model_type") == "kimi_k25" and vision is None:  # v4emu: no tower; SGLang builds one anyway
        vision = config["vision_config"] = {
            "hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1, "intermediate_size": 48,
            "patch_size": 4, "merge_kernel_size": [2, 2], "pos_emb_height": 4, "pos_emb_width": 4, "pos_emb_time": 1,
        }  # fmt: skip
    if config.get("model_type") == "kimi_k25" and isinstance(vision, dict) and "vt_hidden_size" not in vision:
        vision.update(
            vt_hidden_size=vision["hidden_size"],
            vt_num_attention_heads=vision["num_attention_heads"],
            vt_num_hidden_layers=vision["num_hidden_layers"],
            vt_intermediate_size=vision["intermediate_size"],
            init_pos_emb_height=vision.get("pos_emb_height", 4),
            init_pos_emb_width=vision.get("pos_emb_width", 4),
            init_pos_emb_time=vision.get("pos_emb_time", 1),
            text_hidden_size=config["text_config"]["hidden_size"],
        )
    return config


def _base_weights(base_dir: Path) -> dict:
    from safetensors.torch import load_file

    path = base_dir / "model.safetensors"
    if path.exists():
        return load_file(str(path))
    # v4emu_kimi_k25 has config.json only: the v4 DeepSeek-V3 weights under `language_model.` (tests/fixtures/README.md)
    donor = load_file(str(base_dir.parent / "v4_deepseek_v3" / "model.safetensors"))
    return {f"language_model.{k}": v for k, v in donor.items()}


@cache
def _base_copy(base_dir: Path, model_class: str) -> Path:
    from safetensors.torch import save_file

    # not setdefault(): its argument would create (and leak) a fresh temporary folder on every call
    if "tmp" not in _STATE:
        _STATE["tmp"] = tempfile.mkdtemp(prefix="sglang-proof-")
    root = Path(_STATE["tmp"])
    out = root / f"{base_dir.name}-{model_class}"
    if out.exists():
        return out
    out.mkdir()
    config = json.loads((base_dir / "config.json").read_text())
    patched = _patch_config(config, model_class)
    (out / "config.json").write_text(json.dumps(patched, indent=1))
    weights = _base_weights(base_dir)
    if "text_config" in config and "text_config" not in patched:  # composite checkpoint -> text model keys
        prefix = "model.language_model."
        weights = {
            ("model." + k[len(prefix) :] if k.startswith(prefix) else k): v
            for k, v in weights.items()
            if not k.startswith("model.visual.")
        }
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "model.safetensors"))
    return out


# Base weights are not read on the LoRA path (buffers come from get_hidden_dim and the adapter), so these classes
# are built with `load_format=dummy`: Kimi-K2.5 (transformers-5 vision weight names SGLang's loader does not know)
# and the issue-14 families, whose transformers-5 checkpoints SGLang's loaders either misname (MiniMax through the
# Transformers fallback: `block_sparse_moe` vs t5's `mlp`; Gemma-3 / Qwen3-VL(-MoE) / Llama-4 composite names) or
# size differently on tiny fixture configs (OLMoE's q_norm is hidden_size wide in olmoe.py, heads x head_dim in t5).
_DUMMY = {
    "Kimi_K25ForConditionalGeneration",
    "KimiK25ForConditionalGeneration",
    "Qwen3ForCausalLM",
    "Gemma3ForCausalLM",
    "Gemma3ForConditionalGeneration",
    "Phi3ForCausalLM",
    "Glm4ForCausalLM",
    "Qwen3VLForConditionalGeneration",
    "GptOssForCausalLM",
    "Glm4MoeForCausalLM",
    "Llama4ForCausalLM",
    "Llama4ForConditionalGeneration",
    "Qwen2MoeForCausalLM",
    "OlmoeForCausalLM",
    "GraniteMoeForCausalLM",
    "GraniteMoeHybridForCausalLM",
    "MiniMaxForCausalLM",
    "MiniMaxM2ForCausalLM",
    "DeepseekV32ForCausalLM",
    "Qwen3VLMoeForConditionalGeneration",
    # fam-misc (issue 25): transformers 5 saves Kimi-Linear's dense layer-0 MLP under `block_sparse_moe` (its load-time
    # rename block_sparse_moe -> mlp reversed for every layer), which SGLang's kimi_linear.py loader does not know
    "KimiLinearForCausalLM",
}


# Classes whose model hook asserts a GPU attention backend (EXAONE-MoE with sliding-window layers: one of fa3 /
# triton / trtllm_mha, sglang/srt/arg_groups/model_hook.py:668-681 in 0.5.23). Triton's builds on the CPU (the
# kernels run under TRITON_INTERPRET, set in _setup_process; no forward runs here). exaone (issue 25).
_TRITON_ATTENTION = {"ExaoneMoeForCausalLM"}


def _server_args(base: Path, model_class: str):
    from sglang.srt.server_args import ServerArgs

    extra = {"attention_backend": "triton"} if model_class in _TRITON_ATTENTION else {}
    return ServerArgs(
        **extra,
        model_path=str(base),
        load_format="dummy" if model_class in _DUMMY else "auto",
        mamba_radix_cache_strategy="no_buffer",
        disable_overlap_schedule=True,
        device="cpu",
        dtype="float32",
        enable_lora=True,
        lora_backend="torch_native",
        max_loras_per_batch=1,
        disable_cuda_graph=True,
        disable_shared_experts_fusion=True,
        skip_tokenizer_init=True,
    )


@dataclass
class _Base:
    server_args: object
    model_config: object
    load_config: object
    model: object


def _build_base(base_dir: Path, model_class: str) -> _Base:
    """SGLang's model class for one base, built once per process (the LoRA wrapping is undone after each case)."""
    key = f"{base_dir}:{model_class}"
    if key in _STATE.setdefault("bases", {}):
        base = _STATE["bases"][key]
        _publish(base.server_args)
        return base
    _setup_process()
    from sglang.srt.configs.device_config import DeviceConfig
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.model_executor.model_runner_components.load_model_utils import build_load_config
    from sglang.srt.model_loader import get_model_loader

    copy = _base_copy(base_dir, model_class)
    sa = _server_args(copy, model_class)
    _publish_for(sa, copy)
    _init_dist(sa)
    mc = ModelConfig.from_server_args(sa)
    # The CPU engine's `adjust_config_with_unaligned_cpu_tp` minus its MLP-width padding: only the TP=1 head-count
    # bookkeeping (`linear_num_*_heads_cpu`, read by the GDN layers on the CPU device).
    from sglang.srt.configs.update_config import adjust_tp_num_heads_if_necessary

    for cfg in (mc.hf_config, getattr(mc.hf_config, "text_config", None)):
        if cfg is not None:
            adjust_tp_num_heads_if_necessary(cfg, 1, True)
    kw = dict(
        server_args=sa,
        tp_rank=0,
        remote_instance_weight_transporter_engine=None,
        remote_instance_weight_transporter_session_id="",
        draft_model_idx=None,
        weight_cache_mode="off",
        weight_cache_socket=None,
    )
    model = get_model_loader(load_config=build_load_config(**kw), model_config=mc).load_model(
        model_config=mc, device_config=DeviceConfig("cpu", 0)
    )
    # The adapter is read with the server's load config; with dummy base weights that is the `auto` format.
    lc = build_load_config(**kw, load_format="auto")
    base = _Base(sa, mc, lc, model)
    _STATE["bases"][key] = base
    return base


def _model_class(case: str) -> str:
    """The case's model class; emulated remote-code cases describe the emulation after the name. A case trained on
    one class and served on another (case.json `served_class`) is built as the class it is served on."""
    meta = case_meta(case)
    return re.match(r"\w+", meta.get("served_class") or meta["model_class"]).group(0)


def _snapshot(model):
    return [(m, dict(m._modules)) for m in model.modules()]


def _restore(snapshot):
    for module, children in snapshot:
        module._modules.clear()
        module._modules.update(children)


# ------------------------------------------------------------------------------------------------ the load
def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def load(case: str, adapter_dir: Path, base_dir: Path) -> EngineLoad:
    base = _build_base(Path(base_dir), _model_class(case))
    snap = _snapshot(base.model)
    try:
        return _load(case, Path(adapter_dir), base)
    finally:
        _restore(snap)


def _load(case: str, adapter_dir: Path, base: _Base) -> EngineLoad:
    import torch
    from sglang.srt.lora.lora_manager import LoRAManager
    from sglang.srt.lora.lora_registry import LoRARef
    from sglang.srt.runtime_context import get_lora

    ref = LoRARef(
        lora_id=LoRARef.deterministic_id("a", str(adapter_dir)), lora_name="a", lora_path=str(adapter_dir), pinned=False
    )
    try:
        manager = LoRAManager(
            base_model=base.model,
            base_hf_config=base.model_config.hf_config,
            max_loras_per_batch=get_lora().max_loras_per_batch,
            load_config=base.load_config,
            dtype=torch.float32,
            server_args=base.server_args,
            lora_backend=get_lora().lora_backend,
            max_lora_rank=get_lora().max_lora_rank,
            target_modules=get_lora().lora_target_modules,
            lora_paths=[ref],
        )
        manager.fetch_new_loras({ref.lora_id})
        tokens = max(_in_dim(m) for layer in manager.lora_modules for m in layer.values()) if _any(manager) else 1
        manager.prepare_lora_batch(_batch(ref.lora_id, tokens))
    except Exception as exc:  # the engine refused or broke while loading: that is the result
        if os.environ.get("SGLANG_PROOF_TRACE"):
            traceback.print_exc()
        return EngineLoad(load_error=_error(exc))
    return EngineLoad(deltas=_deltas(case, manager, ref.lora_id, tokens))


def _any(manager) -> bool:
    return any(layer for layer in manager.lora_modules)


def _batch(lora_id: str, tokens: int):
    import torch
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    return types.SimpleNamespace(
        forward_mode=ForwardMode.EXTEND,
        batch_size=1,
        lora_ids=[lora_id],
        extend_seq_lens=torch.tensor([tokens], dtype=torch.int32),
        extend_seq_lens_cpu=[tokens],
        extend_num_tokens=tokens,
        can_run_decode_cuda_graph=False,
    )


def _in_dim(module) -> int:
    from sglang.srt.lora.layers import FusedMoEWithLoRA

    if isinstance(module, FusedMoEWithLoRA):
        return 1
    return int(module.A_buffer.shape[-1]) if hasattr(module, "A_buffer") else int(module.A_buffer_qkv.shape[-1])


# --------------------------------------------------------------------------------------------- the deltas
def _dense_delta(module, tokens: int):
    """[out, in] float64 from the wrapper's own apply path with an identity input."""
    import torch
    from sglang.srt.lora.layers import ReplicatedLinearWithLoRA

    n_in = _in_dim(module)
    x = torch.eye(tokens, n_in, dtype=torch.float32)
    if isinstance(module, ReplicatedLinearWithLoRA) and module.first_output_dim == 0:
        backend = module.lora_backend
        a_out = backend.run_lora_a_sgemm(x, module.A_buffer)
        out = backend.run_lora_b_sgemm(
            x=a_out,
            weights=module.B_buffer,
            output_offset=module._output_offset,
            output_offset_cpu=module._output_offset.cpu(),
            base_output=None,
        )
    else:
        b = module.B_buffer if hasattr(module, "B_buffer") else module.B_buffer_qkv
        out = module.apply_lora(torch.zeros(tokens, b.shape[-2], dtype=torch.float32), x)
    return out[:n_in].double().T.contiguous().numpy()


def _lm_head_delta(module, tokens: int):
    """[vocab, hidden] float64 from ParallelLMHeadWithLoRA's own apply path with an identity input (it sits outside
    the layers: LoRAManager.lm_head_module)."""
    import torch

    n_in = module.embed_dim
    assert tokens >= n_in, f"the batch has {tokens} tokens, lm_head needs {n_in} for an identity input"
    x = torch.eye(tokens, n_in, dtype=torch.float32)
    out = module.apply_lora(torch.zeros(tokens, module.vocab_size, dtype=torch.float32), x)
    return out[:n_in].double().T.contiguous().numpy()


def _embedding_delta(module, tokens: int):
    """[vocab, hidden] float64 from VocabParallelEmbeddingWithLoRA's own apply path (LoRAManager.embed_tokens_module),
    looking up every token id, `tokens` ids at a time (the batch the backend was prepared for)."""
    import inspect

    import torch

    vocab = module.vocab_size
    # 0.5.19-0.5.22 take the backend's batch info as a third argument (their forward passes it), 0.5.23 not
    wants = inspect.signature(module.apply_lora).parameters.get("batch_info")
    extra = (module.lora_backend.batch_info,) if wants and wants.default is inspect.Parameter.empty else ()
    rows = []
    for start in range(0, vocab, tokens):
        ids = torch.arange(start, start + tokens) % vocab
        out = module.apply_lora(torch.zeros(tokens, module.embed_dim, dtype=torch.float32), ids, *extra)
        rows.append(out[: min(tokens, vocab - start)])
    return torch.cat(rows).double().contiguous().numpy()


def _offsets(module) -> list[int] | None:
    from sglang.srt.lora.layers import (
        MergedColumnParallelLinearWithLoRA,
        QKVParallelLinearWithLoRA,
        ReplicatedLinearWithLoRA,
    )

    if isinstance(module, ReplicatedLinearWithLoRA):
        return [int(v) for v in module._output_offset.tolist()]
    if isinstance(module, (MergedColumnParallelLinearWithLoRA, QKVParallelLinearWithLoRA)):
        return [int(v) for v in module.output_offset_cpu.tolist()]
    return None


def _expert_deltas(manager, layer_id: int, slot: int):
    """{"gate"|"up"|"gate_up"|"down": [E, out, in]} float64 from the `*_moe` pool buffers, as the MoE runner reads them."""
    from sglang.srt.lora.utils import LoRAType

    pool = manager.memory_pool
    out = {}
    for proj in ("gate_up_proj", "down_proj"):
        key = f"{proj}_moe" if f"{proj}_moe" in pool.A_buffer else proj
        a = pool.get_tensor(target_module=key, layer_id=layer_id, lora_type=LoRAType.LORA_A)[slot].double()
        b = pool.get_tensor(target_module=key, layer_id=layer_id, lora_type=LoRAType.LORA_B)[slot].double()
        r = manager.max_lora_rank
        n_exp = max(a.shape[0], b.shape[0])
        a = a.expand(n_exp, -1, -1)
        b = b.expand(n_exp, -1, -1)
        if proj == "gate_up_proj" and a.shape[1] > r:  # gated: two slices at max_r spacing
            inter = b.shape[1] // 2
            out["gate"] = (b[:, :inter] @ a[:, :r]).numpy()
            out["up"] = (b[:, inter:] @ a[:, r : 2 * r]).numpy()
        elif proj == "gate_up_proj":
            out["gate_up"] = (b @ a).numpy()
        else:
            out["down"] = (b @ a).numpy()
    return out


_LAYER = re.compile(r"layers\.(\d+)\.")
_FUSED = {  # PEFT leaf -> (SGLang fused leaf, slice index | tuple of slices)
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
    "q_a_proj": ("fused_qkv_a_proj_with_mqa", 0),
    "kv_a_proj_with_mqa": ("fused_qkv_a_proj_with_mqa", 1),
    "in_proj_qkv": ("in_proj_qkvz", (0, 1, 2)),
    "in_proj_z": ("in_proj_qkvz", 3),
    "in_proj_b": ("in_proj_ba", 0),
    "in_proj_a": ("in_proj_ba", 1),
}
_EXPERT_PROJ = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
_NOT_TEXT = ("vision", "visual", "mm_projector")


def _split(name: str) -> tuple[int, str] | None:
    if any(part in name for part in _NOT_TEXT):
        return None
    m = _LAYER.search(name)
    return (int(m.group(1)), name[m.end() :]) if m else None


def _deltas(case: str, manager, lora_id: str, tokens: int) -> dict[str, np.ndarray]:

    slot = manager.memory_pool.get_buffer_id(lora_id)
    wrapped: dict[tuple[int, str], object] = {}
    for layer in manager.lora_modules:
        for name, module in layer.items():
            split = _split(name)
            if split is not None:
                wrapped[split] = module
    dense_cache: dict = {}
    moe_cache: dict = {}

    def dense(key):
        if key not in dense_cache:
            dense_cache[key] = _dense_delta(wrapped[key], tokens)
        return dense_cache[key]

    def experts(key):
        if key not in moe_cache:
            moe_cache[key] = _expert_deltas(manager, key[0], slot)
        return moe_cache[key]

    meta = case_meta(case)["modules"]
    want = reference_deltas(case)
    out: dict[str, np.ndarray] = {}
    for module in want:
        split = _split(module)
        if split is None:
            if module == "lm_head" and manager.lm_head_module is not None:
                out[module] = _lm_head_delta(manager.lm_head_module, tokens)
            elif module.endswith("embed_tokens") and getattr(manager, "embed_tokens_module", None) is not None:
                out[module] = _embedding_delta(manager.embed_tokens_module, tokens)
            continue
        layer_id, rest = split
        info = meta.get(module, {})
        shape = want[module].shape
        got = _module_delta(layer_id, rest, info, shape, wrapped, dense, experts)
        if got is not None:
            out[module] = got
    return out


def _module_delta(layer_id, rest, info, shape, wrapped, dense, experts):
    from sglang.srt.lora.layers import FusedMoEWithLoRA

    parts = rest.split(".")
    # routed experts: per-expert `...experts.<e>.<proj>` or a 3-D ParamWrapper `...experts[.base_layer]` + param
    if "experts" in parts and not any(p in ("shared_experts",) for p in parts):
        i = parts.index("experts")
        key = (layer_id, ".".join(parts[: i + 1]))
        if key not in wrapped:  # transformers 5 names Mixtral's MoE block `mlp`; SGLang keeps `block_sparse_moe`
            key = (layer_id, key[1].replace("mlp.experts", "block_sparse_moe.experts"))
        if key not in wrapped:  # another name for the layer's one FusedMoE (the Transformers fallback nests it in
            # `mlp.experts.experts`): SGLang files expert keys by layer, so that one wrapper is the one they reach
            moe = [k for k, m in wrapped.items() if k[0] == layer_id and isinstance(m, FusedMoEWithLoRA)]
            key = moe[0] if len(moe) == 1 else key
        if not isinstance(wrapped.get(key), FusedMoEWithLoRA):
            return None
        held = experts(key)
        if info.get("param"):  # 3-D: [E, out, in] here, then in the parameter's own layout (common.to_param_layout)
            param = info["param"]
            if param == "gate_up_proj":
                if "gate" in held:
                    # the runner's two B slices, rows [:I] then [I:], are the output columns in the base w13's order:
                    # interleaved for GPT-OSS-style layers (sglang/srt/lora/layers.py:1053-1056)
                    rows = np.concatenate([held["gate"], held["up"]], axis=1)
                    interleaved = bool(getattr(wrapped[key], "_uses_interleaved_gate_up", False))
                    return to_param_layout(rows, info, engine_interleaved=interleaved)
                return to_param_layout(held["gate_up"], info)
            if param == "down_proj":
                return to_param_layout(held["down"], info)
            if param == "up_proj":  # NemotronH non-gated experts
                return to_param_layout(held.get("gate_up"), info)
            return None
        expert, proj = int(parts[i + 1]), _EXPERT_PROJ.get(parts[i + 2])
        if proj is None:
            return None
        if proj in held:
            return held[proj][expert]
        if proj in ("up", "gate") and "gate_up" in held:  # non-gated: the single projection
            return held["gate_up"][expert]
        return None
    key = _same_leaf(wrapped, (layer_id, rest))
    if key in wrapped and not isinstance(wrapped[key], FusedMoEWithLoRA):
        return _fit(dense(key), shape)
    leaf = parts[-1]
    if leaf not in _FUSED:
        return None
    fused_leaf, index = _FUSED[leaf]
    key = _same_leaf(wrapped, (layer_id, ".".join(parts[:-1] + [fused_leaf])))
    module = wrapped.get(key)
    if module is None or isinstance(module, FusedMoEWithLoRA):
        return None
    full = dense(key)
    offsets = _offsets(module)
    if offsets is None:
        return None
    slices = index if isinstance(index, tuple) else (index,)
    if max(slices) + 1 >= len(offsets):
        return None
    return _fit(np.concatenate([full[offsets[s] : offsets[s + 1]] for s in slices], axis=0), shape)


def _same_leaf(wrapped, key):
    """`key`, or else, where the model class has no module at all under the key's container on that layer, the
    layer's one wrapped module of the same last name: SGLang files a layer's LoRA weights by target name, whatever
    container holds them (sglang/srt/lora/mem_pool.py:926-933, get_target_module_name), so the adapter's
    `self_attn.qkv_proj` reaches a class that keeps qkv_proj / o_proj on the decoder layer (Falcon-H1)."""
    container = key[1].split(".", 1)[0]
    if key in wrapped or any(k[0] == key[0] and k[1].startswith(f"{container}.") for k in wrapped):
        return key
    leaf = key[1].rsplit(".", 1)[-1]
    same = [k for k in wrapped if k[0] == key[0] and k[1].rsplit(".", 1)[-1] == leaf]
    return same[0] if len(same) == 1 else key


def _fit(delta: np.ndarray, shape) -> np.ndarray:
    """SGLang may hold fewer rows than PEFT's module (Nemotron-H mamba in_proj: z|x only): the rest adds zero."""
    if delta.shape == tuple(shape) or len(shape) != 2 or delta.shape[1] != shape[1] or delta.shape[0] > shape[0]:
        return delta
    full = np.zeros(shape, dtype=np.float64)
    full[: delta.shape[0]] = delta
    return full


# ------------------------------------------------------------------------------------------------ truth table
def served_base(case: str) -> Path:
    """The base folder SGLang is given for `case` (a copy with the fields of `_patch_config`): lora-convert's
    prediction and layout are made against the same config, so both sides describe the same model class."""
    return _base_copy(case_base_dir(case), _model_class(case))


def truth_row(case: str, root: Path) -> dict:
    """The record tests/test_proof_sglang.py compares (tests/engine_proof/common.py `layout_record` contract): the
    original adapter through SGLang, and lora-convert's `--layout sglang` output through SGLang, both on the base
    SGLang is given (`served_base`), which is also what the prediction is made against."""
    from common import layout_record, normalize_layout, original_record

    base = served_base(case)
    row = {"served_base": str(base), "original": original_record(case, load(case, fixture_adapter(case), base))}
    out, refusal = normalize_layout(case, "sglang", base, root / f"sglang-{case}")
    row["layout"] = layout_record(case, out, refusal, None if out is None else load(case, out, base))
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--truth", type=Path, required=True, help="write the truth table (JSON) here")
    parser.add_argument("--workdir", type=Path, required=True, help="base copies and layout outputs go here")
    parser.add_argument("--case", action="append", help="only these cases")
    args = parser.parse_args(argv)
    root = args.workdir
    _STATE["tmp"] = str(root)
    table = {}
    for case in args.case or fixture_cases():
        try:
            table[case] = truth_row(case, root)
        except Exception as exc:  # a harness failure (not an engine verdict): recorded, never silently skipped
            traceback.print_exc()
            table[case] = {"harness_error": _error(exc)}
            print(case, "HARNESS ERROR", _error(exc), flush=True)
            continue
        o = table[case]["original"]
        print(case, o.get("load_error") or _counts(o["modules"]), flush=True)
    args.truth.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return 0


def _counts(verdicts: dict) -> dict:
    counts: dict = {}
    for v in verdicts.values():
        counts[v] = counts.get(v, 0) + 1
    return counts


if __name__ == "__main__":
    sys.exit(main())
