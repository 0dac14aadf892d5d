"""Without a C compiler didbq still loads and runs models, on the float path, and says so once; asking for the
packed runtime then is a one-line error."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import didbq
from didbq.convert.walker import convert
from didbq.export import write_packed

SCRIPT = """
import warnings, torch, didbq
from didbq.errors import DidbqError
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    first = didbq.load({path!r})
    second = didbq.load({path!r})
messages = [str(w.message) for w in caught if "float path" in str(w.message)]
assert len(messages) == 1, messages
print("WARNING:", messages[0])
reference = didbq.load({path!r}, runtime="reference")
x = torch.randn(2, 3, 32, 32)
with torch.no_grad():
    assert torch.equal(first(x), reference(x))
assert not any(type(m).__name__ == "PackedBinaryLinear" for m in first.modules())
try:
    didbq.load({path!r}, runtime="packed")
except DidbqError as error:
    print("ERROR:", error)
"""


def test_no_compiler_means_the_float_path_and_one_warning(tmp_path: Path) -> None:
    model = didbq.build_model("test_vit")
    conversion = convert(model, "xnor")
    path = write_packed(model.eval(), tmp_path / "model.safetensors", model_name="test_vit", model_args={},
                        recipe=conversion.recipe)
    env = {**os.environ, "CC": str(tmp_path / "no-such-compiler"), "DIDBQ_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(path=str(path))], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    warning, error = done.stdout.strip().splitlines()[-2:]
    assert "no-such-compiler" in warning and "set CC" in warning
    assert error.startswith("ERROR: the packed runtime is not available") and "\\n" not in error
    assert not (tmp_path / "cache" / "kernels").exists() or not list((tmp_path / "cache" / "kernels").iterdir())
