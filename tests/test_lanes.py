"""SideBySide: two pieces of work at once, each on its share of the threads, with the caller's grad mode."""

import threading

import pytest
import torch

from rlhf.fast.lanes import SideBySide


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_runs_the_second_piece_in_another_thread_with_half_the_threads(two_threads):
    lanes = SideBySide(True)
    seen = {}

    def first():
        seen["first"] = (threading.current_thread().name, torch.get_num_threads())
        return 1

    def second():
        seen["second"] = (threading.current_thread().name, torch.get_num_threads())
        return 2

    assert lanes.run(first, second) == (1, 2)
    assert seen["first"] == (threading.current_thread().name, 1)
    assert seen["second"][0].startswith("rlhf-lane") and seen["second"][1] == 1
    assert torch.get_num_threads() == 2  # the caller's count is back
    lanes.close()


def test_off_or_single_threaded_it_runs_in_turn(two_threads):
    off = SideBySide(False)
    torch.set_num_threads(1)
    single = SideBySide(True)  # one thread: nothing to share
    for lanes in (off, single):
        names = []
        lanes.run(lambda names=names: names.append(threading.current_thread().name),
                  lambda names=names: names.append(threading.current_thread().name))
        assert names == [threading.current_thread().name] * 2 and not lanes.enabled


def test_grad_mode_is_carried_to_the_worker(two_threads):
    lanes = SideBySide(True)
    weight = torch.ones(3, requires_grad=True)
    with torch.no_grad():
        _, out = lanes.run(lambda: None, lambda: weight * 2)
    assert not out.requires_grad
    _, out = lanes.run(lambda: None, lambda: weight * 2)
    assert out.requires_grad
    lanes.close()


def test_backward_side_by_side_gives_the_sums_gradients(two_threads):
    """Two graphs with no node in common: backward of each in its own lane = backward of their sum."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(16, 16), torch.nn.Linear(16, 1)
    x = torch.randn(8, 16)
    (a(x).square().mean() + 0.1 * b(x).square().mean()).backward()
    summed = [p.grad.clone() for p in (*a.parameters(), *b.parameters())]
    for p in (*a.parameters(), *b.parameters()):
        p.grad = None
    lanes = SideBySide(True)
    lanes.run(a(x).square().mean().backward, (0.1 * b(x).square().mean()).backward)
    for got, want in zip((p.grad for p in (*a.parameters(), *b.parameters())), summed):
        assert torch.allclose(got, want, atol=1e-6)
    lanes.close()


def test_an_error_in_either_piece_is_raised_after_both_end(two_threads):
    lanes = SideBySide(True)
    finished = []

    def fails():
        raise ValueError("boom")

    def slow():
        threading.Event().wait(0.2)
        finished.append(True)

    with pytest.raises(ValueError, match="boom"):
        lanes.run(fails, slow)
    assert finished == [True]  # the worker's piece had ended before the error came back
    assert torch.get_num_threads() == 2
    with pytest.raises(ValueError, match="boom"):
        lanes.run(lambda: None, fails)
    lanes.close()
