"""Run configuration: dataclasses with presets and a YAML/JSON override.

A config is built in three layers, each overriding the one before::

    preset ("cpu" small / "gpu" full)  ->  YAML or JSON file (--config)  ->  --set key=value (dotted keys)

and saved next to the checkpoints as ``config.yaml`` so that a run can be resumed or rendered with exactly
the settings it was trained with.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class DataConfig:
    data_root: str = "data/synthetic"  # <data_root>/<subject>/{imgs,alpha,parsing}
    tracker_root: str | None = None  # <tracker_root>/<subject>/checkpoint/*.frame; None = same as data_root
    subject: str = "synthetic"
    frame_offset: int = 1  # tracker file k pairs with image k + frame_offset
    n_test: int = 500  # the last n_test frames are the test split
    max_train: int = 10000
    background: str = "green"  # "green" (0,1,0) or "white"
    image_scale: float = 1.0  # resize frames (and intrinsics) by this factor for training, e.g. 0.5


@dataclass
class ModelConfig:
    head_model: str | None = None  # FLAME generic_model.pkl (or synthetic head); None = <data_root>/flame/
    template: str | None = None  # template OBJ with UVs; None = head_template(_mesh).obj beside head_model
    uv_size: int = 128
    sh_degree: int = 3
    parity: bool = False  # True = original FlashAvatar deformation (no triangle frames, multiplicative scale)
    mlp_hidden: int = 256  # width of the deformation MLP (SPEC 3: 256)
    mlp_layers: int = 6  # its depth (SPEC 3: 6)
    color_offset: float = 0.0  # > 0: the MLP also predicts a per-frame RGB offset of at most this (0 = SPEC 3)
    shading: bool = False  # colours times a learned SH irradiance of the posed / neutral normal (False = SPEC 3)


@dataclass
class LossConfig:
    huber_delta: float = 0.1
    mouth_weight: float = 40.0
    perceptual_weight: float = 0.05
    perceptual_from: int = 15000  # iteration where the perceptual (SSIM or LPIPS) term starts
    perceptual: str = "auto"  # "auto" (LPIPS-VGG if weights are local, else SSIM), "ssim", "lpips", "none"
    lpips_weights: str | None = None  # path to local LPIPS-VGG weights; never downloaded
    ssim_blur: str = "auto"  # the SSIM term: "auto" (fused kernel where it applies), "fused", "conv", "matmul64"
    w2_weight: float = 0.0  # Wasserstein temporal regulariser (SPEC 4); off by default until the ablation says so
    w2_from: int = 2000
    w2_unit_scale: float = 1000.0  # metres -> millimetres so the Bures term is well above float precision
    emd_weight: float = 0.0  # EMD between offset Gaussian centres and their surface points (random subset)
    emd_points: int = 256
    emd_from: int = 0


@dataclass
class OptimConfig:
    lr_mlp: float = 1e-4
    lr_color: float = 2.5e-3  # SH DC; the rest of the SH bands use lr_color / sh_rest_divisor
    sh_rest_divisor: float = 20.0
    lr_opacity: float = 5e-2
    lr_scale: float = 5e-3
    lr_rotation: float = 1e-3
    eps: float = 1e-15
    lr_final_factor: float = 1.0  # log-linear decay of every lr to this factor at the last iteration (1 = off)


@dataclass
class TrainConfig:
    iterations: int = 30000
    batch_size: int = 4  # frames per step (as adjacent pairs when the W2 term is on)
    sh_increase_every: int = 500  # active SH degree +1 every this many iterations
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    log_every: int = 50
    preview_every: int = 2000
    checkpoint_every: int = 5000
    eval_every: int = 0  # test evaluation (loss, head PSNR/SSIM) every this many iterations (0 = only at the end)
    eval_frames: int = 8  # test frames used for that evaluation (evenly spaced over the test split)
    psnr_bar: float = 32.0  # test head-region PSNR (dB) whose first crossing is recorded as the time to the bar
    progress: bool = True
    tensorboard: bool = True  # when the tensorboard package is importable
    max_minutes: float = 0.0  # stop (as if finished) after this much training time; 0 = no limit
    tf32: bool = True  # CUDA: TF32 tensor cores for the float32 matmuls of a training step (the MLP)
    cuda_graph: bool = True  # CUDA: replay each step from a captured CUDA graph (eager with a logged reason
    #                          when the configuration or the capture does not allow it); ignored on a CPU
    cuda_graph_refresh: int = 1000  # re-measure the rasteriser's capacity (and recapture if it moved) this often


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Overrides on top of the defaults. "gpu" is the full setting; "cpu" is small enough to train in a few
# minutes on 2 cores with the pure-torch or CPU rasteriser.
PRESETS: dict[str, dict[str, Any]] = {
    "gpu": {
        # 15,000 iterations: longer schedules overfit the synthetic subject's 200 training frames (27,000 ended
        # 0.2 dB lower on the test split)
        "train": {"iterations": 15000, "batch_size": 4, "preview_every": 2000, "checkpoint_every": 5000,
                  "eval_every": 500, "eval_frames": 32},
        # uv 256 (57.6k Gaussians) with shading: on the H200 the synthetic subject's test head PSNR went from
        # 31.72 (uv 256) to 32.15 dB with the shading option, the first setting over the 32 dB bar; uv 128 and
        # 192 plateaued at 31.5-31.9 (benchmarks/NOTES_train.md). The benchmarks' default avatar stays uv 128.
        "model": {"uv_size": 256, "shading": True},
        # SSIM from 2,000 (not 15,000): with the fused SSIM kernel it costs little and brings the head-PSNR
        # plateau forward (benchmarks/NOTES_train.md)
        "loss": {"perceptual_from": 2000, "w2_from": 2000},
        "optim": {"lr_final_factor": 0.1},
    },
    "cpu": {
        "train": {"iterations": 1000, "batch_size": 2, "sh_increase_every": 250, "preview_every": 250,
                  "checkpoint_every": 250, "log_every": 25, "eval_frames": 4, "eval_every": 250},
        "model": {"uv_size": 64, "sh_degree": 2, "mlp_hidden": 128, "mlp_layers": 4},
        "data": {"n_test": 20, "image_scale": 1.0},
        "loss": {"perceptual_from": 700, "w2_from": 300},
        "optim": {"lr_final_factor": 0.3},
    },
}


def _merge(obj: Any, overrides: dict[str, Any], where: str) -> None:
    """Apply nested ``overrides`` onto dataclass ``obj`` in place, rejecting unknown keys."""
    names = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in overrides.items():
        if key not in names:
            raise ValueError(f"config: unknown key '{where}{key}' (known: {', '.join(names)})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"config: '{where}{key}' must be a mapping, got {type(value).__name__}")
            _merge(current, value, f"{where}{key}.")
        else:
            setattr(obj, key, _coerce(value, current, f"{where}{key}"))


def _coerce(value: Any, current: Any, name: str) -> Any:
    """Convert ``value`` to the type of the field's current value (ints, floats, bools from strings)."""
    if value is None or current is None:
        return value
    if isinstance(current, bool):
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"config: '{name}' must be a boolean, got '{value}'")
        return bool(value)
    try:
        if isinstance(current, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if isinstance(current, float):
            return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"config: '{name}' must be of type {type(current).__name__}, got {value!r}") from None
    return value


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON config file into a nested dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping at the top level")
    return data


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """``["train.iterations=100", "loss.w2_weight=0.05"]`` -> nested dict (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set expects key=value (e.g. train.iterations=1000), got '{item}'")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw else None
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def make_config(preset: str | None = None, file: str | Path | None = None,
                overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then ``preset``, then ``file``, then ``overrides`` (nested dict)."""
    cfg = Config()
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"config: unknown preset '{preset}' (choose from {', '.join(PRESETS)})")
        _merge(cfg, PRESETS[preset], "")
    if file is not None:
        _merge(cfg, load_file(file), "")
    if overrides:
        _merge(cfg, overrides, "")
    validate(cfg)
    return cfg


def from_dict(data: dict[str, Any]) -> Config:
    cfg = Config()
    _merge(cfg, data, "")
    return cfg


def validate(cfg: Config) -> None:
    """Reject settings that would fail later with an obscure error."""
    t, l = cfg.train, cfg.loss
    if t.iterations < 1:
        raise ValueError(f"config: train.iterations must be >= 1, got {t.iterations}")
    if t.batch_size < 1:
        raise ValueError(f"config: train.batch_size must be >= 1, got {t.batch_size}")
    if cfg.model.uv_size < 4:
        raise ValueError(f"config: model.uv_size must be >= 4, got {cfg.model.uv_size}")
    if not (cfg.model.color_offset >= 0 and cfg.model.color_offset < float("inf")):
        raise ValueError(f"config: model.color_offset must be a finite number >= 0, got {cfg.model.color_offset}")
    if not 0 <= cfg.model.sh_degree <= 3:
        raise ValueError(f"config: model.sh_degree must be in 0..3, got {cfg.model.sh_degree}")
    if cfg.data.background not in ("green", "white", "black"):
        raise ValueError(f"config: data.background must be green, white or black, got '{cfg.data.background}'")
    if l.perceptual not in ("auto", "ssim", "lpips", "none"):
        raise ValueError(f"config: loss.perceptual must be auto, ssim, lpips or none, got '{l.perceptual}'")
    from .metrics import SSIM_BLURS  # here, not at the top: the config module stays free of torch

    if l.ssim_blur not in SSIM_BLURS:
        raise ValueError(f"config: loss.ssim_blur must be one of {SSIM_BLURS}, got {l.ssim_blur!r}")
    if l.w2_weight < 0 or l.emd_weight < 0:
        raise ValueError("config: loss.w2_weight and loss.emd_weight must be >= 0")
    if t.cuda_graph_refresh < 0:
        raise ValueError(f"config: train.cuda_graph_refresh must be >= 0 (0 = never), got {t.cuda_graph_refresh}")
    if t.sh_increase_every < 1:
        raise ValueError(f"config: train.sh_increase_every must be >= 1, got {t.sh_increase_every}")


def save(cfg: Config, path: str | Path) -> None:
    from .io_utils import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def load(path: str | Path) -> Config:
    return from_dict(load_file(path))


def background_color(name: str) -> tuple[float, float, float]:
    return {"green": (0.0, 1.0, 0.0), "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0)}[name]
