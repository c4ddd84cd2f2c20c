"""Analysis tools over trained adapters and runs (``peftlab analyze ...``); each writes a PNG and a JSON.

* :mod:`.subspace` — normalized subspace similarity phi(i, j) between two LoRA adapters (Hu et al. 2021, Fig. 3);
* :mod:`.amplification` — how much a LoRA update amplifies directions of W (Hu et al. 2021, Table 7);
* :mod:`.prompt_tokens` — nearest vocabulary tokens of each soft-prompt vector (cosine);
* :mod:`.intrinsic_dim` — the d90 sweep of intrinsic-dimension training (Aghajanyan et al. 2020).

Layering: this package sits at the ``lab`` level (it may import ``lab``, ``methods``, ``models``); nothing below
imports it.
"""
