"""The package's import graph has no cycles: module A importing B (at the top or inside a function) while B imports A.

Imports inside an `if __name__ == "__main__":` block are left out: they run only when the file is the program
(`python -m experiments.sweep`), as the module `__main__`, which no other module imports.
"""

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("sd_jax", "experiments")


def _modules() -> dict[str, pathlib.Path]:
  modules = {}
  for package in PACKAGES:
    for path in sorted((REPO / package).rglob("*.py")):
      name = ".".join(path.relative_to(REPO).with_suffix("").parts)
      modules[name.removesuffix(".__init__")] = path
  return modules


def _is_main_block(node: ast.AST) -> bool:
  return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and isinstance(node.test.left, ast.Name)
          and node.test.left.id == "__name__" and any(isinstance(c, ast.Constant) and c.value == "__main__"
                                                      for c in node.test.comparators))


def _imports(name: str, path: pathlib.Path, modules) -> set[str]:
  """The project modules `name` imports anywhere in its file, except in its __main__ block."""
  tree = ast.parse(path.read_text())
  skipped = {id(n) for block in ast.walk(tree) if _is_main_block(block) for n in ast.walk(block)}
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  found = set()
  for node in ast.walk(tree):
    if id(node) in skipped:
      continue
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name in modules)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
      for alias in node.names:
        full = f"{base}.{alias.name}"
        if full in modules:
          found.add(full)
        elif base in modules:
          found.add(base)
  found.discard(name)
  return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, on_stack, stack, out = {}, {}, set(), [], []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_no_import_cycles():
  modules = _modules()
  graph = {name: _imports(name, path, modules) for name, path in modules.items()}
  assert len(graph) > 50 and sum(map(len, graph.values())) > 100  # the graph was read
  cycles = _cycles(graph)
  detail = "\n".join(" <-> ".join(c) + "\n  " + "\n  ".join(f"{m} imports {sorted(graph[m] & set(c))}" for m in c)
                     for c in cycles)
  assert not cycles, f"import cycles:\n{detail}"


def test_the_checker_sees_a_cycle():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert _cycles(graph) == [["a", "b", "c"]]
