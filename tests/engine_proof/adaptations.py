"""Per-release adaptations of the CPU proof: what a release needs, beyond the harness's own stubs, to run its LoRA
loader on a CPU-only venv.

Each one is named, says which releases it applies to (found by running every release on every fixture:
/tmp/team/issue24-research.md §4) and why, and patches only GPU-only or CPU-platform machinery, or an environment
clash with the venv's packages; none touches what the engine does with a LoRA weight (parsing, packing, scaling,
buffers, refusals). A release outside every range gets none. A new release that needs one fails its proof with the
error, which is then named here with its range.

The harness's calls into engine APIs that changed between releases are handled in the harnesses themselves
(vllm_0_33_0.py `_candidates`, sglang_0_5_23.py `_publish`), each with the releases that lack the API.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


@dataclass(frozen=True)
class Adaptation:
    name: str
    engine: str
    first: str  # oldest release it applies to
    last: str | None  # newest release it applies to; None: every later one too, until one shows otherwise
    why: str
    apply: Callable[[], None]

    def applies_to(self, engine: str, version: str) -> bool:
        if engine != self.engine or _key(version) < _key(self.first):
            return False
        return self.last is None or _key(version) <= _key(self.last)


# ------------------------------------------------------------------------------------------------ vLLM
def _vllm_cpu_triton_check() -> None:
    import vllm.triton_utils as triton_utils
    from vllm.platforms.cpu import CpuPlatform

    check = CpuPlatform.check_and_update_config.__func__

    def check_with_triton(cls, vllm_config):
        saved, triton_utils.HAS_TRITON = triton_utils.HAS_TRITON, True
        try:
            return check(cls, vllm_config)
        finally:
            triton_utils.HAS_TRITON = saved

    CpuPlatform.check_and_update_config = classmethod(check_with_triton)


def _vllm_triton_experts_device() -> None:
    from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts

    TritonExperts._supports_current_device = staticmethod(lambda: True)


def _vllm_transformers_moe_format() -> None:
    from vllm.model_executor.models.transformers.moe import TransformersRoutedExperts

    TransformersRoutedExperts._is_mixtral_format = False


_ACT_AND_MUL_OPS = (
    "silu_and_mul",
    "gelu_and_mul",
    "gelu_tanh_and_mul",
    "mul_and_silu",
    "fatrelu_and_mul",
    "swigluoai_and_mul",
    "gelu_new",
    "gelu_fast",
    "gelu_quick",
)


def _vllm_cpu_activation_ops() -> None:
    import torch

    lib = torch.library.Library("_C", "FRAGMENT")
    for op in _ACT_AND_MUL_OPS:
        if hasattr(torch.ops._C, op):
            continue
        lib.define(f"{op}(Tensor(a!) out, Tensor input) -> ()")
        lib.impl(op, lambda out, x: None, "CPU")
    _KEEP.append(lib)  # the library object must outlive this call, or its ops are deregistered


_KEEP: list = []


def _vllm_kimi_linear_cuda_setup() -> None:
    import types

    import torch
    from vllm.models.kimi_k3.nvidia import model as kimi

    class _Cuda:
        """torch.cuda as this module sees it: no stream (a stream orders GPU kernels; no forward runs here)."""

        def __getattr__(self, name):
            return getattr(torch.cuda, name)

        @staticmethod
        def Stream(*args, **kwargs):  # noqa: N802 - torch's name
            return None

    class _Torch(types.ModuleType):
        cuda = _Cuda()

        def __getattr__(self, name):
            return getattr(torch, name)

    kimi.torch = _Torch("torch")
    # the GEMM-AR kernel: the release's own check answers False off CUDA, but 0.31-0.32 import its CUDA DSL first
    kimi.maybe_init_gemm_rs_ar = lambda vllm_config, use_sequence_parallel: False


# ------------------------------------------------------------------------------------------------ SGLang
def _sglang_qwen3_asr_register() -> None:
    import transformers

    register = transformers.AutoConfig.register

    def register_existing_ok(model_type, config, exist_ok=False):
        return register(model_type, config, exist_ok=True)

    transformers.AutoConfig.register = staticmethod(register_existing_ok)


ADAPTATIONS = (
    Adaptation(
        "cpu-triton-check",
        "vllm",
        "0.34.0",
        None,
        "CpuPlatform.check_and_update_config refuses x86 without triton-cpu (vllm/platforms/cpu.py:241-243); the "
        "venv's triton is not triton-cpu and no kernel runs. Answered True inside that check only: setting "
        "HAS_TRITON globally would send Qwen3.5's FLA layers to Triton kernels.",
        _vllm_cpu_triton_check,
    ),
    Adaptation(
        "triton-experts-device",
        "vllm",
        "0.34.0",
        None,
        "LoRA MoE goes through the kernel oracle, which asks whether TritonExperts supports the current device "
        "(oracle/unquantized.py:234-262 -> modular_kernel.py:650-651); on CUDA it does. The proof reads LoRA "
        "buffers and never runs the MoE kernel.",
        _vllm_triton_experts_device,
    ),
    Adaptation(
        "transformers-moe-expert-names",
        "vllm",
        "0.34.0",
        None,
        "OLMoE/Gemma go through the Transformers backend; `_is_mixtral_format` is set while checkpoint weights "
        "stream in (transformers/moe.py:200-206), which load_format=dummy never does, so get_expert_mapping "
        "returns both namings (:186-189). Set to what a real load of the fixture bases sets (their experts are "
        "named gate_proj/up_proj/down_proj, not w1/w2/w3).",
        _vllm_transformers_moe_format,
    ),
    Adaptation(
        "cpu-activation-ops",
        "vllm",
        "0.30.0",
        "0.32.0",
        "The CPU platform binds torch.ops._C.silu_and_mul (and the other *_and_mul ops) when an activation layer is "
        "built (model_executor/layers/activation.py:128-135 in 0.30.0; 0.33 binds them only on POWERPC), and vllm._C "
        "is not importable without CUDA. No-op Python ops of the same names: no forward runs.",
        _vllm_cpu_activation_ops,
    ),
    # engproof (issue 25): 0.33.0-0.34.0 refuse Kimi-Linear's LoRA in the engine config, before the model is built
    Adaptation(
        "kimi-linear-cuda-setup",
        "vllm",
        "0.30.0",
        "0.32.0",
        "KimiLinearModel.__init__ creates a CUDA stream for overlapping the MLA output-gate GEMM in the forward "
        "(vllm/models/kimi_k3/nvidia/model.py:1186 in 0.30.0, :1147 in 0.31.0, :1155 in 0.32.0; the registry serves "
        "that CUDA class on a CPU too, models/kimi_k3/__init__.py:27-28), which torch refuses without CUDA, and asks "
        "maybe_init_gemm_rs_ar whether to bind the SM100 GEMM-AR kernel, which in 0.31-0.32 imports that kernel's "
        "CUDA DSL (`cutlass`, nvidia/model.py:158-171 in 0.31.0) before its own check answers False off CUDA "
        "(model_executor/kernels/linear/cute_dsl/gemm_rs_ar.py:1122-1123 in 0.31.0; 0.30.0 checks first, "
        "nvidia/model.py:173-174). Inside that module only, torch.cuda.Stream() gives None and "
        "maybe_init_gemm_rs_ar False: no forward runs, and the release's LoRA verdict on the class "
        "(load_lora_model's SupportsLoRA check) comes after the build.",
        _vllm_kimi_linear_cuda_setup,
    ),
    Adaptation(
        "qwen3-asr-config-registered",
        "sglang",
        "0.5.19",
        "0.5.19",
        "sglang/srt/configs/qwen3_asr.py:167-168 registers `qwen3_asr` with AutoConfig without exist_ok (0.5.20 "
        "passes exist_ok=True); the venv's transformers ships qwen3_asr itself, so every import of SGLang's configs "
        "fails. An environment clash (0.5.19 pins transformers 5.12.1), not LoRA.",
        _sglang_qwen3_asr_register,
    ),
)


@dataclass(frozen=True)
class CannotRun:
    """Fixtures a release's loader cannot be run on in this CPU environment, with the error the harness gets (the
    proof asserts exactly that error instead of the release's outcome, like CPU_UNBUILDABLE in vllm_0_33_0.py)."""

    engine: str
    first: str
    last: str | None
    cases: tuple[str, ...]
    error: str  # how the harness error begins
    why: str
    # only the `--layout` output cannot run (the original adapter is refused earlier, by the release's LoRA code,
    # and is still compared with the prediction): the layout's load error must begin with `error`
    layout_only: bool = False

    def applies_to(self, engine: str, version: str, case: str) -> bool:
        return case in self.cases and Adaptation("", self.engine, self.first, self.last, "", _none).applies_to(
            engine, version
        )


def _none() -> None:
    return None


CANNOT_RUN = (
    CannotRun(
        "sglang",
        "0.5.19",
        "0.5.21",
        ("v5_minimax", "v5_minimax_experts"),
        "ValueError: Unsupported TP style 'embedding_rowwise'",
        "MiniMax is served by SGLang's Transformers backend, which maps the base_model_tp_plan of the venv's "
        "transformers; 5.25 names a TP style `embedding_rowwise` that 0.5.19-0.5.21 do not know "
        "(models/transformers.py:231-247; 0.5.22 maps it, :243). These releases pin transformers 5.12.1, whose "
        "MiniMax config has no such style: an environment effect, not the release's LoRA code.",
    ),
    # f25 (issue 25): Seed-OSS and dots.llm1, served by the same Transformers backend.
    CannotRun(
        "sglang",
        "0.5.19",
        "0.5.21",
        ("v5_seed_oss", "v5_dots1"),
        "ValueError: Unsupported TP style 'embedding_rowwise'",
        "Seed-OSS and dots.llm1 have no SGLang class and are served by the Transformers backend, which maps the "
        "base_model_tp_plan of the venv's transformers; 5.25 names a TP style `embedding_rowwise` that 0.5.19-0.5.21 "
        "do not know (models/transformers.py:231-247; 0.5.22 maps it, :243): an environment effect, as for MiniMax.",
    ),
    # fam-mla (issue 25): Mistral-Small-4's text model (Mistral4ForCausalLM), served by the same Transformers backend.
    CannotRun(
        "sglang",
        "0.5.19",
        "0.5.21",
        ("v5_mistral4",),
        "ValueError: Unsupported TP style 'embedding_rowwise'",
        "SGLang registers no Mistral4ForCausalLM and serves it through the Transformers backend, which maps the "
        "base_model_tp_plan of the venv's transformers; 5.25 names a TP style `embedding_rowwise` that 0.5.19-0.5.21 "
        "do not know (models/transformers.py:231-247; 0.5.22 maps it, :243): an environment effect, as for MiniMax.",
    ),
    # exaone (issue 25): transformers' EXAONE-MoE class, served by the same Transformers backend before 0.5.22.
    CannotRun(
        "sglang",
        "0.5.19",
        "0.5.21",
        ("v5_exaone_moe",),
        "ValueError: Unsupported TP style 'embedding_rowwise'",
        "These releases register only LG's spelling ExaoneMoEForCausalLM (sglang/srt/models/exaone_moe.py:875 in "
        "0.5.19, :874 in 0.5.20, :867 in 0.5.21; 0.5.22 adds transformers' ExaoneMoeForCausalLM), so they serve the "
        "fixture's class through the Transformers backend, which maps the base_model_tp_plan of the venv's "
        "transformers; 5.25 names a TP style `embedding_rowwise` that 0.5.19-0.5.21 do not know "
        "(models/transformers.py:231-247): an environment effect, as for MiniMax. What LoRA does there is not traced.",
    ),
    CannotRun(
        "sglang",
        "0.5.19",
        "0.5.23",
        ("v5_llama_bnb4", "v5_llama_bnb8"),
        "ImportError: Please install bitsandbytes>=0.46.1",
        "A bitsandbytes base: SGLang registers the method (layers/quantization/__init__.py:77 in 0.5.23) and its "
        "linear method imports the bitsandbytes package when the model is built (layers/quantization/bitsandbytes.py"
        ":29-41), which the proof environment does not install (a CUDA kernel library): an environment effect. What "
        "the release does with LoRA over it (quant-dense-lora: the base layer's quant_method.apply plus the delta) is "
        "read, not run.",
    ),
    # nv4 (issue 24): a ModelOpt NVFP4 base, on both engines.
    CannotRun(
        "sglang",
        "0.5.19",
        "0.5.23",
        ("v5_deepseek_v3_nvfp4_shared",),
        "ValueError: torch.float32 is not supported for quantization method modelopt_fp4",
        "A ModelOpt NVFP4 base: SGLang serves it as modelopt_fp4 (configs/model_config.py:1866-1867 in 0.5.23), "
        "which takes only bfloat16/float16 activations, and the harness builds in float32 to compare deltas exactly; "
        "the path the case is about (the fused NVFP4 shared-expert kernel of 0.5.19-0.5.21) is chosen only on an "
        "sm100 GPU (models/deepseek_v2.py:784-801 in 0.5.21), which no CPU run reaches. The rule is read, not run: "
        "tests/test_engine_nvfp4_shared_experts.py checks the cited code of every release.",
    ),
    CannotRun(
        "vllm",
        "0.30.0",
        None,
        ("v5_deepseek_v3_nvfp4_shared",),
        "ValidationError: 1 validation error for VllmConfig\n  Value error, torch.float32 is not supported for "
        "quantization method modelopt_fp4",
        "A ModelOpt NVFP4 base: vLLM maps quant_method modelopt + quant_algo NVFP4 to modelopt_fp4 (a method it "
        "registers, model_executor/layers/quantization/modelopt.py:779-781 in 0.33.0) and refuses the harness's "
        "float32 model dtype for it before building the model (bfloat16/float16 only); what it does with LoRA over "
        "it (quant-dense-lora, quant-moe-lora through the NVFP4 MoE oracle's Marlin experts) is read, not run.",
    ),
    # fam-hybrid (issue 25): Jamba and OLMo-Hybrid have no SGLang class, and SGLang refuses their Transformers fallback.
    CannotRun(
        "sglang",
        "0.5.19",
        "0.5.23",
        ("v5_jamba",),
        "ValueError: JambaForCausalLM has no SGlang implementation and the Transformers implementation is not "
        "compatible with SGLang.",
        "Not an environment effect but the release's own verdict, asserted here because the harness meets it while "
        "building the base, before any LoRA code runs: no sglang/srt/models file registers JambaForCausalLM, and "
        "model_loader/utils.py:181-188 (0.5.23; :180-187 in 0.5.19) refuses the Transformers fallback for a class "
        "that is not attention-backend compatible. The rule hybrid-class-not-served predicts it for validate and "
        "refuses it in --layout sglang.",
    ),
    CannotRun(
        "sglang",
        "0.5.19",
        "0.5.23",
        ("v5_olmo_hybrid",),
        "ValueError: OlmoHybridForCausalLM has no SGlang implementation and the Transformers implementation is not "
        "compatible with SGLang.",
        "The release's own verdict, as for Jamba above: no sglang/srt/models file registers OlmoHybridForCausalLM, and "
        "the Transformers fallback is refused for a class that is not attention-backend compatible (rule "
        "hybrid-class-not-served).",
    ),
    # fam-gemma (issue 25): Gemma-4 configs as transformers 5.25 reads them (per-layer head_dim / KV heads).
    CannotRun(
        "sglang",
        "0.5.19",
        "0.5.23",
        ("v5_gemma4_text", "v5_gemma4_moe", "v5_gemma4_unified_text"),
        "AmbiguousGlobalPerLayerAttributeError: '",
        "transformers 5.25 (the proof environment's) turns a Gemma-4 text config's full-attention head_dim and KV "
        "heads into per_layer_config overrides, and then refuses a global `config.head_dim` / "
        "`config.num_key_value_heads` read (transformers/integrations/heterogeneity/configuration_utils.py:298); "
        "SGLang's config parser reads them with hasattr on the text config itself (sglang/srt/utils/hf_transformers/"
        "config.py:260-268 in 0.5.23), before any model is built. These releases pin transformers 5.12.1 "
        "(0.5.19-0.5.21) or 5.19.0 (0.5.22-0.5.23): an environment effect, not the release's LoRA code. What they do "
        "with these adapters (gemma4-kv-shared-q, qkv-missing-v) is read, not run.",
    ),
    CannotRun(
        "sglang",
        "0.5.19",
        "0.5.21",
        ("v5_gemma4_vl", "v5_gemma4_unified_vl"),
        "AmbiguousGlobalPerLayerAttributeError: '",
        "As for the Gemma-4 text cases: 0.5.19-0.5.21's config parser reads the per-layer head_dim of the VL "
        "wrapper's text config under transformers 5.25 (0.5.22-0.5.23 read the wrapper, which builds), an "
        "environment effect; these releases pin transformers 5.12.1.",
    ),
    CannotRun(
        "sglang",
        "0.5.22",
        "0.5.23",
        ("v5_gemma4_unified_vl",),
        "AttributeError: 'Gemma4VisionConfig' object has no attribute 'model_patch_size'",
        "The Gemma-4-Unified base was written by transformers 5.23 (vision_config model_type gemma4_unified_vision); "
        "transformers 5.25 reads its vision_config as a Gemma4VisionConfig, which has no model_patch_size, and "
        "SGLang's Gemma4UnifiedVisionEmbedder reads it when the model is built (sglang/srt/models/gemma4_unified.py"
        ":73 in 0.5.23): an environment effect (these releases pin transformers 5.19.0).",
    ),
    CannotRun(
        "sglang",
        "0.5.22",
        "0.5.23",
        ("v5_gemma4_vl",),
        "AmbiguousGlobalPerLayerAttributeError: 'head_dim'",
        "The `--layout sglang` output (the original adapter is refused earlier, for its regex target_modules): "
        "Gemma4ForConditionalGeneration.get_hidden_dim sizes qkv_proj / o_proj from `self.config.head_dim` "
        "(sglang/srt/models/gemma4_mm.py:1104-1119 in 0.5.23), which transformers 5.25 refuses to read globally once "
        "the full-attention layers' head_dim is a per_layer_config override: an environment effect (these releases "
        "pin transformers 5.19.0). Under it the full-attention layers' o_proj (heads x global_head_dim wide) would "
        "still not fit a buffer sized from the sliding head_dim; not run.",
        layout_only=True,
    ),
)


def cannot_run(engine: str, version: str, case: str) -> CannotRun | None:
    return next((c for c in CANNOT_RUN if c.applies_to(engine, version, case)), None)


def applicable(engine: str, version: str) -> list[Adaptation]:
    return [a for a in ADAPTATIONS if a.applies_to(engine, version)]


def apply_all(engine: str, version: str) -> list[str]:
    """Apply every adaptation for this release; returns their names."""
    names = []
    for adaptation in applicable(engine, version):
        adaptation.apply()
        names.append(adaptation.name)
        print(f"adaptation {adaptation.name} ({engine} {version})", file=sys.stderr)
    return names
