"""Registry: registration rules, lookup errors, module status, reproduce driver."""

from __future__ import annotations

import pandas as pd
import pytest

import curvlab.experiments as ex
from curvlab.experiments.harness.registry import (
    Claim,
    Context,
    Outcome,
    get_experiment,
    list_experiments,
    make_context,
    register,
    unregister,
)
from curvlab.experiments.harness.reproduce import reproduce, resolve_names, summary_markdown


@pytest.fixture
def temp_experiment():
    names: list[str] = []

    def make(name: str, fn):
        register(name, title=f"title {name}", paper="test paper")(fn)
        names.append(name)
        return fn

    yield make
    for name in names:
        unregister(name)


def _ok(ctx: Context) -> Outcome:
    return Outcome(pd.DataFrame({"x": [1, 2]}), [Claim("a", True, "yes"), Claim("b", False, "no")],
                   [], notes="n", key_numbers={"best": 0.125})


def test_register_and_lookup(temp_experiment):
    temp_experiment("t-ok", _ok)
    exp = get_experiment("t-ok")
    assert exp.title == "title t-ok" and exp.paper == "test paper"
    assert exp.module == __name__
    assert "t-ok" in [e.name for e in list_experiments()]
    # re-registering the same function (module reload) is allowed
    register("t-ok", title="title t-ok", paper="test paper")(_ok)


def test_register_errors(temp_experiment):
    temp_experiment("t-taken", _ok)
    with pytest.raises(ValueError, match="already taken"):
        register("t-taken", title="x", paper="y")(lambda ctx: None)
    with pytest.raises(ValueError, match="must match"):
        register("Bad Name", title="x", paper="y")
    with pytest.raises(ValueError, match="title"):
        register("t-x", title="", paper="y")
    with pytest.raises(TypeError, match="function"):
        register("t-x", title="x", paper="y")(42)
    with pytest.raises(KeyError, match=r"known experiments: .*t-taken"):
        get_experiment("no-such-experiment")
    with pytest.raises(KeyError):
        unregister("no-such-experiment")


def test_context_and_make_context(tmp_path):
    ctx = make_context(tmp_path, device="cpu", seeds=2)
    assert ctx.seed_list(default=5) == [0, 1]
    assert make_context(tmp_path, device="cpu", full=True).seed_list(1, full_default=3) == [0, 1, 2]
    assert ctx.experiment_dir("abc").is_dir()
    with pytest.raises(ValueError, match="seeds"):
        make_context(tmp_path, device="cpu", seeds=0)


def test_outcome_type_is_checked(temp_experiment, tmp_path):
    temp_experiment("t-bad", lambda ctx: {"not": "an outcome"})
    with pytest.raises(TypeError, match="Outcome"):
        get_experiment("t-bad")(make_context(tmp_path, device="cpu"))


def test_module_status_lists_every_module():
    status = ex.module_status()
    assert set(status) == set(ex.EXPERIMENT_MODULES)
    for s in status.values():
        assert s.available or s.reason  # never silently dropped
    assert set(ex.unavailable_modules()) == {m for m, s in status.items() if not s.available}


def test_resolve_names(temp_experiment):
    temp_experiment("t-one", _ok)
    assert resolve_names(["t-one", "t-one"]) == ["t-one"]
    assert "t-one" in resolve_names([])
    assert resolve_names([__name__.rsplit(".", 1)[-1]]) == ["t-one"]  # module name expands
    with pytest.raises(ValueError, match=r"unknown experiment .nope.*t-one"):
        resolve_names(["nope"])


def test_reproduce_continues_after_error(temp_experiment, tmp_path):
    temp_experiment("t-ok", _ok)

    def boom(ctx):
        raise RuntimeError("kaboom")

    temp_experiment("t-boom", boom)
    reports = reproduce(["t-boom", "t-ok"], make_context(tmp_path, device="cpu"), echo=False,
                        unavailable={"ghost": "module does not exist"})
    assert [r.status for r in reports] == ["error", "ok"]
    assert reports[1].claims_held == (1, 2)
    assert "kaboom" in (tmp_path / "t-boom" / "error.txt").read_text()
    claims = pd.read_csv(tmp_path / "t-ok" / "claims.csv")
    assert claims["holds"].tolist() == [True, False] and "git_commit" in claims
    assert pd.read_csv(tmp_path / "t-ok" / "table.csv")["x"].tolist() == [1, 2]
    md = (tmp_path / "summary.md").read_text()
    assert "| t-ok | title t-ok | ok | 1/2 | best=0.125 |" in md
    assert "DOES NOT HOLD" in md and "kaboom" in md and "not available: module does not" in md
    again = summary_markdown(reports, {"ghost": "module does not exist"}).splitlines()
    assert again[3:] == md.splitlines()[3:]  # line 2 carries a timestamp
