"""The composite action's logic (action.yml only wires inputs to this): find the PEFT adapters a push or pull request
changed and run `lora-convert validate --format github` on each of them.

The gate must never pass by accident: every way of not validating anything (no history to diff against, a base ref
that is missing, weights without a config) is either an `::error::` (exit non-zero) or a `::notice::` that says
what was done instead, and a validator that does not end with a verdict (killed by a signal, e.g. the
out-of-memory killer; crashed; past `timeout-minutes`; an exit code lora-convert does not use; no verdict printed)
fails the step with an `::error::` saying what happened. Whatever happened, the job summary (job_summary.py,
beside this file) says it too. Standard library only; run with the Python that installed lora-convert.

Inputs (environment): INPUT_ADAPTERS, INPUT_BASE_REF, INPUT_BASE, INPUT_ENGINE, INPUT_SERVER_ARGS,
INPUT_SERVER_ARGS_FILE, INPUT_STRICT, INPUT_ARGS, INPUT_TIMEOUT_MINUTES, EVENT_BEFORE (github.event.before), and the
runner's GITHUB_BASE_REF, GITHUB_OUTPUT, GITHUB_STEP_SUMMARY, GITHUB_SERVER_URL, GITHUB_REPOSITORY and GITHUB_RUN_ID.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # job_summary.py, also when this file is loaded by path
import job_summary  # noqa: E402
import sarif_log  # noqa: E402

# ---- what `lora-convert validate` reads: the one list of watched files ----------------------------------------------
# Derived from the code (lora_convert/peft/adapter.py, io/source.py's ADAPTER_FILE_PATTERNS, check/data.py,
# check/base_checkpoint.py, arch/base_config.py) and checked against what validate really opens in
# tests/test_ci_integration.py. The hook's `files:` (.pre-commit-hooks.yaml) and the example workflow's `paths:`
# (examples/ci/validate-adapters.yml, = WORKFLOW_PATHS) are YAML and cannot import it; the same test checks them.
CONFIG = "adapter_config.json"
# In an adapter folder, matched against a file's name. Any other file its shard index names is watched too.
ADAPTER_FILES = (
    CONFIG,
    "adapter_model.safetensors",
    "adapter_model-*.safetensors",  # PEFT's shards, adapter_model-00001-of-00002.safetensors
    "adapter_model.safetensors.index.json",
    "adapter_model.bin",
    "added_tokens.json",  # checked against the base vocabulary (tokens.added)
    "lora_layout.json",  # a stacked output's group table (layout.*)
    "lora_convert_report.json",  # a normalize output's list of zero fills (data.zero-fill, not data.zero-b)
)
# The files that make a folder an adapter's even without its config: weights no loader can use alone.
WEIGHT_FILES = ADAPTER_FILES[1:5]
ADAPTER_INDEX = "adapter_model.safetensors.index.json"
# In a local base folder (an adapter's base_model_name_or_path or the `base` input, relative to the repository
# root): its config (or the file `base` names), the checkpoint's index and the shards it names (headers are read
# to check the checkpoint against its config), or its single model.safetensors.
BASE_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "*.safetensors")
BASE_INDEX = "model.safetensors.index.json"
WORKFLOW_PATHS = ["**/" + pattern for pattern in dict.fromkeys(ADAPTER_FILES + BASE_FILES)]

NULL_SHA = "0" * 40
DEFAULT_TIMEOUT_MINUTES = 30.0
TERMINATE_GRACE_S = 10  # after SIGTERM at the timeout, before SIGKILL
MAX_JSON_BYTES = 64 * 1024 * 1024  # as lora_convert/io/small_files.py

EXIT_OK, EXIT_ERRORS, EXIT_USAGE, EXIT_ENV, EXIT_NOT_VALIDATED = 0, 1, 2, 3, 4
# lora-convert's own exit codes (README, "Exit codes"), as the gate reports them.
VALIDATOR_EXITS = {
    EXIT_USAGE: "usage error",
    EXIT_ENV: "environment problem, e.g. the Hub unreachable or a file it needs not cached",
    EXIT_NOT_VALIDATED: "internal error, a bug in lora-convert",
}
VERDICT = "lora-convert validate: "
ANNOTATION = re.compile(r"::(error|warning|notice) title=([^,:]*)")  # one per finding, its code as the title
OWN_TITLE = "lora-convert"  # the title of lora-convert's annotation of an error that stopped it: no finding
# What this run did, for the job summary; the action's own annotations are recorded by annotate().
RECORD = job_summary.GateRecord()
SARIF = sarif_log.SarifCollector()  # the `sarif` input's log (main() sets its target from the environment)


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
    RECORD.messages.append((level, message, file))
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
    # watched names outside any adapter folder (a tokenizer's added_tokens.json): validate never reads them
    not_adapters: list[str] = field(default_factory=list)


def split_path(path: str) -> tuple[str, str]:
    folder, _, name = path.rpartition("/")
    return folder or ".", name


def is_adapter_file(path: str) -> bool:
    name = split_path(path)[1]
    return any(fnmatchcase(name, pattern) for pattern in ADAPTER_FILES)


def read_json(path: Path) -> object:
    """A small JSON file of the checkout, or None: never a FIFO or device (is_file), never a huge one."""
    try:
        if not path.is_file() or path.stat().st_size > MAX_JSON_BYTES:
            return None
        return json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None


def index_names(index: Path) -> set[str]:
    """The shard file names a safetensors index lists (its `weight_map` values)."""
    doc = read_json(index)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    return {str(v) for v in weight_map.values()} if isinstance(weight_map, dict) else set()


def watched_in_adapter(path: str) -> bool:
    folder, name = split_path(path)
    return is_adapter_file(path) or name in index_names(Path(folder) / ADAPTER_INDEX)


def plan_for(paths: list[str], base_users: dict[str, list[str]] | None = None) -> Plan:
    """Group changed adapter files by folder and look at each folder as the commit leaves it; add the adapters
    whose local base model (`base_users`: base file path -> adapter folders) a changed path belongs to."""
    plan = Plan()
    folders: dict[str, list[str]] = {}
    for path in paths:
        if watched_in_adapter(path):
            folders.setdefault(split_path(path)[0], []).append(path)
    adapters = set()
    for folder in sorted(folders):
        here = Path(folder)
        if (here / CONFIG).is_file():
            adapters.add(folder)
            continue
        present = sorted(p.name for p in here.iterdir()) if here.is_dir() else []
        weights = [f"{folder}/{n}" for n in present if any(fnmatchcase(n, w) for w in WEIGHT_FILES)]
        if weights:
            plan.orphans.extend(weights)
        elif any(split_path(p)[1] in present for p in folders[folder]):
            plan.not_adapters.extend(p for p in folders[folder] if split_path(p)[1] in present)
        else:
            plan.deleted.append(folder)
    for path in paths:
        adapters.update((base_users or {}).get(os.path.normpath(path), ()))
    plan.adapters = sorted(adapters)
    return plan


def explicit_base(env: dict) -> str | None:
    """The base every adapter is validated against: `--base` in `args` (it comes last, so it wins), else `base`."""
    args = split_args(env.get("INPUT_ARGS", ""), "args")
    found = env.get("INPUT_BASE", "").strip() or None
    for i, arg in enumerate(args):
        if arg == "--base" and i + 1 < len(args):
            found = args[i + 1]
        elif arg.startswith("--base="):
            found = arg.split("=", 1)[1]
    return found


def base_paths(spec: str) -> set[str]:
    """The repository paths validate reads for the base `spec` when it is (or was) a local folder or file."""
    path = Path(spec).expanduser()
    if path.is_file():
        config, folder = path, path.parent
    else:  # a folder, or a path that no longer exists (a deleted base changes the verdict too)
        config, folder = path / "config.json", path
    names = {n for n in index_names(folder / BASE_INDEX) if "/" not in n}
    if folder.is_dir():
        names |= {p.name for p in folder.iterdir() if any(fnmatchcase(p.name, b) for b in BASE_FILES)}
    names |= {"model.safetensors", BASE_INDEX}
    paths = {config, path, *(folder / n for n in names)}  # `path`: a config file of another name, since deleted
    return {os.path.normpath(os.path.relpath(p)) for p in paths}


def base_users(env: dict) -> dict[str, list[str]]:
    """Base file path -> the folders of the adapters in the checkout that are validated against it."""
    common = explicit_base(env)
    users: dict[str, list[str]] = {}
    for path in all_adapter_paths():
        folder, name = split_path(path)
        if name != CONFIG:
            continue
        spec = common
        if spec is None:
            config = read_json(Path(path))
            spec = config.get("base_model_name_or_path") if isinstance(config, dict) else None
        if not isinstance(spec, str) or not spec.strip():
            continue
        try:
            watched = base_paths(spec.strip())
        except (OSError, ValueError):  # a name no file system takes (NUL, too long): no local base
            continue
        for base_path in watched:
            users.setdefault(base_path, []).append(folder)
    return users


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
    paths = changed_since_base(env)
    if paths is None:
        return validate_everything(env)
    return plan_for(paths, base_users(env))


def changed_since_base(env: dict) -> list[str] | None:
    """The paths the push or pull request changed; None when there is nothing to compare with."""
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
    return None


def validate_everything(env: dict) -> Plan:
    before = env.get("EVENT_BEFORE", "").strip()
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


def diff_against_branch(ref: str, what: str) -> list[str]:
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
        return changed_paths(ref, "HEAD")
    return changed_paths(base, "HEAD")


def diff_against_commit(before: str) -> list[str]:
    """A push: the tree before it against HEAD (no merge base needed, only the two commits)."""
    what = "the commit before the push"
    if not resolves(before) and not (unshallow(f"to find {what}") and resolves(before)):
        raise missing_ref(before, what + " (a force push removes it: set `base-ref`)")
    return changed_paths(before, "HEAD")


# ---- validate -------------------------------------------------------------------------------------------------------
def split_args(text: str, name: str) -> list[str]:
    # Shell-like word splitting with quotes, without a shell: user input is never evaluated.
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise GateError(f"The `{name}` input is not valid shell words ({exc}): {text!r}") from None


def validate_command(env: dict) -> list[str]:
    """`lora-convert validate` with the inputs' options; the adapter comes last."""
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
    # the server's flags go to validate as one argument, unsplit: validate parses them as the engine would
    if env.get("INPUT_SERVER_ARGS", "").strip():
        cmd += ["--server-args", env["INPUT_SERVER_ARGS"].strip()]
    if env.get("INPUT_SERVER_ARGS_FILE", "").strip():
        cmd += ["--server-args-file", env["INPUT_SERVER_ARGS_FILE"].strip()]
    return cmd + split_args(env.get("INPUT_ARGS", ""), "args")


def timeout_minutes(env: dict) -> float:
    text = env.get("INPUT_TIMEOUT_MINUTES", "").strip()
    if not text:
        return DEFAULT_TIMEOUT_MINUTES
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise GateError(f"The `timeout-minutes` input must be a positive number of minutes, not {text!r}.")
    return value


@dataclass
class Outcome:
    """How one validator run ended."""

    returncode: int | None  # None: stopped at the timeout
    verdicts: list[str]  # its "lora-convert validate: OK|FAIL ..." lines
    findings: list[tuple[str, str]] = field(default_factory=list)  # (level, code) of each finding's annotation


def run_validator(cmd: list[str], timeout_s: float) -> Outcome:
    """Run one validator, its stdout (annotations and verdict) passed through as it comes and kept for the verdict;
    stopped (SIGTERM, then SIGKILL) past `timeout_s`."""
    try:
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    except OSError as exc:
        raise GateError(f"Cannot start {cmd[0]}: {exc.strerror or exc}.", EXIT_ENV) from None
    verdicts: list[str] = []
    findings: list[tuple[str, str]] = []

    def relay() -> None:
        for line in child.stdout:
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
            text = line.decode("utf-8", "replace")
            if text.startswith(VERDICT):
                verdicts.append(text[len(VERDICT) :].strip())
            elif (m := ANNOTATION.match(text)) and m[2] != OWN_TITLE:
                findings.append((m[1], m[2]))

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    try:
        child.wait(timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
        child.terminate()
        try:
            child.wait(TERMINATE_GRACE_S)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    # A grandchild that kept the pipe open must not hold the gate: the verdict, if any, came before the exit.
    reader.join(TERMINATE_GRACE_S)
    return Outcome(None if timed_out else child.returncode, verdicts, findings)


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return "unknown signal"


def why_killed(number: int) -> str:
    if number == signal.SIGKILL:
        return (
            " — often the out-of-memory killer: the runner ran out of memory (see the runner's memory, or use one "
            "with more), or something stopped the job"
        )
    if number in (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGABRT):
        return " — a crash in native code (numpy, safetensors); report it with the adapter's file headers"
    return ""


def judge(adapter: str, outcome: Outcome, minutes: float) -> tuple[int, str | None]:
    """The gate's exit code for one validator run, and the error that says why it did not validate, if so.

    Only exit 0 with an OK verdict passes; exit 1 with a FAIL verdict is the adapter's own errors (annotated by
    lora-convert itself); anything else means the adapter was not validated, which fails the step."""
    code, verdicts = outcome.returncode, outcome.verdicts
    not_validated = "so the adapter was not validated"
    if code is None:
        return EXIT_NOT_VALIDATED, (
            f"lora-convert validate did not finish within {minutes:g} minute(s) (the `timeout-minutes` input) on "
            f"{adapter} and was stopped, {not_validated}. Raise `timeout-minutes` for an adapter this large, or "
            "find what it waits for (a Hub download: set HF_TOKEN, or pass a local `base`)."
        )
    if code < 0:
        return EXIT_NOT_VALIDATED, (
            f"lora-convert validate was killed by signal {-code} ({signal_name(-code)}) while validating {adapter}"
            f"{why_killed(-code)}; {not_validated}."
        )
    if code in VALIDATOR_EXITS:
        debug = (
            " Re-run with LORA_CONVERT_DEBUG=1 for the traceback and report it." if code == EXIT_NOT_VALIDATED else ""
        )
        return code, (
            f"lora-convert validate could not validate {adapter} (exit {code}: {VALIDATOR_EXITS[code]}; its message "
            f"is in the log above), {not_validated}.{debug}"
        )
    if code in (EXIT_OK, EXIT_ERRORS):
        expected = "OK" if code == EXIT_OK else "FAIL"
        if len(verdicts) == 1 and verdicts[0].startswith(expected):
            return code, None
        return EXIT_NOT_VALIDATED, (
            f"lora-convert validate exited {code} on {adapter} but printed no verdict ({VERDICT}{expected} ...) "
            f"that agrees with it (verdicts: {verdicts or 'none'}), so nothing says the adapter was validated; the "
            "gate counts it as not validated (`args` must not change --format, which the gate reads)."
        )
    return EXIT_NOT_VALIDATED, (
        f"lora-convert validate ended with exit code {code} on {adapter}{exit_note(code)}, which is no verdict "
        f'(0 passed, 1 the adapter has errors; README "Exit codes"), {not_validated}.'
    )


def short_verdict(outcome: Outcome, error: str | None, minutes: float) -> str:
    """The adapter's verdict in the job summary's table: the validator's own (OK, FAIL (errors), ...) when the gate
    accepted it (`error` None), else what happened instead."""
    code = outcome.returncode
    if error is None:
        return outcome.verdicts[0].split(":", 1)[0]
    if code is None:
        return f"timeout ({minutes:g} min)"
    if code < 0:
        return f"killed ({signal_name(-code)})"
    if code in VALIDATOR_EXITS:
        return f"not validated (exit {code}: {VALIDATOR_EXITS[code].split(',')[0]})"
    if code in (EXIT_OK, EXIT_ERRORS):
        return f"no verdict (exit {code})"
    return f"not validated (exit {code})"


def requested_engine(cmd: list[str]) -> str:
    """The engine a validator run with `cmd` checks: its last --engine/-e (`args` come after the `engine` input)."""
    engine = "none"
    for i, arg in enumerate(cmd):
        if arg in ("--engine", "-e") and i + 1 < len(cmd):
            engine = cmd[i + 1]
        elif arg.startswith("--engine="):
            engine = arg.split("=", 1)[1]
    return engine


def exit_note(code: int) -> str:
    if code == 130:
        return " (interrupted)"
    if 128 < code < 160:  # how a shell or a program copying a signal's death reports it
        return f" (128 + {code - 128}: signal {signal_name(code - 128)})"
    return ""


def validate_each(adapters: list[str], env: dict) -> int:
    """One validator per adapter: each gets its own timeout, and a crash names the adapter it happened on."""
    prefix = validate_command(env)
    minutes = timeout_minutes(env)
    RECORD.engine = requested_engine(prefix)
    code = EXIT_OK
    for adapter in adapters:
        # "./" keeps a folder whose name starts with "-" from reading as an option.
        sarif_args = SARIF.args(adapter)  # the `sarif` input: each validator writes its own log, merged at the end
        argv = [*prefix, *sarif_args, f"./{adapter}" if adapter.startswith("-") else adapter]
        outcome = run_validator(argv, minutes * 60)
        adapter_code, error = judge(adapter, outcome, minutes)
        if error:
            SARIF.not_validated(adapter, error)
        RECORD.results.append(
            job_summary.AdapterResult(
                adapter,
                short_verdict(outcome, error, minutes),
                validated=error is None,
                levels=Counter(level for level, _ in outcome.findings),
                codes=[finding for _, finding in outcome.findings],
            )
        )
        if error:
            config = Path(adapter) / CONFIG
            annotate("error", error, file=str(config) if config.is_file() and not config.is_absolute() else None)
        code = max(code, adapter_code)
    return code


def run(env: dict) -> int:
    set_output("count", "0")
    timeout_minutes(env)  # a bad input fails before anything runs
    validate_command(env)
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
    for path in plan.not_adapters:
        log(f"{path}: not in an adapter folder (no {CONFIG} or adapter weights beside it), so validate never reads it")

    set_output("count", str(len(plan.adapters)))
    RECORD.planned = len(plan.adapters)
    if not plan.adapters:
        if code == EXIT_OK:
            annotate("notice", "No changed PEFT adapter (no file that lora-convert validate reads) to validate.")
        return code
    log(f"{len(plan.adapters)} adapter(s) to validate: {', '.join(plan.adapters)}")
    return max(code, validate_each(plan.adapters, env))


def main() -> int:
    env = dict(os.environ)
    SARIF.set_target(env.get("INPUT_SARIF", ""))  # resolved before run() changes directory
    try:
        code = run(env)
    except GateError as exc:
        annotate("error", str(exc))
        code = exc.exit_code
    try:
        SARIF.write()
    except OSError as exc:
        annotate("error", f"Cannot write the SARIF log (the `sarif` input) {SARIF.target}: {exc}.")
        code = max(code, EXIT_ENV)
    try:
        job_summary.write(RECORD, code, env)
    except OSError as exc:  # the summary is a report: the gate's exit code stands without it
        log(f"could not append the job summary to $GITHUB_STEP_SUMMARY: {exc}")
    return code


if __name__ == "__main__":
    sys.exit(main())
