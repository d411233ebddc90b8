"""The harness every self-check runs on: verdicts, the log, stubs, run-time reference watching and hints.

How a check is written (the topic modules, course/check/<topic>.py, all follow it):

    WATCH = ("torch.nn.functional.layer_norm", "torch.nn.LayerNorm.forward")   # dotted paths to the references

    @_check(hints=("first hint: the idea and the invariant to check", "second hint, asked for: more detail"))
    def layer_norm(fn, trials=6, seed=None, log=True) -> Result:
        s = _seed(seed)                        # fresh inputs each run; the seed is printed and logged
        seen = Counter()
        for trial in range(trials):
            expected = ...                     # the check's own reference call: OUTSIDE the watch window
            try:
                with watching(WATCH, seen, fn):
                    got = fn(...)              # only the learner's call runs inside the window
            except Exception as e:
                return _finish("layer_norm", False, _crash(e, what), s, log)
            ...
        return _finish("layer_norm", True, "...", s, log,
                       uses_reference=seen or _calls_reference(fn, {"layer_norm", "LayerNorm"}))

- `watching(paths, seen, fn)` replaces each path that resolves ("module.attr", "module.Class.method"; a path that
  does not resolve in this torch/minilm is skipped) by a counting wrapper for the duration of the block and puts
  the original back afterwards, also when fn raises. Entries of fn's globals and closure cells that hold one of
  the originals (`from torch.nn.functional import scaled_dot_product_attention as sdpa`) are swapped too; for a
  class, its methods' globals are. Every call adds one to seen[path]. Calls into the references from any thread
  count while a window is open; opening and closing windows is serialised by a lock, so nested or concurrent
  windows restore the right originals.
- Watch the class's method, not the class: "torch.nn.CrossEntropyLoss.forward" catches `nn.CrossEntropyLoss()(z, t)`,
  and "minilm.model.CausalSelfAttention.forward" catches both `attn(x)` and `attn.forward(x)`, and any subclass
  that does not override forward.
- `_finish(name, passed, message, seed, log, uses_reference=...)` prints and logs the verdict; uses_reference is a
  bool or the Counter from watching (its keys are named in the note). A pass with uses_reference is logged with
  "reference": true and `python -m course status` does not count it.
- `_calls_reference(fn, names, objects)` is the static half: fn is a reference object (a class or a function
  check.reference returned), a subclass that changes nothing, or its code names one of `names`.
- `@_check` (or `@_check(hints=(first, second))`) turns a stub's NotImplementedError (re-raised by `_crash` as
  _Stub) into "not implemented yet", raises under COURSE_STRICT=1 when the check did not pass, and registers the
  hints that `check.hint(name)` and `check.hint(name, 2)` print. A failure message says the second hint exists.
- Helpers: `_mismatch` (where two tensors differ, with tolerances), `_which_variant` (which known-wrong variant the
  output equals: a diagnostic hint), `_randint`, `_perturbed`, `_model_config`, `_tensor_brief`.
- Add a new check's public name to course/check/__init__.py so `from course import check; check.name` finds it.
"""

from __future__ import annotations

import builtins
import functools
import importlib
import inspect
import json
import os
import random
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# ----------------------------------------------------------------------------- verdicts and the log


@dataclass
class Result:
    """A check's verdict: truthy when it passed; message says what was tried and, on failure, what differed."""

    name: str
    passed: bool
    message: str
    seed: int
    uses_reference: bool = False  # the function handed in calls the reference: the pass is not the learner's
    not_implemented: bool = False  # the function handed in is still the shipped stub

    def __bool__(self) -> bool:
        return self.passed

    def __repr__(self) -> str:
        verdict = "not implemented yet" if self.not_implemented else ("PASS" if self.passed else "FAIL")
        return f"<check.{self.name}: {verdict}>"


def log_path() -> Path:
    """Where verdicts are logged: $COURSE_LOG, else out/course/checks.jsonl at the repository root (or cwd)."""
    if os.environ.get("COURSE_LOG"):
        return Path(os.environ["COURSE_LOG"])
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():  # installed without the repository around it
        root = Path.cwd()
    return root / "out" / "course" / "checks.jsonl"


def read_log(path: str | Path | None = None) -> list[dict]:
    """All logged verdicts, oldest first; an absent log is an empty list, a damaged line is skipped."""
    p = Path(path) if path else log_path()
    if not p.is_file():
        return []
    rows = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _calls_reference(fn, names: set[str], objects: tuple = ()) -> bool:
    """Whether fn is one of the reference objects or a function check.reference returned, or its code names one
    of `names` (the notebooks' shipped cells); a class: a subclass of a reference class that changes nothing."""
    if any(fn is o for o in objects) or getattr(fn, "_course_reference", None):
        return True
    seen, todo = set(), [getattr(fn, "__code__", None)]
    if isinstance(fn, type):  # a class: look at the code of the methods it defines itself
        todo = [getattr(v, "__code__", None) for v in vars(fn).values()]
        if any(issubclass(fn, o) for o in objects if isinstance(o, type)) and not any(todo):
            return True  # a subclass that changes nothing
    while todo:
        code = todo.pop()
        if code is None or id(code) in seen:
            continue
        seen.add(id(code))
        if names & (set(code.co_names) | set(code.co_freevars)):  # globals, attributes and closure variables
            return True
        todo += [c for c in code.co_consts if hasattr(c, "co_names")]
    return False


def _finish(name: str, passed: bool, message: str, seed: int, log: bool, uses_reference=False) -> Result:
    """Print and log a verdict. uses_reference: a bool, or the Counter of reference calls from watching()."""
    called = sorted(uses_reference) if isinstance(uses_reference, (dict, set, frozenset, list, tuple)) else []
    uses_reference = bool(uses_reference)
    verdict = "PASS" if passed else "FAIL"
    if passed and uses_reference:
        what = f" (it called {', '.join(called)})" if called else ""
        message += (f"\nnote: your function calls the reference implementation{what}, so this pass is the "
                    "package's: replace it with your own code and run the check again (course status counts it then)")
    elif not passed and _HINTS.get(name, ("", ""))[1] and "check.hint(" not in message:
        message += f"\n  stuck? check.hint({name!r}) names the idea; check.hint({name!r}, 2) says more"
    print(f"check.{name}: {verdict} (seed={seed})\n  " + message.replace("\n", "\n  "))
    if log:
        try:
            p = log_path()
            p.parent.mkdir(parents=True, exist_ok=True)
            row = {"check": name, "passed": passed, "seed": seed, "reference": uses_reference,
                   "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            with open(p, "a", encoding="utf-8") as f:  # one short line per verdict: appends do not interleave
                f.write(json.dumps(row) + "\n")
        except OSError as e:  # a read-only checkout must not break the exercise
            print(f"  (could not log the verdict to {log_path()}: {e})")
    return Result(name, passed, message, seed, uses_reference)


def _seed(seed: int | None) -> int:
    return random.SystemRandom().randrange(2**31) if seed is None else int(seed)


class _Stub(Exception):
    """Raised inside a check when the learner's code raised NotImplementedError: the exercise is not done yet."""


_HINTS: dict[str, tuple[str, str]] = {}  # check name -> (first hint, second hint), filled by @_check(hints=...)


def _check(fn: Callable | None = None, *, hints: tuple[str, str] | None = None):
    """Wrap a check: a stub gets "not implemented yet", not a failure; COURSE_STRICT=1 turns a miss into an error.

    Use bare (@_check) or with the exercise's two hints (@_check(hints=(first, second))), which check.hint prints.
    """
    if fn is None:
        return functools.partial(_check, hints=hints)
    if hints is not None:
        if len(hints) != 2:
            raise ValueError(f"hints for {fn.__name__} must be (first, second), got {len(hints)} strings")
        _HINTS[fn.__name__] = tuple(hints)

    @functools.wraps(fn)
    def run(*args, **kwargs) -> Result:
        name = fn.__name__
        try:
            r = fn(*args, **kwargs)
        except _Stub as e:
            print(f"check.{name}: not implemented yet ({e}); the cells below use the reference until yours passes")
            r = Result(name, False, f"not implemented yet: {e}", -1, not_implemented=True)
        if os.environ.get("COURSE_STRICT") == "1" and not r:
            raise AssertionError(f"check.{name} did not pass (COURSE_STRICT=1):\n{r.message}")
        return r

    return run


def hint(name: str, level: int = 1, more: bool = False) -> str:
    """Print and return the hint for exercise `name`: level 1 names the idea and the invariant to check; level 2
    (or more=True), asked for on purpose, says more about how. Neither is the solution."""
    if name not in _HINTS:
        known = ", ".join(sorted(_HINTS)) or "none yet"
        raise KeyError(f"no hints for {name!r}; exercises with hints: {known}")
    level = 2 if more else int(level)
    if level not in (1, 2):
        raise ValueError(f"level must be 1 or 2, got {level}")
    text = _HINTS[name][level - 1]
    print(f"hint {level} for {name}: {text}" + ("" if level == 2 else f"\n  (more: check.hint({name!r}, 2))"))
    return text


def pick(result: Result, yours, reference=None):
    """yours when its check passed, else the reference (so the rest of the notebook still runs), saying which.

    The reference defaults to check.reference(result.name): the package's version with the exercise's signature.
    """
    if result:
        print(f"using your {getattr(yours, '__name__', 'code')} from here on")
        return yours
    print(f"check.{result.name} has not passed: the cells below use the reference until yours does")
    if reference is not None:
        return reference
    from course.check.reference import reference as package_reference

    return package_reference(result.name)


# ----------------------------------------------------------------------------- watching the references at run time

_LOCK = threading.RLock()
_INSTALLED: dict[tuple[int, object], dict] = {}  # (id(container), key) -> the patch in place and who watches it


def _resolve(path: str):
    """(container, attribute name, current value) for "pkg.module.attr" or "pkg.module.Class.attr"; None if absent."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for a in parts[cut:-1]:
                obj = getattr(obj, a)
            return obj, parts[-1], getattr(obj, parts[-1])
        except AttributeError:
            return None
    return None


def _counting(original, label_of: Callable[[], list[Counter]], label: str, static: bool):
    def counted(*args, **kwargs):
        for seen in label_of():
            seen[label] += 1
        return original(*args, **kwargs)

    try:
        functools.update_wrapper(counted, original)
    except (AttributeError, TypeError):
        pass
    return staticmethod(counted) if static else counted


def _install(container, key, label: str, seen: Counter) -> None:
    """Swap container[key] (a dict) or container.key for a counting wrapper, or add a watcher to one in place."""
    slot = (id(container), key)
    patch = _INSTALLED.get(slot)
    if patch is None:
        is_dict = isinstance(container, dict)
        if is_dict:
            raw, own = container[key], True
        else:
            raw = inspect.getattr_static(container, key)
            own = isinstance(container, type) and key in vars(container) or not isinstance(container, type)
        static = isinstance(raw, staticmethod)
        original = container[key] if is_dict else getattr(container, key)
        patch = {"container": container, "key": key, "raw": raw, "own": own, "dict": is_dict, "watchers": []}
        wrapper = _counting(original, lambda p=patch: [w for _, w in p["watchers"]], label, static)
        if is_dict:
            container[key] = wrapper
        else:
            setattr(container, key, wrapper)
        _INSTALLED[slot] = patch
    patch["watchers"].append((label, seen))


def _uninstall(container, key, seen: Counter) -> None:
    slot = (id(container), key)
    patch = _INSTALLED.get(slot)
    if patch is None:
        return
    patch["watchers"] = [(lab, w) for lab, w in patch["watchers"] if w is not seen]
    if patch["watchers"]:
        return
    del _INSTALLED[slot]
    if patch["dict"]:
        container[key] = patch["raw"]
    elif patch["own"]:
        setattr(container, key, patch["raw"])
    else:  # the attribute was inherited: remove the shadowing wrapper
        delattr(container, key)


def _namespaces(fn) -> list[dict]:
    """The global namespaces fn's code reads: its own, or for a class those of the methods it defines."""
    funcs = [v for v in vars(fn).values() if inspect.isfunction(v)] if isinstance(fn, type) else [fn]
    funcs = [getattr(f, "__func__", f) for f in funcs]
    out, ids = [], set()
    for f in funcs:
        g = getattr(f, "__globals__", None)
        if isinstance(g, dict) and id(g) not in ids:
            ids.add(id(g))
            out.append(g)
    return out


def _cells(fn) -> list:
    funcs = [v for v in vars(fn).values() if inspect.isfunction(v)] if isinstance(fn, type) else [fn]
    return [c for f in funcs for c in (getattr(f, "__closure__", None) or ())]


@contextmanager
def watching(paths: Iterable[str], seen: Counter | None = None, fn=None) -> Iterator[Counter]:
    """Count calls into the references at `paths` while the block runs; yields the Counter (path -> calls).

    fn (the learner's function or class) also gets its globals and closure cells that hold an original swapped,
    so an alias imported under another name is seen too. Everything is put back when the block ends.
    """
    seen = Counter() if seen is None else seen
    done: list[tuple] = []
    cells: list[tuple] = []
    with _LOCK:
        try:
            originals = {}
            for path in paths:
                r = _resolve(path)
                if r is None:
                    continue
                container, key, value = r
                _install(container, key, path, seen)
                done.append((container, key))
                originals[id(value)] = path
            if fn is not None and originals:
                for g in _namespaces(fn):
                    for k, v in list(g.items()):
                        if id(v) in originals and not k.startswith("__"):
                            _install(g, k, originals[id(v)], seen)
                            done.append((g, k))
                for c in _cells(fn):
                    try:
                        v = c.cell_contents
                    except ValueError:  # an empty cell
                        continue
                    if id(v) in originals:
                        cells.append((c, v))
                        label = originals[id(v)]
                        c.cell_contents = _counting(v, lambda s=seen: [s], label, False)
        except BaseException:
            _restore(done, cells, seen)
            raise
    try:
        yield seen
    finally:
        with _LOCK:
            _restore(done, cells, seen)


def _restore(done: list[tuple], cells: list[tuple], seen: Counter) -> None:
    for container, key in reversed(done):
        _uninstall(container, key, seen)
    for c, v in cells:
        c.cell_contents = v


def _salted(x) -> bool:
    """Whether hash(x) changes with PYTHONHASHSEED: str and bytes, and tuples or frozensets holding them."""
    if isinstance(x, (str, bytes)):
        return True
    if isinstance(x, (tuple, frozenset)):
        return any(_salted(v) for v in x)
    return False


def _library_dirs() -> tuple[str, ...]:
    """Where library code lives: the standard library, site-packages and this repository's packages."""
    import sysconfig

    repo = Path(__file__).resolve().parents[2]
    dirs = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    dirs |= {str(repo / name) for name in ("course", "minilm", "dataset_curation", "metrics", "efficient_training")}
    return tuple(os.path.realpath(d) + os.sep for d in dirs)


@contextmanager
def salted_hash_calls(fn) -> Iterator[list]:
    """Record the hash() calls on salted values that the learner's code makes while the block runs: Python's hash
    of a str differs between processes, so a MinHash built on it gives other signatures in the next process and
    deduplication runs disagree. The learner's code is fn's own (code sharing its globals) and any code outside the
    standard library, site-packages and this repository's packages (a helper in the learner's own module); the
    libraries' own hash() calls are not recorded."""
    calls: list = []
    original = builtins.hash
    mine = {id(g) for g in _namespaces(fn)}
    library = _library_dirs()
    outside = functools.lru_cache(maxsize=None)(lambda file: not os.path.realpath(file).startswith(library))

    def watched_hash(obj):
        if _salted(obj):
            caller = sys._getframe(1)
            if id(caller.f_globals) in mine or outside(caller.f_code.co_filename):
                calls.append(type(obj).__name__)
        return original(obj)

    with _LOCK:
        builtins.hash = watched_hash
    try:
        yield calls
    finally:
        with _LOCK:
            builtins.hash = original


def _crash(e: BaseException, what: str) -> str:
    if isinstance(e, NotImplementedError):
        raise _Stub(str(e) or "the exercise still raises NotImplementedError") from e
    tb = traceback.extract_tb(e.__traceback__)
    where = f" (line {tb[-1].lineno} in {tb[-1].name})" if tb else ""
    return f"your code raised {type(e).__name__}: {e}{where}\n  on input: {what}"


def _tensor_brief(t: torch.Tensor, n: int = 6) -> str:
    flat = t.detach().flatten()[:n].tolist()
    more = ", ..." if t.numel() > n else ""
    return "[" + ", ".join(f"{v:.5g}" for v in flat) + more + "]"

# ----------------------------------------------------------------------------- shared by the model and training checks


def _mismatch(what: str, got, expected: torch.Tensor, atol: float, rtol: float, name: str = "y") -> str | None:
    """None when got equals expected within atol + rtol * |expected|; else where and by how much they differ."""
    if not isinstance(got, torch.Tensor):
        return f"{what}\n  expected a tensor of shape {tuple(expected.shape)}, got {type(got).__name__}"
    if got.shape != expected.shape:
        return f"{what}\n  expected {name} of shape {tuple(expected.shape)}, got {tuple(got.shape)}"
    g, e = got.detach().double(), expected.detach().double()
    if not torch.isfinite(g).all():
        bad = tuple(int(i) for i in (~torch.isfinite(g)).nonzero()[0])
        return (f"{what}\n  {name}{list(bad)} is {float(g[bad])} (expected {float(e[bad]):.6g}): an overflow? "
                "exp() of a large number is inf in float32")
    err = (g - e).abs()
    if bool((err <= atol + rtol * e.abs()).all()):
        return None
    i = tuple(int(k) for k in np.unravel_index(int(err.argmax()), err.shape))
    return (f"{what}\n  largest difference at {name}{list(i)}: expected {float(e[i]):.6g}, got {float(g[i]):.6g} "
            f"(|diff| {float(err[i]):.3g}; tolerance {atol:g} + {rtol:g}*|expected|)\n"
            f"  expected {name} starts {_tensor_brief(e)}\n  got      {name} starts {_tensor_brief(g)}")


def _which_variant(got, variants: dict, atol: float = 1e-5, rtol: float = 1e-4) -> str:
    """The hint of the first known-wrong variant that got equals, as a message line (or "")."""
    for hint, y in variants.items():
        if isinstance(got, torch.Tensor) and got.shape == y.shape and torch.allclose(
                got.detach().double(), y.detach().double(), atol=atol, rtol=rtol):
            return f"\n  hint: {hint}"
    return ""


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    return int(torch.randint(lo, hi, (1,), generator=g))


def _perturbed(module: torch.nn.Module, g: torch.Generator, std: float = 0.3) -> torch.nn.Module:
    """The module with every parameter redrawn from N(0, std^2) (LayerNorm weights near 1), in eval mode."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.normal_(0.0, std, generator=g)
            if p.dim() == 1 and ("ln" in name or "norm" in name) and name.endswith("weight"):
                p.add_(1.0)
    return module.eval()


def _model_config(**kw):
    """A minilm ModelConfig; fields this version of minilm does not have yet are dropped."""
    from dataclasses import fields

    from minilm.config import ModelConfig

    known = {f.name for f in fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in kw.items() if k in known})


def _has_config_field(name: str) -> bool:
    from dataclasses import fields

    from minilm.config import ModelConfig

    return name in {f.name for f in fields(ModelConfig)}
