"""logits.npy written row by row: positions, resume, and a file of another shape."""

import numpy as np
import pytest

from runner.journal import JournalError, LogitsFile


def test_rows_land_at_their_image_index_and_survive_a_resume(tmp_path):
    path = tmp_path / "logits.npy"
    rows = np.arange(12, dtype=np.float32).reshape(4, 3)
    f = LogitsFile(path, 6, 3, resume=False)
    f.write(np.array([4, 1]), rows[:2])
    f.close()
    f = LogitsFile(path, 6, 3, resume=True)  # keeps what is there
    f.write(np.array([0, 5]), rows[2:].astype(np.float64))  # converted to float32
    f.close()
    got = np.load(path)
    assert got.dtype == np.float32 and got.shape == (6, 3)
    np.testing.assert_array_equal(got[[4, 1, 0, 5]], rows)
    np.testing.assert_array_equal(got[[2, 3]], 0)  # never written

    LogitsFile(path, 6, 3, resume=False).close()  # a new run starts from zeros
    np.testing.assert_array_equal(np.load(path), 0)


def test_resume_refuses_a_file_of_another_shape(tmp_path):
    path = tmp_path / "logits.npy"
    LogitsFile(path, 6, 3, resume=False).close()
    with pytest.raises(JournalError, match=r"expected float32 \(6, 1000\)"):
        LogitsFile(path, 6, 1000, resume=True)
