"""The folding baselines (SmoothQuant, KurTail, SpinQuant) on the real SmolLM2-135M: every seed method's transform, folded and installed without
quantisation, computes the same function as the original model (to float32 tolerance)."""

import pytest
import torch

from aligncodec.codec import baselines as B
from aligncodec.codec.transforms import folding as F
from aligncodec.codec.quant.grids import FixedGrid
from aligncodec.codec.baselines import kurtail as KT
from aligncodec.codec.baselines import smoothquant as SQ
from aligncodec.codec.baselines import spinquant as SP
from aligncodec.tools.experiments import baseline as BL
from aligncodec.tools.eval import models
from aligncodec.tools.eval.calibrate import capture_sigma
from aligncodec.tools.eval.evaluate import make_windows

pytestmark = [pytest.mark.model, pytest.mark.slow]


@pytest.fixture(scope="module")
def setup():
    try:
        models.resolve_model("smollm2")
    except models.ModelError as exc:
        pytest.skip(f"SmolLM2 not fetched: {exc}")
    torch.set_num_threads(2)
    model, tok = models.load_causal_lm("smollm2")
    sigma, _ = capture_sigma(model, tok, n_tokens=512, window=256, progress=False)
    x = make_windows(tok, 256, "eval", window=256).windows[0][None]
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=x, use_cache=False).logits.double(), -1)
    return tok, sigma, x, ref


def _transformed_logp(prepare_fn, tok, sigma, x):
    model, _ = models.load_causal_lm("smollm2")
    prep = prepare_fn(model, sigma)
    with torch.no_grad():
        for n, m in BL.linear_weights(model).items():
            m.weight.copy_(prep.install(n, prep.coded(n, m.weight.detach().clone())))
        return torch.log_softmax(model(input_ids=x, use_cache=False).logits.double(), -1), prep


@pytest.mark.parametrize("method", ["smoothquant", "kurtail", "kurtail-nofold", "spinquant"])
def test_folded_model_computes_the_same_function(setup, method):
    tok, sigma, x, ref = setup
    if method == "smoothquant":  # one α for every site: the folds are what is tested, not the search
        def fn(model, sigma):
            new_sigma, _ = SQ.smooth_model(model, sigma, FixedGrid(3), 0, alphas=(0.5,))
            return F.Prepared(new_sigma)
    elif method.startswith("kurtail"):
        def fn(model, sigma):
            return KT.transform_model(model, sigma, method=B.get_method("kurtail-gptq"), steps_r1=5, steps_r2=5,
                              fold_norms=method == "kurtail")
    else:  # a couple of training steps: any learned rotation must keep the function
        def fn(model, sigma):
            return SP.transform_model(model, sigma, method=B.get_method("spinquant-gptq"), bits=3, steps=1, seqlen=16,
                              calib_windows=lambda n, w: list(make_windows(tok, n, "calib", window=w).windows))
    logp, prep = _transformed_logp(fn, tok, sigma, x)
    kld = float((ref.exp() * (ref - logp)).sum(-1).mean())
    assert kld < 1e-6, kld
    assert float((logp - ref).abs().max()) < 2e-3
    # the transform really changed the coded weights (not an identity pass)
    assert prep.sigma is not sigma
