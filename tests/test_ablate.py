"""difflab-ablate (src/ablate.py, src/ablation/): statistics against scipy.stats, a synthetic partial sweep read end
to end (tables, differences, plots, --step, best arm, protocol), and the one-line errors of the CLI."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats as sps

from difflab.ablation.stats import mean_ci, paired_difference, welch_difference
from tests.helpers import ROOT

FD = "metrics/fd_digit200"
ACC = "metrics/digit_accuracy"
LOSS = "val/loss"
STEPS = (20, 40, 60, 80)
PROTOCOL = {
    "n_samples": 200,
    "feature": "digit-classifier-128",
    "weights": "/w/digits.pt",
    "weights_sha256": "0123456789ab",
    "resize": "none",
    "reference": {"dataset": "DigitsDataModule", "config": "ab12cd34", "split": "train", "n": 1024},
    "floor_metric": f"{FD}_floor",
    "eval_seed": 0,
    "sampler": "ddim(steps=8)",
    "guidance": "cfg 2.0",
}


# ------------------------------------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("n", [2, 3, 5, 17])
def test_mean_ci_matches_scipy_t_interval(n):
    x = np.random.default_rng(n).normal(3.0, 2.0, n)
    got = mean_ci(list(x))
    low, high = sps.t.interval(0.95, n - 1, loc=x.mean(), scale=sps.sem(x))
    assert got.n == n and got.mean == pytest.approx(x.mean())
    assert got.sd == pytest.approx(x.std(ddof=1))
    assert (got.low, got.high) == pytest.approx((low, high), rel=1e-9)


def test_mean_ci_of_one_value_has_no_spread():
    got = mean_ci([1.5])
    assert got.n == 1 and got.mean == 1.5 and math.isnan(got.sd) and math.isnan(got.low) and math.isnan(got.high)


@pytest.mark.parametrize("n", [2, 4, 9])
def test_paired_difference_matches_ttest_rel(n):
    rng = np.random.default_rng(10 + n)
    b = rng.normal(0, 1, n)
    a = b + rng.normal(0.4, 0.5, n)
    got = paired_difference(a, b)
    ref = sps.ttest_rel(a, b)
    ci = ref.confidence_interval(0.95)
    assert got.kind == "paired" and got.n == n
    assert got.mean == pytest.approx(np.mean(a - b))
    assert got.sd == pytest.approx(np.std(a - b, ddof=1))
    assert got.p_value == pytest.approx(ref.pvalue, rel=1e-7)
    assert (got.low, got.high) == pytest.approx((ci.low, ci.high), rel=1e-9)


@pytest.mark.parametrize("sizes", [(2, 2), (3, 2), (5, 8)])
def test_welch_difference_matches_ttest_ind(sizes):
    rng = np.random.default_rng(sum(sizes))
    a, b = rng.normal(1.0, 0.5, sizes[0]), rng.normal(0.0, 2.0, sizes[1])
    got = welch_difference(a, b)
    ref = sps.ttest_ind(a, b, equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert got.kind == "welch" and (got.n_a, got.n_b) == sizes
    assert got.mean == pytest.approx(a.mean() - b.mean())
    assert got.df == pytest.approx(ref.df)
    assert got.p_value == pytest.approx(ref.pvalue, rel=1e-7)
    assert (got.low, got.high) == pytest.approx((ci.low, ci.high), rel=1e-9)


def test_differences_refuse_too_few_values():
    with pytest.raises(ValueError):
        paired_difference([1.0], [2.0])
    with pytest.raises(ValueError):
        welch_difference([1.0, 2.0], [3.0])


# ------------------------------------------------------------------------------------------------ synthetic sweeps


def write_yaml(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(obj), encoding="utf-8")


def write_sparse_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    """CSVLogger-style file: every row has every column, cells empty where the row logged nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def make_job(
    sweep: Path,
    num: int,
    overrides: list[str],
    values: dict[str, dict[int, float]],
    *,
    last_step: int,
    finished: bool,
    eval_seed: int = 0,
    rng: np.random.Generator,
) -> None:
    """One job directory: overrides, config, a sparse metrics.csv with shuffled columns and a duplicated step (the
    earlier row must lose), protocol.json, and final_metrics.json if it finished."""
    job = sweep / str(num)
    write_yaml(job / ".hydra" / "overrides.yaml", overrides)
    seed = int(next(o for o in overrides if o.startswith("seed=")).split("=")[1])
    process = next((o.split("=")[1] for o in overrides if o.startswith("process=")), "vp")
    write_yaml(
        job / ".hydra" / "config.yaml",
        {"seed": seed, "callbacks": {"sample_metrics": {"seed": eval_seed, "n_samples": 200}}, **job_config(process)},
    )
    rows = [{"epoch": 0, "step": s, "train/loss": float(rng.uniform(0.1, 1))} for s in range(10, last_step + 1, 10)]
    for s in STEPS:
        if s > last_step:
            continue
        rows.append({"epoch": 0, "step": s, LOSS: 99.0})  # superseded by the next row of the same step
        rows.append({"epoch": 0, "step": s, LOSS: values[LOSS][s], "val_loss_t/bucket_00": 0.5})
        rows.append(
            {"epoch": 0, "step": s, FD: values[FD][s], f"{FD}_floor": 3.0, ACC: values[ACC][s], f"{FD}_std": 0.1}
        )
    columns = ["epoch", "step", "train/loss", LOSS, FD, f"{FD}_floor", ACC, f"{FD}_std", "val_loss_t/bucket_00"]
    rng.shuffle(columns)
    write_sparse_csv(job / "csv" / "metrics.csv", rows, columns)
    write_sparse_csv(job / "train.log", [], ["x"])
    protocol = {FD: {**PROTOCOL, "floor": 2.9 + 0.1 * (num % 2), "eval_seed": eval_seed}}
    (job / "metrics").mkdir(parents=True, exist_ok=True)
    (job / "metrics" / "protocol.json").write_text(json.dumps(protocol), encoding="utf-8")
    if finished:
        final = {
            "status": "completed",
            "step": last_step,
            "optimized_metric": LOSS,
            "metrics": {m: v[last_step] for m, v in values.items()},
        }
        (job / "final_metrics.json").write_text(json.dumps(final), encoding="utf-8")


def job_config(process: str) -> dict:
    """What a job's .hydra/config.yaml holds of the process and objective (as Hydra saves it: vp's process is a
    reference to the schedule group; sampling-only keys such as spacing do not change the loss)."""
    if process == "vp":
        return {
            "schedule": {
                "_target_": "difflab.diffusion.schedules.DiscreteSchedule",
                "kind": "cosine",
                "spacing": "trailing",
            },
            "process": "${schedule}",
            "objective": {"prediction": "v", "weighting": "uniform", "x0_clip": "static"},
        }
    return {
        "process": {"_target_": f"difflab.diffusion.processes.{process.upper()}Process"},
        "objective": {"prediction": process, "weighting": "uniform", "x0_clip": "static"},
    }


def random_values(rng: np.random.Generator, shift: float) -> dict[str, dict[int, float]]:
    return {
        LOSS: {s: float(rng.normal(0.3 + shift, 0.05)) for s in STEPS},
        FD: {s: float(rng.normal(6.0 + 10 * shift, 0.5)) for s in STEPS},
        ACC: {s: float(rng.uniform(0.5, 0.9)) for s in STEPS},
    }


@pytest.fixture
def partial_sweep(tmp_path):
    """`-m process=vp,edm seed=0,1,2`: job 5 (edm, seed 2) missing, job 1 (vp, seed 1) unfinished at step 40."""
    rng = np.random.default_rng(123)
    sweep = tmp_path / "multirun"
    write_yaml(
        sweep / "multirun.yaml",
        {
            "hydra": {
                "overrides": {"task": ["process=vp,edm", "seed=0,1,2", "trainer.max_steps=80"]},
                "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"},
            }
        },
    )
    values = {}
    for num, (process, seed) in enumerate((p, s) for p in ("vp", "edm") for s in (0, 1, 2)):
        if num == 5:
            continue
        values[(process, seed)] = random_values(rng, shift=0.0 if process == "vp" else 0.1)
        last = 40 if num == 1 else 80
        make_job(
            sweep,
            num,
            [f"process={process}", f"seed={seed}", "trainer.max_steps=80"],
            values[(process, seed)],
            last_step=last,
            finished=num != 1,
            rng=rng,
        )
    return sweep, values


def run_cli(argv: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    from difflab.ablate import main

    monkeypatch.setattr(sys, "argv", ["difflab-ablate", *map(str, argv)])
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def last_values(values, arm: str, metric: str, seeds, step_of=None) -> dict[int, float]:
    """The values the summary should use: each seed's value at ``step_of(seed)`` (default: the last step, 80)."""
    return {s: values[(arm, s)][metric][step_of(s) if step_of else 80] for s in seeds}


def test_partial_sweep_summary_matches_scipy(partial_sweep, monkeypatch, capsys):
    sweep, values = partial_sweep
    code, out, _ = run_cli([sweep], monkeypatch, capsys)
    assert code == 0
    result = sweep / "ablation"
    summary = {(r["arm"], r["metric"]): r for r in read_csv(result / "summary.csv")}
    assert {m for _, m in summary} == {LOSS, FD, ACC}  # floors, *_std, train/loss and val_loss_t/* not by default
    step_of = {0: 80, 1: 40, 2: 80}.get  # the unfinished job (vp, seed 1) contributes its last value (step 40)
    for arm, seeds in (("vp", (0, 1, 2)), ("edm", (0, 1))):
        for metric in (LOSS, FD, ACC):
            x = np.array(list(last_values(values, arm, metric, seeds, step_of if arm == "vp" else None).values()))
            row = summary[(f"process={arm}", metric)]
            low, high = sps.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=sps.sem(x))
            assert int(row["n"]) == len(seeds)
            assert float(row["mean"]) == pytest.approx(x.mean(), rel=1e-12)
            assert float(row["sd"]) == pytest.approx(x.std(ddof=1), rel=1e-12)
            assert (float(row["ci_low"]), float(row["ci_high"])) == pytest.approx((low, high), rel=1e-9)
    assert (summary[("process=vp", FD)]["step_min"], summary[("process=vp", FD)]["step_max"]) == ("40", "80")
    assert float(summary[("process=vp", FD)]["floor"]) == pytest.approx(np.mean([2.9, 3.0, 2.9]))
    assert summary[("process=vp", LOSS)]["floor"] == ""

    diffs = {r["metric"]: r for r in read_csv(result / "differences.csv")}
    assert set(diffs) == {FD, ACC}  # val/loss is each process's own objective: shown, not differenced
    for metric in (FD, ACC):
        a = last_values(values, "edm", metric, (0, 1))  # seed 2 of edm is missing: pairs on seeds 0 and 1 only
        b = last_values(values, "vp", metric, (0, 1), step_of)
        ref = sps.ttest_rel([a[0], a[1]], [b[0], b[1]])
        ci = ref.confidence_interval(0.95)
        row = diffs[metric]
        assert (row["arm"], row["baseline"], row["kind"], row["n"]) == ("process=edm", "process=vp", "paired", "2")
        assert float(row["mean_diff"]) == pytest.approx(np.mean([a[0] - b[0], a[1] - b[1]]), rel=1e-12)
        assert float(row["p_value"]) == pytest.approx(ref.pvalue, rel=1e-7)
        assert (float(row["ci_low"]), float(row["ci_high"])) == pytest.approx((ci.low, ci.high), rel=1e-9)

    md = (result / "summary.md").read_text()
    assert out == md
    missing_line = next(line for line in md.splitlines() if line.startswith("- missing"))
    assert "job 5 (process=edm, seed=2)" in missing_line
    unfinished_line = next(line for line in md.splitlines() if line.startswith("- unfinished"))
    assert "job 1 (process=vp, seed=1), last logged step 40" in unfinished_line
    assert "6 in the grid, 5 found, 4 finished" in md
    assert "paired: every arm was evaluated on the same noise (eval seed 0, n 200)" in md
    assert (
        f"- not compared: `{LOSS}` is a training loss in each arm's own units (process and objective), and "
        f"those differ between arms (`objective.prediction`, `process._target_`"
    ) in md
    assert "digit-classifier-128" in md and "0123456789ab" in md and "ddim(steps=8)" in md
    for metric in (LOSS, FD, ACC):
        png = result / (metric.replace("/", "_") + ".png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        import matplotlib.image

        assert matplotlib.image.imread(png).ndim == 3
    assert not list(result.glob(".*.tmp"))


def best_arm(md: str, metric: str) -> str:
    section = md.split(f"### `{metric}`")[1].split("###")[0]
    rows = [line for line in section.splitlines() if line.startswith("| process=")]
    (best,) = [r for r in rows if "**best**" in r]
    return best.split("|")[1].strip()


def test_best_arm_follows_metric_direction(partial_sweep, monkeypatch, capsys):
    sweep, _ = partial_sweep
    code, out, _ = run_cli([sweep, "--out", sweep / "report"], monkeypatch, capsys)
    assert code == 0
    summary = read_csv(sweep / "report" / "summary.csv")
    mean = {(r["arm"], r["metric"]): float(r["mean"]) for r in summary}
    for metric, pick in ((FD, min), (ACC, max)):
        expected = pick(("process=vp", "process=edm"), key=lambda arm: mean[(arm, metric)])
        assert best_arm(out, metric) == expected
    section = out.split(f"### `{LOSS}` (not compared)")[1].split("###")[0]
    assert "**best**" not in section and "not comparable across arms" in section
    assert "(higher is better)" in out.split(f"### `{ACC}`")[1].splitlines()[0]
    assert not (sweep / "ablation").exists()


def test_step_selects_values_logged_at_that_step(partial_sweep, monkeypatch, capsys):
    sweep, values = partial_sweep
    code, out, _ = run_cli([sweep, "--step", 60, "--metrics", FD, "--baseline", "process = edm"], monkeypatch, capsys)
    assert code == 0
    summary = {r["arm"]: r for r in read_csv(sweep / "ablation" / "summary.csv")}
    assert {r for r in summary} == {"process=vp", "process=edm"}
    vp = np.array([values[("vp", s)][FD][60] for s in (0, 2)])  # job 1 stopped logging at 40: left out
    assert int(summary["process=vp"]["n"]) == 2
    assert float(summary["process=vp"]["mean"]) == pytest.approx(vp.mean(), rel=1e-12)
    assert summary["process=vp"]["step_min"] == summary["process=vp"]["step_max"] == "60"
    assert "left out of `process=vp` (no value at step 60): job 1 (process=vp, seed=1)" in out
    (diff,) = read_csv(sweep / "ablation" / "differences.csv")
    assert (diff["arm"], diff["baseline"]) == ("process=vp", "process=edm")
    assert (diff["kind"], diff["n_arm"], diff["n_baseline"]) == ("welch", "2", "2")  # seeds {0, 2} vs {0, 1}: 1 pair
    edm = [values[("edm", s)][FD][60] for s in (0, 1)]
    ref = sps.ttest_ind(vp, edm, equal_var=False)
    assert float(diff["mean_diff"]) == pytest.approx(vp.mean() - np.mean(edm), rel=1e-12)
    assert float(diff["p_value"]) == pytest.approx(ref.pvalue, rel=1e-7)
    assert "unpaired (Welch)" in out


def test_sweep_without_grid_uses_keys_that_differ(tmp_path, monkeypatch, capsys):
    """An Optuna sweep: no grid, no missing points; arms from the differing override values."""
    rng = np.random.default_rng(7)
    sweep = tmp_path / "optuna"
    write_yaml(
        sweep / "multirun.yaml",
        {
            "hydra": {
                "overrides": {"task": []},
                "sweeper": {
                    "_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper",
                    "params": {"lr": "interval(0.0001, 0.01)"},
                },
            }
        },
    )
    jobs = [("0.001", 0), ("0.001", 1), ("0.003", 2)]
    for num, (lr, seed) in enumerate(jobs):
        make_job(
            sweep,
            num,
            [f"lr={lr}", f"seed={seed}"],
            random_values(rng, 0.0),
            last_step=80,
            finished=True,
            eval_seed=num,
            rng=rng,
        )
    code, out, _ = run_cli([sweep, "--metrics", LOSS], monkeypatch, capsys)
    assert code == 0
    assert "Optuna" in out and "missing" not in out
    arms = [r["arm"] for r in read_csv(sweep / "ablation" / "summary.csv")]
    assert arms == ["lr=0.001", "lr=0.003"]
    assert "differences are not paired by evaluation noise" in out
    assert read_csv(sweep / "ablation" / "differences.csv") == []  # 2 jobs vs 1: no estimate
    assert "too few to estimate" in out


# ------------------------------------------------------------------------------------------------------- CLI errors


def assert_one_error_line(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_errors_are_one_line_with_status_2(partial_sweep, tmp_path, monkeypatch, capsys):
    sweep, _ = partial_sweep
    empty = tmp_path / "not_a_sweep"
    empty.mkdir()
    assert_one_error_line(
        *run_cli([empty], monkeypatch, capsys)[::2],
        "not a Hydra multirun directory",
        "multirun.yaml",
        "python train.py -m",
    )
    assert_one_error_line(*run_cli([tmp_path / "nope"], monkeypatch, capsys)[::2], "does not exist")
    assert_one_error_line(
        *run_cli([sweep, "--metrics", "metrics/fid"], monkeypatch, capsys)[::2], "metrics/fid", FD, LOSS
    )
    assert_one_error_line(
        *run_cli([sweep, "--baseline", "process=flow"], monkeypatch, capsys)[::2],
        "process=flow",
        "'process=vp'",
        "'process=edm'",
    )
    assert_one_error_line(*run_cli([sweep, "--step", 55], monkeypatch, capsys)[::2], "--step 55", "20, 40, 60, 80")
    silent = tmp_path / "silent"
    write_yaml(silent / "multirun.yaml", {"hydra": {"overrides": {"task": ["seed=0,1"]}}})
    write_yaml(silent / "0" / ".hydra" / "overrides.yaml", ["seed=0"])
    assert_one_error_line(*run_cli([silent], monkeypatch, capsys)[::2], "logged any metric")
    assert not (sweep / "ablation").exists()


def test_shim_and_light_import():
    """`python ablate.py` runs the command, and importing the module loads neither torch nor Lightning."""
    code = (
        "import sys, difflab.ablate; "
        "print([m for m in ('torch', 'lightning', 'matplotlib', 'scipy') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True).stdout
    assert out.strip() == "[]"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "ablate.py"), "/nonexistent/sweep"], capture_output=True, text=True, cwd=ROOT
    )
    assert_one_error_line(proc.returncode, proc.stderr, "does not exist")


# ------------------------------------------------------------------------------- comparable metrics, many arms, power


def three_process_sweep(
    tmp_path: Path, protocol_change: dict | None = None, key: str = "process", values=("vp", "edm", "flow")
) -> Path:
    """``-m <key>=a,b,c seed=0,1,2``, all finished; ``protocol_change`` edits the FD protocol of the last arm."""
    rng = np.random.default_rng(5)
    sweep = tmp_path / "sweep"
    write_yaml(sweep / "multirun.yaml", {"hydra": {"overrides": {"task": [f"{key}={','.join(values)}", "seed=0,1,2"]}}})
    num = 0
    for i, value in enumerate(values):
        for seed in (0, 1, 2):
            overrides = [f"{key}={value}", f"seed={seed}"]
            make_job(sweep, num, overrides, random_values(rng, 0.1 * i), last_step=80, finished=True, rng=rng)
            if protocol_change and i == len(values) - 1:
                path = sweep / str(num) / "metrics" / "protocol.json"
                protocol = json.loads(path.read_text())
                protocol[FD].update(protocol_change)
                path.write_text(json.dumps(protocol))
            num += 1
    return sweep


def test_holm_matches_a_hand_computed_table():
    from difflab.ablation.stats import holm

    # sorted 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> kept at 0.06 (monotone)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02], rel=1e-12)
    assert holm([0.9, 0.6]) == [1.0, 1.0]  # capped at 1
    adjusted = holm([0.5, math.nan, 0.4])  # NaN is no comparison: m = 2
    assert adjusted[0] == pytest.approx(0.8) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.8)
    assert holm([0.02]) == [0.02]


@pytest.mark.parametrize("df", [2, 4, 9, 40])  # scipy.stats.nct returns NaN for the lower tail at df 1
def test_power_and_detectable_difference_match_scipy_noncentral_t(df):
    from difflab.ablation.stats import detectable_difference, t_test_power

    se = 0.7
    crit = sps.t.ppf(0.975, df)
    for delta in (0.05, 0.9, 3.0, -2.0):
        nc = abs(delta) / se
        reference = sps.nct.sf(crit, df, nc) + sps.nct.cdf(-crit, df, nc)
        assert t_test_power(delta, se, df) == pytest.approx(reference, abs=1e-6)
    d = detectable_difference(se, df)
    assert sps.nct.sf(crit, df, d / se) + sps.nct.cdf(-crit, df, d / se) == pytest.approx(0.8, abs=1e-6)


@pytest.mark.parametrize("design", ["paired", "welch"])
def test_seeds_needed_is_the_smallest_count_reaching_80_percent_power(design):
    from difflab.ablation.stats import paired_design, seeds_needed, welch_design

    delta = 1.3
    if design == "paired":
        make = lambda n: paired_design(1.7, n)  # noqa: E731
    else:
        make = lambda n: welch_design(1.0, 2.5, n, n)  # noqa: E731

    def scipy_power(n):
        se, df = make(n)
        crit = sps.t.ppf(0.975, df)
        return sps.nct.sf(crit, df, delta / se) + sps.nct.cdf(-crit, df, delta / se)

    n = seeds_needed(delta, make)
    assert n is not None and n > 2
    assert scipy_power(n) >= 0.8 - 1e-9 and scipy_power(n - 1) < 0.8
    assert seeds_needed(1e-6, make, most=50) is None


def test_a_process_sweep_does_not_rank_val_loss_but_ranks_sample_metrics(tmp_path, monkeypatch, capsys):
    sweep = three_process_sweep(tmp_path)
    code, out, _ = run_cli([sweep, "--metrics", LOSS, FD], monkeypatch, capsys)  # named explicitly: same line
    assert code == 0
    assert "not comparable across arms:** `val/loss` is a training loss in each arm's own units" in out
    diffs = read_csv(sweep / "ablation" / "differences.csv")
    assert {d["metric"] for d in diffs} == {FD} and len(diffs) == 2
    # three arms: two comparisons, Holm-adjusted, both p-values shown
    from difflab.ablation.stats import holm

    assert [float(d["p_holm"]) for d in diffs] == pytest.approx(holm([float(d["p_value"]) for d in diffs]))
    assert "p (Holm)" in out and "Holm-adjusted over 2 comparisons" in out
    assert "**best**" in out.split(f"### `{FD}`")[1].split("##")[0]


def test_a_sweep_of_the_learning_rate_ranks_val_loss(tmp_path, monkeypatch, capsys):
    sweep = three_process_sweep(tmp_path, key="model.lr", values=("1e-4", "2e-4", "4e-4"))
    code, out, _ = run_cli([sweep, "--metrics", LOSS], monkeypatch, capsys)
    assert code == 0 and "not compared" not in out
    assert len(read_csv(sweep / "ablation" / "differences.csv")) == 2
    assert "**best**" in out


def test_sample_metrics_measured_differently_are_not_ranked(tmp_path, monkeypatch, capsys):
    sweep = three_process_sweep(tmp_path, protocol_change={"n_samples": 500})
    code, out, _ = run_cli([sweep, "--metrics", FD], monkeypatch, capsys)
    assert code == 0
    assert (
        f"`{FD}` was measured differently in different arms (n_samples 200 (process=vp) vs 200 (process=edm) "
        f"vs 500 (process=flow))"
    ) in out
    assert read_csv(sweep / "ablation" / "differences.csv") == []
    # a sampler that differs because the sweep swept it is the treatment, not a measurement difference
    swept = three_process_sweep(
        tmp_path / "s",
        protocol_change={"sampler": "heun(steps=10)"},
        key="callbacks.sample_metrics.sampler",
        values=("ddim", "euler", "heun"),
    )
    code, out, _ = run_cli([swept, "--metrics", FD], monkeypatch, capsys)
    assert code == 0 and "not compared" not in out
    unswept = three_process_sweep(
        tmp_path / "u", protocol_change={"sampler": "heun(steps=10)"}, key="model.lr", values=("1", "2", "3")
    )
    code, out, _ = run_cli([unswept, "--metrics", FD], monkeypatch, capsys)
    assert code == 0 and "measured differently" in out and "sampler" in out


def test_verdicts_read_as_sentences_and_detect_sizes_the_sweep(tmp_path, monkeypatch, capsys):
    import re

    from difflab.ablation.stats import paired_design, seeds_needed

    sweep = three_process_sweep(tmp_path)
    code, out, _ = run_cli([sweep, "--metrics", FD, "--detect", "5%"], monkeypatch, capsys)
    assert code == 0
    verdicts = out.split("## Verdicts")[1].strip().splitlines()
    assert len(verdicts) == 2
    pattern = (
        r"- `process=(edm|flow)` is (lower|higher) in `metrics/fd_digit200` than `process=vp` by [\d.e-]+ "
        r"\[-?[\d.e-]+, -?[\d.e-]+\] \((better|worse)\), p = [^,]+ \(Holm-adjusted over 2 comparisons; "
        r"unadjusted [^)]+\), (resolved with 3 seeds\.|not resolved with 3 seeds.*\.)$"
    )
    for line in verdicts:
        assert re.match(pattern, line), line
    diffs = read_csv(sweep / "ablation" / "differences.csv")
    baseline = [
        r for r in read_csv(sweep / "ablation" / "summary.csv") if r["arm"] == "process=vp" and r["metric"] == FD
    ][0]
    for d in diffs:
        target = 0.05 * abs(float(baseline["mean"]))
        assert float(d["target"]) == pytest.approx(target, rel=1e-12)
        expected = seeds_needed(target, lambda n, sd=float(d["sd"]): paired_design(sd, n))
        assert d["seeds_for_target"] == ("" if expected is None else str(expected))
    code, _, err = run_cli([sweep, "--detect", "lots"], monkeypatch, capsys)
    assert_one_error_line(code, err, "--detect 'lots'", "5%")
