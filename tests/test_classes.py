"""Class identities: the packaged table, --synsets files, and the names a run writes."""

from pathlib import Path

import pytest

from runner.classes import check_synsets, class_table, short_name
from runner.config import ConfigError

SYNSETS = Path(__file__).resolve().parents[2] / "shared/data/imagenet-sample/synsets.txt"


def test_packaged_table_is_imagenet_1k_in_sorted_wnid_order():
    table = class_table()
    assert len(table) == 1000
    assert table[0] == ("n01440764", "tench, Tinca tinca")
    assert [w for w, _ in table] == sorted(w for w, _ in table)  # val_label.txt's order
    assert short_name(2) == "great white shark"
    assert short_name(1000) == "class 1000"


@pytest.mark.skipif(not SYNSETS.is_file(), reason="shared imagenet-sample synsets.txt absent")
def test_packaged_table_equals_the_samples_synsets_file():
    assert class_table(str(SYNSETS)) == class_table()


def test_bad_synsets_files_are_refused_in_one_line(tmp_path):
    bad = tmp_path / "synsets.txt"
    bad.write_text("0 n01440764 tench\nn01443537 goldfish\n")
    with pytest.raises(ConfigError, match=r"synsets.txt:2: expected '<index> <wnid> <names>'"):
        class_table(str(bad))
    bad.write_text("0 n01440764 tench\n2 n01484850 great white shark\n")
    with pytest.raises(ConfigError, match="does not cover classes 0..1"):
        class_table(str(bad))
    with pytest.raises(ConfigError, match="cannot read"):
        check_synsets(str(tmp_path / "absent.txt"))
    good = tmp_path / "two.txt"
    good.write_text("0 n01440764 tench, Tinca tinca\n1 n01443537 goldfish\n")
    assert short_name(0, str(good)) == "tench" and short_name(1, str(good)) == "goldfish"
