"""The tasks' shared layer: every task has the members of the Task protocol, and the task modules stand alone
(none imports the trainer, none imports another module's private names)."""

import ast
from pathlib import Path

import pytest

from dblocks_fast import tasks
from dblocks_fast.tasks.base import Task

TASKS_DIR = Path(tasks.__file__).parent
SOURCES = sorted(TASKS_DIR.rglob("*.py"))


def _members(protocol) -> set[str]:
    """The public members a Protocol class declares: its methods and properties, and annotated attributes."""
    declared = {n for n in vars(protocol) if not n.startswith("_")}
    return declared | set(getattr(protocol, "__annotations__", {}))


@pytest.mark.parametrize("kind", sorted(tasks._TASKS))
def test_every_task_has_the_protocol_members(kind):
    cls = tasks._TASKS[kind][0]
    assert {"kind", "num_layers", "noise_process", "loss", "denoise", "null_cond"} <= _members(Task)
    missing = sorted(m for m in _members(Task) if not hasattr(cls, m))
    assert not missing, f"{cls.__name__} lacks {missing}"


def test_no_task_has_noise_hooks_beside_its_process():
    # the trainer, the samplers and BlockModel ask the noise process, never the task, about levels
    for cls, _ in tasks._TASKS.values():
        assert not any(hasattr(cls, m) for m in ("sample_noise", "interval", "block_of")), cls.__name__


def _imports(path):
    """(module as written, with its leading dots; the names imported) of every `from ... import ...`."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            yield "." * node.level + (node.module or ""), [a.name for a in node.names]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(TASKS_DIR)))
def test_task_modules_import_neither_the_trainer_nor_private_names(path):
    for module, names in _imports(path):
        targets = [module] + [f"{module.rstrip('.')}.{n}" if module.strip(".") else module + n for n in names]
        assert not any(t.split(".")[-1] == "train" for t in targets), f"{path.name} imports the trainer"
        if module.startswith("."):  # another module of the package
            private = [n for n in names if n.startswith("_")]
            assert not private, f"{path.name} imports {private} from {module}"
