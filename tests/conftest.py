import os

import pytest

# deterministic, modest thread use on the 2-core CI machine
os.environ.setdefault("NUMBA_NUM_THREADS", "2")
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

try:  # tests never assert on wall-clock time: no hypothesis deadline (a loaded CI machine tripped the 200 ms default)
    from hypothesis import settings as _hyp_settings

    _hyp_settings.register_profile("aligncodec", deadline=None)
    _hyp_settings.load_profile("aligncodec")
except ImportError:
    pass


def pytest_collection_modifyitems(config, items):
    """Tests marked ``fuzz`` run only when selected (``pytest -m fuzz``), so the fast suite stays fast."""
    import pytest

    if "fuzz" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="fuzz run: select with -m fuzz (CI runs it)")
    for item in items:
        if "fuzz" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def full_codes(monkeypatch):
    """A dict that receives, by tensor name, the encoder's full code (``TensorCode``, with its
    reconstruction ``W_hat`` kept) of every tensor the encoder codes while the test runs."""
    from aligncodec.codec import encoder as E

    codes: dict = {}
    real = E.code_candidate

    def keep(job, cand, step, stride=1, *a, **kw):
        kw["keep_w_hat"] = True
        c = real(job, cand, step, stride, *a, **kw)
        if stride == 1:
            codes[job.name] = c
        return c

    monkeypatch.setattr(E, "code_candidate", keep)
    return codes
