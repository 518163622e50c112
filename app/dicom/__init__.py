"""DICOM interoperability: masks as DICOM SEG (highdicom), the PACS over DICOMweb.

source.py orders a source series by geometry; seg.py builds and reads SEGs; pacs.py talks
DICOMweb; export.py records exports and is the `dicom-export` job; imports.py makes a mask group from a SEG;
routes.py the download route.
"""
