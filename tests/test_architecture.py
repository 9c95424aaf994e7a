"""docs/ARCHITECTURE.md's module tables are the code's: every module is listed, and each lists
exactly the project modules it imports (Python) or requires (Lua)."""
import ast
import os
import re

from support import LUA_DIR, ROOT

DOC = os.path.join(ROOT, "docs", "ARCHITECTURE.md")
PACKAGE = os.path.join(ROOT, "healthcheck")
LUA_PACKAGE = os.path.join(LUA_DIR, "container_healthcheck")


def _table(heading):
    """{module: set of imports} from the table under heading."""
    text = open(DOC, encoding="utf-8").read()
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = set() if cells[2] == "-" else {name.strip() for name in cells[2].split(",")}
    return rows


def _python_imports(path):
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "healthcheck":
                found.update(alias.name for alias in node.names if alias.name != "__version__")
            elif node.module.startswith("healthcheck."):
                found.add(node.module.split(".")[1])
    return found


def test_the_python_table_is_the_code():
    table = _table("## Modules of the service")
    modules = {name[:-3] for name in os.listdir(PACKAGE) if name.endswith(".py")} - {"__init__", "__main__"}
    assert set(table) == modules, (set(table) ^ modules)
    for module in sorted(modules):
        assert _python_imports(os.path.join(PACKAGE, module + ".py")) == table[module], module


def test_imports_only_point_down_the_python_table():
    table = _table("## Modules of the service")
    order = list(table)
    for module, imports in table.items():
        for name in imports:
            assert order.index(name) < order.index(module), "%s imports %s, listed below it" % (module, name)


def test_the_lua_table_is_the_code():
    table = _table("## Modules of the entry balancer")
    modules = {name[:-4] for name in os.listdir(LUA_PACKAGE) if name.endswith(".lua")}
    assert set(table) == modules, (set(table) ^ modules)
    for module in sorted(modules):
        text = open(os.path.join(LUA_PACKAGE, module + ".lua"), encoding="utf-8").read()
        assert set(re.findall(r'require\s*\(?\s*"container_healthcheck\.(\w+)"', text)) == table[module], module


def test_a_wrong_row_is_seen(tmp_path):
    """The comparison can fail: a module whose row misses an import."""
    table = _table("## Modules of the service")
    table["feed"] = {"errors"}
    assert _python_imports(os.path.join(PACKAGE, "feed.py")) != table["feed"]
