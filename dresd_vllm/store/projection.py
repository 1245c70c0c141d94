"""The projection from a model's hidden state to a datastore key.

DReSD keys are ``l2_normalise(fp16(pca(zscore(h))))``. The build projects every
recorded state with this class and the proposer projects every query with it, so
the two can never drift apart.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

# Features whose sample std is below this are constant in practice (e.g. a
# dead channel); dividing by it would blow up noise, so they keep std = 1.
_MIN_STD = 1e-6
_FP16_MAX = float(torch.finfo(torch.float16).max)
_TENSORS = ("mean", "std", "components", "pca_mean")


class Projection:
    """z-score -> PCA(d) -> fp16 -> L2 normalise.

    The fitted mean/std and PCA are folded into one affine map
    ``y = h @ weight + bias`` (``weight [H, d]``, ``bias [d]``), so applying it
    is one GEMM on the device of the hidden states.
    """

    def __init__(self, mean: np.ndarray, std: np.ndarray, components: np.ndarray, pca_mean: np.ndarray):
        """``components [d, H]`` are PCA axes of the z-scored states, ``pca_mean [H]`` their mean."""
        # C order: safetensors writes the raw buffer, and sklearn's components_ can be Fortran-ordered.
        mean, std, components, pca_mean = (
            np.ascontiguousarray(a, dtype=np.float32) for a in (mean, std, components, pca_mean)
        )
        hidden_size = mean.shape[0]
        if (
            mean.shape != (hidden_size,)
            or std.shape != (hidden_size,)
            or pca_mean.shape != (hidden_size,)
            or components.ndim != 2
            or components.shape[1] != hidden_size
        ):
            raise ValueError(
                f"inconsistent projection shapes: mean {mean.shape}, std {std.shape}, "
                f"components {components.shape}, pca_mean {pca_mean.shape}; "
                f"expected [H], [H], [d, H], [H]"
            )
        self.mean, self.std, self.components, self.pca_mean = mean, std, components, pca_mean
        self.hidden_size = hidden_size
        self.dim = components.shape[0]
        # Fold in float64 so the folded map matches the step-by-step reference to fp32 precision.
        scaled = components.astype(np.float64) / std.astype(np.float64)[None, :]  # [d, H]
        bias = -(mean.astype(np.float64) @ scaled.T) - pca_mean.astype(np.float64) @ components.T
        self.weight = torch.from_numpy(scaled.T.astype(np.float32))  # [H, d]
        self.bias = torch.from_numpy(bias.astype(np.float32))  # [d]

    @classmethod
    def fit(cls, states: np.ndarray, dim: int = 64, sample_size: int | None = 100_000, seed: int = 0) -> Projection:
        """Fit mean/std and a ``dim``-component PCA on a random sample of ``states [N, H]``.

        ``sample_size=None`` uses every state.
        """
        from sklearn.decomposition import PCA

        states = np.asarray(states)
        if states.ndim != 2:
            raise ValueError(f"states must be [N, H], got shape {states.shape}")
        rng = np.random.default_rng(seed)
        if sample_size is not None and states.shape[0] > sample_size:
            rows = np.sort(rng.choice(states.shape[0], size=sample_size, replace=False))
            sample = states[rows]
        else:
            sample = states
        sample = sample.astype(np.float64)
        if not np.isfinite(sample).all():
            bad = int((~np.isfinite(sample).all(axis=1)).sum())
            raise ValueError(f"cannot fit the projection: {bad} of {len(sample)} sampled states have NaN/inf")
        if dim > min(sample.shape):
            raise ValueError(f"PCA dim {dim} exceeds min(sample rows, hidden size) = {min(sample.shape)}")
        mean = sample.mean(axis=0)
        std = sample.std(axis=0)
        std = np.where(std < _MIN_STD, 1.0, std)
        pca = PCA(n_components=dim, random_state=seed).fit((sample - mean) / std)
        return cls(mean, std, pca.components_, pca.mean_)

    def to(self, device: torch.device | str) -> Projection:
        """Move the folded map to ``device`` (in place; returns self)."""
        self.weight = self.weight.to(device)
        self.bias = self.bias.to(device)
        return self

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """Project ``hidden [B, H]`` (any float dtype, any device) to fp16 ``[B, d]`` unit rows.

        Raises ValueError when a row has NaN/inf (a check that waits for the device: the served
        path uses :meth:`project` and checks after its one copy back).
        """
        keys, finite = self.project(hidden)
        if not bool(finite.all()):
            bad = (~finite).nonzero().flatten().tolist()
            raise ValueError(f"hidden states contain NaN/inf in {len(bad)} of {hidden.shape[0]} rows (rows {bad[:8]})")
        return keys

    def project(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keys fp16 [B, d], finite bool [B])`` without waiting for the device: a row with NaN/inf
        comes out as zeros, with ``finite`` False."""
        if hidden.ndim != 2 or hidden.shape[1] != self.hidden_size:
            raise ValueError(f"hidden states must be [B, {self.hidden_size}], got {tuple(hidden.shape)}")
        if self.weight.device != hidden.device:
            self.to(hidden.device)
        # fp32 GEMM: bf16/fp16 inputs would lose the precision the z-score needs.
        y = torch.addmm(self.bias, hidden.float(), self.weight)
        finite = torch.isfinite(y).all(dim=1)
        y = y.masked_fill(~finite[:, None], 0.0)
        # Round through fp16 like the paper, but normalise in fp32: squaring fp16 overflows past 256.
        y = y.clamp(-_FP16_MAX, _FP16_MAX).half().float()
        return torch.nn.functional.normalize(y, dim=1).half(), finite

    def transform(self, states: np.ndarray, batch_size: int = 65_536) -> np.ndarray:
        """Project a NumPy array of states on the CPU in batches -> fp16 ``[N, d]`` (for the build)."""
        out = np.empty((states.shape[0], self.dim), dtype=np.float16)
        for start in range(0, states.shape[0], batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(states[start : start + batch_size]))
            out[start : start + len(chunk)] = self(chunk.to(self.weight.device)).cpu().numpy()
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write mean, std, components and pca_mean as float32 safetensors."""
        tensors = {name: getattr(self, name) for name in _TENSORS}
        save_file(tensors, str(path), metadata={"format": "dresd-projection"})

    @classmethod
    def load(cls, path: str | os.PathLike) -> Projection:
        """Read a projection written by :meth:`save`; ValueError naming the file if it is unusable."""
        path = Path(path)
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{path}: not a readable projection file ({e})") from e
        missing = [name for name in _TENSORS if name not in tensors]
        if missing:
            raise ValueError(f"{path}: missing tensors {missing}, expected {list(_TENSORS)}")
        try:
            return cls(*(tensors[name] for name in _TENSORS))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
