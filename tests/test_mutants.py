"""bench/mutants.py stays runnable: every mutant still applies to today's source, and one really is killed."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("mutants_bench", ROOT / "bench" / "mutants.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_mutant_applies_to_the_current_source(tmp_path: Path) -> None:
    bench = _bench()
    assert len(bench.MUTANTS) >= 41
    for m in bench.MUTANTS:
        copy = tmp_path / m.name / m.path
        copy.parent.mkdir(parents=True)
        copy.write_text((ROOT / m.path).read_text())
        m.apply(tmp_path / m.name)  # LookupError when the source it breaks has moved
        assert copy.read_text() != (ROOT / m.path).read_text()


@pytest.mark.slow
def test_a_mutant_is_killed_end_to_end() -> None:
    out = subprocess.run([sys.executable, "bench/mutants.py", "--only", "mix_with_itself"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 of 1 mutants killed" in out.stdout
