"""The command line as a user meets it: one JSON line on success, one error line and exit 2 on bad input."""

import json
import subprocess
import sys

import pytest


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "dpmix_ray.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def assert_one_line_error(proc, pattern):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert pattern in lines[0]
    assert proc.stdout == ""


def test_train_prints_one_json_result_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {name: digits}\nmix: {aug_multiplicity: 2, self_mix: 1}\noptim: {batch_size: 64, epochs: 0.5, lr: 1.0}\n")
    proc = run("train", str(cfg), "--json", "--set", "privacy.epsilon=3")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    res = json.loads(lines[0])
    assert res["method"] == "dpmix_self" and res["epsilon_spent"] <= 3 and res["config"]["privacy"]["epsilon"] == 3


@pytest.mark.parametrize(
    "content, overrides, pattern",
    [
        ("method: dpsgd\nmix: {aug_multiplicity: 1\n", [], "invalid YAML at line"),
        ("privacy: {epsilonn: 2}\n", [], "privacy.epsilonn: unknown key"),
        ("method: dpsgd\nmix: {aug_multiplicity: 4}\n", [], "method dpsgd needs mix.aug_multiplicity=1"),  # [search: a method implies its counts]
        ("data: {name: digits}\n", ["privacy.noise_multiplier=0.2", "optim.epochs=null"], "exceeds"),
        ("data: {name: digits}\n", ["privacy.delta=0.01"], "privacy.delta"),
        ("data: {name: parquet:/nonexistent/x.parquet}\n", [], "/nonexistent/x.parquet"),
    ],
)
def test_train_bad_input_is_one_line_exit_2(tmp_path, content, overrides, pattern):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(content)
    before = set(tmp_path.iterdir())
    proc = run("train", str(cfg), *(["--set", *overrides] if overrides else []), cwd=tmp_path)
    assert_one_line_error(proc, pattern)
    assert set(tmp_path.iterdir()) == before  # nothing written


def test_plan_calibrates_and_refuses():
    proc = run("plan", "--epsilon", "2", "--delta", "1e-5", "--sample-rate", "0.01", "--steps", "1000", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert 1.96 <= out["epsilon_spent"] <= 2 and out["steps"] == 1000
    proc = run("plan", "--epsilon", "2", "--delta", "1e-5", "--sample-rate", "0.01", "--noise-multiplier", "1.0", "--json")
    out = json.loads(proc.stdout)
    assert out["epsilon_spent"] <= 2 and out["noise_multiplier"] == 1.0
    assert_one_line_error(run("plan", "--epsilon", "0.001", "--delta", "1e-9", "--sample-rate", "0.5", "--noise-multiplier", "0.5"), "single step")
    assert_one_line_error(run("plan", "--epsilon", "2"), "required")
    assert_one_line_error(run("plan", "--epsilon", "-1", "--delta", "1e-5", "--sample-rate", "0.1", "--steps", "5"), "--epsilon")


def test_plan_states_and_checks_the_neighbouring_relation():
    args = ("plan", "--epsilon", "2", "--delta", "1e-5", "--sample-rate", "0.05", "--steps", "200", "--json")
    zero = json.loads(run(*args).stdout)
    proc = run(*args, "--neighbouring", "replace_one", "--accountant", "pld")
    assert proc.returncode == 0, proc.stderr
    swap = json.loads(proc.stdout)
    assert zero["neighbouring"] == "zero_out" and swap["neighbouring"] == "replace_one"
    assert swap["noise_multiplier"] > zero["noise_multiplier"] and swap["epsilon_spent"] <= 2
    assert_one_line_error(run(*args, "--neighbouring", "replace_one"), "replace_one needs accountant: pld")
