"""The architecture as the imports show it, read from the source (nothing here imports it):

- no import cycle among the modules of app/ and worker/: a cycle is what makes a module
  import another from inside a function, and the order in which they load matters then;
- app/ is the API and the CLI: it may start a worker, never run one, so it imports worker/
  only in the commands that start one (listed below) and never torch or whisper;
- fastapi stays in the HTTP layer: any other module of app/ that needs it is listed below,
  with why, so the list can only shrink.

Imports inside functions, ``if TYPE_CHECKING:`` blocks and ``try:`` blocks count like any
other: they are where a cycle or a heavy dependency hides.
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("app", "worker")

# app/ → worker/: only app/stack.py's worker, flower and import-ct2 commands, which start a
# worker process (or convert a model for one), and only inside them: `whisperq api` and the
# client commands must not load the worker (nor torch with it). A new pair fails here: move
# the code to worker/ instead, or add the pair with a reason.
WORKER_COMMANDS = frozenset({"cmd_worker", "cmd_flower", "cmd_import_ct2"})
ALLOWED_APP_TO_WORKER = frozenset(
    {
        ("app.stack", "worker.model_loading"),  # worker: says "cannot load the model" and exits 2
        ("app.stack", "worker.runtime"),  # worker: loads the model before consuming anything
        ("app.stack", "worker.celery_app"),  # worker and flower: the Celery app they start
        ("app.stack", "worker.ct2_import"),  # import-ct2: converts a CTranslate2 model
    }
)

# The HTTP layer, where fastapi belongs: app/api/, the error handlers it installs, and the
# command lines (app/cli.py serves the API; app/client/cli.py is its sibling).
FASTAPI_HOME_PREFIXES = ("app.api.",)
FASTAPI_HOME = frozenset({"app.api", "app.cli", "app.client.cli"})

# Other modules of app/ that import fastapi, each with why. Remove an entry once its module
# stops importing fastapi (the test says so); add none.
FASTAPI_KNOWN_EXCEPTIONS: dict[str, str] = {}

FORBIDDEN_IN_APP = ("torch", "whisper")


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # what it imports: a dotted name, project module or not
    line: int
    function: str | None  # the outermost function it sits in; None: runs on import

    @property
    def where(self) -> str:
        return f"{module_path(self.module)}:{self.line}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def module_path(module: str) -> str:
    base = ROOT.joinpath(*module.split("."))
    if (base / "__init__.py").exists():
        return str((base / "__init__.py").relative_to(ROOT))
    return str(base.with_suffix(".py").relative_to(ROOT))


@cache
def project_modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[module_name(path)] = path
    return found


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _resolve_relative(module: str, path: Path, level: int, name: str | None) -> str:
    base = _package_of(module, path).split(".")
    if level > 1:
        base = base[: -(level - 1)]
    return ".".join([*base, *([name] if name else [])])


def _walk(node: ast.AST, function: str | None) -> Iterator[tuple[ast.AST, str | None]]:
    for child in ast.iter_child_nodes(node):
        inside = function
        if inside is None and isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
            inside = child.name
        yield child, inside
        yield from _walk(child, inside)


def imports_of(module: str, path: Path) -> Iterator[Import]:
    """Every import statement of the module, at any depth (functions, classes, ifs, trys)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node, function in _walk(tree, None):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, alias.name, node.lineno, function)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                source = _resolve_relative(module, path, node.level, node.module)
            else:
                source = node.module or ""
            for alias in node.names:
                # `from worker import jobs` loads the module app.jobs.claims; `from app.infra.db
                # import utcnow` loads app.infra.db.
                named = f"{source}.{alias.name}"
                target = named if named in project_modules() else source
                yield Import(module, target, node.lineno, function)


@cache
def all_imports() -> tuple[Import, ...]:
    return tuple(
        imp for module, path in project_modules().items() for imp in imports_of(module, path)
    )


def project_target(target: str) -> str | None:
    """The project module an imported name loads, or None for a third-party one. For
    ``from worker import jobs`` that is app.jobs.claims; for ``from app.infra.db import utcnow``,
    app.infra.db (utcnow is no module)."""
    modules = project_modules()
    while target:
        if target in modules:
            return target
        target = target.rpartition(".")[0]
    return None


def import_graph() -> dict[str, dict[str, Import]]:
    """module → {imported project module → the first import statement that loads it}.
    An import names its own module only: the package __init__ files it runs on the way
    are no edge, or every module would "import" its package, a cycle with any __init__
    that imports a submodule."""
    graph: dict[str, dict[str, Import]] = {m: {} for m in project_modules()}
    for imp in all_imports():
        target = project_target(imp.target)
        if target is not None and target != imp.module:
            graph[imp.module].setdefault(target, imp)
    return graph


def find_cycles(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    """The strongly connected components with more than one module, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strongconnect(start: str) -> None:
        # Tarjan's, iterative: a long import chain must not hit the recursion limit.
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            strongconnect(module)
    return components


def _cycle_in(graph: dict[str, dict[str, Import]], members: set[str], start: str) -> list[str]:
    """The shortest path from start back to itself inside its component (breadth first)."""
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node]):
                if child not in members:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [*reversed(path), start]
                if child not in came_from:
                    came_from[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"{start} is in a component without a cycle")


def describe(graph: dict[str, dict[str, Import]], component: list[str]) -> str:
    """One cycle of the component, each step with the import that makes it; the other
    modules tangled in the same component, if any (breaking this cycle may leave theirs)."""
    cycle = _cycle_in(graph, set(component), component[0])
    steps = [f"  {a} -> {b}  ({graph[a][b].where})" for a, b in itertools.pairwise(cycle)]
    others = sorted(set(component) - set(cycle))
    tangled = [f"  also in this tangle: {', '.join(others)}"] if others else []
    return "\n".join([" -> ".join(cycle), *steps, *tangled])


def test_the_source_is_found() -> None:
    # A wrong ROOT would make every assertion below pass on nothing.
    modules = project_modules()
    assert {"app.cli", "app.api.main", "worker.tasks", "worker.runtime"} <= set(modules)
    graph = import_graph()
    assert "app.jobs.claims" in graph["worker.tasks"]  # `from worker import ..., jobs, ...`
    assert "worker.reaper" in graph["worker.celery_app"]


def test_no_import_cycle() -> None:
    graph = import_graph()
    cycles = find_cycles(graph)
    assert not cycles, "import cycles (break them so imports run one way):\n" + "\n".join(
        describe(graph, c) for c in cycles
    )


def test_app_starts_workers_but_never_imports_one_elsewhere() -> None:
    found: set[tuple[str, str]] = set()
    unexpected = []
    for imp in all_imports():
        target = project_target(imp.target)
        if imp.module.split(".")[0] != "app" or not target or target.split(".")[0] != "worker":
            continue
        pair = (imp.module, target)
        found.add(pair)
        if pair not in ALLOWED_APP_TO_WORKER or imp.function not in WORKER_COMMANDS:
            where = f"in {imp.function}()" if imp.function else "on import"
            unexpected.append(f"{imp.module} -> {target} {where} ({imp.where})")
    assert not unexpected, "app/ imports worker/ outside the worker commands:\n" + "\n".join(
        sorted(unexpected)
    )
    stale = sorted(ALLOWED_APP_TO_WORKER - found)
    assert not stale, f"no longer imported, drop from ALLOWED_APP_TO_WORKER: {stale}"


def test_app_never_imports_torch_or_whisper() -> None:
    bad = [
        f"{imp.where}: {imp.target}"
        for imp in all_imports()
        if imp.module.split(".")[0] == "app" and imp.target.split(".")[0] in FORBIDDEN_IN_APP
    ]
    assert not bad, "app/ must run without the model's libraries:\n" + "\n".join(sorted(bad))


def _fastapi_home(module: str) -> bool:
    return module in FASTAPI_HOME or module.startswith(FASTAPI_HOME_PREFIXES)


def test_fastapi_stays_in_the_http_layer() -> None:
    importers: dict[str, Import] = {}
    for imp in all_imports():
        if imp.module.split(".")[0] == "app" and imp.target.split(".")[0] == "fastapi":
            importers.setdefault(imp.module, imp)
    outside = {m: imp for m, imp in importers.items() if not _fastapi_home(m)}
    new = sorted(
        f"{imp.where}: {imp.target}"
        for m, imp in outside.items()
        if m not in FASTAPI_KNOWN_EXCEPTIONS
    )
    assert not new, "fastapi outside app/api/ (keep it there, or pass in what you need):\n" + (
        "\n".join(new)
    )
    gone = sorted(set(FASTAPI_KNOWN_EXCEPTIONS) - set(outside))
    assert not gone, f"no longer imports fastapi, drop from FASTAPI_KNOWN_EXCEPTIONS: {gone}"


# app/ in layers, each importing only those below it: the HTTP layer (app.api, the commands)
# over the job logic (app.jobs) over the plumbing (app.infra); app.errors and app.settings
# sit under all three. A module of a lower layer importing a higher one fails here.
LAYERS = ("app.infra", "app.jobs", "app.api")


def _layer(module: str) -> int | None:
    for rank, prefix in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            return rank
    return None


def test_app_layers_import_downward() -> None:
    upward = []
    for imp in all_imports():
        target = project_target(imp.target)
        low, high = _layer(imp.module), _layer(target or "")
        if low is not None and high is not None and high > low:
            upward.append(f"{imp.where}: {imp.module} -> {target}")
    assert not upward, "a lower layer of app/ imports a higher one:\n" + "\n".join(sorted(upward))
    # Nothing in app.errors or app.settings may reach up either: every layer imports them.
    for base in ("app.errors", "app.settings"):
        reach = sorted({str(project_target(i.target)) for i in all_imports() if i.module == base})
        assert all(_layer(t) is None for t in reach if t != "None"), (base, reach)


# kombu's private Redis layout (its unacked hash and index, its priority-list separator) is
# spelled in worker/broker.py only: a kombu upgrade that moves them is then fixed in one place.
KOMBU_PRIVATE_NAMES = frozenset({"unacked", "unacked_index", "\x06\x16"})
KOMBU_HOME = "worker.broker"


def test_kombu_private_names_live_in_one_module() -> None:
    spelled: dict[str, list[str]] = {}
    for module, path in project_modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            named = isinstance(node, ast.Constant) and isinstance(node.value, str)
            if named and node.value in KOMBU_PRIVATE_NAMES:  # type: ignore[attr-defined]
                spelled.setdefault(module, []).append(f"{module_path(module)}:{node.lineno}")
    assert KOMBU_HOME in spelled, "worker/broker.py no longer names kombu's structures?"
    others = sorted(w for m, where in spelled.items() if m != KOMBU_HOME for w in where)
    assert not others, "kombu's private names outside worker/broker.py:\n" + "\n".join(others)
