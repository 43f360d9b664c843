"""Alias moves are not cut in half by Ctrl-C or SIGTERM: the signal waits for the block."""

import signal

import pytest

from pipelines.aliases import uninterrupted


def test_ctrl_c_inside_takes_effect_after_the_block():
    steps = []
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Ray may have installed its own
    try:
        with pytest.raises(KeyboardInterrupt):
            with uninterrupted():
                signal.raise_signal(signal.SIGINT)
                steps.append("second alias moved")
        assert steps == ["second alias moved"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_sigterm_inside_reaches_the_previous_handler_after_the_block():
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(("handler", signum)))
    try:
        with uninterrupted():
            signal.raise_signal(signal.SIGTERM)
            received.append(("block", "done"))
        assert received == [("block", "done"), ("handler", signal.SIGTERM)]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_without_a_signal_the_handlers_are_restored_untouched():
    before = signal.getsignal(signal.SIGINT)
    with uninterrupted():
        pass
    assert signal.getsignal(signal.SIGINT) is before
