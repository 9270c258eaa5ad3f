"""Class-to-prompt templates, so class-labelled datasets can train text-conditioned models.

Templates are ``str.format`` strings with the fields ``{name}`` (class name, underscores read as spaces),
``{word}`` (for digit datasets the number word, "3" -> "three"; else the name) and ``{a}`` ("a" or "an" for the
name). Digit datasets accept class names "3", "three" or torchvision's "3 - three". Defaults match the
datamodules' ``prompts`` attribute exactly (digits: "a handwritten digit three", photo datasets: "a photo of a
airplane"), so a table built here is a table for that datamodule.
"""

from __future__ import annotations

import string
from typing import Sequence

import torch

from difflab.utils.errors import ConfigError

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
CIFAR100_CLASSES = [
    "apple",
    "aquarium_fish",
    "baby",
    "bear",
    "beaver",
    "bed",
    "bee",
    "beetle",
    "bicycle",
    "bottle",
    "bowl",
    "boy",
    "bridge",
    "bus",
    "butterfly",
    "camel",
    "can",
    "castle",
    "caterpillar",
    "cattle",
    "chair",
    "chimpanzee",
    "clock",
    "cloud",
    "cockroach",
    "couch",
    "crab",
    "crocodile",
    "cup",
    "dinosaur",
    "dolphin",
    "elephant",
    "flatfish",
    "forest",
    "fox",
    "girl",
    "hamster",
    "house",
    "kangaroo",
    "keyboard",
    "lamp",
    "lawn_mower",
    "leopard",
    "lion",
    "lizard",
    "lobster",
    "man",
    "maple_tree",
    "motorcycle",
    "mountain",
    "mouse",
    "mushroom",
    "oak_tree",
    "orange",
    "orchid",
    "otter",
    "palm_tree",
    "pear",
    "pickup_truck",
    "pine_tree",
    "plain",
    "plate",
    "poppy",
    "porcupine",
    "possum",
    "rabbit",
    "raccoon",
    "ray",
    "road",
    "rocket",
    "rose",
    "sea",
    "seal",
    "shark",
    "shrew",
    "skunk",
    "skyscraper",
    "snail",
    "snake",
    "spider",
    "squirrel",
    "streetcar",
    "sunflower",
    "sweet_pepper",
    "table",
    "tank",
    "telephone",
    "television",
    "tiger",
    "tractor",
    "train",
    "trout",
    "tulip",
    "turtle",
    "wardrobe",
    "whale",
    "willow_tree",
    "wolf",
    "woman",
    "worm",
]

DIGIT_TEMPLATE = "a handwritten digit {word}"
PHOTO_TEMPLATE = "a photo of a {name}"

# canonical dataset key -> (default template, default class names)
DATASETS: dict[str, tuple[str, list[str]]] = {
    "digits": (DIGIT_TEMPLATE, NUMBER_WORDS),
    "mnist": (DIGIT_TEMPLATE, NUMBER_WORDS),
    "cifar10": (PHOTO_TEMPLATE, CIFAR10_CLASSES),
    "cifar100": (PHOTO_TEMPLATE, CIFAR100_CLASSES),
    "stl10": (PHOTO_TEMPLATE, STL10_CLASSES),
}
ALIASES = {"sklearndigits": "digits", "handwrittendigits": "digits"}
DIGIT_DATASETS = ("digits", "mnist")
FIELDS = ("name", "word", "a")


def dataset_key(dataset_name: str) -> str:
    """Normalise a dataset name: case, '-', '_' and spaces ignored ("CIFAR-10" -> "cifar10")."""
    key = "".join(ch for ch in str(dataset_name).lower() if ch.isalnum())
    return ALIASES.get(key, key)


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _check_template(template: str) -> None:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ConfigError(f"prompt template {template!r} is not a valid format string ({e})") from None
    bad = [f for f in fields if f not in FIELDS]
    if bad:
        raise ConfigError(
            f"prompt template {template!r} uses unknown field {{{bad[0]}}}; allowed: "
            + ", ".join("{" + f + "}" for f in FIELDS)
        )


def class_prompts(
    dataset_name: str, class_names: Sequence[str] | None = None, template: str | None = None
) -> list[str]:
    """One prompt per class, in class order, from the dataset's template (or ``template``).

    ``class_names`` defaults to the dataset's standard names; digit datasets accept "3" or "three" alike.
    Unknown datasets use the photo template and need ``class_names``.
    """
    key = dataset_key(dataset_name)
    default_template, default_names = DATASETS.get(key, (PHOTO_TEMPLATE, None))
    names = list(class_names) if class_names is not None else default_names
    if not names:
        raise ConfigError(
            f"no class names for dataset {dataset_name!r}: pass class_names (known datasets: {', '.join(DATASETS)})"
        )
    template = template or default_template
    _check_template(template)
    prompts = []
    for raw in names:
        name = str(raw).replace("_", " ").strip()
        word = name
        if key in DIGIT_DATASETS:
            if " - " in name:  # torchvision MNIST.classes: "3 - three"
                name = word = name.split(" - ", 1)[1].strip()
            elif name.isdigit() and int(name) < 10:
                word = NUMBER_WORDS[int(name)]
        prompts.append(template.format(name=name, word=word, a=_article(name)))
    return prompts


def labels_to_prompts(labels: torch.Tensor | Sequence[int], prompts: Sequence[str]) -> list[str]:
    """Prompts for a batch of class labels (``prompts[label]``), e.g. a class dataset feeding a text model."""
    idx = labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)
    bad = [int(i) for i in idx if not 0 <= int(i) < len(prompts)]
    if bad:
        raise ValueError(f"class label {bad[0]} has no prompt (there are {len(prompts)} prompts)")
    return [prompts[int(i)] for i in idx]
