"""Code shape: no function in the packages is longer than about 80 lines (the style rule in DESIGN.md)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("minilm", "dataset_curation", "metrics", "efficient_training", "course")
LIMIT = 80


def function_lengths(path: Path) -> list[tuple[int, str, int]]:
    """(line, qualified name, lines from def to end) of every function and method in a file, nested ones too."""
    found = []

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((child.lineno, prefix + child.name, child.end_lineno - child.lineno + 1))
                walk(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                walk(child, f"{prefix}{child.name}.")
            else:
                walk(child, prefix)

    walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), "")
    return found


def package_files() -> list[Path]:
    return [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]


def test_no_long_functions():
    offenders = [f"{p.relative_to(ROOT)}:{line} {name} ({n} lines)"
                 for p in package_files() for line, name, n in function_lengths(p) if n > LIMIT]
    assert not offenders, f"functions over {LIMIT} lines; split them:\n" + "\n".join(offenders)


def test_the_counter_sees_long_and_nested_functions(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(LIMIT))
    src = (f"def outer():\n    def inner():\n        return 1\n{body}\n\n"
           "class C:\n    async def m(self):\n        pass\n")
    path = tmp_path / "m.py"
    path.write_text(src)
    lengths = {name: n for _, name, n in function_lengths(path)}
    assert lengths == {"outer": LIMIT + 3, "outer.inner": 2, "C.m": 2}


def test_every_package_is_scanned():
    scanned = {p.relative_to(ROOT).parts[0] for p in package_files()}
    assert scanned == set(PACKAGES)
