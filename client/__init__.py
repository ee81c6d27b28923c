"""MicroFarm render client: a warm Blender that renders the frames a farm server leases to it."""
