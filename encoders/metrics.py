"""Retrieval recall at k, scored the standard Flickr/COCO way, in plain numpy.

Each caption is one text query (text->image: a hit when its own image is in the top k); each
image is one image query (image->text: a hit when ANY of its captions is in the top k).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def retrieval_recall(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    text_to_image: Sequence[int] | np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@k both ways for embeddings scored by dot product (pass L2-normalised rows for cosine).

    `text_to_image[j]` is the row of `image_emb` that caption `j` describes. Returns fractions in
    [0, 1] under keys `t2i_r{k}` and `i2t_r{k}`. Ties are broken against the query (a tied wrong
    item counts as ranked above the right one), so constant embeddings score near chance, not 1.
    """
    image_emb = np.asarray(image_emb, dtype=np.float32)
    text_emb = np.asarray(text_emb, dtype=np.float32)
    owner = np.asarray(text_to_image, dtype=np.int64)
    n_img, n_txt = len(image_emb), len(text_emb)
    if owner.shape != (n_txt,):
        raise ValueError(f"text_to_image has shape {owner.shape}, expected ({n_txt},)")
    if n_txt and (owner.min() < 0 or owner.max() >= n_img):
        raise ValueError("text_to_image holds an index outside the image rows")
    scores = text_emb @ image_emb.T  # (n_txt, n_img)

    # text -> image: rank of the true image = number of images scoring >= it, minus itself.
    true = scores[np.arange(n_txt), owner]
    t2i_rank = (scores >= true[:, None]).sum(1) - 1

    # image -> text: rank of the image's best-scoring own caption among all other captions.
    own = owner[:, None] == np.arange(n_img)[None, :]  # (n_txt, n_img)
    best = np.where(own, scores, -np.inf).max(0) if n_txt else np.full(n_img, -np.inf)
    i2t_rank = ((scores >= best[None, :]) & ~own).sum(0)
    has_text = own.any(0)

    out: dict[str, float] = {}
    for k in ks:
        out[f"t2i_r{k}"] = float((t2i_rank < k).mean()) if n_txt else 0.0
    for k in ks:
        out[f"i2t_r{k}"] = float((i2t_rank[has_text] < k).mean()) if has_text.any() else 0.0
    return out
