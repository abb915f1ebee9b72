import os
import tempfile

# Ultralytics (tests of dynconv.integrations): never reach the network or ~/.config
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "0")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="dynconv-tests-yolo-"))

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=os.environ.get("CI") == "true",
)
settings.load_profile("default")
# at most two torch threads; one in each process where pytest-xdist runs the suite in several
# (make test: two processes on two cores, not four threads fighting for them)
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
else:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))



@pytest.fixture
def mnist(tmp_path_factory, monkeypatch) -> str:
    """MNIST for one test: the real wheel where the data folder holds it ('real'), else a small
    fake of the same layout (``mnist_fixture``: 6/2/3 images of each digit) that the loader is
    pointed at for this test only ('fake')."""
    from mnist_fixture import real_wheel_cached, use_fake_wheel, write_fake_wheel

    if real_wheel_cached():
        return "real"
    folder = tmp_path_factory.mktemp("mnist")
    use_fake_wheel(monkeypatch, folder, write_fake_wheel(folder))
    return "fake"
