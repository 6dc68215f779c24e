"""Self-supervised pretraining on a folder of unlabelled images: config, presets, and the run.

``beit pretrain --method beit|mae|ibot`` builds a :class:`PretrainConfig` (preset <- YAML <- overrides),
asks the method registry (:mod:`beit.methods`) for the method module and its per-sample transform, and
hands both to the one engine. Everything method-specific lives in the method's own config section.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, make_dataclass
from functools import partial
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from .. import engine
from ..config import ConfigError, ModelConfig, OptimConfig, TrainConfig, check_fields, resolve
from ..data import cache as decode_cache
from ..data.decode import decode_tensor
from ..data.folder import ImageFolder
from ..data.shards import open_images
from ..data.views import IMAGENET_MEAN, IMAGENET_STD, check_fixed_normalisation, to_rgb_pil
from ..engine import DistEnv, Training, TrainingTask, TrainResult
from ..loading import load_tokenizer
from ..methods import registry
from ..tokenizers.vqkd import Teacher
from ..tracking import wanted as trackers_wanted
from ..viz.curves import run_curves
from ..viz.masks import save_mask_grid
from .probe import OnlineKNNProbe

log = logging.getLogger("beit")


@dataclass
class DataConfig:
    # a folder tree of images (labels, if any, are ignored), WebDataset tar shards ('shards/train-{000000..000009}.tar',
    # a list file, a folder of .tar) or a local HF datasets folder (save_to_disk): beit.data.shards
    path: str = ""
    limit: int = 0  # use only the first N images in sorted order (0: all), for budgets and quick studies
    # decode each image once into OUT/decode_cache (uint8, memory-mapped; rebuilt when a file changes):
    # auto = when the decoded images fit in 4 GB (small images, the CPU presets) | on | off
    decode_cache: str = "auto"
    # pil: PIL decodes and resamples (every format) | fast: JPEGs decoded by torchvision (libjpeg-turbo) into
    # uint8 tensors and the views resampled as tensors (Lanczos views bicubic): faster for large JPEGs
    # (bench/loader.py); other files still go through PIL
    decode: str = "pil"
    # the views' normalisation, recorded so that beit.load/transform_for/export feed the backbone as trained
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        check_fields(self, "data", {"limit": "count"})
        check_fixed_normalisation(self.mean, self.std, "data")
        if self.decode_cache not in ("auto", "on", "off"):
            raise ConfigError(f"data.decode_cache must be auto, on or off, got {self.decode_cache!r}")
        if self.decode not in ("pil", "fast"):
            raise ConfigError(f"data.decode must be pil or fast, got {self.decode!r}")


@dataclass
class OnlineProbeConfig:
    """Online kNN probe during pretraining (``--probe-data``); every ``train.probe_every`` steps."""

    data: str = ""  # labelled folder: DIR/train/<class>/ + DIR/val/<class>/, or DIR/<class>/; "": no probe
    bank_per_class: int = 100  # labelled images per class the queries are compared with
    queries_per_class: int = 50  # images per class that are classified
    k: int = 20
    temperature: float = 0.07


def _common_fields() -> list[tuple]:
    return [
        ("method", str, field(default="beit")),  # a registered method: beit | mae | ibot | ...
        ("model", ModelConfig, field(default_factory=ModelConfig)),
        ("data", DataConfig, field(default_factory=DataConfig)),
        ("optim", OptimConfig, field(default_factory=OptimConfig)),
        ("train", TrainConfig, field(default_factory=TrainConfig)),
        ("tokenizer", str, field(default="")),  # path of a tokenizer run/dir (BEiT with target=tokens)
        ("tokenizer_preset", str, field(default="")),  # the tokenizer preset a recipe was designed with (docs)
        ("probe", OnlineProbeConfig, field(default_factory=OnlineProbeConfig)),  # online kNN (--probe-data)
    ]


_config_class: tuple[tuple, type] | None = None


def config_class() -> type:
    """``PretrainConfig``: the common sections plus one section per registered method (``cfg.beit``,
    ``cfg.mae``, ...), built from the registry (again only when a method has joined since)."""
    global _config_class
    sections = tuple((name, spec.config) for name, spec in registry.methods().items() if spec.config is not None)
    if _config_class is None or _config_class[0] != sections:
        fields = [*_common_fields(), *((name, cls, field(default_factory=cls)) for name, cls in sections)]
        cls = make_dataclass("PretrainConfig", fields)
        cls.__module__ = __name__
        cls.__doc__ = "Pretraining config: common sections and one section per registered method."
        _config_class = (sections, cls)
    return _config_class[1]


def __getattr__(name: str):
    # ``PretrainConfig`` and ``PRESETS`` follow the registry, which methods may join after this import
    if name == "PretrainConfig":
        return config_class()
    if name == "PRESETS":
        return registry.presets()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_config(preset: str | None = None, config: str | None = None,
                 overrides: list[str] | dict | None = None):
    """The :class:`PretrainConfig`: preset <- YAML file <- overrides."""
    return resolve(config_class(), registry.presets(), preset, config, overrides)


class UnlabelledDataset(Dataset):
    """A user's dataset through the method's per-sample transform; items are images (PIL or ``(3|1, H, W)``
    tensors) or tuples whose first entry is the image (labels are ignored)."""

    def __init__(self, base: Dataset, transform) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        item = self.base[i]
        return self.transform(to_rgb_pil(item[0] if isinstance(item, (tuple, list)) else item))


def build_dataset(cfg: DataConfig, transform, data: Dataset | None = None) -> Dataset:
    """The images of ``cfg.path`` (a folder, tar shards or an HF datasets folder: :func:`open_images`) or, if
    given, the dataset ``data``."""
    if data is not None:
        return UnlabelledDataset(data, transform)
    if not cfg.path:
        raise ConfigError("pretraining needs --data DIR (a folder of images, tar shards or an HF datasets folder)")
    ds = open_images(cfg.path, transform=transform)
    if cfg.limit and cfg.limit < len(ds):
        ds.samples = ds.samples[: cfg.limit]
    return ds


class Pretraining(TrainingTask):
    """Pretraining for :func:`beit.engine.run`: the registry builds the method and its per-sample transform;
    the images are decoded once into the run folder; an online kNN probe if ``probe.data`` is set."""

    def __init__(self, dataset: Dataset | None = None,
                 pictures: Callable[[Path, Path, str], dict[str, Callable[[], Any]]] | None = None) -> None:
        self.data, self.pictures = dataset, pictures
        self.transform: Any = None

    def build(self, cfg, env: DistEnv, out: Path, resume: bool) -> Training:
        method, transform, cfg = registry.build_method(cfg, load_tokenizer=load_tokenizer)
        request = getattr(method, "teacher_request", None)  # (path, block): a frozen backbone's features as targets
        if request:
            method.attach_teacher(Teacher.load(*request))
        dataset = build_dataset(cfg.data, transform, self.data)
        if cfg.data.decode == "fast":
            views = getattr(transform, "views", None)
            if views is None or not hasattr(dataset, "decoder"):
                raise ConfigError(f"data.decode=fast works with methods that crop views (beit, mae) on --data, "
                                  f"not {cfg.method}" + (" on a Python dataset" if views is not None else ""))
            views.resize, dataset.decoder = "tensor", decode_tensor
        self.transform = transform
        probe = None
        if cfg.probe.data and env.is_main:  # rank 0 probes (on labelled images of its own)
            probe = OnlineKNNProbe(cfg.probe.data, cfg.model.img_size, every=cfg.train.probe_every,
                                   bank_per_class=cfg.probe.bank_per_class, queries_per_class=cfg.probe.queries_per_class,
                                   k=cfg.probe.k, temperature=cfg.probe.temperature, seed=cfg.train.seed)
            log.info("online kNN probe every %d steps: %d bank / %d query images from %s", probe.every,
                     len(probe.bank_y), len(probe.query_y), cfg.probe.data)
        batched = getattr(transform, "batched", None)  # per-pixel work once per batch, in the loader workers
        return Training(method, dataset, cfg, desc=f"pretrain {cfg.method}", probe=probe,
                        collate_fn=batched(on_device=env.device.type == "cuda") if batched else None,
                        inputs={"tokenizer": cfg.tokenizer} if cfg.tokenizer else None)

    def claimed(self, training: Training, env: DistEnv, out: Path) -> None:
        cfg, dataset = training.cfg, training.dataset
        if isinstance(dataset, ImageFolder):  # shards hold data sets too large to decode once
            decode_cache.attach(dataset, out / "decode_cache", cfg.data.decode_cache)
        if env.is_main:
            log.info("pretraining %s (%s) on %d images from %s", cfg.method,
                     f"{cfg.model.embed_dim}w/{cfg.model.depth}d/{cfg.model.img_size}px", len(dataset), cfg.data.path)

    def outputs(self, training: Training, result: TrainResult) -> dict[str, Callable[[], Any]]:
        cfg, dataset, out = training.cfg, training.dataset, Path(result.run_dir)
        if training.collate_fn is not None:
            self.transform.deferred = False  # the pictures below take finished samples
        outputs = {"loss.png": run_curves(out, "loss.png", ("loss", "mlm_acc", "acc", "knn_top1", "lr"),
                                          f"{cfg.method} pretraining"),
                   "masks.png": partial(save_mask_grid, dataset, out / "masks.png")}
        if (self.pictures is not None and trackers_wanted(cfg.train) and isinstance(dataset, ImageFolder)
                and len(dataset)):
            outputs.update(self.pictures(out, dataset.samples[0][0], cfg.method))  # for the trackers (--log)
        return outputs


def run(cfg, out: str | Path, *, resume: bool = False, max_minutes: float = 0.0,
        resume_anyway: bool = False, dataset: Dataset | None = None,
        pictures: Callable[[Path, Path, str], dict[str, Callable[[], Any]]] | None = None) -> TrainResult:
    """Pretrain as ``cfg`` says into run directory ``out`` (``resume_anyway``: accept a changed config);
    ``dataset``: a dataset of images instead of the folder ``cfg.data.path``. ``pictures(run, image, method)``:
    more outputs of the finished run for the trackers (``--log``), e.g. attention maps; handed in by the caller
    because looking inside a trained model sits above the tasks (:mod:`beit.viz`)."""
    return engine.run(Pretraining(dataset, pictures), cfg, out, resume=resume, max_minutes=max_minutes,
                      resume_anyway=resume_anyway)
