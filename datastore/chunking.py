"""Fixed-size word chunking as in MassiveDS: passages of N words, the title kept with each."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChunkConfig:
    words: int = 256
    overlap: int = 0

    def __post_init__(self) -> None:
        if self.words <= 0:
            raise ValueError(f"chunk words must be positive, got {self.words}")
        if not 0 <= self.overlap < self.words:
            raise ValueError(f"chunk overlap must be in [0, {self.words}), got {self.overlap}")


def chunk_words(text: str, config: ChunkConfig) -> list[str]:
    """Split on whitespace into windows of `words` words that start every `words - overlap`.

    The last window may be shorter; no window is only the overlap of the one before it.
    """
    words = text.split()
    if not words:
        return []
    step = config.words - config.overlap
    chunks = []
    for start in range(0, len(words), step):
        chunks.append(" ".join(words[start:start + config.words]))
        if start + config.words >= len(words):
            break
    return chunks
