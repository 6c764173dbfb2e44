"""The one NAME[i] parser (mdsens.names): grammar, formatting, checks, and bad input."""

import pytest

from mdsens import names
from mdsens.names import Name, NameSyntaxError


@pytest.mark.parametrize("text,base,index", [
    ("diameter", "diameter", None),
    ("  epsilon ", "epsilon", None),
    ("diameter[3]", "diameter", (3,)),
    ("stress[0,1]", "stress", (0, 1)),
    ("stress[ 0 , 1 ]", "stress", (0, 1)),
    ("_x9[10]", "_x9", (10,)),
])
def test_parse_good_names(text, base, index):
    assert names.parse(text) == Name(base, index)


@pytest.mark.parametrize("text", ["diameter[1]", "stress[0,1]", "epsilon", "elastic_tensor[0,1,1,0]"])
def test_format_is_the_inverse_of_parse(text):
    assert str(names.parse(text)) == text
    assert str(names.parse(" " + text.replace(",", " , ") + " ")) == text


@pytest.mark.parametrize("text,reason", [
    ("", "expected NAME or NAME[i]"),
    ("[0]", "expected NAME or NAME[i]"),
    ("9lives", "expected NAME or NAME[i]"),
    ("d energy / d diameter", "expected NAME or NAME[i]"),
    ("diameter[", "unclosed '['"),
    ("diameter[x", "unclosed '['"),
    ("diameter[]", "empty index"),
    ("diameter[ ]", "empty index"),
    ("diameter[x]", "index 'x' is not a non-negative integer"),
    ("diameter[-1]", "index '-1' is not a non-negative integer"),
    ("diameter[1.5]", "index '1.5' is not a non-negative integer"),
    ("diameter[1,]", "index '' is not a non-negative integer"),
    ("diameter[١]", "index '١' is not a non-negative integer"),  # a non-ASCII digit
    ("diameter[1][2]", "index '1][2' is not a non-negative integer"),
])
def test_malformed_names_are_one_line_errors(text, reason):
    with pytest.raises(NameSyntaxError) as err:
        names.parse(text)
    message = str(err.value)
    assert message.startswith(repr(text) + ": ") and reason in message and "\n" not in message
    assert isinstance(err.value, ValueError) and err.value.text == text and reason in err.value.reason


def test_resolve_checks_the_name_and_the_index():
    shapes = {"diameter": (2,), "epsilon": (), "stress": (3, 3)}
    assert names.resolve("diameter[1]", shapes) == Name("diameter", (1,))
    assert names.resolve("stress[2,0]", shapes) == Name("stress", (2, 0))
    assert names.resolve("epsilon", shapes) == Name("epsilon")
    for text, reason in [("foo", "no parameter 'foo'; on offer: diameter, epsilon, stress"),
                         ("diameter[2]", "index out of range for diameter of shape (2,)"),
                         ("diameter[0,0]", "index out of range for diameter of shape (2,)"),
                         ("stress[1]", "index out of range for stress of shape (3, 3)"),
                         ("epsilon[0]", "index out of range for epsilon of a scalar")]:
        with pytest.raises(NameSyntaxError, match=r"^'.*': " + reason.replace("(", r"\(").replace(")", r"\)")):
            names.resolve(text, shapes)
    with pytest.raises(NameSyntaxError, match="no parameter 'x'; on offer: none"):
        names.resolve("x", {})


def test_elements_matches_and_columns():
    assert [str(e) for e in names.elements("stress", (2, 2))] == ["stress[0,0]", "stress[0,1]", "stress[1,0]",
                                                                   "stress[1,1]"]
    assert [str(e) for e in names.elements("epsilon", ())] == ["epsilon"]
    assert [e.column for e in names.elements("diameter", (2,))] == ["diameter_0", "diameter_1"]
    assert names.parse("stress[0,1]").column == "stress_0_1" and names.parse("box").column == "box"
    whole, one = names.parse("diameter"), names.parse("diameter[1]")
    assert names.matches(whole, one) and names.matches(one, one)
    assert not names.matches(one, names.parse("diameter[0]"))
    assert not names.matches(whole, names.parse("box[0]"))
    assert not names.matches(names.parse("epsilon[0]"), Name("epsilon", ()))
    assert names.derivative("energy", one) == "denergy/ddiameter[1]"
