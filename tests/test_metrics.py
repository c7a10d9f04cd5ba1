"""Metrics against matrices whose values were worked out by hand."""

import pytest

from cl_runner import metrics

# Rows: base, after task 1, after task 2, after task 3.
R = [
    [0.1, 0.2, 0.3],
    [0.9, 0.4, 0.3],
    [0.5, 0.8, 0.5],
    [0.3, 0.6, 0.7],
]


def test_final_accuracy_is_mean_of_last_row():
    assert metrics.final_accuracy(R) == pytest.approx((0.3 + 0.6 + 0.7) / 3)


def test_average_accuracy_over_seen_tasks():
    # step1: 0.9; step2: (0.5+0.8)/2 = 0.65; step3: (0.3+0.6+0.7)/3 = 0.5333
    assert metrics.average_accuracy(R) == pytest.approx((0.9 + 0.65 + 1.6 / 3) / 3)


def test_bwt_gem_form_divides_by_t_minus_1():
    # task1: 0.3-0.9 = -0.6; task2: 0.6-0.8 = -0.2 -> mean -0.4
    assert metrics.backward_transfer(R) == pytest.approx(-0.4)


def test_fwt_uses_base_row():
    # task2: R[1][2]-R[0][2] = 0.4-0.2 = 0.2; task3: R[2][3]-R[0][3] = 0.5-0.3 = 0.2
    assert metrics.forward_transfer(R) == pytest.approx(0.2)


def test_forgetting_is_drop_from_best_earlier_score():
    # task1: max(0.9, 0.5) - 0.3 = 0.6; task2: max(0.4, 0.8) - 0.6 = 0.2
    assert metrics.per_task_forgetting(R) == pytest.approx([0.6, 0.2])
    assert metrics.forgetting(R) == pytest.approx(0.4)


def test_new_task_accuracy_is_diagonal_mean():
    assert metrics.new_task_accuracy(R) == pytest.approx((0.9 + 0.8 + 0.7) / 3)


def test_no_forgetting_matrix_gives_zero_bwt_and_forgetting():
    perfect = [[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]]
    assert metrics.backward_transfer(perfect) == 0.0
    assert metrics.forgetting(perfect) == 0.0
    assert metrics.forward_transfer(perfect) == 0.0


def test_single_task_has_no_transfer_metrics():
    one = [[0.2], [0.8]]
    assert metrics.backward_transfer(one) is None
    assert metrics.forward_transfer(one) is None
    assert metrics.forgetting(one) is None
    assert metrics.final_accuracy(one) == pytest.approx(0.8)


def test_all_metrics_adds_general_delta():
    out = metrics.all_metrics(R, general=[0.5, 0.4, 0.45, 0.3])
    assert out["general_delta"] == pytest.approx(-0.2)
    assert out["bwt"] == pytest.approx(-0.4)


@pytest.mark.parametrize("bad", [[], [[0.1, 0.2]], [[0.1], [0.2, 0.3]], [[0.1, 0.2], [0.3, 0.4]]])
def test_incomplete_matrix_is_rejected(bad):
    with pytest.raises(ValueError):
        metrics.final_accuracy(bad)


def test_temporal_split_averages_the_diagonal_and_the_triangles_after_training():
    # rows 1-3 only. diagonal: 0.9, 0.8, 0.7; lower (learnt before): R[2][0], R[3][0], R[3][1] = 0.5, 0.3, 0.6;
    # upper (still to come): R[1][1], R[1][2], R[2][2] = 0.4, 0.3, 0.5
    split = metrics.temporal_split(R)
    assert split["in_distribution"] == pytest.approx(0.8)
    assert split["backward"] == pytest.approx(1.4 / 3)
    assert split["forward"] == pytest.approx(1.2 / 3)
    assert metrics.temporal_split([[0.2], [0.5]]) == {"in_distribution": 0.5, "backward": None, "forward": None}


# Perplexities (lower is better): task 1 learnt to 10, then rises to 14; task 2 from 30 to 12, then 11.
PPL = [
    [20.0, 30.0],
    [10.0, 25.0],
    [14.0, 11.0],
]


def test_lower_is_better_metrics_keep_the_sign_of_forgetting():
    """On perplexity, BWT < 0 and forgetting > 0 still mean that old tasks got worse, FWT > 0 that the
    first task helped the second; the means stay perplexities."""
    out = metrics.all_metrics(PPL, lower_is_better=True)
    assert out["bwt"] == pytest.approx(-(14.0 - 10.0))  # perplexity of task 1 rose by 4
    assert out["forgetting"] == pytest.approx(4.0)
    assert out["fwt"] == pytest.approx(30.0 - 25.0)  # learning task 1 lowered task 2's perplexity by 5
    assert out["acc"] == pytest.approx(12.5) and out["new_acc"] == pytest.approx((10.0 + 11.0) / 2)
    assert out["temporal"] == {"in_distribution": pytest.approx(10.5), "backward": pytest.approx(14.0), "forward": pytest.approx(25.0)}
    assert metrics.all_metrics(PPL)["bwt"] == pytest.approx(4.0)  # read as accuracy, the sign would flip
