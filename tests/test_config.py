"""The PPO-IS (and GRPO, its subclass) config schema and the shipped envs_configs/*.yaml files."""

import itertools
import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from agents.algorithms import load_run_config
from agents.ppo_is.config import Config, ConfigError, load_config
from diffusion_gym.rewards import available_rewards
from diffusion_gym.windows import PRESETS, make_window

CONFIG_DIR = Path(__file__).resolve().parents[1] / "envs_configs"
# PPO-IS and GRPO configs (GRPO's schema is PPO-IS's with other defaults); the study (paper_*.yaml,
# agents/paper.py) and other agents' configs have their own schemas
YAMLS = sorted(p for p in CONFIG_DIR.glob("*.yaml") if not p.name.startswith("paper_") and "_vard_" not in p.name)
DIGITS_METHODS = ("ddpo", "hrf", "hrf-early", "hrf-later", "hrf-d", "drift")
DIGITS_REWARDS = ("jpeg_compressibility", "jpeg_incompressibility")
PAPER_METHODS = ("ddpo", "hrf", "hrf-d")
PAPER_TASKS = {
    "aesthetic": "laion_aesthetic",
    "compressibility": "jpeg_compressibility",
    "incompressibility": "jpeg_incompressibility",
}
# Keys the 10 digits configs may differ in (everything else is shared and tuned together).
DIGITS_VARYING = {"env.window", "env.window_kwargs", "env.references", "env.reward", "run_name"}
DIGITS_VARYING |= {
    f"drift.{k}" for k in ("subset_fraction", "condition_noise", "condition_noise_tau", "diversity_coef")
}


def _ids(paths):
    return [p.name for p in paths]


def _schema_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Dotted keys of every field; sections recurse, dict-valued fields (``*_kwargs``) are leaves."""
    keys = set()
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys |= _schema_keys(annotation, f"{prefix}{name}.")
        else:
            keys.add(prefix + name)
    return keys


SCHEMA_KEYS = _schema_keys(Config)
SECTIONS = {
    name
    for name, field in Config.model_fields.items()
    if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
}


def _written_keys(data: dict) -> set[str]:
    keys = set()
    for name, value in data.items():
        if name in SECTIONS and isinstance(value, dict):
            keys |= {f"{name}.{sub}" for sub in value}
        else:
            keys.add(name)
    return keys


def _flat(config: Config) -> dict[str, object]:
    dumped = config.model_dump(mode="json")
    return {key: dumped[key.split(".")[0]][key.split(".")[1]] if "." in key else dumped[key] for key in SCHEMA_KEYS}


def _name(method: str, reward: str) -> Path:
    return CONFIG_DIR / f"digits_{method}_{reward}.yaml"


def _paper(method: str, task: str) -> Config:
    return load_config(CONFIG_DIR / f"celebahq_{method}_{task}.yaml")


# ------------------------------------------------------------------------------------------------
# The shipped files
# ------------------------------------------------------------------------------------------------


def test_expected_files_exist():
    expected = {f"digits_{m}_{r}.yaml" for m in DIGITS_METHODS for r in DIGITS_REWARDS}
    expected |= {f"celebahq_{m}_{t}.yaml" for m in PAPER_METHODS for t in PAPER_TASKS}
    expected |= {f"{v}_{r}.yaml" for v in ("sd15", "sdxl") for r in ("aesthetic", "jpeg_compressibility")}
    expected |= {"sd-tiny_prompt_color.yaml", "sd3-tiny_grpo_prompt_color.yaml", "digits-t2i_grpo_prompt_match.yaml"}
    expected |= {f"{m}_jpeg_compressibility.yaml" for m in ("sd35m_grpo", "sd35m_grpo-fast", "flux_grpo")}
    expected |= {"digits_hrf-d_jpeg_compressibility_demo.yaml"}
    expected |= {f"digits_hrf_{r}_authors.yaml" for r in DIGITS_REWARDS}
    assert expected == {p.name for p in YAMLS}
    assert (CONFIG_DIR / "README.md").is_file()
    readme = (CONFIG_DIR / "README.md").read_text()
    assert all(name in readme for name in expected), "README.md lists every config file"


@pytest.mark.parametrize("path", YAMLS, ids=_ids(YAMLS))
def test_loads_and_is_buildable(path):
    """Validates without weights; names resolve to a registered reward and a window that fits the chain."""
    config = load_run_config(path)
    assert config.env.reward in available_rewards()
    window = make_window(config.env.window, **config.env.window_kwargs)
    window.bind(config.sample.num_steps)
    if config.env.window != "full":
        assert config.env.references is not None
        # one window iteration = one training epoch
        assert window.batches_per_iteration == config.sample.num_batches_per_epoch
    else:
        assert config.env.references is None


@pytest.mark.parametrize("path", YAMLS, ids=_ids(YAMLS))
def test_every_field_is_written(path):
    """The file spells out the schema's whole key set, so it documents the whole config."""
    data = yaml.safe_load(path.read_text())
    written = _written_keys(data)
    assert written - SCHEMA_KEYS == set(), "keys outside the schema"
    assert SCHEMA_KEYS - written == set(), "schema keys missing from the file"
    # Typed as written (e.g. `3e-4` without a dot would be a YAML string; `no` would be a boolean).
    config = load_run_config(path)
    for key, value in _flat(config).items():
        raw = data[key.split(".")[0]][key.split(".")[1]] if "." in key else data[key]
        if isinstance(value, float):
            assert isinstance(raw, int | float) and not isinstance(raw, bool), f"{key}: {raw!r} is not a number"
        elif isinstance(value, str):
            assert isinstance(raw, str), f"{key}: {raw!r} is not a string"


@pytest.mark.parametrize("path", YAMLS, ids=_ids(YAMLS))
def test_every_value_line_is_commented(path):
    """Each key line has a trailing `# …` or a comment line directly above it (ddpo-pytorch style)."""
    lines = path.read_text().splitlines()
    uncommented = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        assert re.match(r"^\s*[A-Za-z_][\w-]*:", line), f"line {i + 1} is not a `key: value` line: {line!r}"
        trailing = re.search(r"\s#\s*\S", line) is not None
        above = i > 0 and lines[i - 1].strip().startswith("#") and len(lines[i - 1].strip()) > 2
        if not (trailing or above):
            uncommented.append(f"{i + 1}: {line}")
    assert not uncommented, "lines without a comment:\n" + "\n".join(uncommented)


def test_digits_configs_differ_only_in_the_method_and_reward():
    configs = {(m, r): _flat(load_config(_name(m, r))) for m in DIGITS_METHODS for r in DIGITS_REWARDS}
    for (a, ca), (b, cb) in itertools.combinations(configs.items(), 2):
        differing = {k for k in SCHEMA_KEYS if ca[k] != cb[k]}
        assert differing <= DIGITS_VARYING, f"{a} vs {b} differ in {sorted(differing - DIGITS_VARYING)}"


def test_the_demo_config_is_the_hrf_d_config_shorter_and_stopped_by_the_monitor():
    demo = _flat(load_config(CONFIG_DIR / "digits_hrf-d_jpeg_compressibility_demo.yaml"))
    hrf_d = _flat(load_config(_name("hrf-d", "jpeg_compressibility")))
    assert {k for k in SCHEMA_KEYS if demo[k] != hrf_d[k]} == {"num_epochs", "eval.early_stop"}
    assert (demo["num_epochs"], demo["train.learning_rate"], demo["eval.early_stop"]) == (8, 1e-4, True)


def test_the_authors_config_is_the_hrf_config_with_the_authors_conventions():
    authors = _flat(load_config(CONFIG_DIR / "digits_hrf_jpeg_compressibility_authors.yaml"))
    hrf = _flat(load_config(_name("hrf", "jpeg_compressibility")))
    changed = {k: authors[k] for k in SCHEMA_KEYS if authors[k] != hrf[k]}
    assert changed == {
        "sample.num_envs": 4,
        "sample.num_batches_per_epoch": 16,  # 16 x 4 = the HRF file's 64 episodes per epoch
        "env.window_kwargs": {
            "batches_per_iteration": 16,
            "end_inclusive": False,
            "cycle": False,
            "iterations": [4] * 3,
        },
        "env.references": "model",
        "env.references_after_update": True,
        "train.learning_rate": 5e-5,  # tuned per task on seed 10 (incompressibility: 1e-4)
        "train.max_grad_norm": 1.0,
        "train.gradient_updates_per_epoch": 16,
        "train.adv_clip_max": 2.5,
        "train.advantage_std": "group-sample",
        "train.clip_scaling": "remaining",
        "train.loss_reduction": "trajectories",
        "train.update_order": "batches",
    }
    assert authors["sample.samples_per_reference"] == authors["sample.num_envs"]  # one reference per batch


@pytest.mark.parametrize("method", DIGITS_METHODS)
@pytest.mark.parametrize("reward", DIGITS_REWARDS)
def test_digits_values(method, reward):
    config = load_config(_name(method, reward))
    assert (config.model, config.device, config.env.reward) == ("embedded:digits", "cpu", reward)
    assert config.num_epochs == 12 and config.sample.num_steps == 40 and config.sample.num_envs == 32
    assert config.train.learning_rate == 1e-4, "the gentle default (envs_configs/README.md); make paper runs 5e-4"
    assert config.sample.num_batches_per_epoch == 2
    assert config.drift.enabled == (method == "drift")
    if method in ("ddpo", "drift"):
        assert (config.env.window, config.env.window_kwargs, config.env.references) == ("full", {}, None)
    elif method == "hrf-d":
        assert config.env.window == "hrf-d" and config.env.references == "digits"
        assert config.env.window_kwargs == {"beta": 1.0, "stride": 2, "last": 28, "batches_per_iteration": 2}
    else:
        assert config.env.window == method and config.env.references == "digits"
        iterations = [6, 6] if method == "hrf-later" else [4, 4, 4]  # the preset's clusters share the 12 epochs
        assert config.env.window_kwargs == {"batches_per_iteration": 2, "iterations": iterations}


# The paper's Tables 4 (aesthetic) and 5 (compressibility, incompressibility):
# (batch size, samples per iteration, learning rate) per column.
PAPER_TABLE = {
    ("ddpo", "aesthetic"): (10, 100, 3e-7),
    ("hrf", "aesthetic"): (4, 160, 3e-7),
    ("hrf-d", "aesthetic"): (25, 150, 9e-6),
    ("ddpo", "compressibility"): (10, 150, 9e-7),
    ("hrf", "compressibility"): (10, 150, 9e-7),
    ("hrf-d", "compressibility"): (25, 150, 9e-7),
    ("ddpo", "incompressibility"): (10, 150, 9e-7),
    ("hrf", "incompressibility"): (10, 150, 9e-7),
    ("hrf-d", "incompressibility"): (25, 150, 9e-7),
}


@pytest.mark.parametrize(("method", "task"), list(PAPER_TABLE), ids=[f"{m}-{t}" for m, t in PAPER_TABLE])
def test_paper_values(method, task):
    config = _paper(method, task)
    batch, samples, lr = PAPER_TABLE[(method, task)]
    assert config.model == "google/ddpm-celebahq-256"
    assert (config.device, config.mixed_precision) == ("cuda", "bf16")
    assert config.env.reward == PAPER_TASKS[task]
    assert config.sample.num_steps == 40
    assert config.train.learning_rate == pytest.approx(lr, rel=1e-12)
    assert config.train.weight_decay == pytest.approx(1e-3)
    assert config.train.max_grad_norm == pytest.approx(4.5)
    assert config.train.clip_range == pytest.approx(1e-4)
    assert config.train.gradient_updates_per_epoch == 1
    assert config.train.batch_size == 16 and config.eval.num_samples == 64
    # "Batch size" -> num_envs; "Samples per iteration" / batch size -> num_batches_per_epoch.
    assert config.sample.num_envs == batch
    assert config.sample.num_envs * config.sample.num_batches_per_epoch == samples
    warm = config.train.warmup_epochs
    assert (warm > 0) if (method, task) == ("ddpo", "aesthetic") else warm == 0
    assert warm < config.num_epochs
    if method == "ddpo":
        assert (config.env.window, config.env.references) == ("full", None)
    elif method == "hrf":
        preset = "hrf-aesthetic" if task == "aesthetic" else "hrf-compressibility"
        assert config.env.window == preset and config.env.references == "model"
        assert config.env.window_kwargs["iterations"] == [8, 8, 8]
        assert config.num_epochs == 24
    else:
        assert config.env.window == "hrf-d" and config.env.references == "model"
        assert config.env.window_kwargs["beta"] == 1.0


def test_paper_clusters():
    assert PRESETS["hrf-aesthetic"] == ([(3, 7), (18, 22), (28, 32)], [8, 8, 8])
    assert PRESETS["hrf-compressibility"] == ([(8, 12), (18, 24), (28, 36)], [8, 8, 8])
    assert _paper("hrf-d", "aesthetic").train.learning_rate == 9e-6
    assert all(_paper(m, "compressibility").train.learning_rate == 9e-7 for m in PAPER_METHODS)


# ------------------------------------------------------------------------------------------------
# Errors name the key; overrides
# ------------------------------------------------------------------------------------------------


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_validate():
    assert isinstance(load_config(), Config)


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.learning_rat\b"):
        load_config(_write(tmp_path, "train:\n  learning_rat: 1\n"))
    with pytest.raises(ConfigError, match=r"num_epoch\b"):
        load_config(_write(tmp_path, "num_epoch: 3\n"))
    with pytest.raises(ConfigError, match=r"sample\.batch_size"):
        load_config(overrides=["sample.batch_size=4"])


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"sample\.num_envs") as info:
        load_config(_write(tmp_path, "sample:\n  num_envs: many\n"))
    assert "many" in str(info.value)
    with pytest.raises(ConfigError, match=r"train\.learning_rate"):
        load_config(YAMLS[0], ['train.learning_rate="fast"'])
    with pytest.raises(ConfigError, match=r"env\.window"):
        load_config(overrides=["env.window=5"])
    with pytest.raises(ConfigError, match=r"sample\.scheduler"):
        load_config(overrides=["sample.scheduler=euler"])


def test_several_errors_are_all_named(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, "seed: x\ntrain:\n  clip_range: -1\neval:\n  evry: 2\n"))
    message = str(info.value)
    assert all(key in message for key in ("seed", "train.clip_range", "eval.evry"))


def test_overrides_apply_with_yaml_typing():
    path = CONFIG_DIR / "digits_hrf_jpeg_compressibility.yaml"
    one_cluster = ["env.window=[[2, 5]]", "env.window_kwargs={batches_per_iteration: 2}"]  # the file's 3 iterations go
    config = load_config(path, ["train.learning_rate=1e-5", *one_cluster])
    assert isinstance(config.train.learning_rate, float) and config.train.learning_rate == 1e-5
    assert config.env.window == [(2, 5)]
    config = load_config(
        path, ["env.window=hrf-d", "env.window_kwargs={beta: 0.5}", "env.references=null", "sample.num_envs=8"]
    )
    assert config.env.window == "hrf-d" and config.env.window_kwargs == {"beta": 0.5}
    assert config.env.references is None and config.sample.num_envs == 8
    # untouched keys keep the file's values
    assert config.num_epochs == load_config(path).num_epochs


def test_malformed_override():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(CONFIG_DIR / "digits_ddpo_jpeg_compressibility.yaml", ["train.learning_rate"])
    with pytest.raises(ConfigError, match="not a section"):
        load_config(CONFIG_DIR / "digits_ddpo_jpeg_compressibility.yaml", ["seed.sub=1"])


def test_missing_or_non_mapping_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))
