"""The MicroFarm panel in Render Properties. It draws the session's view (plain data) and never waits on anything."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import bpy

from ..core.versions import job_blender
from . import props, runtime
from .errors import sentence
from .project import SHOWN_NAMES, FileCheck
from .session import State

_JOB_ICONS = {"queued": 'TIME', "probing": 'VIEWZOOM', "rendering": 'RENDER_ANIMATION', "paused": 'PAUSE',
              "done": 'CHECKMARK', "failed": 'ERROR', "cancelled": 'CANCEL'}
_CLIENT_ICONS = {"idle": 'CHECKBOX_DEHLT', "probing": 'VIEWZOOM', "rendering": 'RENDER_STILL', "lost": 'UNLINKED'}
_FINISHED = ("done", "failed", "cancelled")


def client_state(client: Mapping[str, Any]) -> str:
    """idle / rendering frame N / probing / lost."""
    state = client.get("state", "")
    if state == "rendering" and client.get("frame") is not None:
        return f"rendering frame {client['frame']}"
    return state


def job_progress(job: Mapping[str, Any]) -> tuple[float, str]:
    done, total = job.get("frames_done") or 0, job.get("frames_total") or 0
    return (done / total if total else 0.0), f"{done}/{total} {'tiles' if job.get('tiles') else 'frames'}"


class _FarmPanel:
    bl_space_type = 'PROPERTIES'
    bl_region_type = 'WINDOW'
    bl_context = "render"


class MICROFARM_PT_farm(_FarmPanel, bpy.types.Panel):
    bl_label = "MicroFarm"

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        rt = runtime.current()
        if rt is None:
            return
        state = rt.state
        if state is State.STOPPED:
            prefs = props.preferences(context)
            row = layout.row(align=True)
            row.prop(prefs, "bind_address", text="")
            row.prop(prefs, "port", text="Port")
            layout.operator("microfarm.start_server", icon='PLAY')
        elif state is State.RUNNING and rt.address is not None:
            host, port = rt.address
            layout.label(text=f"Listening on {host}:{port}", icon='CHECKMARK')
            if rt.view.farm:
                announced = "announced on the LAN" if rt.discovery else "not announced"
                layout.label(text=f"Farm {rt.view.farm!r}, {announced}")
            if rt.web_url:
                layout.operator("wm.url_open", text=f"Web Interface: {rt.web_url}", icon='URL').url = rt.web_url
            layout.operator("microfarm.stop_server", icon='CANCEL')
        else:
            layout.label(text=f"Farm server {state.value}...", icon='SORTTIME')
        layout.operator("microfarm.save_client", icon='EXPORT')
        if rt.notice is not None:
            layout.label(text=rt.notice.text, icon='ERROR' if rt.notice.level == "ERROR" else 'INFO')


class MICROFARM_PT_clients(_FarmPanel, bpy.types.Panel):
    bl_label = "Render Clients"
    bl_parent_id = "MICROFARM_PT_farm"

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        rt = runtime.current()
        return rt is not None and rt.running

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        clients = runtime.get().view.clients
        if not clients:
            layout.label(text="No render clients connected yet")
            return
        for client in clients:
            row = layout.row()
            split = row.split(factor=0.35)
            split.label(text=client.get("name", "?"), icon=_CLIENT_ICONS.get(client.get("state", ""), 'DOT'))
            split = split.split(factor=0.4)
            split.label(text=f"{client.get('host', '')} · Blender {client.get('blender') or '?'}")
            split = split.split(factor=0.6)
            split.label(text=client_state(client))
            split.label(text=f"{client.get('frames_rendered', 0)} frames")


class MICROFARM_PT_create_job(_FarmPanel, bpy.types.Panel):
    bl_label = "Create Render Job"
    bl_parent_id = "MICROFARM_PT_farm"

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        scene = context.scene
        settings = scene.microfarm
        layout.use_property_split = True
        layout.use_property_decorate = False
        col = layout.column()
        col.prop(settings, "use_frame_range")
        sub = col.column(align=True)
        if settings.use_frame_range:
            sub.prop(settings, "frame_start")
            sub.prop(settings, "frame_end")
        else:
            sub.label(text=f"Scene frames {scene.frame_start}-{scene.frame_end}")
        col.prop(settings, "chunk")
        col.prop(settings, "file_format")
        col.prop(settings, "pack_textures")
        col.prop(settings, "allow_missing")
        col.prop(settings, "needs_scripts")
        col.prop(settings, "persistent_data")
        col.prop(settings, "priority")
        col.prop(settings, "use_video")
        if settings.use_video:
            sub = col.column(align=True)
            sub.prop(settings, "video_codec")
            sub.prop(settings, "video_quality")
            sub.prop(settings, "video_location")
        row = layout.row(align=True)
        row.operator("microfarm.create_job", icon='RENDER_ANIMATION')
        row.operator("microfarm.check_files", icon='VIEWZOOM')
        rt = runtime.current()
        check = rt.check if rt is not None else None
        if check is not None and check.filepath == bpy.data.filepath:
            draw_check(layout.box(), check)
        col = layout.column()
        col.prop(settings, "use_split")
        sub = col.column()
        sub.active = settings.use_split
        sub.prop(settings, "split_tiles", text="Tiles (0: Auto)")
        layout.operator("microfarm.render_current_frame", text=f"Render Current Frame ({scene.frame_current})",
                        icon='RENDER_STILL')


def draw_check(box: bpy.types.UILayout, check: FileCheck) -> None:
    """What travels with the open file (Check Files, or the last job sent from it)."""
    box.label(text=sentence(check.summary()), icon='CHECKMARK' if check.job_id else 'FILE_FOLDER')
    if check.packed:
        box.label(text="Textures are packed into the .blend", icon='PACKAGE')
    if check.outside:
        box.label(text=f"From outside the project ({len(check.outside)}):", icon='LIBRARY_DATA_BROKEN')
        for path in check.outside[:SHOWN_NAMES]:
            box.label(text=path[-200:])
    if check.missing:
        box.label(text=f"Missing on this disk ({len(check.missing)}):", icon='ERROR')
        for name in check.missing[:SHOWN_NAMES]:
            box.label(text=name[:200])
        if len(check.missing) > SHOWN_NAMES:
            box.label(text=f"and {len(check.missing) - SHOWN_NAMES} more")


def _progress(layout: bpy.types.UILayout, job: Mapping[str, Any]) -> None:
    factor, text = job_progress(job)
    if hasattr(layout, "progress"):  # Blender 4.0+
        layout.progress(factor=factor, type='BAR', text=text)
    else:
        layout.label(text=f"{text} ({factor:.0%})")


class MICROFARM_PT_jobs(_FarmPanel, bpy.types.Panel):
    bl_label = "Jobs"
    bl_parent_id = "MICROFARM_PT_farm"

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        rt = runtime.current()
        return rt is not None and rt.running

    def draw_header_preset(self, context: bpy.types.Context) -> None:
        self.layout.prop(context.window_manager.microfarm, "show_finished", text="", icon='FILTER')

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        view = runtime.get().view
        show_finished = context.window_manager.microfarm.show_finished
        jobs = [job for job in view.jobs if show_finished or job.get("state") not in _FINISHED]
        if not jobs:
            layout.label(text="No jobs" if not view.jobs else "No unfinished jobs")
        for job in jobs:
            draw_job(layout.box(), job)
        if any(job.get("state") in _FINISHED for job in view.jobs):
            layout.operator("microfarm.clear_completed", icon='TRASH')


def draw_job(box: bpy.types.UILayout, job: Mapping[str, Any]) -> None:
    state = job.get("state", "")
    job_id = job.get("id", "")
    row = box.row()
    row.label(text=job_id, icon=_JOB_ICONS.get(state, 'DOT'))  # made from the file's name, and unique
    row.label(text=state + (" (forced)" if job.get("forced") else ""))
    _progress(box, job)
    if job.get("error"):
        box.label(text=str(job["error"])[:200], icon='ERROR')
    elif job.get("waiting"):
        box.label(text=str(job["waiting"])[:200], icon='TIME')
    for warning in (job.get("warnings") or ())[:5]:  # missing files and scripts: shown to the end
        box.label(text=str(warning)[:200], icon='ERROR')
    box.label(text=f"Blender {job_blender(job)}", icon='BLENDER')
    if job.get("video_state"):
        detail = f": {job['video_error']}" if job.get("video_error") else ""
        box.label(text=f"video {job['video_state']}{detail}", icon='FILE_MOVIE')
    row = box.row(align=True)
    if state in ("queued", "paused", "failed", "cancelled") or (state == "done" and job.get("forced")):
        row.operator("microfarm.resume_job", icon='PLAY').job_id = job_id
    if state in ("probing", "rendering"):
        row.operator("microfarm.pause_job", icon='PAUSE').job_id = job_id
    if state not in _FINISHED:
        row.operator("microfarm.cancel_job", icon='CANCEL').job_id = job_id
        row.operator("microfarm.force_complete", icon='CHECKMARK').job_id = job_id
    row.operator("microfarm.delete_job", icon='TRASH', text="").job_id = job_id


classes = (MICROFARM_PT_farm, MICROFARM_PT_clients, MICROFARM_PT_create_job, MICROFARM_PT_jobs)
register, unregister = bpy.utils.register_classes_factory(classes)
