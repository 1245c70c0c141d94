"""Synthetic LLM-like hidden states and a datastore built from them, for benchmarks without an LLM.

Sequences walk a Markov chain over clusters; a state is its cluster's centre plus a low-rank (latent)
offset plus a little isotropic noise, like LLM states whose intrinsic dimension is far below the
hidden size. The token a state "produces" is its cluster's token (mostly), so the first-token filter
and the merge do real work.

A datastore built in a work directory is kept there with its keys and the settings it was built
with, so a later run with the same settings only loads it (a large store built on a busy machine
can be re-timed on a quiet one).
"""

from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from build_tools.data import differences
from dresd_vllm.index.build import add_keys, auto_factory, new_index, set_search_defaults, train_index, train_rows
from dresd_vllm.store.atomic import write_atomic
from dresd_vllm.store.manifest import Manifest
from dresd_vllm.store.projection import Projection
from dresd_vllm.store.writer import token_store_from_sequences, write_datastore

_GEN_CHUNK = 32_768


class SyntheticCorpus:
    """A generator of token sequences and the hidden states that go with them (see the module doc).

    A state is built in a ``latent_dim``-dimensional space (cluster centre + an offset in
    ``local_dim`` directions of its own, the local intrinsic dimension), embedded into
    ``hidden_size`` dimensions with isotropic noise, then given LLM-like per-feature scales and
    offsets (a few huge "outlier" features), which the z-score must undo.
    """

    def __init__(
        self,
        hidden_size: int,
        num_clusters: int = 1024,
        latent_dim: int = 64,
        local_dim: int = 16,
        spread: float = 2.0,
        vocab_size: int = 32_000,
        seed: int = 0,
    ):
        rng = np.random.default_rng(seed)
        self.hidden_size = hidden_size
        self.vocab_size = vocab_size
        self.num_clusters = num_clusters
        self.centres = rng.standard_normal((num_clusters, latent_dim)).astype(np.float32)
        local = np.argsort(rng.random((num_clusters, latent_dim)), axis=1)[:, :local_dim]
        self.local_scale = np.zeros((num_clusters, latent_dim), dtype=np.float32)
        np.put_along_axis(self.local_scale, local, spread, axis=1)
        self.local_basis = (rng.standard_normal((latent_dim, latent_dim)) / np.sqrt(latent_dim)).astype(np.float32)
        self.embed = rng.standard_normal((latent_dim, hidden_size)).astype(np.float32)
        self.feature_scale = np.exp(rng.standard_normal(hidden_size)).astype(np.float32)
        self.feature_offset = (3 * rng.standard_normal(hidden_size)).astype(np.float32)
        self.successor = rng.integers(0, num_clusters, size=num_clusters)  # the chain's likely next cluster
        self.cluster_token = rng.integers(0, vocab_size, size=num_clusters)

    def sample(self, n: int, rng: np.random.Generator, seq_len: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """``n`` positions in sequences of ``seq_len``: (clusters int64 [n], tokens int32 [n]).

        ``tokens[i]`` is the token that position i's state produced.
        """
        clusters = np.empty(n, dtype=np.int64)
        jump = rng.random(n) < 0.3
        random_cluster = rng.integers(0, self.num_clusters, size=n)
        for i in range(n):  # a Markov chain is sequential: about 1 s per million positions
            starts = i % seq_len == 0 or jump[i]
            clusters[i] = random_cluster[i] if starts else self.successor[clusters[i - 1]]
        noisy = rng.random(n) < 0.1
        tokens = np.where(noisy, rng.integers(0, self.vocab_size, size=n), self.cluster_token[clusters])
        return clusters, tokens.astype(np.int32)

    def states(self, clusters: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Hidden states float32 ``[len(clusters), hidden_size]`` for the given clusters."""
        z = rng.standard_normal(self.local_scale[clusters].shape, dtype=np.float32) * self.local_scale[clusters]
        latent = self.centres[clusters] + z @ self.local_basis
        noise = rng.standard_normal((len(clusters), self.hidden_size), dtype=np.float32)
        return (latent @ self.embed + noise) * self.feature_scale + self.feature_offset


@dataclass(frozen=True)
class SyntheticSettings:
    """Everything a synthetic datastore's contents depend on (``factory`` resolved, never "auto")."""

    num_keys: int
    hidden_size: int
    pca_dim: int
    factory: str
    seed: int = 0
    local_dim: int = 16
    spread: float = 2.0
    n_next: int = 20
    seq_len: int = 512

    def corpus(self) -> SyntheticCorpus:
        """The corpus these settings generate (deterministic: the same states on every call)."""
        # About 1000 keys per cluster at every size, so neighbourhoods look alike from 1e3 to 1e7 keys.
        return SyntheticCorpus(
            self.hidden_size,
            num_clusters=max(8, self.num_keys // 1000),
            local_dim=self.local_dim,
            spread=self.spread,
            seed=self.seed,
        )


@dataclass
class SyntheticStore:
    """A synthetic datastore on disk, its corpus, its keys and how its build went."""

    path: Path
    corpus: SyntheticCorpus
    keys: np.ndarray  # [num_keys, pca_dim] fp16, the projected states the index was built from
    build_s: dict[str, float]  # seconds per stage of the build
    peak_rss_mb_build: float  # peak resident memory of the building process
    load_average_build: list[float]
    reused: bool  # True: loaded from an earlier run's build


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_datastore(
    path: Path, settings: SyntheticSettings
) -> tuple[SyntheticCorpus, np.ndarray, dict[str, float]]:
    """Write a synthetic datastore at ``path``; returns the corpus, the keys and build timings per stage."""
    s = settings
    corpus = s.corpus()
    rng = np.random.default_rng(s.seed + 1)
    t0 = time.perf_counter()
    clusters, produced = corpus.sample(s.num_keys, rng, s.seq_len)
    fit_rows = min(s.num_keys, 20_000)
    projection = Projection.fit(corpus.states(clusters[:fit_rows], rng), dim=s.pca_dim, seed=s.seed)
    keys = np.empty((s.num_keys, s.pca_dim), dtype=np.float16)
    for start in range(0, s.num_keys, _GEN_CHUNK):
        part = clusters[start : start + _GEN_CHUNK]
        keys[start : start + len(part)] = projection.transform(corpus.states(part, rng))
    # Position p of a sequence holds the token that position p - 1 produced (the first is a BOS-like 0),
    # so key i's value[0] = produced[i], the token its state produced.
    sequences = [
        np.concatenate(([0], produced[start : start + s.seq_len - 1]))[: min(s.seq_len, s.num_keys - start)]
        for start in range(0, s.num_keys, s.seq_len)
    ]
    tokens, offsets = token_store_from_sequences(sequences, s.n_next, eos_id=1)
    generate_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    index = new_index(s.pca_dim, s.factory)
    rows = train_rows(s.num_keys, index, s.seed)
    if len(rows):
        train_index(index, keys[rows], s.seed)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    add_keys(index, keys, 0)
    set_search_defaults(index)
    add_s = time.perf_counter() - t0
    manifest = Manifest(
        model="synthetic",
        hidden_size=s.hidden_size,
        vocab_size=corpus.vocab_size,
        tokenizer_fingerprint=None,
        template="{prompt}",
        n_next=s.n_next,
        pca_dim=s.pca_dim,
        num_keys=s.num_keys,
        index_factory=s.factory,
        build={"seed": s.seed, "generator": "benchmarks.synthetic.SyntheticCorpus"},
    )
    t0 = time.perf_counter()
    write_datastore(path, manifest, projection, index, tokens, offsets)
    stages = {"generate_s": generate_s, "train_s": train_s, "add_s": add_s, "write_s": time.perf_counter() - t0}
    return corpus, keys, stages


def open_or_build(work: Path, settings: SyntheticSettings) -> SyntheticStore:
    """The synthetic datastore ``work/datastore-N`` of ``settings``: loaded if an earlier run built it, else built.

    Next to it go its keys (``datastore-N.keys.npy``, for exact search) and ``datastore-N.json`` (the
    settings, the build's stage timings, peak memory and load average), written last, so an
    interrupted build is built again. One built with other settings is replaced.
    """
    if settings.factory == "auto":
        settings = SyntheticSettings(**{**asdict(settings), "factory": auto_factory(settings.num_keys)})
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"datastore-{settings.num_keys}"
    keys_path, record_path = path.with_name(path.name + ".keys.npy"), path.with_name(path.name + ".json")
    if record_path.exists() and keys_path.exists() and (path / "manifest.json").exists():
        record = json.loads(record_path.read_text())
        changed = differences(record["settings"], asdict(settings))
        if not changed:
            print(f"== {settings.num_keys} keys: reusing {path} (built {record['built']})", flush=True)
            return SyntheticStore(
                path,
                settings.corpus(),
                np.load(keys_path, mmap_mode="r"),
                record["build_s"],
                record["peak_rss_mb_build"],
                record["load_average_build"],
                reused=True,
            )
        print(f"== {path} was built with other settings ({'; '.join(changed)}): building it again", flush=True)
    print(f"== {settings.num_keys} keys: generating and building {settings.factory} ...", flush=True)
    record_path.unlink(missing_ok=True)
    corpus, keys, build_s = synthetic_datastore(path, settings)
    store = SyntheticStore(path, corpus, keys, build_s, peak_rss_mb(), list(os.getloadavg()), reused=False)

    def save_keys(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, keys)

    write_atomic(keys_path, save_keys)
    record = {
        "settings": asdict(settings),
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_s": build_s,
        "peak_rss_mb_build": store.peak_rss_mb_build,
        "load_average_build": store.load_average_build,
    }
    write_atomic(record_path, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))
    return store
