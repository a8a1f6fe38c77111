"""Messages name the setting they are about; each front end words it its own way."""

from __future__ import annotations

import pickle

import pytest

from cellfit.console import FLAGS
from cellfit.errors import SETTING_WORDS, CellfitError, Notice, worded


def test_an_error_names_its_setting_in_each_front_ends_words():
    err = CellfitError("no cells were found: set {setting}.", setting="diameter")
    assert str(err) == "no cells were found: set the cell diameter."
    assert err.worded(FLAGS) == "no cells were found: set --diameter PIXELS."
    assert err.worded({"diameter": "Cell diameter"}) == "no cells were found: set Cell diameter."
    # a front end that has no name for the setting falls back to plain words
    assert err.worded({"tile": "--tile"}) == str(err)


def test_a_message_without_a_setting_is_left_as_it_is():
    text = "a {brace} that is not a setting stays"
    assert str(CellfitError(text)) == text
    assert CellfitError(text).worded(FLAGS) == text
    assert worded(ValueError("plain"), FLAGS) == "plain"
    assert worded("text", FLAGS) == "text"
    assert worded(None, FLAGS) is None


def test_an_error_keeps_its_setting_through_pickling():
    """Cluster workers send errors back pickled: the setting must survive."""
    err = CellfitError("make {setting} smaller.", setting="tile")
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, CellfitError) and back.setting == "tile"
    assert back.worded(FLAGS) == "make --tile smaller."


def test_notices_join_and_keep_each_parts_setting():
    first = Notice("diameter estimated at 31 pixels; to choose it yourself, set {setting}",
                   setting="diameter_option")
    both = Notice.join(None, first, "outputs replaced", None)
    assert both.worded(FLAGS) == (
        "diameter estimated at 31 pixels; to choose it yourself, set --diameter; "
        "outputs replaced"
    )
    assert str(both).endswith("set the cell diameter; outputs replaced")
    assert Notice.join(None, "") is None
    assert pickle.loads(pickle.dumps(both)) == both
    assert both == both.worded() and both != "something else"


@pytest.mark.parametrize("key", sorted(SETTING_WORDS))
def test_every_setting_has_plain_words_and_a_flag(key):
    assert SETTING_WORDS[key] and FLAGS[key].startswith("--")
