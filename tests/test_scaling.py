"""minilm.scaling: the fit recovers known constants, its intervals hold them, the grid resumes, the report is whole."""

from __future__ import annotations

import json

import numpy as np
import pytest

from minilm import scaling

TRUTH = dict(E=2.0, A=30.0, B=100.0, alpha=0.3, beta=0.3)
N_GRID = np.repeat(np.geomspace(1e4, 1e6, 4), 3)
D_GRID = np.tile(np.geomspace(1e5, 1e6, 3), 4)


def test_fit_recovers_known_constants():
    L = scaling.synthetic_runs(TRUTH, N_GRID, D_GRID, noise=0.002, seed=1)
    fit = scaling.fit_law(N_GRID, D_GRID, L)
    for k in ("alpha", "beta"):
        assert fit[k] == pytest.approx(TRUTH[k], abs=0.03), k
    assert fit["E"] == pytest.approx(TRUTH["E"], rel=0.1)
    new = (3e6, 3e6)  # outside the grid: the law, not an interpolation
    assert scaling.predict_loss(fit, *new) == pytest.approx(scaling.predict_loss(TRUTH, *new), rel=0.01)


def test_fit_is_exact_without_noise():
    L = scaling.predict_loss(TRUTH, N_GRID, D_GRID)
    fit = scaling.fit_law(N_GRID, D_GRID, L)
    for k in scaling.CONSTANTS:
        assert fit[k] == pytest.approx(TRUTH[k], rel=0.02), k


def test_bootstrap_intervals_contain_the_truth():
    # A 5 x 4 grid: with 12 runs the percentile intervals of five constants are too tight to cover all of them.
    N, D = np.repeat(np.geomspace(1e4, 1e6, 5), 4), np.tile(np.geomspace(1e5, 1e6, 4), 5)
    L = scaling.synthetic_runs(TRUTH, N, D, noise=0.003, seed=2)
    point = scaling.fit_law(N, D, L)
    boots = scaling.bootstrap(N, D, L, n_boot=60, seed=0)
    table = scaling.constants_with_intervals(point, boots)
    for k in scaling.CONSTANTS:
        lo, hi = table[k]["interval"]
        assert lo <= TRUTH[k] <= hi, (k, lo, hi)
        assert lo < hi
    p = scaling.prediction(point, boots, 2e6, 2e6)
    assert p["interval"][0] <= scaling.predict_loss(TRUTH, 2e6, 2e6) <= p["interval"][1]


def test_a_fit_without_the_data_term_is_told_apart():
    """Fitting L(N) alone absorbs B/D^beta into E: its predictions miss as D changes and its residuals are large."""
    L = scaling.synthetic_runs(TRUTH, N_GRID, D_GRID, noise=0.002, seed=3)
    full, n_only = scaling.fit_law(N_GRID, D_GRID, L), scaling.fit_loss_of_n(N_GRID, L)
    rms = {name: float(np.sqrt(np.mean((np.log(scaling.predict_loss(f, N_GRID, D_GRID)) - np.log(L)) ** 2)))
           for name, f in (("full", full), ("n_only", n_only))}
    assert rms["n_only"] > 10 * rms["full"]
    # At a fixed N, more data must lower the loss; the N-only fit cannot say so.
    d_effect = [scaling.predict_loss(f, 1e5, 1e5) - scaling.predict_loss(f, 1e5, 1e7) for f in (full, n_only)]
    assert d_effect[0] > 0.5 and d_effect[1] == 0


def test_fit_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 5 runs"):
        scaling.fit_law([1e4, 1e5], [1e5, 1e5], [3.0, 2.5])
    with pytest.raises(ValueError, match="positive"):
        scaling.fit_law(N_GRID, D_GRID, -np.ones_like(N_GRID))


def test_isoflop_finds_the_vertex_of_a_known_profile():
    runs = []
    for budget in (1e12, 4e12):
        for n in np.geomspace(1e4, 1e6, 5):
            d = budget / (6 * n)
            runs.append({"budget": budget, "N": n, "D": d, "flops": budget,
                         "loss": float(scaling.predict_loss(TRUTH, n, d))})
    iso = scaling.isoflop(runs)
    for lv in iso["levels"]:
        ns = np.geomspace(1e4, 1e6, 2000)
        best = ns[np.argmin(scaling.predict_loss(TRUTH, ns, lv["flops"] / (6 * ns)))]
        assert lv["inside"]
        assert lv["N_opt"] == pytest.approx(best, rel=0.15)
    # Chinchilla's closed form with equal exponents: N_opt grows as C^(beta / (alpha + beta)) = C^0.5.
    assert iso["N_opt_exponent"] == pytest.approx(0.5, abs=0.08)


def test_shape_counts_match_the_real_model():
    from minilm.config import get_preset
    from minilm.model import GPT

    m = get_preset("tiny").model
    m.n_layer, m.n_head, m.n_embd = 2, 4, 64
    model = GPT(m)
    n, fpt = scaling.shape_counts(2, 4, 64, vocab_size=m.vocab_size, block_size=m.block_size)
    assert n == model.num_params() - 2 * m.vocab_size * m.n_embd  # untied: embedding and head
    assert fpt == model.flops_per_token()


def test_compute_optimal_grows_with_budget():
    small, big = (scaling.compute_optimal(TRUTH, c) for c in (1e13, 1e16))
    assert big["N"] > small["N"] and big["D"] > small["D"] and big["loss"] < small["loss"]


GRID_ARGS = ["--sizes=1:2:16,1:2:32,2:2:32", "--budgets=2e9,4e9", "--held_out=2:2:48:8e9", "--n_boot=10",
             "--train_args=--block_size=32 --batch_size=4 --final_eval=true"]


def test_grid_runs_fits_writes_and_resumes(tiny_data_dir, tmp_path, capsys):
    out, docs = tmp_path / "runs", tmp_path / "docs"
    argv = [f"--data_dir={tiny_data_dir}", f"--out_dir={out}", f"--docs={docs}", *GRID_ARGS]
    assert scaling.main(argv) == 0
    report = json.loads((docs / "scaling.json").read_text())
    assert len(report["runs"]) == 6
    for r in report["runs"]:
        assert {"N", "D", "flops", "loss", "wall_s"} <= set(r) and r["loss"] > 0 and r["wall_s"] > 0
    for k in scaling.CONSTANTS:
        lo, hi = report[k]["interval"]
        assert lo <= hi
    held = report["held_out"]
    assert held["larger_than_fit"] == {"N": True, "flops": True}
    assert "measured" in held and isinstance(held["inside_interval"], bool)
    assert set(report["compute_optimal"]) == {"cpu_5min", "t4_4h_low", "t4_4h_high"}
    assert report["mini_lm"]["perplexity_target_tokens"] > 1
    assert (docs / "scaling.png").stat().st_size > 0 and "held-out" in (docs / "scaling.md").read_text()
    # The second time every run is skipped: nothing trains, result files stay as they were.
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/result.json")}
    capsys.readouterr()
    assert scaling.main(argv) == 0
    assert capsys.readouterr().out.count("already done: skipped") == 6
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/result.json")} == stamps
    again = json.loads((docs / "scaling.json").read_text())["held_out"]
    assert again["measured"] == held["measured"] and again["predicted"] == held["predicted"]
    assert again["predicted_at"] == held["predicted_at"]  # the blind prediction is kept, not remade


def test_a_run_dir_of_another_run_is_refused(tiny_data_dir, tmp_path):
    spec = scaling.Spec("p", 1, 2, 16, 10, 1e9)
    extra = ["--block_size=32", "--batch_size=4"]
    scaling.run_point(spec, str(tiny_data_dir), tmp_path, extra)
    other = scaling.Spec("p", 1, 2, 16, 12, 1e9)
    with pytest.raises(SystemExit, match="holds a different run"):
        scaling.run_point(other, str(tiny_data_dir), tmp_path, extra)


def test_a_run_cut_short_resumes_from_its_checkpoint(tiny_data_dir, tmp_path):
    spec = scaling.Spec("p", 1, 2, 16, 20, 1e9)
    extra = ["--block_size=32", "--batch_size=4"]
    first = scaling.run_point(spec, str(tiny_data_dir), tmp_path, extra)
    (tmp_path / "p" / "result.json").unlink()  # as if killed after the last checkpoint, before the result
    again = scaling.run_point(spec, str(tiny_data_dir), tmp_path, extra)
    assert again["resumed"] and not first["resumed"]
    assert again["D"] == first["D"]
    assert again["loss"] == pytest.approx(first["loss"], abs=1e-6)


# ----------------------------------------------------------------------------- the notebook's self-check


def test_check_passes_the_course_solution_and_fails_a_fit_without_the_data_term(capsys):
    from course import check
    from course.solutions import my_fit_law

    assert check.scaling_fit(my_fit_law, seed=5, log=False)
    r = check.scaling_fit(lambda N, D, L: scaling.fit_loss_of_n(N, L), seed=5, log=False)
    assert not r and "do not change with D" in r.message


def test_check_fails_plausible_bugs(capsys):
    from course import check
    from course.solutions import my_fit_law

    def swapped(N, D, L):  # N and D exchanged
        return my_fit_law(D, N, L)

    def one_start(N, D, L):  # a single poor start: stuck far from the optimum
        from scipy.optimize import minimize

        lN, lD, lL = np.log(N), np.log(D), np.log(L)
        res = minimize(lambda t: np.sum((np.logaddexp(np.logaddexp(t[0] - t[3] * lN, t[1] - t[4] * lD), t[2])
                                         - lL) ** 2), [25.0, 25.0, -1.0, 2.0, 2.0], method="L-BFGS-B",
                       options={"maxiter": 5})
        a, b, e, alpha, beta = res.x
        return {"E": np.exp(e), "A": np.exp(a), "B": np.exp(b), "alpha": alpha, "beta": beta}

    for bad in (swapped, one_start, lambda N, D, L: {"E": 1.0}):
        assert not check.scaling_fit(bad, seed=5, log=False)


def test_check_says_not_implemented_for_a_stub_and_flags_the_reference(capsys):
    from course import check

    def stub(N, D, L):
        raise NotImplementedError("not yet")

    r = check.scaling_fit(stub, log=False)
    assert r.not_implemented and not r
    r = check.scaling_fit(lambda N, D, L: scaling.fit_law(N, D, L), seed=1, log=False)
    assert r and r.uses_reference
