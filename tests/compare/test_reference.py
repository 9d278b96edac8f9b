"""Reference files: a CSV is read without pyarrow, and reads as pyarrow would read it."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from shadowproxy.compare.config import FeatureConfig
from shadowproxy.compare.reference import FeatureData, read_reference
from shadowproxy.errors import UsageError
from tests.compare.blocked import run_without

CSV = """\
whole,real,text,flag,mixed,empty
1,1,north,true,3,
2,2.5,NA,false,x,
,nan,,True,4,
NA,,1,false,,NA
-7,-0.25,"south, west",FALSE,5,
0,1e3,north,,6,
"""
FEATURES = {name: FeatureConfig(path=f"$.{name}")
            for name in ("whole", "real", "text", "flag", "mixed", "empty")}


READ = """
import json
from pathlib import Path

from shadowproxy.compare.config import FeatureConfig
from shadowproxy.compare.reference import read_reference

names = sys.argv[2:]
data = read_reference(Path(sys.argv[1]), {n: FeatureConfig(path="$." + n) for n in names},
                      sample_max=1000, seed=1)
print(json.dumps({n: {**{k: v for k, v in vars(d).items() if k != "sample"},
                      "sample": sorted(d.sample.tolist())} for n, d in data.items()}))
"""


def fields(d: FeatureData) -> dict[str, Any]:
    return {**{k: v for k, v in vars(d).items() if k != "sample"},
            "sample": sorted(d.sample.tolist())}


@pytest.mark.parametrize("suffix", [".csv", ".csv.gz"])
def test_a_csv_reference_is_read_without_pyarrow_as_pyarrow_reads_it(tmp_path: Path,
                                                                     suffix: str) -> None:
    """Without pyarrow, a CSV's numbers, missing values, text and booleans read as pyarrow's."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    path = tmp_path / f"train{suffix}"
    if suffix == ".csv.gz":
        path.write_bytes(gzip.compress(CSV.encode()))
    else:
        path.write_text(CSV)
    plain = tmp_path / "plain.csv"
    plain.write_text(CSV)
    parquet = tmp_path / "train.parquet"
    pq.write_table(pcsv.read_csv(plain), parquet)
    done = run_without(["pyarrow"], READ, str(path), *FEATURES)
    assert done.returncode == 0, done.stderr
    ours = json.loads(done.stdout)
    theirs = read_reference(parquet, FEATURES, sample_max=1000, seed=1)
    for name in FEATURES:
        assert ours[name] == fields(theirs[name]), name
    assert ours["whole"]["counts"] == {"1": 1, "2": 1, "-7": 1, "0": 1}
    assert ours["real"]["counts"]["1000"] == 1 and ours["real"]["n_missing"] == 2
    assert ours["text"]["counts"] == {"north": 2, "NA": 1, "1": 1, "south, west": 1}
    assert ours["flag"]["counts"] == {"true": 2, "false": 3}
    assert ours["mixed"]["n_numeric"] == 0 and ours["empty"]["n_missing"] == 6


@pytest.mark.parametrize(("text", "message"), [
    ("", "the file is empty"),
    ("a,b\n1,2\n3\n", "line 3 has 1 cells, the header 2"),
])
def test_a_bad_csv_reference_is_a_usage_error(tmp_path: Path, text: str, message: str) -> None:
    """An empty file or a ragged row: UsageError saying which."""
    path = tmp_path / "train.csv"
    path.write_text(text)
    with pytest.raises(UsageError, match=message):
        read_reference(path, {"a": FeatureConfig(path="$.a")}, sample_max=1000, seed=1)
