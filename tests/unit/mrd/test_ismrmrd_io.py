"""ismrmrd_io: bulk h5py reads and writes agree with ismrmrd-python's own Dataset."""

from __future__ import annotations

from pathlib import Path

import ismrmrd
import numpy as np
import pytest

from recon_server.mrd import ismrmrd_io

HEADER = "<?xml version='1.0'?><ismrmrdHeader xmlns='http://www.ismrm.org/ISMRMRD'/>"


def _random_scan(rng: np.random.Generator, n: int = 7, channels: int = 3, samples: int = 16):
    headers = ismrmrd_io.new_acquisition_headers(n)
    headers["idx"]["kspace_encode_step_1"] = np.arange(n)
    headers["position"] = rng.standard_normal((n, 3))
    headers["flags"] = rng.integers(0, 2**40, n, dtype=np.uint64)
    headers["user_float"] = rng.standard_normal((n, 8))
    data = [
        (rng.standard_normal((channels, samples)) + 1j * rng.standard_normal((channels, samples))).astype(
            np.complex64
        )
        for _ in range(n)
    ]
    return headers, data


def test_new_headers_zeroed_with_version() -> None:
    h = ismrmrd_io.new_acquisition_headers(4)
    assert h.dtype.itemsize == 340
    assert np.all(h["version"] == 1)
    assert np.all(h["flags"] == 0)
    with pytest.raises(ValueError, match=">= 0"):
        ismrmrd_io.new_acquisition_headers(-1)


def test_write_then_read_matches_ismrmrd_dataset(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    headers, data = _random_scan(rng)
    traj = [rng.standard_normal((16, 2)).astype(np.float32) for _ in data]
    path = tmp_path / "raw.h5"
    ismrmrd_io.write_raw(path, HEADER, headers, data, trajectories=traj)

    scan = ismrmrd_io.read_raw(path)
    assert scan.header_xml == HEADER
    assert len(scan) == len(data)
    assert scan.trajectories is not None
    with ismrmrd.Dataset(str(path), "dataset", create_if_needed=False) as dset:
        assert dset.read_xml_header().decode() == HEADER
        assert dset.number_of_acquisitions() == len(data)
        for i in range(len(data)):
            acq = dset.read_acquisition(i)
            np.testing.assert_array_equal(acq.data, data[i])
            np.testing.assert_array_equal(scan.data[i], acq.data)
            np.testing.assert_array_equal(scan.trajectories[i], acq.traj)
            raw_head = np.frombuffer(bytes(acq.getHead()), dtype=ismrmrd_io.ACQUISITION_HEADER_DTYPE)[0]
            assert raw_head.tobytes() == scan.acquisition_headers[i].tobytes()
            assert acq.idx.kspace_encode_step_1 == i
            assert acq.active_channels == 3 and acq.number_of_samples == 16


def test_dataset_written_file_reads_identically(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    path = tmp_path / "by_ismrmrd.h5"
    expected = []
    with ismrmrd.Dataset(str(path), "dataset", create_if_needed=True) as dset:
        dset.write_xml_header(HEADER)
        for i in range(5):
            arr = (rng.standard_normal((2, 8)) + 1j * rng.standard_normal((2, 8))).astype(np.complex64)
            acq = ismrmrd.Acquisition.from_array(arr)
            acq.idx.kspace_encode_step_1 = 10 + i
            acq.set_flag(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
            dset.append_acquisition(acq)
            expected.append((arr, bytes(acq.getHead())))
    scan = ismrmrd_io.read_raw(path)
    assert scan.trajectories is None
    for i, (arr, head) in enumerate(expected):
        np.testing.assert_array_equal(scan.data[i], arr)
        assert scan.acquisition_headers[i].tobytes() == head
    assert list(scan.acquisition_headers["idx"]["kspace_encode_step_1"]) == [10, 11, 12, 13, 14]


def test_read_limits_and_missing_parts(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    headers, data = _random_scan(rng, n=3)
    path = tmp_path / "raw.h5"
    ismrmrd_io.write_raw(path, HEADER, headers, data)
    with pytest.raises(ValueError, match="exceed the limit"):
        ismrmrd_io.read_raw(path, max_acquisitions=2)
    with pytest.raises(ValueError, match=r"^not an ISMRMRD raw file: .*raw\.h5 \(no /other/xml\)$"):
        ismrmrd_io.read_raw(path, group="other")
    with pytest.raises(ValueError, match="3 acquisition headers but 2"):
        ismrmrd_io.write_raw(path, HEADER, headers, data[:2])


def test_images_roundtrip_through_ismrmrd_reader(tmp_path: Path) -> None:
    images = []
    for s in range(3):
        img = ismrmrd.Image.from_array(np.full((1, 1, 6, 5), s, dtype=np.float32))
        img.slice = s
        meta = ismrmrd.Meta({"SeriesDescription": f"slice {s}"})
        img.attribute_string = meta.serialize()
        images.append(img)
    path = tmp_path / "img.h5"
    ismrmrd_io.write_images(path, images)
    back = ismrmrd_io.read_images(path)
    assert len(back) == 3
    for s, img in enumerate(back):
        assert img.slice == s
        assert img.data.shape == (1, 1, 6, 5)
        assert np.all(img.data == s)
        assert ismrmrd.Meta.deserialize(img.attribute_string)["SeriesDescription"] == f"slice {s}"


def test_field_reader_reads_nested_fields_like_numpy() -> None:
    heads = ismrmrd_io.new_acquisition_headers(1)
    heads["flags"] = (1 << 40) | 3
    heads["center_sample"] = 77
    heads["idx"]["kspace_encode_step_1"] = 65535
    heads["idx"]["slice"] = 9
    heads["sample_time_us"] = 2.5
    names = ["flags", "center_sample", "sample_time_us", "idx.kspace_encode_step_1", "idx.slice"]
    fields = ismrmrd_io.field_reader(ismrmrd_io.ACQUISITION_HEADER_DTYPE, names)
    assert fields.unpack_from(heads[0].tobytes()) == ((1 << 40) | 3, 77, 2.5, 65535, 9)


@pytest.mark.parametrize(
    ("names", "why"),
    [
        (["position"], "scalar"),
        (["idx.slice", "flags"], "order"),
        (["flags", "flags"], "distinct"),
        (["idx.nope"], "no field"),
    ],
)
def test_field_reader_refuses_arrays_unknown_names_and_disorder(names: list[str], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        ismrmrd_io.field_reader(ismrmrd_io.ACQUISITION_HEADER_DTYPE, names)


def test_field_reader_refuses_big_endian_fields() -> None:
    with pytest.raises(ValueError, match="big-endian"):
        ismrmrd_io.field_reader(np.dtype([("a", "<u2"), ("b", ">u4")]), ["a", "b"])
