"""The package's layers, read from the source: kernels (ops) import nothing above them, the patch layer does not
import the recipes (scoring, mining, tuning, pipeline), and module-level imports have no cycles."""
import ast
import collections
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "headsparse"
RECIPES = {"recipes"}
# HeadPlan.for_model / check_model read the model's shape through a reader the patch layer registers
# (plan.register_model_shape): the plan imports nothing above it, not even inside a function.
ALLOWED = set()


def _imports():
    top, anywhere = collections.defaultdict(set), collections.defaultdict(set)
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mod = ".".join(parts[:-1] if is_pkg else parts)
        pkg = mod if is_pkg else mod.rsplit(".", 1)[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        module_level = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                    targets = [".".join(base + ([node.module] if node.module else []))]
                elif node.module:
                    targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                if t.startswith("headsparse"):
                    anywhere[mod].add(t)
                    if id(node) in module_level:
                        top[mod].add(t)
    return top, anywhere


def _layer(mod):
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_kernels_and_patch_layer_do_not_import_upward():
    _, anywhere = _imports()
    assert anywhere, "no modules read"
    bad = []
    for mod, targets in anywhere.items():
        for t in targets:
            lm, lt = _layer(mod), _layer(t)
            if lm == "ops" and lt not in ("ops", "_atomic", "_checks", "provenance", ""):
                bad.append((mod, t))
            if lm in ("patch", "plan") and lt in RECIPES:
                bad.append((mod, t))
            if lm == "plan" and lt == "patch" and (mod, t) not in ALLOWED:
                bad.append((mod, t))
    assert not bad, f"imports against the layering: {sorted(bad)}"


def test_no_module_level_import_cycles():
    top, _ = _imports()

    def resolve(t):  # "headsparse.ops" means its __init__; a name imported from a module is the module
        while t and t not in top and "." in t:
            if (ROOT.parent / (t.replace(".", "/") + ".py")).exists():
                return t
            t = t.rsplit(".", 1)[0]
        return t

    graph = {m: {resolve(t) for t in ts} - {m} for m, ts in top.items()}
    seen, stack, cycles = set(), [], []

    def visit(m):
        if m in stack:
            cycles.append(stack[stack.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            # a package's __init__ importing its own submodules is not a cycle through the package
            if not t.startswith(m + "."):
                visit(t)
        stack.pop()

    for m in sorted(graph):
        visit(m)
    real = [c for c in cycles if not all(c[i + 1].startswith(c[i] + ".") or c[i].startswith(c[i + 1] + ".")
                                         for i in range(len(c) - 1))]
    assert not real, f"module-level import cycles: {real}"


def _cycles(graph):
    seen, stack, cycles = set(), [], []

    def visit(m):
        if m in stack:
            cycles.append(stack[stack.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if not t.startswith(m + "."):  # a package's __init__ importing its own submodules
                visit(t)
        stack.pop()

    for m in sorted(graph):
        visit(m)
    return [c for c in cycles if not all(c[i + 1].startswith(c[i] + ".") or c[i].startswith(c[i + 1] + ".")
                                         for i in range(len(c) - 1))]


def test_no_import_circle_even_through_deferred_imports():
    """Imports inside functions count too: a deferred import that closes a circle is still a circle (the two the
    package had, plan <-> patch.core through model_shape and tuning.core <-> tuning.apt through tune_apt, are
    gone)."""
    _, anywhere = _imports()
    mods = set(anywhere)

    def resolve(t):  # the module a name is imported from; "from pkg import sub" where sub is a module: pkg.sub
        while t and t not in mods and "." in t:
            if (ROOT.parent / (t.replace(".", "/") + ".py")).exists():
                return t
            t = t.rsplit(".", 1)[0]
        return t

    graph = {m: {resolve(t) for t in ts} - {m} for m, ts in anywhere.items()}
    assert _cycles(graph) == []
    planted = {**graph, "headsparse.plan": graph.get("headsparse.plan", set()) | {"headsparse.patch.core"}}
    assert _cycles(planted), "the check must see a planted circle"


def test_top_level_holds_only_the_layers():
    # kernels (ops), the plan and the patch layer, the recipes, and four small shared helpers; nothing else
    found = {p.stem if p.suffix == ".py" else p.name for p in ROOT.iterdir()
             if not p.name.startswith("__") and (p.suffix == ".py" or (p / "__init__.py").exists())}
    assert found == {"ops", "plan", "patch", "recipes", "_atomic", "_checks", "_lazy", "provenance"}, found
