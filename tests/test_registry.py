"""upop.registry: the one "name -> entry" idiom (tasks, presets, data formats, architectures)."""

from __future__ import annotations

import pytest

from upop.registry import Registry, UnknownNameError


def test_register_get_names_and_one_line_error():
    reg: Registry[int] = Registry("colour")
    reg.add("red", 1)

    @reg.register("blue")
    def blue() -> int:
        return 2

    assert reg["red"] == 1 and reg["blue"] is blue
    assert reg.names() == ("red", "blue") and list(reg) == ["red", "blue"] and len(reg) == 2
    assert "red" in reg and "green" not in reg and ["x"] not in reg
    assert reg.get("green") is None and reg.get("green", 7) == 7 and reg.get(["x"]) is None
    with pytest.raises(UnknownNameError, match=r"^unknown colour 'green'; known: red, blue$"):
        reg["green"]
    with pytest.raises(UnknownNameError, match="unknown colour"):
        reg[["unhashable"]]


def test_custom_error_and_duplicates():
    class MyError(ValueError):
        pass

    reg: Registry[str] = Registry("data.format", error=MyError)
    reg.add("a", "x")
    reg.add("a", "x")  # the same entry again (a module imported twice) is harmless
    with pytest.raises(ValueError, match="registered twice"):
        reg.add("a", "y")
    with pytest.raises(MyError, match="unknown data.format 'b'; known: a"):
        reg["b"]
    with pytest.raises(ValueError, match="non-empty strings"):
        reg.add("", "z")
