"""The composite action's logic (action.yml only wires inputs to this): find the PEFT adapters a push or pull request
changed and run `lora-convert validate --format github` on them.

The gate must never pass by accident: every way of not validating anything (no history to diff against, a base ref
that is missing, weights without a config) is either an `::error::` (exit non-zero) or a `::notice::` that says
what was done instead. Standard library only; run with the Python that installed lora-convert.

Inputs (environment): INPUT_ADAPTERS, INPUT_BASE_REF, INPUT_BASE, INPUT_ENGINE, INPUT_STRICT, INPUT_ARGS,
EVENT_BEFORE (github.event.before), and the runner's GITHUB_BASE_REF and GITHUB_OUTPUT.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

CONFIG = "adapter_config.json"
# The files `save_pretrained` writes for a LoRA adapter; a change to any of them changes the adapter.
WEIGHTS = re.compile(r"adapter_model[^/]*\.safetensors|adapter_model\.safetensors\.index\.json|adapter_model\.bin")
NULL_SHA = "0" * 40

EXIT_OK, EXIT_ERRORS, EXIT_USAGE, EXIT_ENV = 0, 1, 2, 3


class GateError(Exception):
    """A reason the gate cannot decide; reported as one ::error:: annotation."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE):
        super().__init__(message)
        self.exit_code = exit_code


# ---- workflow commands ----------------------------------------------------------------------------------------------
def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def annotate(level: str, message: str, file: str | None = None) -> None:
    props = f" title=lora-convert action,file={_escape_property(file)}" if file else " title=lora-convert action"
    # Annotations go to stdout, where the runner reads workflow commands; flushed before any child process writes.
    sys.stdout.write(f"::{level}{props}::{_escape_data(message)}\n")
    sys.stdout.flush()


def log(message: str) -> None:
    print(f"lora-convert action: {message}", file=sys.stderr, flush=True)


def set_output(name: str, value: str) -> None:
    path = os.environ.get("GITHUB_OUTPUT")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{name}={value}\n")


# ---- git ------------------------------------------------------------------------------------------------------------
def git(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    # Bytes, not text: file names are whatever the repository holds; decoded with os.fsdecode.
    result = subprocess.run(["git", *args], capture_output=True)
    if check and result.returncode != 0:
        raise GateError(f"`git {' '.join(args)}` failed: {os.fsdecode(result.stderr).strip()}", EXIT_ENV)
    return result


def resolves(ref: str) -> bool:
    return git("rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref}^{{commit}}", check=False).returncode == 0


def is_shallow() -> bool:
    return git("rev-parse", "--is-shallow-repository").stdout.strip() == b"true"


def merge_base(ref: str) -> str | None:
    result = git("merge-base", "--end-of-options", ref, "HEAD", check=False)
    if result.returncode != 0:
        return None
    return os.fsdecode(result.stdout).strip() or None


def unshallow(why: str) -> bool:
    """Fetch the full history of a shallow clone; True when it worked (and was needed)."""
    if not is_shallow():
        return False
    result = git("fetch", "--quiet", "--no-tags", "--unshallow", "origin", check=False)
    if result.returncode != 0:
        log(f"git fetch --unshallow failed: {os.fsdecode(result.stderr).strip()}")
        return False
    annotate(
        "notice",
        f"The checkout was shallow; fetched its full history (git fetch --unshallow) {why}. "
        "Check out with `fetch-depth: 0` to skip this fetch.",
    )
    return True


# ---- what to validate -----------------------------------------------------------------------------------------------
@dataclass
class Plan:
    adapters: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)  # changed weights files with no adapter_config.json beside them
    deleted: list[str] = field(default_factory=list)  # adapter folders the change removed


def is_adapter_file(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return name == CONFIG or WEIGHTS.fullmatch(name) is not None


def plan_for(paths: list[str]) -> Plan:
    """Group changed adapter files by folder and look at each folder as the commit leaves it."""
    plan = Plan()
    folders = {path.rsplit("/", 1)[0] if "/" in path else "." for path in paths if is_adapter_file(path)}
    for folder in sorted(folders):
        here = Path(folder)
        if (here / CONFIG).is_file():
            plan.adapters.append(folder)
            continue
        weights = (
            sorted(str(here / p.name) for p in here.iterdir() if WEIGHTS.fullmatch(p.name)) if here.is_dir() else []
        )
        if weights:
            plan.orphans.extend(weights)
        else:
            plan.deleted.append(folder)
    return plan


def changed_paths(*diff_args: str) -> list[str]:
    # -z: names arrive raw and NUL-separated (no quoting of non-ASCII, spaces or newlines). --no-renames: a move is
    # its old and its new name, and deleted files are listed too, so that a folder left with weights but no config
    # is still noticed; plan_for skips folders that are gone.
    out = git("diff", "-z", "--name-only", "--no-renames", *diff_args, "--").stdout
    return [os.fsdecode(p) for p in out.split(b"\0") if p]


def all_adapter_paths() -> list[str]:
    out = git("ls-files", "-z").stdout
    return [os.fsdecode(p) for p in out.split(b"\0") if p]


def find_changed(env: dict) -> Plan:
    explicit = env.get("INPUT_BASE_REF", "").strip()
    pr_base = env.get("GITHUB_BASE_REF", "").strip()
    before = env.get("EVENT_BEFORE", "").strip()

    if explicit:
        return diff_against_branch(explicit, "the `base-ref` input")
    if pr_base:
        ref = f"refs/remotes/origin/{pr_base}"
        # The checkout may not hold the base branch at all (actions/checkout fetches one commit by default).
        fetched = git("fetch", "--quiet", "--no-tags", "origin", f"+refs/heads/{pr_base}:{ref}", check=False)
        if fetched.returncode != 0:
            log(f"git fetch of the base branch failed: {os.fsdecode(fetched.stderr).strip()}")
        return diff_against_branch(ref, f"the pull request's base branch {pr_base}")
    if before and before != NULL_SHA:
        return diff_against_commit(before)
    # A new branch (before is all zeros) or an event without a previous commit (workflow_dispatch, schedule): the
    # commits that are new cannot be told apart from the rest, so everything is checked rather than a guess.
    why = "the push created the branch" if before == NULL_SHA else "this event has no base to diff against"
    plan = plan_for(all_adapter_paths())
    annotate(
        "notice",
        f"{why.capitalize()}: validating every adapter in the repository ({len(plan.adapters)}). "
        "Set the `base-ref` input to validate only what changed since that ref.",
    )
    return plan


def missing_ref(ref: str, what: str) -> GateError:
    return GateError(
        f"Cannot find {what}, `{ref}`, in this checkout, so the changed adapters cannot be found. "
        "Check out with `fetch-depth: 0` (actions/checkout), or fix the `base-ref` input; "
        "`adapters:` names adapters explicitly."
    )


def diff_against_branch(ref: str, what: str) -> Plan:
    """The changes made on HEAD's side since it forked from REF (a three-dot diff)."""
    if not resolves(ref) and not (unshallow(f"to find {what}") and resolves(ref)):
        raise missing_ref(ref, what)
    base = merge_base(ref)
    if base is None and unshallow(f"to find where HEAD forked from {what}"):
        base = merge_base(ref)
    if base is None:
        # Unrelated histories, or a shallow clone that could not be deepened: comparing the two trees still finds
        # every adapter that differs (possibly more than the change touched), never fewer.
        annotate(
            "notice",
            f"No common ancestor of HEAD and {what}; validating every adapter that differs between "
            "the two trees. Check out with `fetch-depth: 0` to validate only what this change did.",
        )
        return plan_for(changed_paths(ref, "HEAD"))
    return plan_for(changed_paths(base, "HEAD"))


def diff_against_commit(before: str) -> Plan:
    """A push: the tree before it against HEAD (no merge base needed, only the two commits)."""
    what = "the commit before the push"
    if not resolves(before) and not (unshallow(f"to find {what}") and resolves(before)):
        raise missing_ref(before, what + " (a force push removes it: set `base-ref`)")
    return plan_for(changed_paths(before, "HEAD"))


# ---- validate -------------------------------------------------------------------------------------------------------
def split_args(text: str, name: str) -> list[str]:
    # Shell-like word splitting with quotes, without a shell: user input is never evaluated.
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise GateError(f"The `{name}` input is not valid shell words ({exc}): {text!r}") from None


def validate_command(adapters: list[str], env: dict) -> list[str]:
    exe = shutil.which("lora-convert")
    if exe is None:
        raise GateError(
            "The lora-convert command is not on PATH; the action's install step did not complete.", EXIT_ENV
        )
    cmd = [exe, "validate", "--format", "github", "--engine", env.get("INPUT_ENGINE", "").strip() or "none"]
    if env.get("INPUT_BASE", "").strip():
        cmd += ["--base", env["INPUT_BASE"].strip()]
    strict = env.get("INPUT_STRICT", "").strip().lower()
    if strict not in ("", "true", "false"):
        raise GateError(f'The `strict` input must be "true" or "false", not {env["INPUT_STRICT"]!r}.')
    if strict == "true":
        cmd.append("--strict")
    cmd += split_args(env.get("INPUT_ARGS", ""), "args")
    # "./" keeps a folder whose name starts with "-" from reading as an option.
    return cmd + [f"./{a}" if a.startswith("-") else a for a in adapters]


def run(env: dict) -> int:
    set_output("count", "0")
    explicit = split_args(env.get("INPUT_ADAPTERS", ""), "adapters")
    if explicit:
        plan = Plan(adapters=explicit)
    else:
        top = git("rev-parse", "--show-toplevel", check=False)
        if top.returncode != 0:
            raise GateError(
                f"Not inside a git checkout ({os.fsdecode(top.stderr).strip()}); run actions/checkout "
                "before this action, or name the adapters with the `adapters` input.",
                EXIT_ENV,
            )
        # git prints paths relative to the top of the work tree; validate from there so they resolve.
        os.chdir(os.fsdecode(top.stdout.strip()))
        plan = find_changed(env)

    code = EXIT_OK
    for weights in plan.orphans:
        # An error, not a warning: no loader (PEFT, vLLM, SGLang) can use weights without their config, so this
        # adapter is broken as committed, and a warning would let the gate pass with nothing validated.
        annotate(
            "error",
            f"{weights} changed but there is no {CONFIG} beside it, so it is not a loadable PEFT "
            f"adapter and was not validated. Commit the {CONFIG} that save_pretrained wrote with it.",
            file=weights,
        )
        code = EXIT_ERRORS
    for folder in plan.deleted:
        log(f"{folder}: adapter removed, not validated")

    set_output("count", str(len(plan.adapters)))
    if not plan.adapters:
        if code == EXIT_OK:
            annotate("notice", "No changed PEFT adapter (adapter_config.json or adapter weights) to validate.")
        return code
    log(f"{len(plan.adapters)} adapter(s) to validate: {', '.join(plan.adapters)}")
    cmd = validate_command(plan.adapters, env)
    result = subprocess.run(cmd)
    return max(code, result.returncode)


def main() -> int:
    try:
        return run(dict(os.environ))
    except GateError as exc:
        annotate("error", str(exc))
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
