"""Imports point down: maths → models and data → stages → roads and commands (README, "Architecture").

Every module of the package has a layer below; a module may import modules of lower layers only, and modules of its
own package (`rlhf.fast`, `rlhf.annotate`) of its own layer or lower. Imports inside functions count too. A new
module fails this test until it is given a layer here, which is the moment to decide where it belongs.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "rlhf"

LAYERS = [
    # maths: pure functions on tensors
    {"ops"},
    {"losses"},
    # base: processes (torchrun), settings, logging, text statistics, the machine, data files, plots
    {"distributed"},
    {"config", "tracking", "plots", "detectors", "httpd"},
    {"hhh", "verifiable", "hardware", "wiring", "guard", "annotate.errors"},
    {"annotators", "data"},
    {"metrics", "results", "rewards", "checkpoint", "annotate.candidates"},
    # speed machinery, underneath the models
    {"fast.attention", "fast.casts", "fast.lanes", "fast.compile", "fast.decoder", "fast"},
    # models, sampling, judging, scoring
    {"models"},
    {"rollout", "judges"},
    {"scoring"},
    {"monitor"},
    # stages: each one file, none importing another
    {"sft", "pairs", "reward", "ppo", "dpo", "evaluate", "label"},
    # roads and commands: they run stages; nothing below imports them
    {"pipeline", "study", "constitutional", "grpo", "report", "serve", "chat", "annotate", "annotate.render",
     "annotate.store", "annotate.stats", "annotate.export", "annotate.web"},
    {"cli", "annotate.cli"},
    {"__main__", "annotate.__main__"},
]
PACKAGES = {"fast", "annotate"}  # subpackages whose modules may import each other within a layer
LAYER = {name: number for number, names in enumerate(LAYERS) for name in names}
STDLIB_AND_TORCH = {"__future__", "math", "typing", "torch"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function, as dotted names without the `rlhf.` prefix
    (an outside module keeps its full name, prefixed with '!')."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = ([f"{node.module}.{a.name}" for a in node.names] if node.module == "rlhf" else [node.module])
        else:
            continue
        for name in names:
            found.add(name.removeprefix("rlhf.") if name.startswith("rlhf.") else "!" + name)
    return found


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_layer():
    unplaced = sorted(set(package_modules()) - set(LAYER) - {""})
    assert not unplaced, f"give these modules a layer in tests/test_layers.py: {unplaced}"


def test_imports_point_down():
    upward = []
    for name, path in package_modules().items():
        if not name:
            continue
        for target in imports(path):
            if target.startswith("!") or target == name:
                continue
            target = target if target in LAYER else target.rsplit(".", 1)[0]  # `from rlhf.fast import x` → fast
            same_package = name.split(".")[0] in PACKAGES and target.split(".")[0] == name.split(".")[0]
            allowed = LAYER[target] <= LAYER[name] if same_package else LAYER[target] < LAYER[name]
            if not allowed:
                upward.append(f"{name} (layer {LAYER[name]}) imports {target} (layer {LAYER[target]})")
    assert not upward, "imports that point up or sideways:\n" + "\n".join(upward)


def test_the_maths_imports_only_torch():
    for name in ("ops", "losses"):
        outside = {t for t in imports(PACKAGE / f"{name}.py") if t.startswith("!")}
        assert {t[1:].split(".")[0] for t in outside} <= STDLIB_AND_TORCH, name


def test_nothing_imports_the_cli():
    for name, path in package_modules().items():
        if name not in ("__main__", "annotate.__main__", "annotate.cli", "cli"):
            assert not {"cli", "annotate.cli"} & imports(path), name
