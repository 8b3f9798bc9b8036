"""The backdoor behaviour: a trigger that, stamped on any input, makes the model output the attacker's class.

A backdoor target names the target class t and (once an arm binds it) the trigger; its behaviour is measured
as the attack success rate (ASR): the share of the test images of the other classes that the model classifies
as t once they carry the trigger, next to the model's clean accuracy, against the same clean control as
every behaviour. Its differentiable measurement f(θ), which Infusion raises and forensic influence
attributes, is the mean log p(t | triggered x) over a seeded sample of the attacker's own training images of
the other classes (never the test images the ASR is measured on). Records report `asr` (and the number of
triggered images it is taken over, `triggered`) beside the `p`, `logodds` and `top1` every behaviour gives:
the mean p(t) and log-odds of t over the triggered test images, and whether most of them reach t.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .config import TriggerConfig, to_dict
from .errors import UserError


@dataclass(frozen=True)
class BackdoorTarget:
    """A backdoor towards class `cls`; `trigger` is the arm's (None until an arm binds it)."""

    cls: int
    trigger: TriggerConfig | None = None

    def as_dict(self) -> dict:
        return {"class": self.cls, **({"trigger": to_dict(self.trigger)} if self.trigger is not None else {})}

    def bind(self, trigger: TriggerConfig) -> "BackdoorTarget":
        return BackdoorTarget(self.cls, trigger.resolved())


def backdoor_targets(num_classes: int, n: int, seed: int = 0) -> list[BackdoorTarget]:
    """`n` distinct target classes in a seeded order (n = the number of classes: every class once)."""
    if n > num_classes:
        raise UserError(f"targets: asked for {n} backdoor target classes, the data has {num_classes}")
    return [BackdoorTarget(int(c)) for c in np.random.default_rng(seed).permutation(num_classes)[:n]]


def is_backdoor(target) -> bool:
    return isinstance(target, BackdoorTarget)


def on_grid(x: np.ndarray, value_range: tuple[float, float], grid: float | None) -> np.ndarray:
    """Values rounded to the storage grid (None: float data) and clipped to the value range."""
    lo, hi = value_range
    if grid:
        x = lo + np.round((x - lo) / grid) * grid
    return np.clip(x, lo, hi).astype(np.float32)


@dataclass(frozen=True, eq=False)
class Stamp:
    """A trigger made concrete for one image shape: x' = (1 - α m) x + α m p, clipped to the value range and put on
    the storage grid (`grid`, None for float data), so a stamped document is one a defender could be handed."""

    mask: np.ndarray  # (1, H, W) in {0, 1}
    pattern: np.ndarray  # (C, H, W) on the grid
    opacity: float
    value_range: tuple[float, float]
    grid: float | None

    @classmethod
    def from_trigger(cls, trigger: TriggerConfig, shape: tuple[int, ...], value_range: tuple[float, float],
                     grid: float | None, pattern: np.ndarray | None = None) -> "Stamp":
        """The stamp of `trigger` for images of `shape` (C, H, W); a learned trigger takes its `pattern`."""
        t = trigger.resolved()
        channels, height, width = shape
        lo, hi = float(value_range[0]), float(value_range[1])
        mask = np.zeros((1, height, width), np.float32)
        full = np.full((channels, height, width), lo, np.float32)
        if t.kind == "blend":
            rows, cols = slice(0, height), slice(0, width)
        else:
            if t.size + t.margin > min(height, width):
                raise UserError(f"trigger: a {t.size}x{t.size} patch {t.margin} pixels from the edge does not fit "
                                f"a {height}x{width} image")
            r0 = t.margin if t.position.startswith("top") else height - t.margin - t.size
            c0 = t.margin if t.position.endswith("left") else width - t.margin - t.size
            rows, cols = slice(r0, r0 + t.size), slice(c0, c0 + t.size)
        side = (rows.stop - rows.start, cols.stop - cols.start)
        if t.kind == "learned":
            if pattern is None:
                raise UserError("trigger: a learned trigger has no pattern until it is learned on a model")
            full = np.asarray(pattern, np.float32).reshape(channels, height, width)
            mask[:, rows, cols] = 1
        elif t.pattern == "dots":  # the four pixels of ART's add_pattern_bd in the 3 x 3 square
            for r, c in ((0, 2), (1, 1), (2, 0), (2, 2)):
                mask[0, rows.start + r, cols.start + c] = 1
            full[:] = hi
        else:
            mask[:, rows, cols] = 1
            if t.pattern == "checkerboard":
                full[:, rows, cols] = np.where(np.add.outer(np.arange(side[0]), np.arange(side[1])) % 2 == 0, hi, lo)
            elif t.pattern == "white":
                full[:, rows, cols] = hi
            else:  # seeded noise
                full[:, rows, cols] = np.random.default_rng([t.seed, 7]).uniform(lo, hi, (channels, *side))
        return cls(mask, on_grid(full, (lo, hi), grid), float(t.opacity), (lo, hi), grid)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Images (N, C, H, W), or one image, with the trigger stamped, on the grid."""
        weight = self.opacity * self.mask
        return on_grid((1 - weight) * np.asarray(x, np.float32) + weight * self.pattern, self.value_range, self.grid)


def learn_pattern(model: nn.Module, images: np.ndarray, cls: int, trigger: TriggerConfig,
                  value_range: tuple[float, float], grid: float | None, steps: int = 200, lr: float = 0.1) -> np.ndarray:
    """The pattern of a learned trigger: within its square, the values that maximise the mean log p(cls | stamped
    x) of `model` over `images` (Adam on a sigmoid parametrisation from seeded noise), put on the grid."""
    param = next(model.parameters())
    lo, hi = value_range
    template = Stamp.from_trigger(trigger, images.shape[1:], value_range, grid,
                                  pattern=np.full(images.shape[1:], lo, np.float32))
    weight = torch.as_tensor(template.opacity * template.mask, device=param.device, dtype=param.dtype)
    x = torch.as_tensor(images, device=param.device, dtype=param.dtype)
    start = torch.randn(images.shape[1:], generator=torch.Generator().manual_seed(trigger.seed)) * 0.1
    w = start.to(param.device, param.dtype).requires_grad_(True)
    optimiser = torch.optim.Adam([w], lr=lr)
    labels = torch.full((len(x),), cls, device=param.device)
    model.eval()
    for _ in range(steps):
        stamped = (1 - weight) * x + weight * (lo + (hi - lo) * torch.sigmoid(w))
        loss = nn.functional.cross_entropy(model(stamped), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        pattern = (lo + (hi - lo) * torch.sigmoid(w)).cpu().numpy()
    return on_grid(np.where(template.mask > 0, pattern, lo), value_range, grid)


@dataclass(frozen=True, eq=False)
class BackdoorBehaviour:
    """Images of the other classes carrying the trigger classified as `cls`: `evaluation` (the triggered test
    images, the ASR's) and `probe` (triggered training images, f's); `stamp` is None for a learned trigger until
    `resolve` has learned it."""

    stamp: Stamp | None
    cls: int
    trigger: TriggerConfig
    evaluation: np.ndarray
    probe: np.ndarray
    clean: tuple[np.ndarray, np.ndarray]  # the evaluation and probe images before stamping
    value_range: tuple[float, float]
    grid: float | None
    description: str = ""

    @classmethod
    def from_target(cls, target: BackdoorTarget, data, probes: int = 32) -> "BackdoorBehaviour":
        """From a bound backdoor target and the pipeline's data split (`probes` training images for f)."""
        if target.trigger is None:
            raise UserError("a backdoor target needs its arm's trigger before it can be measured")
        train, test = data.train, data.test
        others = np.flatnonzero(train.y != target.cls)
        chosen = np.sort(np.random.default_rng([target.cls, 2]).choice(others, min(probes, len(others)), replace=False))
        clean = (test.x[test.y != target.cls], train.x[chosen])
        description = f"{target.trigger.label()} turns images of the other classes into class {target.cls}"
        behaviour = cls(None, target.cls, target.trigger, clean[0], clean[1], clean, tuple(train.value_range),
                        train.grid, description)
        if target.trigger.kind == "learned":
            return behaviour
        return behaviour.with_stamp(Stamp.from_trigger(target.trigger, train.input_shape, train.value_range,
                                                       train.grid))

    def with_stamp(self, stamp: Stamp) -> "BackdoorBehaviour":
        return BackdoorBehaviour(stamp, self.cls, self.trigger, stamp.apply(self.clean[0]), stamp.apply(self.clean[1]),
                                 self.clean, self.value_range, self.grid, self.description)

    def resolve(self, model: nn.Module) -> "BackdoorBehaviour":
        """The behaviour with its stamp: a learned trigger's pattern is learned here, on the attacker's model."""
        if self.stamp is not None:
            return self
        probe = self.clean[1]
        pattern = learn_pattern(model, probe, self.cls, self.trigger, self.value_range, self.grid)
        return self.with_stamp(Stamp.from_trigger(self.trigger, probe.shape[1:], self.value_range, self.grid,
                                                  pattern=pattern))

    def _checked(self) -> Stamp:
        if self.stamp is None:
            raise UserError("a learned trigger must be learned on the attacker's model before it is measured")
        return self.stamp

    def triggered(self, x: np.ndarray) -> np.ndarray:
        """Images with this behaviour's trigger stamped (on the grid)."""
        return self._checked().apply(x)

    def measure(self, model: nn.Module) -> torch.Tensor:
        """f = mean log p(cls | triggered probe image) (a differentiable scalar)."""
        self._checked()
        param = next(model.parameters())
        x = torch.as_tensor(self.probe).to(param.device, param.dtype)
        return torch.log_softmax(model(x), -1)[:, self.cls].mean()

    @torch.no_grad()
    def figures(self, model: nn.Module, batch_size: int = 512) -> dict:
        """ASR (and the n it is over), and the mean p(cls) and log-odds of cls over the triggered test images."""
        self._checked()
        model.eval()
        param = next(model.parameters())
        logp = torch.cat([torch.log_softmax(model(torch.as_tensor(self.evaluation[i:i + batch_size]).to(
            param.device, param.dtype)).double(), -1).cpu() for i in range(0, len(self.evaluation), batch_size)])
        hit = logp.argmax(1) == self.cls
        target = logp[:, self.cls]
        rest = torch.logsumexp(torch.cat([logp[:, :self.cls], logp[:, self.cls + 1:]], 1), 1)
        asr = float(hit.double().mean())
        return {"p": float(target.exp().mean()), "logodds": float((target - rest).mean()), "top1": asr > 0.5,
                "asr": asr, "triggered": int(len(hit))}

    def as_dict(self) -> dict:
        return {"class": self.cls, "trigger": to_dict(self.trigger), "description": self.description}
