"""What the command-line entry points print, whatever the command: one-line warnings."""
import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["b2fast.train", "b2fast.eval.cli", "b2fast.bench.cli"])
def test_warnings_of_a_command_are_one_line(module):
    """A command's warnings read ``warning: message``, without Python's second line (the source
    line of b2fast or a library that raised it), and a multi-line message is joined into one."""
    code = (f"import warnings; from {module} import main\n"
            "try:\n    main(['--no-such-flag'])\nexcept SystemExit:\n    pass\n"
            "warnings.warn('3 non-finite score(s)\\nare ignored', RuntimeWarning)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    warning_lines = [line for line in proc.stderr.splitlines() if "non-finite" in line or "ignored" in line]
    assert warning_lines == ["warning: 3 non-finite score(s) are ignored"], proc.stderr
