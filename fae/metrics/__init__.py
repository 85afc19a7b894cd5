"""Evaluation: Fréchet distances (FID, sFID, FD-DINOv2, rFID), Inception Score, precision/recall, PSNR/SSIM and
linear probing, with pluggable feature networks, cached features and ADM-compatible reference statistics.
docs/evaluation.md explains each metric and the paper's protocol."""
from fae.metrics.evaluate import evaluate_generation, evaluate_reconstruction, fid
from fae.metrics.features import (
                                  CallableSource,
                                  DatasetSource,
                                  FeatureSet,
                                  FolderSource,
                                  ImageSource,
                                  NpzSource,
                                  TensorSource,
                                  dataset_source,
                                  default_cache_dir,
                                  extract_features,
                                  open_images,
)
from fae.metrics.frechet import FrechetError, GaussianStats, StatsAccumulator, compute_stats, frechet_distance
from fae.metrics.inception import FIDInceptionV3, find_inception_weights, load_fid_inception
from fae.metrics.networks import EncoderNetwork, FeatureNetwork, InceptionNetwork, build_network, frechet_name
from fae.metrics.probe import ProbeConfig, ProbeResult, linear_probe, run_probe
from fae.metrics.recon import psnr, ssim
from fae.metrics.reference import Reference, load_reference, save_reference
from fae.metrics.report import EvalReport
from fae.metrics.scores import inception_score, manifold_radii, precision_recall

__all__ = [
    "evaluate_generation", "evaluate_reconstruction", "fid", "CallableSource", "FeatureSet", "FolderSource",
    "ImageSource", "NpzSource", "TensorSource", "default_cache_dir", "extract_features", "open_images",
    "FrechetError", "GaussianStats", "StatsAccumulator", "compute_stats", "frechet_distance", "FIDInceptionV3",
    "find_inception_weights", "load_fid_inception", "EncoderNetwork", "FeatureNetwork", "InceptionNetwork",
    "build_network", "frechet_name", "DatasetSource", "dataset_source",
    "ProbeConfig", "ProbeResult", "linear_probe", "run_probe", "psnr", "ssim", "Reference",
    "load_reference", "save_reference", "EvalReport", "inception_score", "manifold_radii", "precision_recall",
]
