"""Every YAML composes and builds; schedules follow their closed forms; both install modes find the configs."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from sam_runner.cli.preflight import CONFIG_DIR
from sam_runner.errors import ConfigError
from sam_runner.optim import SAM
from sam_runner.run import build
from sam_runner.run.build import build_model, build_optimizer, build_scheduler
from sam_runner.run.spec import SAM_VARIANTS, Settings, validate

CONFIGS = Path(CONFIG_DIR)
REPO = Path(__file__).resolve().parents[1]
PLUGIN_TARGETS = {"dataset=custom": "dataset.source._target_=sam_runner.data.synthetic",
                  "model=custom": "model._target_=sam_runner.models.mlp"}


LEAF_KEY = re.compile(r"^\s*[\w.]+:\s*\S")  # `key: value` on one line (not a block header, not a list item)


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_key_has_a_comment_with_its_meaning(path: Path) -> None:
    text = path.read_text()
    assert text.startswith("#"), "each config opens with a comment saying what it is"
    if path.parent.name == "job_logging":  # Python's logging dictConfig schema, explained by its header
        return
    for line in text.splitlines():
        if LEAF_KEY.match(line) and not line.strip().startswith(("_target_:", "_partial_:")):
            assert "#" in line, f"{path.name}: no comment on {line.strip()!r}"


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONFIGS / group).glob("*.yaml"))


def composed(*overrides: str, hydra: bool = False) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra)


ALL_CHOICES = [f"{group}={name}" for group in ("dataset", "model", "optimizer", "scheduler", "experiment")
               for name in options(group)] + [f"optimizer/base={name}" for name in options("optimizer/base")]


@pytest.mark.parametrize("choice", ALL_CHOICES)
def test_every_option_composes_and_validates(choice: str) -> None:
    cfg = composed(choice, *[PLUGIN_TARGETS[choice]] if choice in PLUGIN_TARGETS else [])
    validate(cfg)


@pytest.mark.parametrize("name", [n for n in options("model") if n != "custom"])
def test_every_model_config_instantiates(name: str) -> None:
    cfg = composed(f"model={name}")
    shape = (1, 40) if name in ("cnn1d", "mlp") else (3, 32, 32)
    model = build_model(cfg.model, num_classes=10, input_shape=shape)
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("name", options("optimizer"))
@pytest.mark.parametrize("base", options("optimizer/base"))
def test_every_optimizer_builds_with_every_base(name: str, base: str) -> None:
    cfg = composed(f"optimizer={name}", f"optimizer/base={base}")
    model = torch.nn.Linear(3, 2)
    if name == "sam_on":  # perturbs normalization layers only: a network without one is refused
        model = torch.nn.Sequential(model, torch.nn.LayerNorm(2))
    optimizer = build_optimizer(cfg.optimizer, cfg.rho, 0.25 * cfg.lr, model)
    assert isinstance(optimizer, SAM) == (cfg.optimizer.sam is not None)
    base_class = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[base]
    base_optimizer = getattr(optimizer, "base_optimizer", optimizer)
    assert isinstance(base_optimizer, base_class)
    assert cfg.lr == cfg.optimizer.base.default_lr  # the config's lr, replaced by the plan's (scaled) one:
    assert optimizer.param_groups[0]["lr"] == base_optimizer.defaults["lr"] == 0.25 * cfg.lr


def test_plain_optimizers_have_no_rho_and_sam_rho_defaults_per_method() -> None:
    assert composed("optimizer=sgd").rho == 0.0
    assert composed("optimizer=sam").rho == 0.05
    assert composed("optimizer=asam").rho == 1.0
    assert composed("optimizer=sam", "rho=0.2").rho == 0.2


def test_every_sam_variant_the_spec_accepts_is_built_and_has_its_optimizer_config() -> None:
    """run/spec.py's names (checked before torch is imported) are the ones run/build.py builds, and each has a config."""
    assert list(build.SAM_VARIANTS) == list(SAM_VARIANTS)
    configured = {OmegaConf.load(path).sam.get("variant") for path in (CONFIGS / "optimizer").glob("*.yaml")
                  if OmegaConf.load(path).get("sam") is not None}
    assert configured == set(SAM_VARIANTS)


def test_experiment_overrides_the_top_level_defaults() -> None:
    cfg = composed("experiment=cifar10_wrn16_8")
    assert (cfg.dataset.name, cfg.epochs, cfg.label_smoothing) == ("cifar10", 200, 0.1)
    assert composed("experiment=cifar10_wrn16_8", "epochs=3").epochs == 3


@pytest.mark.parametrize("name", options("hydra/launcher"))
def test_launcher_presets_compose(name: str) -> None:
    from hydra.core.plugins import Plugins

    cfg = composed(f"hydra/launcher={name}", hydra=True)
    assert cfg.hydra.launcher._target_ in Plugins.instance().class_name_to_class, "a launcher class Hydra can find"


def test_a_launcher_hydra_cannot_find_is_one_line_before_anything_runs() -> None:
    from sam_runner.cli.preflight import _check_launcher_found

    with pytest.raises(ConfigError, match="Hydra finds no launcher hydra_plugins.sam_runner_launcher.Gone: install "
                                          "sam-runner without -e"):
        _check_launcher_found("hydra_plugins.sam_runner_launcher.Gone")  # what an editable install leads to
    _check_launcher_found("hydra_plugins.sam_runner_launcher.SlurmLauncher")


def _lrs(name: str, steps_per_epoch: int, epochs: int, **keys: object) -> list[float]:
    cfg = composed(f"scheduler={name}", *[f"scheduler.{k}={v}" for k, v in keys.items()])
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    scheduler = build_scheduler(cfg.scheduler, optimizer, steps_per_epoch, steps_per_epoch * epochs)
    lrs = []
    for _ in range(steps_per_epoch * epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_cosine_schedule_follows_its_closed_form_after_warmup() -> None:
    lrs = _lrs("cosine", steps_per_epoch=10, epochs=5, warmup_epochs=1, min_lr_fraction=0.1)
    assert lrs[:10] == pytest.approx([2.0 * (k + 1) / 10 for k in range(10)])
    for k in range(10, 50):
        progress = (k - 10) / 40
        assert lrs[k] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))))


def test_step_schedule_drops_at_its_milestones() -> None:
    lrs = _lrs("step", steps_per_epoch=10, epochs=10, milestones="[0.5,0.8]", gamma=0.1)
    assert lrs[49] == 2.0 and lrs[50] == pytest.approx(0.2) and lrs[79] == pytest.approx(0.2)
    assert lrs[80] == pytest.approx(0.02)
    assert set(_lrs("constant", steps_per_epoch=4, epochs=3)) == {2.0}


def test_bad_milestones_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match="milestones"):
        _lrs("step", steps_per_epoch=2, epochs=2, milestones="[0.8,0.5]")


def test_a_non_editable_install_ships_every_config(tmp_path: Path) -> None:
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                              "--target", str(target), str(REPO)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    probe = subprocess.run([sys.executable, "-c", "from sam_runner.cli.preflight import CONFIG_DIR; print(CONFIG_DIR)"],
                           cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": ""}, capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    installed = Path(probe.stdout.strip())
    assert installed.is_relative_to(target)
    shipped = sorted(p.relative_to(installed) for p in installed.rglob("*.yaml"))
    assert shipped == sorted(p.relative_to(REPO / "configs") for p in (REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("override", ["rho=inf", "lr=inf", "label_smoothing=-inf", "max_grad_norm=inf",
                                      "sharpness.rho=inf", "stop.train_loss=inf", "lr=nan"])
def test_non_finite_numbers_are_config_errors(override: str) -> None:
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"^{re.escape(key)} must be a finite number"):
        validate(composed(override))


@pytest.mark.parametrize("seed, valid", [(0, True), (2**32 - 1, True), (2**32, False), (-1, False)])
def test_seeds_are_checked_against_what_numpy_accepts(seed: int, valid: bool) -> None:
    if valid:
        validate(composed(f"seed={seed}"))
        return
    with pytest.raises(ConfigError, match=r"seed must be in \[0, 2\*\*32 - 1\]"):
        validate(composed(f"seed={seed}"))


@pytest.mark.parametrize("override, message", [
    ("sharpness.measures=[trace,sharpest]", "sharpness.measures: unknown sharpness measure(s) ['sharpest']; valid: "
                                            "lambda_max, trace, worst, ascent, average, keskar, alignment, or `auto`"),
    ("+sharpness.options={trace_probs:3}", "sharpness.options: unknown sharpness option(s) ['trace_probs']; valid: "
                                           "tolerance, max_iterations, trace_probes,")])
def test_sharpness_names_are_checked_by_the_measures_own_check_before_training(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        validate(composed(override))


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        return {key: value for name, child in node.items() for key, value in _leaves(child, f"{prefix}{name}.").items()}
    return {prefix.rstrip("."): node}


def test_the_schema_defaults_are_config_yaml_s() -> None:
    """run/spec.py's Settings and configs/config.yaml state one default for every top-level key; the keys config.yaml
    takes from the chosen optimizer (interpolations) have none in the schema."""
    yaml = OmegaConf.load(CONFIGS / "config.yaml")
    written = _leaves(OmegaConf.to_container(OmegaConf.masked_copy(yaml, [k for k in yaml if k not in ("defaults",
                                                                                                        "hydra")])))
    schema = _leaves(OmegaConf.to_container(OmegaConf.structured(Settings)))
    assert set(written) == set(schema)
    for key, value in written.items():
        expected = "???" if isinstance(value, str) and value.startswith("${") else value
        assert schema[key] == expected, key
