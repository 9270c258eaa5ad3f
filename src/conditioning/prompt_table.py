"""Precomputed text-encoder outputs for a fixed prompt set (class prompts, a dataset's captions).

A table file (``.pt``, loadable with ``torch.load(weights_only=True)``) holds plain tensors and metadata:
``tokens`` (N x L x D float32), ``mask`` (N x L bool), ``pooled`` (N x D float32), ``prompts`` (the N unique prompts,
sorted) and ``meta`` (encoder name / source / fingerprint / config hash, prompt-set sha256, max_length, ...).
Loading refuses a stale table (other encoder, other prompt set, other max_length) with a one-line ConfigError.

Command line (this module is the entry point; there is no separate script)::

    python -m difflab.conditioning.prompt_table build --encoder minilm --dataset cifar10 --out tables/cifar10_minilm.pt
    python -m difflab.conditioning.prompt_table build --encoder PATH --prompts-file prompts.txt --out table.pt
    python -m difflab.conditioning.prompt_table verify tables/cifar10_minilm.pt [--encoder NAME] [--threshold 0.999]
    python -m difflab.conditioning.prompt_table info tables/cifar10_minilm.pt

``verify`` re-encodes every prompt with the encoder, prints the minimum cosine similarity (tokens and pooled, over
all prompts) and exits 1 when it is below the threshold (2 on a configuration error).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from difflab.ops.atomic import atomic_torch_save
from difflab.utils.errors import ConfigError

FORMAT_VERSION = 1
DEFAULT_THRESHOLD = 0.999


def unique_prompts(prompts) -> list[str]:
    """The prompt set a table stores: unique prompts, sorted (so order and duplicates do not make a table stale)."""
    from difflab.conditioning.text_encoders import check_prompts

    return sorted(set(check_prompts(prompts)))


def prompts_sha256(prompts) -> str:
    """sha256 of the prompt set (unique, sorted, JSON-encoded)."""
    blob = json.dumps(unique_prompts(prompts), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class PromptTable:
    """Lookup of precomputed ``(tokens, mask, pooled)`` rows by prompt string (tensors stay on CPU).

    Immutable; ``copy.deepcopy`` returns the same object so an EMA copy of a model does not duplicate it.
    """

    def __init__(
        self,
        prompts: list[str],
        tokens: torch.Tensor,
        mask: torch.Tensor,
        pooled: torch.Tensor,
        meta: dict,
        path: str | None = None,
    ):
        n = len(prompts)
        if not (tokens.shape[0] == mask.shape[0] == pooled.shape[0] == n) or tokens.shape[:2] != mask.shape:
            raise ConfigError(
                f"prompt table {path or '<memory>'} is inconsistent: {n} prompts, tokens "
                f"{tuple(tokens.shape)}, mask {tuple(mask.shape)}, pooled {tuple(pooled.shape)}: "
                "rebuild it"
            )
        self.prompts = list(prompts)
        self.tokens, self.mask, self.pooled = tokens, mask.bool(), pooled
        self.meta = dict(meta)
        self.path = path
        self.index = {p: i for i, p in enumerate(self.prompts)}

    def __len__(self) -> int:
        return len(self.prompts)

    def __contains__(self, prompt: str) -> bool:
        return prompt in self.index

    def __deepcopy__(self, memo):
        return self

    @property
    def max_length(self) -> int:
        return int(self.tokens.shape[1])

    def lookup(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows for ``prompts`` (all must be in the table): ``(tokens, mask, pooled)`` on CPU."""
        missing = [p for p in prompts if p not in self.index]
        if missing:
            raise KeyError(f"prompt {missing[0]!r} is not in prompt table {self.path or '<memory>'}")
        idx = torch.tensor([self.index[p] for p in prompts], dtype=torch.long)
        return self.tokens.index_select(0, idx), self.mask.index_select(0, idx), self.pooled.index_select(0, idx)

    def to_dict(self) -> dict:
        """Plain-tensor payload saved to disk."""
        return {
            "format": FORMAT_VERSION,
            "prompts": self.prompts,
            "tokens": self.tokens,
            "mask": self.mask,
            "pooled": self.pooled,
            "meta": self.meta,
        }


def encode_prompts(encoder, prompts: list[str], batch_size: int = 128) -> tuple[torch.Tensor, ...]:
    """Encode prompts in chunks with ``encoder`` (a TextEncoder); returns float32 CPU ``(tokens, mask, pooled)``."""
    toks, masks, pooled = [], [], []
    for i in range(0, len(prompts), batch_size):
        t, m, p = encoder(prompts[i : i + batch_size])
        toks.append(t.float().cpu())
        masks.append(m.bool().cpu())
        pooled.append(p.float().cpu())
    if not toks:
        raise ConfigError("cannot build a prompt table from an empty prompt list")
    return torch.cat(toks), torch.cat(masks), torch.cat(pooled)


def encoder_meta(encoder) -> dict:
    """Metadata that identifies the encoder and its settings (stored in every table)."""
    import transformers

    return {
        "encoder_name": encoder.name,
        "encoder_source": encoder.source,
        "encoder_kind": encoder.kind,
        "encoder_fingerprint": encoder.fingerprint(),
        "encoder_config_sha256": encoder.config_sha256(),
        "max_length": encoder.max_length,
        "hidden_size": encoder.hidden_size,
        "transformers_version": transformers.__version__,
    }


def save_prompt_table(table: PromptTable, path: str | os.PathLike) -> Path:
    """Write the table atomically (temp file + rename: safe when several DDP ranks write the same file).

    The file gets the umask's permissions (``0o666 & ~umask``), so tables can be shared between users and jobs.
    """
    path = atomic_torch_save(table.to_dict(), path)
    table.path = str(path)
    return path


def build_prompt_table(encoder, prompts, path: str | os.PathLike | None = None, batch_size: int = 128) -> PromptTable:
    """Encode the unique prompts once and return the table; also save it to ``path`` when given."""
    uniq = unique_prompts(prompts)
    tokens, mask, pooled = encode_prompts(encoder, uniq, batch_size)
    meta = encoder_meta(encoder)
    meta.update(
        prompts_sha256=prompts_sha256(uniq),
        num_prompts=len(uniq),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    table = PromptTable(uniq, tokens, mask, pooled, meta)
    if path is not None:
        save_prompt_table(table, path)
    return table


def _rebuild_hint(path, meta: dict) -> str:
    enc = meta.get("encoder_name", "ENCODER")
    return (
        f"delete it to rebuild automatically, or run "
        f"`python -m difflab.conditioning.prompt_table build --encoder {enc} --out {path} ...`"
    )


def read_prompt_table(path: str | os.PathLike) -> PromptTable:
    """Load a table file without staleness checks (ConfigError naming the file if missing or unreadable)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"prompt table {path} does not exist: build it with "
            f"`python -m difflab.conditioning.prompt_table build --encoder NAME --out {path} ...`"
        )
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise ConfigError(f"prompt table {path} cannot be read ({type(e).__name__}): delete and rebuild it") from None
    keys = {"format", "prompts", "tokens", "mask", "pooled", "meta"}
    if not isinstance(data, dict) or not keys <= set(data):
        raise ConfigError(f"prompt table {path} is not a difflab prompt table (needs keys {sorted(keys)}): rebuild it")
    if data["format"] != FORMAT_VERSION:
        raise ConfigError(
            f"prompt table {path} has format {data['format']}, this code reads {FORMAT_VERSION}: "
            + _rebuild_hint(path, data["meta"])
        )
    return PromptTable(data["prompts"], data["tokens"], data["mask"], data["pooled"], data["meta"], str(path))


def load_prompt_table(
    path: str | os.PathLike,
    encoder_name: str | None = None,
    prompts=None,
    max_length: int | None = None,
    encoder_fingerprint: str | None = None,
) -> PromptTable:
    """Load a table and refuse it when stale: other encoder, other prompt set or other max_length.

    The encoder matches when its fingerprint (weights + config) equals the stored one if ``encoder_fingerprint`` is
    given, else when the names match (aliases such as ``minilm`` are canonicalised first).
    """
    from difflab.conditioning.text_encoders import resolve_encoder

    table = read_prompt_table(path)
    meta = table.meta
    hint = _rebuild_hint(path, meta)
    stored_fp = meta.get("encoder_fingerprint")
    if encoder_fingerprint is not None and stored_fp is not None:
        if encoder_fingerprint != stored_fp:
            raise ConfigError(
                f"prompt table {path} is stale: built with encoder '{meta.get('encoder_name')}' whose "
                f"weights/config differ from the current encoder's; {hint}"
            )
    elif encoder_name is not None:
        try:
            wanted = resolve_encoder(encoder_name)[0]
        except ConfigError:
            wanted = str(encoder_name)
        if wanted != meta.get("encoder_name"):
            raise ConfigError(
                f"prompt table {path} is stale: built with encoder '{meta.get('encoder_name')}', "
                f"current encoder is '{wanted}'; {hint}"
            )
    if max_length is not None and int(max_length) != table.max_length:
        raise ConfigError(
            f"prompt table {path} is stale: built with max_length={table.max_length}, current "
            f"max_length={max_length}; {hint}"
        )
    if prompts is not None:
        want = unique_prompts(prompts)
        if prompts_sha256(want) != meta.get("prompts_sha256"):
            have = set(table.prompts)
            missing = [p for p in want if p not in have]
            extra = [p for p in table.prompts if p not in set(want)]
            example = f" (e.g. missing {missing[0]!r})" if missing else (f" (e.g. extra {extra[0]!r})" if extra else "")
            raise ConfigError(
                f"prompt table {path} is stale: its prompt set differs from the current one "
                f"({len(missing)} missing, {len(extra)} extra{example}); {hint}"
            )
    return table


def _cosine_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity per row of two ``N x K`` float64 matrices (0 when a row is all zeros)."""
    a, b = a.double(), b.double()
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-30)


def table_cosines(table: PromptTable, encoder, batch_size: int = 128) -> torch.Tensor:
    """Per-prompt agreement between stored rows and a fresh encoding: min of token and pooled cosine (N,).

    Token cosine uses only positions that are real tokens in the fresh mask; a prompt whose mask differs gets -1.
    """
    tokens, mask, pooled = encode_prompts(encoder, table.prompts, batch_size)
    if tokens.shape != table.tokens.shape:
        raise ConfigError(
            f"prompt table {table.path or '<memory>'} has tokens {tuple(table.tokens.shape)} but the "
            f"encoder gives {tuple(tokens.shape)}: wrong encoder or max_length"
        )
    w = mask.unsqueeze(-1).double()
    tok_cos = _cosine_rows((table.tokens.double() * w).flatten(1), (tokens.double() * w).flatten(1))
    pool_cos = _cosine_rows(table.pooled, pooled)
    cos = torch.minimum(tok_cos, pool_cos)
    cos[(mask != table.mask).any(1)] = -1.0
    return cos


def verify_prompt_table(table_or_path, encoder, threshold: float = DEFAULT_THRESHOLD) -> float:
    """Re-encode the table's prompts and return the minimum cosine; ConfigError when it is below ``threshold``."""
    table = table_or_path if isinstance(table_or_path, PromptTable) else read_prompt_table(table_or_path)
    cos = table_cosines(table, encoder)
    worst = int(cos.argmin())
    min_cos = float(cos[worst])
    if min_cos < threshold:
        raise ConfigError(
            f"prompt table {table.path or '<memory>'} does not match encoder '{encoder.name}': "
            f"min cosine {min_cos:.6f} < {threshold} (worst prompt {table.prompts[worst]!r}); "
            + _rebuild_hint(table.path or "TABLE.pt", table.meta)
        )
    return min_cos


# ----------------------------------------------------------------------------------------------------- command line
def _prompts_from_args(args) -> list[str]:
    from difflab.conditioning.templates import class_prompts

    if args.prompts_file:
        lines = Path(args.prompts_file).read_text(encoding="utf-8").splitlines()
        return [ln.strip() for ln in lines if ln.strip()] + ([""] if args.with_null else [])
    if args.dataset:
        classes = args.classes.split(",") if args.classes else None
        return class_prompts(args.dataset, classes, args.template) + ([""] if args.with_null else [])
    raise ConfigError("build needs --prompts-file FILE (one prompt per line) or --dataset NAME")


def main(argv: list[str] | None = None) -> int:
    """CLI: ``build`` / ``verify`` / ``info`` (see the module docstring). Returns the exit status."""
    from difflab.conditioning.text_encoders import load_text_encoder

    ap = argparse.ArgumentParser(prog="python -m difflab.conditioning.prompt_table", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="encode a prompt set and save a table")
    b.add_argument("--encoder", required=True, help="Hub id, local directory or `minilm`")
    b.add_argument("--out", required=True)
    b.add_argument("--prompts-file", help="text file, one prompt per line")
    b.add_argument("--dataset", help="class-prompt templates of a dataset (digits, mnist, cifar10, cifar100, stl10)")
    b.add_argument("--classes", help="comma-separated class names (default: the dataset's standard names)")
    b.add_argument("--template", help="prompt template, e.g. 'a photo of {a} {name}'")
    b.add_argument("--no-null", dest="with_null", action="store_false", help="do not add the empty (null) prompt")
    b.add_argument("--kind", default="auto")
    b.add_argument("--max-length", type=int, default=None)
    b.add_argument("--device", default=None, help="e.g. cuda (default: cuda if available)")
    v = sub.add_parser("verify", help="re-encode a table's prompts and compare (exit 1 below threshold)")
    v.add_argument("table")
    v.add_argument("--encoder", default=None, help="default: the encoder recorded in the table")
    v.add_argument("--kind", default=None)
    v.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    v.add_argument("--device", default=None)
    i = sub.add_parser("info", help="print a table's metadata")
    i.add_argument("table")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "info":
            t = read_prompt_table(args.table)
            print(json.dumps({**t.meta, "tokens_shape": list(t.tokens.shape)}, indent=2))
            return 0
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if args.cmd == "build":
            enc = load_text_encoder(args.encoder, kind=args.kind, max_length=args.max_length).to(device)
            t = build_prompt_table(enc, _prompts_from_args(args), args.out)
            print(f"wrote {args.out}: {len(t)} prompts, tokens {tuple(t.tokens.shape)}, encoder {enc.name}")
            return 0
        t = read_prompt_table(args.table)
        name = args.encoder or t.meta.get("encoder_source") or t.meta["encoder_name"]
        if args.encoder is None and not Path(name).is_dir():
            name = t.meta["encoder_name"]
        kind = args.kind or t.meta.get("encoder_kind", "auto")
        enc = load_text_encoder(name, kind=kind, max_length=t.max_length).to(device)
        cos = table_cosines(t, enc)
        min_cos = float(cos.min())
        ok = min_cos >= args.threshold
        print(
            f"{args.table}: {len(t)} prompts, encoder {enc.name}, min cosine {min_cos:.6f} "
            f"(threshold {args.threshold}) -> {'OK' if ok else 'FAILED'}"
        )
        if not ok:
            print(f"worst prompt: {t.prompts[int(cos.argmin())]!r}", file=sys.stderr)
        return 0 if ok else 1
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
