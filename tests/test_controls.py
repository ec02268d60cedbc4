"""Per-request controls (extra_args / vllm_xargs): validation messages and the caps they give."""

import pytest

from vllm_gemma_mtp.controls import MAX_DRAFT, SPECULATE, ControlError, draft_cap, validate


@pytest.mark.parametrize("args,cap", [(None, 4), ({}, 4), ({SPECULATE: False}, 0), ({SPECULATE: 0}, 0),
                                      ({SPECULATE: True}, 4), ({MAX_DRAFT: 2}, 2), ({MAX_DRAFT: 0}, 0),
                                      ({MAX_DRAFT: 9}, 4), ({SPECULATE: True, MAX_DRAFT: 1}, 1),
                                      ({"another_plugin": "x"}, 4)])
def test_caps(args, cap):
    validate(args)
    assert draft_cap(args, 4) == cap


@pytest.mark.parametrize("args,msg", [({MAX_DRAFT: -1}, "integer >= 0"), ({MAX_DRAFT: "2"}, "integer >= 0"),
                                      ({MAX_DRAFT: 1.5}, "integer >= 0"), ({MAX_DRAFT: True}, "integer >= 0"),
                                      ({SPECULATE: "off"}, "true or false"), ({SPECULATE: 2}, "true or false"),
                                      ({"gemma_mtp_k": 2}, "unknown vllm-gemma-mtp request option 'gemma_mtp_k'")])
def test_bad_values_name_the_key(args, msg):
    with pytest.raises(ControlError, match=msg):
        validate(args)
