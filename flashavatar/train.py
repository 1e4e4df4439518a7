"""Training of a Gaussian head avatar (SPEC 4), and the ``flashavatar train`` command.

One step: sample frames (adjacent pairs when the Wasserstein term is on), FLAME -> avatar -> rasterise the
batch in one call, then

    loss = Huber(render, gt)                                   (delta 0.1)
         + 40 * Huber(render * M_mouth, gt * M_mouth)
         + 0.05 * perceptual(render * M_head, gt * M_head)      after loss.perceptual_from (SSIM or LPIPS)
         + w2_weight * mean W2^2(residual_t-1, residual_t)      after loss.w2_from, in millimetres
         + emd_weight * EMD(offset centres, surface points)     after loss.emd_from (optional)

Adam with one group per parameter kind (SPEC 4 learning rates), SH degree +1 every
``train.sh_increase_every`` iterations. Checkpoints (model, optimiser, iteration, every RNG state) are
written atomically to ``<out>/checkpoints/last.pt``; running the same command again resumes from it, and
Ctrl-C saves one and exits cleanly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import config as config_mod
from . import losses, metrics
from .config import Config
from .io_utils import atomic_write_text, load_checkpoint, rng_state, save_checkpoint, set_rng_state, write_png
from .rasterizer_choice import pick_rasterizer
from .session import AvatarSession, resolve_device

log = logging.getLogger("flashavatar.train")


@dataclass
class TrainResult:
    iteration: int
    interrupted: bool
    checkpoint: Path
    test_loss_start: float | None = None
    test_loss_end: float | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0  # wall-clock time of this run() call
    steps: int = 0  # steps taken in this run() call
    train_seconds: float = 0.0  # training time of the whole run (resumes included; evaluation excluded)
    final_eval: dict[str, float] = field(default_factory=dict)
    time_to_bar: dict[str, float] | None = None  # first evaluation at or above train.psnr_bar


GRAPH_WARMUP = 3  # eager steps before a capture


class _CudaGraphs:
    """How Trainer captures and warms up: CUDA graphs on a side stream (tests substitute a CPU stand-in)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream: torch.cuda.Stream | None = None

    def warmup(self, step):
        """One eager step on a side stream (as torch.cuda.graphs asks before a capture), then a sync so the
        rasteriser's asynchronous capacity read-back lands before the next call."""
        self.stream = self.stream or torch.cuda.Stream(self.device)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            out = step()
        torch.cuda.synchronize(self.device)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return out

    def capture(self, body):
        """``body`` captured in a CUDA graph (not run); returns the replay function."""
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body()
        return graph.replay

    def capacities(self) -> dict:
        """The compiled rasteriser's tile-intersection capacities (what a captured graph has baked in)."""
        from .ops import rasterize as raster_ops

        return {k: v.value for k, v in raster_ops._capacities.items()}


class Trainer:
    """Owns the session (data, FLAME, avatar), the optimiser and the loop state of one run folder."""

    def __init__(self, cfg: Config, out_dir: str | Path, *, device: str | torch.device | None = None,
                 resume: bool = True):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.ckpt_path = self.out / "checkpoints" / "last.pt"
        self.device = resolve_device(device or cfg.train.device)
        torch.manual_seed(cfg.train.seed)
        self.session = AvatarSession.build(cfg, self.device)
        self.avatar = self.session.avatar
        self.rasterizer_name, _ = pick_rasterizer(self.device)
        self.perceptual = self._make_perceptual()
        frames = self.session.train_frames
        # Frame indices are drawn where the frames are (the GPU when they fit): no host->device index copy
        self._frames_device = frames.gt.device
        self.sampler = torch.Generator(device=self._frames_device).manual_seed(cfg.train.seed + 1)
        self._pair_prev = frames.pair_prev.to(self._frames_device)  # [P]
        self._pair_next = frames.pair_next.to(self._frames_device)  # [P]
        self._use_pairs = cfg.loss.w2_weight > 0 and len(self._pair_next) > 0
        if cfg.loss.w2_weight > 0 and not self._use_pairs:
            log.warning("loss.w2_weight > 0 but the train split has no consecutive frames: no W2 term")
        # CUDA graph of the whole step (train.cuda_graph): None = possible, else the reason it is not used
        self.graph_note = self._graph_blocker() or ""
        self._graphs = None if self.graph_note else _CudaGraphs(self.device)
        self.graph_active = False  # True while steps are replays of a captured graph
        self._graph_reset()
        # fused Adam on CUDA: one kernel for all parameters instead of a handful per tensor; capturable so
        # that its step can be part of the graph
        self._adam_flags = {"fused": True} if self.device.type == "cuda" else {}
        if self._graphs is not None:
            self._adam_flags["capturable"] = True
        self.optimizer = torch.optim.Adam(self._param_groups(), eps=cfg.optim.eps, **self._adam_flags)
        self._adam_flags = {k: self.optimizer.param_groups[0][k] for k in ("fused", "foreach", "capturable")}
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self._lr_base: torch.Tensor | None = None  # [G] on CUDA: every group's lr is a view of one tensor
        self._lr_now: torch.Tensor | None = None
        self._lr_factor_set: float | None = None
        self._set_lrs(self._lr_factor(0), force=True)
        self.iteration = 0
        self.history: list[dict[str, float]] = []
        self.test_loss_start: float | None = None
        self.train_seconds = 0.0  # time spent in steps (evaluation, previews and checkpoints excluded)
        self.time_to_bar: dict[str, float] | None = None
        self.session.check_finite = False  # no host read per step; a non-finite loss is caught at log steps
        # benchmarks/bench_train_step.py sets this: profiler ranges around the stages of a step
        self.profile_stages = False
        if resume and self.ckpt_path.is_file():
            self.load(self.ckpt_path)

    # ------------------------------------------------------------------------------------------ setup
    def _param_groups(self) -> list[dict[str, Any]]:
        o = self.cfg.optim
        lrs = {"mlp": o.lr_mlp, "f_dc": o.lr_color, "f_rest": o.lr_color / o.sh_rest_divisor,
               "opacity": o.lr_opacity, "scaling": o.lr_scale, "rotation": o.lr_rotation}
        groups = []
        for name, params in self.session.param_groups().items():
            if name not in lrs:
                raise RuntimeError(f"train: the avatar has a parameter group '{name}' with no learning rate")
            groups.append({"params": params, "lr": lrs[name], "name": name})
        return groups

    def _make_perceptual(self):
        kind = self.cfg.loss.perceptual
        if kind == "none" or self.cfg.loss.perceptual_weight == 0:
            return None
        if kind == "lpips" or (kind == "auto" and metrics.lpips_weights_available(self.cfg.loss.lpips_weights)):
            net = metrics.LPIPS(self.cfg.loss.lpips_weights).to(self.device)
            return lambda pred, gt: net(pred, gt).mean()
        blur = self.cfg.loss.ssim_blur
        return lambda pred, gt: losses.ssim_loss(pred, gt, blur=blur)

    # ----------------------------------------------------------------------------------- checkpoints
    def state(self) -> dict[str, Any]:
        return {
            "model": self.avatar.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "iteration": self.iteration,
            "rng": rng_state(),
            "sampler": self.sampler.get_state(),
            "config": self.cfg.to_dict(),
            "history": self.history,
            "test_loss_start": self.test_loss_start,
            "train_seconds": self.train_seconds,
            "time_to_bar": self.time_to_bar,
        }

    def save(self, path: Path | None = None) -> Path:
        path = path or self.ckpt_path
        save_checkpoint(path, self.state())
        config_mod.save(self.cfg, self.out / "config.yaml")
        return path

    def load(self, path: Path) -> None:
        # RNG states must stay CPU byte tensors; load_state_dict moves weights and moments to their devices
        ckpt = load_checkpoint(path, map_location="cpu")
        load_model_state(self.avatar, ckpt, path)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        for group in self.optimizer.param_groups:  # this device's Adam flavour, not the saving run's
            group.update(self._adam_flags)
        self.iteration = int(ckpt["iteration"])
        self._set_lrs(self._lr_factor(self.iteration), force=True)
        set_rng_state(ckpt["rng"])
        try:
            self.sampler.set_state(ckpt["sampler"])
        except (RuntimeError, ValueError, TypeError):  # a CPU generator state cannot seed a CUDA one (and back)
            log.warning("%s: frame sampler state is from another device kind; sampling restarts from iteration "
                        "%d with a fresh seed", path, self.iteration)
            self.sampler.manual_seed(self.cfg.train.seed + 1 + self.iteration)
        self.history = list(ckpt.get("history", []))
        self.test_loss_start = ckpt.get("test_loss_start")
        self.train_seconds = float(ckpt.get("train_seconds", 0.0))
        self.time_to_bar = ckpt.get("time_to_bar")
        log.info("resumed from %s at iteration %d", path, self.iteration)

    # ------------------------------------------------------------------------------------------ steps
    def _stage(self, name: str):
        """A profiler range named ``train/<name>`` when stage profiling is on (a no-op otherwise: the range
        costs a dispatcher call even with no profiler running)."""
        if self.profile_stages:
            return torch.profiler.record_function(f"train/{name}")
        return contextlib.nullcontext()

    def active_sh_degree(self, iteration: int) -> int:
        return min(self.session.sh_degree, iteration // self.cfg.train.sh_increase_every)

    def _lr_factor(self, iteration: int) -> float:
        final = self.cfg.optim.lr_final_factor
        return final ** (iteration / max(1, self.cfg.train.iterations)) if final != 1.0 else 1.0

    def _set_lrs(self, factor: float, *, force: bool = False) -> None:
        """Every group's lr = base * factor. On CUDA the groups' lrs are 0-d views of one device tensor, so
        this is one kernel (and a captured optimiser step reads the current value)."""
        if factor == self._lr_factor_set and not force:
            return
        self._lr_factor_set = factor
        if self.device.type != "cuda":
            for group, base in zip(self.optimizer.param_groups, self.base_lrs):
                group["lr"] = base * factor
            return
        if self._lr_base is None:  # fused Adam reads a float32 lr tensor
            self._lr_base = torch.tensor(self.base_lrs, dtype=torch.float32, device=self.device)  # [G]
            self._lr_now = self._lr_base.clone()
        if force:  # (re)bind: load_state_dict replaces the groups' lr entries
            for g, group in enumerate(self.optimizer.param_groups):
                group["lr"] = self._lr_now[g]
        torch.mul(self._lr_base, factor, out=self._lr_now)

    def _sample(self) -> tuple[torch.Tensor, int]:
        """Frame indices for one step, on the frames' device: [B] or, with pairs, [2P] laid out as
        (t-1 of all pairs, t of all)."""
        draw = torch.randint(0, self._draw_range(), (self._draw_count(),), generator=self.sampler,
                             device=self._frames_device)
        return self._indices(draw), self._draw_count() if self._use_pairs else 0

    def _draw_range(self) -> int:
        return len(self._pair_next) if self._use_pairs else len(self.session.train_frames)

    def _draw_count(self) -> int:
        return max(1, self.cfg.train.batch_size // 2) if self._use_pairs else self.cfg.train.batch_size

    def _indices(self, draw: torch.Tensor) -> torch.Tensor:
        """Frame indices from the step's random draw [D]: the frames themselves, or adjacent pairs."""
        return torch.cat([self._pair_prev[draw], self._pair_next[draw]]) if self._use_pairs else draw

    def step(self) -> dict[str, torch.Tensor]:
        """One optimisation step; returns the loss terms of this step (detached 0-d tensors: reading them as
        floats synchronises with the GPU, so the loop does that only when it logs)."""
        with self._matmul_precision():
            self._set_lrs(self._lr_factor(self.iteration))
            if self._graphs is not None:
                return self._graph_step()
            return self._eager_step()

    @contextlib.contextmanager
    def _matmul_precision(self):
        """TF32 matmuls inside a CUDA training step when ``train.tf32`` (the MLP's GEMMs are most of the
        step's arithmetic); the global setting is restored afterwards, so evaluation is unaffected."""
        if self.device.type != "cuda" or not self.cfg.train.tf32:
            yield
            return
        before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before

    def _eager_step(self) -> dict[str, torch.Tensor]:
        it = self.iteration
        with self._stage("data"):
            idx, pairs = self._sample()
        terms = self._forward_backward(idx, pairs, it)
        with self._stage("optimizer"):
            self.optimizer.step()
        self.iteration += 1
        self.graph_active = False
        return {k: v.detach() for k, v in terms.items()}

    def _forward_backward(self, idx: torch.Tensor, pairs: int, it: int) -> dict[str, torch.Tensor]:
        """Render frames ``idx`` [B], compute the loss terms of iteration ``it`` and their gradients; returns
        the terms and their sum as "total". Host work only: no value is read back (a CUDA graph captures it)."""
        cfg = self.cfg
        with self._stage("data"):
            batch = self.session.train_frames.batch(idx, self.device, frame_ids=False)
        self.avatar.active_sh_degree = self.active_sh_degree(it)
        with self._stage("forward"):
            out = self.session.render(batch, sh_degree=self.active_sh_degree(it), want_residual=pairs > 0,
                                      want_surface=cfg.loss.emd_weight > 0 and it >= cfg.loss.emd_from)
        with self._stage("losses"):
            pred, gt = out["image"], batch["gt"]  # [B, H, W, 3]
            terms: dict[str, torch.Tensor] = {}
            lc = cfg.loss
            terms["image"] = losses.huber(pred, gt, lc.huber_delta)
            if lc.mouth_weight > 0:
                terms["mouth"] = lc.mouth_weight * losses.huber(pred, gt, lc.huber_delta, mask=batch["mouth_mask"])
            if self.perceptual is not None and it >= lc.perceptual_from:
                head = batch["head_mask"][..., None]
                terms["perceptual"] = lc.perceptual_weight * self.perceptual(pred * head, gt * head)
            if pairs > 0 and it >= lc.w2_from:
                res = out["residual"]
                s0 = {k: v[:pairs] for k, v in res.items()}
                s1 = {k: v[pairs:] for k, v in res.items()}
                terms["w2"] = lc.w2_weight * losses.wasserstein_temporal(s0, s1, lc.w2_unit_scale)
            if "surface" in out:
                terms["emd"] = lc.emd_weight * self._emd_term(out["means"], out["surface"])
            terms["total"] = sum(terms.values())
        with self._stage("backward"):
            self.optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
        return terms

    # ------------------------------------------------------------------------------------- CUDA graph
    # With train.cuda_graph on a GPU, a step is one replay of a graph holding the whole step (batch gather,
    # FLAME, MLP, rasteriser forward and backward, losses, Adam). Outside the graph per step: the frame draw
    # (into the graph's static input, from the same generator as an eager step, so both draw the same
    # frames), the lr tensor and the iteration counter. One graph per phase (SH degree, perceptual term on,
    # W2 term on): a step in a new phase first runs GRAPH_WARMUP eager steps on a side stream, synchronised,
    # (lazy initialisation; the rasteriser's intersection capacity settles) and then captures. Every
    # train.cuda_graph_refresh iterations the same warm-up re-measures that capacity and recaptures if it
    # moved (a capacity that is too small is still exact, only slower).

    def _graph_blocker(self) -> str | None:
        """Why this run's step is not captured in a CUDA graph (None when it is)."""
        if self.device.type != "cuda":
            return "eager: not a CUDA device"
        if not self.cfg.train.cuda_graph:
            return "eager: train.cuda_graph is off"
        if self.cfg.loss.emd_weight > 0:
            return "eager: the EMD term reads its convergence back on the host (loss.emd_weight > 0)"
        if self._frames_device != self.device:
            return "eager: the training frames did not fit in GPU memory"
        if self.rasterizer_name != "ops":
            return f"eager: the '{self.rasterizer_name}' rasteriser cannot be captured"
        return None

    def _phase(self, it: int) -> tuple[int, bool, bool]:
        """What a captured step depends on besides its inputs: (SH degree, perceptual on, W2 on)."""
        lc = self.cfg.loss
        return (self.active_sh_degree(it), self.perceptual is not None and it >= lc.perceptual_from,
                self._use_pairs and it >= lc.w2_from)

    def _graph_reset(self) -> None:
        self._graph_replay = None  # Callable: one replay
        self._graph_key: tuple | None = None
        self._graph_iteration = 0  # iteration of the last capture or capacity check
        self._graph_draw: torch.Tensor | None = None  # static input [D]
        self._graph_terms: torch.Tensor | None = None  # static output [T]
        self._graph_names: list[str] = []
        self._warmup_left: int | None = None
        self._capacity_before: dict = {}
        self.captures = 0

    def _drop_graph(self) -> None:
        if self._graph_replay is not None:
            self._graph_replay = self._graph_draw = self._graph_terms = None
            self._graph_key = None
            self.optimizer.zero_grad(set_to_none=True)  # the grads live in the graph's memory pool

    def _graph_step(self) -> dict[str, torch.Tensor]:
        it, key = self.iteration, self._phase(self.iteration)
        refresh = self.cfg.train.cuda_graph_refresh
        due = refresh > 0 and it - self._graph_iteration >= refresh
        if self._graph_replay is not None and key == self._graph_key and not due and self._warmup_left is None:
            return self._replay()
        if self._warmup_left is None:  # start a (re)capture: eager warm-up steps first
            self._warmup_left = GRAPH_WARMUP
            self._capacity_before = self._graphs.capacities()
            if key != self._graph_key:
                self._drop_graph()
        if self._warmup_left > 0:
            self._warmup_left -= 1
            return self._graphs.warmup(self._eager_step)
        self._warmup_left = None
        if self._graph_replay is not None and key == self._graph_key and \
                self._graphs.capacities() == self._capacity_before:
            self._graph_iteration = it  # nothing moved: keep the graph
            return self._replay()
        self._drop_graph()
        try:
            self._capture(it, key)
        except Exception as exc:  # noqa: BLE001 - any capture failure: train on, eagerly
            self._drop_graph()
            self._graphs = None
            self.graph_note = f"eager from iteration {it}: capture failed ({type(exc).__name__}: {exc})"
            log.warning("train.cuda_graph: %s", self.graph_note)
            return self._eager_step()
        return self._replay()

    def _capture(self, it: int, key: tuple) -> None:
        self._graph_draw = torch.zeros(self._draw_count(), dtype=torch.long, device=self._frames_device)
        self.optimizer.zero_grad(set_to_none=True)  # backward allocates the grads in the graph's pool

        def body():
            pairs = self._draw_count() if self._use_pairs else 0
            terms = self._forward_backward(self._indices(self._graph_draw), pairs, it)
            self.optimizer.step()
            self._graph_names = list(terms)
            self._graph_terms = torch.stack([v.detach() for v in terms.values()])

        self._graph_replay = self._graphs.capture(body)
        self._graph_key, self._graph_iteration = key, it
        self.captures += 1
        log.info("train.cuda_graph: captured the step at iteration %d (SH degree %d, perceptual %s, W2 %s)",
                 it, *key)

    def _replay(self) -> dict[str, torch.Tensor]:
        # the same draw as _sample: randint(0, n, size) is empty(size).random_(0, n)
        self._graph_draw.random_(0, self._draw_range(), generator=self.sampler)
        self._graph_replay()
        self.iteration += 1
        self.graph_active = True
        self.graph_note = f"replaying (captured {self.captures}x)"
        return dict(zip(self._graph_names, self._graph_terms.clone().unbind()))

    @staticmethod
    def floats(terms: dict[str, torch.Tensor], iteration: int) -> dict[str, float]:
        """Loss terms as floats; a non-finite loss stops training with the terms named."""
        out = {k: float(v) for k, v in terms.items()}
        if not all(math.isfinite(v) for v in out.values()):
            raise FloatingPointError(f"train: non-finite loss at iteration {iteration}: "
                                     + ", ".join(f"{k}={v:.4g}" for k, v in out.items()))
        return out

    def _emd_term(self, means: torch.Tensor, surface: torch.Tensor) -> torch.Tensor:
        """EMD between a random subset of offset centres and the surface points of the same Gaussians."""
        n = means.shape[1]
        k = min(self.cfg.loss.emd_points, n)
        pick = torch.randperm(n, generator=self.sampler, device=self.sampler.device)[:k]
        if pick.device != means.device:  # frames (and so the sampler) on the CPU, model on the GPU
            pick = pick.pin_memory().to(means.device, non_blocking=True)
        scale = self.cfg.loss.w2_unit_scale  # millimetres, like the W2 term
        return losses.emd(means[:, pick] * scale, surface[:, pick] * scale).mean()

    def test_loss(self) -> float:
        """Huber image loss on the first ``train.eval_frames`` test frames (full SH degree in use)."""
        return self.evaluate()["test_loss"]

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Metrics on ``train.eval_frames`` evenly spaced test frames, means over frames: ``test_loss`` (the
        Huber image loss), and as ``flashavatar render`` measures them (render clamped to [0, 1], head = the
        pixels inside the head mask): ``test_psnr_head``, ``test_ssim_head``, ``test_psnr_full``."""
        data = self.session.test_frames
        n = min(len(data), self.cfg.train.eval_frames)
        names = ("test_loss", "test_psnr_head", "test_ssim_head", "test_psnr_full")
        if n == 0:
            return dict.fromkeys(names, float("nan"))
        idx = torch.linspace(0, len(data) - 1, n).round().long()
        sums = torch.zeros(len(names), dtype=torch.float64, device=self.device)  # [4], read back once
        for chunk in idx.split(max(1, self.cfg.train.batch_size)):
            batch = data.batch(chunk, self.device, frame_ids=False)
            out = self.session.render(batch, sh_degree=self.active_sh_degree(self.iteration))
            pred, gt, head = out["image"], batch["gt"], batch["head_mask"]  # [B, H, W, 3], [B, H, W]
            clamped = pred.clamp(0, 1)
            sums += torch.stack([losses.huber(pred, gt, self.cfg.loss.huber_delta) * len(chunk),
                                 metrics.psnr(clamped, gt, head).sum(), metrics.ssim(clamped, gt, head).sum(),
                                 metrics.psnr(clamped, gt).sum()]).double()
        return dict(zip(names, (sums / n).tolist()))

    def _record_eval(self, iteration: int, ev: dict[str, float], writer) -> None:
        """History entry with the training time; notes the first time the head PSNR reaches the bar."""
        self.history.append({"iteration": iteration, "train_seconds": self.train_seconds, **ev})
        bar = self.cfg.train.psnr_bar
        if self.time_to_bar is None and ev["test_psnr_head"] >= bar:
            self.time_to_bar = {"seconds": self.train_seconds, "iteration": iteration, "bar": bar,
                                "test_psnr_head": ev["test_psnr_head"], "test_ssim_head": ev["test_ssim_head"]}
            log.info("test head PSNR %.2f dB >= %.1f dB after %.1f s of training (iteration %d)",
                     ev["test_psnr_head"], bar, self.train_seconds, iteration)
        if writer is not None:
            writer.add_scalar("test/huber", ev["test_loss"], iteration)
            for k in ("test_psnr_head", "test_ssim_head", "test_psnr_full"):
                writer.add_scalar(f"test/{k[5:]}", ev[k], iteration)
            writer.add_scalar("time/train_seconds", self.train_seconds, iteration)

    @torch.no_grad()
    def preview(self) -> Path:
        data = self.session.test_frames if len(self.session.test_frames) else self.session.train_frames
        batch = data.batch(torch.tensor([0]), self.device)
        out = self.session.render(batch, sh_degree=self.active_sh_degree(self.iteration))
        side = torch.cat([batch["gt"][0], out["image"][0]], dim=1)  # [H, 2W, 3]
        path = self.out / "previews" / f"{self.iteration:06d}.png"
        write_png(path, side)
        return path

    # ------------------------------------------------------------------------------------------- loop
    def run(self, max_steps: int | None = None) -> TrainResult:
        """Train up to ``train.iterations`` (or ``max_steps`` more steps); Ctrl-C saves and returns."""
        cfg = self.cfg.train
        self.out.mkdir(parents=True, exist_ok=True)
        config_mod.save(self.cfg, self.out / "config.yaml")
        if self.test_loss_start is None:
            self.test_loss_start = self.test_loss()
        end = cfg.iterations if max_steps is None else min(cfg.iterations, self.iteration + max_steps)
        writer = self._tensorboard()
        bar = None
        if cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.iterations, initial=self.iteration, desc="train", unit="it", dynamic_ncols=True)
        t0 = time.perf_counter()
        start_iteration, start_seconds = self.iteration, self.train_seconds
        clock = _TrainClock(self)  # training time: steps only, evaluation and I/O excluded
        interrupted = False
        timed_out = False
        smooth = None
        try:
            while self.iteration < end:
                if cfg.max_minutes and clock.seconds() - start_seconds > 60.0 * cfg.max_minutes:
                    timed_out = True
                    log.info("train.max_minutes=%g reached at iteration %d", cfg.max_minutes, self.iteration)
                    break
                terms = self.step()
                it = self.iteration
                if bar is not None:
                    bar.update(1)
                if it % cfg.log_every == 0 or it == end:
                    terms = self.floats(terms, it)
                    smooth = terms["total"] if smooth is None else 0.7 * smooth + 0.3 * terms["total"]
                    if bar is not None:
                        bar.set_postfix(loss=f"{smooth:.4f}", sh=self.active_sh_degree(it))
                    self.history.append({"iteration": it, **terms})
                    if writer is not None:
                        for k, v in terms.items():
                            writer.add_scalar(f"loss/{k}", v, it)
                evaluate = cfg.eval_every and it % cfg.eval_every == 0
                preview = cfg.preview_every and it % cfg.preview_every == 0
                checkpoint = cfg.checkpoint_every and it % cfg.checkpoint_every == 0 and it < end
                if evaluate or preview or checkpoint:
                    with clock.paused():
                        if evaluate:
                            self._record_eval(it, self.evaluate(), writer)
                        if preview:
                            self.preview()
                        if checkpoint:
                            self.save()
        except KeyboardInterrupt:
            interrupted = True
            log.warning("interrupted at iteration %d: saving a checkpoint", self.iteration)
        finally:
            clock.stop()
            if bar is not None:
                bar.close()
        seconds = time.perf_counter() - t0
        test_end = None
        final: dict[str, float] = {}
        if not interrupted and (self.iteration >= cfg.iterations or timed_out):
            final = self.evaluate()
            test_end = final["test_loss"]
            if not (cfg.eval_every and self.history and self.history[-1].get("iteration") == self.iteration
                    and "test_loss" in self.history[-1]):
                self._record_eval(self.iteration, final, writer)
            if cfg.preview_every:
                self.preview()
        path = self.save()
        if writer is not None:
            writer.close()
        result = TrainResult(self.iteration, interrupted, path, self.test_loss_start, test_end, self.history,
                             seconds, self.iteration - start_iteration, self.train_seconds, final, self.time_to_bar)
        self._write_summary(result)
        return result

    def _write_summary(self, result: TrainResult) -> None:
        """``<out>/train_summary.json``: speed, the evaluations over training time and the time to the bar."""
        evals = [h for h in self.history if "test_psnr_head" in h]
        best = max(evals, key=lambda h: h["test_psnr_head"], default=None)
        summary = {
            "iteration": result.iteration, "interrupted": result.interrupted,
            "train_seconds": result.train_seconds, "wall_seconds_this_call": result.seconds,
            "steps_this_call": result.steps,
            "it_per_s": result.steps / result.seconds if result.seconds > 0 else None,
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "cuda_graph": self.graph_note, "batch_size": self.cfg.train.batch_size,
            "eval_frames": min(len(self.session.test_frames), self.cfg.train.eval_frames),
            "psnr_bar": self.cfg.train.psnr_bar, "time_to_bar": self.time_to_bar,
            "final": result.final_eval or None, "best": best, "evals": evals,
        }
        atomic_write_text(self.out / "train_summary.json", json.dumps(summary, indent=1))

    def _tensorboard(self):
        if not self.cfg.train.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return None
        return SummaryWriter(str(self.out / "tensorboard"))


class _TrainClock:
    """Seconds spent training, accumulated into ``trainer.train_seconds``; ``paused()`` leaves out evaluation
    and I/O. On CUDA the pause synchronises first, so queued steps count as training time."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.since: float | None = time.perf_counter()

    def _sync(self) -> None:
        if self.trainer.device.type == "cuda":
            torch.cuda.synchronize(self.trainer.device)

    def seconds(self) -> float:
        running = time.perf_counter() - self.since if self.since is not None else 0.0
        return self.trainer.train_seconds + running

    def stop(self) -> None:
        if self.since is not None:
            self._sync()
            self.trainer.train_seconds += time.perf_counter() - self.since
            self.since = None

    @contextlib.contextmanager
    def paused(self):
        self.stop()
        try:
            yield
        finally:
            self.since = time.perf_counter()


def load_model_state(avatar, ckpt: dict[str, Any], path: Path) -> None:
    """Load the avatar's weights with an error that says which settings differ from the checkpoint's."""
    try:
        avatar.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        saved = ckpt.get("config", {}).get("model", {})
        raise RuntimeError(f"checkpoint {path} was trained with other model settings ({saved}); use the same "
                           f"model.* settings or a fresh --out folder ({str(exc).splitlines()[0]})") from None


# --------------------------------------------------------------------------------------------- command

def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by train and demo: preset, config file, dotted overrides."""
    parser.add_argument("--preset", choices=sorted(config_mod.PRESETS), default=None,
                        help="starting settings: 'gpu' (full) or 'cpu' (small, minutes on 2 cores); "
                             "default: gpu on a CUDA machine, else cpu")
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="YAML or JSON file overriding the preset (same nesting as the saved config.yaml)")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                        help="override one setting, e.g. --set train.iterations=2000 --set loss.w2_weight=0.05 "
                             "(repeatable)")


def config_from_args(args: argparse.Namespace, **extra: Any) -> Config:
    preset = args.preset or ("gpu" if torch.cuda.is_available() else "cpu")
    overrides = config_mod.parse_set(args.set)
    for section, values in extra.items():
        overrides.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
    return config_mod.make_config(preset, args.config, overrides)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", metavar="DIR", default=None,
                        help="dataset root holding <subject>/imgs, alpha, parsing (data.data_root)")
    parser.add_argument("--tracker", metavar="DIR", default=None,
                        help="tracker root holding <subject>/checkpoint/*.frame (default: same as --data)")
    parser.add_argument("--subject", default=None, help="subject folder name under --data (data.subject)")
    parser.add_argument("--head-model", metavar="PKL", default=None,
                        help="FLAME generic_model.pkl (or the synthetic head); default: the subject's own "
                             "head_model/ folder when present")
    parser.add_argument("--out", metavar="DIR", required=True,
                        help="run folder: checkpoints, config.yaml, previews, logs; an existing run is resumed")
    parser.add_argument("--iterations", type=int, default=None, help="total iterations (train.iterations)")
    parser.add_argument("--batch-size", type=int, default=None, help="frames per step (train.batch_size)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (train.device)")
    parser.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(
            args,
            data={"data_root": args.data, "tracker_root": args.tracker, "subject": args.subject},
            model={"head_model": args.head_model},
            train={"iterations": args.iterations, "batch_size": args.batch_size, "device": args.device,
                   "progress": False if args.no_progress else None},
        )
        trainer = Trainer(cfg, args.out, resume=not args.fresh)
    except (ValueError, FileNotFoundError, RuntimeError, KeyError) as exc:
        print(f"flashavatar train: error: {exc}")
        return 2
    result = report_training(trainer, trainer.run())
    return 130 if result.interrupted else 0


def report_training(trainer: Trainer, result: TrainResult) -> TrainResult:
    s = trainer.session
    print(f"avatar: {s.num_gaussians} Gaussians, {len(s.train_frames)} train / {len(s.test_frames)} test frames,"
          f" {s.width}x{s.height}, device {trainer.device}, rasteriser '{trainer.rasterizer_name}'")
    if result.interrupted:
        print(f"interrupted at iteration {result.iteration}; checkpoint saved to {result.checkpoint} "
              "(run the same command again to resume)")
    else:
        its = (result.steps / result.seconds) if result.seconds > 0 else math.nan
        print(f"trained to iteration {result.iteration} in {result.seconds:.1f} s ({its:.2f} it/s; "
              f"{result.train_seconds:.1f} s of training in all, evaluation excluded; {trainer.graph_note}); "
              f"test Huber loss {result.test_loss_start:.5f} -> {result.test_loss_end:.5f}; "
              f"checkpoint {result.checkpoint}")
    bar = trainer.cfg.train.psnr_bar
    if result.final_eval:
        fe = result.final_eval
        n = min(len(s.test_frames), trainer.cfg.train.eval_frames)
        print(f"test ({n} frames): head PSNR {fe['test_psnr_head']:.2f} dB, SSIM {fe['test_ssim_head']:.4f}; "
              f"full-frame PSNR {fe['test_psnr_full']:.2f} dB")
    ttb = result.time_to_bar
    evals = [h["test_psnr_head"] for h in result.history if "test_psnr_head" in h]
    if ttb is not None:
        print(f"time to the {bar:g} dB head-PSNR bar: {ttb['seconds']:.1f} s of training "
              f"(iteration {ttb['iteration']}, {ttb['test_psnr_head']:.2f} dB)")
    elif evals:
        print(f"the {bar:g} dB head-PSNR bar was not reached (best {max(evals):.2f} dB over {len(evals)} "
              "evaluations)")
    return result
