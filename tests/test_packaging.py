"""A non-editable install carries what the code reads at run time: the presets, the assets and the
playground page."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from fldd.config import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_ships_every_preset_asset_and_page_file(tmp_path):
    # built from a copy of the sources: a build/ left in the checkout must not supply stale files
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "fldd", "pipelines", "tune", "serving", "commands"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                            if (ROOT / name).is_dir() else {}))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(source),
                    "-w", str(tmp_path)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("fldd-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    presets = sorted(CONFIG_DIR.glob("*.yaml"))
    assert CONFIG_DIR.is_relative_to(ROOT / "fldd") and {"toy2d.yaml", "serve.yaml"} <= {p.name for p in presets}
    missing = [p.name for p in presets if f"fldd/configs/{p.name}" not in shipped]
    assert not missing, f"presets left out of the wheel: {missing}"
    assets = [p.name for p in (ROOT / "fldd" / "assets").iterdir() if p.suffix in (".pt", ".gz")]
    assert assets and all(f"fldd/assets/{name}" in shipped for name in assets)
    assert (ROOT / "configs").resolve() == CONFIG_DIR  # the checkout's configs/ is the same files
    page = [p.name for p in (ROOT / "serving" / "playground").iterdir()]
    assert "index.html" in page and all(f"serving/playground/{name}" in shipped for name in page)
