import pytest
@pytest.fixture
def probe_fx(): return 1
