"""Benchmark suite: the markdown plumbing of run_all / common (fast), and the cheapest scripts' --quick runs (slow)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_denoiser import BASELINE_NET, build_pair, n_params  # noqa: E402
from bench.bench_vs_diffusers import hms, paired_table  # noqa: E402
from bench.common import interleaved, md_table, median, write_result  # noqa: E402
from bench.run_all import headline, update_markdown  # noqa: E402


def test_update_markdown_replaces_only_between_markers():
    doc = "# B\n\nintro\n\n## EMA\n\n<!-- bench:ema -->\nold table\n<!-- /bench:ema -->\n\nMy interpretation.\n"
    out = update_markdown(doc, "ema", "new table", "EMA")
    assert "new table" in out and "old table" not in out
    assert out.count("<!-- bench:ema -->") == 1 and "My interpretation." in out and out.startswith("# B\n\nintro")
    # an unknown section is appended with its title, and a second update replaces it in place
    out2 = update_markdown(out, "overhead", "t1", "2. Overhead")
    assert out2.endswith("## 2. Overhead\n\n<!-- bench:overhead -->\nt1\n<!-- /bench:overhead -->\n")
    out3 = update_markdown(out2, "overhead", "t2", "2. Overhead")
    assert "t1" not in out3 and out3.count("## 2. Overhead") == 1


@pytest.mark.parametrize(
    "method,ends",
    [
        ({"teacher_steps": 16, "steps_per_round": 400, "student_steps": 1}, {400: 8, 800: 4, 1200: 2, 1600: 1}),
        ({"teacher_steps": 32, "steps_per_round": 320, "student_steps": 1}, {640: 8, 960: 4, 1280: 2, 1600: 1}),
        ({"teacher_steps": 16, "steps_per_round": 500, "student_steps": 2}, {500: 8, 1000: 4, 1500: 2}),
        (
            {"teacher_steps": 32, "steps_per_round": [160, 160, 320, 480, 480], "student_steps": 1},
            {320: 8, 640: 4, 1120: 2, 1600: 1},
        ),
    ],
)
def test_the_few_step_bench_reads_a_progressive_runs_rounds_from_its_checkpoint(method, ends, monkeypatch, tmp_path):
    """Each round's last step and the DDIM steps its student takes (8 and fewer), from the stored method config."""
    import difflab.checkpoints as checkpoints
    from bench.bench_few_step import round_ends

    monkeypatch.setattr(checkpoints, "load_checkpoint", lambda path: {"path": path})
    monkeypatch.setattr(checkpoints, "run_config", lambda ckpt, path: {"method": method})
    assert round_ends(tmp_path) == ends


def test_the_few_step_verdict_holds_a_student_to_every_judge_and_to_the_step_counts_it_lacks():
    """Within 2x at 1 step and 1.3x at 2 in every judge with accuracy >= 0.99 is met; one judge past its limit, or a
    run with no 1-step student (a progressive run that stops at 2), is not."""
    from bench.bench_few_step import verdict

    teacher = [{"fd": 2.0, "fd_judge2": 0.5, "fd_pixel": 0.6, "accuracy": 0.99}]
    one = [{"fd": 3.9, "fd_judge2": 0.9, "fd_pixel": 1.1, "accuracy": 0.995}]
    two = [{"fd": 2.5, "fd_judge2": 0.65, "fd_pixel": 0.78, "accuracy": 0.995}]
    assert verdict("x", {1: one, 2: two}, teacher).startswith("**x: met**")
    past = [{**two[0], "fd_judge2": 0.66}]  # 1.32x in judge 2's features
    assert "2-step FD judge 2 1.32x (not met)" in verdict("x", {1: one, 2: past}, teacher)
    lacking = verdict("x", {1: None, 2: two}, teacher)
    assert lacking.startswith("**x: not met**") and "1-step: no student of the run samples at 1" in lacking


def test_headline_finds_target_sentence(tmp_path):
    f = tmp_path / "x.md"
    f.write_text("# X\n\n| a |\n\nTarget framework overhead <= 5% of step time: not met (+7.0%).\n")
    assert headline(f).startswith("Target framework overhead") and "not met" in headline(f)
    assert headline(None) == "no result file"


def test_common_helpers(tmp_path, monkeypatch):
    assert md_table(["a", "b"], [[1, 2]]) == "| a | b |\n|---|---:|\n| 1 | 2 |"
    assert median([3.0, 1.0, 2.0]) == 2.0
    order = []
    out = interleaved({"x": lambda: order.append("x") or 1.0, "y": lambda: order.append("y") or 2.0}, 3)
    assert order == ["x", "y", "y", "x", "x", "y"] and out == {"x": [1.0] * 3, "y": [2.0] * 3}
    monkeypatch.setenv("DIFFLAB_BENCH_RESULTS", str(tmp_path))
    assert write_result("foo", "t", quick=True) == tmp_path / "foo_quick.md"
    assert hms(300) == "00:00:05:00" and hms(90061) == "01:01:01:01"


def test_the_guide_sweep_chooses_by_the_race_rule(tmp_path):
    """The lowest classifier-FD plus pixel-FD ratio to the flow loop wins, among arms with accuracy >= 0.99; the
    second judge is never read (an arm best only there does not win)."""
    from bench.bench_guide_sweep import choose_by_rule

    rows = {  # arm: (fd, fd_pixel, accuracy, fd_judge2)
        "a": (2.0, 0.60, 0.995, 0.40),
        "b": (2.4, 0.50, 0.992, 0.60),  # 0.24 + 0.25 = 0.49 < a's 0.20 + 0.30 = 0.50
        "c": (1.0, 0.30, 0.980, 0.30),  # best everywhere but accuracy: out
    }
    lines = ["arm,metric,n,mean,sd,ci_low,ci_high,step_min,step_max,floor"]
    for arm, values in rows.items():
        for metric, v in zip(("eval/fd", "eval/fd_pixel", "eval/accuracy", "eval/fd_judge2"), values):
            lines.append(f"{arm},{metric},3,{v},0,0,0,1,1,")
    (tmp_path / "summary.csv").write_text("\n".join(lines) + "\n")
    text = choose_by_rule([tmp_path / "summary.csv"], {"fd": 10.0, "fd_pixel": 2.0, "fd_judge2": 1.0})
    assert text.endswith("Chosen by the rule: **`b`**.")
    assert "`b`: 0.4900" in text and "`a`: 0.5000" in text and "`c`: out (accuracy 0.980)" in text


def test_the_few_step_bench_pairs_two_judged_runs_row_by_row_at_the_same_seeds(tmp_path):
    """--paired-with: a student row's difference is this run's score minus the other's at each shared seed; identical
    teacher rows are left out, differing ones are shown and flagged."""
    from types import SimpleNamespace

    from bench.bench_few_step import ablate_summary, paired_section

    keys = ("fd", "fd_judge2", "fd_pixel", "precision", "recall", "accuracy", "accuracy_judge2")

    def judged(out, student_fd, teacher_fd):
        rows = {"teacher, its own sampler (heun-10)": teacher_fd, "progressive student, DDIM-2": student_fd}
        scores = {row: [{**{k: 0.5 for k in keys}, "fd": v, "nfe": 2} for v in fds] for row, fds in rows.items()}
        ablate_summary(scores, SimpleNamespace(out=out, seeds=[0, 1, 2], n=10))

    judged(tmp_path / "a", [3.0, 2.0, 4.0], [1.0, 1.0, 1.0])
    judged(tmp_path / "b", [2.5, 2.5, 3.0], [1.0, 1.0, 1.0])
    text = paired_section(tmp_path / "a", tmp_path / "b")
    row = next(line for line in text.splitlines() if line.startswith("| progressive_ddim2 |"))
    # differences 0.5, -0.5, 1.0: mean 1/3, sd 0.764, half-width t(0.975, 2) 4.303 x 0.764 / sqrt(3) = 1.897
    assert row.startswith("| progressive_ddim2 | 0,1,2 | +0.33 [-1.56, +2.23] (p 0.53) | same in every seed |")
    assert "teacher_own" not in text and "teacher rows identical in both" in text
    judged(tmp_path / "c", [2.5, 2.5, 3.0], [1.0, 1.5, 1.0])
    flagged = paired_section(tmp_path / "a", tmp_path / "c")
    assert "| teacher_own | 0,1,2 | -0.17" in flagged and "teacher rows differ" in flagged
    one_seed = SimpleNamespace(out=tmp_path / "one", seeds=[0], n=10)
    row = [{k: 1.0 for k in keys} | {"nfe": 2}]
    ablate_summary({"teacher, its own sampler (heun-10)": row, "progressive student, DDIM-2": row}, one_seed)
    assert "shares two seeds with this run: nothing to pair" in paired_section(tmp_path / "a", tmp_path / "one")


def test_the_screens_paired_table_differences_each_arm_against_the_base_at_the_same_seeds():
    def arm(seeds, fd):
        metas = [{"seed": s} for s in seeds]
        keys = ("fd", "fd_judge2", "fd_pixel", "recall", "recall_judge2", "accuracy")
        return metas, [{k: (v if k == "fd" else 0.5) for k in keys} for v in fd]

    arms = {"base": arm([0, 1, 2], [2.0, 3.0, 4.0]), "new": arm([2, 0], [5.0, 2.5]), "none": arm([7], [1.0])}
    lines = paired_table(arms, "base")
    table = "\n".join(lines)
    assert "| new | 0,2 | 0.75 [-2.43, 3.93] | 0.00 [0.00, 0.00] |" in table  # (2.5 - 2) and (5 - 4) at seeds 0, 2
    assert "| none |" not in table and "| base |" not in table  # no shared seed / the base itself
    with pytest.raises(SystemExit, match="--paired nope"):
        paired_table(arms, "nope")


def test_matched_denoisers_have_equal_parameter_counts():
    """The matching rules of bench_denoiser give the same parameter count (to 0.1%: difflab fuses q, k, v into one
    biased linear, diffusers keeps three with slightly fewer biases) and output shape on both sides."""
    ours, theirs = build_pair(BASELINE_NET, 3, 16)
    assert abs(n_params(ours) - n_params(theirs)) <= 1e-3 * n_params(theirs)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1.0, 500.0])
    assert ours(x, t).shape == theirs(x, t).sample.shape == x.shape


@pytest.mark.slow
@pytest.mark.parametrize(
    "script,args,name",
    [
        ("bench_ema.py", ["--quick", "--repeats", "1"], "ema_quick.md"),
        ("bench_denoiser.py", ["--quick", "--no-bf16", "--steps", "1", "--repeats", "1"], "denoiser_quick.md"),
    ],
)
def test_quick_scripts_run(tmp_path, script, args, name):
    env = {**os.environ, "PYTHONPATH": str(REPO), "DIFFLAB_BENCH_RESULTS": str(tmp_path)}
    r = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    text = (tmp_path / name).read_text()
    assert re.search(r"target[^\n]*: (met|not met)", text, re.IGNORECASE), text
    assert "| ---" not in text and "|---|" in text


def test_dit_gpu_benchmark_code_path_runs_on_cpu(tmp_path):
    """bench_dit_gpu.py is meant for a GPU; --smoke runs its whole code path (FLOP count, timing, MFU table) here."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "DIFFLAB_BENCH_RESULTS": str(tmp_path)}
    r = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_dit_gpu.py"), "--smoke"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    text = (tmp_path / "dit_gpu_quick.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| DiT-T/4"))
    gflop = float(row.split("|")[7])
    assert gflop > 0  # FlopCounterMode counted the training step's matmuls


@pytest.mark.slow
def test_dit_speed_benchmark_quick_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "DIFFLAB_BENCH_RESULTS": str(tmp_path)}
    r = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_dit_speed.py"), "--quick", "--no-compile"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    text = (tmp_path / "dit_speed_quick.md").read_text()
    assert re.search(r"target[^\n]*: (met|not met)", text, re.IGNORECASE) and "activations saved" in text
