"""The intra-op thread scope for small-batch sampling: it sets the count inside and always puts it back."""

import pytest
import torch

from models.threads import intra_op_threads, sampling_threads


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_the_count_is_set_inside_and_restored_after(two_threads):
    with intra_op_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_the_count_is_restored_after_an_exception(two_threads):
    with pytest.raises(RuntimeError, match="boom"):
        with intra_op_threads(1):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_a_bad_count_is_refused(bad):
    with pytest.raises(ValueError, match="positive integer"):
        with intra_op_threads(bad):
            pass


def test_sampling_threads_is_one_thread_for_a_small_cpu_batch_only(two_threads):
    with sampling_threads(4, "cpu"):
        assert torch.get_num_threads() == 1
    with sampling_threads(64, "cpu"):
        assert torch.get_num_threads() == 2
    with sampling_threads(1, "meta"):  # not a CPU: nothing to gain, nothing changed
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == 2
