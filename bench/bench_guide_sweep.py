"""Which guide should the default recipe keep? A measured sweep over autoguidance's guide (the run's own EMA weights
at a fraction of its budget), strength and guidance interval, against CFG at its own best scale.

Reads the default-recipe runs of the race (``bench/bench_vs_diffusers.py``, three seeds, trained with
``--override callbacks.model_checkpoint.every_n_train_steps=100`` so early checkpoints exist), links for each seed the
checkpoint nearest each guide fraction, then runs two ``sample.py -m`` sweeps as a user would (``judge=digits``
scores every job with every digits judge) and summarises each with ``ablate.py``:

    python sample.py -m seed=0,1,2 ckpt_path=<guides>/s${seed}/main.ckpt guidance.method=autoguidance \
        guidance.guide_ckpt=<guides>/s${seed}/f0.1.ckpt,... guidance.scale=... guidance.interval=... judge=digits
    python sample.py -m seed=0,1,2 ckpt_path=<guides>/s${seed}/main.ckpt guidance.method=cfg guidance.scale=... judge=digits

The training seed and the sampling seed are the same number, so each seed is one training run. The rule: the lowest
repo-classifier FD among arms with accuracy >= 0.99; judge 2 is reported, never used to choose.

    PYTHONPATH=. python bench/bench_guide_sweep.py [--race /tmp/difflab_race] [--out /tmp/difflab_guide_sweep] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import REPO, sweep_and_summarise  # noqa: E402

FRACTIONS = (0.1, 0.2, 0.35)
AG_SCALES = (2.0, 2.5, 3.0)
CFG_SCALES = (1.5, 2.0, 3.0)
INTERVALS = ("null", "[0.3,5.4]")  # EDM2-style band of sigma / alpha (Kynkaanniemi et al. 2024): flow t in (0.23, 0.84]
METRICS = ["eval/fd", "eval/fd_pixel", "eval/recall", "eval/accuracy", "eval/fd_judge2", "eval/recall_judge2"]


def link_guides(race: Path, out: Path, seeds: list[int]) -> None:
    """<out>/s<seed>/main.ckpt -> the run's last checkpoint; f<F>.ckpt -> its checkpoint nearest F x the final step."""
    for seed in seeds:
        ckpts = race / f"difflab_s{seed}" / "run" / "checkpoints"
        steps = {int(p.stem.split("_")[1]): p for p in ckpts.glob("step_*.ckpt")}
        final = json.loads((race / f"difflab_s{seed}" / "meta.json").read_text())["steps"]
        d = out / f"s{seed}"
        d.mkdir(parents=True, exist_ok=True)
        links = {"main.ckpt": ckpts / "last.ckpt"}
        for f in FRACTIONS:
            links[f"f{f}.ckpt"] = steps[min(steps, key=lambda s: abs(s - f * final))]
        for name, target in links.items():
            (d / name).unlink(missing_ok=True)
            (d / name).symlink_to(target)
        print(f"[guides] seed {seed}: final step {final}; " + ", ".join(f"{n} -> {t.name}" for n, t in links.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--race", type=Path, default=None, help="bench_vs_diffusers.py's --out (/tmp/difflab_race[_quick])")
    p.add_argument("--out", type=Path, default=None, help="guides and sweeps (/tmp/difflab_guide_sweep[_quick])")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--reuse", action="store_true", help="summarise existing sweeps without sampling again")
    p.add_argument("--quick", action="store_true", help="one seed, 100 samples, the first two values per axis")
    args = p.parse_args()
    suffix = "_quick" if args.quick else ""
    args.race = args.race or Path("/tmp/difflab_race" + suffix)
    args.out = args.out or Path("/tmp/difflab_guide_sweep" + suffix)
    seeds = [int(s) for s in ("0" if args.quick else args.seeds).split(",")]
    n = 100 if args.quick else args.n
    fractions, scales = (FRACTIONS[:2], AG_SCALES[:2]) if args.quick else (FRACTIONS, AG_SCALES)
    link_guides(args.race, args.out, seeds)
    guides = str(args.out)
    common = [
        f"seed={','.join(map(str, seeds))}",
        f"ckpt_path={guides}/s${{seed}}/main.ckpt",
        f"n={n}",
        "judge=digits",
    ]
    ag_sweep, cfg_sweep = args.out / "autoguidance", args.out / "cfg"
    ag = [
        sys.executable,
        str(REPO / "sample.py"),
        "-m",
        f"hydra.sweep.dir={ag_sweep}",
        *common,
        "guidance.method=autoguidance",
        "guidance.guide_ckpt=" + ",".join(f"{guides}/s${{seed}}/f{f}.ckpt" for f in fractions),
        "guidance.scale=" + ",".join(map(str, scales)),
        "guidance.interval=" + ",".join(INTERVALS),
    ]
    cfg = [
        sys.executable,
        str(REPO / "sample.py"),
        "-m",
        f"hydra.sweep.dir={cfg_sweep}",
        *common,
        "guidance.method=cfg",
        "guidance.scale=" + ",".join(map(str, CFG_SCALES[:2] if args.quick else CFG_SCALES)),
    ]
    note = [
        f"Guides: for each training seed, the EMA checkpoint nearest {', '.join(map(str, fractions))} of its final step"
        " (`<guides>/s<seed>/f<F>.ckpt`); the main model is the run's last checkpoint. Rule for the choice: the lowest "
        "`eval/fd` (the repo classifier) among arms with `eval/accuracy` >= 0.99; judge 2 is reported, never used "
        "to choose."
    ]
    sweep_and_summarise(
        "guide_sweep_cfg",
        cfg,
        cfg_sweep,
        f"guidance.scale={CFG_SCALES[1]}",
        METRICS,
        reuse=args.reuse,
        quick=args.quick,
        notes=note,
    )
    path = sweep_and_summarise(
        "guide_sweep",
        ag,
        ag_sweep,
        # the EDM2-like guess (as Hydra stores it: the interpolation escaped)
        f"guidance.guide_ckpt={guides}/s$\\{{seed\\}}/f{fractions[1]}.ckpt, guidance.scale=2.0, guidance.interval=null",
        METRICS,
        reuse=args.reuse,
        quick=args.quick,
        notes=note,
    )
    for written in (path, path.with_name(path.name.replace("guide_sweep", "guide_sweep_cfg"))):
        if written.is_file():  # the guides directory as the docstring names it, not this machine's path
            written.write_text(written.read_text().replace(guides, "<guides>"))
    print("wrote", path)


if __name__ == "__main__":
    main()
