"""The README runs as written: its Lightning example, and the Quickstart reaches what it says."""

import os
import re
import shlex
import subprocess
import sys

from conftest import REPO, SHARED_DATA
from hydra import compose, initialize_config_dir

from lightning_metric import builders

MARKER = "This example is run by the test suite"


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    after = text[text.index(MARKER):]
    return re.search(r"```python\n(.*?)```", after, re.DOTALL).group(1)


def test_readme_lightning_example_trains_and_tests():
    done = subprocess.run([sys.executable, "-c", readme_example()], cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    precision = float(done.stdout.strip().splitlines()[-1])
    assert precision > 0.8


def _summary_values(text: str) -> dict[str, float]:
    """``{metric: value}`` from the two summary lines ``recipes.train`` prints at its end."""
    line = text[text.index("Tested checkpoints/"):].splitlines()[1].split()
    return {name: float(value) for name, value in zip(line[::2], line[1::2], strict=True)}


def test_quickstart_run_reaches_what_the_readme_says(tmp_path):
    """`make run` is `python -m recipes.train` with the defaults: its printed test metrics are
    the README's (within 0.01: BLAS may round differently on another CPU)."""
    env = {**os.environ, "LIGHTNING_METRIC_DATA": str(SHARED_DATA), "HYDRA_FULL_ERROR": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "recipes.train", f"hydra.run.dir={tmp_path}",
         "callbacks.embedding_plot.on_test=false", "trainer.enable_progress_bar=false"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    printed = _summary_values(done.stdout)
    promised = _summary_values((REPO / "README.md").read_text())
    assert printed.keys() == promised.keys() and len(printed) == 4
    for name, value in promised.items():
        assert abs(printed[name] - value) <= 0.01, (name, printed[name], value)


def test_the_readme_bad_sweep_example_prints_what_the_readme_shows(tmp_path):
    """The Sweeps section's block: a command (``$ ...``) and the lines it prints."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"```\n\$ (python -m recipes\.train -m [^\n]*)\n(.*?)```", text, re.DOTALL)
    command, shown = block.group(1).split(), block.group(2).strip().splitlines()
    done = subprocess.run(
        [sys.executable, *command[1:], f"hydra.sweep.dir={tmp_path}"], cwd=REPO,
        env={**os.environ, "LIGHTNING_METRIC_DATA": str(SHARED_DATA)}, capture_output=True,
        text=True, timeout=300, check=False,
    )
    assert done.returncode != 0
    printed = done.stderr.strip().splitlines()
    assert printed[-len(shown):] == shown
    assert not list(tmp_path.glob("*/checkpoints"))


def readme_train_commands() -> list[str]:
    """Every ``python -m recipes.train`` command in the README's bash blocks, its line
    continuations joined, a trailing comment and pipe cut off."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].split(" | ")[0]
            if "python -m recipes.train" in line:
                commands.append(line.split("python -m recipes.train", 1)[1].strip())
    return commands


def train_overrides(command: str) -> list[str]:
    """A command's overrides as ``compose`` takes them: a multirun's comma-separated sweep
    by its first value; Hydra's own flags (``--cfg``) and a ``...`` placeholder dropped."""
    words = shlex.split(command)
    multirun = "-m" in words or "--multirun" in words
    overrides = []
    for word in words:
        if word in ("-m", "--multirun", "..."):
            continue
        if word.startswith("--"):
            break
        key, _, value = word.partition("=")
        if multirun and "," in value and not value.startswith(("[", "{")):
            word = f"{key}={value.split(',')[0]}"
        overrides.append(word)
    return overrides


def test_every_train_command_in_the_readme_composes():
    # a renamed setting or group would leave a README command that no longer runs
    commands = readme_train_commands()
    assert len(commands) >= 20 and "loss=arcface data=fmnist" in commands
    builders.register_resolvers()
    failures = []
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        for command in commands:
            try:
                compose("train", overrides=train_overrides(command))
            except Exception as error:  # noqa: BLE001 - every failing command is listed
                failures.append(f"{command}\n    {type(error).__name__}: {error}")
    assert not failures, "\n".join(failures)
