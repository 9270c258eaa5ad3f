"""Allowed values of the conditioning group (configs/conditioning/*.yaml; src/conditioning/), checked by
difflab.config_checks before a job starts. num_classes is usually ??? and filled in from the datamodule."""

from difflab.config_checks import boolean, filled_later, integer, list_of, one_of, optional, string

RULES = {
    "num_classes": filled_later(integer(min=1)),
    "embed_dim": integer(min=1),
    "encoder": string(nonempty=True).described_as("a Hub id, a local save_pretrained directory or minilm"),
    "kind": one_of(["auto", "clip", "auto_model"]),
    "max_length": optional(integer(min=2)).described_as("an integer >= 2 (room for start/end tokens) or null"),
    "vector_dim": optional(integer(min=0)).described_as("an integer >= 0 (0: no pooled vector) or null"),
    "context_proj_dim": optional(integer(min=1)),
    "use_context_mask": boolean(),
    "table_path": optional(string(nonempty=True)),
    "prompts": optional(list_of(string())),
    "dtype": optional(one_of(["float32", "float16", "bfloat16", "float64", "float", "half", "double"])),
    "encode_batch_size": integer(min=1),
    "pooling": one_of(["encoder", "attention"]),
}
