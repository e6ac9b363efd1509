import subprocess
import sys

import pytest

import signgate


def test_all_is_sorted_and_every_name_resolves() -> None:
    assert signgate.__all__ == sorted(signgate.__all__)
    assert set(signgate.__all__) == set(signgate._EXPORTS)
    for name in signgate.__all__:
        assert getattr(signgate, name) is not None, name


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_thing"):
        signgate.no_such_thing  # noqa: B018


def test_importing_the_package_loads_no_network_or_crypto_stack() -> None:
    code = (
        "import sys, signgate, signgate.cli.main;"
        "print(sorted(m for m in ('httpx', 'cryptography', 'nacl') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
