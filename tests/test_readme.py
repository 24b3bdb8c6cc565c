"""The README's Python example runs as written (on stories260K instead of SmolLM2, two steps)."""
import re
from pathlib import Path

from .conftest import SHARED_DIR, STORIES_DIR

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(stories):
    code = re.search(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S).group(1)
    code = (code.replace('load_base_model("smollm2-135m")', f'load_base_model({str(STORIES_DIR)!r})')
                .replace('data_dir="../shared/data"', f'data_dir={str(SHARED_DIR / "data")!r}')
                .replace("range(100)", "range(2)")
                .replace("MeLoRAConfig(rank=8, alpha=16)", "MeLoRAConfig(rank=2, alpha=4)"))
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert namespace["probs"].shape == (4, 5)
    assert namespace["samples"].shape == (10, 4, 5)
