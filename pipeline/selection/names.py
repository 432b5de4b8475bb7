"""The selection methods' names: the one list the config validates against (torch-free, so that
``import pipeline.config`` stays cheap). ``methods.METHODS`` registers exactly these, less
``none`` (train on everything: no selector is built); methods.py checks it at import and
tests/test_select_rules.py ties the two.
"""

SELECTION_METHODS = (
    "none",
    "random",
    "clipscore",
    "small_loss",
    "big_loss",
    "dissect",
    "dissect_z",
    "filter_random",
    "filter_visits",
    "filter_soft",
    "gsc",
    "margin_trend",
    "filter_2d",
    "infobatch",
    "gsc_null",
    "gsc_rank",
    "swap_null",
    "swap_mean",
    "swap_lfdr",
    "swap_guard",
    "oracle",
)
