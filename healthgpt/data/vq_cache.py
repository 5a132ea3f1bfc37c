"""VQ ids of generation targets, computed once and cached on disk.

Key: the SHA-256 of the image file's bytes (so a renamed or copied file hits, an edited one
misses) under a folder named by the image tokenizer's fingerprint (its config and weights), so a
different tokenizer never reads another's ids. One ``.npy`` (int16, [num_tokens]) per image,
written atomically; readers never see a partial file, and concurrent writers (several ranks)
write identical bytes.

    cache = VQCache(root, tokenizer)        # tokenizer: healthgpt.model.vq.VQTokenizer
    ids = cache.encode_all(paths)           # {path: LongTensor[num_tokens]}; misses encoded in batches
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch
from tqdm.auto import tqdm

from hlora.files import atomic_write

from healthgpt.constants import FILE_DIGEST
from healthgpt.data.images import load_image

__all__ = ["VQCache", "file_digest", "tokenizer_fingerprint"]


def file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The hex ``FILE_DIGEST`` (SHA-256) of a file's bytes, read in ``chunk``-byte blocks."""
    h = hashlib.new(FILE_DIGEST)
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


@torch.no_grad()
def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 over the tokenizer's config and every tensor of its state dict (bytes, in key order)."""
    h = hashlib.sha256()
    cfg = getattr(tokenizer, "config", None)
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else {}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for key, t in sorted(tokenizer.state_dict().items()):
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


class VQCache:
    """On-disk cache of VQ ids for image files (module docstring)."""

    def __init__(self, root: str | os.PathLike, tokenizer, fingerprint: str | None = None):
        self.tokenizer = tokenizer
        self.fingerprint = fingerprint or tokenizer_fingerprint(tokenizer)
        self.dir = os.path.join(str(root), "vq", self.fingerprint)
        self.hits = 0
        self.misses = 0
        self._digests: dict = {}

    def _digest(self, path: str) -> str:
        st = os.stat(path)
        key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
        if key not in self._digests:
            self._digests[key] = file_digest(path)
        return self._digests[key]

    def path_for(self, image_path: str) -> str:
        d = self._digest(image_path)
        return os.path.join(self.dir, d[:2], d + ".npy")

    def get(self, image_path: str) -> torch.Tensor | None:
        p = self.path_for(image_path)
        if not os.path.isfile(p):
            return None
        try:
            arr = np.load(p)
        except (OSError, ValueError):  # unreadable: treat as a miss, it gets rewritten
            return None
        n = getattr(self.tokenizer, "num_tokens", None)
        if n is not None and arr.shape != (n,):
            return None
        return torch.from_numpy(arr.astype(np.int64))

    def put(self, image_path: str, ids: torch.Tensor) -> str:
        p = self.path_for(image_path)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        arr = ids.detach().to("cpu").numpy().astype(np.int16 if int(ids.max()) < 32768 else np.int32)
        atomic_write(p, lambda tmp: np.save(tmp, arr))
        return p

    def encode_all(self, paths, batch_size: int = 8, progress: bool = False) -> dict:
        """{path: ids} for every path; cached ones are read, the rest encoded (in batches) and stored."""
        unique = list(dict.fromkeys(str(p) for p in paths))
        out, todo = {}, []
        for p in unique:
            ids = self.get(p)
            if ids is None:
                todo.append(p)
            else:
                out[p] = ids
        self.hits += len(unique) - len(todo)
        self.misses += len(todo)
        if todo:
            bar = None
            if progress:
                bar = tqdm(total=len(todo), desc="VQ-encoding targets", unit="img")
            for i in range(0, len(todo), batch_size):
                chunk = todo[i : i + batch_size]
                ids = self.tokenizer.encode_images([load_image(p) for p in chunk]).cpu()
                for p, row in zip(chunk, ids):
                    self.put(p, row)
                    out[p] = row.to(torch.int64)
                if bar is not None:
                    bar.update(len(chunk))
            if bar is not None:
                bar.close()
        return out
