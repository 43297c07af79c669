"""The README's Lightning example runs as written."""

import re
import subprocess
import sys

from conftest import REPO

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
