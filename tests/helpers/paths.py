"""Where things are: the repository, its user configs and the venv's console scripts."""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
DEMO = CONFIGS / "demo.yaml"
BIN = Path(sys.executable).parent  # the venv's bin/: evo-sft, mlflow, ray
EVO_SFT = BIN / "evo-sft"
