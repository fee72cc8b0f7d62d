"""Training curves: round tick values."""
from upernet.training.plot import line_chart, nice_ticks


def test_ticks_are_round_values_inside_the_range():
    assert nice_ticks(0, 1000) == [0, 250, 500, 750, 1000]
    assert nice_ticks(3, 97) == [25, 50, 75]
    assert nice_ticks(0.113, 0.871) == [0.2, 0.4, 0.6, 0.8]
    assert nice_ticks(-3.2, -1.1) == [-3, -2]
    assert nice_ticks(0, 7) == [0, 2, 4, 6]
    assert nice_ticks(5, 5) == [5]


def test_line_chart_writes_a_png(tmp_path):
    path = line_chart([0, 10, 20], [0.5, 0.3, 0.2], "loss", "loss", tmp_path / "c.png", log_y=True)
    assert path.is_file()
