"""What the command-line entry points print, whatever the command: one-line warnings, interrupts and
mistyped names answered with the closest valid one."""
import subprocess
import sys

import pytest

from b2fast.bench.cli import parse_args as bench_args
from b2fast.config import Config, apply_overrides, load_yaml, validate
from b2fast.core.policy import resolve_model_path
from b2fast.core.schedule import resolve_schedule, stage_lr
from b2fast.eval.cli import _parser
from b2fast.rewards import build_reward
from b2fast.train import parse_config
from b2fast.utils import require


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


def test_an_interrupted_command_says_so_in_one_line_and_restores_sigterm(capsys):
    import os
    import signal

    from b2fast.utils import stop_on_interrupt

    @stop_on_interrupt("nothing was written")
    def stopped_by(argv):
        if argv == ["ctrl-c"]:
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)  # what a job scheduler or `timeout` sends
        raise AssertionError("SIGTERM did not stop the command")

    before = signal.getsignal(signal.SIGTERM)
    for argv in (["ctrl-c"], ["sigterm"]):
        assert stopped_by(argv) == 130
        assert capsys.readouterr().err == "interrupted; nothing was written\n"
        assert signal.getsignal(signal.SIGTERM) is before  # only while the command runs


@pytest.mark.parametrize("command", [["-m", "b2fast.eval", "--prompts-per-set", "0", "--images-per-prompt", "64"],
                                     ["-m", "b2fast.sample", "--prompts", "toy_spatial", "--images-per-prompt", "64"]])
def test_sigterm_stops_eval_and_sample_without_a_traceback(command, tmp_path):
    import os
    import signal

    proc = subprocess.Popen([sys.executable, *command, "--device", "cpu", "--out", str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    first_line = proc.stdout.readline()  # printed by main, once its handler is in place; then it loads and samples
    assert first_line.startswith("b2fast: backends"), first_line
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("interrupted; ")


@pytest.mark.parametrize("mistake, hint", [
    (lambda: apply_overrides(Config(), ["--train.lrr", "1e-3"]), "unknown field 'lrr' in train (did you mean 'lr'?)"),
    (lambda: apply_overrides(Config(), ["--trian.lr=1e-3"]), "unknown field 'trian' in config (did you mean 'train'?)"),
    (lambda: validate(apply_overrides(Config(), ["--sampling.scheduler", "lcmm"])), "got 'lcmm' (did you mean 'lcm'?)"),
    (lambda: load_yaml("defualt"), "no such file 'defualt' (did you mean 'default'?)"),
    (lambda: build_reward("toy_alignn"), "unknown reward 'toy_alignn' (did you mean 'toy_align'?)"),
    (lambda: resolve_schedule("linearr"), "unknown schedule 'linearr' (did you mean 'linear'?)"),
    (lambda: stage_lr(1.0, "cosin", 0, 10), "got 'cosin' (did you mean 'cosine'?)"),
    (lambda: resolve_model_path("b2fast:toy_lcm"), "'b2fast:toy_lcm' (did you mean 'b2fast:toy-lcm'?)"),
    (lambda: _parser().parse_args(["--lorra", "x"]),
     "unrecognized arguments: --lorra x; --lorra (did you mean '--lora'?)"),
    (lambda: require(False, "--split", "tset", "one of train, test", ("train", "test")),
     "got 'tset' (did you mean 'test'?)"),
    (lambda: parse_config(["--resme", "runs/x"]), "--resme: unknown option (did you mean '--resume'?)"),
    (lambda: parse_config(["--outt", "runs/x"]), "--outt: unknown option (did you mean '--out'?)"),
    (lambda: bench_args(["kernels", "--devce", "cpu"]), "--devce (did you mean '--device'?)"),
])
def test_a_mistyped_name_is_answered_with_the_closest_valid_one(mistake, hint):
    with pytest.raises(ValueError) as raised:
        mistake()
    assert hint in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize("mistake", [
    lambda: apply_overrides(Config(), ["--train.zzzz", "1"]),
    lambda: load_yaml("nothing_like_a_preset"),
    lambda: resolve_model_path("b2fast:zzz"),          # the shared "b2fast:" prefix is no likeness
    lambda: _parser().parse_args(["--zzzz"]),
    lambda: parse_config(["--zzzz", "1"]),
    lambda: bench_args(["kernels", "--zzzz"]),
])
def test_a_name_close_to_nothing_gets_no_guess(mistake):
    with pytest.raises(ValueError) as raised:
        mistake()
    assert "did you mean" not in str(raised.value)
