"""`pacs-masks export-seg` and `import-seg`: the PACS features from the command line."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from app.audit import Actor
from app.config import Settings
from app.db import create_engine, create_sessionmaker
from app.dicom.export import group_seg
from app.errors import AppError, BadUserInput
from app.main import open_storage
from app.storage import StorageError


async def _with_resources(settings: Settings, args: argparse.Namespace, actor: Actor) -> str:
    # The DICOM stack is loaded by these commands only, not by every `pacs-masks` command
    # (`serve` among them).
    import pydicom
    from pydicom.errors import InvalidDicomError

    from app.dicom.imports import import_seg
    from app.dicom.seg import summary

    engine = create_engine(settings.resolved_database_url)
    storage = await open_storage(settings)
    try:
        sessionmaker = create_sessionmaker(engine)
        source_dir = Path(args.source_dir) if args.source_dir else None
        if args.command == "export-seg":
            seg = await group_seg(
                sessionmaker, storage, settings, args.group_id, source_dir=source_dir
            )
            await asyncio.to_thread(seg.save_as, args.out, enforce_file_format=True)
            done = summary(seg)
            return (
                f"SEG of mask group {args.group_id} written to {args.out}: "
                f"{done.segment_count} segment(s), {done.frame_count} frame(s), "
                f"series {done.series_instance_uid}"
            )
        dataset = None
        series, sop = args.series, args.sop
        if args.file:
            try:
                dataset = await asyncio.to_thread(pydicom.dcmread, args.file)
            except (InvalidDicomError, OSError) as error:
                raise BadUserInput(f"{args.file} is not a readable DICOM file: {error}") from error
            series, sop = str(dataset.SeriesInstanceUID), str(dataset.SOPInstanceUID)
        elif not (series and sop):
            raise BadUserInput("name the SEG with --file, or with --series and --sop (PACS)")
        group = await import_seg(
            sessionmaker,
            storage,
            settings,
            actor,
            annotation_id=args.annotation,
            series_instance_uid=series,
            sop_instance_uid=sop,
            dataset=dataset,
            source_dir=source_dir,
        )
        return f"mask group {group.id} created from SEG {sop}: {group.slice_count} slices"
    finally:
        await storage.aclose()
        await engine.dispose()


def run(settings: Settings, args: argparse.Namespace, actor: Actor) -> tuple[int, str]:
    """(exit code, the one line to print)."""
    try:
        return 0, asyncio.run(_with_resources(settings, args, actor))
    except AppError as error:
        return 1, f"pacs-masks: {error.message}"
    except StorageError as error:
        return 1, f"pacs-masks: storage could not be used: {error}"
    except SQLAlchemyError as error:
        reason = str(getattr(error, "orig", None) or error).splitlines()[0]
        return 1, f"pacs-masks: the database could not be used ({reason}); is it migrated?"
    except OSError as error:
        return 1, f"pacs-masks: {error}"


def add_commands(commands: argparse._SubParsersAction[Any]) -> None:
    export = commands.add_parser(
        "export-seg", help="write a COMPLETE mask group as a DICOM SEG file"
    )
    export.add_argument("group_id", type=int)
    export.add_argument("--out", required=True, help="the .dcm file to write")
    export.add_argument(
        "--source-dir",
        help="folder of the source series' DICOM files (default: read it from DICOMWEB_URL)",
    )
    importing = commands.add_parser(
        "import-seg", help="create a mask group from a DICOM SEG (a file or the PACS)"
    )
    importing.add_argument("--annotation", type=int, required=True, help="annotation id")
    importing.add_argument("--file", help="the SEG file (else --series and --sop from the PACS)")
    importing.add_argument("--series", help="SeriesInstanceUID of the SEG in the PACS")
    importing.add_argument("--sop", help="SOPInstanceUID of the SEG in the PACS")
    importing.add_argument(
        "--source-dir",
        help="folder of the source series' DICOM files (default: read it from DICOMWEB_URL)",
    )
