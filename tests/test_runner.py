"""The on-policy runner: a new algorithm is one small class, and gets seeding, logging, evaluation,
checkpoints and exact resume for free; the code base keeps its shape (no long functions, no cycles)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from pydantic import Field

from agents.algorithms import _REGISTRY, get_algorithm, load_run_config, register_algorithm, train
from agents.cli import main
from agents.common.advantages import group_standardize
from agents.common.checkpoint import latest_checkpoint, load_checkpoint
from agents.common.collector import Collector, make_env
from agents.common.config import RunConfig, Section
from agents.common.runner import Algorithm, EpochStats, RunContext

ROOT = Path(__file__).resolve().parents[1]


# ---- a tests-only algorithm: REINFORCE with a group baseline -----------------------------------------------------
class ToyTrain(Section):
    learning_rate: float = Field(1e-3, gt=0)


class ToyConfig(RunConfig):
    algo: Literal["toy-reinforce"] = "toy-reinforce"
    train: ToyTrain = Field(default_factory=ToyTrain)


class GroupReinforce(Algorithm):
    """REINFORCE on every stochastic step, advantages standardised per reference group."""

    name = "toy-reinforce"

    def __init__(self, config: ToyConfig, run: RunContext) -> None:
        super().__init__(config, run)
        self.policy = run.make_policy()
        self.envs = make_env(config, self.policy, run.family)
        self.collector = Collector(self.envs, self.policy, run.generator)
        self.optimizer = torch.optim.Adam(self.policy.trainable_parameters(), lr=config.train.learning_rate)

    def train_epoch(self, epoch: int) -> EpochStats:
        rollout = self.collector.collect(self.config.sample.num_batches_per_epoch)
        traj = rollout.trajectories()
        rollout.set_advantages(group_standardize(traj.rewards, traj.groups))
        self.optimizer.zero_grad()
        self.policy.train()
        for mb in rollout.minibatches(torch.arange(len(rollout)), 32):
            out = self.policy.evaluate(mb.x, mb.k, mb.c, mb.x_next)
            (-(mb.advantages * out.log_prob).sum() / len(rollout)).backward()
        self.optimizer.step()
        self.policy.eval()
        return EpochStats(epoch=epoch, reward_mean=traj.rewards.mean().item(), reward_std=traj.rewards.std().item())

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any], extra_weights: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])


TOY = [
    "algo=toy-reinforce",
    "num_epochs=3",
    "sample.num_steps=5",
    "sample.num_envs=4",
    "sample.num_batches_per_epoch=1",
    "sample.samples_per_reference=2",
    "env.window=[[1, 3]]",
    "eval.num_samples=4",
    "keep_checkpoints=5",
]


@pytest.fixture
def toy_algorithm():
    register_algorithm("toy-reinforce", ToyConfig, GroupReinforce)
    yield
    _REGISTRY.pop("toy-reinforce", None)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from diffusers import UNet2DModel

    return UNet2DModel.from_pretrained(latest_checkpoint(run_dir) / "unet").state_dict()


@pytest.mark.usefixtures("toy_algorithm", "one_thread")
def test_a_new_algorithm_gets_logging_checkpoints_and_exact_resume_for_free(tmp_path):
    config = load_run_config(None, TOY)
    assert isinstance(config, ToyConfig) and get_algorithm("toy-reinforce") is GroupReinforce
    straight = train(config, run_dir=tmp_path / "a", progress=False)
    assert [e.epoch for e in straight.epochs] == [0, 1, 2] and straight.final_eval is not None
    assert sorted(p.name for p in (tmp_path / "a" / "samples").iterdir()) == [f"epoch-000{i}.png" for i in range(4)]
    _check_tensorboard(tmp_path / "a" / "tb")
    assert load_checkpoint(tmp_path / "a").state["algo"] == "toy-reinforce"

    train(config, run_dir=tmp_path / "b", progress=False, stop_after=1)
    resumed = train(config, run_dir=tmp_path / "b", resume=tmp_path / "b", progress=False)
    assert [e.epoch for e in resumed.epochs] == [1, 2]
    assert [e.reward_mean for e in resumed.epochs] == [e.reward_mean for e in straight.epochs[1:]]
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    moved = max((a[k] - v).abs().max().item() for k, v in _weights_of_base().items())
    assert moved > 0, "the toy algorithm trained"


def _check_tensorboard(tb: Path) -> None:
    """The config as text, hparams with the final evaluation, upscaled grids one column per class."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb), size_guidance={"images": 0, "tensors": 0}).Reload()
    assert "config/text_summary" in events.Tags()["tensors"]
    assert "reward/mean" in events.Tags()["scalars"] and "eval/reward_mean" in events.Tags()["scalars"]
    grid = events.Images("eval/samples")[-1]
    assert grid.width >= 4 * 64, "the 16-px digits are shown at >= 64 px each"  # 4 samples, classes as columns
    assert (tb / "hparams").is_dir(), "hyper-parameters with the final evaluation"


def _weights_of_base() -> dict[str, torch.Tensor]:
    from diffusion_gym.models import load_model

    return load_model("embedded:digits").unet.state_dict()


@pytest.mark.usefixtures("toy_algorithm", "one_thread")
def test_the_cli_trains_a_registered_algorithm_and_refuses_another_algos_checkpoint(tmp_path, capsys):
    args = ["train", "--run-dir", str(tmp_path / "toy"), "--no-progress"]
    for override in [*TOY, "num_epochs=1"]:
        args += ["--set", override]
    assert main(args) == 0
    assert main(["train", "--algo", "ppo-is", "--resume", str(tmp_path / "toy"), "--no-progress"]) == 2
    assert "the run is algo 'toy-reinforce', not --algo ppo-is" in capsys.readouterr().err
    # --resume alone continues the run with its own config, in its own directory
    assert main(["train", "--resume", str(tmp_path / "toy"), "--set", "num_epochs=2", "--no-progress"]) == 0
    assert load_checkpoint(tmp_path / "toy").epoch == 2 and not (tmp_path / "ppo").exists()


# ---- the shape of the code base ----------------------------------------------------------------------------------
PACKAGES = ("agents", "diffusion_gym")
MAX_FUNCTION_LINES = 80


def _modules(package: str) -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def test_no_function_is_longer_than_80_lines():
    long = []
    for package in PACKAGES:
        for name, path in _modules(package).items():
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, long


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every project module ``name`` imports (at any depth of the file, lazy imports included)."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from pkg import module` depends on the module; `from pkg import name` on pkg itself
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*trail[trail.index(nxt) :], nxt] if nxt in trail else [node, nxt]
            if nxt not in state and (found := visit(nxt, [*trail, nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_no_import_cycles_and_the_env_library_never_imports_the_agents():
    modules = {**_modules("agents"), **_modules("diffusion_gym")}
    graph = {name: _imports(name, path, set(modules)) for name, path in modules.items()}
    for package in PACKAGES:
        sub = {n: {m for m in deps if m.split(".")[0] == package} for n, deps in graph.items() if n.startswith(package)}
        assert _cycle(sub) is None, f"import cycle in {package}: {' -> '.join(_cycle(sub))}"
    upward = sorted(
        f"{n} -> {m}"
        for n, deps in graph.items()
        if n.startswith("diffusion_gym")
        for m in deps
        if m.startswith("agents")
    )
    assert not upward, upward


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


# ---- optional features say which extra installs them ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("module", "extra", "use"),
    [
        ("peft", "lora", lambda: __import__("agents.common.policy").common.policy.add_lora(torch.nn.Linear(2, 2), 2)),
        ("open_clip", "clip", lambda: __import__("diffusion_gym.nets").nets.clip_hub_files()),
    ],
)
def test_a_missing_optional_package_names_its_extra(monkeypatch, module, extra, use):
    from diffusion_gym.extras import MissingExtraError

    monkeypatch.setitem(__import__("sys").modules, module, None)  # as if it were not installed
    with pytest.raises(MissingExtraError, match=rf"pip install 'diffusion-gym\[{extra}\]'"):
        use()


@pytest.mark.usefixtures("toy_algorithm", "one_thread")
def test_a_run_directory_belongs_to_one_run(tmp_path):
    from agents.common.config import ConfigError

    config = load_run_config(None, [*TOY, "num_epochs=1"])
    train(config, run_dir=tmp_path / "run", progress=False)
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=r"already holds a run.*--resume.*--overwrite"):
        train(config, run_dir=tmp_path / "run", progress=False)
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before
    other = load_run_config(None, [*TOY, "num_epochs=1", "seed=5"])
    train(other, run_dir=tmp_path / "run", progress=False, overwrite=True)
    assert load_checkpoint(tmp_path / "run").state["config"]["seed"] == 5
    assert len(list((tmp_path / "run" / "checkpoints").glob("epoch-*"))) == 1, "the old run's files are gone"
