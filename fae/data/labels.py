"""Class labels are checked once, where they enter (a latent cache a stage trains on, the ids a sampler is given),
not inside model forwards: a range check on a device tensor is a host-device sync, once per forward call (twice
per guided sampling step), and it stops torch.compile from capturing the forward as one graph."""
from __future__ import annotations

import torch


def check_class_ids(ids: torch.Tensor, num_classes: int, what: str = "labels", null_ok: bool = False,
                    error: type[ValueError] = ValueError) -> None:
    """Raise `error` naming the ids outside [0, num_classes - 1] (or [0, num_classes] with `null_ok`: id
    num_classes is the null class of classifier-free guidance). One host sync, for the whole tensor."""
    if ids.device.type == "meta":  # shapes only: no values to check
        return
    top = num_classes if null_ok else num_classes - 1
    ids = ids.detach().reshape(-1).cpu()
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise error(f"{what} must be integer class ids, got dtype {ids.dtype}")
    bad = ids[(ids < 0) | (ids > top)]
    if bad.numel():
        null = f" ({num_classes} = the null class)" if null_ok else ""
        shown = sorted(set(bad.tolist()))
        raise error(f"{what} must lie in [0, {top}]{null}; got {shown[:10]}"
                    + (f" and {len(shown) - 10} more" if len(shown) > 10 else ""))
