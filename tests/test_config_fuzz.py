"""Property test: random config overrides and command lines give a run plan or a clean error, never a traceback.
`fae summary` parses a config, applies the overrides, validates and builds every network on the meta
device: the same path `fae train` takes before its first step."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fae.cli import main
from fae.config import to_dict
from fae.stages import load_stage_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "fae" / "configs").glob("*/*.yaml"))


def _keys(data: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in data.items():
        keys += _keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return keys


def _config_keys(path: Path) -> list[str]:
    _, cfg = load_stage_config(path, ["finetune_from=x", "fae=y"] if "finetune" in path.name else [])
    return _keys(to_dict(cfg))


VALUES = st.one_of(
    # sizes a user mistypes (zero, negative, odd, not divisible), not 10**12 layers: those are a plan too, and
    # building one would only take long
    st.integers(-3, 3), st.sampled_from([7, 33, 1000, -1000]), st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(), st.sampled_from(["null", "[]", "[1, 2]", "{}", "x", "''", "auto", "fp32", "[0, 0]", "1e999",
                                    "{a: 1}", "---", "[", "!!python/object:os.system ls"]),
    st.text(max_size=8),
)


def _run(argv: list[str]) -> int:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:          # argparse's usage error
            code = int(exc.code or 0)
    assert code in (0, 1, 2), code
    if code == 1:
        assert err.getvalue().startswith("fae: error: "), err.getvalue()
    return code


@pytest.mark.parametrize("config", CONFIGS, ids=[f"{p.parent.name}/{p.stem}" for p in CONFIGS])
def test_random_overrides_give_a_plan_or_a_clean_error(config):
    keys = _config_keys(config) + ["model.bogus", "bogus", "train.steps.x", "data"]
    base = ["summary", str(config)]
    if "finetune" in config.name:
        base.append("decoder.width=64")     # fine-tuning configs take their decoder from a bundle

    @settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(st.sampled_from(keys), VALUES), max_size=3))
    def check(overrides):
        _run(base + [f"{k}={v}" for k, v in overrides])

    check()
    assert _run(base) == 0        # the base plans, so the overrides above are what is refused


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.sampled_from(["summary", "train", "sample", "encode", "eval", "fid", "recon", "probe", "--config",
                                 "--out", "--dit", "--fae", "--steps", "-n", "x", "0", "-1", "nan", "/nonexistent",
                                 "--guidance", "paper", "2:1", "--labels", "9,9", "--help-me"]), max_size=6))
def test_random_command_lines_never_raise(argv):
    if "train" in argv or "encode" in argv:   # could start real work on a valid guess; not this test's job
        argv = [a for a in argv if a not in ("train", "encode")]
    _run(argv)


@pytest.fixture(scope="module")
def bundles(tiny_latent_world, tmp_path_factory):
    """Real inputs for `fae encode` and `fae sample` (a tiny FAE, its pipeline bundle, a latent cache and an untrained
    DiT bundle exported on it), and wrong ones: a missing path, a file, a bundle of the wrong kind, bad YAML."""
    from fae.data.latents import LatentCache
    from fae.generators import DiTGenerator, GeneratorRecord
    from fae.models.dit import DiT, DiTConfig

    w, root = tiny_latent_world, tmp_path_factory.mktemp("fuzz")
    dit = DiT(DiTConfig(input_size=(4, 4), in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=10))
    DiTGenerator(dit, GeneratorRecord.from_cache(LatentCache(w["cache"]), transport={"time_shift": 1.0}), "fuzz"
                 ).save_pretrained(root / "dit")
    (root / "bad.yaml").write_text("data: [\n")
    (root / "plain.txt").write_text("not a bundle\n")
    return {"fae": str(w["fae"]), "run": str(Path(w["fae"]).parent), "pipeline": str(w["pipeline"]),
            "cache": str(w["cache"]), "data": str(w["root"] / "data.yaml"), "dit": str(root / "dit"),
            "bad": str(root / "bad.yaml"), "file": str(root / "plain.txt"), "missing": str(root / "nope"),
            "root": root}


def _flags(options: dict[str, list[str]]) -> st.SearchStrategy[list[str]]:
    """Random subsets of `--flag value` pairs (a value None: a switch)."""
    pairs = [[flag] if value is None else [flag, value] for flag, values in options.items() for value in values]
    return st.lists(st.sampled_from(pairs), max_size=4).map(lambda chosen: [a for pair in chosen for a in pair])


def test_random_encode_arguments_give_a_cache_or_a_clean_error(bundles):
    b = bundles
    paths = [b["fae"], b["run"], b["pipeline"], b["cache"], b["missing"], b["file"], b["dit"]]
    options = {"--fae": paths, "--data": [b["data"], b["bad"], b["missing"], b["file"], b["fae"] + "/config.json"],
               "--encoder": [b["bad"], b["missing"], b["data"]], "--source": ["fae", "raw_features"],
               "--shard-size": ["0", "-1", "7"], "--batch-size": ["0", "5"], "--dtype": ["bfloat16"],
               "--precision": ["bf16", "fp32"], "--feature-cache": [b["missing"], b["file"], b["cache"]],
               "--split": ["test", "bogus"], "--store-std": [None], "--no-flip": [None],
               "--text-encoder": ["minilm"], "--text-max-length": ["0", "-5"], "--num-workers": ["-1"]}

    @settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(_flags(options), st.lists(st.sampled_from(["limit=-1", "image_size=0", "bogus=1", "kind=nope"]), max_size=1))
    def check(flags, overrides):
        out = b["root"] / "encoded"
        _run(["encode", "--out", str(out), "--no-progress", *flags, "limit=6", *overrides])

    check()


def test_random_sample_arguments_give_images_or_a_clean_error(bundles):
    b = bundles
    options = {"--generator": [b["dit"], b["missing"], b["fae"], b["file"]],
               "--fae": [b["pipeline"], b["fae"], b["run"], b["missing"], b["dit"]],
               "--pipeline": [b["pipeline"], b["missing"], b["dit"]], "--pixel-decoder": [b["missing"], b["fae"]],
               "--steps": ["0", "-2", "2"], "--guidance": ["paper", "x", "2.5", "0.5-0.2:3"], "--labels": ["9,9", "x",
               "99", "random", ""], "--prompt": ["a cat"], "--batch-size": ["0", "2"], "--time-shift": ["-1", "0"],
               "--sampler": ["heun", "euler_maruyama"], "--guidance-channels": ["-3", "99"], "--seed": ["-1"],
               "--cfg-batch": ["separate"], "--device": ["bogus", "cuda:7"], "--precision": ["bf16"],
               "--prompts": [b["missing"], b["file"]], "--per-row": ["0"]}

    @settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(_flags(options))
    def check(flags):
        _run(["sample", "--out", str(b["root"] / "samples"), "-n", "2", "--steps", "1", "--no-progress",
              "--no-pngs", *flags])

    check()
