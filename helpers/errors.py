"""The errors a user meets before anything runs: the model can't be had, or the GPU has no room for it. Each
message is one sentence that says what to do."""


class ModelUnavailable(RuntimeError):
    """The model can't be found or loaded; the message is one sentence that says what to do."""


class GpuMemoryBusy(ModelUnavailable):
    """Other processes hold so much of the GPU that the pipeline won't fit beside them."""
