"""Adversarial post-training (APT) of a one-step generator, as an objective.

Lin et al. 2025, "Diffusion Adversarial Post-Training for One-Step Video Generation" (Seaweed-APT):
a one-step generator, distilled from a flow teacher, is trained further against real data with a
GAN loss, its discriminator initialised from the teacher's weights.

Time convention. Ours: ``t = 0`` noise, ``t = 1`` data. APT (a rectified flow with noise at
``t = 1``) uses the opposite: ``t_ours = 1 - t_theirs``, and the velocities change sign.

Generator. ``G(x0) = x0 + v_theta(x0, 0)``, one Euler step of the student's velocity from noise to
data (the one-step models of this package: ``distill``, ``cd``, ``ct``, or an earlier ``apt`` run),
``x0 ~`` the source, ``[B, *D]``. Its EMA is the trainer's.

Discriminator. ``D(x, t) -> [B]`` logits: the teacher flow's network (``apt.discriminator_init``; its
EMA weights, every parameter trained, or with ``apt.d_train=heads`` the heads alone on its frozen features;
``random``: the same architecture, freshly initialised) without
its velocity output layer, read at several depths, with logit heads on top:

- MLP: the activations of every hidden layer, concatenated (``[B, depth * hidden]``), normalised per
  sample by a LayerNorm without affine parameters (so layers of different scale weigh alike and the
  teacher's features start at unit scale), then one linear logit.
- With ``apt.fourier_features = m > 0`` (MLP only), a second head on the input itself, summed with
  the first: ``x`` ``[B, D]`` -> ``[sin(x W), cos(x W)]`` (``W`` ``[D, m]`` fixed, ``N(0, fourier_scale^2)``
  entries) -> linear -> SiLU -> one linear logit. A velocity network's features are smooth in ``x``
  (an MLP fed raw coordinates learns high frequencies last); on the toy tasks the one-step model's
  errors are small regions of excess or missing mass (bridges between modes), which a discriminator
  on raw coordinates did not resolve within hundreds of updates (its loss stayed at 2 ln 2), one on
  random Fourier features of ``x`` within tens.
- UNet: heads at several resolutions: the middle block's output (coarsest), the last up-path block at
  each resolution but the finest, and the output normalisation (finest); each head is SiLU -> 3x3
  conv -> SiLU -> 1x1 conv to one channel, averaged over positions; the heads' logits are summed.

``D`` is conditioned on a time ``t = 1 - s u / (1 + (s - 1) u)``, ``u ~ U(0, 1)``, with shift
``s = apt.t_shift`` (``s = 1``: uniform; ``s > 1`` moves the draws towards the noise end, the shift
of Esser et al. 2024 in APT's convention, then converted to ours), and fed clean samples: real
``x1 ~`` the target and generated ``G(x0)``, the same ``t`` for the ``i``-th real and fake rows. With
``apt.noise_inputs`` it is fed them noised to that time instead, as APT's and LADD's discriminators
are: ``x_t = t x + (1 - t) n`` with ``n ~ N(0, I)`` of its own for each real and each fake row (the
teacher's own inputs at ``t``; a ``t_shift`` below 1 moves ``t`` towards the data); R1 is then taken
at the noised real inputs.

Augmentation (``apt.augment``, images only; off by default): with few real images a discriminator
learns them by heart within a few hundred updates, and the generator it trains then degrades (on the
digits every run's validation FD rose after 100-300 updates, the sooner the faster ``lr_d``).
Differentiable augmentation (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN
Training") transforms every image the discriminator sees, real and generated, in both players' losses
and in R1, with transforms the generator's gradient passes through, so the discriminator cannot key
on exact pixels while the generator is still trained towards the real images' distribution:
``translation`` shifts each image by a whole number of pixels in ``[-r, r]`` per axis (``r`` = an eighth
of the side, at least 1), filling with -1 (black: the background of the digits datasets);
``cutout`` sets a square of half the side, at a uniform position (clipped at the border), to 0. Each
row draws its own shift and square, real and generated rows separately, from the run's stream.

Losses (per sample, averaged). Non-saturating (``apt.loss: ns``, APT's loss written on logits):
``L_D = softplus(-D(x1, t)) + softplus(D(G(x0), t))``, ``L_G = softplus(-D(G(x0), t))``. Relativistic
pairing (``relativistic``; RpGAN, Jolicoeur-Martineau 2019): ``L_D = softplus(-(D(x1, t) - D(G(x0), t)))``,
``L_G = softplus(-(D(G(x0), t) - D(x1, t)))``.

R1 on real samples (APT's approximated R1). ``approx``:
``lambda * mean_i (D(x1_i, t_i) - D(x1_i + sigma eps_i, t_i))^2``, ``eps ~ N(0, I)``, ``sigma`` a
standard deviation. For small ``sigma`` its expectation is ``lambda sigma^2 ||grad_x D||^2``, so
``exact`` is defined as that: ``lambda sigma^2 mean_i ||grad_x D(x1_i, t_i)||^2`` (R1's
``gamma / 2 = lambda sigma^2``); the same keys give the same strength in both modes. Defaults
``lambda = 100``, ``sigma = 0.01`` (APT's image values; the toy data have a scale of a few units, so
``sigma`` is a smaller relative nudge there: ``gamma / 2 = 0.01`` either way).

R2 (``apt.r2_lambda`` > 0; 0 by default, as in APT): the same penalty on the generated rows the
discriminator sees, in ``apt.r1``'s form with the same ``sigma`` (``approx``:
``lambda_2 mean_i (D(G(x0_i), t_i) - D(G(x0_i) + sigma eps'_i, t_i))^2``, ``eps'`` a draw of its own;
``exact``: ``lambda_2 sigma^2 mean_i ||grad_x D(G(x0_i), t_i)||^2``), logged as ``apt/r2``. APT's follow-up
(Lin et al. 2025, "Autoregressive Adversarial Post-Training for Real-Time Interactive Video Generation")
trains with the approximated R1 and R2 beside the relativistic loss, as R3GAN (Huang et al. 2024, "The GAN
is dead; long live the GAN!") does with the exact ones: R1 alone smooths the discriminator
at the data, R2 also where the generator's samples lie, the gradient the generator follows.

LeCam's regulariser (``apt.lecam_weight`` > 0; Tseng et al. 2021, "Regularizing Generative Adversarial
Networks under Limited Data", Eq. 3, in the one-sided form of their code) adds to the discriminator's loss
``lambda_LC mean_i [relu(D(x1_i, t_i) - a_fake)^2 + relu(a_real - D(G(x0_i), t_i))^2]``, ``a_real`` and
``a_fake`` the moving averages of the discriminator's mean logits on real and generated rows (decay
``apt.lecam_decay``, zero-debiased; each update's batch means enter before its penalty is taken, averaged
over the ranks under DDP so that every rank holds the same anchors; :class:`LogitAnchors`). Its optimum is
no longer the one that separates real from generated by the widest margin: with few real images the
discriminator's way to that margin is to learn the images by heart (``apt/d_fit`` above ``apt/d_heldout``),
and the penalty keeps its logits near the two anchors instead. Logged as ``apt/lecam`` (the penalty as
added); the anchors are state (exact resume).

Optimisers: RMSProp with ``alpha = 0.9`` for both players (as APT), learning rates
``apt.lr_g`` and ``apt.lr_d``, no weight decay, and no gradient clipping (``train.grad_clip`` must be
0). The discriminator updates ``apt.d_steps`` times per generator update (APT: once), and
``apt.d_warmup`` more times in the first step, before the generator's first update; each update draws
its own batch (:meth:`AdversarialPostTraining.player_updates`, :func:`discriminator_updates`).
``apt.real_from_teacher`` = f > 0 takes the first ``round(f B)`` rows of each real batch from the pair store's
teacher samples instead of the data: the discriminator's real side becomes a mix of the data (hard labels)
and the teacher's samples (soft labels), which it cannot learn by heart, so that with few training images the
generator is not drawn towards them alone (the optimum is the mix, nearer the data than the teacher).
``apt.regression_weight`` > 0 adds the one-step regression onto the run's pair store
(:class:`~flowmatch.training.objectives.OneStepDistill`, ``d(v(x0, 0), x1 - x0)``) to the generator's
loss with that weight: the teacher keeps the student near it while real data corrects it.

Distribution matching (``apt.dmd_weight`` > 0; DMD, Yin et al. 2024, "One-step Diffusion with Distribution
Matching Distillation", and DMD2, Yin et al. 2024, "Improved Distribution Matching Distillation", whose
one-step students beat their teachers with a GAN loss beside it). Beside the GAN loss, the generator
follows the gradient of ``KL(p_G || p_teacher)`` estimated by two flows at its samples noised to a time
``t ~ U(0.02, 0.98)`` (DMD2's range of the diffusion's steps, in our convention the same interval):
``x_t = t x + (1 - t) n``, ``n ~`` the run's source (the teacher's ``x0``: N(0, I), or 8 Gaussians on
8 Gaussians -> moons), ``x = G(x0)``; the teacher ``v_T`` (``apt.discriminator_init``,
frozen) and a fake flow ``v_F`` (player ``fake_score``: initialised from the teacher, trained by flow
matching on the generator's current samples, ``|| v_F(x_t, t) - (x - n) ||^2``, ``apt.fake_steps`` Adam
updates a step at ``apt.lr_fake``) each give a prediction of the clean sample,
``x_hat = x_t + (1 - t) v(x_t, t)`` (Tweedie's formula; DMD's ``mu = x_t - sigma_t eps_hat`` written for a
velocity; it is ``E[x_1 | x_t]`` only on the teacher's own straight path, so a teacher trained on another
path, or with ``path.sigma > 0``, is refused). The gradient with respect to ``x`` is ``(x_hat_F - x_hat_T) / w``, ``w`` the mean over the
sample's entries of ``|x - x_hat_T|`` (DMD's Eq. 8 weighting), applied through
``0.5 mean (x - sg(x - grad))^2`` (per sample, mean over entries; ``apt/dmd`` logs it, ``apt/fake_loss`` the
fake flow's loss). The time convention: DMD's ``x_t = alpha_t x + sigma_t eps`` with ``t = T`` noise is ours at
``1 - t``; only the interval enters, and it is symmetric. The teacher's evaluations (one per generated sample a
generator update) are counted in ``teacher_evals``. ``apt.adversarial_weight`` scales the GAN loss in the
generator's loss (0: DMD and the regression alone; the discriminator is still trained, for its logs).

Model selection: every ``apt.eval_every`` updates (and before the first) the EMA generator's samples
of fixed validation draws (``apt.eval_draws`` draws of ``apt.eval_n`` source points, the ``i``-th from
seed ``VALIDATION_SEED + 1000 i``, each with a scorer of that seed; the score is the mean over the
draws, so that a checkpoint is not chosen for one draw's matching noise; with ``apt.eval_noise=quasi``
the source points, and a toy task's reference, are quasi-random draws of that seed,
:meth:`~flowmatch.data.toy.ToyDistribution.quasi`: neither side carries i.i.d. share noise, and two
checkpoints' scores differ by a seventh to a tenth of an i.i.d. draw's scatter, README) are scored by
the task's scorer (:data:`VALIDATION_SCORERS`, registered by :mod:`flowmatch.evaluation`): toy tasks
by exact W2 against fresh target draws from the draw's seed ``+ 1`` (never the bench's seeds
0, 1, 2 or the evaluation's ``eval.seed``); image tasks by the classifier Fréchet distance against the
``val`` split (:func:`flowmatch.evaluation.validation_scorer`: training images held out of
``data.split=fit``, which the chain's APT stage trains the discriminator on; never the test split).
A checkpoint replaces the start only when its score is below the start's by more than
``apt.eval_min_gain`` (0: any gain), so that a gain within the validation's own scatter does not
swap a known model for one that is as likely worse, and (image runs on ``data.split=fit``) when its
validation ``copies`` (the memorisation check against the fit images, the val images as the new ones)
is at most ``apt.eval_max_copies`` (1: off); among those that do, the lowest score is kept.
The loop logs ``apt/val_w2`` (or ``apt/val_fd``, with ``apt/val_kid`` and on the fit split
``apt/val_copies``) and writes the best state as
``checkpoints/best.pt`` (with ``selection``: its step, metric and score).

Logged each log step (means over the interval): ``apt/d_loss`` (the adversarial part of the
discriminator's loss), ``apt/r1`` (the penalty as added; with R2 ``apt/r2``), ``apt/d_real`` and ``apt/d_fake`` (mean
logits on real and generated samples, from the discriminator's update), ``apt/g_loss`` (the
adversarial part of the generator's loss, before ``apt.adversarial_weight``), with a regression term
``apt/regression``, with distribution matching ``apt/dmd`` and ``apt/fake_loss``, and with LeCam's
regulariser ``apt/lecam``. With each
validation of an image run on the ``fit`` split, the discriminator's mean logits on fixed sets of
training images, held-out ``val`` images and generated samples: ``apt/d_fit``, ``apt/d_heldout`` and
``apt/d_gen`` (:meth:`AdversarialPostTraining.probe_discriminator`), whose gap ``d_fit - d_heldout``
shows the discriminator learning its training images by heart.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from flowmatch.config import from_dict
from flowmatch.couplings import PairedCoupling
from flowmatch.data.task import build_task, data_shape, is_image_task
from flowmatch.errors import ConfigError
from flowmatch.models import MLPVelocity, UNetVelocity, build_model
from flowmatch.models.unet import Upsample, _Level
from flowmatch.paths import get_path
from flowmatch.training import OBJECTIVES, Batch, Objective, OneStepDistill, cfm_loss, load_checkpoint, load_model
from flowmatch.training import distributed as dist_utils
from flowmatch.training.objectives import Validation, frozen_teacher
from flowmatch.types import LossOutput
from flowmatch.utils import expand_like, make_generator

__all__ = ["Discriminator", "AdversarialPostTraining", "one_step", "shifted_time", "discriminator_loss",
           "generator_loss", "approx_r1", "exact_r1", "augment_params", "augment", "discriminator_updates",
           "validation_draws", "dmd_gradient", "dmd_loss", "fake_updates", "lecam", "LogitAnchors",
           "ONE_STEP_OBJECTIVES", "VALIDATION_SCORERS", "VALIDATION_SEED"]

# objectives whose students are one-step generators x0 + v(x0, 0)
ONE_STEP_OBJECTIVES = ("distill", "cd", "ct", "apt")
# the validation draw's seed (source from it, the toy reference from it + 1 and + 2): none of the
# bench's (0, 1, 2), the few-step table's validation (10_007) or eval.seed's default (1234)
VALIDATION_SEED = 20_011
# DMD's times (DMD2: 0.02-0.98 of the diffusion's steps; the interval is symmetric, so the same in ours)
DMD_T_RANGE = (0.02, 0.98)
# the straight path DMD's noising and x_hat = x_t + (1 - t) v assume (the teacher's, and the fake flow's loss)
_STRAIGHT = get_path("linear")
# images in each of the discriminator probe's sets (AdversarialPostTraining.probe_discriminator)
PROBE_N = 200
# ``name -> (cfg, n, *, seed, device) -> scorer``, ``scorer(x1) -> dict`` with ``scorer.metric`` (``w2``
# or ``fd``) among its keys. Scoring lives in a higher layer: flowmatch.evaluation registers its
# make_scorer as "default" when imported (the CLI and the pipelines import it).
VALIDATION_SCORERS: dict[str, Callable] = {}


def one_step(v, x0: torch.Tensor) -> torch.Tensor:
    """``x0 + v(x0, 0)``: one Euler step from noise (``t = 0``) to data; ``x0`` ``[B, *D]`` -> ``[B, *D]``."""
    out = v(x0, torch.zeros(x0.shape[0], device=x0.device, dtype=x0.dtype))
    return x0 + out.to(x0.dtype)


def shifted_time(u: torch.Tensor, shift: float) -> torch.Tensor:
    """``1 - s u / (1 + (s - 1) u)`` for ``u`` ``[B]`` in [0, 1] (see the module docstring; ``s = 1``:
    ``1 - u``, uniform)."""
    return 1.0 - shift * u / (1.0 + (shift - 1.0) * u)


def discriminator_loss(d_real: torch.Tensor, d_fake: torch.Tensor, kind: str = "ns") -> torch.Tensor:
    """Per-sample ``L_D`` (``[B]``) from the logits on real and generated rows (``[B]`` each)."""
    if kind == "relativistic":
        return F.softplus(-(d_real - d_fake))
    return F.softplus(-d_real) + F.softplus(d_fake)


def generator_loss(d_real: Optional[torch.Tensor], d_fake: torch.Tensor, kind: str = "ns") -> torch.Tensor:
    """Per-sample ``L_G`` (``[B]``); ``d_real`` is read only by the relativistic loss."""
    if kind == "relativistic":
        return F.softplus(-(d_fake - d_real))
    return F.softplus(-d_fake)


def approx_r1(d, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, sigma: float,
              d_x: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(D(x, t) - D(x + sigma eps, t))^2`` per sample (``[B]``) for ``x``, ``eps`` ``[B, *D]``; ``d_x``
    is ``D(x, t)`` where the caller has it already. Its expectation over ``eps`` is
    ``sigma^2 ||grad_x D||^2 + O(sigma^4)``."""
    if d_x is None:
        d_x = d(x, t)
    return (d_x - d(x + sigma * eps, t)).pow(2)


def exact_r1(d, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``||grad_x D(x, t)||^2`` per sample (``[B]``), differentiable (``create_graph``)."""
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(d(x, t).sum(), x, create_graph=True)
    return grad.reshape(grad.shape[0], -1).pow(2).sum(1)


def lecam(d_real: torch.Tensor, d_fake: torch.Tensor, anchor_real: torch.Tensor,
          anchor_fake: torch.Tensor) -> torch.Tensor:
    """LeCam's penalty per sample (``[B]``): ``relu(d_real - anchor_fake)^2 + relu(anchor_real - d_fake)^2``,
    the logits on real and generated rows (``[B]`` each) against the moving averages of the other side's
    (scalars, no gradient)."""
    return F.relu(d_real - anchor_fake).pow(2) + F.relu(anchor_real - d_fake).pow(2)


class LogitAnchors:
    """LeCam's anchors: zero-debiased moving averages (decay ``decay``) of the discriminator's mean logit
    on real and on generated rows, one update per discriminator update."""

    def __init__(self, decay: float):
        self.decay, self.n = float(decay), 0
        self.acc: Optional[torch.Tensor] = None  # [2] float32 (real, fake), biased towards 0

    def update(self, d_real: torch.Tensor, d_fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Enter this update's batch means (averaged over the ranks); return the anchors ``(a_real, a_fake)``."""
        means = dist_utils.all_reduce_mean(torch.stack([d_real.detach().mean(), d_fake.detach().mean()]).float())
        if self.acc is None:
            self.acc = torch.zeros_like(means)
        self.acc = self.decay * self.acc.to(means.device) + (1.0 - self.decay) * means
        self.n += 1
        anchors = self.acc / (1.0 - self.decay ** self.n)
        return anchors[0], anchors[1]

    def state_dict(self) -> dict:
        return {"n": self.n, "acc": None if self.acc is None else self.acc.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        self.n = int(state.get("n", 0))
        self.acc = state.get("acc")


def discriminator_updates(apt: dict, steps: int) -> int:
    """The discriminator's optimiser updates in the first ``steps`` steps of a run with the ``apt``
    section ``apt`` (a config's dict): ``d_steps`` a step, and ``d_warmup`` in the first."""
    return steps * int(apt.get("d_steps", 1)) + (int(apt.get("d_warmup", 0)) if steps > 0 else 0)


def fake_updates(apt: dict, steps: int) -> int:
    """The fake flow's updates in ``steps`` generator updates of an APT run with section ``apt`` (a config's
    dict): ``fake_steps`` a step with distribution matching (``dmd_weight > 0``), none without."""
    return steps * int(apt.get("fake_steps", 1)) if float(apt.get("dmd_weight", 0.0)) > 0 else 0


def dmd_gradient(teacher, fake, x: torch.Tensor, t: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """DMD's gradient of ``KL(p_x || p_teacher)`` at the samples ``x`` ``[B, *D]`` (module docstring):
    ``(x_hat_fake - x_hat_teacher) / w`` with ``x_hat = x_t + (1 - t) v(x_t, t)`` at
    ``x_t = t x + (1 - t) n`` (``t`` ``[B]``, ``n`` ``[B, *D]``), ``w`` the per-sample mean of
    ``|x - x_hat_teacher|`` (at least 1e-8). Call it under ``torch.no_grad``."""
    tt = expand_like(t.to(x.dtype), x)
    xt = _STRAIGHT.sample(n, x, t).xt
    x_teacher = xt + (1 - tt) * teacher(xt, t).to(x.dtype)
    x_fake = xt + (1 - tt) * fake(xt, t).to(x.dtype)
    w = (x - x_teacher).abs().flatten(1).mean(1).clamp_min(1e-8)
    return (x_fake - x_teacher) / expand_like(w, x)


def dmd_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``[B]``: ``0.5 mean (x - sg(x - grad))^2`` over each sample's entries, whose gradient with respect to
    ``x`` is ``grad`` over the number of entries: DMD's update as a loss (``grad`` from :func:`dmd_gradient`)."""
    return 0.5 * (x - (x - grad).detach()).pow(2).flatten(1).mean(1)


def validation_draws(cfg, source, device="cpu") -> list[tuple[torch.Tensor, Callable]]:
    """APT's model-selection draws of the config ``cfg``: ``apt.eval_draws`` pairs of source points
    ``[apt.eval_n, *D]`` (on the CPU; i.i.d. from ``source``, or with ``apt.eval_noise=quasi`` its
    quasi-random draw) and the registered validation scorer, the ``i``-th of seed ``VALIDATION_SEED + 1000 i``.
    The objective selects its checkpoint on these; a script that scores another model on them (a teacher's
    point beside the runs') calls this too."""
    n, quasi, out = cfg.apt.eval_n, cfg.apt.eval_noise == "quasi", []
    for i in range(cfg.apt.eval_draws):
        seed = VALIDATION_SEED + 1000 * i
        x0 = source.quasi(n, seed=seed) if quasi else source.sample(n, generator=make_generator(seed), device="cpu")
        out.append((x0, VALIDATION_SCORERS["default"](cfg, n, seed=seed, device=device, quasi=quasi)))
    return out


def _max_shift(h: int, w: int) -> int:
    """The largest translation of an ``h`` x ``w`` image, in pixels: an eighth of the side, at least 1."""
    return max(1, round(min(h, w) / 8))


def augment_params(kinds: tuple[str, ...], shape: tuple, generator: torch.Generator,
                   device) -> dict[str, torch.Tensor]:
    """Each row's random transform of images of ``shape`` ``[B, C, H, W]`` (see the module docstring):
    ``shift`` ``[B, 2]`` (rows, columns) for ``translation``, ``corner`` ``[B, 2]`` (the square's top-left,
    possibly outside the image) for ``cutout``; drawn in the order of ``kinds``."""
    b, _, h, w = shape
    out = {}
    for kind in kinds:
        if kind == "translation":
            r = _max_shift(h, w)
            out["shift"] = torch.randint(-r, r + 1, (b, 2), generator=generator, device=device)
        elif kind == "cutout":
            sh, sw = h // 2, w // 2
            cy = torch.randint(0, h, (b,), generator=generator, device=device) - sh // 2
            cx = torch.randint(0, w, (b,), generator=generator, device=device) - sw // 2
            out["corner"] = torch.stack([cy, cx], dim=1)
    return out


def augment(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """``x`` ``[B, C, H, W]`` transformed row by row by :func:`augment_params`' draws (translation, then
    cutout); differentiable in ``x``."""
    b, _, h, w = x.shape
    if "shift" in params:
        shift, r = params["shift"], _max_shift(h, w)
        pad = F.pad(x, (r, r, r, r), value=-1.0)
        # every output pixel reads the padded input at its own position minus the row's shift
        ys = (torch.arange(h, device=x.device) + r).unsqueeze(0) - shift[:, :1]  # [B, H]
        xs = (torch.arange(w, device=x.device) + r).unsqueeze(0) - shift[:, 1:]  # [B, W]
        rows = torch.arange(b, device=x.device)[:, None, None]
        x = pad.permute(0, 2, 3, 1)[rows, ys[:, :, None], xs[:, None, :]].permute(0, 3, 1, 2)
    if "corner" in params:
        corner = params["corner"]
        ys, xs = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
        iny = (ys[None] >= corner[:, :1]) & (ys[None] < corner[:, :1] + h // 2)  # [B, H]
        inx = (xs[None] >= corner[:, 1:]) & (xs[None] < corner[:, 1:] + w // 2)  # [B, W]
        keep = ~(iny[:, :, None] & inx[:, None, :])
        x = x * keep[:, None].to(x.dtype)
    return x


class Discriminator(nn.Module):
    """``D(x, t) -> [B]`` logits on a velocity network's features at several depths (see the module
    docstring). ``backbone`` (an :class:`MLPVelocity` or :class:`UNetVelocity`) is taken over: its
    velocity output layer is replaced by an identity (its output is not a feature), the rest is
    :attr:`backbone`, every parameter trainable."""

    def __init__(self, backbone: nn.Module, fourier_features: int = 0, fourier_scale: float = 1.0):
        super().__init__()
        self.backbone = backbone
        self._feats: list[torch.Tensor] = []
        self.fourier = None
        if fourier_features > 0:
            if not isinstance(backbone, MLPVelocity):
                raise ConfigError(f"apt.fourier_features = {fourier_features}: the Fourier head reads vector data "
                                  f"(an MLP discriminator); got {type(backbone).__name__}; set apt.fourier_features=0")
            self.register_buffer("fourier_w", fourier_scale * torch.randn(backbone.dim, fourier_features))
            width = backbone.net[0].out_features
            self.fourier = nn.Sequential(nn.Linear(2 * fourier_features, width), nn.SiLU(), nn.Linear(width, 1))
        if isinstance(backbone, MLPVelocity):
            taps = [m for m in backbone.net[:-1] if not isinstance(m, nn.Linear)]  # the activations
            widths = [m.out_features for m in backbone.net[:-1] if isinstance(m, nn.Linear)]
            backbone.net[-1] = nn.Identity()
            self.norm = nn.LayerNorm(sum(widths), elementwise_affine=False)
            self.head = nn.Linear(sum(widths), 1)
            self.heads = None
        elif isinstance(backbone, UNetVelocity):
            up = list(backbone.up)
            taps = [backbone.mid[-1]] + [m for m, nxt in zip(up, up[1:]) if isinstance(nxt, Upsample)]
            widths = [m.res.conv2.out_channels for m in taps if isinstance(m, _Level)]
            taps.append(backbone.out_norm)
            widths.append(backbone.out_norm.num_channels)
            backbone.out_conv = nn.Identity()
            self.heads = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Conv2d(c, c, 3, padding=1), nn.SiLU(),
                                                     nn.Conv2d(c, 1, 1)) for c in widths)
        else:
            raise ConfigError(f"the APT discriminator reads the features of an MLP or a UNet velocity network; "
                              f"got {type(backbone).__name__}")
        for m in taps:
            m.register_forward_hook(self._keep)
        self.backbone.requires_grad_(True)

    def _keep(self, module, inputs, output) -> None:
        self._feats.append(output)

    def features(self, x: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's features at its tapped depths for ``x`` ``[B, *D]`` and ``t`` ``[B]``."""
        self._feats = []
        self.backbone(x, t)
        feats, self._feats = self._feats, []
        return feats

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        feats = self.features(x, t)
        if self.heads is None:
            logit = self.head(self.norm(torch.cat(feats, dim=1))).squeeze(1)
            if self.fourier is not None:
                z = x.reshape(x.shape[0], -1) @ self.fourier_w.to(x.dtype)
                logit = logit + self.fourier(torch.cat([z.sin(), z.cos()], dim=1)).squeeze(1)
            return logit.float()
        return sum(h(f).mean(dim=(1, 2, 3)) for h, f in zip(self.heads, feats)).float()


class AdversarialPostTraining(Objective):
    """APT (see the module docstring): players ``discriminator`` then ``student`` (the generator),
    each drawing its own batch and stepping its own RMSProp; with distribution matching the fake flow
    ``fake_score`` (Adam) between them."""

    name = "apt"
    section = "apt"
    players = ("discriminator", "student")
    # hooks collect the features, and exact R1 differentiates a gradient: kept eager
    compilable = False

    def __init__(self, cfg, comp):
        super().__init__(cfg, comp)
        ac = cfg.apt
        self.ac, self.batch_size = ac, cfg.train.batch_size
        self.regression = OneStepDistill(cfg, comp) if ac.regression_weight > 0 else None
        self.dmd = ac.dmd_weight > 0
        if self.dmd:  # the fake flow updates after the discriminator, before the generator
            self.players = ("discriminator", "fake_score", "student")
        self.teacher_evals = 0  # the DMD teacher's evaluations (per sample): the cost table's (state)
        self.augments = ac.augments
        self.anchors = LogitAnchors(ac.lecam_decay) if ac.lecam_weight > 0 else None  # LeCam's (state)
        self.best: Optional[dict] = None  # {"step", "score"} of the best validation so far (state)
        self.first: Optional[float] = None  # the first validation's score: the start's (state)
        self._val: Optional[tuple] = None  # (x0 [n, *D], scorer), built at the first validation
        self._disc: Optional[nn.Module] = None  # the discriminator (build_nets), read by the probe
        self._probe: Optional[dict] = None  # the probe's fixed inputs, built at its first call

    # -- inputs
    def check(self) -> None:
        cfg, ac = self.cfg, self.ac
        if cfg.model.class_cond:
            raise ConfigError("train.objective=apt does not take class labels yet; set model.class_cond=false")
        if cfg.train.grad_clip > 0:
            raise ConfigError(f"train.objective=apt trains without gradient clipping (APT): set train.grad_clip=0 "
                              f"(got {cfg.train.grad_clip})")
        init = cfg.train.init
        if init in ("auto", "random"):
            raise ConfigError(f"train.objective=apt post-trains a one-step generator: set train.init to its "
                              f"checkpoint (got train.init={init})")
        gen = self._config_of(init, "train.init")
        objective = gen.train.objective
        if objective not in ONE_STEP_OBJECTIVES:
            raise ConfigError(f"train.init {init} was trained with objective {objective!r}, not a one-step model "
                              f"(one of {', '.join(ONE_STEP_OBJECTIVES)})")
        if gen.lora.rank > 0:
            raise ConfigError(f"train.init {init} is a LoRA run's checkpoint: merge its adapter first "
                              f"(`flowmatch adapter merge`)")
        self._same_shape(gen, init, "train.init")
        if self.augments and len(data_shape(cfg.data)) != 3:
            raise ConfigError(f"apt.augment = {ac.augment}: augmentations transform images [C, H, W]; this run's "
                              f"data have shape {tuple(data_shape(cfg.data))}; set apt.augment=none")
        if ac.r2_lambda > 0 and ac.r1 == "none":
            raise ConfigError(f"apt.r2_lambda = {ac.r2_lambda} takes apt.r1's form (approx or exact), and apt.r1=none; "
                              f"set apt.r1=approx (apt.r1_lambda=0 turns R1 off) or apt.r2_lambda=0")
        if ac.fourier_features > 0 and cfg.model.name != "mlp":
            raise ConfigError(f"apt.fourier_features = {ac.fourier_features}: the Fourier head reads vector data "
                              f"(an MLP discriminator), this run's model is a {cfg.model.name}; set "
                              f"apt.fourier_features=0")
        if ac.discriminator_init is None:
            raise ConfigError("train.objective=apt needs apt.discriminator_init: the teacher flow's checkpoint "
                              "(or 'random' for a freshly initialised discriminator)")
        if self.dmd and ac.discriminator_init == "random":
            raise ConfigError(f"apt.dmd_weight = {ac.dmd_weight} matches the teacher's distribution: "
                              f"apt.discriminator_init must be the teacher flow's checkpoint, not 'random'")
        if ac.d_train == "heads" and ac.discriminator_init == "random":
            raise ConfigError("apt.d_train=heads freezes the teacher's backbone: a random one (apt.discriminator_init"
                              "=random) would be a fixed random network; set apt.d_train=all")
        if ac.discriminator_init != "random":
            teacher = self._config_of(ac.discriminator_init, "apt.discriminator_init")
            self._same_shape(teacher, ac.discriminator_init, "apt.discriminator_init")
            if (teacher.model.name, teacher.model.class_cond) != (cfg.model.name, cfg.model.class_cond):
                raise ConfigError(f"apt.discriminator_init {ac.discriminator_init} is a {teacher.model.name} "
                                  f"network, the generator a {cfg.model.name}: the discriminator's backbone must "
                                  f"have the generator's architecture")
            if self.dmd and (teacher.path.name != "linear" or teacher.path.sigma > 0):
                raise ConfigError(f"apt.dmd_weight = {ac.dmd_weight} denoises on the straight path: the teacher "
                                  f"{ac.discriminator_init} was trained on path.name={teacher.path.name}, "
                                  f"path.sigma={teacher.path.sigma} (needs linear, 0)")
        if self.regression is not None:
            try:
                self.regression.check()
            except ConfigError as e:
                raise ConfigError(f"apt.regression_weight = {ac.regression_weight} regresses the teacher's pairs: "
                                  f"{e}") from None
        if ac.real_from_teacher > 0 and (not isinstance(self.comp.coupling, PairedCoupling)
                                         or self.comp.real_coupling is not None):
            raise ConfigError(f"apt.real_from_teacher = {ac.real_from_teacher} reads the teacher's samples from a "
                              f"pair store: it needs coupling.name=paired with coupling.mix=1 (got coupling.name="
                              f"{cfg.coupling.name}, coupling.mix={cfg.coupling.mix})")
        # the source's draw, and a toy target's reference (an image target's is the val split)
        quasi_of = [self.comp.source] + ([self.comp.target] if hasattr(self.comp.target, "has_quasi") else [])
        lacking = [getattr(d, "name", repr(d)) for d in quasi_of if not getattr(d, "has_quasi", False)]
        if ac.eval_noise == "quasi" and lacking:
            raise ConfigError(f"apt.eval_noise=quasi: {lacking[0]!r} has no quasi-random draw (gaussian, 8gaussians "
                              f"and moons do); set apt.eval_noise=iid")
        if ac.eval_max_copies < 1 and (not is_image_task(cfg.data) or cfg.data.split != "fit"):
            raise ConfigError(f"apt.eval_max_copies = {ac.eval_max_copies}: the copies are counted against the fit "
                              f"images with the val images as new ones: an image run on data.split=fit (this run: "
                              f"data.target={cfg.data.target}, data.split={cfg.data.split}); set "
                              f"apt.eval_max_copies=1")
        if ac.eval_every > 0 and "default" not in VALIDATION_SCORERS:
            raise ConfigError("apt.eval_every > 0 scores the generator with flowmatch.evaluation's scorer: import "
                              "flowmatch.evaluation (the CLI and the pipelines do), or set apt.eval_every=0")

    def _config_of(self, path: str, key: str):
        try:
            return from_dict(load_checkpoint(path)["config"])
        except ConfigError as e:
            raise ConfigError(f"{key} {path} holds an invalid config: {e}") from None

    def _same_shape(self, other, path: str, key: str) -> None:
        got, want = tuple(data_shape(other.data)), tuple(data_shape(self.cfg.data))
        if got != want:
            raise ConfigError(f"{key} {path} was trained on data of shape {got}; this run's data have shape {want}")

    # -- networks
    def build_nets(self) -> dict:
        nets = self._build_discriminator()
        if self.dmd:  # the frozen teacher and the fake flow, both the teacher's weights to start
            path = self.ac.discriminator_init
            nets["teacher"] = frozen_teacher(path, self.cfg, "apt.discriminator_init", self.device)
            nets["fake_score"] = copy.deepcopy(nets["teacher"]).requires_grad_(True).train()
        return nets

    def _build_discriminator(self) -> dict:
        path = self.ac.discriminator_init
        if path == "random":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.cfg.train.seed + 1)
                backbone = build_model(self.cfg.model, data_shape(self.cfg.data), None)
                self._disc = Discriminator(backbone, self.ac.fourier_features,
                                           self.ac.fourier_scale).to(self.device)
                return {"discriminator": self._disc}
        backbone = load_model(path).model
        with torch.random.fork_rng(devices=[]):  # the heads' initialisation: fixed by the seed
            torch.manual_seed(self.cfg.train.seed + 1)
            disc = Discriminator(backbone, self.ac.fourier_features, self.ac.fourier_scale)
        if self.ac.d_train == "heads":  # FreezeD: the teacher's features fixed, the heads alone trained
            disc.backbone.requires_grad_(False)
        self._disc = disc.to(self.device).train()
        return {"discriminator": self._disc}

    def player_updates(self, player: str, step: int) -> int:
        """The discriminator: ``d_steps`` updates a step, ``d_warmup`` more in the first; the fake flow:
        ``fake_steps``; the generator: one."""
        if player == "fake_score":
            return self.ac.fake_steps
        if player != "discriminator":
            return 1
        return self.ac.d_steps + (self.ac.d_warmup if step == 1 else 0)

    def make_optimizer(self, player: str, params: list, impl: dict) -> torch.optim.Optimizer:
        if player == "fake_score":  # a flow trained by flow matching: Adam, as the teacher was
            return torch.optim.Adam(params, lr=self.ac.lr_fake, weight_decay=0.0, foreach=True)
        lr = self.ac.lr_d if player == "discriminator" else self.ac.lr_g
        return torch.optim.RMSprop(params, lr=lr, alpha=0.9, weight_decay=0.0, foreach=True)

    # -- draws and losses
    def draw(self, generator: torch.Generator) -> Batch:
        """Source ``x0``, real ``x1`` (with ``real_from_teacher`` its first rows replaced by the pair store's
        teacher samples, drawn after it), the discriminator's times ``t`` (``[B]``), R1's ``eps``, with
        ``noise_inputs`` the noise of the real and the fake inputs (``n_real``, ``n_fake``, ``[B, *D]``), with
        ``augment`` each row's transform of the real and the fake inputs (``shift_real``, ``corner_real``,
        ``shift_fake``, ``corner_fake``: :func:`augment_params`),
        with a regression term the pair store's batch (``more``) and, with distribution matching, its times
        ``dmd_t`` (``[B]``, uniform in ``DMD_T_RANGE``) and the source points it noises to, ``dmd_n``, and with
        R2 its ``eps_fake`` (``[B, *D]``), in this order."""
        b, dev = self.batch_size, self.device
        x0 = self.comp.source.sample(b, generator=generator, device=dev)
        x1 = self.comp.target.sample(b, generator=generator, device=dev)
        k = round(self.ac.real_from_teacher * b)
        if k > 0:  # the first k real rows: the teacher's samples (the pair store's x1)
            x1 = torch.cat([self.comp.coupling.sample(k, generator=generator).x1.to(dev, x1.dtype), x1[k:]])
        t = shifted_time(torch.rand(b, generator=generator, device=dev), self.ac.t_shift)
        extra = {"eps": torch.randn(x1.shape, generator=generator, device=dev, dtype=x1.dtype)}
        if self.ac.noise_inputs:
            extra["n_real"] = torch.randn(x1.shape, generator=generator, device=dev, dtype=x1.dtype)
            extra["n_fake"] = torch.randn(x1.shape, generator=generator, device=dev, dtype=x1.dtype)
        if self.augments:
            for which in ("real", "fake"):
                for k, v in augment_params(self.augments, tuple(x1.shape), generator, dev).items():
                    extra[f"{k}_{which}"] = v
        more = (self.regression.draw(generator),) if self.regression is not None else ()
        if self.dmd:
            lo, hi = DMD_T_RANGE
            extra["dmd_t"] = lo + (hi - lo) * torch.rand(b, generator=generator, device=dev)
            extra["dmd_n"] = self.comp.source.sample(b, generator=generator, device=dev)  # the teacher's x0
        if self.ac.r2_lambda > 0:  # last, so that a run without R2 draws what it drew before R2 existed
            extra["eps_fake"] = torch.randn(x1.shape, generator=generator, device=dev, dtype=x1.dtype)
        return Batch(t=t, x0=x0, x1=x1, more=more, extra=extra)

    def inputs(self, x: torch.Tensor, batch: Batch, which: str) -> torch.Tensor:
        """What the discriminator sees of ``x`` (``[B, *D]``, the ``which`` rows: ``real`` or ``fake``):
        ``x`` itself, with ``augment`` transformed (:func:`augment`), then with ``noise_inputs``
        ``t x + (1 - t) n`` at the batch's times."""
        if self.augments:
            x = augment(x, {k: batch.extra[f"{k}_{which}"] for k in ("shift", "corner")
                            if f"{k}_{which}" in batch.extra})
        if not self.ac.noise_inputs:
            return x
        t = expand_like(batch.t.to(x.dtype), x)
        return t * x + (1 - t) * batch.extra[f"n_{which}"]

    def _penalty(self, weight: float, d, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                 d_x: torch.Tensor) -> torch.Tensor:
        """R1 (or R2) at the rows ``x`` (``[B, *D]``, ``d_x = D(x, t)``) in ``apt.r1``'s form, times ``weight``:
        ``approx``: ``weight * mean (D(x) - D(x + sigma eps))^2``; ``exact``: ``weight sigma^2 mean ||grad_x D||^2``."""
        if self.ac.r1 == "approx":
            return weight * approx_r1(d, x, t, eps, self.ac.r1_sigma, d_x=d_x).mean()
        return weight * self.ac.r1_sigma ** 2 * exact_r1(d, x, t).mean()

    def loss(self, nets, batch: Batch, player: str = "student") -> LossOutput:
        d, g, kind, ac = nets["discriminator"], nets.student, self.ac.loss, self.ac
        if player == "fake_score":  # flow matching on the generator's samples
            with torch.no_grad():
                x = one_step(g, batch.x0)
            out = cfm_loss(nets["fake_score"], _STRAIGHT, batch.extra["dmd_n"], x, batch.extra["dmd_t"])
            out.extra = {"apt/fake_loss": out.loss.detach()}
            return out
        x1, t = self.inputs(batch.x1, batch, "real"), batch.t
        if player == "discriminator":
            with torch.no_grad():
                fake = self.inputs(one_step(g, batch.x0), batch, "fake")
            d_real, d_fake = d(x1, t), d(fake, t)
            adv = discriminator_loss(d_real, d_fake, kind)
            if ac.r1 != "none" and ac.r1_lambda > 0:
                r1 = self._penalty(ac.r1_lambda, d, x1, t, batch.extra["eps"], d_real)
            else:
                r1 = torch.zeros((), device=x1.device)
            extra = {"apt/d_loss": adv.mean().detach(), "apt/r1": r1.detach(),
                     "apt/d_real": d_real.mean().detach(), "apt/d_fake": d_fake.mean().detach()}
            total = adv.mean() + r1
            if ac.r2_lambda > 0:  # R2: R1's form on the generated rows
                r2 = self._penalty(ac.r2_lambda, d, fake, t, batch.extra["eps_fake"], d_fake)
                total = total + r2
                extra["apt/r2"] = r2.detach()
            if self.anchors is not None:
                lc = ac.lecam_weight * lecam(d_real, d_fake, *self.anchors.update(d_real, d_fake)).mean()
                total = total + lc
                extra["apt/lecam"] = lc.detach()
            return LossOutput(total, adv.detach(), t, extra=extra)
        x = one_step(g, batch.x0)
        d_fake = d(self.inputs(x, batch, "fake"), t)
        d_real = None
        if kind == "relativistic":
            with torch.no_grad():
                d_real = d(x1, t)
        adv = generator_loss(d_real, d_fake, kind)
        total, extra = ac.adversarial_weight * adv.mean(), {"apt/g_loss": adv.mean().detach()}
        if self.regression is not None:
            reg = self.regression.loss(nets, batch.more[0]).loss
            total = total + ac.regression_weight * reg
            extra["apt/regression"] = reg.detach()
        if self.dmd:
            with torch.no_grad():
                grad = dmd_gradient(nets["teacher"], nets["fake_score"], x.detach(), batch.extra["dmd_t"],
                                    batch.extra["dmd_n"])
            dmd = dmd_loss(x, grad).mean()
            total = total + ac.dmd_weight * dmd
            extra["apt/dmd"] = dmd.detach()
            self.teacher_evals += len(x)  # counted in the loss: APT's loss is never compiled
        return LossOutput(total, adv.detach(), t, extra=extra)

    # -- model selection
    def _validation(self) -> list[tuple[torch.Tensor, Callable]]:
        """The validation draws (:func:`validation_draws`), built once."""
        if self._val is None:
            self._val = validation_draws(self.cfg, self.comp.source, self.device)
        return self._val

    @torch.no_grad()
    def validate(self, step: int, model: nn.Module) -> Optional[Validation]:
        """Every ``apt.eval_every`` updates (step 0 included) and at the last: the EMA generator's score
        on the validation draw (``apt/val_<metric>`` and the scorer's other scores), ``best`` when it is
        below every earlier one and below the first (the start's) by more than ``apt.eval_min_gain`` (a
        non-finite score never is)."""
        every = self.ac.eval_every
        if every == 0 or (step % every and step != self.cfg.train.steps):
            return None
        chunk, per_draw = 2000, []
        for x0, scorer in self._validation():
            x1 = torch.cat([one_step(model, x0[i:i + chunk].to(self.device)).cpu()
                            for i in range(0, len(x0), chunk)])
            per_draw.append(scorer(x1))
        # each score's mean over the draws (one draw: its scores as they are)
        scores = {k: sum(float(d[k]) for d in per_draw) / len(per_draw) for k in per_draw[0]}
        score = float(scores[scorer.metric])
        if self.first is None:
            self.first = score
        # a later checkpoint replaces the start only when it beats it by more than apt.eval_min_gain
        # ... and, with apt.eval_max_copies, when it copies the fit images no more than that (a fraction:
        # the default 1 admits every checkpoint)
        copies = scores.get("copies")
        eligible = copies is None or copies <= self.ac.eval_max_copies
        best = math.isfinite(score) and (self.best is None or (
            eligible and score < self.best["score"] and score < self.first - self.ac.eval_min_gain))
        if best:
            self.best = {"step": int(step), "score": score, "metric": scorer.metric}
        logged = {f"apt/val_{k}": float(v) for k, v in scores.items()} | self.probe_discriminator(model)
        return Validation(logged, best, {"step": int(step), "metric": scorer.metric, "score": score})

    @torch.no_grad()
    def probe_discriminator(self, model: nn.Module) -> dict[str, float]:
        """The discriminator's mean logit on three fixed sets of ``PROBE_N`` images at fixed times: real
        images it trains on (``apt/d_fit``: the ``fit`` split), real images it never sees (``apt/d_heldout``:
        the ``val`` split) and the EMA generator ``model``'s samples (``apt/d_gen``). A discriminator that
        tells real from generated images scores both real sets above the generated one; one that learns
        its training images by heart scores the held-out ones as it scores generated ones, and
        ``d_fit - d_heldout`` grows (the overfitting that ADA, Karras et al. 2020, reads from the sign of
        ``D`` on training images). Image runs on ``data.split=fit`` only (elsewhere: ``{}``); no
        augmentation, with ``noise_inputs`` each set noised to the times by a fixed draw of its own; the
        draws come from a generator of their own (the run's stream is untouched)."""
        if self._disc is None or self.cfg.data.split != "fit" or not is_image_task(self.cfg.data):
            return {}
        if self._probe is None:
            g = make_generator(VALIDATION_SEED + 7)
            sets = {}
            for key, split in (("d_fit", "fit"), ("d_heldout", "val")):
                x, _ = build_task(self.cfg.data, split=split).target.tensors()
                sets[key] = x[torch.randperm(len(x), generator=g)[:PROBE_N]]
            n = min(len(x) for x in sets.values())
            sets = {k: x[:n] for k, x in sets.items()}
            sets["d_gen"] = self.comp.source.sample(n, generator=g, device="cpu")  # the source points
            t = shifted_time(torch.rand(n, generator=g), self.ac.t_shift)
            noise = {k: torch.randn(x.shape, generator=g) for k, x in sets.items()} if self.ac.noise_inputs else {}
            self._probe = {"sets": sets, "t": t, "noise": noise}
        probe, d, dev = self._probe, self._disc, self.device
        t = probe["t"].to(dev)
        mode, out = d.training, {}
        d.eval()
        try:
            for key, x in probe["sets"].items():
                x = x.to(dev)
                if key == "d_gen":
                    x = one_step(model, x)
                if key in probe["noise"]:
                    tt = expand_like(t.to(x.dtype), x)
                    x = tt * x + (1 - tt) * probe["noise"][key].to(dev, x.dtype)
                out[f"apt/{key}"] = float(d(x, t).mean())
        finally:
            d.train(mode)
        return out

    # -- state
    def state_dict(self) -> dict:
        state = {"best": dict(self.best) if self.best is not None else None, "first": self.first,
                 "teacher_evals": self.teacher_evals}
        if self.anchors is not None:
            state["lecam"] = self.anchors.state_dict()
        if self.regression is not None:
            state["regression"] = self.regression.state_dict()  # the pair store's position with it
        elif self.ac.real_from_teacher > 0:
            state["coupling"] = self.comp.coupling.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.best = dict(state["best"]) if state.get("best") is not None else None
        self.first = state.get("first", self.best["score"] if self.best is not None else None)
        self.teacher_evals = int(state.get("teacher_evals", 0))
        if self.anchors is not None:
            self.anchors.load_state_dict(state.get("lecam", {}))
        if self.regression is not None:
            self.regression.load_state_dict(state.get("regression", {}))
        elif self.ac.real_from_teacher > 0:
            self.comp.coupling.load_state_dict(state.get("coupling", {}))


OBJECTIVES[AdversarialPostTraining.name] = AdversarialPostTraining
