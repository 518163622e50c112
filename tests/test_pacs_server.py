"""The test PACS itself: Orthanc answers DICOMweb and keeps a stored series."""

from __future__ import annotations

from pacs_server import CtSeries, OrthancServer, dicomweb_client


def test_orthanc_serves_the_stored_series(orthanc: OrthancServer, ct_series: CtSeries) -> None:
    client = dicomweb_client(orthanc)
    series = client.search_for_series(
        study_instance_uid=ct_series.study_instance_uid, search_filters={"Modality": "CT"}
    )
    assert [item["0020000E"]["Value"][0] for item in series] == [ct_series.series_instance_uid]
    metadata = client.retrieve_series_metadata(
        study_instance_uid=ct_series.study_instance_uid,
        series_instance_uid=ct_series.series_instance_uid,
    )
    assert len(metadata) == 24
