import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_config_reference_is_generated_from_the_parsers():
    """docs/config.md must list every flag as the parsers define it: regenerate it with
    `python scripts/config_reference.py` after changing an option."""
    check = subprocess.run([sys.executable, str(ROOT / "scripts" / "config_reference.py"), "--check"], capture_output=True)
    assert check.returncode == 0, "docs/config.md is stale: run python scripts/config_reference.py"
    text = (ROOT / "docs" / "config.md").read_text()
    for flag in ("--swarm-secret", "--ticket-rate", "--speculative", "--inject-faults", "--bootstrap", "--public-metrics"):
        assert f"`{flag}`" in text
