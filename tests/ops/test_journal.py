"""The undo log a failed step replays: rows saved as they are overwritten go back newest first."""

import torch

from kvpass.ops import journal


def test_rows_saved_twice_end_as_they_were_first_and_nothing_is_logged_outside_a_step():
    buf = torch.arange(12.0).reshape(3, 4)
    start = buf.clone()
    with journal.recording() as log:
        for row, value in ((1, -1.0), (1, -2.0), (2, -3.0)):
            index = (torch.tensor([row]),)
            journal.active().save(buf, index)
            buf[index] = value
        assert len(log) == 3
        log.undo()
    assert torch.equal(buf, start)
    assert journal.active() is None


def test_an_entry_taken_twice_in_one_call_goes_back_to_its_row_before_the_call():
    rows = torch.randn(1, 2, 4, 3)
    start = rows.clone()
    taken = torch.tensor([[[2, 2, 0], [1, 3, 1]]])  # [B, H, T]: head 0 takes entry 2 twice, head 1 entry 1 twice
    old = torch.empty(1, 2, 3, 3)
    with journal.recording() as log:
        for t in range(3):  # what a store does: keep the row it overwrites, then write the token
            for h in range(2):
                old[0, h, t] = rows[0, h, taken[0, h, t]]
                rows[0, h, taken[0, h, t]] = 10.0 * t + h
        journal.save_taken(rows, taken, old)
        log.undo()
    assert torch.equal(rows, start)
