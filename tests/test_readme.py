"""The README stays true: its test command is what CI runs, and it documents every setting."""

from pathlib import Path

from streaming.settings import env_var_names

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "```bash\npytest -q\n```" in README
    assert ci.strip().splitlines()[-1] == "pytest -q"
    assert "pip install -e '.[dev]'" in ci and "pip install -e '.[dev]'" in README


def test_every_setting_is_in_the_configuration_reference():
    for var in env_var_names().values():
        assert f"`{var}`" in README, f"{var} missing from README's configuration table"
