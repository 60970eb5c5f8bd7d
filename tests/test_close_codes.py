"""CloseCode names the close codes of RFC 6455 section 7.4.1 and compares equal to them."""

from __future__ import annotations

from lowmemws import CloseCode
from lowmemws.codec import close_code_valid


def test_close_codes_are_the_rfc_numbers() -> None:
    assert CloseCode.NORMAL_CLOSURE == 1000
    assert CloseCode.GOING_AWAY == 1001
    assert CloseCode.ABNORMAL_CLOSURE == 1006
    assert CloseCode.MESSAGE_TOO_BIG == 1009
    assert CloseCode.TRY_AGAIN_LATER == 1013
    assert CloseCode(1008) is CloseCode.POLICY_VIOLATION


def test_the_codes_connection_close_may_send_are_the_documented_ones() -> None:
    sendable = {code for code in CloseCode if close_code_valid(code)}
    assert sendable == {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011}
