"""platform/ is a source folder, never a package: it must not shadow the stdlib module."""

import importlib
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_platform_folder_has_no_init():
    assert (ROOT / "platform" / "mllmcl" / "__init__.py").exists()
    assert not (ROOT / "platform" / "__init__.py").exists(), "platform/__init__.py shadows the stdlib 'platform'"


def test_import_platform_is_the_standard_library():
    import mllmcl  # noqa: F401  (importing the package must not change what 'platform' is)
    import platform

    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    assert Path(platform.__file__).resolve().parent == stdlib
    assert isinstance(platform.system(), str) and platform.system()
    importlib.import_module("uuid").uuid4()  # uuid imports platform too
