import subprocess
import sys


def test_fldd_imports_no_ray_mlflow_or_fastapi():
    code = ("import sys, fldd, fldd.exact, fldd.sampler, fldd.train; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow', 'fastapi')); "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
