"""Record udaflow's code as it is now in dvc.lock: `python scripts/lock_code.py`, in the commit that changes
src/udaflow. dvc.yaml's stages depend on the code (src/udaflow, expectations.py, domains.py), so a code change
without it leaves `dvc status` calling them changed on a fresh clone, and tests/unit/test_config.py fails.
Only the code's hashes move; every output hash dvc.lock records stays (`dvc commit` would need the outputs)."""
import sys
from pathlib import Path

from udaflow.versioning import record_code_dependencies

root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1])
stages = record_code_dependencies(root)
print(f"dvc.lock: code hashes recorded for {', '.join(stages)}" if stages else "dvc.lock: the code hashes were current")
