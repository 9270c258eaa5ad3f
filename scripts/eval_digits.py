"""Judge a digits checkpoint: `python scripts/eval_digits.py CKPT [--n 500] [--conditioning-effect]`."""
import argparse
import json
import time

from difflab.checkpoints import module_from_checkpoint
from difflab.eval.digits_eval import conditioning_effect, evaluate_module

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("ckpt")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--conditioning-effect", action="store_true", help="text models: true vs shuffled prompts")
    args = ap.parse_args()
    module = module_from_checkpoint(args.ckpt)
    t0 = time.time()
    result = evaluate_module(module, n=args.n)
    result["sampling_seconds"] = round(time.time() - t0, 1)
    if args.conditioning_effect:
        result.update(conditioning_effect(module, n=args.n))
    print(json.dumps(result, indent=2))
