"""jsonargparse 5.0 (a release candidate now) removes ``ArgumentParser.add_instantiator``, which Lightning 2.6's
``LightningCLI`` calls while it sets up, and Lightning states ``<5.0`` only in an extra we do not install (it brings
bitsandbytes). So this package states the range itself, inside Lightning's, and ``lowmem`` refuses a jsonargparse
outside Lightning's range (installed by hand, or by another package) in one message, exit 2, nothing written, instead
of the ``AttributeError`` traceback from inside Lightning."""

from __future__ import annotations

import os
import subprocess
from importlib import metadata

import pytest
from lowmem_calls import LOWMEM
from packaging.version import Version

from lowmem_lightning.cli import about
from lowmem_lightning.cli.about import CLI_EXTRA, unsupported_jsonargparse


def _range(distribution: str, extra: str):
    """The jsonargparse range ``distribution`` states (under ``extra``), from its installed metadata."""
    stated = about._stated_range(metadata.requires(distribution) or [], {"extra": extra})
    assert stated is not None, f"{distribution} states no jsonargparse requirement"
    return stated


def _bounds(*specifiers) -> list[Version]:
    """Every version a bound of ``specifiers`` names, and the versions just around it."""
    named = {Version(bound.version) for specifier in specifiers for bound in specifier}
    near = {Version(f"{v.major}.{v.minor + step}.0") for v in named for step in (-1, 0, 1) if v.minor + step >= 0}
    return sorted(named | near | {Version("5.0.0rc2"), Version(f"{max(named).major + 1}.0")})


def test_our_jsonargparse_range_lies_inside_what_lightnings_cli_supports():
    """Every version our requirement lets pip install is one the installed Lightning states for its CLI: a new
    jsonargparse major release is not taken by a fresh ``pip install`` before Lightning supports it."""
    ours, lightnings = _range("lowmem-lightning", ""), _range("lightning", CLI_EXTRA)
    allowed = [v for v in _bounds(ours, lightnings) if ours.contains(v, prereleases=True)]
    assert allowed, f"our jsonargparse{ours} allows none of the versions looked at"
    assert all(lightnings.contains(v, prereleases=True) for v in allowed), (ours, lightnings)
    assert not ours.contains("5.0.0rc2", prereleases=True)


def test_the_installed_jsonargparse_is_accepted():
    assert unsupported_jsonargparse() is None


def _fake_jsonargparse(site, version: str):
    """Metadata of a jsonargparse ``version`` in ``site`` (first on the path, it is the version metadata reads;
    the package imported stays the installed one)."""
    info = site / f"jsonargparse-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: jsonargparse\nVersion: {version}\n")


def test_a_jsonargparse_past_lightnings_range_is_named_with_the_install_that_fits(tmp_path, monkeypatch):
    _fake_jsonargparse(tmp_path, "5.0.0")
    monkeypatch.syspath_prepend(str(tmp_path))
    problem = unsupported_jsonargparse()
    lightning = metadata.version("lightning")
    assert problem.startswith(f"jsonargparse 5.0.0 is installed, but the CLI of Lightning {lightning} supports "
                              f"jsonargparse>=")
    assert f"'{CLI_EXTRA}'" in problem and "pip install 'jsonargparse[signatures]>=4.44,<5'" in problem


def test_a_lightning_that_supports_the_new_major_lets_it_through(tmp_path, monkeypatch):
    """The check follows Lightning's stated range, not a number of ours: a Lightning whose CLI states ``<6`` runs
    with jsonargparse 5."""
    _fake_jsonargparse(tmp_path, "5.0.0")
    monkeypatch.syspath_prepend(str(tmp_path))
    requires = metadata.requires

    def lightning_lifts_its_cap(distribution):
        if distribution == "lightning":
            return [f'jsonargparse[signatures]<6.0,>=4.39.0; extra == "{CLI_EXTRA}"']
        return requires(distribution)

    monkeypatch.setattr(about.metadata, "requires", lightning_lifts_its_cap)
    assert unsupported_jsonargparse() is None


@pytest.mark.parametrize("subcommand", ["fit", "estimate"])
def test_lowmem_refuses_an_unsupported_jsonargparse_in_one_message(subcommand, tmp_path):
    """A real ``lowmem`` process seeing jsonargparse 5.0.0 where Lightning states ``<5.0``: exit 2, one message
    naming both versions and the install that fits, no traceback, nothing written."""
    site, work = tmp_path / "site", tmp_path / "work"
    _fake_jsonargparse(site, "5.0.0")
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([LOWMEM, subcommand, "--config", "tiny.yaml"], cwd=work, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"lowmem {subcommand}: error: jsonargparse 5.0.0 is installed, but the CLI of "
                                  "Lightning ")
    assert proc.stderr.count("error:") == 1 and list(work.iterdir()) == []
