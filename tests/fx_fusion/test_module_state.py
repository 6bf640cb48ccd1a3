"""House rules for ``fx_fusion/`` checked on its source: no environment variables read, no mutable module-level
containers, logging only through the ``fx_fusion`` logger with lazy ``%`` arguments.

One exception to the first: ``backend.prefer_static_launch`` hands torch's own
``TORCHINDUCTOR_STATIC_LAUNCH_USER_DEFINED_TRITON_KERNELS`` to Inductor's compile workers, which read their
config from the environment they start with; it configures nothing of ours."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import fx_fusion

SOURCES = sorted(Path(fx_fusion.__file__).parent.glob("*.py"))
MUTABLE_NODES = (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)
MUTABLE_CALLS = {"dict", "list", "set", "defaultdict", "OrderedDict", "Counter", "deque", "bytearray"}
LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical", "log"}


def _name(node: ast.AST) -> str:
    return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""


ENVIRONMENT_ALLOWED = {("backend.py", "prefer_static_launch")}


@pytest.mark.parametrize("path", SOURCES, ids=[p.name for p in SOURCES])
def test_no_environment_reads(path):
    tree = ast.parse(path.read_text())
    allowed = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
               and (path.name, f.name) in ENVIRONMENT_ALLOWED for n in ast.walk(f)}
    reads = [n.lineno for n in ast.walk(tree) if id(n) not in allowed and (
             (isinstance(n, ast.Attribute) and n.attr in ("environ", "environb"))
             or (isinstance(n, ast.Call) and _name(n.func) in ("getenv", "getenvb")))]
    assert not reads, f"{path.name} reads the environment at lines {reads}"


@pytest.mark.parametrize("path", SOURCES, ids=[p.name for p in SOURCES])
def test_no_mutable_module_level_containers(path):
    tree = ast.parse(path.read_text())
    bad = []
    for stmt in tree.body:
        value = stmt.value if isinstance(stmt, (ast.Assign, ast.AnnAssign)) else None
        if isinstance(stmt, ast.Assign) and [_name(t) for t in stmt.targets] == ["__all__"]:
            continue  # read by `import *` only
        if isinstance(value, MUTABLE_NODES) or (isinstance(value, ast.Call) and _name(value.func) in MUTABLE_CALLS):
            bad.append(stmt.lineno)
    assert not bad, f"{path.name}: mutable module-level containers at lines {bad} (use tuples, frozensets, MappingProxyType)"


@pytest.mark.parametrize("path", SOURCES, ids=[p.name for p in SOURCES])
def test_logging_through_the_fx_fusion_logger_with_lazy_arguments(path):
    tree = ast.parse(path.read_text())
    for n in ast.walk(tree):
        if isinstance(n, ast.Call) and _name(n.func) == "getLogger":
            assert [ast.literal_eval(a) for a in n.args] == ["fx_fusion"], f"{path.name}:{n.lineno}"
        if (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in LOG_METHODS
                and _name(n.func.value) in ("log", "logger", "logging")):
            assert _name(n.func.value) != "logging", f"{path.name}:{n.lineno}: the root logger"
            message = n.args[1 if n.func.attr == "log" else 0]
            eager = isinstance(message, ast.JoinedStr) or (isinstance(message, ast.BinOp) and isinstance(message.op, ast.Mod))
            assert not eager, f"{path.name}:{n.lineno}: format lazily (log.info('%s', x))"
