"""The client side stays light: `bitalloc.Client` needs httpx, not torch, FastAPI or the solvers."""

import subprocess
import sys


def test_client_import_is_light():
    code = ("import sys, bitalloc; c = bitalloc.Client('http://127.0.0.1:9'); "
            "print(','.join(m for m in ('torch', 'fastapi', 'sqlalchemy', 'uvicorn', 'pulp', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"bitalloc.Client pulled in {out}"


def test_unreachable_server_is_a_one_line_error():
    import bitalloc

    c = bitalloc.Client("http://127.0.0.1:9", timeout=5)
    try:
        c.health()
    except bitalloc.ServiceError as e:
        assert "cannot reach the bitalloc server" in str(e) and e.status is None
    else:
        raise AssertionError("no error from a closed port")
    finally:
        c.close()
