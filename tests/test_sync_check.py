import warnings

from tests.sync_check import synchronizing_calls


def _caught(*messages):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for m in messages:
            warnings.warn_explicit(m, UserWarning, "f.py", 7)
    return caught


def test_only_synchronizing_calls_count():
    """torch's one-time note on the debug mode says "synchroniz" and is no sync; c10's warning
    for a synchronizing call (its text in torch 2.11's libc10_cuda) is one."""
    note = (
        "Synchronization debug mode is a prototype feature and does not yet detect all "
        "synchronizing operations"
    )
    assert synchronizing_calls(_caught(note, "unrelated")) == []
    assert synchronizing_calls(_caught(note, "called a synchronizing CUDA operation")) == ["f.py:7"]
