"""Settings of the recurrent binarizer, apart from the model so that reading them needs no torch."""

from __future__ import annotations

from dataclasses import dataclass

from index import sdc


@dataclass(frozen=True)
class BinarizerConfig:
    """Model size and training settings; 0 for `code_dims` / `hidden` picks them from the dim."""

    bits: int = 2
    #: m; 0 = the embedding dim rounded up to 64 (packing pads to 64 bits anyway).
    code_dims: int = 0
    #: Width of the residual MLPs; 0 = max(128, dim, m). At least max(dim, m): training starts
    #: from a linear code carried through the first units.
    hidden: int = 0
    #: Residual blocks per MLP (0 = a linear map).
    blocks: int = 1
    epochs: int = 6
    train_sample: int = 20_000
    batch_size: int = 512
    learning_rate: float = 3e-3
    #: Candidates of an anchor: this many of its `neighbour_pool` nearest float neighbours.
    neighbour_pool: int = 100
    neighbour_samples: int = 8
    #: Softmax temperature of teacher and student. The teacher's similarities are first divided
    #: by the anchor's neighbourhood spread (its nearest minus its neighbour_pool-th similarity),
    #: so it is as sharp on data with compressed similarities as on data with spread ones.
    temperature: float = 0.15
    seed: int = 0
    #: Torch threads while training and encoding; fixed so that a seed gives the same codes anywhere.
    threads: int = 1

    def __post_init__(self) -> None:
        checks = {
            "bits": 1 <= self.bits <= 8, "code_dims": self.code_dims >= 0, "hidden": self.hidden >= 0,
            "blocks": self.blocks >= 0, "epochs": self.epochs >= 1, "train_sample": self.train_sample >= 2,
            "batch_size": self.batch_size >= 2, "learning_rate": self.learning_rate > 0,
            "neighbour_pool": self.neighbour_pool >= 1, "neighbour_samples": self.neighbour_samples >= 1,
            "temperature": self.temperature > 0, "threads": self.threads >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"BinarizerConfig: invalid {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)}")

    def dims_for(self, dim: int) -> tuple[int, int]:
        """(m, hidden) for embeddings of `dim`."""
        m = self.code_dims or sdc.words_for(dim) * sdc.WORD_BITS
        return m, self.hidden or max(128, dim, m)
