"""Reading a stacked output (what normalize wrote) group by group, for the smoke forward to check it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lora_convert.smoke.report import GroupCheck


def stacked_reader(folder) -> Callable[[Any], tuple[Any, Any]]:
    """group -> its stacked (A, B) as numpy arrays from the output in `folder`, (None, None) where either is
    missing."""
    from lora_convert.io.tensor_files import read_safetensors_header, read_tensor_data

    infos, _ = read_safetensors_header(folder / "adapter_model.safetensors")

    def read(group):
        a = infos.get(f"base_model.model.{group.key}.lora_A.weight")
        b = infos.get(f"base_model.model.{group.key}.lora_B.weight")
        if a is None or b is None:
            return None, None
        return read_tensor_data(a), read_tensor_data(b)

    return read


def stacked_mismatch(group, A, B, rank: int) -> GroupCheck | None:
    """The failed check of a group whose stacked tensors are missing or not the shapes the plan from the original
    gives them; None when they line up."""
    if A is None:
        return _failed(group, "?", f"the stacked output has no tensors for {group.key}")
    from lora_convert.io.dtypes import dtype_tag

    want_a, want_b = group.a_shape(rank), group.b_shape(rank)
    if tuple(A.shape) != want_a or tuple(B.shape) != want_b:
        return _failed(
            group,
            dtype_tag(A.dtype),
            f"shapes A {list(A.shape)} B {list(B.shape)}, expected A {list(want_a)} B {list(want_b)} from the schema",
        )
    return None


def _failed(group, tag: str, problem: str) -> GroupCheck:
    return GroupCheck(group.key, group.layer, group.kind, group.experts, tag, float("inf"), [], [problem])
