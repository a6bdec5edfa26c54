"""End-to-end on the real default model (SmolLM2-135M); CI runs these (-m smoke) after fetching it."""

import numpy as np
import pytest
from safetensors import safe_open

from aligncodec.formats.reader import ArchiveReader
from aligncodec import archive
from aligncodec.tools.eval import models
from aligncodec.codec.modes import decode_entry
from aligncodec.codec.torch_interop import tensor_bytes
from aligncodec.archive import read_aux_files
from aligncodec.auxfiles import AUX_PREFIX

pytestmark = [pytest.mark.smoke, pytest.mark.model, pytest.mark.slow]


@pytest.fixture(scope="module")
def smollm2():
    try:
        return models.resolve_model("smollm2")
    except models.ModelError as exc:
        pytest.skip(f"SmolLM2 not fetched: {exc}")


def test_lossless_archive_of_default_model_is_bit_exact(smollm2, tmp_path):
    out = tmp_path / "smollm2.acz"
    archive.compress("smollm2", out, progress=False)
    info = archive.inspect(out)
    assert info["n_tensors"] == 272 and info["n_weights"] > 134_000_000
    # all-in size really is the file size, and the coder beats raw float32
    assert info["bpw"] == pytest.approx((out.stat().st_size - info["aux_bytes"]) * 8 / info["n_weights"])
    assert info["bpw"] < 32
    src = archive.find_inputs(smollm2).files[0]
    with ArchiveReader(out) as r, safe_open(str(src), framework="pt") as st:
        for e in r.tensors:
            if e.name.startswith(AUX_PREFIX):
                continue
            got = decode_entry(e, r.read_streams(e))
            want = tensor_bytes(st.get_tensor(e.name))
            assert np.array_equal(got, want), e.name
    assert "config.json" in read_aux_files(out)
