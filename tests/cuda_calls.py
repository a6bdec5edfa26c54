"""Test helper: count the CUDA driver-level work aligncodec's GPU decoders do (copies, allocations, launches)."""


def count_calls(monkeypatch) -> dict:
    """Count host-to-device copies, device-to-host copies, device allocations and kernel launches
    made through aligncodec's decode_cuda module (each one CUDA driver call or more)."""
    from aligncodec.codec.entropy import decode_cuda
    from aligncodec.codec.modes import lossy_cuda

    calls: dict = {}

    def counted(key, fn):
        def f(*a, **k):
            calls[key] = calls.get(key, 0) + 1
            return fn(*a, **k)
        return f

    for key, attr in (("h2d", "_h2d"), ("d2h", "_d2h"), ("alloc", "_raw_device_array"), ("to_device", "_raw_to_device")):
        monkeypatch.setattr(decode_cuda, attr, counted(key, getattr(decode_cuda, attr)))

    class Launches:
        def __init__(self, k):
            self.k = k

        def __getitem__(self, cfg):
            return counted("launch", self.k[cfg])

    for m, names in ((decode_cuda, ("rans_multi_kernel", "join_kernel", "join_from_kernel")),
                     (lossy_cuda, ("identity_kernel", "segment_kernel", "load_kernel", "stage_kernel", "finish_kernel",
                                   "levels_kernel", "levels_multi_kernel"))):
        for nm in names:
            monkeypatch.setattr(m, nm, Launches(getattr(m, nm)))
    return calls
