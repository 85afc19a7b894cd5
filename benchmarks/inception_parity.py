"""Parity of fae's FID Inception against pytorch-fid and torch-fidelity on the same weights.

Loads one state dict (random by default, or the real `pt_inception-2015-12-05-6726825d.pth` with --weights)
into fae's `FIDInceptionV3` and into the reference networks, feeds the same uint8 images, and prints the largest
feature differences:
  * torch-fidelity `inception-v3-compat` (TF-1 resize from uint8, (x-128)/128) vs fae resize="tf1":
    pool (2048), unbiased logits (1008), and the sFID tensor (Mixed_6d.branch1x1, first 7 channels);
  * pytorch-fid `InceptionV3` (F.interpolate on [0,1], 2x-1) vs fae resize="pytorch": pool and full logits.

torch-fidelity and pytorch-fid need torchvision, which does not install beside the torch pinned for fae's CPU
set-up, so run this from a separate environment:

    python3 -m venv /tmp/parity
    /tmp/parity/bin/pip install torch==2.14.1 torchvision==0.29.1 pytorch-fid torch-fidelity scipy pyyaml safetensors
    PYTHONPATH=. /tmp/parity/bin/python benchmarks/inception_parity.py [--weights pt_inception-...pth]

Results go to docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

import torch


def _import_references():
    try:
        import pytorch_fid.inception as pfid
        import torch_fidelity.feature_extractor_inceptionv3 as tfid
    except ImportError as exc:
        sys.exit(f"{exc}. This script needs pytorch-fid and torch-fidelity (and so torchvision); see the module "
                 "docstring for a separate venv that has them.")
    return pfid, tfid


def _images(seed: int) -> list[torch.Tensor]:
    """uint8 batches at sizes that exercise down-, up- and identity resizing, plus smooth (natural-ish) content."""
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, 256, (3, 3, s, s), generator=g, dtype=torch.uint8) for s in (32, 64, 256, 299, 512)]
    smooth = torch.nn.functional.interpolate(torch.rand(3, 3, 8, 8, generator=g), size=128, mode="bicubic")
    batches.append((smooth.clamp(0, 1) * 255).round().to(torch.uint8))
    return batches


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    diff = (a.double() - b.double()).abs().max().item()
    return diff, diff / max(b.double().abs().max().item(), 1e-12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", help="real weights file; default: a random state dict (seeded)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    pfid, tfid = _import_references()
    from fae.metrics.inception import load_fid_inception, random_inception_state

    with tempfile.TemporaryDirectory() as tmp:
        if args.weights:
            weights = Path(args.weights)
            state = torch.load(weights, map_location="cpu", weights_only=True)
        else:
            state = random_inception_state(args.seed)
            weights = Path(tmp) / "random_inception.pth"
            torch.save(state, weights)
        ours_tf1 = load_fid_inception(weights, resize="tf1")
        ours_pt = load_fid_inception(weights, resize="pytorch")

        fidelity = tfid.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                    feature_extractor_weights_path=str(weights))
        spatial_ref: list[torch.Tensor] = []
        fidelity.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: spatial_ref.append(o))
        # pytorch-fid downloads its weights inside fid_inception_v3(); hand it ours instead (strict load)
        pfid.load_state_dict_from_url = lambda *a, **k: {k2: v.clone() for k2, v in state.items()}
        pytorch_fid_pool = pfid.InceptionV3([pfid.InceptionV3.DEFAULT_BLOCK_INDEX]).eval()
        pytorch_fid_full = pfid.fid_inception_v3().eval()

    rows: dict[str, list[tuple[float, float]]] = {}
    with torch.no_grad():
        for batch in _images(args.seed):
            ours = ours_tf1(batch)
            spatial_ref.clear()
            pool_ref, logits_ref = fidelity(batch)
            sp = spatial_ref[0][:, :7].permute(0, 2, 3, 1).flatten(1)
            rows.setdefault("torch-fidelity pool 2048 (tf1)", []).append(_max_diff(ours["pool"], pool_ref))
            rows.setdefault("torch-fidelity logits_unbiased (tf1)", []).append(_max_diff(ours["logits"], logits_ref))
            rows.setdefault("torch-fidelity Mixed_6d.branch1x1[:7] (tf1)", []).append(_max_diff(ours["spatial"], sp))

            x01 = batch.float() / 255.0
            ours_p = ours_pt(batch)
            pool_p = pytorch_fid_pool(x01)[0].flatten(1)
            rows.setdefault("pytorch-fid pool 2048 (pytorch)", []).append(_max_diff(ours_p["pool"], pool_p))
            x299 = 2 * torch.nn.functional.interpolate(x01, size=(299, 299), mode="bilinear", align_corners=False) - 1
            full_logits = pytorch_fid_full(x299)
            our_full = ours_p["logits"] + ours_pt.fc.bias
            rows.setdefault("pytorch-fid fc logits (pytorch)", []).append(_max_diff(our_full, full_logits))
            # the two reference pipelines differ from each other: show by how much
            rows.setdefault("tf1 vs pytorch resize (fae, pool)", []).append(_max_diff(ours["pool"], ours_p["pool"]))

    import pytorch_fid
    import torch_fidelity
    print(f"# torch {torch.__version__}, pytorch-fid {pytorch_fid.__version__}, torch-fidelity "
          f"{torch_fidelity.__version__}, {platform.processor() or platform.machine()}")
    print(f"# weights: {args.weights or f'random (seed {args.seed})'}; image sizes 32, 64, 256, 299, 512, 128-smooth")
    print(f"{'comparison':48s} {'max |diff|':>12s} {'relative':>10s}")
    for name, values in rows.items():
        worst = max(values)
        print(f"{name:48s} {worst[0]:12.3e} {max(v[1] for v in values):10.3e}")


if __name__ == "__main__":
    main()
