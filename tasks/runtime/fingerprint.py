"""The code a stage's output depends on, as a fingerprint that goes into its run key.

A run key made of the config and the inputs' digests alone hands back a model trained by older code after a fix to
that code: the fix would never run. So every stage's run key (and the simulated feedback's cache key) also holds
`stage_code(stage)`: the package version plus a sha256 over the source of the modules the stage runs, found by
following imports from the stage's own module through this project's packages (`models/`, `tasks/`), the tokenizer
among them. Only what can change a number counts:

- modules that move or record bytes are not followed: `tasks/storage/` (what it reads is checked by digest),
  `tasks/tracking/` (MLflow), the runtime modules that orchestrate a stage (its run, lease, ranks, Prefect options,
  progress bar, errors and signals), `tasks/config.py` (its values are in the run key already) and `tasks/redact.py`;
- comments, docstrings, blank lines and trailing spaces are not code: editing them changes nothing;
- anything outside the two packages (the README, tests, benchmarks) is not read at all.

So an edit to `models/ppo.py` changes the run keys of PPO and of evaluation, which run it, and no other; pretraining
and the reward model are reused. Imports are read from the source (every `import` statement, also those inside
functions), not from what Python has loaded: a package's `__init__.py` counts only where it is imported by name.
"""

from __future__ import annotations

import ast
import hashlib
import io
import tokenize
from functools import lru_cache
from pathlib import Path

PACKAGES = ("models", "tasks")
# What each stage runs, beyond what its own module imports. Simulated feedback samples with PaLM.sample through
# storage/inputs.py, which is not followed; the tokenizer is named so that it counts even where a stage stops
# importing it directly.
ROOTS = {
    "pretrain": ("tasks.pretrain",),
    "reward": ("tasks.reward",),
    "feedback": ("tasks.feedback", "models.palm"),
    "ppo": ("tasks.ppo",),
    "eval": ("tasks.evaluate",),
}
TOKENIZER = "tasks.data.tokens"
# Modules (and packages) whose changes never change a model: their imports are not followed either.
NOT_CODE_OF_A_MODEL = ("tasks.storage", "tasks.tracking", "tasks.config", "tasks.redact", "tasks.preflight",
                       "tasks.runtime.stage", "tasks.runtime.lease", "tasks.runtime.launch",
                       "tasks.runtime.orchestration", "tasks.runtime.progress", "tasks.runtime.errors",
                       "tasks.runtime.fingerprint", "tasks.runtime.signals")


def package_root() -> Path:
    """The folder holding `models/` and `tasks/` of the code running now."""
    return Path(__file__).resolve().parents[2]


def stage_code(stage: str, root: Path | None = None) -> str:
    """The stage's code fingerprint: "<package version>:<16 hex digits of the sha256 of its source>".

    Of the running code, it is read once per process, when the stage first asks (a Prefect worker starts a process
    per flow run, which imports the code then); of another copy (`root`), at every call."""
    return _running(stage) if root is None else _fingerprint(stage, root.resolve())


def stage_modules(stage: str, root: Path | None = None) -> list[str]:
    """The modules whose source is in the fingerprint, by name."""
    return list(_running_names(stage)) if root is None else sorted(_closure(stage, root.resolve()))


@lru_cache(maxsize=None)
def _running(stage: str) -> str:
    return _fingerprint(stage, package_root())


@lru_cache(maxsize=None)
def _running_names(stage: str) -> tuple[str, ...]:
    return tuple(sorted(_closure(stage, package_root())))


def _fingerprint(stage: str, root: Path) -> str:
    modules = _closure(stage, root)
    digest = hashlib.sha256()
    for name in sorted(modules):
        digest.update(f"{name}\0{code_text(modules[name].read_text(encoding='utf-8'))}\0".encode())
    return f"{package_version()}:{digest.hexdigest()[:16]}"


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("palm-rlhf")
    except PackageNotFoundError:
        return "0+unknown"


def _closure(stage: str, root: Path) -> dict[str, Path]:
    if stage not in ROOTS:
        raise ValueError(f"no code fingerprint for stage {stage!r}; stages: {', '.join(ROOTS)}")
    found: dict[str, Path] = {}
    pending = [*ROOTS[stage], TOKENIZER]
    while pending:
        name = pending.pop()
        if name in found or _left_out(name):
            continue
        path = _module_file(root, name)
        if path is None:
            continue
        found[name] = path
        pending += _imports(root, path, name)
    return found


def _left_out(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in NOT_CODE_OF_A_MODEL)


def _module_file(root: Path, name: str) -> Path | None:
    if name.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(root: Path, path: Path, name: str) -> list[str]:
    """The project modules a module's source imports (`from package import module` names the module, not the
    package)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except SyntaxError:
        return []
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([base] if base else [])])
            inner = [f"{base}.{alias.name}" for alias in node.names]
            modules = [n for n in inner if _module_file(root, n) is not None]
            names += modules if len(modules) == len(inner) else [base, *modules]
    return [n for n in names if n.split(".")[0] in PACKAGES]


def code_text(source: str) -> str:
    """The source less comments, docstrings, blank lines and trailing spaces: what the fingerprint hashes."""
    lines = source.splitlines()
    spans = []  # (first line, first column, last line, end column), 1-based lines, columns in characters
    try:
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.COMMENT:
                spans.append((*token.start, *token.end))
        tree = ast.parse(source)
    except (SyntaxError, tokenize.TokenError):
        return source  # not Python we can read: all of it counts
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                spans.append((first.lineno, _chars(lines[first.lineno - 1], first.col_offset),
                              first.end_lineno, _chars(lines[first.end_lineno - 1], first.end_col_offset)))
    for start_line, start_col, end_line, end_col in sorted(spans, reverse=True):
        head, tail = lines[start_line - 1][:start_col], lines[end_line - 1][end_col:]
        lines[start_line - 1:end_line] = [head + tail]
    return "\n".join(line.rstrip() for line in lines if line.strip())


def _chars(line: str, byte_offset: int) -> int:
    """ast counts columns in UTF-8 bytes, tokenize and str slicing in characters."""
    return len(line.encode("utf-8")[:byte_offset].decode("utf-8", errors="ignore"))
