import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from agents.cli import main


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "sample" in capsys.readouterr().out


def test_console_script_is_installed():
    out = subprocess.run(
        [sys.executable, "-c", "from agents.cli import main; raise SystemExit(main(['--version']))"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and "diffusion-gym" in out.stdout


def test_sample_writes_a_grid_of_digits(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", "--n", "20", "--steps", "10", "--out", str(out)]) == 0
    image = Image.open(out)
    # 20 images of 16×16 in rows of 10 (one column per digit), 1-pixel padding
    assert image.size == (10 * 17 + 1, 2 * 17 + 1)
    assert str(out) in capsys.readouterr().out


def test_sample_rejects_bad_input_with_one_clear_line(tmp_path, capsys):
    assert main(["sample", "--class", "12", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "--class must lie in [0, 9], got 12" in err
    assert main(["sample", "--model", "embedded:cats", "--out", str(tmp_path / "x.png")]) == 2
    assert "embedded:digits" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_train_algo_vard_runs_and_resumes(tmp_path, capsys, tiny_vard):
    from agents.common.checkpoint import latest_checkpoint, load_checkpoint

    config = "envs_configs/digits_vard_jpeg_compressibility.yaml"
    run = tmp_path / "run"
    args = ["train", "--algo", "vard", "--config", config, "--run-dir", str(run), "--no-progress"]
    assert main([*args, *[a for o in tiny_vard for a in ("--set", o)]]) == 0
    assert "fixed-noise eval reward (jpeg_compressibility)" in capsys.readouterr().out
    ckpt = load_checkpoint(latest_checkpoint(run))
    assert ckpt.epoch == 1 and ckpt.state["algo"] == "vard"  # epochs finished
    more = [a for o in [*tiny_vard, "num_epochs=2"] for a in ("--set", o)]
    assert main([*args, *more, "--resume", str(run)]) == 0
    assert load_checkpoint(latest_checkpoint(run)).epoch == 2


def test_train_rejects_an_unknown_algo_or_the_other_algos_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--algo", "sac"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'sac' (choose from" in capsys.readouterr().err
    ppo = "envs_configs/digits_ddpo_jpeg_compressibility.yaml"
    assert main(["train", "--algo", "vard", "--config", ppo]) == 2  # the config says algo: ppo-is
    err = capsys.readouterr().err
    assert "algo: the config says 'ppo-is' but 'vard' was asked for" in err and "use --algo ppo-is" in err


def test_a_config_without_algo_that_fits_another_algo_says_which(tmp_path, capsys):
    vard = Path("envs_configs/digits_vard_jpeg_compressibility.yaml").read_text().replace("algo: vard\n", "")
    (tmp_path / "vard.yaml").write_text(vard)
    assert main(["train", "--config", str(tmp_path / "vard.yaml")]) == 2  # read as ppo-is, the default
    err = capsys.readouterr().err
    assert "value: Extra inputs are not permitted" in err and "use --algo vard" in err


def test_help_answers_without_importing_torch():
    """``--help`` and usage errors answer at once: nothing heavy is imported before the arguments are parsed."""
    import subprocess
    import sys

    code = "import sys, agents.cli; heavy = [m for m in ('torch', 'diffusers') if m in sys.modules]; print(heavy)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "usage:" in capsys.readouterr().out
