"""Judge a moving-digits text-to-video checkpoint (or the real clips) per prompt.

    python scripts/eval_moving_digits.py --ckpt <run>/checkpoints/last.ckpt [--n-per-prompt 8] [--steps 50]
        [--guidance 3] [--prompts all] [--out DIR] [--require-pass]
    python scripts/eval_moving_digits.py --real data/moving_digits_16      # the judge on real test clips

For each prompt ("the digit three moving left") the digit classifier must recognise the named digit in most
frames and most samples must move in the named direction (see src/eval/video_eval.py). Prints a table, and with
--out writes result.json, samples.npz (videos uint8 N x T x C x H x W + prompts) and videos.mp4 / videos.gif.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from difflab.eval.video_eval import (  # noqa: E402
    CROP_MODES,
    digit_geometry,
    evaluate_videos,
    format_report,
    load_real_clips,
    sample_prompts,
)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="a moving-digits text-to-video checkpoint")
    src.add_argument("--real", metavar="DATA_DIR", help="judge the real clips of a generated moving-digits folder")
    ap.add_argument("--split", default="test", help="--real: split to read (default test)")
    ap.add_argument(
        "--prompts",
        default="model",
        help="'model' (the checkpoint's grid prompts, default), 'all' (all 40 captions), or captions separated by ';'",
    )
    ap.add_argument("--n-per-prompt", type=int, default=8)
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (default: the checkpoint's sampler)")
    ap.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the checkpoint's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--crop", choices=CROP_MODES, default="bbox")
    ap.add_argument(
        "--min-travel",
        type=float,
        default=0.25,
        help="fraction of a real clip's travel a sample must move to count as moving",
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None, help="folder for result.json, samples.npz and videos.mp4/gif")
    ap.add_argument("--require-pass", action="store_true", help="exit with status 1 unless every prompt passes")
    ap.add_argument(
        "--trust-stored-code",
        action="store_true",
        help="let the checkpoint build classes outside difflab (docs/SECURITY.md): only for trusted files",
    )
    args = ap.parse_args(argv)

    t0 = time.time()
    if args.real:
        videos, prompts, params = load_real_clips(args.real, args.split)
        result = evaluate_videos(
            videos, prompts, params["digit_size"], params["canvas_size"], mode=args.crop, min_travel=args.min_travel
        )
        result["source"] = {"real": str(args.real), "split": args.split}
        samples = None
    else:
        from difflab.checkpoints import module_from_checkpoint
        from difflab.datamodules.moving_digits import DIRECTIONS, caption
        from difflab.sampling import pick_device
        from difflab.utils.cli import run_reporting_errors

        module = run_reporting_errors(module_from_checkpoint, args.ckpt, None, "cpu", args.trust_stored_code)
        module = module.to(pick_device(args.device))
        digit_size, canvas = digit_geometry(module.run_config)
        if args.prompts == "model":
            prompts = list(module.diffusion.prompts or [])
        elif args.prompts == "all":
            prompts = [caption(d, m) for m in DIRECTIONS for d in range(10)]
        else:
            prompts = [p.strip() for p in args.prompts.split(";") if p.strip()]
        if not prompts:
            ap.error("no prompts: the checkpoint has none; pass --prompts all")
        samples, raw = sample_prompts(
            module, prompts, args.n_per_prompt, args.steps, args.guidance, args.seed, args.batch_size
        )
        result = evaluate_videos(samples, raw, digit_size, canvas, mode=args.crop, min_travel=args.min_travel)
        result["source"] = {
            "ckpt": str(args.ckpt),
            "steps": args.steps or module.diffusion.sampler.keywords.get("steps"),
            "guidance": args.guidance if args.guidance is not None else module.diffusion.guidance.scale,
            "seed": args.seed,
        }
        prompts = raw
    result["seconds"] = round(time.time() - t0, 1)
    print(format_report(result))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(result, indent=2))
        if samples is not None:
            from difflab.diagnostics.video_grid import video_fps, write_sample_videos
            from difflab.video.io import to_uint8_video

            u8 = to_uint8_video(samples)  # N x T x H x W x C -> sample.py's N x T x C x H x W
            np.savez(out / "samples.npz", videos=u8.transpose(0, 1, 4, 2, 3), prompts=np.array(prompts, dtype=str))
            write_sample_videos(out, samples, prompts, fps=video_fps(module.run_config))
        print(f"wrote {out}/result.json")
    passed = result["overall"]["prompts_passed"] == result["overall"]["prompts"]
    return 0 if (passed or not args.require_pass) else 1


if __name__ == "__main__":
    sys.exit(main())
