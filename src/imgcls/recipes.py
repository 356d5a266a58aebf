"""Named recipes: sets of training settings tuned for one kind of data.

``imgcls train --data D --recipe cifar10-fast`` starts from the recipe's
settings; flags and config-file values given beside it override them.  A
recipe says which inputs it suits (channels, image size, number of training
images) and refuses, before any training, data it was not made for, naming
what it found and what would be accepted.  ``imgcls recipes`` lists them.

Each recipe has a variant per precision class: ``bf16`` for the devices that
compute bf16 natively (CUDA GPUs, CPUs with AMX or AVX512-BF16), ``fp32`` for
every other CPU, where a network of the same width trains several times
slower.  A run takes the variant of the precision it trains in
(``--precision auto`` decides it from the device), and says which.

A new recipe is one :class:`Recipe` entry in ``RECIPES``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from imgcls.errors import ConfigError, unknown_name

# After airbench94_muon (Keller Jordan): Muon for the convolution filters; Nesterov SGD for the rest.
# airbench states its SGD settings for a summed loss at batch 2000 with logits = head(x) / 256; for
# imgcls's mean loss and fastnet's logit scale of 1/9 they become: lr 0.67 * 2000 * (9/256)^2 = 1.66 for
# the head, 64x that for BatchNorm shifts (0.053 * 2000 = 106), and the same decay per step (4e-3 of the
# weight at full learning rate): weight decay 4e-3 / 1.66 = 2.4e-3 (the norm group's is divided by 64).
# Muon: lr 0.24, momentum 0.6.  The learning rate falls linearly to 0, with no warmup.  Batch 1024
# (not 2000): on CPU it trains about 45% more images a second.
_FAST = {
    "optimizer": "muon", "nesterov": True, "momentum": 0.85, "lr": 1.66, "weight_decay": 2.4e-3,
    "muon_lr": 0.24, "muon_momentum": 0.6, "norm_lr_scale": 64.0, "label_smoothing": 0.2,
    "batch_size": 1024, "eval_batch_size": 1024, "schedule": "linear", "warmup_epochs": 0.0, "min_lr": 0.0,
    "lookahead": False, "restore_best": False, "early_stopping": False, "val_fraction": 0.0,
}


PRECISION_CLASSES = {"bf16": "CUDA GPUs and CPUs with native bf16 (AMX or AVX512-BF16)",
                     "fp32": "CPUs without native bf16 (AVX2, AVX-512 without BF16, ARM)"}


@dataclass(frozen=True)
class Variant:
    """A recipe's settings for one precision class.

    Attributes:
        summary: what differs from the recipe's description, in a few words.
        changes: flat options over the recipe's shared settings.
        measured: hardware class -> what ``benchmarks/recipes.py`` measured there.
    """

    summary: str
    changes: dict = field(default_factory=dict)
    measured: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    """A named set of flat options (as the CLI flags) and the data it suits.

    Attributes:
        name: what ``--recipe`` takes.
        summary: one line on what it does and what it reaches.
        channels: the image channels it accepts (1 or 3).
        min_side, max_side: accepted image height and width in pixels.
        tuned_side: the size it was tuned on (for messages).
        min_train_images: fewest training images it accepts.
        settings: flat options shared by its variants.
        variants: precision class ("bf16", "fp32") -> :class:`Variant`.
        hint: what to use instead when the data does not suit it.
    """

    name: str
    summary: str
    channels: int
    min_side: int
    max_side: int
    tuned_side: int
    min_train_images: int
    settings: dict = field(default_factory=dict)
    variants: dict = field(default_factory=dict)
    hint: str = ""

    @property
    def suits(self) -> str:
        colour = "colour (3-channel)" if self.channels == 3 else "grayscale (1-channel)"
        return (f"{colour} images of {self.min_side} to {self.max_side} pixels a side (tuned on "
                f"{self.tuned_side}x{self.tuned_side}), at least {self.min_train_images:,} training images")

    def options(self, precision: str = "bf16") -> dict:
        """The flat options of the variant for ``precision`` ("bf16" or "fp32"), a copy."""
        if precision not in self.variants:
            raise unknown_name(f"precision class of recipe {self.name!r}", precision, tuple(self.variants))
        return {**self.settings, **self.variants[precision].changes}

    def check(self, dataset) -> None:
        """Raise ConfigError naming what does not fit when ``dataset`` (an ImageDataset) is not suitable."""
        c, h, w = dataset.image_shape
        n = len(dataset.splits["train"])
        problems = []
        if c != self.channels:
            problems.append(f"its images have {c} channel{'s' if c > 1 else ''}")
        if not (self.min_side <= h <= self.max_side and self.min_side <= w <= self.max_side):
            problems.append(f"its images are {h}x{w}")
        if n < self.min_train_images:
            problems.append(f"it has {n:,} training images")
        if problems:
            raise ConfigError(f"recipe {self.name!r} suits {self.suits}; {dataset.name} does not: "
                              f"{'; '.join(problems)}. {self.hint}")


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe(
        name="cifar10-fast",
        summary="airbench94_muon's recipe on CPU or GPU: fastnet (whitened stem, dirac init, 64/256/256), Muon "
                "for the filters and Nesterov SGD for the rest, label smoothing, alternating flips and 2-pixel "
                "crops, 13 epochs of which the first 7 on images shrunk to 3/4 of the side, 6-view TTA (flips "
                "and one-pixel shifts); all training images, no val split",
        channels=3, min_side=24, max_side=48, tuned_side=32, min_train_images=5000,
        # 13 epochs, the first 7 at 24x24 (progressive resizing: 1.7-1.9x the images a second there), seeds 0-4 on
        # the 2-core CPU: 91.12% ± 0.14 [90.91, 91.27], 4 of 5 at 91%, in 535 s [531, 540]; seeds 0-7: 91.11% ±
        # 0.14, 6 of 8 at 91%, in 537 s [531, 550]. 12 epochs (6 at 24x24): 91.03% ± 0.16 in 514 s.
        # 11 epochs (4 at 24x24): 90.98% ± 0.15 over six runs (seeds 0-2, each with and without a 3e-7 change to
        # the step), 90.99% ± 0.17 over 8 seeds on an H100. A rounding change re-rolls a seed within that spread.
        # airbench94_muon trains 8 epochs on clean CIFAR-10; JPEG q75 images cost about 3 points. 10 epochs all
        # at 32x32: 91.05 / 90.96 / 91.07% in 571 s; with airbench94's lookahead, 9 epochs: 90.90% on average.
        # The 6-view TTA adds 0.13-0.18 points over flip TTA for about 34 s of fp32 test pass.
        settings={**_FAST, "model": "fastnet", "epochs": 13, "low_res_scale": 0.75, "low_res_epochs": 7,
                  "augment": ["altflip", "crop:2"], "tta": "flip-translate"},
        # fp32, on the AVX2-only Zen 3 (seed 0, wall time with data loading): a training step of fastnet (SGD,
        # batch 512) runs at 370 / 180 images/s at 24x24 / 32x32 for 64/256/256, 1,250 / 680 for 32/128/128 and
        # 1,840 / 1,010 for 32/64/128. In the recipe: 32/128/128 for 10 epochs (6 at 24x24) 88.66% in 568 s, for
        # 9 (5 at 24x24) 88.33% in 547 s (seed 0; seeds 1-2, an hour later on a faster machine: 88.32 / 88.40% in
        # 477 / 475 s); 32/64/128 for 13 (7 at 24x24) 87.54% in 477 s (in the slower hour).
        variants={
            "bf16": Variant("fastnet 64/256/256, 13 epochs of which 7 at 24x24", {}, {
                "AVX512-BF16 (2-core AMD EPYC)": "91.12% ± 0.14 [90.91, 91.27] over seeds 0-4 in 535 s",
                "CUDA (NVIDIA H100)": "91% in about 19 s (the 11-epoch recipe given --epochs 13)",
                "AVX2 only (2-core AMD EPYC Zen 3)": "not run: a training step of fastnet at this width "
                                                     "runs at 180-370 images/s there, so the 13 epochs would take "
                                                     "about 45 minutes; the fp32 variant is for it"}),
            "fp32": Variant("a narrower fastnet (32/128/128), 9 epochs of which 5 at 24x24",
                            {"model_option": {"widths": [32, 128, 128]}, "epochs": 9, "low_res_epochs": 5}, {
                "AVX2 only (2-core AMD EPYC Zen 3)": "88.35% ± 0.04 [88.32, 88.40] over seeds 0-2 in 477 s "
                                                     "[475, 547]",
                "AVX512-BF16 (2-core AMD EPYC)": "not run (that CPU takes the bf16 variant)"}),
        },
        hint="Resize with --image-size 32 (and --channels 3 for grayscale) to use it anyway, "
             "or use --recipe mnist-fast for grayscale digits.",
    ),
    Recipe(
        name="mnist-fast",
        summary="the cifar10-fast recipe made for handwriting: a narrower fastnet (32/64/128) without the "
                "whitening stem, a short warmup, 2-pixel crops and no mirroring (a mirrored digit is another "
                "shape), 2 epochs, shift TTA; all training images, no val split",
        channels=1, min_side=20, max_side=36, tuned_side=28, min_train_images=5000,
        # No whitening stem and a short warmup: with them, 1 seed in 3 or 4 lost most of its first epoch
        # and ended near 99.4% instead of 99.65%.
        settings={**_FAST, "model": "fastnet", "model_option": {"widths": [32, 64, 128], "whiten": False},
                  "epochs": 2, "warmup_epochs": 0.25, "warmup_start": 0.1, "augment": ["crop:2"], "tta": "translate"},
        # fp32: on the AVX2-only Zen 3, seed 0 (wall time with data loading): 32/64/128 with the first epoch
        # at 21x21 99.65% in 71.7 s; 24/48/96 so, 99.58% in 55.5 s;
        # 16/32/64 at 28x28 throughout 99.52% in 37.4 s; 16/32/64, 3 epochs, 1.5 at 21x21: 99.61 / 99.51 / 99.56%
        # (seeds 0-2) in 36.6-44.4 s; 16/32/64, 4 epochs, 2 at 21x21: 99.59 / 99.42% in 49 s; 24/48/96, 2 epochs,
        # 1.5 at 21x21: 99.56 / 99.58 / 99.52% in 41.8-49.8 s, and at batch 512 99.53 / 99.55 / 99.58% in 43-44 s.
        variants={
            "bf16": Variant("fastnet 32/64/128, batches of 1024, 2 epochs at full size", {}, {
                "AVX512-BF16 (2-core AMD EPYC)": "99.65% ± 0.02 [99.62, 99.67] over seeds 0-2 in 26.7 s",
                "CUDA (NVIDIA H100)": "99.5% in about 10 s (given --epochs 3)"}),
            "fp32": Variant("a narrower fastnet (24/48/96), batches of 512, the first 1.5 of the 2 epochs on "
                            "21x21 images",
                            {"model_option": {"widths": [24, 48, 96], "whiten": False}, "batch_size": 512,
                             "low_res_scale": 0.75, "low_res_epochs": 1.5}, {
                "AVX2 only (2-core AMD EPYC Zen 3)": "99.55% ± 0.02 [99.53, 99.58] over seeds 0-2 in 51.6 s "
                                                     "[51.4, 53.8]"}),
        },
        hint="Convert with --channels 1 (and resize with --image-size 28) to use it anyway, "
             "or use --recipe cifar10-fast for colour photos.",
    ),
)}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise unknown_name("recipe", name, tuple(RECIPES))
    return RECIPES[name]
