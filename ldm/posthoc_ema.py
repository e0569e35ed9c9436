"""Post-hoc EMA (Karras et al. 2024, "Analyzing and improving the training dynamics of diffusion models", Sec. 3).

Training tracks a few power-function EMAs of the weights (``ldm.callbacks.posthoc_ema``): at step t,
theta_hat_t = beta_t theta_hat_{t-1} + (1 - beta_t) theta_t with beta_t = (1 - 1/t)^(gamma + 1), which averages the
weights seen so far with a weight proportional to tau^gamma. Its width is the relative standard deviation of that
profile, sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))), so one number describes the
EMA at any training length. Snapshots of the profiles are stored periodically; any other width at any stored
step is then reconstructed as the linear combination of snapshots whose averaging profiles best match its own in
the least-squares sense (the paper's Sec. 3): with p_{t,gamma}(tau) = (gamma + 1) tau^gamma /
t^(gamma + 1) on [0, t], the coefficients solve A x = b, A_ij = <p_i, p_j>, b_i = <p_i, p_target>, with
<p_i, p_j> = (gi + 1)(gj + 1) min(ti, tj)^(gi + gj + 1) / ((gi + gj + 1) ti^(gi + 1) tj^(gj + 1)).

Snapshot files: ``<dir>/snapshot-<step>.safetensors``, one tensor ``<k>/<name>`` per profile k and parameter, the
header's metadata holding the step and the profiles' sigma_rel and gamma.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

SNAPSHOT_GLOB = "snapshot-*.safetensors"


def gamma_of(sigma_rel: float) -> float:
    """The power-function exponent of an EMA of relative width ``sigma_rel``: the root > -1 of
    gamma^3 + 7 gamma^2 + (16 - 1/s^2) gamma + (12 - 1/s^2) = 0 (the definition of sigma_rel, rearranged)."""
    if not 0.0 < sigma_rel < 12 ** -0.5:  # sigma_rel(gamma -> -1) = 1 / sqrt(12): the widest, a uniform average
        raise ValueError(f"sigma_rel={sigma_rel}: expected a width in (0, {12 ** -0.5:.3f}) (the paper: 0.05-0.15)")
    inv = 1.0 / sigma_rel**2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    real = [r.real for r in roots if abs(r.imag) < 1e-9 and r.real > -1.0]
    return float(max(real))


def sigma_rel_of(gamma: float) -> float:
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def beta(step: int, gamma: float) -> float:
    """The power-function EMA's decay at ``step`` (1-based): (1 - 1/step)^(gamma + 1); 0 at step 1."""
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def _inner(t_a: np.ndarray, g_a: np.ndarray, t_b: np.ndarray, g_b: np.ndarray) -> np.ndarray:
    """<p_{t_a, g_a}, p_{t_b, g_b}> for arrays broadcast against each other (float64)."""
    m = np.minimum(t_a, t_b)
    exponent = g_a + g_b + 1.0
    # (ga + 1)(gb + 1) m^e / (e ta^(ga+1) tb^(gb+1)), in logs: the powers of ~1e6-step runs overflow otherwise
    log = (np.log(g_a + 1) + np.log(g_b + 1) + exponent * np.log(m) - np.log(exponent)
           - (g_a + 1) * np.log(t_a) - (g_b + 1) * np.log(t_b))
    return np.exp(log)


def solve_coefficients(steps: Sequence[float], gammas: Sequence[float], target_step: float,
                       target_gamma: float) -> np.ndarray:
    """Least-squares weights x of the snapshots (``steps[i]``, ``gammas[i]``) whose averaging profiles sum closest
    to the target's: A x = b with A_ij = <p_i, p_j>, b_i = <p_i, p_target>."""
    t = np.asarray(steps, dtype=np.float64)
    g = np.asarray(gammas, dtype=np.float64)
    a = _inner(t[:, None], g[:, None], t[None, :], g[None, :])
    b = _inner(t, g, np.float64(target_step), np.float64(target_gamma))
    x, *_ = np.linalg.lstsq(a, b, rcond=None)
    return x


def profile_error(steps: Sequence[float], gammas: Sequence[float], x: np.ndarray, target_step: float,
                  target_gamma: float) -> float:
    """|sum x_i p_i - p_target| / |p_target| (L2 over tau): how well the snapshots can express the target."""
    t = np.asarray(steps, dtype=np.float64)
    g = np.asarray(gammas, dtype=np.float64)
    a = _inner(t[:, None], g[:, None], t[None, :], g[None, :])
    b = _inner(t, g, np.float64(target_step), np.float64(target_gamma))
    c = _inner(np.float64(target_step), np.float64(target_gamma), np.float64(target_step), np.float64(target_gamma))
    return float(math.sqrt(max(x @ a @ x - 2 * x @ b + c, 0.0) / c))


@dataclass
class Snapshot:
    path: Path
    step: int
    sigma_rels: list[float]
    gammas: list[float]


def write_snapshot(folder: str | Path, step: int, sigma_rels: Sequence[float], gammas: Sequence[float],
                   profiles: Sequence[dict[str, torch.Tensor]], dtype: torch.dtype = torch.float32) -> Path:
    """One snapshot file of every profile's weights, written to a temporary name and renamed."""
    if not len(sigma_rels) == len(gammas) == len(profiles):
        raise ValueError(f"a snapshot needs one width and exponent per profile: got {len(sigma_rels)} widths, "
                         f"{len(gammas)} exponents and {len(profiles)} profiles")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"{k}/{name}": value.detach().to("cpu", dtype).contiguous()
               for k, profile in enumerate(profiles) for name, value in profile.items()}
    meta = {"step": str(step), "sigma_rels": json.dumps(list(sigma_rels)), "gammas": json.dumps(list(gammas))}
    path = folder / f"snapshot-{step:09d}.safetensors"
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def snapshot_folder(run: Path) -> Path:
    """A run folder's ``posthoc_ema/`` (where callbacks.posthoc_ema writes), or the folder itself."""
    return run / "posthoc_ema" if (run / "posthoc_ema").is_dir() else run


def list_snapshots(folder: str | Path) -> list[Snapshot]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such snapshot folder (a run's posthoc_ema/ folder, written by "
                                "callbacks.posthoc_ema)")
    snapshots = []
    for path in sorted(folder.glob(SNAPSHOT_GLOB)):
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        try:
            snapshots.append(Snapshot(path, int(meta["step"]), json.loads(meta["sigma_rels"]),
                                      json.loads(meta["gammas"])))
        except (KeyError, ValueError) as err:
            raise ValueError(f"{path}: not a post-hoc EMA snapshot ({err})") from err
    if not snapshots:
        raise FileNotFoundError(f"{folder}: no {SNAPSHOT_GLOB} files")
    return snapshots


def reconstruct(folder: str | Path, sigma_rel: float, step: int | None = None
                ) -> tuple[dict[str, torch.Tensor], dict]:
    """The weights of a power-function EMA of width ``sigma_rel`` at ``step`` (default: the last snapshot's),
    combined from the snapshots at or before it; returns them (float32) and a description (coefficients, the
    relative error of the matched profile)."""
    snapshots = list_snapshots(folder)
    step = step if step is not None else snapshots[-1].step
    used = [s for s in snapshots if s.step <= step]
    if not used:
        raise ValueError(f"step={step}: the first snapshot in {folder} is at step {snapshots[0].step}")
    terms = [(s, k, g) for s in used for k, g in enumerate(s.gammas)]
    target_gamma = gamma_of(sigma_rel)
    x = solve_coefficients([s.step for s, _, _ in terms], [g for _, _, g in terms], step, target_gamma)
    weights: dict[str, torch.Tensor] = {}
    for (snapshot, k, _), coef in zip(terms, x, strict=True):
        with safe_open(str(snapshot.path), "pt") as f:
            for key in f.keys():
                index, name = key.split("/", 1)
                if int(index) != k:
                    continue
                value = f.get_tensor(key).to(torch.float64) * float(coef)
                weights[name] = weights[name] + value if name in weights else value
    info = {"sigma_rel": sigma_rel, "gamma": target_gamma, "step": step, "snapshots": len(used),
            "profile_error": profile_error([s.step for s, _, _ in terms], [g for _, _, g in terms], x, step,
                                           target_gamma)}
    return {k: v.float() for k, v in weights.items()}, info
