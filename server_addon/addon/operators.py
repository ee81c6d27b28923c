"""Operators. Each returns at once: network, hashing and packing happen on other threads (session.py, sending.py)."""

from __future__ import annotations

from pathlib import Path

import bpy
from bpy.props import BoolProperty, EnumProperty, StringProperty

from protocol.settings import JobRequest, SettingsError

from . import props, runtime
from .bridge import ServerSettings
from .errors import FarmError, sentence
from .session import State
from .submit import JobSubmission

_NOT_STOPPED = {State.STARTING: "The farm server is starting", State.RUNNING: "The farm server is running",
                State.STOPPING: "The farm server is stopping"}


def _poll_state(cls: type, wanted: State, message: str) -> bool:
    """Buttons are greyed out, with a reason in their tooltip, unless the server is in `wanted` state."""
    rt = runtime.current()
    state = rt.state if rt is not None else None
    if state is wanted:
        return True
    cls.poll_message_set(_NOT_STOPPED.get(state, message) if wanted is State.STOPPED else message)
    return False


class MICROFARM_OT_start_server(bpy.types.Operator):
    """Start the farm server on this computer; render clients on the LAN can then join"""

    bl_idname = "microfarm.start_server"
    bl_label = "Start Server"

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return _poll_state(cls, State.STOPPED, "The MicroFarm add-on is not enabled")

    def execute(self, context: bpy.types.Context) -> set[str]:
        prefs = props.preferences(context)
        host = prefs.bind_address.strip() or "0.0.0.0"
        output = bpy.path.abspath(prefs.output_dir) if prefs.output_dir else props.DEFAULT_OUTPUT_DIR
        settings = ServerSettings(output_dir=Path(output), host=host, port=prefs.port, secret=prefs.secret,
                                  farm_name=prefs.farm_name.strip(), discovery=prefs.use_discovery,
                                  web_port=prefs.web_port if prefs.use_web else None,
                                  web_host=prefs.web_host.strip() or "127.0.0.1")
        try:
            runtime.get().start(settings)
        except FarmError as exc:
            self.report({'ERROR'}, str(exc))
            return {'CANCELLED'}
        self.report({'INFO'}, f"Starting the farm server on {host}:{prefs.port}")
        return {'FINISHED'}


class MICROFARM_OT_stop_server(bpy.types.Operator):
    """Stop the farm server: clients are disconnected, unfinished jobs continue at the next start"""

    bl_idname = "microfarm.stop_server"
    bl_label = "Stop Server"

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return _poll_state(cls, State.RUNNING, "The farm server is not running")

    def execute(self, context: bpy.types.Context) -> set[str]:
        try:
            runtime.get().stop()
        except FarmError as exc:
            self.report({'ERROR'}, str(exc))
            return {'CANCELLED'}
        return {'FINISHED'}


def job_request(scene: bpy.types.Scene) -> JobRequest:
    """The job's settings from the panel, defaulting to the scene's. Raises SettingsError."""
    settings = scene.microfarm
    if settings.use_frame_range:
        start, end = settings.frame_start, settings.frame_end
    else:
        start, end = scene.frame_start, scene.frame_end
    file_format = None if settings.file_format == "SCENE" else settings.file_format
    return JobRequest.from_wire({"frame_start": start, "frame_end": end, "frame_step": scene.frame_step,
                                 "chunk": settings.chunk, "file_format": file_format,
                                 "allow_missing": settings.allow_missing, "needs_scripts": settings.needs_scripts,
                                 "persistent_data": settings.persistent_data})


def current_frame_request(scene: bpy.types.Scene) -> JobRequest:
    """The scene's current frame, with the panel's format, split into tiles if asked. Raises SettingsError."""
    settings = scene.microfarm
    file_format = None if settings.file_format == "SCENE" else settings.file_format
    split = settings.split_tiles if settings.use_split else None
    return JobRequest.from_wire({"frame_start": scene.frame_current, "frame_end": scene.frame_current, "chunk": 1,
                                 "file_format": file_format, "split": split,
                                 "allow_missing": settings.allow_missing, "needs_scripts": settings.needs_scripts,
                                 "persistent_data": settings.persistent_data})


class _SendCopy:
    """Base of the buttons that send a saved copy of the open file to the farm as a job (a mixin: a
    registered operator class must not be subclassed)."""

    show_result = False  # Render Current Frame: load the frame into the Image Editor when it arrives
    check_only = False  # Check Files: find what would travel, send nothing

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return context.scene is not None and _poll_state(cls, State.RUNNING, "Start the farm server first")

    def request(self, scene: bpy.types.Scene) -> JobRequest:
        raise NotImplementedError

    def execute(self, context: bpy.types.Context) -> set[str]:
        scene = context.scene
        settings = scene.microfarm
        try:
            request = self.request(scene)
        except SettingsError as exc:
            self.report({'ERROR'}, sentence(str(exc)))
            return {'CANCELLED'}
        rt = runtime.get()
        try:
            copy = rt.blend_drop_path()
        except FarmError as exc:
            self.report({'ERROR'}, str(exc))
            return {'CANCELLED'}
        # A copy: the open file keeps its path, its dirty flag and its (unpacked) images; the file on disk
        # is not touched. Without relative_remap the copy keeps the artist's `//` paths, relative to the open
        # file's folder: the tracer reads it as if it lay there (the project), and the job is laid out so.
        # Uncompressed: the tracer reads and rewrites it without decompressing a temporary copy first.
        try:
            bpy.ops.wm.save_as_mainfile(filepath=str(copy), copy=True, relative_remap=False, compress=False,
                                        check_existing=False)
        except RuntimeError as exc:
            self.report({'ERROR'}, f"Could not save a copy of the file for the farm: {exc}")
            return {'CANCELLED'}
        location = Path(bpy.data.filepath) if bpy.data.filepath else None
        name = location.name if location is not None else "untitled.blend"
        video = ({"codec": settings.video_codec, "quality": settings.video_quality,
                  "location": settings.video_location} if settings.use_video and not self.show_result else None)
        try:
            rt.submit(JobSubmission(blend=copy, name=name, request=request, location=location,
                                    pack=settings.pack_textures, priority=settings.priority, video=video,
                                    show_result=self.show_result, check_only=self.check_only))
        except FarmError as exc:
            copy.unlink(missing_ok=True)
            self.report({'ERROR'}, str(exc))
            return {'CANCELLED'}
        packing = " (packing textures)" if settings.pack_textures else ""
        if self.check_only:
            self.report({'INFO'}, f"Checking the files {name} needs{packing}")
        else:
            self.report({'INFO'}, f"Sending {name} and the files it needs to the farm{packing}")
        return {'FINISHED'}


class MICROFARM_OT_create_job(_SendCopy, bpy.types.Operator):
    """Send a copy of this file and the files it needs to the farm; the open file stays as it is"""

    bl_idname = "microfarm.create_job"
    bl_label = "Create Render Job"

    def request(self, scene: bpy.types.Scene) -> JobRequest:
        return job_request(scene)


class MICROFARM_OT_render_current_frame(_SendCopy, bpy.types.Operator):
    """Render the current frame on the farm (split across clients if asked) and show it in the Image Editor"""

    bl_idname = "microfarm.render_current_frame"
    bl_label = "Render Current Frame"
    show_result = True

    def request(self, scene: bpy.types.Scene) -> JobRequest:
        return current_frame_request(scene)


class MICROFARM_OT_check_files(_SendCopy, bpy.types.Operator):
    """List what would travel with this file (textures, libraries, caches), what the farm has, what is missing"""

    bl_idname = "microfarm.check_files"
    bl_label = "Check Files"
    check_only = True

    def request(self, scene: bpy.types.Scene) -> JobRequest:
        return job_request(scene)


class _JobAction:
    """Base of the job buttons: ask the server, report its answer (or let the panel show it later)."""

    action = ""
    job_id: StringProperty(name="Job", options={'SKIP_SAVE'})

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return _poll_state(cls, State.RUNNING, "The farm server is not running")

    def arguments(self) -> dict | None:
        return None

    def execute(self, context: bpy.types.Context) -> set[str]:
        try:
            answer = runtime.get().job_action(self.action, self.job_id, self.arguments())
        except FarmError as exc:
            self.report({'ERROR'}, str(exc))
            return {'CANCELLED'}
        if answer:
            self.report({'INFO'}, sentence(answer))
        runtime.tag_redraw()
        return {'FINISHED'}


class MICROFARM_OT_cancel_job(_JobAction, bpy.types.Operator):
    """Stop rendering this job; the frames already rendered stay on disk"""

    bl_idname = "microfarm.cancel_job"
    bl_label = "Cancel"
    action = "cancel"


class MICROFARM_OT_pause_job(_JobAction, bpy.types.Operator):
    """Stop handing out this job's frames until it is resumed"""

    bl_idname = "microfarm.pause_job"
    bl_label = "Pause"
    action = "pause"


class MICROFARM_OT_resume_job(_JobAction, bpy.types.Operator):
    """Continue a paused or queued job, or give a failed or cancelled one another go"""

    bl_idname = "microfarm.resume_job"
    bl_label = "Resume"
    action = "resume"


class MICROFARM_OT_force_complete(_JobAction, bpy.types.Operator):
    """Call the job done with the frames rendered so far"""

    bl_idname = "microfarm.force_complete"
    bl_label = "Force Complete"
    action = "force_complete"


class MICROFARM_OT_delete_job(_JobAction, bpy.types.Operator):
    """Remove the job from the farm (its rendered frames stay on disk unless Delete Files is on)"""

    bl_idname = "microfarm.delete_job"
    bl_label = "Delete"
    action = "delete"
    delete_files: BoolProperty(name="Delete Files", default=False, options={'SKIP_SAVE'},
                               description="Also delete the job's rendered frames and video")

    def arguments(self) -> dict | None:
        return {"files": True} if self.delete_files else None


class MICROFARM_OT_clear_completed(_JobAction, bpy.types.Operator):
    """Remove every finished job (done, failed or cancelled) from the list; their frames stay on disk"""

    bl_idname = "microfarm.clear_completed"
    bl_label = "Clear Completed"
    action = "clear_completed"


class MICROFARM_OT_report(bpy.types.Operator):
    """Show a message from the farm's background work in the status bar"""

    bl_idname = "microfarm.report"
    bl_label = "MicroFarm Message"
    bl_options = {'INTERNAL'}

    level: EnumProperty(items=[("INFO", "Info", ""), ("WARNING", "Warning", ""), ("ERROR", "Error", "")],
                        default="INFO", options={'SKIP_SAVE'})
    message: StringProperty(options={'SKIP_SAVE'})

    def execute(self, context: bpy.types.Context) -> set[str]:
        self.report({self.level}, self.message)
        return {'FINISHED'}


classes = (
    MICROFARM_OT_start_server,
    MICROFARM_OT_stop_server,
    MICROFARM_OT_create_job,
    MICROFARM_OT_render_current_frame,
    MICROFARM_OT_check_files,
    MICROFARM_OT_cancel_job,
    MICROFARM_OT_pause_job,
    MICROFARM_OT_resume_job,
    MICROFARM_OT_force_complete,
    MICROFARM_OT_delete_job,
    MICROFARM_OT_clear_completed,
    MICROFARM_OT_report,
)
register, unregister = bpy.utils.register_classes_factory(classes)
