"""Judge a digits checkpoint: `python scripts/eval_digits.py CKPT [--n 500] [--conditioning-effect]
[--trust-stored-code]`."""

import argparse
import json
import time

from difflab.checkpoints import module_from_checkpoint
from difflab.eval.digits_eval import conditioning_effect, evaluate_module
from difflab.utils.cli import run_reporting_errors

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("ckpt")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--conditioning-effect", action="store_true", help="text models: true vs shuffled prompts")
    ap.add_argument(
        "--trust-stored-code",
        action="store_true",
        help="let the checkpoint build classes outside difflab (docs/SECURITY.md): only for trusted files",
    )
    args = ap.parse_args()
    module = run_reporting_errors(module_from_checkpoint, args.ckpt, None, "cpu", args.trust_stored_code)
    t0 = time.time()
    result = evaluate_module(module, n=args.n)
    result["sampling_seconds"] = round(time.time() - t0, 1)
    if args.conditioning_effect:
        result.update(conditioning_effect(module, n=args.n))
    print(json.dumps(result, indent=2))
