"""The server core: the scheduler and its state machine, the service every event goes through, the stores,
and the render-client and tool sides of the farm's port. Importable without bpy and without aiohttp; the
parts are put together in server_addon.app (the composition root)."""

from .config import ServerConfig
from .jobs import Job, JobState
from .scheduler import Farm
from .service import FarmService

__all__ = ["Farm", "FarmService", "Job", "JobState", "ServerConfig"]
