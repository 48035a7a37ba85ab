"""The import rules of docs/ARCHITECTURE.md, read from the code (every import, inside functions too).

* ``core`` (the torch-free leaf) and ``manifests`` import nothing of ours but themselves;
* ``pipeline`` imports only ``core``, ``manifests`` and itself;
* ``heads`` imports only ``core`` and itself (never decoding, manifests or the pipeline's jobs);
* ``synthetic`` (the synthetic benchmark: its world, videos, manifest builder, encoder pretraining,
  probes, within-group accuracy) imports ``core``, ``manifests``, ``pipeline``, ``heads`` and itself; it is
  imported only by ``workflows``, ``commands``, ``cli.py``, ``bench/`` and, one module, by ``reports``
  (the dataset registry names its builder as a ``"module:function"`` string, not an import);
* ``reports`` imports ``core``, ``manifests`` and ``pipeline`` (the store's thumbnails), never ``heads``:
  it reads the files runs and re-rankings wrote. Of ``synthetic`` it may import ``synthetic.groups`` alone
  (the torch-free within-group accuracy; ``synthetic/__init__.py`` imports nothing), and nothing it
  reaches, through any chain of imports, is in ``heads``;
* ``workflows`` may import every library package; ``commands`` (the command line by stage) only by ``cli.py``;
  ``cli.py`` and ``bench/`` are imported by nothing;
* ``serve`` (the web application of ``python cli.py serve``) imports ``core``, ``manifests``, ``pipeline``,
  ``heads``, ``reports`` and ``workflows``; only ``commands``, ``cli.py``, ``bench/`` (and tests) import it;
* no module imports a private (``_name``) name from another module;
* no import cycles between modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "manifests", "pipeline", "heads", "synthetic", "reports", "workflows", "serve", "commands", "bench")
ALLOWED = {
    "core": {"core"},
    "manifests": {"manifests"},
    "pipeline": {"core", "manifests", "pipeline"},
    "heads": {"core", "heads"},
    "synthetic": {"core", "manifests", "pipeline", "heads", "synthetic"},
    "reports": {"core", "manifests", "pipeline", "reports"},
    "workflows": {"core", "manifests", "pipeline", "heads", "synthetic", "reports", "workflows"},
    "serve": {"core", "manifests", "pipeline", "heads", "reports", "workflows", "serve"},
    "commands": {"core", "manifests", "pipeline", "heads", "synthetic", "reports", "workflows", "serve", "commands"},
    "cli": {"core", "manifests", "pipeline", "heads", "synthetic", "reports", "workflows", "serve", "commands", "cli"},
    "bench": {"core", "manifests", "pipeline", "heads", "synthetic", "reports", "workflows", "serve", "bench"},
}
# Single modules a package may import although their package is not in its ALLOWED set.
ALLOWED_MODULES = {
    "reports": {"synthetic.groups"},  # torch-free within-group accuracy; never anything that reaches heads
}


def our_modules() -> dict[str, Path]:
    mods = {"cli": ROOT / "cli.py"}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def imports(mods: dict[str, Path]) -> list[tuple[str, str, list[str], int]]:
    """``(importer, imported module, imported names, line)`` for every import of one of ours."""
    out = []
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [(a.name, []) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (node.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                names = [a.name for a in node.names]
                targets = [(f"{base}.{n}", []) if f"{base}.{n}" in mods else (base, [n]) for n in names]
            else:
                continue
            for target, names in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    out.append((name, target, names, node.lineno))
    return out


def test_import_rules() -> None:
    mods = our_modules()
    breaches = []
    for src, dst, names, line in imports(mods):
        top_src, top_dst = src.split(".")[0], dst.split(".")[0]
        where = f"{mods[src].relative_to(ROOT)}:{line}: {src} imports {dst}"
        if top_dst not in ALLOWED[top_src] and dst not in ALLOWED_MODULES.get(top_src, ()):
            also = sorted(ALLOWED_MODULES.get(top_src, ()))
            breaches.append(f"{where} ({top_src} may import only {sorted(ALLOWED[top_src])}"
                            f"{f' and the module(s) {also}' if also else ''})")
        private = [n for n in names if n.startswith("_")]
        if private:
            breaches.append(f"{where}: private name(s) {private} of another module")
    assert not breaches, "import rules broken:\n" + "\n".join(breaches)


def test_reports_never_reach_heads() -> None:
    """Everything ``reports`` imports, and everything that imports in turn (the allowed ``synthetic.groups``
    included), stays out of ``heads`` (and so out of torch's training code); ``synthetic/__init__.py``,
    run by every ``import synthetic.x``, imports nothing."""
    mods = our_modules()
    imports_of: dict[str, set[str]] = {m: set() for m in mods}
    for src, dst, _, _ in imports(mods):
        imports_of[src].add(dst)
    assert not imports_of["synthetic"], f"synthetic/__init__.py imports {sorted(imports_of['synthetic'])}"
    path: dict[str, str] = {m: m for m in mods if m.split(".")[0] == "reports"}
    todo = list(path)
    while todo:
        m = todo.pop()
        for dst in imports_of[m]:
            if dst not in path:
                path[dst] = f"{path[m]} -> {dst}"
                todo.append(dst)
    reached = sorted(path[m] for m in path if m.split(".")[0] == "heads")
    assert not reached, "reports reaches heads:\n" + "\n".join(reached)


def test_no_import_cycles() -> None:
    mods = our_modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    lines: dict[tuple[str, str], int] = {}
    for src, dst, _, line in imports(mods):
        graph[src].add(dst)
        lines.setdefault((src, dst), line)
    # strongly connected components (Tarjan, iterative)
    index, low, on, stack, comps, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        comps.append(sorted(comp))
    described = []
    for comp in comps:
        edges = [f"{mods[a].relative_to(ROOT)}:{lines[(a, b)]}: {a} imports {b}"
                 for a in comp for b in sorted(graph[a]) if b in comp]
        described.append(" <-> ".join(comp) + "\n  " + "\n  ".join(edges))
    assert not comps, "import cycles:\n" + "\n".join(described)


def test_the_rules_see_imports_inside_functions() -> None:
    """The checker reads imports inside functions too (a cycle hidden in a function is still one)."""
    mods = our_modules()
    found = {(src, dst) for src, dst, _, _ in imports(mods)}
    # cli.py imports its workflows only inside its commands
    assert ("cli", "workflows.experiments") in found
