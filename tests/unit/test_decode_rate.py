"""sglang:gen_throughput's value: the last batch's tokens per second, 0 once it is stale
(SGLang's 30 s) and 0 for a batch that took no time."""

from services.engine.sglang_metrics import THROUGHPUT_STALE_S, DecodeRate


def test_the_rate_is_the_last_batchs_and_goes_to_zero_when_stale() -> None:
    rate = DecodeRate(tokens=40, seconds=2.0, ended=100.0)
    assert rate.now(at=101.0) == 20.0
    assert rate.now(at=100.0 + THROUGHPUT_STALE_S) == 20.0
    assert rate.now(at=100.0 + THROUGHPUT_STALE_S + 0.1) == 0.0
    assert DecodeRate(tokens=3, seconds=0.0, ended=100.0).now(at=100.0) == 0.0
