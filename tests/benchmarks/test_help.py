"""Every benchmark's ``--help``: each flag says what it does and shows its default."""

import argparse
from pathlib import Path

import pytest

from ..helpers import benchmark_script

SCRIPTS = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "benchmarks").glob("*.py")
                 if not p.stem.startswith("_"))


class _Parsed(Exception):
    pass


def parser_of(name: str) -> argparse.ArgumentParser:
    """The parser a script builds, caught as it starts parsing (nothing else runs)."""
    script = benchmark_script(name)
    caught = []

    def catch(self, *args, **kwargs):
        caught.append(self)
        raise _Parsed

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", catch)
        patch.setattr(argparse.ArgumentParser, "parse_known_args", catch)
        with pytest.raises(_Parsed):
            (script.parse_args if hasattr(script, "parse_args") else script.main)()
    return caught[0]


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_flag_has_help_and_shows_its_default(name):
    parser = parser_of(name)
    assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter), parser.formatter_class
    silent = [a.option_strings or a.dest for a in parser._actions if not a.help]
    assert not silent, f"{name}.py: no help for {silent}"
