import importlib.util
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_reinforce_minimal_improves_compressibility_on_paired_fixed_episodes():
    """The one-file Gymnasium-API example learns: JPEG compressibility rises on fixed evaluation episodes.

    Base and fine-tuned policies run the same 64 episodes (same references, start steps, env and
    policy noise), so the gain is a paired difference; it must exceed 3 standard errors.
    Compressibility is the hard direction: undirected weight changes make images noisier, i.e.
    *less* compressible, so a gain here is learning, not drift.
    """
    example = _load("reinforce_minimal")
    result = example.main(example.Args(eval_episodes=64, threads=2))  # the defaults: 12 iterations
    assert result["gain"] > 0 and result["gain"] > 3 * result["gain_se"], result
    assert result["final"] > result["base"] + 2 * (result["base_se"] ** 2 + result["final_se"] ** 2) ** 0.5


def test_sb3_ppo_example_runs_end_to_end(monkeypatch, capsys):
    example = _load("sb3_ppo")
    argv = ["sb3_ppo.py", "--epochs", "2", "--num-envs", "8", "--num-steps", "10", "--window", "5,7"]
    monkeypatch.setattr(sys, "argv", [*argv, "--episodes-per-env", "1", "--eval-samples", "16", "--verbose", "0"])
    example.main()
    out = capsys.readouterr().out
    assert "base (fixed noise):" in out and "saved and reloaded:" in out
    lines = {line.split(":")[0]: line.split(":")[1].split()[0] for line in out.splitlines() if ":" in line}
    assert lines["fine-tuned"] == lines["saved and reloaded"]  # SB3's save/load keeps the fine-tuned weights
