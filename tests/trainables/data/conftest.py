import pytest

PROXY_VARIABLES = ["http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"]


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    # The download probe connects to a configured proxy instead of the host; the tests expect messages that
    # name the host, so a proxy set on the test machine must not leak in.
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
