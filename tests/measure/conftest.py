import pytest


@pytest.fixture
def stop_after_first_layer():
    """A status hook that stops a measurement right after its first layer is checkpointed, raising
    ``stop_after_first_layer.error``."""
    class StopRun(Exception):
        pass

    def hook(event):
        if event.get("layer") is not None and "seconds" in event:
            raise StopRun
    hook.error = StopRun
    return hook
