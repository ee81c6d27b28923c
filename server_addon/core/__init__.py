"""The server core: scheduler, storage and the asyncio server. Importable without bpy."""

from .jobs import Job, JobState
from .scheduler import Farm
from .server import FarmServer, ServerConfig
from .thread import ServerThread

__all__ = ["Farm", "FarmServer", "Job", "JobState", "ServerConfig", "ServerThread"]
