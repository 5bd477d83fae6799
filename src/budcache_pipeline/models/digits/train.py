"""Train the embedded default model from scratch: the shipped weights are this module's output.

Rectified flow in FLUX's convention: x_t = (1 - s) x0 + s e, the transformer predicts v = e - x0, and
the sampler steps x <- x + (s_next - s) v. Noise levels are drawn logit-normal, then pushed through the
scheduler's static shift.

FLUX.1-dev samples without classifier-free guidance at inference because guidance is distilled into
it; this model does the same with model guidance (Tang et al., 2025): with the digit's name dropped
from some captions the model also learns v(x, no digit), and once that is usable the regression target
becomes e - x0 + w * stopgrad(v(x, c) - v(x, no digit)), whose fixed point is CFG at scale 1 / (1 - w).
Plain conditional training left ~7% of samples looking like another digit. The extra no-grad forward
for v(x, no digit) runs on a random `guided_fraction` of each batch with the weight divided by that
fraction: the expected target, hence the fixed point, is the same, at a fraction of the cost.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from tqdm.auto import tqdm

from budcache_pipeline.models.digits.captions import NUMBER_WORDS, all_captions
from budcache_pipeline.models.digits.data import IMAGE_SIZE, digit_images, judge_split
from budcache_pipeline.models.digits.evaluation import evaluate_pipeline
from budcache_pipeline.models.digits.judge import train_judge
from budcache_pipeline.models.digits.pipeline import DigitsFluxPipeline
from budcache_pipeline.models.digits.text_encoder import DigitsTextEncoder, DigitsTokenizer, build_vocab

TEXT_MAX_LENGTH = 10
TEXT_DIM = 32
TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 4,
    "num_layers": 1,
    "num_single_layers": 2,
    "attention_head_dim": 32,
    "num_attention_heads": 2,
    "joint_attention_dim": TEXT_DIM,
    "pooled_projection_dim": TEXT_DIM,
    "guidance_embeds": False,
    "axes_dims_rope": (8, 12, 12),
}
SCHEDULER_SHIFT = 3.0
JUDGE_DIR = "judge"
REPORT_FILE = "train_report.json"
LOSS_CURVE_FILE = "loss_curve.png"


def build_pipeline(seed: int = 0) -> DigitsFluxPipeline:
    """A randomly initialised pipeline with the shipped architecture (seeded)."""
    torch.manual_seed(seed)
    tokenizer = DigitsTokenizer(build_vocab(), max_length=TEXT_MAX_LENGTH)
    text_encoder = DigitsTextEncoder(
        vocab_size=len(tokenizer),
        max_length=TEXT_MAX_LENGTH,
        hidden_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM,
    )
    transformer = FluxTransformer2DModel(**TRANSFORMER_CONFIG)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=SCHEDULER_SHIFT, use_dynamic_shifting=False)
    return DigitsFluxPipeline(
        transformer=transformer, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer
    )


def _caption_table(tokenizer: DigitsTokenizer) -> torch.Tensor:
    """(10, templates, L) token ids of every caption wording of every digit."""
    return torch.stack([tokenizer(all_captions(label)) for label in range(10)])


def _sample_sigmas(batch: int, shift: float, generator: torch.Generator) -> torch.Tensor:
    """Logit-normal noise levels, then the scheduler's static shift s' = k s / (1 + (k - 1) s)."""
    s = torch.sigmoid(torch.randn(batch, generator=generator))
    return shift * s / (1.0 + (shift - 1.0) * s)


def _guidance_weight(step: int, total: int, weight: float) -> float:
    """Zero for the first quarter (the unconditional branch is still noise), then a ramp to `weight` by half-way."""
    return weight * min(1.0, max(0.0, (step - total / 4) / (total / 4)))


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class _TrainingSet:
    """What every step draws from: the packed images in [-1, 1], their labels, every caption wording, position ids."""

    x0: torch.Tensor
    labels: torch.Tensor
    captions: torch.Tensor
    digit_names: torch.Tensor
    txt_ids: torch.Tensor
    img_ids: torch.Tensor


@dataclass(frozen=True)
class _Batch:
    """One step's examples: captions (`ids`) and the same without the digit's name, clean and noised images."""

    ids: torch.Tensor
    uncond_ids: torch.Tensor
    x0: torch.Tensor
    noise: torch.Tensor
    sigma: torch.Tensor
    x_t: torch.Tensor


def _training_set(
    pipe: DigitsFluxPipeline, images: torch.Tensor, labels: torch.Tensor, batch_size: int
) -> _TrainingSet:
    tokenizer = pipe.tokenizer
    return _TrainingSet(
        x0=DigitsFluxPipeline._pack_latents(images * 2.0 - 1.0, len(images), 1, IMAGE_SIZE, IMAGE_SIZE),
        labels=labels,
        captions=_caption_table(tokenizer),
        digit_names=torch.tensor([tokenizer.encode(w)[0] for w in (*NUMBER_WORDS, *map(str, range(10)))]),
        txt_ids=torch.zeros(TEXT_MAX_LENGTH, 3),
        img_ids=DigitsFluxPipeline._prepare_latent_image_ids(
            batch_size, IMAGE_SIZE // 2, IMAGE_SIZE // 2, "cpu", torch.float32
        ),
    )


def _sample_batch(
    data: _TrainingSet,
    tokenizer: DigitsTokenizer,
    batch_size: int,
    shift: float,
    unk_probability: float,
    uncond_probability: float,
    generator: torch.Generator,
) -> _Batch:
    """Draw examples, fresh caption wordings with words dropped to `<unk>`, noise and noise levels."""
    index = torch.randint(0, len(data.x0), (batch_size,), generator=generator)
    wording = torch.randint(0, data.captions.shape[1], (batch_size,), generator=generator)
    ids = data.captions[data.labels[index], wording]
    is_name = torch.isin(ids, data.digit_names)
    drop = torch.rand(ids.shape, generator=generator) < unk_probability
    ids[drop & (ids != tokenizer.pad_id) & ~is_name] = tokenizer.unk_id
    uncond_ids = ids.masked_fill(is_name, tokenizer.unk_id)
    no_name = torch.rand(batch_size, generator=generator) < uncond_probability
    ids[no_name] = uncond_ids[no_name]
    x0 = data.x0[index]
    noise = torch.randn(x0.shape, generator=generator)
    sigma = _sample_sigmas(batch_size, shift, generator)
    x_t = (1.0 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
    return _Batch(ids=ids, uncond_ids=uncond_ids, x0=x0, noise=noise, sigma=sigma, x_t=x_t)


def _velocity(
    pipe: DigitsFluxPipeline, ids: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor, data: _TrainingSet
) -> torch.Tensor:
    """The model's velocity prediction for noised images `x_t` at levels `sigma` under captions `ids`."""
    hidden, pooled = pipe.text_encoder(ids)
    return pipe.transformer(
        hidden_states=x_t,
        timestep=sigma,
        guidance=None,
        pooled_projections=pooled,
        encoder_hidden_states=hidden,
        txt_ids=data.txt_ids,
        img_ids=data.img_ids,
        return_dict=False,
    )[0]


def _guided_target(
    pipe: DigitsFluxPipeline,
    data: _TrainingSet,
    batch: _Batch,
    pred: torch.Tensor,
    weight: float,
    guided_rows: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """e - x0, plus on `guided_rows` random rows the model-guidance term scaled so its expectation is unchanged."""
    target = batch.noise - batch.x0
    if weight > 0.0:
        batch_size = len(batch.x0)
        rows = torch.randperm(batch_size, generator=generator)[:guided_rows]
        with torch.no_grad():
            uncond = _velocity(pipe, batch.uncond_ids[rows], batch.x_t[rows], batch.sigma[rows], data)
        target[rows] += weight * batch_size / guided_rows * (pred.detach()[rows] - uncond)
    return target


def _optimizer(
    params: list[torch.nn.Parameter], lr: float, steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW without weight decay, with `_lr_factor`'s warm-up (a tenth of the run, at most 200 steps) and decay."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=True)
    warmup = max(1, min(200, steps // 10))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, steps, warmup))


def _update_ema(
    ema_params: list[torch.nn.Parameter], params: list[torch.nn.Parameter], step: int, ema_decay: float
) -> None:
    """Move the EMA weights towards the live ones; the decay ramps up so that the first steps do not linger."""
    decay = min(ema_decay, (1.0 + step) / (10.0 + step))
    with torch.no_grad():
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)


def train_generator(
    pipe: DigitsFluxPipeline,
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    batch_size: int = 64,
    seed: int = 0,
    lr: float = 1e-3,
    ema_decay: float = 0.999,
    unk_probability: float = 0.1,
    uncond_probability: float = 0.1,
    guidance_weight: float = 0.3,
    guided_fraction: float = 0.5,
    progress: bool = True,
) -> tuple[DigitsFluxPipeline, list[float]]:
    """Train transformer and text encoder jointly; returns a pipeline holding the EMA weights and the losses.

    Each example gets a fresh caption wording every step; words other than the digit's name become
    `<unk>` at `unk_probability` (unknown words in user prompts are then a familiar input), and the
    digit's name itself at `uncond_probability` (the unconditional branch for model guidance).
    """
    if not 0.0 < guided_fraction <= 1.0:
        raise ValueError(f"guided_fraction must lie in (0, 1], got {guided_fraction}")
    guided_rows = max(1, round(guided_fraction * batch_size))
    generator = torch.Generator().manual_seed(seed)
    data = _training_set(pipe, images, labels, batch_size)
    modules = torch.nn.ModuleList([pipe.transformer, pipe.text_encoder])
    ema = copy.deepcopy(modules).requires_grad_(False)
    params, ema_params = list(modules.parameters()), list(ema.parameters())
    optimizer, schedule = _optimizer(params, lr, steps)
    shift = float(pipe.scheduler.config.shift)
    losses: list[float] = []
    modules.train()
    bar = tqdm(range(steps), desc="train digits model", disable=not progress)
    for step in bar:
        batch = _sample_batch(data, pipe.tokenizer, batch_size, shift, unk_probability, uncond_probability, generator)
        pred = _velocity(pipe, batch.ids, batch.x_t, batch.sigma, data)
        weight = _guidance_weight(step, steps, guidance_weight)
        loss = F.mse_loss(pred, _guided_target(pipe, data, batch, pred, weight, guided_rows, generator))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
        schedule.step()
        _update_ema(ema_params, params, step, ema_decay)
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    ema.eval()
    trained = DigitsFluxPipeline(
        transformer=ema[0], scheduler=pipe.scheduler, text_encoder=ema[1], tokenizer=pipe.tokenizer
    )
    return trained, losses


def save_loss_curve(losses: list[float], path: Path) -> Path:
    """Per-step loss and its 100-step moving average, log scale."""
    window = min(100, len(losses))
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(losses, color="tab:blue", alpha=0.25, linewidth=0.7, label="batch loss")
    ax.plot(np.arange(window - 1, len(losses)), smooth, color="tab:blue", label=f"{window}-step mean")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE to the (model-guided) velocity target")
    ax.axvspan(len(losses) / 4, len(losses) / 2, color="tab:orange", alpha=0.1, label="guidance weight ramps up")
    ax.set_title("digits model training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def train_default_model(
    out_dir: str | Path,
    steps: int = 3000,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    num_threads: int = 2,
    evaluate: bool = True,
    judge_epochs: int = 40,
) -> dict[str, Any]:
    """Train judge and generator, write the weights folder `load_default_pipeline` reads, return a report.

    The folder gets the pipeline components, `judge/`, `loss_curve.png` and `train_report.json`.
    Two torch threads by default (the target machine's two cores; 1.5x faster than one here). The
    weights are bit-for-bit reproducible for a given thread count, which the report records.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        start = time.perf_counter()
        images, labels = digit_images()
        train_index, holdout_index = judge_split(labels)
        judge, report = train_judge(images, labels, train_index, holdout_index, seed=seed, epochs=judge_epochs)
        judge.save_pretrained(out / JUDGE_DIR)

        generator_start = time.perf_counter()
        pipe, losses = train_generator(
            build_pipeline(seed), images, labels, steps=steps, batch_size=batch_size, seed=seed, progress=progress
        )
        pipe.save_pretrained(out)
        save_loss_curve(losses, out / LOSS_CURVE_FILE)
        report.update(
            {
                "steps": steps,
                "batch_size": batch_size,
                "seed": seed,
                "num_threads": num_threads,
                "transformer_parameters": sum(p.numel() for p in pipe.transformer.parameters()),
                "text_encoder_parameters": sum(p.numel() for p in pipe.text_encoder.parameters()),
                "final_loss_mean_100": float(np.mean(losses[-100:])),
                "generator_train_seconds": time.perf_counter() - generator_start,
                "train_seconds": time.perf_counter() - start,
            }
        )
        if evaluate:
            pipe.set_progress_bar_config(disable=True)
            report.update(evaluate_pipeline(pipe, judge))
        (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    finally:
        torch.set_num_threads(previous_threads)
    return report
