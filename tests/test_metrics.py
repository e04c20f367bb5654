"""CL metrics on hand-computed matrices, and the published table reproduced."""

import pytest

from mllmcl.evaluation.metrics import AccuracyMatrix, bwt, forgetting, maa, mfn, mft
from mllmcl.evaluation.plots import heatmap_png

# R[t][j]; hand-computed below
R = [
    [80.0, None, None],
    [60.0, 90.0, None],
    [50.0, 70.0, 100.0],
]


def test_hand_computed_matrix():
    assert mft(R) == pytest.approx((80 + 90 + 100) / 3)
    assert mfn(R) == pytest.approx((50 + 70 + 100) / 3)
    assert maa(R) == pytest.approx((80 + (60 + 90) / 2 + (50 + 70 + 100) / 3) / 3)
    assert bwt(R) == pytest.approx(((50 - 80) + (70 - 90)) / 2)
    assert forgetting(R) == pytest.approx(((80 - 50) + (90 - 70)) / 2)


# A task that peaks after it was learned and then drops: forgetting (drop from the best earlier
# score) and -BWT (drop from the score right after learning) differ, and MAA is not MFT or MFN.
PEAKED = [
    [50.0, None, None],
    [80.0, 60.0, None],
    [40.0, 60.0, 90.0],
]


def test_hand_computed_matrix_where_forgetting_is_not_minus_bwt():
    assert mft(PEAKED) == pytest.approx((50 + 60 + 90) / 3)  # 66.67
    assert mfn(PEAKED) == pytest.approx((40 + 60 + 90) / 3)  # 63.33
    assert maa(PEAKED) == pytest.approx((50 + (80 + 60) / 2 + (40 + 60 + 90) / 3) / 3)  # 61.11
    assert bwt(PEAKED) == pytest.approx(((40 - 50) + (60 - 60)) / 2)  # -5: measured from the diagonal
    assert forgetting(PEAKED) == pytest.approx(((80 - 40) + (60 - 60)) / 2)  # 20: from the best earlier score
    assert forgetting(PEAKED) != pytest.approx(-bwt(PEAKED))
    assert len({round(v, 6) for v in (mft(PEAKED), mfn(PEAKED), maa(PEAKED))}) == 3


def test_no_forgetting_gives_zero_bwt():
    R2 = [[70.0, None], [70.0, 60.0]]
    assert bwt(R2) == 0.0 and forgetting(R2) == 0.0


PUBLISHED_DCL = {  # final per-task accuracy, MFT, MFN, MAA, BWT (LLaVA-1.5-7B, BENCHMARK.md)
    "LoRA-FT": ([69.65, 41.59, 25.43, 40.88, 87.45], 64.98, 53.00, 61.13, -14.97),
    "O-LoRA": ([74.64, 44.42, 30.02, 41.47, 87.15], 65.16, 55.54, 62.12, -12.03),
    "MoELoRA": ([77.54, 41.85, 27.62, 40.13, 86.75], 64.94, 54.78, 61.76, -12.70),
    "LoRA-FT + replay": ([76.54, 50.27, 43.01, 43.32, 89.85], 66.32, 60.60, 64.72, -7.15),
    "MR-LoRA": ([80.87, 65.32, 54.12, 56.71, 91.12], 69.64, 69.63, 71.06, -0.01),
}


@pytest.mark.parametrize("method", sorted(PUBLISHED_DCL))
def test_published_dcl_row_is_consistent_with_our_metrics(method):
    """The paper publishes the last row, MFT, MFN, MAA and BWT, not the matrix. What can be
    checked without the matrix: MFN is the mean of the published last row, and BWT follows
    from the last row and MFT (any diagonal with the published mean gives the same BWT).
    The matrix built here takes its diagonal from MFT (not from BWT) and peaks above the
    diagonal in between, so a BWT computed from the best earlier score (forgetting) fails.
    MAA needs the intermediate rows, which are not published: it is checked on the
    hand-computed matrices above."""
    last, pub_mft, pub_mfn, _pub_maa, pub_bwt = PUBLISHED_DCL[method]
    T = len(last)
    # diagonal: the final scores shifted by one constant so that its mean is the published MFT
    shift = (T * pub_mft - sum(last)) / (T - 1)
    diag = [last[i] + shift for i in range(T - 1)] + [last[-1]]
    mat = [[None] * T for _ in range(T)]
    for t in range(T):
        for j in range(t + 1):
            mat[t][j] = last[j] if t == T - 1 else (diag[j] if j == t else diag[j] + 3.0)  # a peak in between
    assert mfn(mat) == pytest.approx(pub_mfn, abs=0.01)
    assert mft(mat) == pytest.approx(pub_mft, abs=0.01)
    assert bwt(mat) == pytest.approx(pub_bwt, abs=0.01)
    assert -forgetting(mat) < pub_bwt - 2.0  # the peak counts for forgetting, not for BWT


def test_accuracy_matrix_rows_and_validation():
    m = AccuracyMatrix(tasks=["RS", "Med", "AD"])
    m.add_row({"RS": 80})
    with pytest.raises(ValueError, match="not seen yet"):
        m.add_row({"RS": 1, "Med": 2, "AD": 3})
    with pytest.raises(ValueError, match="scores missing"):
        m.add_row({"Med": 2})
    with pytest.raises(ValueError, match="metrics need every stage"):
        m.metrics()
    m.add_row({"RS": 60, "Med": 90})
    m.add_row({"RS": 50, "Med": 70, "AD": 100})
    assert m.rows == R
    assert m.metrics()["BWT"] == pytest.approx(-25.0)
    assert AccuracyMatrix.from_dict(m.to_dict()).rows == R
    assert "after Med" in m.format_table()


def test_incomplete_matrix_is_rejected():
    with pytest.raises(ValueError, match=r"R\[1\]\[1\] is missing"):
        mft([[1.0, None], [1.0, None]])


def test_heatmap_is_a_png():
    m = AccuracyMatrix(tasks=["RS", "Med"], rows=[[80.0, None], [60.0, 90.0]], zero_shot=[10.0, 20.0])
    png = heatmap_png(m, title="test")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_forward_transfer_on_a_hand_computed_matrix():
    """FWT (GEM): mean over j >= 1 of (score on task j after stage j-1) - (the base model's on j)."""
    from mllmcl.evaluation.metrics import fwt

    zero_shot = [25.0, 20.0, 40.0]
    before = [None, 50.0, 30.0]  # R[0][1], R[1][2]: each task before it is trained
    assert fwt(before, zero_shot) == pytest.approx(((50 - 20) + (30 - 40)) / 2)  # 10
    assert fwt([None], [10.0]) is None  # one task: nothing comes after
    assert fwt([None, None, 30.0], zero_shot) is None  # a run that did not probe every task
    with pytest.raises(ValueError, match="3 forward scores but 2"):
        fwt(before, zero_shot[:2])
    m = AccuracyMatrix(tasks=["A", "B", "C"])
    for row in ({"A": 80.0}, {"A": 60.0, "B": 90.0}, {"A": 50.0, "B": 70.0, "C": 100.0}):
        m.add_row(row)
    assert m.metrics()["FWT"] is None  # not measured
    for j, (b, z) in enumerate(zip(before, zero_shot)):
        m.set_forward(j, b, z)
    assert m.metrics()["FWT"] == pytest.approx(10.0)
    assert {k: v for k, v in m.metrics().items() if k != "FWT"} == \
        {"MFT": mft(R), "MFN": mfn(R), "MAA": maa(R), "BWT": bwt(R), "forgetting": forgetting(R)}  # unchanged
    back = AccuracyMatrix.from_dict(m.to_dict())
    assert back.forward == m.forward and back.zero_shot == m.zero_shot and back.fwt() == m.fwt()
    assert "before" in m.format_table() and "zero-shot" in m.format_table()
    with pytest.raises(ValueError, match="task 0"):
        m.set_forward(0, 10.0, None)


def test_stage_records_fill_each_track_without_mixing():
    from mllmcl.evaluation.metrics import add_stage_record, track_matrices

    ms = track_matrices(["A", "B"], ("native", "exact", "f1"))
    add_stage_record(ms, {"scores": {"A": 80.0}, "tracks": {"exact": {"A": 40.0}, "f1": {"A": 60.0}},
                          "forward": {"task": "B", "native": 30.0, "exact": 10.0, "f1": 20.0},
                          "zero_shot": {"A": {"native": 5.0, "exact": 1.0, "f1": 2.0},
                                        "B": {"native": 25.0, "exact": 12.0, "f1": 15.0}}})
    add_stage_record(ms, {"scores": {"A": 70.0, "B": 90.0},
                          "tracks": {"exact": {"A": 35.0, "B": 50.0}, "f1": {"A": 55.0, "B": 70.0}}})
    assert ms["native"].rows == [[80.0, None], [70.0, 90.0]] and ms["exact"].rows == [[40.0, None], [35.0, 50.0]]
    assert ms["native"].fwt() == pytest.approx(30 - 25) and ms["exact"].fwt() == pytest.approx(10 - 12)
    assert ms["f1"].zero_shot == [2.0, 15.0]
    with pytest.raises(ValueError, match="not the next task"):
        add_stage_record(track_matrices(["A", "B", "C"], ("native",)),
                         {"scores": {"A": 1.0}, "forward": {"task": "C", "native": 1.0}})
