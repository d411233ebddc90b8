"""The install files agree with each other, and CI runs what the README says."""

import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _name(spec: str) -> str:
    return re.split(r"[<>=!~\[; ]", spec.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject_specs() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        specs += [s for s in extra if not s.startswith(project["name"])]
    return {_name(s): s.replace(" ", "") for s in specs}


def test_environment_yml_agrees_with_pyproject():
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    env_specs = {_name(s): s.replace(" ", "") for s in pip_section if not s.startswith("-e")}
    py = _pyproject_specs()
    assert set(env_specs) == set(py), (set(env_specs) ^ set(py))
    for name, spec in py.items():
        if name == "torch":
            continue  # pyproject keeps a range for Colab; the env pins the course version (checked below)
        assert env_specs[name] == spec, (name, env_specs[name], spec)


def test_torch_pinned_to_the_course_version_everywhere():
    pins = [line for line in (REPO / "constraints.txt").read_text().splitlines() if line.startswith("torch==")]
    assert pins == ["torch==2.13.0"]
    env = (REPO / "environment.yml").read_text()
    assert "torch==2.13.0" in env
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            assert "==" in line and "+" not in line, line  # exact, and no local build tags like +cpu


def test_every_constrained_dependency_is_pinned():
    pinned = {_name(line) for line in (REPO / "constraints.txt").read_text().splitlines()
              if line and not line.startswith("#")}
    missing = set(_pyproject_specs()) - pinned
    assert not missing, f"add exact versions for {missing} to constraints.txt"


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in readme and "make train" in readme
    assert re.search(r"^make test$", ci, re.M)
