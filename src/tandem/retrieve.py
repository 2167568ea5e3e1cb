"""BM25 retrieval over a passage corpus, with bm25s (sparse-matrix BM25, fast to index and query)."""

from __future__ import annotations

import logging
import threading
from typing import Sequence

logging.getLogger("bm25s").setLevel(logging.WARNING)  # it logs index building at DEBUG


class BM25Retriever:
    """`retriever(query, k)` returns the k best passages as "Title | text" strings."""

    def __init__(self, passages: Sequence[str]):
        if not passages:
            raise ValueError("cannot index an empty corpus")
        # Imported here, not with the module: bm25s brings in numba, whose llvmlite objects break the
        # module scan vLLM's CPU worker runs at start-up (the worker re-imports `tandem`'s CLI).
        import bm25s

        self._tokenize = bm25s.tokenize
        self.passages = list(passages)
        self._index = bm25s.BM25()
        self._index.index(bm25s.tokenize(self.passages, stopwords="en", show_progress=False), show_progress=False)
        self._lock = threading.Lock()

    def __call__(self, query: str, k: int = 3) -> list[str]:
        tokens = self._tokenize([query], stopwords="en", return_ids=False, show_progress=False)
        if not tokens[0]:
            return []
        with self._lock:
            ids, scores = self._index.retrieve(tokens, k=min(k, len(self.passages)), show_progress=False)
        return [self.passages[i] for i, score in zip(ids[0], scores[0]) if score > 0]
