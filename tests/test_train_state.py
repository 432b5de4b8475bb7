"""TrainState: the loop's counters, advanced by the state itself, and what a checkpoint stores."""

from pipeline.trainer import TrainState


def test_advance_counts_samples_steps_and_bad_steps_in_a_row():
    s = TrainState()
    s.advance(seen=64, trained=32)
    s.advance(seen=64, trained=0)  # a non-finite loss: nothing trained
    s.advance(seen=64, trained=0)
    assert (s.step, s.step_in_epoch, s.samples_seen, s.samples_trained, s.bad_steps) == (
        3,
        3,
        192,
        32,
        2,
    )
    s.advance(seen=64, trained=32)  # a good step ends the run of bad ones
    assert s.bad_steps == 0 and s.samples_trained == 64


def test_next_epoch_restarts_the_data_position_and_state_round_trips():
    s = TrainState()
    s.advance(seen=8, trained=8)
    s.raw_pos = {0: 17, 1: 15}
    s.skipped = {"bad_image": 2}
    saved = s.state_dict()
    s.next_epoch()
    assert (s.epoch, s.step_in_epoch, s.raw_pos, s.step) == (1, 0, {}, 1)
    back = TrainState()
    back.load_state_dict(
        {**saved, "raw_pos": {"0": 17, "1": 15}}
    )  # keys as a JSON round trip leaves them
    assert back.state_dict() == saved
